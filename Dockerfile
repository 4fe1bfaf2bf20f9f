# GPU image. The base image holds no torch: requirements.txt's pinned torch and torchvision are
# installed from PyPI, whose Linux x86_64 wheels bundle their CUDA libraries (the host needs only an
# NVIDIA driver and `docker run --gpus all`). So the image runs exactly the torch the tests pinned,
# including the box-clamp gradient rule checked on it; no apex.
FROM python:3.11-slim
WORKDIR /workspace/gradalign
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
ENV DATA_DIR=/data
ENTRYPOINT ["python", "train.py"]
CMD ["--help"]
