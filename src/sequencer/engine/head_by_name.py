"""Fine-tuning from a checkpoint with class names: the classifier's rows follow the names, not their positions.

A ``--class-map`` listing (dog, cat, bird) on top of a (bird, cat, dog) checkpoint, or a new dataset with the same
classes in another order, would otherwise start every class on another class's row.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..data.class_map import positions_by_name
from ..models.loading import checkpoint_filter_fn

_logger = logging.getLogger(__name__)


def head_rows_by_name(state: dict[str, torch.Tensor], checkpoint_names: list[str] | None, class_names: list[str],
                      model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """``state`` (a checkpoint's weights) with its classifier rows (``head.fc.weight`` (K, C), ``head.fc.bias``
    (K,)) placed at the rows of ``class_names`` the model trains; a class the checkpoint lacks keeps the model's
    fresh row, a checkpoint class the run lacks is dropped, and either (or a reorder) is logged as a WARNING.

    Returned unchanged when the checkpoint has no class names, no head, a head of another feature width C (another
    architecture: ``load_state_dict_into`` names the mismatch), or no class name in common with the run (a new task:
    the usual transfer rules of ``load_state_dict_into`` apply).
    """
    own = model.state_dict()
    state = checkpoint_filter_fn(state)
    weight, bias = state.get("head.fc.weight"), state.get("head.fc.bias")
    if not checkpoint_names or weight is None or "head.fc.weight" not in own \
            or weight.shape[1:] != own["head.fc.weight"].shape[1:]:
        return state  # another feature width: another architecture, which loading reports
    checkpoint_names = [str(n) for n in checkpoint_names][:weight.shape[0]]
    rows = positions_by_name(list(class_names), checkpoint_names)
    if all(r is None for r in rows):
        return state
    if rows == list(range(len(rows))) and weight.shape == own["head.fc.weight"].shape:
        return state  # same classes in the same order (and any extra outputs the same)
    new_weight, new_bias = own["head.fc.weight"].detach().clone(), own["head.fc.bias"].detach().clone()
    for i, r in enumerate(rows):
        if r is not None:
            new_weight[i] = weight[r].to(new_weight.dtype)
            if bias is not None:
                new_bias[i] = bias[r].to(new_bias.dtype)
    state = dict(state, **{"head.fc.weight": new_weight, "head.fc.bias": new_bias})
    _log_changes(rows, checkpoint_names, class_names, source)
    return state


def _log_changes(rows: list[int | None], checkpoint_names: list[str], class_names: list[str], source: str) -> None:
    moved = sum(1 for i, r in enumerate(rows) if r is not None and r != i)
    kept = {r for r in rows if r is not None}
    dropped = [n for i, n in enumerate(checkpoint_names) if i not in kept]
    new = [n for n, r in zip(class_names, rows) if r is None]
    parts = [f"{moved} row(s) reordered"] if moved else []
    if dropped:
        parts.append(f"dropped the rows of {_names(dropped)} (not classes of this run)")
    if new:
        parts.append(f"{_names(new)} start(s) from a fresh row (not in the checkpoint)")
    if parts:
        _logger.warning("%s: the classifier's rows follow the class names: %s", source, "; ".join(parts))


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
