# GPU image for megatron_patch: NGC PyTorch brings CUDA, NCCL, Transformer Engine, apex and
# flash-attn; megatron-core is pinned to the release our backends are tested against.
# Build: docker build -t megatron-patch-llama .
# Run:   docker run --gpus all --ipc=host -v $PWD:/workspace/megatron-patch -it megatron-patch-llama
ARG BASE=nvcr.io/nvidia/pytorch:25.01-py3
FROM ${BASE}

ENV PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    MEGATRON_PATCH_BACKEND=cuda

WORKDIR /workspace/megatron-patch
COPY pyproject.toml README.md ./
COPY megatron_patch ./megatron_patch
# torch, TE, apex come from the base image: install our deps without touching them
RUN pip install "megatron-core==0.16.1" && \
    pip install -e ".[eval]" && \
    python -c "import megatron_patch, megatron.core; print(megatron_patch.backend.name)"
COPY . .
