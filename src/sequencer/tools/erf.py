"""`sequencer erf`: effective receptive field heat maps (Luo et al. 2016), as the Sequencer paper computes them.

The paper's map (the default, ``--mode paper``): for a chosen layer's output (B, C, H, W), take the unit at the
centre (H // 2, W // 2), pass its C channels through ReLU and sum them; take the gradient of that with respect to
the input images, keep its positive part (ReLU) (RepLKNet's per-image ERF), and sum it over the images and the input
channels (the Sequencer authors' aggregation). The raw (H_in, W_in) sum is saved as ``.npy``; the picture shows
``log10(sum + 1)`` min-max scaled to [0, 1], as the authors' script does. That script differs in two details: no
ReLU on the centre's channels, and the unit at (H // 2 - 1, W // 2 - 1).

``--mode magnitude`` (not the paper's): the gradient of the centre's plain channel sum, its absolute value summed
over input channels and averaged over images, shown as ``log10(1 + 1000 * map / max) / log10(1001)``.

By default the final features (``forward_features``, after the final norm) are analysed; ``--stage K`` picks stage K
(1-based), ``--stage all`` draws one panel per stage. Also printed: a high-contribution area ratio, the fraction of
the input's pixels (largest first) that holds t of the raw map's total, for t = 20%, 30%, 50% and 99%. RepLKNet's
(Ding et al. 2022) is another number: the smallest centred square holding t of the log10(x + 1)-scaled map.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import torch

from ..engine.inference import LoadedModel, eval_transform, read_images
from ..fileio import write_atomically

_logger = logging.getLogger(__name__)

PANEL_IN, COLORBAR_IN, HEIGHT_IN, DPI = 3.6, 1.0, 3.6, 100  # figure of n panels: (3.6 n + 1) x 3.6 in at 100 dpi
AREA_THRESHOLDS = (0.2, 0.3, 0.5, 0.99)


def figure_size_px(panels: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG for ``panels`` panels."""
    return round((PANEL_IN * panels + COLORBAR_IN) * DPI), round(HEIGHT_IN * DPI)


def stage_features(model: torch.nn.Module, x: torch.Tensor, stages: list[int]) -> list[torch.Tensor]:
    """(B, C_s, H_s, W_s) maps of the given 0-based stages; the last stage includes the final norm, i.e. it is
    ``forward_features``. Models without ``forward_intermediates`` give their final features only."""
    if hasattr(model, "forward_intermediates"):
        return model.forward_intermediates(x, indices=stages, norm=True, intermediates_only=True)
    feats = model.forward_features(x)
    if feats.ndim == 4 and feats.shape[1] == feats.shape[2] and feats.shape[-1] != feats.shape[1]:
        feats = feats.permute(0, 3, 1, 2)  # channels-last (B, H, W, C) -> NCHW
    return [feats]


