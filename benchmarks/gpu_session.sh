#!/usr/bin/env bash
# A short GPU lease, most valuable first. Runs from the repository root on a machine where the project is not
# installed: PYTHONPATH=src and the machine's own python3 (its torch, Triton, timm). Every step has its own time
# limit, and all output goes to one log, so that a lease cut short still leaves the earlier results; the files
# written are few (session.log plus one JSON per timing step), since a lease may bring back only eight.
#
#   bash benchmarks/gpu_session.sh OUT_DIR [STAGE ...]     # stages, in this order by default: tests mixer model
#
#   tests    the Triton kernel tests and tests/engine/test_cuda.py                          (at most 330 s)
#   mixer    benchmarks/gpu_lstm.py: Triton vs cuDNN at the stage shapes, then the kernel profile (at most 200 s)
#   model    sequencer2d_s img/s, eager: ours (auto, cuDNN, Triton), timm, convnext_tiny       (at most 100 s)
#   compiled the same under torch.compile                                                      (at most 300 s)
#   sweep    the launcher's tuning sweep on the training shapes (BLOCK_TABLE)                   (at most 300 s)
#   reference issue 24's own tools, as they are, for its figures: gpu_lstm_bench.py (the mixer table) and
#            gpu_profile.py (cuDNN training, Triton inference), from $REFERENCE_TOOLS (at most 270 s)
#
# The default stages are for one 10-minute call (their limits add to 630 s: only a run where every step takes its
# whole limit loses the end of model-train); "compiled" and "sweep" are for a second call if the lease has time.
# The GPU machine gets only the checkout: for "reference", copy the tools into an ignored folder and carry it, e.g.
#   mkdir -p .issue-tools && cp ../shared/tools/gpu_lstm_bench.py ../shared/tools/gpu_profile.py .issue-tools/
#   echo /.issue-tools/ >> .git/info/exclude      # then the device call carries .issue-tools
# GPU_SESSION_DRY_RUN=1 writes each step's command to the log without running it (tests/test_benchmark_scripts.py
# parses them on a CPU).
set -u
out=${1:?usage: gpu_session.sh OUT_DIR [tests|mixer|model|compiled|sweep ...]}
shift
stages=${*:-tests mixer model}
PY=${PYTHON:-python3}
tools=${REFERENCE_TOOLS:-.issue-tools}
dry_run=${GPU_SESSION_DRY_RUN:-}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
for stage in $stages; do
    case $stage in tests|mixer|model|compiled|sweep|reference) ;; *)
        echo "unknown stage $stage (tests, mixer, model, compiled, sweep, reference)" >&2
        exit 2 ;;
    esac
done
mkdir -p "$out"
log="$out/session.log"

step() {  # step NAME SECONDS COMMAND...: run with a limit, output to the log, report its exit status
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    echo "=== $name: $*" >> "$log"
    [ -z "$dry_run" ] || return 0
    timeout "$limit" "$@" >> "$log" 2>&1
    status=$?
    echo "=== $name: exit $status after $((SECONDS - start)) s" | tee -a "$log"
}

[ -n "$dry_run" ] || "$PY" - 2>&1 <<'EOF' | tee -a "$log"
import torch, triton, timm, sequencer
props = torch.cuda.get_device_properties(0)
print(torch.cuda.get_device_name(), f"sm_{props.major}{props.minor}", "torch", torch.__version__, "triton",
      triton.__version__, "cudnn", torch.backends.cudnn.version(), "timm", timm.__version__,
      "shared memory per block (opt-in)", getattr(props, "shared_memory_per_block_optin", "?"),
      "sequencer from", sequencer.__file__)
EOF

bench() {  # bench NAME MODE BATCH [extra flags]: sequencer2d_s at 224 px in bf16, every comparison row
    local name=$1 mode=$2 batch=$3
    shift 3
    step "$name" "${LIMIT:-100}" "$PY" -m sequencer benchmark --device cuda --model sequencer2d_s --mode "$mode" \
        -b "$batch" --amp-dtype bfloat16 --compare-timm --lstm-backend native --lstm-backend triton \
        --reference-model convnext_tiny --num-warmup 3 --num-iter 20 --memory-iter 0 \
        --results-file "$out/$name.json" "$@"
}

for stage in $stages; do
    case $stage in
    tests)
        step kernel-tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/models/test_kernels_triton.py
        step cuda-tests 210 "$PY" -m pytest -q -p no:cacheprovider tests/engine/test_cuda.py ;;
    mixer)
        step gpu-lstm 140 "$PY" benchmarks/gpu_lstm.py --rounds 3 --iters 10 --out "$out/gpu_lstm.json"
        step gpu-profile 60 "$PY" benchmarks/gpu_lstm.py --profile --cases s1-train s2-train --dtypes bf16 ;;
    model)
        LIMIT=50 bench model-infer infer 256
        LIMIT=50 bench model-train train 128 ;;
    compiled)
        LIMIT=150 bench compiled-infer infer 256 --torchcompile
        LIMIT=150 bench compiled-train train 128 --torchcompile ;;
    sweep)
        step sweep 300 "$PY" benchmarks/gpu_lstm.py --sweep --cases s1-train s2-train --dtypes bf16 --rounds 3 \
            --iters 10 --out "$out/gpu_lstm_sweep.json" ;;
    reference)
        if [ -z "$dry_run" ] && ! [ -f "$tools/gpu_lstm_bench.py" ] && ! [ -f "$tools/gpu_profile.py" ]; then
            echo "=== reference: skipped, $tools/ holds neither gpu_lstm_bench.py nor gpu_profile.py" | tee -a "$log"
            continue
        fi
        step reference-mixer 150 "$PY" "$tools/gpu_lstm_bench.py" --json "$out/gpu_lstm_bench.json"
        step reference-profile-train 60 "$PY" "$tools/gpu_profile.py" --backend native --mode train --batch 128
        step reference-profile-infer 60 "$PY" "$tools/gpu_profile.py" --backend triton --mode infer --batch 256 ;;
    esac
done
