#!/usr/bin/env bash
# The `run` of the SkyPilot task files beside this script, on every node of the cluster:
#   launch/sky/run.sh CONFIG.yaml [key=value ...]
# Trains through scripts/runpod/train.sh: its mapping (multitune.launch.runpod.launch_env, tested) reads SkyPilot's
# SKYPILOT_NODE_RANK, SKYPILOT_NODE_IPS (node 0 is the rendezvous), SKYPILOT_NUM_NODES and
# SKYPILOT_NUM_GPUS_PER_NODE and picks the accelerate config in configs/accelerate.
# A managed job (`sky jobs launch`) is over for good once its run exits 0, and a node reclaimed with SIGTERM
# saves a checkpoint and stops cleanly. So node 0 exits 0 only when the run is finished (run_dir/DONE); a
# clean stop before the end exits 1, and SkyPilot relaunches the job, where the same command resumes from
# the newest checkpoint on the Hub (train.hub_checkpoints).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
[ "$#" -ge 1 ] || { echo "usage: $0 CONFIG.yaml [key=value ...]" >&2; exit 2; }
"$here/../../scripts/runpod/train.sh" "$@"
if [ "${SKYPILOT_NODE_RANK:-0}" = 0 ]; then
  run_dir="$(python -c 'import sys; from multitune.config import load_config; print(load_config(sys.argv[1], sys.argv[2:]).run_dir)' "$@")"
  if [ ! -f "$run_dir/DONE" ]; then
    echo "multitune: training stopped before the end ($run_dir has no DONE): exit 1 so that SkyPilot relaunches it" >&2
    exit 1
  fi
fi
