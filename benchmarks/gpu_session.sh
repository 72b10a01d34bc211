#!/usr/bin/env bash
# A short GPU lease, most valuable first. Runs from the repository root on a machine where the project is not
# installed: PYTHONPATH=src and the machine's own python3 (its torch, Triton, timm). All output goes to one log as
# it comes, and OUT/summary.txt says each step's outcome (ok, exit N, timed out, skipped, or running when the call
# itself was cut), rewritten as each step starts and ends, so that a lease cut short still leaves the earlier
# results; the files written are few (session.log, summary.txt, one JSON per timing step).
#
#   bash benchmarks/gpu_session.sh OUT_DIR [STAGE ...]   # stages, in this order by default: tests mixer model profile
#
#   stage     steps, each with its own cap in seconds
#   tests     the Triton kernel tests (120), then tests/engine/test_cuda.py (210)
#   mixer     benchmarks/gpu_lstm.py: Triton vs cuDNN at the stage shapes (140; its JSON is written row by row)
#   model     sequencer2d_s img/s, eager: ours (auto, cuDNN, Triton), timm, convnext_tiny: inference, training (50 each)
#   profile   gpu_lstm.py --profile: the costliest kernels of each backend in training (60)
#   compiled  the model rows under torch.compile (150 each)
#   sweep     the launcher's tuning sweep on the training shapes, for BLOCK_TABLE (300)
#   reference issue 24's own tools, as they are, for its figures: gpu_lstm_bench.py (the mixer table, 150) and
#             gpu_profile.py (cuDNN training, Triton inference; 60 each), from $REFERENCE_TOOLS
#
# The whole script keeps within GPU_SESSION_BUDGET seconds (default 560, for a 600-s call: the rest is margin for
# the call's own start and the copy back). A step gets its cap or what is left of the budget, less KILL_GRACE, if
# that is less; a step with under GPU_SESSION_MIN_STEP seconds (default 20) left is skipped. A step past its limit
# gets SIGINT (pytest then prints what passed and failed so far; a benchmark its traceback), then SIGKILL after
# KILL_GRACE seconds. The default stages' caps add to 630 s, so a run where every step takes its whole cap loses the
# end (the profile first); "compiled", "sweep" and "reference" are for a second call if the lease has time.
# The GPU machine gets only the checkout: for "reference", copy the tools into an ignored folder and carry it, e.g.
#   mkdir -p .issue-tools && cp ../shared/tools/gpu_lstm_bench.py ../shared/tools/gpu_profile.py .issue-tools/
#   echo /.issue-tools/ >> .git/info/exclude      # then the device call carries .issue-tools
# GPU_SESSION_DRY_RUN=1 writes each step's command to the log without running it (tests/test_benchmark_scripts.py
# parses them on a CPU, and runs the script's budget with a stand-in python).
set -u
out=${1:?usage: gpu_session.sh OUT_DIR [tests|mixer|model|profile|compiled|sweep|reference ...]}
shift
stages=${*:-tests mixer model profile}
PY=${PYTHON:-python3}
tools=${REFERENCE_TOOLS:-.issue-tools}
dry_run=${GPU_SESSION_DRY_RUN:-}
budget=${GPU_SESSION_BUDGET:-560}
min_step=${GPU_SESSION_MIN_STEP:-20}
KILL_GRACE=10
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
for stage in $stages; do
    case $stage in tests|mixer|model|profile|compiled|sweep|reference) ;; *)
        echo "unknown stage $stage (tests, mixer, model, profile, compiled, sweep, reference)" >&2
        exit 2 ;;
    esac
done
mkdir -p "$out"
log="$out/session.log"
summary="$out/summary.txt"
done_lines=""

write_summary() {  # write_summary [LINE]: the finished steps' lines, then LINE (the step now running)
    { echo "gpu_session.sh $stages: budget $budget s, $SECONDS s used"
      printf '%s' "$done_lines"
      [ -z "${1:-}" ] || echo "$1"; } > "$summary.tmp" && mv "$summary.tmp" "$summary"
}

finish() {  # finish NAME OUTCOME: one line of the summary, also on stdout (the call's output tail)
    local line
    line=$(printf '%-24s %s' "$1" "$2")
    done_lines+="$line"$'\n'
    write_summary
    echo "$line"
}

