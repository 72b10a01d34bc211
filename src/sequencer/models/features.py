"""``create_model(..., features_only=True)``: a backbone's per-stage feature maps."""
from __future__ import annotations

from typing import Sequence

import torch
from timm.models import FeatureInfo
from torch import nn

from ..errors import SequencerError


def stage_indices(indices: int | Sequence[int] | None, n: int, what: str) -> list[int]:
    """Stage positions 0..n-1 for ``indices`` (None: all; an int k: the last k; a list: those, -1 = the last).

    Raises SequencerError (one line) for an index out of range, one listed twice or out of stage order: the model
    returns its stages in order, once each, and ``feature_info`` must list exactly what it returns.
    """
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        if not 1 <= indices <= n:
            raise SequencerError(f"{what}={indices}: the model has {n} stages (take the last 1..{n})")
        return list(range(n - indices, n))
    take = []
    for i in indices:
        if not -n <= int(i) < n:
            raise SequencerError(f"{what}={tuple(indices)}: stage {i} is out of range for a model with {n} stages "
                                 f"(0..{n - 1}, or -{n}..-1 from the end)")
        take.append(int(i) % n)
    if len(set(take)) != len(take) or take != sorted(take):
        raise SequencerError(f"{what}={tuple(indices)}: list each stage once, in increasing order")
    return take

def returned_feature_info(stage_info: Sequence[dict], out_indices: Sequence[int]) -> FeatureInfo:
    """timm's ``FeatureInfo`` for the returned maps, what code written for timm reads (``channels()``,
    ``reduction()``, ``module_name()``, ``get_dicts()``).

    It holds the returned stages only (timm's holds every stage and selects with ``out_indices``), so that
    ``len()``, indexing and iteration still give one dict per returned map, as the plain list this replaced did;
    an ``idx`` passed to its accessors counts returned maps. Each dict's ``index`` is its stage's position.
    """
    info = [dict(stage_info[i], index=i) for i in out_indices]
    return FeatureInfo(info, tuple(range(len(info))))


class FeatureExtractor(nn.Module):
    """``features_only=True`` wrapper: returns a list of NCHW stage maps; ``feature_info`` (timm's FeatureInfo)
    describes them."""

    def __init__(self, model: nn.Module, out_indices: Sequence[int] | None = None):
        super().__init__()
        n = len(model.stages)
        self.out_indices = tuple(stage_indices(out_indices, n, "out_indices"))
        model.reset_classifier(0)
        self.model = model
        self.feature_info = returned_feature_info(model.feature_info, self.out_indices)

    def channels(self) -> list[int]:
        return self.feature_info.channels()

    def reduction(self) -> list[int]:
        return self.feature_info.reduction()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)
