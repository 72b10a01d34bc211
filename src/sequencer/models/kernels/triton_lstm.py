"""A fused LSTM recurrence in Triton, registered as the custom ops ``sequencer::lstm_scan`` (+ its backward).

The input projections of every direction are one GEMM done outside (:func:`lstm_layer`); the kernels run a block
of sequences through all time steps with h, c and W_hh held on chip and the gate nonlinearities fused. Backward is
one reverse-time kernel over the saved gates and cells (BPTT) plus GEMMs for the weight gradients.

The math is ``nn.LSTM``'s: gates in the order i, f, g, o; pre-activation ``x W_ih^T + b_ih + h W_hh^T + b_hh``;
``c' = f c + i g``; ``h' = o tanh(c')``; zero initial state; direction 1 of a bidirectional layer runs backwards.

Layouts: ``xp`` (B, S, T, D, 4H), any strides: B*S independent sequences of T steps, D directions; this lets one
projection of a (B, H, W, 4H*D*2) image serve both the columns and the rows as strided views, without copies.
Outputs are dense (B, S, T, D, H). Everything on chip is fp32; under ``TRITON_INTERPRET=1`` (CPU) the recurrent
matmul is done on fp32 operands, since the interpreter's ``tl.dot`` on bf16 operands is wrong.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _load_gate_weights(w_ptr, d, k, H, BLOCK_H: tl.constexpr, TRANSPOSE: tl.constexpr, UPCAST: tl.constexpr):
    """Gate k's block of W_hh[d] (4H, H) as a (BLOCK_H, BLOCK_H) tile: W_k^T (in, out) or W_k (out, in)."""
    rows = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_H)[None, :]
    mask = (rows < H) & (cols < H)
    base = w_ptr + d * 4 * H * H + k * H * H
    if TRANSPOSE:
        tile = tl.load(base + cols * H + rows, mask=mask, other=0.0)
    else:
        tile = tl.load(base + rows * H + cols, mask=mask, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _recurrent_matmul(a, w, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_N, BLOCK_H) fp32 @ a weight tile, accumulated in fp32."""
    if UPCAST:
        return tl.dot(a, w, input_precision=PRECISION)
    return tl.dot(a.to(w.dtype), w)


@triton.jit
def _lstm_fwd_kernel(xp_ptr, w_ptr, out_ptr, gates_ptr, cells_ptr, N, S, T, H, D,
                     sxb, sxs, sxt, sxd, sxg,
                     SAVE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    d = tl.program_id(1)
    seq = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col = tl.arange(0, BLOCK_H)
    mask = (seq < N)[:, None] & (col < H)[None, :]
    seq64 = seq.to(tl.int64)
    x_rows = (seq64 // S) * sxb + (seq64 % S) * sxs + d * sxd
    w_i = _load_gate_weights(w_ptr, d, 0, H, BLOCK_H, True, UPCAST)
    w_f = _load_gate_weights(w_ptr, d, 1, H, BLOCK_H, True, UPCAST)
    w_g = _load_gate_weights(w_ptr, d, 2, H, BLOCK_H, True, UPCAST)
    w_o = _load_gate_weights(w_ptr, d, 3, H, BLOCK_H, True, UPCAST)
    h = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    c = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    reverse = d % 2 == 1
    for step in range(T):
        t = tl.where(reverse, T - 1 - step, step)
        x_ptrs = xp_ptr + (x_rows + t * sxt)[:, None] + col[None, :] * sxg
        a_i = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32) + _recurrent_matmul(h, w_i, UPCAST, PRECISION)
        a_f = tl.load(x_ptrs + H * sxg, mask=mask, other=0.0).to(tl.float32) + _recurrent_matmul(h, w_f, UPCAST,
                                                                                                  PRECISION)
        a_g = tl.load(x_ptrs + 2 * H * sxg, mask=mask, other=0.0).to(tl.float32) + _recurrent_matmul(h, w_g, UPCAST,
                                                                                                      PRECISION)
        a_o = tl.load(x_ptrs + 3 * H * sxg, mask=mask, other=0.0).to(tl.float32) + _recurrent_matmul(h, w_o, UPCAST,
                                                                                                      PRECISION)
        i = tl.sigmoid(a_i)
        f = tl.sigmoid(a_f)
        g = _tanh(a_g)
        o = tl.sigmoid(a_o)
        c = f * c + i * g
        h = o * _tanh(c)
        cell = ((seq64 * T + t) * D + d)[:, None]  # dense (B, S, T, D, .) row of this step
        tl.store(out_ptr + cell * H + col[None, :], h.to(out_ptr.dtype.element_ty), mask=mask)
        if SAVE:
            gate_ptrs = gates_ptr + cell * 4 * H + col[None, :]
            tl.store(gate_ptrs, i, mask=mask)
            tl.store(gate_ptrs + H, f, mask=mask)
            tl.store(gate_ptrs + 2 * H, g, mask=mask)
            tl.store(gate_ptrs + 3 * H, o, mask=mask)
            tl.store(cells_ptr + cell * H + col[None, :], c, mask=mask)


@triton.jit
def _lstm_bwd_kernel(dout_ptr, gates_ptr, cells_ptr, w_ptr, dxp_ptr, N, T, H, D,
                     BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    d = tl.program_id(1)
    seq = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col = tl.arange(0, BLOCK_H)
    mask = (seq < N)[:, None] & (col < H)[None, :]
    seq64 = seq.to(tl.int64)
    w_i = _load_gate_weights(w_ptr, d, 0, H, BLOCK_H, False, UPCAST)
    w_f = _load_gate_weights(w_ptr, d, 1, H, BLOCK_H, False, UPCAST)
    w_g = _load_gate_weights(w_ptr, d, 2, H, BLOCK_H, False, UPCAST)
    w_o = _load_gate_weights(w_ptr, d, 3, H, BLOCK_H, False, UPCAST)
    dh_next = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)  # dL/dh through the recurrence
    dc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    reverse = d % 2 == 1
    for back in range(T):
        fwd_step = T - 1 - back  # this direction's forward steps, last first
        t = tl.where(reverse, T - 1 - fwd_step, fwd_step)
        t_prev = tl.where(reverse, t + 1, t - 1)
        cell = ((seq64 * T + t) * D + d)[:, None]
        cell_prev = ((seq64 * T + t_prev) * D + d)[:, None]
        gate_ptrs = gates_ptr + cell * 4 * H + col[None, :]
        i = tl.load(gate_ptrs, mask=mask, other=0.0)
        f = tl.load(gate_ptrs + H, mask=mask, other=0.0)
        g = tl.load(gate_ptrs + 2 * H, mask=mask, other=0.0)
        o = tl.load(gate_ptrs + 3 * H, mask=mask, other=0.0)
        c = tl.load(cells_ptr + cell * H + col[None, :], mask=mask, other=0.0)
        c_prev = tl.load(cells_ptr + cell_prev * H + col[None, :], mask=mask & (fwd_step > 0), other=0.0)
        dh = tl.load(dout_ptr + cell * H + col[None, :], mask=mask, other=0.0).to(tl.float32) + dh_next
        tanh_c = _tanh(c)
        dc = dc + dh * o * (1.0 - tanh_c * tanh_c)
        da_i = dc * g * i * (1.0 - i)
        da_f = dc * c_prev * f * (1.0 - f)
        da_g = dc * i * (1.0 - g * g)
        da_o = dh * tanh_c * o * (1.0 - o)
        dx_ptrs = dxp_ptr + cell * 4 * H + col[None, :]
        tl.store(dx_ptrs, da_i, mask=mask)
        tl.store(dx_ptrs + H, da_f, mask=mask)
        tl.store(dx_ptrs + 2 * H, da_g, mask=mask)
        tl.store(dx_ptrs + 3 * H, da_o, mask=mask)
        dh_next = (_recurrent_matmul(da_i, w_i, UPCAST, PRECISION) + _recurrent_matmul(da_f, w_f, UPCAST, PRECISION)
                   + _recurrent_matmul(da_g, w_g, UPCAST, PRECISION)
                   + _recurrent_matmul(da_o, w_o, UPCAST, PRECISION))
        dc = dc * f


def _launch_config(num_seqs: int, hidden: int, dtype: torch.dtype) -> dict:
    """Block sizes and the recurrent matmul's precision (``tl.dot`` needs every side >= 16)."""
    block_h = max(16, triton.next_power_of_2(hidden))
    # the interpreter pays per program, a GPU per register: bigger blocks there, smaller here
    block_n = min(128 if INTERPRETED else 32, max(16, triton.next_power_of_2(num_seqs)))
    upcast = INTERPRETED or dtype == torch.float32
    # four (BLOCK_H, BLOCK_H) weight tiles stay in registers: more warps to hold them at hidden 64-128 (untuned)
    return dict(BLOCK_N=block_n, BLOCK_H=block_h, UPCAST=upcast,
                PRECISION="ieee" if dtype == torch.float32 else "tf32", num_warps=8 if block_h >= 64 else 4)


@torch.library.triton_op("sequencer::lstm_scan", mutates_args=())
def lstm_scan(xp: torch.Tensor, w_hh: torch.Tensor, save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The recurrence over projected inputs. xp: (B, S, T, D, 4H) gate pre-activations with both biases added;
    w_hh: (D, 4H, H). Returns out (B, S, T, D, H) in xp's dtype and, with ``save``, the activated gates
    (B, S, T, D, 4H) and cells (B, S, T, D, H) in fp32 for backward (else empty)."""
    B, S, T, D, G = xp.shape
    H = G // 4
    out = xp.new_empty((B, S, T, D, H))
    gates = xp.new_empty((B, S, T, D, G) if save else (0,), dtype=torch.float32)
    cells = xp.new_empty((B, S, T, D, H) if save else (0,), dtype=torch.float32)
    num_seqs = B * S
    if out.numel() == 0:
        return out, gates, cells
    cfg = _launch_config(num_seqs, H, xp.dtype)
    grid = (triton.cdiv(num_seqs, cfg["BLOCK_N"]), D)
    torch.library.wrap_triton(_lstm_fwd_kernel)[grid](
        xp, w_hh.contiguous(), out, gates, cells, num_seqs, S, T, H, D, *xp.stride(), SAVE=save, **cfg)
    return out, gates, cells


@lstm_scan.register_fake
def _(xp, w_hh, save):
    B, S, T, D, G = xp.shape
    H = G // 4
    return (xp.new_empty((B, S, T, D, H)), xp.new_empty((B, S, T, D, G) if save else (0,), dtype=torch.float32),
            xp.new_empty((B, S, T, D, H) if save else (0,), dtype=torch.float32))


@torch.library.triton_op("sequencer::lstm_scan_backward", mutates_args=())
def lstm_scan_backward(grad_out: torch.Tensor, out: torch.Tensor, gates: torch.Tensor, cells: torch.Tensor,
                       w_hh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`lstm_scan` w.r.t. xp (B, S, T, D, 4H) and w_hh (D, 4H, H), from the saved tensors."""
    B, S, T, D, H = out.shape
    grad_xp = torch.empty((B, S, T, D, 4 * H), device=out.device, dtype=torch.float32)
    if out.numel() == 0:
        return grad_xp.to(out.dtype), torch.zeros_like(w_hh)
    cfg = _launch_config(B * S, H, out.dtype)
    grid = (triton.cdiv(B * S, cfg["BLOCK_N"]), D)
    torch.library.wrap_triton(_lstm_bwd_kernel)[grid](
        grad_out.contiguous(), gates, cells, w_hh.contiguous(), grad_xp, B * S, T, H, D, **cfg)
    # dL/dW_hh[d] = sum over steps of dgates_t^T h_{t-1}, h_{t-1} being the state this direction saw before step t
    h_prev = torch.zeros((B, S, T, D, H), device=out.device, dtype=torch.float32)
    h_prev[:, :, 1:, 0] = out[:, :, :-1, 0]
    if D == 2:
        h_prev[:, :, :-1, 1] = out[:, :, 1:, 1]
    grad_w = torch.einsum("ndg,ndh->dgh", grad_xp.reshape(-1, D, 4 * H), h_prev.reshape(-1, D, H))
    return grad_xp.to(out.dtype), grad_w.to(w_hh.dtype)


@lstm_scan_backward.register_fake
def _(grad_out, out, gates, cells, w_hh):
    B, S, T, D, H = out.shape
    return out.new_empty((B, S, T, D, 4 * H)), torch.empty_like(w_hh)


def _setup_context(ctx, inputs, output):
    xp, w_hh, save = inputs
    out, gates, cells = output
    ctx.mark_non_differentiable(gates, cells)
    ctx.save_for_backward(out, gates, cells, w_hh)


def _backward(ctx, grad_out, _grad_gates, _grad_cells):
    out, gates, cells, w_hh = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_xp, grad_w = lstm_scan_backward(grad_out, out, gates, cells, w_hh)
    return grad_xp, grad_w, None


lstm_scan.register_autograd(_backward, setup_context=_setup_context)


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
    return lstm_scan(xp, w_hh, save)[0]
