"""The paper's weight initialisation for Sequencer models, by module type (see :func:`init_weights`)."""
from __future__ import annotations

import math

import torch
from torch import nn

_CUT = 2.0  # LeCun-normal's truncation, in standard deviations


def _normal_cdf(z: float) -> float:
    return (1 + math.erf(z / math.sqrt(2))) / 2


# the standard deviation of a unit normal cut to [-2, 2]: the root of 1 - 2 * 2 * pdf(2) / (cdf(2) - cdf(-2))
_CUT_NORMAL_STD = math.sqrt(1 - 2 * _CUT * math.exp(-_CUT ** 2 / 2) / math.sqrt(2 * math.pi)
                            / (_normal_cdf(_CUT) - _normal_cdf(-_CUT)))


def lecun_normal_(weight: torch.Tensor) -> None:
    """LeCun-normal in place: a normal cut at two standard deviations, scaled to variance 1 / fan-in.

    Drawn by inverting the CDF (uniform over the cut's share of erf's range, then erfinv), as timm's
    ``lecun_normal_`` draws it: the same weights from the same seed on every torch (torch 2.14's own ``trunc_normal_``
    rejection-samples, other draws). Owned here so that building a model imports no timm.
    """
    fan_in = weight[0].numel()  # (out, in, *kernel): what one output unit sums over
    with torch.no_grad():
        weight.uniform_(2 * _normal_cdf(-_CUT) - 1, 2 * _normal_cdf(_CUT) - 1)
        weight.erfinv_().mul_(math.sqrt(2)).clamp_(-_CUT, _CUT)
        weight.mul_(math.sqrt(1 / fan_in) / _CUT_NORMAL_STD)


def _init_linear(module: nn.Linear, name: str, head_bias: float) -> None:
    if name.startswith("head"):  # a zero head: every class starts equally likely
        nn.init.zeros_(module.weight)
        nn.init.constant_(module.bias, head_bias)
        return
    nn.init.xavier_uniform_(module.weight)
    if module.bias is not None:
        # the MLPs' biases get a tiny spread rather than exact zeros, as the paper's code (via timm) does
        nn.init.normal_(module.bias, std=1e-6) if "mlp" in name else nn.init.zeros_(module.bias)


def _init_conv(module: nn.Conv2d, name: str, head_bias: float) -> None:
    lecun_normal_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def _init_layer_norm(module: nn.LayerNorm, name: str, head_bias: float) -> None:
    nn.init.ones_(module.weight)
    nn.init.zeros_(module.bias)


def _init_rnn(module: nn.RNNBase, name: str, head_bias: float) -> None:
    bound = module.hidden_size ** -0.5  # PyTorch's own RNN default, restated after the other inits
    for weight in module.parameters():
        nn.init.uniform_(weight, -bound, bound)


# the paper's initialisation, by module type: xavier-uniform linears, LeCun-normal convs, unit LayerNorms,
# RNN weights uniform in +-1/sqrt(hidden), and a zero head (bias -log(classes) with ``nlhb``)
_INITIALISERS = ((nn.Linear, _init_linear), (nn.Conv2d, _init_conv), (nn.LayerNorm, _init_layer_norm),
                 (nn.RNNBase, _init_rnn))


def init_weights(root: nn.Module, prefix: str = "", head_bias: float = 0.0) -> None:
    """Initialise every module under ``root`` (names relative to the model, hence ``prefix`` for a sub-tree)."""
    for name, module in root.named_modules(prefix=prefix):
        for kind, initialise in _INITIALISERS:
            if isinstance(module, kind):
                initialise(module, name, head_bias)
                break