step() {  # step NAME CAP COMMAND...: run within min(CAP, the budget left), output to the log, outcome to the summary
    local name=$1 cap=$2 start=$SECONDS status limit
    shift 2
    echo "=== $name: $*" >> "$log"
    if [ -n "$dry_run" ]; then
        finish "$name" "dry run, cap $cap s"
        return 0
    fi
    limit=$((budget - SECONDS - KILL_GRACE))
    [ "$limit" -le "$cap" ] || limit=$cap
    if [ "$limit" -lt "$min_step" ]; then
        echo "=== $name: skipped, $((budget - SECONDS)) s of the budget left" >> "$log"
        finish "$name" "skipped, $((budget - SECONDS)) s of the budget left"
        return 0
    fi
    write_summary "$(printf '%-24s %s' "$name" "running since ${start} s, limit $limit s")"
    timeout -s INT -k "$KILL_GRACE" "$limit" "$@" >> "$log" 2>&1
    status=$?
    echo "=== $name: exit $status after $((SECONDS - start)) s (limit $limit s)" >> "$log"
    case $status in
        0) finish "$name" "ok after $((SECONDS - start)) s" ;;
        124|137) finish "$name" "timed out after $((SECONDS - start)) s (limit $limit s)" ;;
        *) finish "$name" "exit $status after $((SECONDS - start)) s" ;;
    esac
}

step device 60 "$PY" - <<'EOF'
import torch, triton, timm, sequencer
props = torch.cuda.get_device_properties(0)
print("device:", torch.cuda.get_device_name(), f"sm_{props.major}{props.minor}", "torch", torch.__version__, "triton",
      triton.__version__, "cudnn", torch.backends.cudnn.version(), "timm", timm.__version__,
      "shared memory per block (opt-in)", getattr(props, "shared_memory_per_block_optin", "?"),
      "sequencer from", sequencer.__file__)
EOF
grep -m1 "^device: " "$log"

bench() {  # bench NAME CAP MODE BATCH [extra flags]: sequencer2d_s at 224 px in bf16, every comparison row
    local name=$1 cap=$2 mode=$3 batch=$4
    shift 4
    step "$name" "$cap" "$PY" -m sequencer benchmark --device cuda --model sequencer2d_s --mode "$mode" \
        -b "$batch" --amp-dtype bfloat16 --compare-timm --lstm-backend native --lstm-backend triton \
        --reference-model convnext_tiny --num-warmup 3 --num-iter 20 --memory-iter 0 \
        --results-file "$out/$name.json" "$@"
}

for stage in $stages; do
    case $stage in
    tests)
        step kernel-tests 120 "$PY" -m pytest -v -p no:cacheprovider tests/models/test_kernels_triton.py
        step cuda-tests 210 "$PY" -m pytest -v -p no:cacheprovider tests/engine/test_cuda.py ;;
    mixer)
        step gpu-lstm 140 "$PY" benchmarks/gpu_lstm.py --rounds 3 --iters 10 --out "$out/gpu_lstm.json" ;;
    model)
        bench model-infer 50 infer 256
        bench model-train 50 train 128 ;;
    profile)
        step gpu-profile 60 "$PY" benchmarks/gpu_lstm.py --profile --cases s1-train s2-train --dtypes bf16 ;;
    compiled)
        bench compiled-infer 150 infer 256 --torchcompile
        bench compiled-train 150 train 128 --torchcompile ;;
    sweep)
        step sweep 300 "$PY" benchmarks/gpu_lstm.py --sweep --cases s1-train s2-train --dtypes bf16 --rounds 3 \
            --iters 10 --out "$out/gpu_lstm_sweep.json" ;;
    reference)
        if [ -z "$dry_run" ] && ! [ -f "$tools/gpu_lstm_bench.py" ] && ! [ -f "$tools/gpu_profile.py" ]; then
            echo "=== reference: skipped, $tools/ holds neither gpu_lstm_bench.py nor gpu_profile.py" >> "$log"
            finish reference "skipped, $tools/ holds neither gpu_lstm_bench.py nor gpu_profile.py"
            continue
        fi
        step reference-mixer 150 "$PY" "$tools/gpu_lstm_bench.py" --json "$out/gpu_lstm_bench.json"
        step reference-profile-train 60 "$PY" "$tools/gpu_profile.py" --backend native --mode train --batch 128
        step reference-profile-infer 60 "$PY" "$tools/gpu_profile.py" --backend triton --mode infer --batch 256 ;;
    esac
done
[ -n "$dry_run" ] || echo "=== done after $SECONDS s of the $budget-s budget" >> "$log"
write_summary
