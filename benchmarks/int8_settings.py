"""Measure `sequencer export --quantize int8` settings on a model trained on real images, on this CPU.

The model: sequencer2d_nano trained on scikit-learn's handwritten digit scans (real 8x8 scans, upsampled to 32 px;
CIFAR-10 cannot be fetched here). Every setting is quantised from one fp32 export and compared on the digits' 360
val images (top-1 vs labels) and on all 1,797 images (top-1 agreement with fp32), in batches of 32 as
`export --verify` runs them; speed is onnxruntime img/s at batch 32, the settings interleaved in one process.

    python benchmarks/int8_settings.py --out benchmarks/results/int8_settings.json [--epochs 6]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sequencer.data import create_transform
from sequencer.data.datasets import DigitsDataset
from sequencer.hardware import cpu_info
from sequencer.models import create_model
from sequencer.tools.export import export_onnx, quantize_int8
from sequencer.tools.onnx_runtime import OnnxModel

MEAN = STD = (0.5, 0.5, 0.5)
BASE = dict(static=False, reduce_range=False, per_channel=False, keep_float=())
SETTINGS = {  # name -> overrides of BASE
    "dynamic, per-tensor, 7-bit (old default)": dict(reduce_range=True),
    "dynamic, per-tensor, 8-bit": dict(),
    "dynamic, per-channel, 7-bit": dict(per_channel=True, reduce_range=True),
    "dynamic, per-channel, 8-bit": dict(per_channel=True),
    "dynamic, per-channel, 8-bit, head+stem float": dict(per_channel=True, keep_float=("head", "stem")),
    "dynamic, per-channel, 7-bit, head+stem float": dict(per_channel=True, reduce_range=True,
                                                         keep_float=("head", "stem")),
    "static QDQ, per-channel, 8-bit, head+stem float": dict(static=True, per_channel=True,
                                                            keep_float=("head", "stem")),
    "static QDQ, per-channel, 7-bit, head+stem float": dict(static=True, per_channel=True, reduce_range=True,
                                                            keep_float=("head", "stem")),
}


def digits(split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = DigitsDataset(split)
    transform = create_transform((3, size, size), False, mean=MEAN, std=STD, crop_pct=1.0, interpolation="bicubic")
    images, labels = zip(*(dataset.load(i) for i in range(len(dataset))))
    return torch.stack([transform(im) for im in images]), torch.tensor(labels)


def train(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0) -> torch.nn.Module:
    """sequencer2d_nano (10 classes, seeded with ``seed``) trained on ``x``, ``y`` for ``epochs``."""
    torch.manual_seed(seed)
    return fit(create_model("sequencer2d_nano", num_classes=10), x, y, epochs, lr=2e-3, weight_decay=0.05)


def fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
        weight_decay: float) -> torch.nn.Module:
    """``model`` trained in place on the whole of ``x``, ``y`` (batches of 64 in torch's random order; AdamW, a
    one-cycle schedule peaking at ``lr``), given back in eval mode: the digits models of this script, of
    deployment.py and of tests/tools/test_onnx_int8.py."""
    steps = epochs * -(-len(y) // 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
            schedule.step()
    return model.eval()


class Calibration:
    def __init__(self, x: torch.Tensor):
        self.batches = iter(x.split(32))

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {"input": batch.numpy()}


def predict(model: OnnxModel, x: torch.Tensor) -> np.ndarray:
    return np.concatenate([model.run_numpy(chunk.numpy()) for chunk in x.split(32)])


def img_per_s(models: dict, x: torch.Tensor, rounds: int) -> dict:
    """Interleaved timing: every model runs one pass over ``x`` per round; the best round counts."""
    best = {name: float("inf") for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            predict(model, x)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(x) / t for name, t in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cache", default=None, metavar="PATH", help="reuse (or write) the trained weights here")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=32, help="the 8x8 scans are upsampled to 32 px, then resized")
    parser.add_argument("--out", default="benchmarks/results/int8_settings.json")
    parser.add_argument("--render-only", action="store_true", help="print the table of --out")
    args = parser.parse_args()
    if args.render_only:
        print(render(json.loads(Path(args.out).read_text())))
        return
    torch.set_num_threads(2)
    (x_train, y_train), (x_val, y_val) = digits("train", args.img_size), digits("val", args.img_size)
    start = time.perf_counter()
    if args.cache and Path(args.cache).is_file():
        model = create_model("sequencer2d_nano", num_classes=10).eval()
        model.load_state_dict(torch.load(args.cache, weights_only=True))
    else:
        model = train(x_train, y_train, args.epochs)
        print(f"trained {args.epochs} epochs at {args.img_size} px in {time.perf_counter() - start:.0f} s", flush=True)
        if args.cache:
            torch.save(model.state_dict(), args.cache)
    x_all = torch.cat([x_train, x_val])
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        export_onnx(model, fp32_path, (3, args.img_size, args.img_size), dynamic_batch=True)
        models, sizes = {"fp32": OnnxModel(fp32_path)}, {"fp32": fp32_path.stat().st_size}
        for i, (name, overrides) in enumerate(SETTINGS.items()):
            settings = dict(BASE, cpu_class=cpu_info().cpu_class, **overrides)
            path = Path(tmp) / f"int8_{i}.onnx"
            quantize_int8(fp32_path, path, {}, settings, Calibration(x_train[:256]) if settings["static"] else None)
            models[name], sizes[name] = OnnxModel(path), path.stat().st_size
        rows = measure(models, sizes, x_val, y_val, x_all)
        speed = img_per_s(models, x_val, args.rounds)
    for name, row in rows.items():
        row["img_per_s"] = speed[name]
        row["vs_fp32"] = speed[name] / speed["fp32"]
    report = dict(cpu=cpu_info().describe(), epochs=args.epochs, img_size=args.img_size, threads=2, rows=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(render(report))


def measure(models: dict, sizes: dict, x_val, y_val, x_all) -> dict:
    fp32_val, fp32_all = predict(models["fp32"], x_val), predict(models["fp32"], x_all)
    top2 = np.sort(fp32_all, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    print(f"fp32 top-2 logit margin over all images: min {margin.min():.3f}, 5th percentile "
          f"{np.percentile(margin, 5):.3f}, median {np.median(margin):.3f}; {(margin < 0.1).sum()} below 0.1", flush=True)
    rows = {}
    for name, model in models.items():
        val, every = predict(model, x_val), predict(model, x_all)
        rows[name] = dict(top1=float((val.argmax(1) == y_val.numpy()).mean()),
                          agreement_val=float((val.argmax(1) == fp32_val.argmax(1)).mean()),
                          agreement_all=float((every.argmax(1) == fp32_all.argmax(1)).mean()),
                          flips_margin_over_0_1=int((every.argmax(1) != fp32_all.argmax(1))[margin >= 0.1].sum()),
                          max_logit_error=float(np.abs(every - fp32_all).max() / np.abs(fp32_all).max()),
                          mib=sizes[name] / 2**20)
    return rows


def render(report: dict) -> str:
    lines = [f"CPU: {report['cpu']}, {report['threads']} threads; sequencer2d_nano, {report['epochs']} epochs on digits "
             f"at {report['img_size']} px",
             "| setting | agreement (360 val) | agreement (1797 all) | changed answers with fp32 margin >= 0.1 | top-1 val "
             "| max logit error | MiB | img/s | vs fp32 |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["rows"].items():
        lines.append(f"| {name} | {100 * r['agreement_val']:.2f}% | {100 * r['agreement_all']:.2f}% | "
                     f"{r['flips_margin_over_0_1']} | {100 * r['top1']:.2f}% | {100 * r['max_logit_error']:.1f}% | {r['mib']:.2f} | "
                     f"{r['img_per_s']:.0f} | {r['vs_fp32']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
