#!/usr/bin/env bash
# Install multitune on a RunPod pod started from a PyTorch template (not needed with the Docker image):
#   git clone <this repository> /workspace/multitune && cd /workspace/multitune && scripts/runpod/setup.sh
# Keeps the template's CUDA torch, installs the pinned versions of everything else, and puts the Hugging
# Face cache on the pod's volume so that a restarted pod does not download the model again.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -v '^torch==' constraints.txt > /tmp/multitune-constraints.txt
python -m pip install -c /tmp/multitune-constraints.txt -e ".[qlora,wandb]" liger-kernel
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
grep -q 'HF_HOME=/workspace' ~/.bashrc 2>/dev/null || echo 'export HF_HOME=/workspace/.cache/huggingface' >> ~/.bashrc
echo "ready: export HF_HOME=/workspace/.cache/huggingface, then multitune doctor CONFIG"
