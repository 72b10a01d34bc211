"""The CPU deployment table of BENCHMARKS.md: ours fp32 / bf16 / fast (``optimize_for_inference`` with float32,
bfloat16 and "auto") against onnxruntime on our fp32 export and on its dynamic int8 quantisation
(``sequencer export --quantize int8``), side by side.

All five paths of one model are timed interleaved in one process (``sequencer.tools.benchmark.time_interleaved``),
at batch 16 and batch 1, with ``--threads`` intra-op threads for torch and onnxruntime alike (onnxruntime's threads
do not busy-wait between runs, so they leave the cores to the path timed next); the CPU (with its
matrix ISA) and the fp32/bf16 GEMM rate of a 2048^3 ``torch.mm`` on the same threads are measured in the same
process, so each path's share of the GEMM rate is reported. Each path's logits are checked against the eager fp32
model (fp32 paths within 1e-4 relative); peak memory comes from the benchmark's fresh-subprocess probe. Agreement is
the share of images whose top-1 class equals ours-fp32's, on the scikit-learn digits (real images, upsampled to the
model's input size). The s/m/l weights here are random (a normal-initialised head): their agreement says how often
quantisation flips a near-tie on a model that was never trained, not what a trained model loses.

``ours-fp32-1stream`` is ours fp32 with ``streams=1`` (one call on all threads), beside the default streams, so
the table shows what streams change. Two more measurements ride along, both side by side in the same process:
``--train-batch`` times AdamW training steps in fp32 and under bf16 autocast (issue 20's bf16 training goal), and
``--trained-epochs`` trains sequencer2d_nano on the digits' train split (``int8_settings.train``) and counts how
many of all 1,797 digits the fast path answers differently from fp32, with the fp32 top-1 margins of those that
flip (the agreement of a trained model, which the random s weights cannot give).

    python benchmarks/deployment.py --models sequencer2d_s --threads 2   # the BENCHMARKS.md table (one command)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from int8_settings import digits, train  # this folder's sibling script: the digits model and its images

from sequencer.data import create_transform
from sequencer.data.datasets import DigitsDataset
from sequencer.hardware import cpu_info
from sequencer.models.flops import count_macs
from sequencer.models.kernels import onednn_bf16_supported
from sequencer.models import create_model
from sequencer.tools.benchmark import time_interleaved
from sequencer.tools.benchmark_steps import make_infer_step, make_train_step, memory_probe
from sequencer.tools.peak_memory import measure_peak_memory
from sequencer.tools.export import export_onnx, int8_settings, quantize_int8
from sequencer.tools.onnx_runtime import OnnxModel
from sequencer.tools.optimize import optimize_for_inference


def digit_images(count: int, size: int, cfg: dict) -> torch.Tensor:
    """(count, 3, size, size): the first ``count`` digits of the val split, with the model's preprocessing."""
    data = DigitsDataset("val")
    transform = create_transform((3, size, size), False, mean=cfg["mean"], std=cfg["std"], crop_pct=1.0,
                                 interpolation="bicubic")
    return torch.stack([transform(data.load(i)[0]) for i in range(count)])


