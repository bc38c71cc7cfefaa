# multitune for rented GPU pods (RunPod and the like), on a CUDA build of PyTorch.
#   docker build -t you/multitune:0.1.0 .            (BASE_IMAGE: any pytorch/pytorch tag with the pinned torch)
#   docker run --gpus all -v /workspace:/workspace -e HF_TOKEN you/multitune:0.1.0 \
#     multitune doctor /opt/multitune/configs/llama3-8b-lora.yaml
# The base image's CUDA torch is kept: every other package is installed at the version pinned in
# constraints.txt, and the build stops if torch is not the pinned version or has no CUDA.
# The devel flavour has gcc and nvcc, which triton (liger-kernel, torch.compile) and flash-attn builds need.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Hugging Face cache, tokenised-data cache and run directories live on the pod's volume (/workspace),
# so a restarted pod neither downloads the model again nor loses its checkpoints.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/workspace/.cache/huggingface \
    MULTITUNE_CACHE=/workspace/.cache/multitune

WORKDIR /opt/multitune
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
# Pins for everything but torch (the base image's CUDA build stays), then check that it did.
RUN grep -v '^torch==' constraints.txt > /tmp/constraints-no-torch.txt \
    && pip install --no-cache-dir -c /tmp/constraints-no-torch.txt -e ".[qlora,wandb]" liger-kernel \
    && python -c "import sys, torch; pin = open('constraints.txt').read().split('torch==')[1].split()[0]; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda); \
sys.exit(0 if torch.version.cuda and torch.__version__.split('+')[0] == pin else f'base image torch {torch.__version__} is not the pinned CUDA build {pin}: pick a BASE_IMAGE with torch {pin}')" \
    && python -c "import bitsandbytes, liger_kernel, wandb, multitune.cli"
COPY configs ./configs
COPY scripts ./scripts

# runs/ in the configs resolves here, on the volume
WORKDIR /workspace
CMD ["bash"]
