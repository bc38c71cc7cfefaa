#!/usr/bin/env bash
# Launch this node's share of a multitune job. Run the same line on every node:
#   NNODES=3 NODE_RANK=<0|1|2> MASTER_ADDR=<node 0's address> MASTER_PORT=29500 GPUS_PER_NODE=4 \
#     scripts/launch_node.sh configs/llama3-8b-lora.yaml [key=value ...]
# One node: NNODES=1 (MASTER_ADDR defaults to 127.0.0.1). On RunPod, scripts/runpod/train.sh sets all of this.
# ACCELERATE_CONFIG picks the accelerate file (default: FSDP2, configs/accelerate/fsdp2-3x4.yaml); the
# launch line below overrides its machine and process counts, so one file serves any cluster size.
set -euo pipefail
: "${NNODES:?set NNODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (0 on the master node)}"
if [ "$NNODES" -gt 1 ]; then
  : "${MASTER_ADDR:?set MASTER_ADDR (address of node 0, reachable from every node)}"
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
GPUS_PER_NODE="${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-$(dirname "$0")/../configs/accelerate/fsdp2-3x4.yaml}"
[ "$#" -ge 1 ] || { echo "usage: $0 CONFIG.yaml [key=value ...]" >&2; exit 2; }
exec accelerate launch --config_file "$ACCELERATE_CONFIG" \
  --num_machines "$NNODES" --machine_rank "$NODE_RANK" \
  --num_processes "$((NNODES * GPUS_PER_NODE))" \
  --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
  -m multitune.cli train "$@"
