"""Semantic segmentation models: a backbone's feature pyramid (strides 4/8/16/32) and a decode head.

Heads:

- ``upernet`` (Xiao et al., 2018): a pyramid-pooling module on the stride-32 map, a top-down FPN, the four levels
  fused at stride 4. The standard head of backbone comparisons on ADE20K.
- ``fpn`` (semantic FPN, Kirillov et al., 2019): a top-down FPN (a 3x3 output convolution on each merged level, as
  mmsegmentation's FPN neck) whose levels are each brought to stride 4 by conv + 2x upsampling steps and summed.
  Lighter.

UperNet models also get mmsegmentation's auxiliary FCN head on the stride-16 map (:class:`AuxFCNHead`): training
adds ``AUX_LOSS_WEIGHT`` times its cross-entropy to the loss; inference never runs it.

:func:`create_segmenter` builds backbone + head; :class:`Segmenter` returns logits (N, num_classes, H, W) at the
input's resolution for any input size. ``segmenter.config`` rebuilds the same model (``segmenter_from_config``);
training checkpoints store it. A config from before a key existed (``aux_head``, ``fpn_convs``) builds the model
it was trained as: without that part.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import HEADS
from ..errors import ArgumentValueError, SequencerError, checked_positive_int
from .backbone import ceil_div, create_backbone
from .features import WrapperFacade


class ConvNormAct(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU: (N, C_in, H, W) -> (N, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _upsample(x: torch.Tensor, factor: int, size) -> torch.Tensor:
    """A stride-``s`` map (N, C, ceil(H/s), ceil(W/s)) at stride ``s / factor``, cropped to ``size``: cell i covers
    pixels i*s..(i+1)*s - 1 (the backbone pads at the right and bottom), so the map is scaled by exactly ``factor``
    and its overhang cut. Resizing it to ``size`` instead stretches it wherever a side is no multiple of ``s``: at
    65 px the stride-4 logits' 17 cells (68 px) were squeezed onto 65, the last row read 3 px off."""
    x = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False, recompute_scale_factor=False)
    return x[..., :size[0], :size[1]]


