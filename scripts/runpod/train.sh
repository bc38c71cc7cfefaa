#!/usr/bin/env bash
# Train on a RunPod pod or Instant Cluster: run the same line on every node (RunPod sets the rest).
#   scripts/runpod/train.sh configs/llama3-8b-lora.yaml [key=value ...]
# Maps PRIMARY_ADDR/MASTER_ADDR, PRIMARY_PORT/MASTER_PORT, NODE_RANK, NUM_NODES and NUM_TRAINERS to the
# launcher, points NCCL/Gloo at the cluster network (ens*, never eth0), reads HF_TOKEN/WANDB_API_KEY from
# the pod's secrets, and picks the launch config (DDP for adapters, FSDP2/HSDP for full fine-tuning; set
# ACCELERATE_CONFIG to choose another). The mapping is multitune.launch.runpod.launch_env (tested).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
[ "$#" -ge 1 ] || { echo "usage: $0 CONFIG.yaml [key=value ...]" >&2; exit 2; }
mapping="$(python -m multitune.launch.runpod --accelerate-dir "$here/../../configs/accelerate" "$@")"
eval "$mapping"
echo "multitune: node ${NODE_RANK} of ${NNODES}, ${GPUS_PER_NODE} GPU(s), rendezvous ${MASTER_ADDR}:${MASTER_PORT}, $(basename "$ACCELERATE_CONFIG")" >&2
exec "$here/../launch_node.sh" "$@"
