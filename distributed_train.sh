#!/usr/bin/env bash
# Usage: ./distributed_train.sh NUM_PROC DATA [sequencer train flags...]
# As the paper's script: one process per GPU on this node via torchrun (DDP, NCCL on GPUs, gloo on CPU).
# Launched through sequencer.engine.distributed, torchrun without its launcher tracebacks: a failing process's
# one-line error and exit status are the job's, and Ctrl-C exits 130 after the workers save a recovery checkpoint.
# Multi-node: TORCHRUN_ARGS holds torchrun's arguments for this node, in place of --standalone (docs/training.md):
#   TORCHRUN_ARGS="--nnodes 2 --node_rank K --master_addr HOST --master_port PORT" ./distributed_train.sh 8 DATA ...
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "usage: $0 NUM_PROC DATA [sequencer train flags...]" >&2
  exit 2
fi
NUM_PROC=$1
DATA=$2
shift 2
PY=${PYTHON:-}
if [ -z "$PY" ] && command -v torchrun >/dev/null 2>&1 && [ -x "$(dirname "$(command -v torchrun)")/python" ]; then
  PY="$(dirname "$(command -v torchrun)")/python"  # the Python whose torch the torchrun on PATH belongs to
fi
read -r -a LAUNCH <<< "${TORCHRUN_ARGS:---standalone}"  # one node unless told otherwise
exec "${PY:-python3}" -m sequencer.engine.distributed "${LAUNCH[@]}" --nproc_per_node="$NUM_PROC" \
  -m sequencer train "$DATA" "$@"