class UperNetHead(nn.Module):
    """UperNet: [(N, C_i, H/s_i, W/s_i)] for s = 4, 8, 16, 32 -> logits (N, num_classes, H/4, W/4)."""

    POOL_SCALES = (1, 2, 3, 6)

    def __init__(self, in_channels: list[int], channels: int, num_classes: int, pool_scales=POOL_SCALES,
                 dropout: float = 0.1):
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        self.pools = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(in_channels[-1], channels))
                                   for s in self.pool_scales)
        self.pool_fuse = ConvNormAct(in_channels[-1] + len(self.pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(ConvNormAct(c, channels) for c in in_channels[:-1])
        self.smooth = nn.ModuleList(ConvNormAct(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = ConvNormAct(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def _pyramid_pooling(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [_resize(pool(x), x.shape[-2:]) for pool in self.pools]
        return self.pool_fuse(torch.cat([x, *pooled], dim=1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        levels = [lateral(f) for lateral, f in zip(self.laterals, features[:-1])]
        levels.append(self._pyramid_pooling(features[-1]))
        for i in range(len(levels) - 1, 0, -1):  # top-down: each level gets the coarser one added
            levels[i - 1] = levels[i - 1] + _upsample(levels[i], 2, levels[i - 1].shape[-2:])
        outs = [smooth(level) for smooth, level in zip(self.smooth, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [_upsample(o, 2 ** i, size) for i, o in enumerate(outs[1:], 1)],
                                    dim=1))
        return self.classifier(self.dropout(fused))


class SemanticFPNHead(nn.Module):
    """Semantic FPN: [(N, C_i, H/s_i, W/s_i)] for s = 4, 8, 16, 32 -> logits (N, num_classes, H/4, W/4)."""

    def __init__(self, in_channels: list[int], channels: int, num_classes: int, dropout: float = 0.1,
                 output_convs: bool = True):
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        # the FPN neck's 3x3 convolution on each merged level (none in checkpoints from before 2026-12-07)
        self.fpn_convs = (nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
                          if output_convs else None)
        # level i (stride 4 * 2**i) needs i conv + 2x-upsample steps to reach stride 4 (level 0 one conv)
        self.scale_heads = nn.ModuleList(
            nn.ModuleList(ConvNormAct(channels, channels, 3) for _ in range(max(1, i)))
            for i in range(len(in_channels)))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        levels = [lateral(f) for lateral, f in zip(self.laterals, features)]
        for i in range(len(levels) - 1, 0, -1):
            levels[i - 1] = levels[i - 1] + _upsample(levels[i], 2, levels[i - 1].shape[-2:])
        if self.fpn_convs is not None:
            levels = [conv(level) for conv, level in zip(self.fpn_convs, levels)]
        total = 0
        for i, (steps, level) in enumerate(zip(self.scale_heads, levels)):
            x = level
            for step, conv in enumerate(steps):
                x = conv(x)
                if i > 0:  # each step one level finer, at that level's cells
                    x = _upsample(x, 2, levels[i - step - 1].shape[-2:])
            total = total + x
        return self.classifier(self.dropout(total))


PYRAMID_STRIDES = (4, 8, 16, 32)  # the backbone's levels that the heads read
AUX_LOSS_WEIGHT = 0.4  # the auxiliary head's cross-entropy in the training loss (mmsegmentation's UperNet configs)
AUX_LEVEL = 2  # the pyramid level it reads: stride 16
AUX_CHANNELS = 256


class AuxFCNHead(nn.Sequential):
    """The training-only auxiliary head of mmsegmentation's UperNet configs (its FCNHead: one conv, no concatenated
    input): (N, C, h, w) -> logits (N, num_classes, h, w) by a 3x3 conv-BN-ReLU, dropout 0.1 and a 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = AUX_CHANNELS, dropout: float = 0.1):
        super().__init__(ConvNormAct(in_channels, channels, 3), nn.Dropout2d(dropout),
                         nn.Conv2d(channels, num_classes, 1))


class Segmenter(WrapperFacade, nn.Module):
    """Backbone (an OrderedDict of 4 maps at strides 4/8/16/32) + decode head (+ an optional training-only
    :class:`AuxFCNHead`, ``aux_head``, on level ``AUX_LEVEL``).

    forward: images (N, 3, H, W) -> logits (N, num_classes, H, W); with ``aux=True`` (the training loss's call) a
    pair (logits, the auxiliary head's logits at the same size, or None without one). timm's helpers read the
    backbone's config and layer groups through it (:class:`~sequencer.models.features.WrapperFacade`).
    """

    wrapped = "backbone"

    def __init__(self, backbone: nn.Module, head: nn.Module, num_classes: int, config: dict,
                 aux_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self._take_pretrained_cfg()
        self.head = head
        self.aux_head = aux_head
        self.num_classes = num_classes
        self.config = dict(config)

    def forward(self, images: torch.Tensor, aux: bool = False):
        features = self.backbone(images)
        maps = list(features.values()) if isinstance(features, dict) else list(features)
        size = images.shape[-2:]
        logits = _upsample(self.head(maps), PYRAMID_STRIDES[0], size)
        if not aux:
            return logits
        aux_logits = (None if self.aux_head is None
                      else _upsample(self.aux_head(maps[AUX_LEVEL]), PYRAMID_STRIDES[AUX_LEVEL], size))
        return logits, aux_logits


def create_segmenter(backbone: str, num_classes: int, head: str = "upernet", head_channels: int = 512,
                     out_channels: int = 256, backbone_checkpoint: str = "", pretrained: bool = False,
                     backbone_kwargs: dict | None = None, aux_head: bool = False,
                     fpn_convs: bool = True) -> Segmenter:
    """A :class:`Segmenter` of ``backbone`` (a registered model name, its pyramid with ``out_channels`` per level)
    and ``head`` (``upernet`` or ``fpn``, ``head_channels`` wide). ``backbone_checkpoint`` (ours, the release or
    timm's ImageNet classification weights) or ``pretrained`` initialise the backbone. ``aux_head``: the
    training-only auxiliary FCN head, run by ``forward(images, aux=True)`` only (off by default here, so that a plain
    forward uses every parameter, as a caller's own DDP loop needs; ``segment train`` turns it on for ``upernet``, as
    mmsegmentation's configs). ``fpn_convs``
    (``fpn`` only): the FPN's 3x3 output convolutions; False builds the head of checkpoints from before them."""
    if head not in HEADS:
        raise SequencerError(f"`head={head}`: unknown segmentation head", hint=f"use one of {', '.join(HEADS)}")
    _check_backbone_kwargs(backbone_kwargs or {})
    config = dict(backbone=backbone, num_classes=checked_positive_int("num_classes", num_classes), head=head,
                  head_channels=checked_positive_int("head_channels", head_channels),
                  out_channels=checked_positive_int("out_channels", out_channels),
                  backbone_kwargs=dict(backbone_kwargs or {}),
                  aux_head=bool(aux_head))
    if head == "fpn":
        config["fpn_convs"] = bool(fpn_convs)
    net = create_backbone(backbone, pretrained=pretrained, checkpoint_path=backbone_checkpoint or None,
                          out_channels=out_channels, strides=PYRAMID_STRIDES, extra_blocks=None,
                          **config["backbone_kwargs"])
    in_channels = [net.out_channels] * len(net.strides)
    if head == "upernet":
        head_module = UperNetHead(in_channels, config["head_channels"], config["num_classes"])
    else:
        head_module = SemanticFPNHead(in_channels, config["head_channels"], config["num_classes"],
                                      output_convs=config["fpn_convs"])
    aux_module = AuxFCNHead(in_channels[AUX_LEVEL], config["num_classes"]) if config["aux_head"] else None
    return Segmenter(net, head_module, config["num_classes"], config, aux_head=aux_module)


@dataclass(frozen=True)
class NormalisedMap:
    """A map that a segmenter's BatchNorm normalises in training: its ``cells`` per image, the setting whose part
    normalises it (``part``: ``head=fpn``, ``aux_head=True``), the map in words (``what``) and the smallest crop at
    which it has 2 cells or more (``min_crop``; None for a map of a fixed size)."""
    cells: int
    part: str
    what: str
    min_crop: int | None


def batch_norm_maps(head: str, aux_head: bool, crop: int) -> list[NormalisedMap]:
    """The smallest map each part of a ``head`` segmenter (with the auxiliary head where ``aux_head``) batch-normalises
    when it trains on ``crop`` x ``crop`` images (the training crops are padded to that size). BatchNorm in training
    needs 2 or more values per channel, batch x cells: one image of a 1x1 map is a ValueError at the first step."""
    def level(part: str, stride: int, what: str) -> NormalisedMap:
        side = ceil_div(crop, stride)
        return NormalisedMap(side * side, part, f"{what} ({side}x{side} at a {crop}-px crop)", stride + 1)

    if head == "upernet":  # its smallest: the pooled maps, s x s whatever the crop
        scale = min(UperNetHead.POOL_SCALES)
        maps = [NormalisedMap(scale * scale, "head=upernet", f"its pyramid pooling's {scale}x{scale} pooled map", None)]
    else:  # fpn's smallest: the stride-32 level, which its first scale-head convolution reads
        maps = [level(f"head={head}", PYRAMID_STRIDES[-1], "its stride-32 level")]
    if aux_head:
        maps.append(level("aux_head=True", PYRAMID_STRIDES[AUX_LEVEL], "the auxiliary head's stride-16 map"))
    return maps


# create_backbone's arguments that create_segmenter sets itself, and where to give each instead
_SET_BY_SEGMENTER = {"name": "backbone", "out_channels": "out_channels", "pretrained": "pretrained",
                     "checkpoint_path": "backbone_checkpoint", "extra_blocks": None}


def _check_backbone_kwargs(backbone_kwargs: dict) -> None:
    """ArgumentValueError (one line) for a ``backbone_kwargs`` key that :func:`create_segmenter` passes to
    :func:`create_backbone` itself (it would be a TypeError there), naming the argument to use instead."""
    for key, instead in _SET_BY_SEGMENTER.items():
        if key in backbone_kwargs:
            where = (f"give it as create_segmenter's {instead}= (segment's --{instead.replace('_', '-')})" if instead
                     else "the head takes the pyramid's levels only")
            raise ArgumentValueError(f"backbone_kwargs: {key}={backbone_kwargs[key]!r} is set by the segmenter: "
                                     f"{where}")


def complete_config(config: dict) -> dict:
    """A checkpoint's ``segmenter`` config with the keys added since checkpoints were first written set to the model
    a config without them stands for: ``backbone_kwargs`` none, ``aux_head`` False and, for ``fpn``, ``fpn_convs``
    False (checkpoints before 2026-12-07 had neither part). Two configs that complete to one dict are one model."""
    full = dict(config, backbone_kwargs=dict(config.get("backbone_kwargs") or {}),
                aux_head=bool(config.get("aux_head", False)))
    if full.get("head") == "fpn":
        full["fpn_convs"] = bool(config.get("fpn_convs", False))
    return full


def segmenter_from_config(config: dict) -> Segmenter:
    """The model a checkpoint's ``segmenter`` config describes, randomly initialised (load its state_dict next). A
    config without ``aux_head`` / ``fpn_convs`` (written before they existed) builds the model without them
    (:func:`complete_config`)."""
    full = complete_config(config)
    try:
        return create_segmenter(full["backbone"], full["num_classes"], head=full["head"],
                                head_channels=full["head_channels"], out_channels=full["out_channels"],
                                backbone_kwargs=full["backbone_kwargs"], aux_head=full["aux_head"],
                                fpn_convs=full.get("fpn_convs", False))
    except KeyError as e:
        raise SequencerError(f"the checkpoint's segmenter config lacks {e.args[0]!r}") from None
