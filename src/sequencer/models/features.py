"""``create_model(..., features_only=True)``: a backbone's per-stage feature maps."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class FeatureExtractor(nn.Module):
    """``features_only=True`` wrapper: returns a list of NCHW stage maps; ``feature_info`` lists their shapes."""

    def __init__(self, model: nn.Module, out_indices: Sequence[int] | None = None):
        super().__init__()
        n = len(model.stages)
        self.out_indices = tuple(range(n) if out_indices is None else (i % n for i in out_indices))
        model.reset_classifier(0)
        self.model = model
        self.feature_info = [model.feature_info[i] for i in self.out_indices]

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self.feature_info]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self.feature_info]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)
