"""Produce BENCHMARKS.md: ours vs timm's Sequencer2d, side by side in one process, same weights.

For every model x dtype it runs ``sequencer benchmark`` twice (inference at batch 16 with ``--optimized``, and an
AdamW training step at batch 8), each with ``--compare-timm`` (on CUDA also with the cuDNN, Triton, compiled and
convnext_tiny rows of ``GPU_ROWS``), keeps the JSON results under ``--results-dir`` and renders the tables. CPU
results live in ``benchmarks/results``, CUDA results in ``benchmarks/results-cuda``; each run replaces its own
device's results, and BENCHMARKS.md always shows both. ``--render-only`` rebuilds them from the JSON already there.

Only the parts this script generates are rewritten: each lies between ``<!-- run_benchmarks:begin NAME -->`` and
``<!-- run_benchmarks:end NAME -->`` (NAME: method, cpu, gpu), and every byte outside those markers (hand-written
sections, notes above a table) is kept; a part whose markers are missing is appended at the end of the file.

    python benchmarks/run_benchmarks.py                     # CPU: s, m, l; fp32 and bf16; inference and training
    python benchmarks/run_benchmarks.py --device cuda --dtypes bfloat16 --infer-batch 256 --train-batch 128
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_COMMANDS = [
    "python benchmarks/run_benchmarks.py --device cuda --models sequencer2d_s sequencer2d_m sequencer2d_l "
    "--dtypes bfloat16 --infer-batch 256 --train-batch 128 --num-iter 20",
]
# On CUDA each run also has ours on cuDNN (ours-native) and on the fused Triton kernel (ours-triton) beside "ours"
# (auto's choice), a torch.compile twin of every row, and timm's convnext_tiny (own weights) as the reference.
GPU_ROWS = ["--lstm-backend", "native", "--lstm-backend", "triton", "--torchcompile",
            "--reference-model", "convnext_tiny"]
RESULTS_DIRS = {"cpu": ROOT / "benchmarks" / "results", "cuda": ROOT / "benchmarks" / "results-cuda"}


def run_one(model: str, mode: str, dtype: str, batch: int, args: argparse.Namespace, out_dir: Path) -> Path:
    out = out_dir / f"{model}_{mode}_{dtype}_b{batch}_{args.device}.json"
    cmd = [sys.executable, "-m", "sequencer", "benchmark", "--model", model, "-b", str(batch), "--mode", mode,
           "--amp-dtype", dtype, "--compare-timm", "--device", args.device, "--num-warmup", str(args.num_warmup),
           "--num-iter", str(args.num_iter), "--memory-iter", str(args.memory_iter), "--results-file", str(out)]
    if mode == "infer":
        cmd.append("--optimized")
    if args.device == "cuda":
        cmd += GPU_ROWS
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render_table(reports: list[dict], command: str, note: str = "") -> list[str]:
    """One machine's results: how they were made, the machine, the table and the GEMM rates."""
    r0 = reports[0]
    load_before = tuple(round(v, 1) for v in r0.get("load_average") or ())
    load_after = tuple(round(v, 1) for v in reports[-1].get("load_average") or ())
    lines = [f"Made with: `{command}`", "",
             f"Machine: {r0['device_name'] or 'cpu'}, {r0['device']}, {r0['threads']} threads, torch {r0['torch']}"
             f"{'; CPU ' + r0['cpu_description'] if r0.get('cpu_description') else ''}. "
             f"Load average (1/5/15 min) at the first run: {load_before}, at the last: {load_after}.", "",
             "| model | mode | dtype | batch | impl | img/s | step ms | vs timm | peak MiB | GMACs/img | GEMM % "
             "| rel diff |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rep in reports:
        for r in rep["results"]:
            lines.append(
                f"| {rep['model']} | {r['mode']} | {r['dtype']} | {r['batch_size']} | {r['impl']} | "
                f"{r['img_per_s']:.2f} | {r['step_ms']:.0f} | {fmt(r['speedup_vs_timm'], '.2f')}x | "
                f"{fmt(r['peak_memory_mb'], '.0f')} | {fmt(r['gmacs'], '.2f')} | "
                f"{fmt(None if r['gemm_fraction'] is None else 100 * r['gemm_fraction'], '.1f')} | "
                f"{fmt(r['max_rel_diff_vs_timm'], '.1e')} |")
    if note:
        lines += ["", note]
    lines += ["", "GEMM rate measured per run (GFLOP/s): " + ", ".join(
        f"{rep['model']} {rep['results'][0]['mode']} {rep['amp_dtype']}: {rep['gemm_gflops']:.0f}" for rep in reports),
        ""]
    return lines


# issue #4's acceptance checks: (mode, dtype, batch, our implementation, target speed-up over timm)
TARGETS = [("infer", "float32", 16, "ours-optimized", 1.8), ("infer", "bfloat16", 16, "ours-optimized", 1.5),
           ("train", "float32", 8, "ours", 1.3), ("infer", "float32", 16, "ours", 1.0)]


def render_targets(reports: list[dict], model: str = "sequencer2d_s") -> list[str]:
    """The targets next to what was measured and to the most a GEMM-bound implementation could reach here.

    The ceiling: every multiply-add of the model at the GEMM rate measured in the same run, i.e. timm's time
    scaled by timm's GEMM fraction. No implementation with the same arithmetic can beat it on that machine.
    """
    rows = []
    for mode, dtype, batch, impl, target in TARGETS:
        for rep in reports:
            res = {r["impl"]: r for r in rep["results"]}
            first = rep["results"][0]
            if (rep["model"], first["mode"], first["dtype"], first["batch_size"]) != (model, mode, dtype, batch):
                continue
            if impl not in res or "timm" not in res or res["timm"]["gemm_fraction"] is None:
                continue
            ceiling = 1.0 / res["timm"]["gemm_fraction"]
            rows.append(f"| {mode} {dtype} b{batch}, {impl} | {target:.1f}x | {res[impl]['speedup_vs_timm']:.2f}x | "
                        f"{ceiling:.2f}x ({100 * res['timm']['gemm_fraction']:.0f}% -> 100%) |")
    if not rows:
        return []
    return ["Issue #4's targets for `sequencer2d_s` against what was measured, and against the ceiling: the speed-up "
            "over timm of an implementation doing every multiply-add at the GEMM rate measured in the same run "
            "(timm's GEMM % raised to 100%).", "",
            "| check | target | measured | GEMM-bound ceiling |", "|---|---|---|---|", *rows, ""]


def render(sections: dict[str, tuple[list[dict], str, str]]) -> dict[str, tuple[str, str]]:
    """The parts of BENCHMARKS.md this script writes, {name: (the heading a new part goes under, markdown)}.
    ``sections``: {"cpu"|"cuda": (reports, made-with command, note)}."""
    method = [
        "Ours (`sequencer.create_model`, eager; `optimize_for_inference` as *ours-optimized*) against timm's "
        "`Sequencer2d` with the same weights, timed **interleaved in one process** (each iteration runs every "
        "implementation once, alternating the order; medians reported). Only the ratios are meaningful on a "
        "shared machine; absolute numbers move with the load.",
        "",
        "- Inference: `torch.inference_mode()`, batch as listed; eager models run under `torch.autocast` in the "
        "dtype (float32: none); *ours-optimized* holds bf16 weights instead on CPU and runs under autocast on CUDA.",
        "- Training: one AdamW step (forward, cross-entropy, backward, update), autocast in the dtype.",
        "- Peak memory: CPU: peak resident set of a fresh subprocess during the steps (high-water mark reset "
        "before them, glibc's mmap threshold fixed so that freed memory leaves the resident set) minus its "
        "resident set before them, i.e. on top of weights, inputs and the optimizer's state (made by an untimed "
        "first step): activations, gradients, the optimizer's temporaries, library workspaces; CUDA: "
        "`max_memory_allocated` over the baseline.",
        "- GEMM %: 2 x MACs x images/s (x3 for training) over the rate of a 2048^3 matrix product in the same dtype "
        "measured in the same run (fastest of PyTorch's default BLAS and oneDNN).",
        "- rel diff: max |ours - timm| / max |timm| over the logits of the same input.",
        "",
    ]
    if "cpu" in sections:
        cpu = render_table(*sections["cpu"]) + render_targets(sections["cpu"][0])
    else:
        cpu = ["Not measured yet: `python benchmarks/run_benchmarks.py`.", ""]
    if "cuda" in sections:
        gpu = render_table(*sections["cuda"])
    else:
        gpu = ["Not measured yet (no GPU was available). On a CUDA machine (H100: bf16 inference at batch 256, "
               "AMP training at batch 128):", "", "```"] + GPU_COMMANDS + ["```", ""]
    return {"method": ("# Benchmarks", "\n".join(method)), "cpu": ("## CPU", "\n".join(cpu)),
            "gpu": ("## GPU", "\n".join(gpu))}


def markers(name: str) -> tuple[str, str]:
    return f"<!-- run_benchmarks:begin {name} -->", f"<!-- run_benchmarks:end {name} -->"


def update_markdown(text: str, parts: dict[str, tuple[str, str]]) -> str:
    """``text`` with each part's markdown between its two marker comments replaced; everything outside the markers
    stays byte for byte. A part whose markers ``text`` lacks is appended at the end, under its heading."""
    for name, (heading, markdown) in parts.items():
        begin, end = markers(name)
        block = f"{begin}\n\n{markdown}\n{end}"
        counts = (text.count(begin), text.count(end))
        if counts == (0, 0):
            text += ("\n" if text and not text.endswith("\n") else "") + ("\n" if text else "")
            text += f"{heading}\n\n{block}\n"
            continue
        start, stop = text.find(begin), text.find(end)
        if counts != (1, 1) or stop < start:
            raise SystemExit(f"BENCHMARKS.md: the markers of {name!r} are not one {begin!r} followed by one "
                             f"{end!r}; fix them by hand")
        text = text[:start] + block + text[stop + len(end):]
    return text


def write_markdown(path: Path, sections: dict[str, tuple[list[dict], str, str]]) -> None:
    """Replace this script's parts of the markdown file at ``path`` (created when missing), keeping the rest."""
    text = path.read_text() if path.exists() else ""
    path.write_text(update_markdown(text, render(sections)))


def own_results(results_dir: Path, device: str) -> list[Path]:
    """The JSON results :func:`run_one` writes there (other scripts' results may share the folder)."""
    return sorted(f for f in results_dir.glob("*.json")
                  if re.fullmatch(rf".+_(infer|train)_\w+_b\d+_{device}\.json", f.name))


def load_section(results_dir: Path, device: str) -> tuple[list[dict], str, str] | None:
    files = own_results(results_dir, device)
    if not files:
        return None
    meta_path = results_dir / "made_with.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    reports = [json.loads(f.read_text()) for f in files]
    order = {name: i for i, name in enumerate(meta.get("models", []))}
    reports.sort(key=lambda r: (order.get(r["model"], len(order)), r["model"], r["amp_dtype"] != "float32",
                                r["results"][0]["mode"] != "infer"))
    return reports, meta.get("command", "python benchmarks/run_benchmarks.py"), meta.get("note", "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["sequencer2d_s", "sequencer2d_m", "sequencer2d_l"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--modes", nargs="+", default=["infer", "train"])
    p.add_argument("--infer-batch", type=int, default=16)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--num-warmup", type=int, default=1)
    p.add_argument("--num-iter", type=int, default=7)
    p.add_argument("--memory-iter", type=int, default=2)
    p.add_argument("--results-dir", default=None,
                   help="where this device's JSON results go (default benchmarks/results[-cuda]); replaced")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--render-only", action="store_true", help="only rebuild the markdown from the JSON results")
    p.add_argument("--made-with", default="", help="text for the 'Made with' line (default: this command)")
    p.add_argument("--note", default="", help="a paragraph added under the table (e.g. how loaded the machine was)")
    args = p.parse_args()
    dirs = dict(RESULTS_DIRS)
    if args.results_dir:
        dirs[args.device] = Path(args.results_dir)
    if not args.render_only:
        out_dir = dirs[args.device]
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in own_results(out_dir, args.device):
            old.unlink()  # one run per device: no stale results from an earlier, different command
        for model in args.models:
            for dtype in args.dtypes:
                for mode in args.modes:
                    batch = args.infer_batch if mode == "infer" else args.train_batch
                    t0 = time.time()
                    run_one(model, mode, dtype, batch, args, out_dir)
                    print(f"  {time.time() - t0:.0f} s", flush=True)
        command = args.made_with or "python benchmarks/run_benchmarks.py " + shlex.join(sys.argv[1:])
        (out_dir / "made_with.json").write_text(json.dumps({"command": command, "note": args.note,
                                                            "models": args.models}, indent=1))
    sections = {device: section for device, d in dirs.items() if (section := load_section(d, device)) is not None}
    write_markdown(Path(args.output), sections)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
