"""The CPU deployment table of BENCHMARKS.md: ours fp32 / bf16 (``optimize_for_inference``) against onnxruntime on
our fp32 export and on its dynamic int8 quantisation (``sequencer export --quantize int8``), side by side.

All four paths of one model are timed interleaved in one process (``sequencer.tools.benchmark.time_interleaved``),
at batch 16 and batch 1; peak memory comes from the benchmark's fresh-subprocess probe. Agreement is the share of
images whose top-1 class equals ours-fp32's, on the scikit-learn digits (real images, upsampled to the model's
input size). The s/m/l weights here are random (a normal-initialised head): their agreement says how often
quantisation flips a near-tie on a model that was never trained, not what a trained model loses.

    python benchmarks/deployment.py --models sequencer2d_s sequencer2d_m sequencer2d_l --batches 16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sequencer.data import create_transform
from sequencer.data.datasets import DigitsDataset
from sequencer.models import create_model
from sequencer.tools.benchmark import make_infer_step, measure_peak_memory, time_interleaved
from sequencer.tools.export import export_onnx, quantize_int8
from sequencer.tools.onnx_runtime import OnnxModel
from sequencer.tools.optimize import optimize_for_inference


def digit_images(count: int, size: int, cfg: dict) -> torch.Tensor:
    """(count, 3, size, size): the first ``count`` digits of the val split, with the model's preprocessing."""
    data = DigitsDataset("val")
    transform = create_transform((3, size, size), False, mean=cfg["mean"], std=cfg["std"], crop_pct=1.0,
                                 interpolation="bicubic")
    return torch.stack([transform(data.load(i)[0]) for i in range(count)])


class BF16Autocast(torch.nn.Module):
    """Ours in eager mode under CPU bf16 autocast (``optimize_for_inference``'s bf16 weights are tried first)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x)


def build_paths(name: str, folder: Path, skip: tuple[str, ...] = ()) -> tuple[dict, dict, torch.nn.Module]:
    """{impl: model} for the four paths, {impl: file or weight bytes}, and the eager fp32 reference."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    torch.nn.init.normal_(model.head.fc.weight, std=0.02)  # a zero head would make every logit 0
    size = model.pretrained_cfg["input_size"][-1]
    meta = {"arch": name, "input_size": [3, size, size]}
    export_onnx(model, folder / "fp32.onnx", (3, size, size), dynamic_batch=True, metadata=meta)
    quantize_int8(folder / "fp32.onnx", folder / "int8.onnx", meta)
    threads = torch.get_num_threads()
    paths = {"ours-fp32": optimize_for_inference(model, torch.float32),
             "ours-bf16": BF16Autocast(model),
             "ort-fp32": OnnxModel(folder / "fp32.onnx", threads), "ort-int8": OnnxModel(folder / "int8.onnx", threads)}
    paths = {impl: m for impl, m in paths.items() if impl not in skip}
    params = sum(p.numel() for p in model.parameters())
    sizes = {"ours-fp32": params * 4, "ours-bf16": params * 2, "ort-fp32": os.path.getsize(folder / "fp32.onnx"),
             "ort-int8": os.path.getsize(folder / "int8.onnx")}
    return paths, sizes, model


def measure(name: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        paths, sizes, model = build_paths(name, Path(tmp), tuple(args.skip))
        size = model.pretrained_cfg["input_size"][-1]
        report = {"model": name, "threads": torch.get_num_threads(), "load_before": os.getloadavg(), "rows": {}}
        for batch in args.batches:
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
            steps = {impl: make_infer_step(m, x, torch.float32, torch.device("cpu")) for impl, m in paths.items()}
            for impl in list(steps):  # a path this machine cannot run is reported, not fatal
                try:
                    steps[impl]()
                except RuntimeError as e:
                    report.setdefault("failed", {})[impl] = str(e).splitlines()[0][:200]
                    del steps[impl], paths[impl]
            times = time_interleaved(steps, torch.device("cpu"), 1, args.num_iter)
            for impl, ts in times.items():
                row = report["rows"].setdefault(impl, {"file_mib": sizes[impl] / 2**20})
                row[f"img_per_s_b{batch}"] = batch / statistics.median(ts)
                row[f"step_ms_all_b{batch}"] = [round(t * 1e3, 1) for t in ts]
                if batch == max(args.batches) and args.memory_iter:
                    spec = dict(impl={"ours-fp32": "ours-optimized", "ours-bf16": "ours"}.get(impl, impl), name=name,
                                model_kwargs={}, mode="infer", batch_size=batch, input_size=[3, size, size],
                                dtype="bfloat16" if impl == "ours-bf16" else "float32", device="cpu",
                                iters=args.memory_iter, onnx=str(paths[impl].path) if impl.startswith("ort") else None)
                    row["peak_mib"] = measure_peak_memory(spec)
        images = digit_images(args.agreement_images, size, model.pretrained_cfg)
        with torch.inference_mode():
            preds = {impl: torch.cat([m(b).float().argmax(-1) for b in images.split(16)]) for impl, m in paths.items()}
        for impl, row in report["rows"].items():
            if impl in preds:
                row["agreement"] = (preds[impl] == preds["ours-fp32"]).double().mean().item()
        report["load_after"] = os.getloadavg()
        return report


def render(reports: list[dict]) -> str:
    """The markdown table of BENCHMARKS.md's CPU deployment section."""
    lines = ["| model | path | img/s (batch 16) | vs ours fp32 | peak MiB | file / weights MiB | top-1 agreement |",
             "|---|---|---|---|---|---|---|"]
    for rep in reports:
        base = rep["rows"]["ours-fp32"]["img_per_s_b16"]
        for impl, row in rep["rows"].items():
            peak = row.get("peak_mib")
            speed = row["img_per_s_b16"]
            lines.append(f"| {rep['model']} | {impl} | {speed:.2f} | {speed / base:.2f}x | "
                         f"{'-' if peak is None else format(peak, '.0f')} | {row['file_mib']:.1f} | "
                         f"{100 * row['agreement']:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sequencer2d_s", "sequencer2d_m", "sequencer2d_l"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--num-iter", type=int, default=3)
    parser.add_argument("--memory-iter", type=int, default=1)
    parser.add_argument("--agreement-images", type=int, default=64)
    parser.add_argument("--results", default="benchmarks/results/deployment.json")
    parser.add_argument("--render-only", action="store_true", help="print the table of --results")
    parser.add_argument("--skip", nargs="*", default=[], choices=["ours-bf16", "ort-fp32"],
                        help="paths not to time (ours-bf16 takes most of the time on a CPU without bf16 kernels)")
    args = parser.parse_args()
    if args.render_only:
        print(render(json.loads(Path(args.results).read_text())))
        return
    reports = []
    for name in args.models:
        start = time.time()
        reports.append(measure(name, args))
        print(json.dumps(reports[-1]), f"({time.time() - start:.0f} s)", flush=True)
        Path(args.results).write_text(json.dumps(reports, indent=1) + "\n")


if __name__ == "__main__":
    main()
