"""Top-1/top-5 at several input sizes with the same weights (``sequencer resolution-sweep``).

The paper's resolution-adaptability study: Sequencer2D has no position embedding, so one set of weights runs at any
input size that is a multiple of the model's patch reduction. Each size uses the model's eval preprocessing
(resize to size / crop_pct, centre crop). Results go to ``DIR/resolution.csv`` and ``DIR/resolution.png``.
"""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from ..engine.evaluate import evaluate
from ..engine.inference import LoadedModel, eval_loader
from ..data.loader_workers import workers_stopped_on_exit
from ..fileio import write_atomically

_logger = logging.getLogger(__name__)

PLOT_SIZE_IN, PLOT_DPI = (6.4, 4.0), 100  # -> 640 x 400 px


def plot_resolution(rows: list[dict], path: Path, title: str, train_size: int | None = None) -> None:
    """Top-1/top-5 (%) against input size, a dotted line at the model's native (training) size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["img_size"] for r in rows]
    fig, ax = plt.subplots(figsize=PLOT_SIZE_IN, dpi=PLOT_DPI)
    ax.plot(sizes, [r["top1"] for r in rows], "o-", color="tab:blue", label="top-1")
    ax.plot(sizes, [r["top5"] for r in rows], "s--", color="tab:orange", label="top-5")
    if train_size:
        ax.axvline(train_size, color="gray", linestyle=":", label=f"native size {train_size}")
    ax.set_xlabel("input resolution (px)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.set_xticks(sizes)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI)
    plt.close(fig)
    write_atomically(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))


# the paper's "double resolution-band": half to twice the native size, in quarter steps
SWEEP_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


def default_sizes(native: int, reduction: int) -> list[int]:
    """Half to twice ``native`` px in quarter steps, each rounded to a multiple of the model's patch ``reduction``
    (the sizes it can take): 112, 168, ..., 448 for a 224 px Sequencer2D (reduction 14)."""
    return sorted({max(reduction, round(native * f / reduction) * reduction) for f in SWEEP_FACTORS})


@workers_stopped_on_exit()
def resolution_sweep(loaded: LoadedModel, data: str, split: str, sizes: list[int], batch_size: int = 64,
                     workers: int = 0, device="cpu", dataset: str = "") -> list[dict]:
    """One row per input size (img_size, top1, top5, loss, count) of ``loaded`` on ``data``'s ``split`` (``dataset``:
    what ``data`` holds, as validate's, e.g. "torch/cifar10" for torchvision's files), each with the model's eval
    preprocessing at that size; logs a line per size (INFO)."""
    rows = []
    for size in sizes:
        loader = eval_loader(data, split, loaded, (loaded.input_size[0], size, size), batch_size, workers, device,
                             notes=size == sizes[0], dataset=dataset)
        m = evaluate(loaded.model, loader, device)
        rows.append(dict(img_size=size, top1=round(m["top1"], 3), top5=round(m["top5"], 3),
                         loss=round(m["loss"], 5), count=m["count"]))
        _logger.info(f"{size:>5} px: top-1 {m['top1']:6.2f}  top-5 {m['top5']:6.2f}  loss {m['loss']:.4f}  "
                    f"({m['count']} images)")
    return rows


def write_resolution_csv(rows: list[dict], path: Path) -> None:
    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(path, write_csv)
