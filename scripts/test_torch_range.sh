#!/usr/bin/env bash
# The fast model, engine and API tests on the oldest torch pyproject.toml declares (its floor) and on the newest
# release the package index serves, each in its own virtual environment made from the index: .venvs/torch-<V>.
# Idempotent as scripts/setup.sh: an environment is made again only when this script or pyproject.toml changed.
# .ci/run calls it after the suite on the pinned torch; the README says which versions last passed.
#
#   bash scripts/test_torch_range.sh                 # both ends of the range
#   bash scripts/test_torch_range.sh 2.11.0          # a release inside it (one of TORCHVISION's)
#   bash scripts/test_torch_range.sh --discard       # remove each environment once its tests ran (.ci/run: a CI
#                                                    # disk held .venv and one of these, not a third ~6 GB)
#   bash scripts/test_torch_range.sh --prefetch      # only make the first environment (.ci/run, while the suite
#                                                    # runs: pip's downloads wait on the network, not the CPU)
#   bash scripts/test_torch_range.sh --overlap       # make the next environment while this one's tests run (two
#                                                    # environments on disk at once)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

# torch version -> the torchvision built for it (0.29.2 is the newest torchvision and declares torch>=2.14, so it
# serves 2.15 too). RANGE: pyproject's floor and the newest release; the others were run once (README).
declare -A TORCHVISION=([2.6.0]=0.21.0 [2.8.0]=0.23.0 [2.11.0]=0.26.0 [2.15.0]=0.29.2)
# the floor's other ends: the oldest release of every other dependency pyproject.toml declares, the export extra's
# (which the tests import) included, goes with the oldest torch (elsewhere pip's newest). numpy 1.24.2: the oldest
# that onnxruntime 1.18.0 installs with (numpy 1.24.0, the declared floor, passed tests/models, tests/data and the
# API tests without onnx on 2026-12-06; the README lists what passed)
declare -A FLOOR_PINS=([2.6.0]="timm==1.0.15 numpy==1.24.2 pillow==10.0.0 pyyaml==6.0 tqdm==4.66.0 matplotlib==3.8.0 \
safetensors==0.4.0 scikit-learn==1.3.0 huggingface-hub==0.23.0 onnx==1.16.0 onnxruntime==1.18.0")
RANGE=(2.6.0 2.15.0)
# the floor's tests run as on an AVX2-only CPU (the AMD EPYC CI machines without AVX-512 or bf16 kernels): oneDNN,
# ATen's dispatch and MKL are capped at AVX2, so oneDNN reports no bf16 kernels and the float32 fallbacks run, whatever
# CPU runs CI; the pinned suite and the newest torch keep the machine's own ISA
declare -A AS_AVX2_ONLY=([2.6.0]=1)
AVX2_ONLY_ENV=(ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2)

# the fast tests of the models, the engine and the library API (the slow end-to-end runs stay with the pinned
# suite). The PyPI wheels bring Triton, whose CPU interpreter (a test-only path) is slow, so TRITON_INTERPRET=0
# skips the tests that run the fused kernel (a GPU runs them: benchmarks/gpu_session.sh). At the versions in
# INTERPRETED_KERNELS the kernel tests then run under the interpreter: the kernels' math checked with the Triton a
# GPU machine on that torch has (2.11: Triton 3.6, whose wrap_triton and loop bounds test_kernels_triton.py patches;
# 2.15: Triton 3.9, whose interpreter refuses a mask that is not boolean; ~20-40 s each on 2 cores).
declare -A INTERPRETED_KERNELS=([2.11.0]=1 [2.15.0]=1)
TESTS=(tests/models tests/engine/test_api.py tests/engine/test_amp.py tests/engine/test_evaluate.py
       tests/engine/test_train.py tests/engine/test_training_settings_reach_timm.py
       tests/engine/test_flags_reach_the_run.py)  # 7 s on 2 cores; on timm 1.0.15 it found a resume's TypeError

# what one environment takes while pip makes it: ~6 GB installed plus the ~3 GB of wheels it unpacks
NEEDED_GB=9

