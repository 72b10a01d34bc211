"""``sequencer benchmark --data DIR``: images per second of the training input pipeline, ours beside timm's.

Both pipelines read the same image folder's ``train`` split with the paper's augmentation (RandomResizedCrop,
flip, ``rand-m9-mstd0.5-inc1``, pixel random erasing 0.25) at the benchmark's image size, with the same number of
worker processes and batch size, and hand batches to ``--device``. Ours is `sequencer.data.create_loader`;
timm's is ``timm.data.create_loader`` (its prefetcher, which normalises and erases on the device, on CUDA only;
``device`` is passed, so nothing assumes a GPU). They are timed in alternating rounds in one process, so machine
noise hits both alike. A round counts images per second over ``--num-iter`` batches after one untimed batch (the
workers' start-up).
"""
from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

import torch

from ..errors import SequencerError

if TYPE_CHECKING:
    from .benchmark import BenchmarkSettings

PAPER_AUGMENT = dict(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel", interpolation="random")


def _ours(root: str, img_size: int, batch_size: int, workers: int, device: torch.device):
    from ..data import create_dataset, create_loader
    dataset = create_dataset("", root=root, split="train", is_training=True)
    return create_loader(dataset, (3, img_size, img_size), batch_size, True, num_workers=workers, device=device,
                         **PAPER_AUGMENT)


def _timms(root: str, img_size: int, batch_size: int, workers: int, device: torch.device):
    from timm.data import create_dataset, create_loader
    from ..data.augment import keep_zero_bit_posterize
    dataset = create_dataset("", root=root, split="train", is_training=True)
    loader = create_loader(dataset, (3, img_size, img_size), batch_size, is_training=True,
                           use_prefetcher=device.type == "cuda", no_aug=False, num_workers=workers, device=device,
                           re_prob=0.25, re_mode="pixel", auto_augment="rand-m9-mstd0.5-inc1",
                           interpolation="random", persistent_workers=workers > 0)
    # Pillow 13 refuses timm's 0-bit posterize (sequencer.data.augment): without this its workers crash
    keep_zero_bit_posterize(dataset.transform)
    return loader


def _round(loader, batches: int, device: torch.device) -> float:
    """Images per second over ``batches`` batches after the first (untimed) one."""
    it = iter(loader)
    next(it)  # there is one: create_loader refuses a batch larger than the split
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            images, _ = next(it)
        except StopIteration:
            break
        count += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    del it
    if count == 0:
        raise SequencerError("`data`: the train split has too few images for one timed batch",
                             hint="use a smaller `batch_size` or more images")
    return count / elapsed


def run_loader_benchmark(args: BenchmarkSettings, device: torch.device, img_size: int) -> dict:
    """{'ours': [img/s per round], 'timm': [...]} for ``args.data`` (timm only with ``--compare-timm``)."""
    from ..data.loader_workers import stop_workers
    makers = {"ours": _ours}
    if args.compare_timm:
        makers["timm"] = _timms
    loaders = {name: make(args.data, img_size, args.batch_size, args.workers, device)
               for name, make in makers.items()}
    rates = {name: [] for name in loaders}
    try:
        for _ in range(args.rounds):
            for name, loader in loaders.items():
                rates[name].append(_round(loader, args.num_iter, device))
    finally:  # also when a round raises (Ctrl-C): the exception's traceback would keep the workers alive
        for loader in loaders.values():
            stop_workers(getattr(loader, "loader", loader))  # timm's CUDA PrefetchLoader wraps its DataLoader
    return dict(data=args.data, img_size=img_size, batch_size=args.batch_size, workers=args.workers,
                device=str(device), rounds=rates)


def format_loader_results(report: dict) -> str:
    lines = [f"training input pipeline: {report['data']} at {report['img_size']} px, batch {report['batch_size']}, "
             f"{report['workers']} workers, to {report['device']} (img/s per round)"]
    for name, rates in report["rounds"].items():
        lines.append(f"{name:<6} " + " ".join(f"{r:8.1f}" for r in rates)
                     + f"   median {statistics.median(rates):.1f}")
    return "\n".join(lines)
