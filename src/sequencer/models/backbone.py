"""``create_backbone``: a Sequencer as a detection/segmentation backbone giving maps at strides 4, 8, 16 and 32.

Sequencer2D's stages run at strides 7, 14, 14, 14 (S/M/L): after the first stage the network is *plain*, one
resolution, like a ViT. So the pyramid is a simple feature pyramid in the manner of ViTDet (Li et al., "Exploring
Plain Vision Transformer Backbones for Object Detection", 2022), built from the last stage alone:

1. the input is zero-padded on the right and bottom to a multiple of the trunk's stride ``r`` (14), far enough that
   the coarsest level covers the image (as torchvision's GeneralizedRCNNTransform pads to multiples of 32);
2. the trunk's final, LayerNormed map (stride ``r``) is resampled bilinearly by ``r / b`` onto the nearest
   power-of-two stride ``b`` (14 -> 16: a 0.875x resize; the sampling grid is exact, cell centres at (i + 1/2) * b
   pixels); a trunk whose stride is already a power of two (``sequencer2d_nano``: 4) is not resampled;
3. each level rescales that map by a power of two, up with 2x2 stride-2 transposed convolutions (halving the
   channels, LayerNorm + GELU between two of them), down with 2x2 max pooling, is cropped to ceil(side / stride)
   cells (ResNet's sizes for any input) and projected to ``out_channels`` by a 1x1 and a 3x3 convolution, each
   followed by a channel LayerNorm.

Why this design: an FPN over the stages would have only two distinct resolutions to merge (7 and 14), and ViTDet
showed that for a plain backbone a simple pyramid from the last map matches an FPN. Strides 4/8/16/32 cannot be
reached from 14 by padding (14 divides no power of two) and resizing the *input* by 7/8 would throw away an eighth
of the image's resolution before the trunk sees it; resampling the feature map keeps the trunk at full resolution
and costs one cheap interpolation. Measured cost: docs/detection.md.

``forward`` returns an ``OrderedDict`` ``"0".."n-1"`` (one per ``strides`` entry) plus what ``extra_blocks`` adds:
``"pool"`` (stride 64, torchvision's LastLevelMaxPool, what FasterRCNN/MaskRCNN's default anchors expect) by default.
"""
from __future__ import annotations

import math
import operator
from collections import OrderedDict
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from timm.models import FeatureInfo