def gemm_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a ``size``^3 matrix product in ``dtype`` on the current threads: the best of ``repeats`` runs of
    PyTorch's default ``torch.mm`` and of oneDNN's matmul (the one our Linear layers use; MKL is slower on AMD)."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    products = [lambda: torch.mm(a, b)]
    if dtype == torch.float32 or onednn_bf16_supported():
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = float("inf")
    for product in products:
        product()
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def build_paths(name: str, folder: Path, skip: tuple[str, ...] = ()) -> tuple[dict, dict, torch.nn.Module]:
    """{impl: model} for the five paths, {impl: file or weight bytes}, and the eager fp32 reference."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    torch.nn.init.normal_(model.head.fc.weight, std=0.02)  # a zero head would make every logit 0
    size = model.pretrained_cfg["input_size"][-1]
    meta = {"arch": name, "input_size": [3, size, size]}
    export_onnx(model, folder / "fp32.onnx", (3, size, size), dynamic_batch=True, metadata=meta)
    quantize_int8(folder / "fp32.onnx", folder / "int8.onnx", meta, int8_settings())  # the defaults for this CPU
    threads = torch.get_num_threads()
    paths = {"ours-fp32": optimize_for_inference(model, torch.float32),
             "ours-fp32-1stream": optimize_for_inference(model, torch.float32, streams=1),
             "ours-bf16": optimize_for_inference(model, torch.bfloat16),
             "ours-fast": optimize_for_inference(model, "auto"),
             "ort-fp32": OnnxModel(folder / "fp32.onnx", threads, spin_wait=False),
             "ort-int8": OnnxModel(folder / "int8.onnx", threads, spin_wait=False)}
    paths = {impl: m for impl, m in paths.items() if impl not in skip}
    params = sum(p.numel() for p in model.parameters())
    fast_bytes = 2 if paths.get("ours-fast") is not None and paths["ours-fast"].dtype == torch.bfloat16 else 4
    sizes = {"ours-fp32": params * 4, "ours-fp32-1stream": params * 4, "ours-bf16": params * 2,
             "ours-fast": params * fast_bytes,
             "ort-fp32": os.path.getsize(folder / "fp32.onnx"), "ort-int8": os.path.getsize(folder / "int8.onnx")}
    return paths, sizes, model


def measure(name: str, args: argparse.Namespace) -> dict:
    """One model's report: CPU, GEMM rates, and per path img/s, share of the GEMM rate, logit error, memory."""
    with tempfile.TemporaryDirectory() as tmp:
        paths, sizes, model = build_paths(name, Path(tmp), tuple(args.skip))
        size = model.pretrained_cfg["input_size"][-1]
        report = {"model": name, "cpu": cpu_info().describe(), "threads": torch.get_num_threads(),
                  "gemm_gflops": {"float32": 0.0, "bfloat16": 0.0},
                  "gmacs": count_macs(model, (3, size, size)) / 1e9, "load_before": os.getloadavg(), "rows": {}}
        for impl in paths:
            dtype = "int8" if impl == "ort-int8" else str(getattr(paths[impl], "dtype", torch.float32))
            report["rows"][impl] = {"file_mib": sizes[impl] / 2**20, "dtype": dtype.replace("torch.", "")}
        for batch in args.batches:
            _probe_gemm_rates(report, args.gemm_size)
            _time_batch(report, paths, model, batch, size, args)
        _probe_gemm_rates(report, args.gemm_size)
        _add_gemm_shares(report)
        _agreement(report, paths, model, size, args.agreement_images)
        if args.train_batch:
            report["training"] = _training(model, args.train_batch, size, args.train_iter)
        if args.trained_epochs:
            report["trained_agreement"] = _trained_agreement(args.trained_epochs)
        report["load_after"] = os.getloadavg()
        return report


def _probe_gemm_rates(report: dict, size: int) -> None:
    """Keep the best GEMM rate seen: probed before, between and after the timings (the load moves)."""
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        if dtype == torch.bfloat16 and not onednn_bf16_supported():
            continue  # PyTorch's reference bf16 GEMM: minutes per probe, and no path here runs it
        report["gemm_gflops"][name] = max(report["gemm_gflops"][name], gemm_rate(dtype, size))


def _add_gemm_shares(report: dict) -> None:
    """Each path's model FLOP/s over the GEMM rate of its dtype (not for int8)."""
    for row in report["rows"].values():
        for key in [k for k in row if k.startswith("img_per_s_b")]:
            if report["gemm_gflops"].get(row["dtype"]):
                flops = 2 * report["gmacs"] * 1e9 * row[key]
                row[key.replace("img_per_s", "gemm_share")] = flops / 1e9 / report["gemm_gflops"][row["dtype"]]


