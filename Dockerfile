# GPU image: the official PyTorch CUDA runtime (torch and torchvision come with it; no apex).
ARG BASE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE}
WORKDIR /workspace/gradalign
COPY requirements.txt .
# The base image already holds a CUDA build of torch/torchvision: install the rest only.
RUN grep -vE '^(torch|torchvision)==' requirements.txt > /tmp/req.txt && pip install --no-cache-dir -r /tmp/req.txt
COPY . .
ENV DATA_DIR=/data
ENTRYPOINT ["python", "train.py"]
CMD ["--help"]
