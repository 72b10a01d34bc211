"""Peak memory of a benchmark's work: what one more step allocates on top of a warmed-up state (weights, inputs,
optimizer state, first-call library caches and JIT kernels of one untimed step stay in the baseline), measured the
same way for every implementation. On CUDA, ``torch.cuda.max_memory_allocated`` over the memory held before the
steps. On CPU there is no allocator statistic, so each implementation runs in a fresh subprocess whose resident-set
high-water mark is reset after the untimed step (Linux ``clear_refs``; ``ru_maxrss`` elsewhere), and the number is
the peak resident set during ``--memory-iter`` steps minus the resident set before them: activations, autograd
buffers, gradients (a training step frees them after its update, as training does, so none are held before a step)
and oneDNN/MKL workspaces. The subprocess runs with a fixed glibc mmap threshold so that freed
memory leaves the resident set at once and the number is repeatable (see ``GLIBC_EXACT_RSS``).
"""
from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
from typing import Callable

import torch

_logger = logging.getLogger(__name__)

# glibc otherwise raises its mmap threshold as blocks are freed and keeps freed heap memory mapped, so the resident
# peak would depend on allocation history (measured: +-15 MiB between identical runs of a 100 MiB inference); with
# a fixed threshold every block above 64 KiB is mapped on allocation and unmapped on free, and the resident set
# follows the live memory (identical runs then agree within 0.3 MiB)
GLIBC_EXACT_RSS = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def step_peak_memory(step: Callable, device: torch.device, iters: int) -> float:
    """MiB that ``iters`` calls of ``step`` allocate on top of the state one untimed call leaves (this process)."""
    # one step first, on every device: optimizer state, first-call library caches and JIT-compiled kernels belong
    # to the baseline, so what is reported is the steady-state cost of one more step of the work
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(iters):
            step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    # Linux: reset the resident-set high-water mark (VmHWM) so that model construction's own transient peak does
    # not hide the work's; elsewhere ru_maxrss (never reset) is the fallback and can under-report small work.
    if _reset_peak_rss():
        base = _proc_status_kib("VmRSS")
        for _ in range(iters):
            step()
        return max(_proc_status_kib("VmHWM") - base, 0) / 1024
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(iters):
        step()
    scale = 1 if sys.platform == "darwin" else 1024
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * scale / 2 ** 20


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kib("VmHWM") >= 0
    except OSError:
        return False


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def measure_peak_memory(spec: dict, probe: Callable[[dict], float], timeout: float = 900) -> float | None:
    """Run ``probe(spec)`` (a module-level function, e.g. :func:`.benchmark_steps.memory_probe`, that builds the work and
    returns :func:`step_peak_memory` of it) in a fresh Python process (CPU) or in this one (CUDA); None if the
    probe fails or times out (a warning says why)."""
    if spec["device"] == "cuda":
        return probe(spec)
    code = f"import json,sys; from {probe.__module__} import {probe.__name__} as probe; " \
           "print(json.dumps(probe(json.loads(sys.argv[1]))))"
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()),
                                                        **GLIBC_EXACT_RSS))
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        _logger.warning(f"warning: memory probe for {spec['impl']} failed: {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return float(proc.stdout.strip().splitlines()[-1])