def _time_batch(report: dict, paths: dict, model: torch.nn.Module, batch: int, size: int, args) -> None:
    """Time every path at ``batch``, interleaved; check its logits against the eager fp32 model's."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(x)
    steps = {impl: make_infer_step(m, x, torch.float32, torch.device("cpu")) for impl, m in paths.items()}
    for impl in list(steps):  # a path this machine cannot run is reported, not fatal
        try:
            logits = torch.as_tensor(steps[impl]()).float()
        except RuntimeError as e:
            report.setdefault("failed", {})[impl] = str(e).splitlines()[0][:200]
            del steps[impl], paths[impl], report["rows"][impl]
            continue
        error = ((logits - expected).abs().max() / expected.abs().max()).item()
        report["rows"][impl][f"logit_err_b{batch}"] = error
        if report["rows"][impl]["dtype"] == "float32" and impl != "ort-int8" and error > 1e-4:
            raise AssertionError(f"{impl}: fp32 logits differ from the eager model's by {error:.2e} (relative)")
    times = time_interleaved(steps, torch.device("cpu"), 1, args.num_iter)
    for impl, ts in times.items():
        row = report["rows"][impl]
        row[f"img_per_s_b{batch}"] = batch / statistics.median(ts)
        row[f"step_ms_all_b{batch}"] = [round(t * 1e3, 1) for t in ts]
        if batch == max(args.batches) and args.memory_iter:
            ours = impl.startswith("ours")
            spec = dict(impl="ours-optimized" if ours else impl, name=report["model"], model_kwargs={}, mode="infer",
                        batch_size=batch, input_size=[3, size, size], dtype=row["dtype"] if ours else "float32",
                        device="cpu", iters=args.memory_iter, onnx=None if ours else str(paths[impl].path),
                        streams=getattr(paths[impl], "streams", None))
            row["peak_mib"] = measure_peak_memory(spec, memory_probe)


def _agreement(report: dict, paths: dict, model: torch.nn.Module, size: int, count: int) -> None:
    """Each path's top-1 agreement with ours-fp32 on ``count`` digits images."""
    images = digit_images(count, size, model.pretrained_cfg)
    with torch.inference_mode():
        preds = {impl: torch.cat([torch.as_tensor(m(b)).float().argmax(-1) for b in images.split(16)])
                 for impl, m in paths.items()}
    reference = preds.get("ours-fp32", model(images).argmax(-1))
    for impl, row in report["rows"].items():
        row["agreement"] = (preds[impl] == reference).double().mean().item()


