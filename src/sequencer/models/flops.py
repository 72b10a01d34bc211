"""Analytic multiply-accumulate (MAC) counts for Sequencer models.

``count_macs`` runs one batch-1 forward with hooks that read the real tensor shapes at every ``nn.Conv2d``,
``nn.Linear`` and recurrent layer (``nn.LSTM``/``nn.GRU``/``nn.RNN``) and adds up their multiply-adds:

* Conv2d: ``out_elements * in_channels / groups * kh * kw``
* ConvTranspose2d (the detection backbone's pyramid): ``in_elements * out_channels / groups * kh * kw``
* Linear: ``tokens * in_features * out_features``
* RNN2d's mixing ``fc``: counted as a Linear on the block's tokens also when the fused forward applies its
  weight with functional ops instead of calling the module (so no Linear hook fires)
* RNN: per time step, per direction, per sequence and per layer ``gates * hidden * (input + hidden)`` (gates: 4 for
  LSTM, 3 for GRU, 1 for a plain RNN), i.e. the input and the recurrent matrix products.

Not counted (as in the paper's and ptflops' convention of counting only the matrix products): biases, norms,
activations, the element-wise gate math of the RNN cells (sigmoid/tanh, cell update), pooling, residual adds and
position embeddings. The count depends only on shapes, so the recurrent layers are replaced during the count by
stubs that return zeros of the right shape: this keeps the count fast on CPU and makes it work on a model built on
the ``meta`` device (``with torch.device("meta"): create_model(...)``), which skips weight init as well.
"""
from __future__ import annotations

import math
import types
from typing import Sequence

import torch
from torch import nn

from .caller_module import caller_module_kept
from .sequencer2d import Downsample2d, RNN2d

RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}  # by nn.RNNBase.mode


def _rnn_gates(module: nn.RNNBase) -> int:
    if module.mode not in RNN_GATES:
        raise TypeError(f"unsupported recurrent layer {type(module).__name__}")
    return RNN_GATES[module.mode]


def rnn_macs(module: nn.RNNBase, seq_len: int, num_seqs: int) -> int:
    """MACs of ``module`` over ``num_seqs`` sequences of ``seq_len`` steps (all layers and directions)."""
    gates = _rnn_gates(module)
    directions = 2 if module.bidirectional else 1
    total = 0
    input_size = module.input_size
    for _ in range(module.num_layers):
        total += gates * module.hidden_size * (input_size + module.hidden_size)
        input_size = module.hidden_size * directions  # deeper layers read both directions' outputs
    return total * directions * seq_len * num_seqs


def _shape_only_rnn_forward(module: nn.RNNBase, x: torch.Tensor, hx=None):
    """Stand-in for an RNN's forward that returns zeros of the real output shapes (nothing is computed)."""
    directions = 2 if module.bidirectional else 1
    if x.dim() == 2:  # unbatched (T, C)
        out = x.new_zeros(x.shape[0], directions * module.hidden_size)
        h = x.new_zeros(directions * module.num_layers, module.hidden_size)
    else:
        out = x.new_zeros(*x.shape[:2], directions * module.hidden_size)
        batch = x.shape[0] if module.batch_first else x.shape[1]
        h = x.new_zeros(directions * module.num_layers, batch, module.hidden_size)
    return out, ((h, h) if module.mode == "LSTM" else h)


def _functional_child(m: RNN2d | Downsample2d) -> nn.Module | None:
    return m.fc if isinstance(m, RNN2d) else m.down


def layer_macs(m: nn.Conv2d | nn.Linear, output: torch.Tensor) -> int:
    """Multiply-adds of a conv or linear layer that produced ``output``."""
    if isinstance(m, nn.Conv2d):
        return output.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    return output.numel() // m.out_features * m.in_features * m.out_features


def _sequence_shape(m: nn.RNNBase, x: torch.Tensor) -> tuple[int, int]:
    """(sequence length, number of sequences) of an RNN's input ``x``."""
    if x.dim() == 2:
        return x.shape[0], 1
    if m.batch_first:
        return x.shape[1], x.shape[0]
    return x.shape[0], x.shape[1]


def count_macs(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> int:
    """Multiply-adds of one forward pass of ``model`` on a single (C, H, W) image; see the module docstring.

    Works for models on any device, including ``meta``. The model's weights, forward and each submodule's mode
    are left unchanged.
    """
    counts: list[int] = []
    calls: dict[nn.Module, int] = {}
    calls_before: dict[nn.Module, int] = {}

    def layer_hook(m: nn.Conv2d | nn.Linear, inputs, output):
        calls[m] = calls.get(m, 0) + 1
        counts.append(layer_macs(m, output))

    def transposed_conv_hook(m: nn.ConvTranspose2d, inputs, output):  # each input element meets the whole kernel
        counts.append(inputs[0].numel() * (m.out_channels // m.groups) * math.prod(m.kernel_size))

    def rnn_hook(m: nn.RNNBase, inputs, output):
        counts.append(rnn_macs(m, *_sequence_shape(m, inputs[0])))

    # BiLSTM2D's mixing fc and a 1x1 downsample conv may run functionally on their weights, bypassing their own
    # hooks; their parent's output then has the layer's output size, so the parent counts them
    def parent_pre_hook(m: RNN2d | Downsample2d, inputs):
        calls_before[m] = calls.get(_functional_child(m), 0)

    def parent_hook(m: RNN2d | Downsample2d, inputs, output):
        child = _functional_child(m)
        if child is not None and calls.get(child, 0) == calls_before[m]:
            counts.append(layer_macs(child, output))

    handles, stubbed = [], []
    for m in model.modules():
        if isinstance(m, (RNN2d, Downsample2d)):
            handles.append(m.register_forward_pre_hook(parent_pre_hook))
            handles.append(m.register_forward_hook(parent_hook))
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(layer_hook))
        elif isinstance(m, nn.ConvTranspose2d):
            handles.append(m.register_forward_hook(transposed_conv_hook))
        elif isinstance(m, nn.RNNBase):
            _rnn_gates(m)  # fail early on an RNN type we cannot count
            handles.append(m.register_forward_hook(rnn_hook))
            stubbed.append((m, vars(m).get("forward")))  # a forward of the caller's own on the instance comes back
            m.forward = types.MethodType(_shape_only_rnn_forward, m)  # instance attribute shadows the class's
    param = next(model.parameters(), None)
    x = torch.zeros(1, *input_size, device=param.device if param is not None else "cpu",
                    dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32)
    try:
        with caller_module_kept(model, tensors=False):
            model.eval()
            with torch.no_grad():
                model(x)
    finally:
        for h in handles:
            h.remove()
        for m, own_forward in stubbed:
            if own_forward is None:
                del m.forward
            else:
                m.forward = own_forward
    return int(sum(counts))
