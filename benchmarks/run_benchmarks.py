"""Produce BENCHMARKS.md: ours vs timm's Sequencer2d, side by side in one process, same weights.

For every model x dtype it runs ``sequencer benchmark`` twice (inference at batch 16 with ``--optimized``, and an
AdamW training step at batch 8), each with ``--compare-timm``, keeps the JSON results under ``--results-dir`` and
renders the tables. ``--render-only`` rebuilds BENCHMARKS.md from the JSON already there.

    python benchmarks/run_benchmarks.py --models sequencer2d_s sequencer2d_m sequencer2d_l --dtypes float32 bfloat16
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_COMMANDS = [
    "python benchmarks/run_benchmarks.py --device cuda --models sequencer2d_s sequencer2d_m sequencer2d_l "
    "--dtypes bfloat16 --infer-batch 256 --train-batch 128 --results-dir benchmarks/results-cuda "
    "--output BENCHMARKS-cuda.md",
]


def run_one(model: str, mode: str, dtype: str, batch: int, args: argparse.Namespace) -> Path:
    out = Path(args.results_dir) / f"{model}_{mode}_{dtype}_b{batch}_{args.device}.json"
    cmd = [sys.executable, "-m", "sequencer", "benchmark", "--model", model, "-b", str(batch), "--mode", mode,
           "--amp-dtype", dtype, "--compare-timm", "--device", args.device, "--num-warmup", str(args.num_warmup),
           "--num-iter", str(args.num_iter), "--memory-iter", str(args.memory_iter), "--results-file", str(out)]
    if mode == "infer":
        cmd.append("--optimized")
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(reports: list[dict], args: argparse.Namespace, load_before, load_after, command: str) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Ours (`sequencer.create_model`, eager; `optimize_for_inference` as *ours-optimized*) against timm's "
        "`Sequencer2d` with the same weights, timed **interleaved in one process** (each iteration runs every "
        "implementation once, alternating the order; medians reported). Only the ratios are meaningful on a "
        "shared machine; absolute numbers move with the load.",
        "",
        f"Made with: `{command}`",
        "",
        "- Inference: `torch.inference_mode()`, batch as listed; eager models run under `torch.autocast` in the "
        "dtype (float32: none), *ours-optimized* holds bf16 weights instead.",
        "- Training: one AdamW step (forward, cross-entropy, backward, update), autocast in the dtype.",
        "- Peak memory: CPU: peak resident set of a fresh subprocess during the steps (high-water mark reset "
        "before them) minus its resident set before them, i.e. on top of weights and inputs (activations, "
        "gradients, optimizer state, library workspaces); CUDA: "
        "`max_memory_allocated` over the baseline.",
        "- GEMM %: 2 x MACs x images/s (x3 for training) over the rate of a 2048^3 matrix product in the same dtype "
        "measured in the same run (fastest of PyTorch's default BLAS and oneDNN).",
        "- rel diff: max |ours - timm| / max |timm| over the logits of the same input.",
        "",
    ]
    if reports:
        r0 = reports[0]
        lines += [f"Machine: {r0['device_name'] or 'cpu'}, {r0['device']}, {r0['threads']} threads, torch "
                  f"{r0['torch']}. Load average (1/5/15 min) before: {load_before}, after: {load_after} "
                  "(the machine was shared with other jobs).", ""]
    lines += ["| model | mode | dtype | batch | impl | img/s | step ms | vs timm | peak MiB | GMACs/img | GEMM % "
              "| rel diff |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rep in reports:
        for r in rep["results"]:
            lines.append(
                f"| {rep['model']} | {r['mode']} | {r['dtype']} | {r['batch_size']} | {r['impl']} | "
                f"{r['img_per_s']:.2f} | {r['step_ms']:.0f} | {fmt(r['speedup_vs_timm'], '.2f')}x | "
                f"{fmt(r['peak_memory_mb'], '.0f')} | {fmt(r['gmacs'], '.2f')} | "
                f"{fmt(None if r['gemm_fraction'] is None else 100 * r['gemm_fraction'], '.1f')} | "
                f"{fmt(r['max_rel_diff_vs_timm'], '.1e')} |")
    if args.note:
        lines += ["", args.note]
    lines += ["", "GEMM rate measured per run (GFLOP/s): " + ", ".join(
        f"{rep['model']} {rep['results'][0]['mode']} {rep['amp_dtype']}: {rep['gemm_gflops']:.0f}" for rep in reports),
        "", "## GPU", "",
        "Not measured in this session (no GPU was available). To measure on a CUDA machine (H100: bf16 inference at "
        "batch 256, AMP training at batch 128):", "", "```"] + GPU_COMMANDS + ["```", ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["sequencer2d_s", "sequencer2d_m", "sequencer2d_l"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--modes", nargs="+", default=["infer", "train"])
    p.add_argument("--infer-batch", type=int, default=16)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-warmup", type=int, default=1)
    p.add_argument("--num-iter", type=int, default=7)
    p.add_argument("--memory-iter", type=int, default=2)
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--render-only", action="store_true", help="only rebuild the markdown from --results-dir")
    p.add_argument("--made-with", default="", help="text for the 'Made with' line (default: this command)")
    p.add_argument("--note", default="", help="a paragraph added under the table (e.g. how loaded the machine was)")
    args = p.parse_args()
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    command = args.made_with or "python benchmarks/run_benchmarks.py " + " ".join(sys.argv[1:])
    load_before = tuple(round(v, 1) for v in os.getloadavg())
    files = []
    for model in args.models:
        for dtype in args.dtypes:
            for mode in args.modes:
                batch = args.infer_batch if mode == "infer" else args.train_batch
                path = Path(args.results_dir) / f"{model}_{mode}_{dtype}_b{batch}_{args.device}.json"
                if not args.render_only:
                    t0 = time.time()
                    run_one(model, mode, dtype, batch, args)
                    print(f"  {time.time() - t0:.0f} s", flush=True)
                if path.exists():
                    files.append(path)
    reports = [json.loads(f.read_text()) for f in files]
    load_after = tuple(round(v, 1) for v in os.getloadavg())
    if args.render_only and reports:
        load_before = tuple(reports[0].get("load_average") or ())
        load_after = tuple(reports[-1].get("load_average") or ())
    Path(args.output).write_text(render(reports, args, load_before, load_after, command))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
