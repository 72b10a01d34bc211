"""Time the BiLSTM2D token mixer on a GPU: the fused Triton LSTM vs cuDNN (``nn.LSTM``), inference and training.

Cases are sequencer2d_s's stages at 224 px (stage 1: 32x32 grid, dim 192, hidden 48; stage 2: 16x16, dim 384,
hidden 96) and the 2x-hidden ablation (stage 2 with hidden 192); inference at batch 256 under
``torch.inference_mode``, forward+backward at batch 128. Each runs under bf16 autocast and in fp32 (PyTorch's
defaults, so cuDNN's fp32 may use TF32). The backends run in interleaved rounds of ``--iters`` steps, the median
round counts; each row also records the output's difference between the backends and which Triton kernel
(held / tiled, block sizes) the launcher chose for this GPU.

    python benchmarks/gpu_lstm.py --out benchmarks/results-cuda/gpu_lstm.json   # table on stdout
    python benchmarks/gpu_lstm.py --render-only --out benchmarks/results-cuda/gpu_lstm.json
    python benchmarks/gpu_lstm.py --profile --cases s1-train s2-train --dtypes bf16
    python benchmarks/gpu_lstm.py --sweep --cases s1-train s2-train --dtypes bf16 --rounds 3 --out /tmp/sweep.json

``--profile`` prints, per case and backend, where one step's GPU time goes (the ten costliest kernels, from
``torch.profiler``): the measurement that says what to make faster.

``--sweep`` times, per case, every variant of the launcher's table that fits this GPU (held or tiled kernel, BLOCK_N
16/32/64, 4 or 8 warps, the first fitting pipeline depth), each against cuDNN in the same interleaved rounds: the
measurements ``BLOCK_TABLE`` in ``sequencer/models/kernels/triton_lstm_config.py`` is to be tuned from (up to 12
variants a case: narrow it with ``--cases`` / ``--dtypes`` to fit a short GPU lease).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# (name, batch, grid, dim, hidden, mode)
CASES = [
    ("s1-infer", 256, 32, 192, 48, "infer"), ("s2-infer", 256, 16, 384, 96, "infer"),
    ("2x-infer", 256, 16, 384, 192, "infer"),
    ("s1-train", 128, 32, 192, 48, "train"), ("s2-train", 128, 16, 384, 96, "train"),
    ("2x-train", 128, 16, 384, 192, "train"),
]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BACKENDS = ("native", "triton")
SWEEP = [(kernel, block_n, warps) for kernel in ("held", "tiled") for block_n in (16, 32, 64) for warps in (4, 8)]


class DoesNotFit(Exception):
    """A swept variant needs more shared memory than this GPU has."""


@contextlib.contextmanager
def forced_variant(kernel: str, block_n: int, num_warps: int):
    """The Triton launcher chooses ``kernel`` with these block sizes (and its first fitting pipeline depth) while
    inside; :class:`DoesNotFit` where no such configuration fits the device."""
    from sequencer.models.kernels import triton_lstm_config

    def choose(direction, num_seqs, hidden, dtype, chip, limit, interpreted=False):
        options = [dataclasses.replace(c, block_n=block_n, num_warps=num_warps)
                   for c in triton_lstm_config.candidates(direction, hidden, dtype, chip, interpreted)
                   if c.kernel == kernel]
        fitting = [c for c in options if triton_lstm_config.shared_memory(c, direction) <= limit]
        if not fitting:
            raise DoesNotFit(f"{kernel} N{block_n} w{num_warps} does not fit {direction} at hidden {hidden}")
        return fitting[0]

    original = triton_lstm_config.choose
    triton_lstm_config.choose = choose
    try:
        yield
    finally:
        triton_lstm_config.choose = original


def step(module: torch.nn.Module, x: torch.Tensor, mode: str, dtype: torch.dtype) -> torch.Tensor:
    """One inference (no autograd) or training (forward + backward of a scalar loss) step; returns the output."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        if mode == "infer":
            with torch.inference_mode():
                return module(x)
        out = module(x)
    out.float().square().mean().backward()
    return out.detach()


def timed_round(module, x, mode, dtype, iters: int) -> float:
    """Milliseconds per step over ``iters`` steps."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step(module, x, mode, dtype)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def kernel_choice(batch: int, grid: int, hidden: int, dtype: torch.dtype, mode: str) -> str:
    """The Triton launcher's configuration for this case on this GPU, e.g. ``fwd held N32 B64 s3``."""
    from sequencer.models.kernels import triton_lstm_config

    directions = ("fwd",) if mode == "infer" else ("fwd", "bwd")
    device = torch.device("cuda", torch.cuda.current_device())
    parts = []
    for direction in directions:
        c = triton_lstm_config.choose_for(direction, batch * grid, hidden, dtype, device, interpreted=False)
        parts.append(f"{direction} {c.kernel} N{c.block_n} B{c.block} w{c.num_warps} s{c.num_stages}")
    return ", ".join(parts)


