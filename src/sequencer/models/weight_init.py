"""The paper's weight initialisation for Sequencer models, by module type (see :func:`init_weights`)."""
from __future__ import annotations

from timm.layers import lecun_normal_
from torch import nn


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
