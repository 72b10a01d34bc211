"""A fused LSTM recurrence in Triton, registered as the custom ops ``sequencer::lstm_scan`` (+ its backward).

The input projections of every direction are one GEMM done outside (:func:`lstm_layer`); the kernels run a block
of sequences through all time steps with the gate nonlinearities fused, W_hh and the state held on chip where the
chip's shared memory allows, else read tile by tile each step. Backward is
one reverse-time kernel over the saved gates and cells (BPTT) plus GEMMs for the weight gradients.

The math is ``nn.LSTM``'s: gates in the order i, f, g, o; pre-activation ``x W_ih^T + b_ih + h W_hh^T + b_hh``;
``c' = f c + i g``; ``h' = o tanh(c')``; zero initial state; direction 1 of a bidirectional layer runs backwards.

Layouts: ``xp`` (B, S, T, D, 4H), any strides: B*S independent sequences of T steps, D directions; this lets one
projection of a (B, H, W, 4H*D*2) image serve both the columns and the rows as strided views, without copies.
Outputs are dense (B, S, T, D, H). The kernels (:mod:`.triton_lstm_kernels`) keep c, the gate math and every
accumulation in fp32; which of them runs, with which block sizes, is :mod:`.triton_lstm_config`'s choice for the
device's shared memory. Under ``TRITON_INTERPRET=1`` (CPU) the recurrent matmul is done on fp32 operands, since the
interpreter's ``tl.dot`` on bf16 operands is wrong.
"""
from __future__ import annotations

import logging
import os

import torch
import triton
from triton.runtime.errors import OutOfResources

from ...errors import SequencerError
from . import triton_lstm_config
from .code_key import KERNEL_CODE
from .triton_lstm_kernels import lstm_bwd_held, lstm_bwd_tiled, lstm_fwd_held, lstm_fwd_tiled

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# On a GPU the ops are ``triton_op``s, which torch.compile traces into and inductor launches itself. The interpreter's
# kernels cannot be traced (they read the tensors' data, which fake tensors have none of: compiled code failed with
# "Attempted to access the data pointer on an invalid python storage"), so there the ops are opaque custom ops: the
# compiled graph calls them, and their fake implementations stand in while it is traced.
_kernel_op = torch.library.custom_op if INTERPRETED else torch.library.triton_op
_log = logging.getLogger(__name__)


def _launch(direction: str, num_seqs: int, hidden: int, like: torch.Tensor, held, tiled) -> None:
    """Run ``held(config)`` or ``tiled(config)``, as :func:`.triton_lstm_config.choose_for` decides for ``like``'s
    device and dtype. Should a held kernel still not fit (Triton allocating more than the launcher predicts, e.g. a
    newer version), the tiled one runs instead: Triton refuses such a launch before it starts. In eager runs only:
    under ``torch.compile`` this body is traced, no kernel launches here, and inductor launches the choice itself."""
    config = triton_lstm_config.choose_for(direction, num_seqs, hidden, like.dtype, like.device, INTERPRETED)
    if config.kernel == "held":
        try:
            return held(config)
        except OutOfResources as error:
            _log.warning("Triton LSTM %s, hidden %d, %s: %s; running the tiled kernel", direction, hidden,
                         like.dtype, str(error).splitlines()[0])
            config = triton_lstm_config.choose_for(direction, num_seqs, hidden, like.dtype, like.device,
                                                   INTERPRETED, limit=0)
    tiled(config)


