#!/usr/bin/env bash
# Usage: ./distributed_train.sh NUM_PROC DATA [sequencer train flags...]
# As the paper's script: one process per GPU on this node via torchrun (DDP, NCCL on GPUs, gloo on CPU).
# Multi-node: see docs/training.md (torchrun --nnodes/--rdzv-endpoint).
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "usage: $0 NUM_PROC DATA [sequencer train flags...]" >&2
  exit 2
fi
NUM_PROC=$1
DATA=$2
shift 2
if command -v torchrun >/dev/null 2>&1; then
  LAUNCH=(torchrun)
else
  LAUNCH=("${PYTHON:-python3}" -m torch.distributed.run)
fi
exec "${LAUNCH[@]}" --standalone --nproc_per_node="$NUM_PROC" -m sequencer train "$DATA" "$@"
