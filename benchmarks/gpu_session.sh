#!/usr/bin/env bash
# A short GPU lease, most valuable first: the CUDA tests of the LSTM kernels and of training, then the mixer timings
# (Triton vs cuDNN, which kernel each case got), then the launcher's tuning sweep on the training shapes. Every step
# has its own time limit and log, so that a lease cut short still leaves the earlier results.
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]      # from the repository root; logs and JSON in OUT_DIR (gpu-session)
set -u
out=${1:-gpu-session}
mkdir -p "$out"
python - > "$out/device.txt" 2>&1 <<'EOF'
import torch, triton
props = torch.cuda.get_device_properties(0)
print(torch.cuda.get_device_name(), f"sm_{props.major}{props.minor}", "torch", torch.__version__, "triton",
      triton.__version__, "cudnn", torch.backends.cudnn.version(),
      "shared memory per block (opt-in)", getattr(props, "shared_memory_per_block_optin", "?"))
EOF
cat "$out/device.txt"
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUT/NAME.log, report its exit status
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "$name: exit $? ($out/$name.log)"
}
step kernel-tests 180 python -m pytest -q -x tests/models/test_kernels_triton.py
step cuda-tests 300 python -m pytest -q tests/engine/test_cuda.py
step gpu-lstm 180 python benchmarks/gpu_lstm.py --out "$out/gpu_lstm.json"
step sweep 240 python benchmarks/gpu_lstm.py --sweep --cases s1-train s2-train --dtypes bf16 --rounds 3 \
    --out "$out/gpu_lstm_sweep.json"