@_kernel_op("sequencer::lstm_scan", mutates_args=())
def lstm_scan(xp: torch.Tensor, w_hh: torch.Tensor, save: bool,
              kernel_code: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The recurrence over projected inputs. xp: (B, S, T, D, 4H) gate pre-activations with both biases added;
    w_hh: (D, 4H, H). Returns out (B, S, T, D, H) in xp's dtype and, with ``save``, the activated gates
    (B, S, T, D, 4H) and cells (B, S, T, D, H) in fp32 for backward (else empty). ``kernel_code``:
    :data:`.code_key.KERNEL_CODE`, for the compile caches' keys (unused here)."""
    B, S, T, D, G = xp.shape
    H = G // 4
    out = xp.new_empty((B, S, T, D, H))
    gates = xp.new_empty((B, S, T, D, G) if save else (0,), dtype=torch.float32)
    cells = xp.new_empty((B, S, T, D, H) if save else (0,), dtype=torch.float32)
    num_seqs = B * S
    if out.numel() == 0:
        return out, gates, cells
    head = (xp, w_hh.contiguous(), out, gates, cells)
    tail = (num_seqs, S, T, H, D, *xp.stride())

    def held(config):
        grid = (triton.cdiv(num_seqs, config.block_n), D)
        torch.library.wrap_triton(lstm_fwd_held)[grid](*head, *tail, SAVE=save, **config.launch_kwargs())

    def tiled(config):  # c between steps: in ``cells`` when saved, else in two slots per sequence
        grid = (triton.cdiv(num_seqs, config.block_n), D)
        state = xp.new_empty((0,) if save else (num_seqs, 2, D, H), dtype=torch.float32)
        torch.library.wrap_triton(lstm_fwd_tiled)[grid](*head, state, *tail, SAVE=save, **config.launch_kwargs())

    _launch("fwd", num_seqs, H, xp, held, tiled)
    return out, gates, cells


@lstm_scan.register_fake
def _(xp, w_hh, save, kernel_code):
    B, S, T, D, G = xp.shape
    H = G // 4
    return (xp.new_empty((B, S, T, D, H)), xp.new_empty((B, S, T, D, G) if save else (0,), dtype=torch.float32),
            xp.new_empty((B, S, T, D, H) if save else (0,), dtype=torch.float32))


@_kernel_op("sequencer::lstm_scan_backward", mutates_args=())
def lstm_scan_backward(grad_out: torch.Tensor, out: torch.Tensor, gates: torch.Tensor, cells: torch.Tensor,
                       w_hh: torch.Tensor, kernel_code: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`lstm_scan` w.r.t. xp (B, S, T, D, 4H) and w_hh (D, 4H, H), from the saved tensors
    (``kernel_code``: as :func:`lstm_scan`'s)."""
    B, S, T, D, H = out.shape
    grad_xp = torch.empty((B, S, T, D, 4 * H), device=out.device, dtype=torch.float32)
    if out.numel() == 0:
        return grad_xp.to(out.dtype), torch.zeros_like(w_hh)
    head = (grad_out.contiguous(), gates, cells, w_hh.contiguous(), grad_xp)

    def held(config):
        grid = (triton.cdiv(B * S, config.block_n), D)
        torch.library.wrap_triton(lstm_bwd_held)[grid](*head, B * S, T, H, D, **config.launch_kwargs())

    def tiled(config):  # dL/dc between steps in two slots per sequence
        grid = (triton.cdiv(B * S, config.block_n), D)
        state = out.new_empty((B * S, 2, D, H), dtype=torch.float32)
        torch.library.wrap_triton(lstm_bwd_tiled)[grid](*head, state, B * S, T, H, D, **config.launch_kwargs())

    _launch("bwd", B * S, H, out, held, tiled)
    # dL/dW_hh[d] = sum over steps of dgates_t^T h_{t-1}, h_{t-1} being the state this direction saw before step t
    # (the zero state before each direction's first step is written alone, not under a zero-filled buffer)
    h_prev = torch.empty((B, S, T, D, H), device=out.device, dtype=torch.float32)
    h_prev[:, :, 0, 0] = 0
    h_prev[:, :, 1:, 0] = out[:, :, :-1, 0]
    if D == 2:
        h_prev[:, :, -1, 1] = 0
        h_prev[:, :, :-1, 1] = out[:, :, 1:, 1]
    grad_w = torch.einsum("ndg,ndh->dgh", grad_xp.reshape(-1, D, 4 * H), h_prev.reshape(-1, D, H))
    return grad_xp.to(out.dtype), grad_w.to(w_hh.dtype)


@lstm_scan_backward.register_fake
def _(grad_out, out, gates, cells, w_hh, kernel_code):
    B, S, T, D, H = out.shape
    return out.new_empty((B, S, T, D, 4 * H)), torch.empty_like(w_hh)


def _setup_context(ctx, inputs, output):
    xp, w_hh, save, kernel_code = inputs
    out, gates, cells = output
    ctx.mark_non_differentiable(gates, cells)
    ctx.save_for_backward(out, gates, cells, w_hh)
    ctx.kernel_code = kernel_code


def _backward(ctx, grad_out, _grad_gates, _grad_cells):
    out, gates, cells, w_hh = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_xp, grad_w = lstm_scan_backward(grad_out, out, gates, cells, w_hh, ctx.kernel_code)
    return grad_xp, grad_w, None, None


lstm_scan.register_autograd(_backward, setup_context=_setup_context)


def _no_second_derivative(ctx, *grads):
    """A gradient of the gradient (``create_graph=True`` and a second backward, as a gradient penalty takes) is
    refused by name. No formula here could be right: the backward reads the forward's saved gates and cells, which
    carry no history. (Without this, torch's own error named the op and asked for an autograd formula.)"""
    raise SequencerError("lstm_backend 'triton' has no second derivative (a gradient of a gradient, as a gradient "
                         "penalty takes)", hint="use lstm_backend='native' for double backward")


lstm_scan_backward.register_autograd(_no_second_derivative)


def lstm_layer(x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One (bi)directional LSTM layer. x: (B, S, T, C) -> (B, S, T, D*H), D = w_hh.shape[0].

    w_ih: (D*4H, C) every direction's input weights stacked; w_hh: (D, 4H, H); bias: (D*4H,) = b_ih + b_hh.
    """
    D, G, H = w_hh.shape
    xp = torch.nn.functional.linear(x, w_ih, bias).unflatten(-1, (D, G))
    return recurrence(xp, w_hh).flatten(-2)


def recurrence(xp: torch.Tensor, w_hh: torch.Tensor) -> torch.Tensor:
    """:func:`lstm_scan` saving for backward only when a gradient will be asked. xp: (B, S, T, D, 4H)."""
    save = torch.is_grad_enabled() and (xp.requires_grad or w_hh.requires_grad)
    return lstm_scan(xp, w_hh, save, KERNEL_CODE)[0]