def centre_objective(features: torch.Tensor, mode: str) -> torch.Tensor:
    """The scalar whose input gradient is the ERF: the centre unit of (B, C, H, W) ``features``, its channels
    ReLU'd then summed (paper) or summed as they are (magnitude), summed over the batch (images do not interact)."""
    h, w = features.shape[-2:]
    centre = features[:, :, h // 2, w // 2]
    return (torch.relu(centre) if mode == "paper" else centre).sum()


def erf_maps(model: torch.nn.Module, batches, stages: list[int], device,
             mode: str = "paper") -> tuple[np.ndarray | None, int]:
    """The raw ERF of each of ``stages``: per batch the input gradient of :func:`centre_objective`, reduced over
    images and input channels as ``mode`` says (paper: positive part summed; magnitude: |.| averaged over images).

    ``batches`` yields (B, C, H, W) tensors. Returns (maps (S, H, W) float64, image count); (None, 0) when there
    were no images.
    """
    total, count = None, 0
    model.eval()
    for images in batches:
        x = images.to(device).requires_grad_(True)
        with _without_cudnn(device), torch.enable_grad():
            feats = stage_features(model, x, stages)
            grads = []
            for i, f in enumerate(feats):
                (g,) = torch.autograd.grad(centre_objective(f, mode), x, retain_graph=i < len(feats) - 1)
                g = torch.relu(g) if mode == "paper" else g.abs()
                grads.append(g.sum(dim=(0, 1)).double().cpu())
        batch_maps = torch.stack(grads).numpy()
        total = batch_maps if total is None else total + batch_maps
        count += x.shape[0]
    if total is None:
        return None, 0
    return (total if mode == "paper" else total / count), count


def _without_cudnn(device) -> contextlib.AbstractContextManager:
    """A fresh context (one per batch: cudnn.flags' context cannot be entered twice) that turns cuDNN off on CUDA:
    cuDNN's RNN kernels cannot run backward in eval mode, the native ones can (and eval keeps dropout off)."""
    if torch.device(device).type == "cuda":
        return torch.backends.cudnn.flags(enabled=False)
    return contextlib.nullcontext()


def display_scale(raw: np.ndarray, mode: str = "paper") -> np.ndarray:
    """The picture's values in [0, 1]: log10(raw + 1) min-max scaled (paper), else :func:`log_scale`."""
    if mode != "paper":
        return log_scale(raw)
    logged = np.log10(raw + 1.0)
    low, high = logged.min(), logged.max()
    return (logged - low) / (high - low) if high > low else np.zeros_like(logged)


def log_scale(raw: np.ndarray, decades: float = 3.0) -> np.ndarray:
    """Normalise a map to max 1 and compress it logarithmically to [0, 1] (the magnitude mode's picture)."""
    peak = raw.max()
    if not peak > 0:
        return np.zeros_like(raw)
    k = 10.0 ** decades
    return np.log10(1.0 + k * raw / peak) / np.log10(1.0 + k)


def area_ratios(raw: np.ndarray, thresholds=AREA_THRESHOLDS) -> dict[float, float]:
    """Fraction of the pixels (largest first) needed to hold t of the total contribution, per threshold t."""
    flat = np.sort(raw.ravel())[::-1]
    total = flat.sum()
    if not total > 0:
        return {t: float("nan") for t in thresholds}
    cum = np.cumsum(flat) / total
    return {t: float((np.searchsorted(cum, t) + 1) / flat.size) for t in thresholds}


def plot_erf(maps: np.ndarray, titles: list[str], path: Path, suptitle: str, mode: str = "paper") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(maps)
    width, height = figure_size_px(n)
    # a billionth of an inch over: 4.6 in x 100 dpi is 459.99... in floats, which matplotlib 3.8 (the floor) truncated
    # to 459 px (newer releases round)
    fig = plt.figure(figsize=(width / DPI + 1e-9, height / DPI + 1e-9), dpi=DPI)
    # panels on the left, one shared colour bar at the right
    axes = [fig.add_axes([(0.1 + PANEL_IN * i) / (width / DPI), 0.06, (PANEL_IN - 0.2) / (width / DPI), 0.8])
            for i in range(n)]
    cax = fig.add_axes([(PANEL_IN * n + 0.1) / (width / DPI), 0.1, 0.15 / (width / DPI), 0.72])
    for ax, m, title in zip(axes, maps, titles):
        im = ax.imshow(display_scale(m, mode), cmap="inferno", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    label = "log10(gradient sum + 1), min-max scaled" if mode == "paper" else "log-scaled |gradient|"
    fig.colorbar(im, cax=cax).set_label(label, fontsize=8)
    fig.suptitle(suptitle, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    write_atomically(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))


def _warn_if_untrained_norm(model: torch.nn.Module) -> None:
    weight = getattr(getattr(model, "norm", None), "weight", None)
    if weight is not None and bool((weight == weight.flatten()[0]).all()):
        # sum_c LayerNorm(x)_c = sum_c w (x_c - mean) / std + b is constant when all w are equal (untrained norm)
        _logger.info("note: the final LayerNorm has equal channel weights (untrained model?), so the channel sum of the "
                    "last stage's features is constant and its ERF is numerical noise; use an earlier `stages` or "
                    "trained weights")


def erf_map(loaded: LoadedModel, files: list[Path], stages: list[int], device, mode: str = "paper",
            batch_size: int = 8) -> tuple[np.ndarray, int]:
    """The raw ERF maps (S, H_in, W_in) of ``loaded`` at its 0-based ``stages``, over the image ``files`` read with
    its eval preprocessing (unreadable ones warned about and skipped), and how many images were used."""
    transform = eval_transform(loaded)

    def batches():
        for start in range(0, len(files), batch_size):
            _, tensors, _ = read_images(files[start:start + batch_size], transform)
            if tensors:
                yield torch.stack(tensors)

    if mode == "magnitude" and len(getattr(loaded.model, "stages", [None])) - 1 in stages:
        _warn_if_untrained_norm(loaded.model)
    return erf_maps(loaded.model, batches(), stages, device, mode)


def save_raw_maps(path: Path, maps: np.ndarray) -> None:
    """The raw map(s) as ``.npy``: (H, W) for one, (S, H, W) for several (atomically)."""
    def write_npy(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a path
            np.save(f, maps[0] if len(maps) == 1 else maps)

    write_atomically(path, write_npy)