def measure(name: str, batch: int, grid: int, dim: int, hidden: int, mode: str, dtype_name: str,
            args: argparse.Namespace) -> dict | None:
    """One row: median ms per backend, the Triton speed-up, the outputs' max relative difference (None: a swept
    variant that does not fit this GPU)."""
    from sequencer.models.sequencer2d import RNN2d

    dtype = DTYPES[dtype_name]
    row = dict(case=name, batch=batch, grid=grid, dim=dim, hidden=hidden, mode=mode, dtype=dtype_name)
    try:
        row["triton_kernel"] = kernel_choice(batch, grid, hidden, dtype, mode)
    except DoesNotFit:
        return None
    torch.manual_seed(0)
    modules = {b: RNN2d(dim, hidden, lstm_backend=b).cuda() for b in BACKENDS}
    modules["triton"].load_state_dict(modules["native"].state_dict())
    x = torch.randn(batch, grid, grid, dim, device="cuda", requires_grad=mode == "train")
    try:
        outs = {b: step(m, x, mode, dtype).float() for b, m in modules.items()}  # warm-up: autotune, compile
        row["rel_diff"] = ((outs["triton"] - outs["native"]).abs().max() / outs["native"].abs().max()).item()
        del outs
        rounds = {b: [] for b in BACKENDS}
        for _ in range(args.rounds):
            for b, m in modules.items():
                rounds[b].append(timed_round(m, x, mode, dtype, args.iters))
    except Exception as error:  # a failing case is a result (the crash this script was written to find)
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return row
    for b in BACKENDS:
        row[f"{b}_ms"] = statistics.median(rounds[b])
        row[f"{b}_rounds_ms"] = rounds[b]
    row["triton_speedup"] = row["native_ms"] / row["triton_ms"]
    return row


def kernel_breakdown(name: str, batch: int, grid: int, dim: int, hidden: int, mode: str, dtype_name: str,
                     steps: int = 5, top: int = 10, device: str = "cuda") -> list[str]:
    """Per backend: the ms per step and the ``top`` kernels by GPU time (off CUDA: ops by CPU time) over ``steps``
    profiled steps."""
    from sequencer.models.sequencer2d import RNN2d

    dtype = DTYPES[dtype_name]
    on_gpu = device == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    lines = []
    for backend in BACKENDS:
        torch.manual_seed(0)
        module = RNN2d(dim, hidden, lstm_backend=backend).to(device)
        x = torch.randn(batch, grid, grid, dim, device=device, requires_grad=mode == "train")
        for _ in range(3):  # compile and autotune outside the profile
            step(module, x, mode, dtype)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                step(module, x, mode, dtype)
            if on_gpu:
                torch.cuda.synchronize()
        per_kernel = {}
        for event in prof.key_averages():
            us = event.self_device_time_total if on_gpu else event.self_cpu_time_total
            if us > 0 and (not on_gpu or event.device_type == torch.autograd.DeviceType.CUDA):
                per_kernel[event.key] = per_kernel.get(event.key, 0.0) + us
        total = sum(per_kernel.values())
        lines.append(f"{name} {dtype_name} {backend}: {total / steps / 1e3:.3f} ms of {device} time per step")
        for key, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {100 * us / total:5.1f}%  {us / steps / 1e3:7.3f} ms  {key[:110]}")
    return lines


def render(report: dict) -> str:
    """The markdown table of BENCHMARKS.md's GPU mixer section."""
    lines = [f"BiLSTM2D mixer on {report['device']} (torch {report['torch']}, Triton {report['triton']}, "
             f"cuDNN {report['cudnn']}); median of {report['rounds']} interleaved rounds of {report['iters']} steps",
             "", "| case | batch, grid, dim, hidden | dtype | cuDNN ms | Triton ms | Triton's speed | out rel diff "
             "| Triton kernel |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        shape = f"{r['batch']}, {r['grid']}x{r['grid']}, {r['dim']}, {r['hidden']}"
        if "error" in r:
            lines.append(f"| {r['case']} | {shape} | {r['dtype']} | | | **{r['error']}** | | "
                         f"{r.get('triton_kernel', '')} |")
            continue
        lines.append(f"| {r['case']} | {shape} | {r['dtype']} | {r['native_ms']:.2f} | {r['triton_ms']:.2f} | "
                     f"{r['triton_speedup']:.2f}x | {r['rel_diff']:.1e} | {r['triton_kernel']} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results-cuda/gpu_lstm.json", help="JSON results file")
    parser.add_argument("--cases", nargs="+", choices=[c[0] for c in CASES], default=[c[0] for c in CASES])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--iters", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per backend; the median counts")
    parser.add_argument("--render-only", action="store_true", help="print the table of --out")
    parser.add_argument("--sweep", action="store_true", help="time every fitting kernel/BLOCK_N/warps variant")
    parser.add_argument("--profile", action="store_true", help="print each case's costliest kernels per backend")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.render_only:
        print(render(json.loads(Path(args.out).read_text())))
        return
    if not torch.cuda.is_available():
        sys.exit("gpu_lstm.py times the LSTM on a CUDA GPU, and this machine has none")
    import triton

    if args.profile:
        for name, batch, grid, dim, hidden, mode in CASES:
            for dtype_name in (args.dtypes if name in args.cases else ()):
                print("\n".join(kernel_breakdown(name, batch, grid, dim, hidden, mode, dtype_name)), flush=True)
        return
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  cudnn=torch.backends.cudnn.version(), iters=args.iters, rounds=args.rounds, rows=[])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for name, batch, grid, dim, hidden, mode in CASES:
        if name not in args.cases:
            continue
        for dtype_name in args.dtypes:
            for variant in (SWEEP if args.sweep else [None]):
                with forced_variant(*variant) if variant else contextlib.nullcontext():
                    row = measure(name, batch, grid, dim, hidden, mode, dtype_name, args)
                if row is None:
                    continue
                report["rows"].append(row)
                Path(args.out).write_text(json.dumps(report, indent=1))  # row by row: a run cut short keeps its rows
                print(json.dumps({k: v for k, v in row.items() if not k.endswith("_rounds_ms")}), file=sys.stderr,
                      flush=True)
                torch.cuda.empty_cache()
    print(render(report))


if __name__ == "__main__":
    main()
