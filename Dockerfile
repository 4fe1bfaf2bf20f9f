# GPU image. The base image holds no torch: requirements.txt's pinned torch and torchvision (and every
# other pinned package) are installed by pip, and torch's Linux x86_64 wheels bundle their CUDA
# libraries, so the host needs only an NVIDIA driver and `docker run --gpus all`; no apex.
# The base is pinned to the exact Python the tests ran on.
ARG BASE=python:3.11.7-slim-bookworm
FROM ${BASE}

# Which CUDA build of the pinned torch: the wheel index https://download.pytorch.org/whl/<TORCH_CUDA>.
# cu130 (the default) is the build PyPI serves for torch 2.14.1 and needs a host driver >= 580;
# cu128 and cu126 run on CUDA 12.x drivers (>= 525). docs/gpu.md: which driver each needs, and how
# to check that the index holds the pinned version before building.
ARG TORCH_CUDA=cu130

WORKDIR /workspace/gradalign
COPY requirements.txt .
# The extra index offers the pin as 2.14.1+<TORCH_CUDA>, which pip prefers to PyPI's 2.14.1; the
# check after it fails the build if another CUDA build got installed (e.g. the index lacks the pin).
RUN pip install --no-cache-dir --extra-index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" -r requirements.txt \
    && python -c "import sys, torch; got = 'cu' + (torch.version.cuda or 'none').replace('.', ''); \
sys.exit(None if got == sys.argv[1] else f'torch {torch.__version__} is built for {got}, not {sys.argv[1]}')" "${TORCH_CUDA}"
COPY . .
ENV DATA_DIR=/data
# No entrypoint: name the tool, e.g. `docker run --gpus all IMAGE python gpu_check.py` (docs/gpu.md).
CMD ["python", "train.py", "--help"]