free_gb() { df -Pk .venvs | awk 'NR == 2 { print int($4 / 1048576) }'; }

make_venv() {  # $1 torch version -> .venvs/torch-$1 with that torch, its torchvision and the package's deps
    local venv=".venvs/torch-$1" stamp want
    stamp="$venv/.sequencer-setup"
    want="$(sha256sum pyproject.toml scripts/test_torch_range.sh | sha256sum | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    echo "making $venv (torch $1 from the package index: a few minutes, ~6 GB with its CUDA libraries;" \
         "$(free_gb) GB free)" >&2
    "$PYTHON" -m venv --clear "$venv"
    # this machine's pip config caps torch at the locally served release: an empty constraints file lifts the cap.
    # No cache: a second copy of ~3 GB of CUDA wheels per torch is what filled a CI disk. No byte-compiling of the
    # whole install (CPU time taken from the tests running beside it): the modules the tests import compile on use.
    PIP_CONSTRAINT=/dev/null "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir \
        --no-compile \
        "torch==$1" "torchvision==${TORCHVISION[$1]}" ${FLOOR_PINS[$1]:-} -e ".[test]" 2>&1 \
        | { grep -v "^WARNING: Location '.*' is ignored" || true; }
    if [ "${PIPESTATUS[0]}" -ne 0 ]; then
        echo "making $venv failed ($(free_gb) GB free now; it needs about $NEEDED_GB GB while pip runs)" >&2
        rm -rf "$venv"
        return 1
    fi
    echo "$want" > "$stamp"
}

discard=0
prefetch=0
overlap=0
versions=()
for arg in "$@"; do
    case "$arg" in
        --discard) discard=1 ;;
        --prefetch) prefetch=1 ;;
        --overlap) overlap=1 ;;
        *) versions+=("$arg") ;;
    esac
done
[ "${#versions[@]}" -gt 0 ] || versions=("${RANGE[@]}")
if [ "$prefetch" -eq 1 ]; then
    mkdir -p .venvs
    make_venv "${versions[0]}"
    exit
fi

mkdir -p .venvs
for version in "${versions[@]}"; do
    if [ -z "${TORCHVISION[$version]:-}" ]; then
        echo "torch $version is not in this script's range (${RANGE[*]})" >&2
        exit 2
    fi
done
status=0
next_job=""
for index in "${!versions[@]}"; do
    version="${versions[$index]}"
    if [ -n "$next_job" ]; then  # made beside the previous version's tests; if that failed, made again below
        wait "$next_job" || true
        next_job=""
    fi
    if ! make_venv "$version"; then
        status=1
        continue
    fi
    next="${versions[$((index + 1))]:-}"
    if [ "$overlap" -eq 1 ] && [ -n "$next" ]; then
        # at the tests' priority: under nice 19 it got little CPU beside two busy test processes (a CPU-bound
        # stand-in on the loaded 2-core CI machine: 4 s of CPU in 80 s; at nice 0, 10 s in 70 s), so most of it ran
        # after the tests, on one core, instead of beside them
        make_venv "$next" &
        next_job=$!
    fi
    isa_env=()
    [ -n "${AS_AVX2_ONLY[$version]:-}" ] && isa_env=("${AVX2_ONLY_ENV[@]}")
    echo "== torch $version: $(env "${isa_env[@]}" ".venvs/torch-$version/bin/python" -c 'import torch, torchvision, timm
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, CPU capability "
      f"{torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")')" >&2
    env "${isa_env[@]}" TRITON_INTERPRET=0 ".venvs/torch-$version/bin/python" -m pytest -q -m "not slow" \
        -p no:cacheprovider -n auto --maxprocesses 4 "${TESTS[@]}" || status=1
    if [ -n "${INTERPRETED_KERNELS[$version]:-}" ]; then
        env "${isa_env[@]}" TRITON_INTERPRET=1 ".venvs/torch-$version/bin/python" -m pytest -q -m "not slow" \
            -p no:cacheprovider tests/models/test_kernels_triton.py || status=1
    fi
    if [ "$discard" -eq 1 ]; then
        rm -rf ".venvs/torch-$version"
    fi
done
exit "$status"
