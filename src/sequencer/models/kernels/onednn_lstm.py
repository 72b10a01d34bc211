"""oneDNN's LSTM layer as a compile-friendly op pair whose backward reads the forward's workspace (CPU training).

Under ``torch.compile`` the recurrent layers are opaque custom ops (:mod:`.recurrence`). The general one,
``sequencer::rnn_native``, recomputes the layer in its backward: a whole LSTM forward more per training step, which
made compiled training on the CPU 0.87x eager (BENCHMARKS.md "Compiled vs eager"). Eager PyTorch avoids it on the
CPU: ATen's LSTM runs oneDNN one layer and direction at a time (``aten::mkldnn_rnn_layer``) and keeps oneDNN's
workspace (the gates of every step) for ``aten::mkldnn_rnn_layer_backward``. These ops do the same, with the
workspace as an output of the forward op, so that AOTAutograd saves it for the backward graph like any activation.

ATen's own decomposition of ``aten::lstm`` uses ``mkldnn_rnn_layer`` only in inference: compiled, the ATen op returns
no workspace (its kernel makes one only with grad mode on, and compiled forwards run with it off), and its meta
kernel gives it a made-up size. Here the forward turns grad mode on around the call, and the fake kernel learns the
size oneDNN gives by running the layer once on zeros of the same shapes (cached per shape); symbolic sizes are
specialized there (a graph per shape), since the size is no formula of them. The graph also holds a fingerprint of
this machine's workspace layout (:func:`_workspace_layout`, its size at a reference shape), so that inductor's cache
keeps apart machines whose oneDNN lays it out otherwise.

Taken by :func:`applies`: single-layer LSTMs on the CPU, in training, in a dtype oneDNN trains (float32, or
bfloat16 with AVX512-BF16/AMX): BiLSTM2D's layers. Everything else keeps ``rnn_native``. The workspace holds
uninitialised padding, so two runs' workspaces differ byte for byte while everything computed from them agrees.
"""
from __future__ import annotations

import functools
from typing import List

import torch
from torch.utils._python_dispatch import _disable_current_modes

from ...errors import SequencerError
from .capture import assume_constant_result
from .code_key import KERNEL_CODE
from .onednn import onednn_bf16_supported

LSTM_MODE = 2  # oneDNN's (ideep's) rnn_kind for an LSTM
OUTPUTS_PER_DIRECTION = 4  # output (T, N, H), final h (1, N, H), final c (1, N, H), workspace (bytes,)