from ..errors import ArgumentValueError, SequencerError, checked_positive_int
from .features import WrapperFacade, returned_feature_info
from .registry import create_model


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for a >= 0, b > 0. Not ``-(-a // b)``: ONNX's integer division truncates where Python's floors,
    and the ONNX exporter records this arithmetic on traced input sizes."""
    return (a + b - 1) // b


def _layer_norm_2d(channels: int) -> nn.Module:
    from timm.layers import LayerNorm2d  # LayerNorm over the channels of an NCHW map
    return LayerNorm2d(channels, eps=1e-6)


def _rescale(channels: int, factor: float) -> tuple[nn.Module, int]:
    """(module, output channels) resizing an NCHW map by ``factor`` (a power of two): transposed convolutions up,
    max pooling down."""
    if factor <= 1:
        return (nn.MaxPool2d(round(1 / factor), round(1 / factor)) if factor < 1 else nn.Identity()), channels
    layers = []
    for i in range(round(math.log2(factor))):
        if i:
            layers += [_layer_norm_2d(channels), nn.GELU()]
        layers.append(nn.ConvTranspose2d(channels, max(channels // 2, 1), 2, 2))
        channels = max(channels // 2, 1)
    return nn.Sequential(*layers), channels


class PyramidLevel(nn.Module):
    """One output level: rescale the base map by ``factor``, crop to ``size``, project to ``out_channels``.

    (B, C, h, w) -> (B, out_channels, size[0], size[1]).
    """

    def __init__(self, in_channels: int, out_channels: int, factor: float):
        super().__init__()
        self.rescale, channels = _rescale(in_channels, factor)
        self.project = nn.Sequential(
            nn.Conv2d(channels, out_channels, 1, bias=False), _layer_norm_2d(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), _layer_norm_2d(out_channels))

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self.rescale(x)[:, :, :size[0], :size[1]]
        return self.project(x)


def _check_strides(strides: Sequence[int]) -> tuple[int, ...]:
    """``strides`` as a tuple of ints; ArgumentValueError (one line) unless they are increasing powers of two. A
    float or a text is refused, not truncated: ``(4.5, 8)`` or ``"48"`` would otherwise be read as (4, 8)."""
    try:
        if isinstance(strides, (str, bytes)):
            raise TypeError
        strides = tuple(operator.index(s) for s in strides)
    except TypeError:
        raise ArgumentValueError(f"strides={strides!r}: give a sequence of ints, e.g. (4, 8, 16, 32)") from None
    if not strides or any(s < 1 or s & (s - 1) for s in strides) or list(strides) != sorted(set(strides)):
        raise ArgumentValueError(f"strides={strides}: give increasing powers of two, e.g. (4, 8, 16, 32)")
    return strides


def _check_extra_blocks(extra_blocks, out_channels: int):
    """torchvision's LastLevelMaxPool for "pool", None, or the caller's ExtraFPNBlock (the pyramid calls it as
    torchvision's FPN does); anything else is ArgumentValueError (one line), before the first forward. So is a
    LastLevelP6P7 whose P6 expects other than ``out_channels`` channels: its inputs here are the pyramid's levels
    (there is no C5 of a ResNet's width, which torchvision's ``LastLevelP6P7(2048, 256)`` reads)."""
    from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7
    if extra_blocks == "pool":
        return LastLevelMaxPool()
    if extra_blocks is not None and not isinstance(extra_blocks, ExtraFPNBlock):
        raise ArgumentValueError(f"extra_blocks={extra_blocks!r}: use 'pool', None or a torchvision ExtraFPNBlock "
                                 "(e.g. LastLevelP6P7(out_channels, out_channels))")
    if isinstance(extra_blocks, LastLevelP6P7) and extra_blocks.p6.in_channels != out_channels:
        raise ArgumentValueError(f"extra_blocks=LastLevelP6P7({extra_blocks.p6.in_channels}, "
                                 f"{extra_blocks.p6.out_channels}): its P6 is computed from the pyramid's "
                                 f"{out_channels}-channel levels here: give LastLevelP6P7({out_channels}, "
                                 f"{out_channels})")
    return extra_blocks


def _level_info(strides: Sequence[int], out_channels: int, extra_blocks) -> FeatureInfo:
    """timm's ``FeatureInfo`` of the returned levels, in the OrderedDict's order: each dict's ``key`` (``"0"``,
    ``"pool"``, ...), ``num_chs``, ``reduction`` (its stride) and ``module`` (whose output it is). The extra levels
    of torchvision's LastLevelMaxPool and LastLevelP6P7 are listed; another ``ExtraFPNBlock``'s are not known before
    it runs, so only the ``strides`` levels are."""
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
    info = [dict(key=str(i), num_chs=out_channels, reduction=s, module=f"levels.{i}") for i, s in enumerate(strides)]
    if isinstance(extra_blocks, LastLevelMaxPool):
        info.append(dict(key="pool", num_chs=out_channels, reduction=2 * strides[-1], module="extra_blocks"))
    elif isinstance(extra_blocks, LastLevelP6P7):
        info += [dict(key=name, num_chs=extra_blocks.p6.out_channels, reduction=2 ** k * strides[-1],
                      module=f"extra_blocks.{name}") for k, name in ((1, "p6"), (2, "p7"))]
    return returned_feature_info(info, range(len(info)))


class SequencerBackbone(WrapperFacade, nn.Module):
    """A Sequencer trunk with a simple feature pyramid (see the module docstring), torchvision's backbone convention.

    Input (B, 3, H, W), any H and W. Output: ``OrderedDict`` of (B, out_channels, ceil(H/s), ceil(W/s)) for each
    ``s`` in ``strides`` under keys "0", "1", ..., then the ``extra_blocks`` levels. ``out_channels`` and ``strides``
    are attributes, ``feature_info`` timm's description of the levels (:func:`_level_info`); ``trunk`` is the
    headless classification model, whose config and layer groups timm's helpers read through this module
    (:class:`~sequencer.models.features.WrapperFacade`).
    """

    wrapped = "trunk"

    def __init__(self, trunk: nn.Module, out_channels: int = 256, strides: Sequence[int] = (4, 8, 16, 32),
                 extra_blocks: nn.Module | str | None = "pool"):
        super().__init__()
        self.strides = _check_strides(strides)
        out_channels = checked_positive_int("out_channels", out_channels)
        extra_blocks = _check_extra_blocks(extra_blocks, out_channels)
        if getattr(trunk, "num_classes", 0):
            raise ArgumentValueError(f"the trunk has a {trunk.num_classes}-class head, which the backbone would "
                                     "carry unused: build it with num_classes=0 (or call reset_classifier(0))")
        self.trunk = trunk
        self._take_pretrained_cfg()  # the trunk's normalisation is the pyramid's input's (WrapperFacade)
        self.trunk_stride = trunk.reduction
        self.base_stride = 2 ** round(math.log2(self.trunk_stride))
        self.out_channels = out_channels
        self.levels = nn.ModuleList(PyramidLevel(trunk.num_features, out_channels, self.base_stride / s)
                                    for s in self.strides)
        self.extra_blocks = extra_blocks  # after the levels: the parameter order earlier versions saved
        self._init_pyramid()
        self.feature_info = _level_info(self.strides, out_channels, extra_blocks)

    def _init_pyramid(self) -> None:
        for m in self.levels.modules():  # as torchvision's FPN
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def padded_size(self, side: int) -> int:
        """The side the trunk runs at for an input ``side``: a multiple of the trunk's stride covering the coarsest
        level's grid (``max(strides)`` times ceil(side / max(strides)))."""
        coarsest = max(self.strides[-1], self.base_stride)
        covered = coarsest * ceil_div(side, coarsest)
        return self.trunk_stride * ceil_div(covered, self.trunk_stride)

    def forward_base(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the trunk's last map resampled to ``base_stride``: (B, C, >= H/b, >= W/b)."""
        h, w = x.shape[-2:]
        x = F.pad(x, (0, self.padded_size(w) - w, 0, self.padded_size(h) - h))
        y = self.trunk.forward_features(x).permute(0, 3, 1, 2)
        if self.trunk_stride != self.base_stride:
            y = F.interpolate(y, scale_factor=self.trunk_stride / self.base_stride, mode="bilinear",
                              align_corners=False, recompute_scale_factor=False)
        return y

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        base = self.forward_base(x)
        maps = [level(base, (ceil_div(h, s), ceil_div(w, s))) for s, level in zip(self.strides, self.levels)]
        names = [str(i) for i in range(len(maps))]
        if self.extra_blocks is not None:
            maps, names = self.extra_blocks(maps, list(maps), names)
        return OrderedDict(zip(names, maps))


def create_backbone(name: str, pretrained: bool = False, checkpoint_path: str | None = None,
                    out_channels: int = 256, strides: Sequence[int] = (4, 8, 16, 32),
                    extra_blocks: nn.Module | str | None = "pool", **kwargs) -> SequencerBackbone:
    """A registered Sequencer as a multi-scale backbone for torchvision's detectors, UperNet and the like.

    ``pretrained`` / ``checkpoint_path`` load the trunk as :func:`create_model` does (the authors' release, timm's
    layout, our checkpoints, safetensors); a classifier head in the file is dropped silently. ``strides``: the
    pyramid levels, returned as "0", "1", ...; ``extra_blocks``: "pool" adds torchvision's stride-64 "pool" level
    (FasterRCNN/MaskRCNN defaults), None returns the levels only, a torchvision ``ExtraFPNBlock`` adds its levels
    (RetinaNet: ``strides=(8, 16, 32), extra_blocks=LastLevelP6P7(out_channels, out_channels)``).
    ``kwargs`` go to :func:`create_model` (``drop_path_rate``, ``use_ema``, architecture overrides).
    """
    for key in ("num_classes", "features_only", "out_indices"):
        if key in kwargs:
            raise SequencerError(f"create_backbone does not take {key}= (the backbone has no head and returns "
                                 f"its pyramid levels; pick them with strides=)")
    # the pyramid's arguments are checked before the trunk's weights are downloaded or read
    strides, out_channels = _check_strides(strides), checked_positive_int("out_channels", out_channels)
    extra_blocks = _check_extra_blocks(extra_blocks, out_channels)
    trunk = create_model(name, pretrained=pretrained, checkpoint_path=checkpoint_path, num_classes=0, **kwargs)
    return SequencerBackbone(trunk, out_channels=out_channels, strides=strides, extra_blocks=extra_blocks)