def _training(model: torch.nn.Module, batch: int, size: int, iters: int) -> dict:
    """AdamW steps of fresh copies of ``model`` in fp32 and under bf16 autocast, interleaved: img/s of each."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, model.num_classes, (batch,), generator=torch.Generator().manual_seed(1))
    device = torch.device("cpu")
    steps = {name: make_train_step(copy.deepcopy(model), x, target, dtype, device)
             for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    times = time_interleaved(steps, device, 1, iters)
    return {"batch": batch, **{f"img_per_s_{n}": batch / statistics.median(ts) for n, ts in times.items()},
            **{f"step_s_all_{n}": [round(t, 3) for t in ts] for n, ts in times.items()}}


def _trained_agreement(epochs: int) -> dict:
    """The fast path against fp32 on a digits model trained for ``epochs``: answers changed among all 1,797."""
    x_train, y_train = digits("train", 32)
    x_val, y_val = digits("val", 32)
    model = train(x_train, y_train, epochs).eval()
    images = torch.cat([x_train, x_val])
    fast = optimize_for_inference(model, "auto")
    with torch.inference_mode():
        reference = torch.cat([model(b) for b in images.split(64)])
        answers = torch.cat([fast(b) for b in images.split(64)]).argmax(-1)
    flips = answers != reference.argmax(-1)
    top2 = reference.topk(2, dim=-1).values
    return {"epochs": epochs, "fast_dtype": str(fast.dtype).replace("torch.", ""), "images": len(images),
            "fp32_val_top1": (reference[-len(y_val):].argmax(-1) == y_val).double().mean().item(),
            "agreement": 1 - flips.double().mean().item(), "flips": int(flips.sum()),
            "flip_margins": [round(m, 4) for m in (top2[:, 0] - top2[:, 1])[flips].tolist()]}


def _cell(row: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    return format(row[key] * scale, fmt) if key in row else "-"


def render(reports: list[dict]) -> str:
    """The markdown table of BENCHMARKS.md's CPU deployment section, one header line per model's run: img/s and the
    ratio to ORT fp32 at each batch timed, GEMM share and logit error at the largest."""
    lines = []
    for rep in reports:
        rates = rep.get("gemm_gflops", {})
        batches = sorted({int(k.removeprefix("img_per_s_b")) for row in rep["rows"].values() for k in row
                          if k.startswith("img_per_s_b")})
        big = f"b{batches[-1]}" if batches else "b?"
        lines += [f"{rep['model']} on {rep.get('cpu', '?')}, {rep['threads']} threads; GEMM rate fp32 "
                  f"{rates.get('float32', 0):.0f} / bf16 {rates.get('bfloat16', 0):.0f} GFLOP/s; load average "
                  f"{rep['load_before'][0]:.1f} -> {rep['load_after'][0]:.1f}", "",
                  "| path | dtype | " + "".join(f"img/s b{b} | vs ORT fp32 b{b} | " for b in batches)
                  + f"GEMM % {big} | logit err {big} | peak MiB | file MiB | top-1 agreement |",
                  "|---|" + "---|" * (6 + 2 * len(batches))]
        base = rep["rows"].get("ort-fp32", {})
        for impl, row in rep["rows"].items():
            speeds = ""
            for b in batches:
                key = f"img_per_s_b{b}"
                ratio = format(row[key] / base[key], ".2f") + "x" if key in row and key in base else "-"
                speeds += f"{_cell(row, key, '.2f')} | {ratio} | "
            lines.append(f"| {impl} | {row.get('dtype', '-')} | {speeds}"
                         f"{_cell(row, 'gemm_share_' + big, '.0f', 100)}% | {_cell(row, 'logit_err_' + big, '.1e')} | "
                         f"{_cell(row, 'peak_mib', '.0f')} | {row['file_mib']:.1f} | "
                         f"{_cell(row, 'agreement', '.1f', 100)}% |")
        lines += [""] + _extra_lines(rep) + [""]
    return "\n".join(lines)


def _extra_lines(rep: dict) -> list[str]:
    """The training and trained-model agreement lines under a model's table (where measured)."""
    lines = []
    if "training" in rep:
        t = rep["training"]
        fp32, bf16 = t["img_per_s_float32"], t["img_per_s_bfloat16"]
        lines.append(f"Training (AdamW, batch {t['batch']}): fp32 {fp32:.2f} img/s, bf16 autocast {bf16:.2f} img/s: "
                     f"bf16 {bf16 / fp32:.2f}x fp32.")
    if "trained_agreement" in rep:
        a = rep["trained_agreement"]
        lines.append(f"Fast path ({a['fast_dtype']}) on a digits nano trained {a['epochs']} epochs (fp32 val top-1 "
                     f"{a['fp32_val_top1']:.1%}): {a['agreement']:.2%} of {a['images']} answers equal to fp32's "
                     f"({a['flips']} flips; fp32 top-2 margins of the flips: {a['flip_margins']}).")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sequencer2d_s"])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and onnxruntime")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--num-iter", type=int, default=3)
    parser.add_argument("--memory-iter", type=int, default=1)
    parser.add_argument("--agreement-images", type=int, default=64)
    parser.add_argument("--gemm-size", type=int, default=2048,
                        help="side of the square matrices whose product gives the GEMM rate (the tests' quick run: 256)")
    parser.add_argument("--results", default=f"benchmarks/results/deployment-{cpu_info().cpu_class}.json",
                        help="JSON written (default: one file per CPU class)")
    parser.add_argument("--render-only", action="store_true", help="print the table of --results")
    parser.add_argument("--train-batch", type=int, default=8, help="batch of the fp32-vs-bf16 training steps (0: skip)")
    parser.add_argument("--train-iter", type=int, default=4)
    parser.add_argument("--trained-epochs", type=int, default=6,
                        help="epochs of the digits model whose fast-path agreement is measured (0: skip)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["ours-fp32-1stream", "ours-bf16", "ours-fast", "ort-fp32", "ort-int8"],
                        help="paths not to time (ours-bf16 takes most of the time on a CPU without bf16 kernels)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.render_only:
        print(render(json.loads(Path(args.results).read_text())))
        return
    reports = []
    for name in args.models:
        start = time.time()
        reports.append(measure(name, args))
        print(json.dumps(reports[-1]), f"({time.time() - start:.0f} s)", flush=True)
        Path(args.results).write_text(json.dumps(reports, indent=1) + "\n")
    print(render(reports))


if __name__ == "__main__":
    main()
