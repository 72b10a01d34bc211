"""A plain Sequencer written from the paper's definition on torch.nn.LSTM / GRU / RNN: the independent reference the
variant tests compare every execution path of ours with.

It reads nothing of our forward code: only the layer sizes of one of our models (to build the same layers) and
its ``state_dict`` (the same weights under the same names). Its forward is the authors' formulation, written out:
(B, H, W, C) tokens; the vertical RNN runs down each column, the horizontal one along each row; their outputs are
concatenated [vertical, horizontal] or added, or one axis alone is used; then the fusing linear layer (absent
without fc). The 1D models run one RNN over the H*W tokens in raster order, after adding the position embedding
(bicubically resized to another token grid). LayerNorm eps 1e-6, exact GELU, mean pooling, linear head.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from sequencer.models import get_model_entry

TORCH_RNNS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN_TANH": nn.RNN}

# one registered model per structural variant: the token mixer's cell, directions, union and fc, and the 1D models
# (the S/M/L, 392 px, 2x-hidden and wider-L models differ from sequencer2d_s only in depths and widths)
VARIANTS = ("sequencer2d_s", "sequencer2d_s_unidirectional", "sequencer2d_s_add", "sequencer2d_s_without_fc",
            "sequencer2d_vertical", "sequencer2d_s_horizontal", "gru_sequencer2d_s", "rnn_sequencer2d_s",
            "v_sequencer_s", "v_sequencer_s_h", "v_sequencer_s_pe")


def tiny_variant_kwargs(name: str, num_classes: int = 5, stages: int | None = None) -> dict:
    """The registered model's options at one block per stage and its widths scaled down to 16 channels at the first
    stage (every hidden-to-width ratio kept: the no-fc variants need theirs). Position embeddings for a 4x4 grid.
    ``stages``: keep only the first ones (compiling and exporting cost time per block)."""
    kwargs = get_model_entry(name).kwargs
    stages = stages or len(kwargs["layers"])
    scale = kwargs["embed_dims"][0] // 16
    tiny = dict(layers=(1,) * stages, embed_dims=tuple(d // scale for d in kwargs["embed_dims"][:stages]),
                hidden_sizes=tuple(h // scale for h in kwargs["hidden_sizes"][:stages]),
                patch_sizes=tuple(kwargs["patch_sizes"][:stages]), mlp_ratios=tuple(kwargs["mlp_ratios"][:stages]),
                num_classes=num_classes)
    if kwargs.get("ape"):
        tiny["img_size"] = 4 * kwargs["patch_sizes"][0]
    return tiny


def variant_input(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A non-square batch, sides 2 and 3 times the total patch reduction (2x3 tokens at the last stage, 4x6 at the
    first of the hierarchical models): rows and columns differ, so a swapped axis shows; for the position-embedding
    model the grid differs from its 4x4 embedding's, so the resize runs too."""
    reduction = math.prod(get_model_entry(name).kwargs["patch_sizes"])
    return torch.randn(batch, 3, 2 * reduction, 3 * reduction, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomized(model: nn.Module, seed: int = 1, scale: float = 0.1) -> nn.Module:
    """Every parameter perturbed (the zero head and biases too), so that each one moves the logits."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g).to(p) * scale)
    return model


def _torch_rnn(layer: nn.Module | None) -> nn.Module | None:
    if layer is None:
        return None
    return TORCH_RNNS[layer.mode](layer.input_size, layer.hidden_size, layer.num_layers, batch_first=True,
                                  bias=layer.bias, bidirectional=layer.bidirectional)


class _Mixer2d(nn.Module):
    def __init__(self, ours: nn.Module):
        super().__init__()
        self.union = ours.union
        self.rnn_v, self.rnn_h = _torch_rnn(ours.rnn_v), _torch_rnn(ours.rnn_h)
        self.fc = None if ours.fc is None else nn.Linear(ours.fc.in_features, ours.fc.out_features)

    def forward(self, x):
        B, H, W, C = x.shape
        v = h = None
        if self.rnn_v is not None:  # down each column
            v = self.rnn_v(x.permute(0, 2, 1, 3).reshape(B * W, H, C))[0].reshape(B, W, H, -1).permute(0, 2, 1, 3)
        if self.rnn_h is not None:  # along each row
            h = self.rnn_h(x.reshape(B * H, W, C))[0].reshape(B, H, W, -1)
        if v is not None and h is not None:
            x = torch.cat([v, h], dim=-1) if self.union == "cat" else v + h
        else:
            x = v if v is not None else h
        return x if self.fc is None else self.fc(x)


class _Mixer1d(nn.Module):
    def __init__(self, ours: nn.Module):
        super().__init__()
        self.rnn = _torch_rnn(ours.rnn)

    def forward(self, x):
        B, H, W, C = x.shape
        return self.rnn(x.reshape(B, H * W, C))[0].reshape(B, H, W, -1)


class _Block(nn.Module):
    def __init__(self, ours: nn.Module):
        super().__init__()
        dim, hidden = ours.mlp_channels.fc1.in_features, ours.mlp_channels.fc1.out_features
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.rnn_tokens = _Mixer1d(ours.rnn_tokens) if hasattr(ours.rnn_tokens, "rnn") else _Mixer2d(ours.rnn_tokens)
        self.mlp_channels = nn.Module()
        self.mlp_channels.fc1, self.mlp_channels.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.rnn_tokens(self.norm1(x))
        return x + self.mlp_channels.fc2(F.gelu(self.mlp_channels.fc1(self.norm2(x))))


def _conv_like(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride)


class PlainSequencer(nn.Module):
    """The reference for one of our Sequencer2d / VanillaSequencer models (same sizes, same weights, same names).

    ``forward`` (B, 3, H, W) -> logits (B, classes), or pooled features without a head;
    ``stage_maps`` -> the stages' (B, H_s, W_s, C_s) outputs and the final normed (B, H', W', C) features."""

    def __init__(self, ours: nn.Module):
        super().__init__()
        self.stem = nn.Module()
        self.stem.proj = _conv_like(ours.stem.proj)
        self.stages = nn.ModuleList()
        for stage in ours.stages:
            plain = nn.Module()
            plain.downsample = None
            if isinstance(stage.downsample, nn.Module) and hasattr(stage.downsample, "down"):
                plain.downsample = nn.Module()
                plain.downsample.down = _conv_like(stage.downsample.down)
            plain.blocks = nn.ModuleList(_Block(block) for block in stage.blocks)
            self.stages.append(plain)
        self.norm = nn.LayerNorm(ours.num_features, eps=1e-6)
        self.head = nn.Module()
        self.head.fc = nn.Linear(ours.num_features, ours.num_classes) if ours.num_classes else None
        self.absolute_pos_embed = None
        if getattr(ours, "absolute_pos_embed", None) is not None:
            self.absolute_pos_embed = nn.Parameter(torch.empty_like(ours.absolute_pos_embed))
        self.load_state_dict(ours.state_dict())

    def stage_maps(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = self.stem.proj(x).permute(0, 2, 3, 1)
        if self.absolute_pos_embed is not None:
            # timm's resample, as its ViTs run at another input size (bicubic, antialiased)
            pos = self.absolute_pos_embed.permute(0, 3, 1, 2)
            x = x + F.interpolate(pos, size=x.shape[1:3], mode="bicubic", align_corners=False,
                                  antialias=True).permute(0, 2, 3, 1)
        maps = []
        for stage in self.stages:
            if stage.downsample is not None:
                x = stage.downsample.down(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            for block in stage.blocks:
                x = block(x)
            maps.append(x)
        return maps, self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.stage_maps(x)[1].mean(dim=(1, 2))
        return pooled if self.head.fc is None else self.head.fc(pooled)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    expected = expected.detach().double()
    return ((actual.detach().double() - expected).abs().max() / expected.abs().max()).item()


def logits_and_grads(model: nn.Module, x: torch.Tensor, seed: int = 7):
    """A training step's numbers: logits, dL/dx and {parameter name: dL/dparameter} for L = <logits, fixed random>
    (names as the model's own, ``torch.compile``'s ``_orig_mod.`` prefix removed)."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x)
    (out.float() * torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))).sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def worst_grad_error(actual: dict, expected: dict) -> float:
    """The worst :func:`rel_err` over the parameters; every parameter of ``expected`` must have a gradient."""
    assert actual.keys() == expected.keys()
    return max(rel_err(actual[k], expected[k]) for k in expected)