def applies(rnn: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``rnn`` over ``x`` (N, T, C) runs these ops under compile, computing in ``dtype``."""
    if rnn.mode != "LSTM" or rnn.num_layers != 1 or rnn.proj_size or not rnn.batch_first or x.device.type != "cpu":
        return False
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in rnn.parameters()))
    return needs_grad and trains_in(dtype)


@assume_constant_result
def trains_in(dtype: torch.dtype) -> bool:
    """Whether oneDNN's LSTM trains in ``dtype`` here: where ATen's eager LSTM would take it."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    return dtype == torch.float32 or dtype == torch.bfloat16 and onednn_bf16_supported()


def lstm(x: torch.Tensor, weights: list[torch.Tensor], bidirectional: bool, has_biases: bool,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """One LSTM layer, batch first: x (N, T, C) -> (N, T, D*H), in (T, N, D*H) memory as ATen's LSTM gives it.
    ``dtype``: the one it computes in, where autocast casts (default: x's)."""
    layout = _workspace_layout(weights[0].shape[1], weights[1].shape[1], dtype or x.dtype, has_biases)
    outputs = onednn_lstm(x, weights, bidirectional, has_biases, layout, KERNEL_CODE)
    return torch.cat(outputs[::OUTPUTS_PER_DIRECTION], dim=-1).transpose(0, 1)


@assume_constant_result  # run while tracing: a constant of the graph
def _workspace_layout(channels: int, hidden: int, dtype: torch.dtype, has_biases: bool) -> int:
    """A number that tells this machine's oneDNN workspace layout for such a layer: its size at a small reference
    shape (T=3, N=5). The op takes it as an argument so that the traced graph holds it: inductor's graph cache,
    which knows nothing of the sizes the fake kernel learnt, then keys on it, and a graph compiled on a machine
    whose oneDNN lays the workspace out otherwise is refused in one line (:func:`_check_layout`)."""
    return _workspace_bytes(3, 5, channels, hidden, dtype, has_biases)


def _check_layout(layout: int, x: torch.Tensor, weights: list[torch.Tensor], has_biases: bool) -> None:
    here = _workspace_bytes(3, 5, weights[0].shape[1], weights[1].shape[1], x.dtype, has_biases)
    if layout != here:
        raise SequencerError(f"this graph was compiled where oneDNN lays out the LSTM workspace otherwise (reference "
                             f"size {layout} bytes, here {here}): it came from another machine's inductor cache",
                             hint="clear the shared cache (TORCHINDUCTOR_CACHE_DIR) or give this machine its own")


def _direction_weights(weights: list[torch.Tensor], direction: int, has_biases: bool) -> list[torch.Tensor]:
    """W_ih (4H, C), W_hh (4H, H), b_ih (4H,), b_hh (4H,) of one direction; zero biases where the layer has none."""
    per = 4 if has_biases else 2
    w_ih, w_hh, *biases = weights[per * direction:per * (direction + 1)]
    if not has_biases:
        biases = [w_ih.new_zeros(w_ih.shape[0]), w_ih.new_zeros(w_ih.shape[0])]
    return [w_ih, w_hh, *biases]


def _layer(x_tnc: torch.Tensor, weights: list[torch.Tensor], reverse: bool, has_biases: bool):
    """``aten::mkldnn_rnn_layer`` over sequence-first x (T, N, C), zero initial state, keeping the workspace."""
    hidden = weights[1].shape[1]
    state = x_tnc.new_zeros(1, x_tnc.shape[1], hidden)
    with torch.enable_grad():  # oneDNN's kernel writes its workspace only with grad mode on
        return torch.ops.aten.mkldnn_rnn_layer(x_tnc, *weights, state, state, reverse, [], LSTM_MODE, hidden, 1,
                                               has_biases, False, False, True)


@torch.library.custom_op("sequencer::onednn_lstm", mutates_args=())
def onednn_lstm(x: torch.Tensor, weights: List[torch.Tensor], bidirectional: bool, has_biases: bool,
                layout: int, kernel_code: str) -> List[torch.Tensor]:
    """x: (N, T, C) -> per direction [output (T, N, H), h_T (1, N, H), c_T (1, N, H), workspace (bytes,)];
    ``layout``: :func:`_workspace_layout` where the graph was compiled; ``kernel_code``: :data:`.code_key.KERNEL_CODE`,
    for the compile caches' keys (unused here)."""
    _check_layout(layout, x, weights, has_biases)
    x_tnc = x.transpose(0, 1).contiguous()
    outputs = []
    for direction in range(2 if bidirectional else 1):
        outputs += _layer(x_tnc, _direction_weights(weights, direction, has_biases), direction == 1, has_biases)
    return outputs


@onednn_lstm.register_fake
def _(x, weights, bidirectional, has_biases, layout, kernel_code):
    # oneDNN sizes the workspace itself (page-rounded, no formula of the shapes), so symbolic sizes are specialized
    # here (guard_int: a guard on their values, one graph per batch and image size). A size left unknown to the graph
    # (new_dynamic_size) made dynamo break the graph at every layer, and each piece after a break took fresh symbolic
    # sizes, which inductor cannot lower in training (see sequencer2d.specialize_image_size); it also measured 8-10%
    # slower compiled training where the sizes were static (sequencer2d_s bf16, A/B in one session).
    from torch.fx.experimental.symbolic_shapes import guard_int  # sympy's import: here, under a tracer, not at ours
    n, t, c = (guard_int(size) for size in x.shape)
    hidden = weights[1].shape[1]
    workspace = _workspace_bytes(t, n, c, hidden, x.dtype, has_biases)
    outputs = []
    for _direction in range(2 if bidirectional else 1):
        outputs += [x.new_empty(t, n, hidden), x.new_empty(1, n, hidden), x.new_empty(1, n, hidden),
                    x.new_empty(workspace, dtype=torch.uint8)]
    return outputs


@functools.lru_cache(maxsize=256)
def _workspace_bytes(t: int, n: int, c: int, hidden: int, dtype: torch.dtype, has_biases: bool) -> int:
    """The size oneDNN gives the workspace of a layer of these shapes: it sizes it itself, so ask it, once."""
    with _disable_current_modes():  # real tensors, even inside the tracer's fake mode
        x = torch.zeros(t, n, c, dtype=dtype)
        weights = [torch.zeros(4 * hidden, c, dtype=dtype), torch.zeros(4 * hidden, hidden, dtype=dtype)]
        weights += [torch.zeros(4 * hidden, dtype=dtype)] * 2
        return _layer(x, weights, False, has_biases)[3].numel()


@torch.library.custom_op("sequencer::onednn_lstm_backward", mutates_args=())
def onednn_lstm_backward(grads: List[torch.Tensor], x: torch.Tensor, weights: List[torch.Tensor],
                         saved: List[torch.Tensor], bidirectional: bool, has_biases: bool,
                         kernel_code: str) -> List[torch.Tensor]:
    """[dL/dx (N, T, C) in (T, N, C) memory, dL/dw for each weight] of :func:`onednn_lstm`, from each direction's
    dL/d(output) ``grads`` (T, N, H) and the forward's outputs ``saved``; oneDNN's backward reads the workspace, so
    nothing is recomputed. ``kernel_code``: as :func:`onednn_lstm`'s.

    oneDNN also writes scratch into a part of the workspace that no result reads (a second backward from the same
    workspace gives the same gradients, bit for bit). ATen's schema for ``mkldnn_rnn_layer_backward`` declares the
    workspace unmutated, as this op's does: a copy to keep it byte-identical would cost more than the backward's
    arithmetic (53 MB per direction at Sequencer2D-S stage 1, batch 8: 16 ms to copy, 28 ms to compute).
    """
    x_tnc = x.transpose(0, 1).contiguous()
    hidden = weights[1].shape[1]
    state = x_tnc.new_zeros(1, x_tnc.shape[1], hidden)
    grad_x, grad_weights = None, []
    for direction in range(2 if bidirectional else 1):
        output, h_last, c_last, workspace = saved[OUTPUTS_PER_DIRECTION * direction:][:OUTPUTS_PER_DIRECTION]
        layer_grads = torch.ops.aten.mkldnn_rnn_layer_backward(
            x_tnc, *_direction_weights(weights, direction, has_biases), state, state, output, h_last, c_last,
            grads[direction].contiguous(), None, None, direction == 1, LSTM_MODE, hidden, 1, has_biases, True, False,
            [], False, workspace)
        # oneDNN gives bfloat16 layers float32 gradients, which eager autograd rounds to the inputs' dtype: so here
        # (compiled and eager training then agree bit for bit, and the fake kernel's dtypes hold)
        layer_grads = [g.to(x.dtype) for g in layer_grads]
        grad_x = layer_grads[0] if grad_x is None else grad_x + layer_grads[0]
        # ATen hands out one tensor for both biases' gradients; an op's outputs may not alias each other
        grad_weights += layer_grads[1:3] + ([layer_grads[3], layer_grads[4].clone()] if has_biases else [])
    return [grad_x.transpose(0, 1)] + grad_weights


@onednn_lstm_backward.register_fake
def _(grads, x, weights, saved, bidirectional, has_biases, kernel_code):
    n, t, c = x.shape
    return [x.new_empty(t, n, c).transpose(0, 1)] + [w.new_empty(w.shape) for w in weights]


def _save_for_backward(ctx, inputs, output):
    x, weights, bidirectional, has_biases, _layout, kernel_code = inputs
    ctx.save_for_backward(x, *weights, *output)
    ctx.weight_count = len(weights)
    ctx.config = (bidirectional, has_biases, kernel_code)


def _grads(ctx, output_grads):
    x, *rest = ctx.saved_tensors
    weights, saved = rest[:ctx.weight_count], rest[ctx.weight_count:]
    # only the outputs' gradients matter: h_T, c_T and the workspace are never used downstream (lstm() drops them)
    grad_x, *grad_weights = onednn_lstm_backward(list(output_grads[::OUTPUTS_PER_DIRECTION]), x, list(weights),
                                                 list(saved), *ctx.config)
    return grad_x, grad_weights, None, None, None, None


onednn_lstm.register_autograd(_grads, setup_context=_save_for_backward)
