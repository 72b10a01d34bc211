"""``create_model(..., features_only=True)``: a backbone's per-stage feature maps."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from timm.models import FeatureInfo

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


def prune_to_stages(model: nn.Module, indices: int | Sequence[int] | None, prune_norm: bool,
                    prune_head: bool) -> list[int]:
    """timm's ``prune_intermediate_layers`` for a staged model: drop the stages after the last one ``indices``
    takes (:func:`stage_indices`), and the final norm and the head where asked or where no longer fed by the last
    stage (both are sized for, and applied to, the last stage only). Returns the stage positions kept.

    The model's ``forward_intermediates(x, indices)`` then gives what it gave before for those stages;
    ``num_features`` becomes the width of the new last stage.
    """
    n = len(model.stages)
    take = stage_indices(indices, n, "indices")
    cut_end = max(take) < n - 1
    if prune_norm or cut_end:
        model.norm = nn.Identity()
    model.stages = model.stages[:max(take) + 1]
    if cut_end:
        model.num_features = model.head_hidden_size = model.feature_info[max(take)]["num_chs"]
        model.feature_info = model.feature_info[:max(take) + 1]
    if prune_head or cut_end:
        model.reset_classifier(0, "")
    return take


class WrapperFacade:
    """What timm's helpers read from a model, for a module that wraps one in its attribute ``wrapped`` (``"model"``,
    ``"trunk"``, ``"backbone"``): the wrapped model's ``pretrained_cfg`` (the same dict; timm's
    ``resolve_model_data_config`` reads the mean, std, size and crop there, and falls back to ImageNet's at 224 px
    without it), its ``set_grad_checkpointing``, and its ``group_matcher`` / ``no_weight_decay`` under the wrapper's
    parameter names, so that timm's optimizer factory decays the learning rate stem -> stages (``layer_decay``) and
    exempts what the model exempts from weight decay. The wrapper's own parameters (pyramid levels, a decode head)
    match no group: timm gives them the full rate, as a new head's. Call ``_take_pretrained_cfg()`` once the wrapped
    model is set."""

    wrapped = "model"

    def _take_pretrained_cfg(self) -> None:
        cfg = getattr(getattr(self, self.wrapped), "pretrained_cfg", None)
        if cfg is not None:
            self.pretrained_cfg = self.default_cfg = cfg

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        rules = getattr(self, self.wrapped).group_matcher(coarse)
        return {group: _under(rule, re.escape(self.wrapped + ".")) for group, rule in rules.items()}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        getattr(self, self.wrapped).set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        inner = getattr(self, self.wrapped)
        return {f"{self.wrapped}.{name}" for name in (inner.no_weight_decay() if hasattr(inner, "no_weight_decay")
                                                      else ())}


def _under(rule, prefix: str):
    """A ``group_matcher`` rule (a pattern, or a list of (pattern, suffix)) for names below ``prefix``; timm matches
    patterns at the start of a name, so the anchor is optional."""
    if isinstance(rule, str):
        return "^" + prefix + rule.removeprefix("^")
    return [(_under(pattern, prefix), suffix) for pattern, suffix in rule]


def returned_feature_info(stage_info: Sequence[dict], out_indices: Sequence[int]) -> FeatureInfo:
    """timm's ``FeatureInfo`` for the returned maps, what code written for timm reads (``channels()``,
    ``reduction()``, ``module_name()``, ``get_dicts()``).

    It holds the returned stages only (timm's holds every stage and selects with ``out_indices``), so that
    ``len()``, indexing and iteration still give one dict per returned map, as the plain list this replaced did;
    an ``idx`` passed to its accessors counts returned maps. Each dict's ``index`` is its stage's position.
    """
    from timm.models import FeatureInfo  # imported here: a plain model is built without importing timm
    info = [dict(stage_info[i], index=i) for i in out_indices]
    return FeatureInfo(info, tuple(range(len(info))))


class FeatureExtractor(WrapperFacade, nn.Module):
    """``features_only=True`` wrapper: returns a list of NCHW stage maps; ``feature_info`` (timm's FeatureInfo)
    describes them; timm's helpers read the model's config and layer groups (:class:`WrapperFacade`).

    The model keeps only what the maps need (:func:`prune_to_stages`: no head, no final norm, no stage after the
    last one returned), as timm's feature wrappers do: every parameter gets a gradient, which DDP's default
    (``find_unused_parameters=False``) requires, and none is carried for nothing.
    """

    def __init__(self, model: nn.Module, out_indices: Sequence[int] | None = None):
        super().__init__()
        n = len(model.stages)
        self.out_indices = tuple(stage_indices(out_indices, n, "out_indices"))
        prune_to_stages(model, self.out_indices, prune_norm=True, prune_head=True)
        self.model = model
        self.feature_info = returned_feature_info(model.feature_info, self.out_indices)
        self._take_pretrained_cfg()

    def channels(self) -> list[int]:
        return self.feature_info.channels()

    def reduction(self) -> list[int]:
        return self.feature_info.reduction()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)
