"""Top-1/top-5 accuracy and loss of a classifier over a loader; the one eval loop of `train` and `validate`."""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SequencerError
from .amp import autocast, autocast_dtype

_logger = logging.getLogger(__name__)


def class_count(loader) -> int | None:
    """The classes the loader's labels index (its dataset's ``class_names``), None where it does not say."""
    dataset = getattr(loader, "dataset", None)  # a loader, or any iterable of batches
    names = getattr(getattr(dataset, "dataset", dataset), "class_names", None)
    return len(names) if isinstance(names, (list, tuple)) else None


def check_head_covers(logits: torch.Tensor, classes: int | None) -> None:
    """SequencerError where a batch's ``logits`` have fewer columns than the data's ``classes`` (a module without
    ``num_classes``, which nothing checks before its first batch): the loss failed in torch ('IndexError: Target 2
    is out of bounds.' evaluating, 'index 3 is out of bounds for dimension 1 with size 2' training)."""
    if classes is not None and logits.shape[-1] < classes:
        raise SequencerError(f"the model gives {logits.shape[-1]} logits per image, but the data has {classes} "
                             f"classes", hint=f"give the model a head of {classes} outputs")


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: torch.device | str, amp_dtype: torch.dtype | str | None = None,
             distributed: bool = False) -> dict:
    """Evaluate ``model`` on every batch of ``loader`` (``(images (N, C, H, W), targets (N,))``).

    Returns dict(top1, top5 (percent), loss (mean cross-entropy), images_per_sec, count, unreadable (the distinct
    files the loader skipped, every rank's: `unreadable_skipped`), nonfinite (images whose logits hold a NaN or a
    +inf; -inf is a probability of 0: then top-1, top-5 and loss are NaN, with a warning, as a ranking of NaNs is
    no accuracy)). Sums are accumulated in float64 and, with ``distributed``, all-reduced over ranks, so the result
    is exact when each rank sees a disjoint share of the data (the eval loader of `sequencer.data.create_loader`
    gives each rank such a share, unpadded).
    Top-5 counts a hit within the top min(5, classes). ``amp_dtype`` (e.g. torch.bfloat16) runs the forward pass
    under autocast, resolved by `sequencer.engine.amp.autocast_dtype`'s rule (a name such as "bfloat16" or "auto"
    too); the loss is computed in float32. The model is put in eval mode and left there.
    """
    device = torch.device(device)
    amp_dtype = autocast_dtype(amp_dtype, device)
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top1 hits, top5 hits, count, non-finite
    classes = class_count(loader)
    start = time.perf_counter()
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device.type, amp_dtype):
            logits = model(images)
        logits = logits.float()
        check_head_covers(logits, classes)
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hits = top.eq(targets[:, None])
        sums += torch.stack([
            F.cross_entropy(logits, targets, reduction="sum").double(),
            hits[:, 0].sum().double(),
            hits.any(dim=-1).sum().double(),
            torch.tensor(float(targets.numel()), dtype=torch.float64, device=device),
            (logits.isnan() | logits.isposinf()).any(dim=-1).sum().double(),  # -inf is a probability of 0
        ])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
    unreadable = unreadable_skipped(loader, distributed)  # every rank's, checked against the pass's limit
    loss_sum, top1, top5, count, nonfinite = sums.tolist()
    if count == 0:
        return dict(top1=0.0, top5=0.0, loss=float("nan"), images_per_sec=0.0, count=0, unreadable=unreadable,
                    nonfinite=0)
    if nonfinite:  # topk ranks NaN first: an all-NaN model read as chance level (10% top-1 of 10 classes)
        _logger.warning(f"warning: {int(nonfinite)} of {int(count)} images gave logits that are NaN or +inf: "
                        f"top-1, top-5 and loss are NaN")
        top1 = top5 = loss_sum = float("nan")
    return dict(top1=100.0 * top1 / count, top5=100.0 * top5 / count, loss=loss_sum / count,
                images_per_sec=count / max(elapsed.item(), 1e-9), count=int(count), unreadable=unreadable,
                nonfinite=int(nonfinite))


def unreadable_skipped(loader, distributed: bool = False) -> int:
    """How many distinct unreadable files the latest pass of ``loader`` (an ``ImageLoader``; 0 for another) skipped,
    counted over every rank of the process group with ``distributed``: each rank's loader knows only its own share.
    Every rank calls it; past the loader's ``max_unreadable`` of the whole pass every rank raises its
    SequencerError (a rank alone stops only past the whole pass's allowance)."""
    files = list(getattr(loader, "skipped", None) or [])
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        shares = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(shares, files)
        files = [f for share in shares for f in share]
        if hasattr(loader, "check_unreadable"):
            loader.check_unreadable(files)
    return len(set(files))
