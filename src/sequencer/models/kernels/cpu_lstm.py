"""BiLSTM2D inference on the CPU without ATen's LSTM: one GEMM for the input projections, one batched scan.

oneDNN's LSTM primitive runs each direction of each axis as its own call and, on the Sequencer's shapes (hidden
48/96, T 14-32), reaches a small share of the CPU's GEMM rate (BENCHMARKS.md, "CPU recurrence"). Here:

1. all D input projections (about 80% of the multiply-adds; D = 4 for a bidirectional BiLSTM2D on a square
   grid) run as one GEMM on oneDNN with the biases folded in, straight from the (B, H, W, C) activations;
2. the projections are laid out time-major, one (D, N, 4Hd) block per step (backward directions time-reversed);
3. the D recurrences advance together: per time step one batched (D, N, Hd) x (D, Hd, 4Hd) GEMM added onto the
   projection, then the gates in place.

The ``g`` gate's weights and bias are doubled so that one ``sigmoid`` serves all four gates:
``tanh(z) = 2 * sigmoid(2z) - 1`` (doubling is exact in floating point). The cell state stays in float32 also for
bf16 weights. Only inference takes this path: when a gradient is needed the module's own kernels run.

The 1D Sequencer's LSTM over the raster of tokens runs here too (:func:`lstm1d`: its sequences are the rows of a
one-row grid). Selected with ``lstm_backend="cpu"`` (or ``SEQUENCER_LSTM_BACKEND=cpu``); ``auto`` keeps oneDNN's
LSTM, which on a Zen 5 CPU measured as fast or faster (BENCHMARKS.md, "CPU recurrence": it runs near the GEMM rate
at one thread, so taking the projections out of it gains nothing and the per-step ops and layout copies cost).
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import SequencerError
from .capture import plain_eager
from .onednn import autocast_applies_to, linear

_GATES = 4


def applies(rnns: list[nn.Module], backend: str, x: torch.Tensor) -> bool:
    """Whether BiLSTM2D's recurrent layers ``rnns`` run here for input ``x`` under ``backend``."""
    if backend != "cpu":  # "auto" keeps oneDNN's LSTM on the CPU: measured as fast (BENCHMARKS.md)
        return False
    if x.device.type != "cpu":
        raise SequencerError(f"lstm_backend 'cpu' needs CPU tensors, got {x.device.type}",
                             hint="use SEQUENCER_LSTM_BACKEND=native or auto on this device")
    if not plain_eager():  # (a torch.func transform may differentiate: no backward here)
        return False
    if not all(r.mode == "LSTM" and r.num_layers == 1 and not r.proj_size and r.batch_first for r in rnns):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for r in rnns for p in r.parameters())):
        return False  # no backward here: training keeps the module's own kernels
    return _compute_dtype(x, rnns[0].weight_ih_l0) in (torch.float32, torch.bfloat16)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """CPU autocast's dtype for a matmul of ``x`` and ``weight`` when autocast is on, else the weights' dtype.
    Autocast casts no float64 tensor: a ``.double()`` model stays float64 under it (and so takes ATen's LSTM)."""
    if autocast_applies_to(x, weight):
        return torch.get_autocast_dtype("cpu")
    return weight.dtype


def bilstm2d(rnn_v: nn.Module | None, rnn_h: nn.Module | None, x: torch.Tensor):
    """BiLSTM2D's recurrences. x: (B, H, W, C) -> columns (H, B, W, D*Hd) and rows (W, B, H, D*Hd) (None for an
    absent axis), the layouts of ``RNN2d._scan_axes``."""
    B, H, W, C = x.shape
    dtype = _compute_dtype(x, (rnn_v or rnn_h).weight_ih_l0)
    with torch.autocast("cpu", enabled=False):
        x = x.to(dtype).contiguous()
        axes = [(rnn, axis) for rnn, axis in ((rnn_v, "v"), (rnn_h, "h")) if rnn is not None]
        groups = [axes] if len(axes) == 2 and H == W else [[axis] for axis in axes]  # one scan needs one T
        outs = [out for group in groups for out in _scan_group(group, x)]
    v = outs.pop(0) if rnn_v is not None else None
    h = outs.pop(0) if rnn_h is not None else None
    return v, h


def lstm1d(rnn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One LSTM over batch-first sequences (the 1D Sequencer's, over a raster of tokens): x (N, T, C) ->
    (N, T, D*Hd), in (T, N, D*Hd) memory as ATen's LSTM gives it. The sequences are one row each of a (N, 1, T, C)
    grid scanned along its rows."""
    _, rows = bilstm2d(None, rnn, x.unsqueeze(1))  # (T, N, 1, D*Hd)
    return rows.squeeze(2).transpose(0, 1)


def _directions(rnn: nn.Module) -> list[str]:
    return ["", "_reverse"] if rnn.bidirectional else [""]


def _scan_group(axes: list[tuple[nn.Module, str]], x: torch.Tensor) -> list[torch.Tensor]:
    """Axes of equal length scanned together: [(rnn, "v" or "h")], x (B, H, W, C) -> [(T, B, S, D_axis*Hd)]."""
    w_ih, w_hh, bias = _stacked_weights([rnn for rnn, _ in axes], x.dtype)
    projected = linear(x, w_ih, bias)  # (B, H, W, D*4Hd): every direction's input projection in one GEMM
    D, gates = w_hh.shape[0], w_hh.shape[-1]
    time_major = [projected.permute(1, 0, 2, 3) if axis == "v" else projected.permute(2, 0, 1, 3)
                  for _, axis in axes]  # (T, B, S, D*4Hd)
    T, B, S, _ = time_major[0].shape
    steps = projected.new_empty((T, D, B, S, gates))  # what each direction reads at each of its steps
    reverse = torch.arange(T - 1, -1, -1)
    k = 0
    for (rnn, _), seq in zip(axes, time_major):
        for suffix in _directions(rnn):
            source = seq[..., k * gates:(k + 1) * gates]
            if suffix:  # backward directions read time reversed
                torch.index_select(source, 0, reverse, out=steps[:, k])
            else:
                steps[:, k].copy_(source)
            k += 1
    hidden = _scan(steps.view(T, D, B * S, gates), w_hh)  # (T, D, N, Hd)
    outs, k = [], 0
    for rnn, _ in axes:
        parts = [hidden[:, k + j].index_select(0, reverse) if suffix else hidden[:, k + j]
                 for j, suffix in enumerate(_directions(rnn))]
        k += len(parts)
        outs.append(torch.cat(parts, dim=-1).view(T, B, S, -1))
    return outs


def _stacked_weights(rnns: list[nn.Module], dtype: torch.dtype):
    """Every direction's weights, g-gate rows doubled: W_ih (D*4Hd, C), W_hh^T (D, Hd, 4Hd), bias (D*4Hd,)."""
    params = [(rnn, suffix) for rnn in rnns for suffix in _directions(rnn)]
    w_ih = torch.stack([getattr(r, f"weight_ih_l0{s}") for r, s in params])
    w_hh = torch.stack([getattr(r, f"weight_hh_l0{s}") for r, s in params])
    if rnns[0].bias:
        bias = torch.stack([getattr(r, f"bias_ih_l0{s}") + getattr(r, f"bias_hh_l0{s}") for r, s in params])
    else:
        bias = w_ih.new_zeros(w_ih.shape[:2])
    hidden = w_hh.shape[-1]
    scale = torch.ones(_GATES * hidden, dtype=w_ih.dtype)
    scale[2 * hidden:3 * hidden] = 2.0  # PyTorch's gate order is i, f, g, o
    w_ih, w_hh, bias = w_ih * scale[:, None], w_hh * scale[:, None], bias * scale
    return (w_ih.flatten(0, 1).to(dtype), w_hh.transpose(1, 2).to(dtype), bias.flatten().to(dtype))


def _scan(projected: torch.Tensor, w_hh: torch.Tensor) -> torch.Tensor:
    """D LSTMs stepped together from zero state. projected: (T, D, N, 4Hd), what each direction reads at each of
    its steps (input projections with biases, g-gate doubled), w_hh: (D, Hd, 4Hd) -> hidden states (T, D, N, Hd)."""
    T, D, N, _ = projected.shape
    hidden_size = w_hh.shape[1]
    out = projected.new_empty((T, D, N, hidden_size))
    cell = torch.zeros((D, N, hidden_size), dtype=torch.float32)
    tanh_cell = torch.empty_like(cell)
    h = None
    for t in range(T):
        gates = projected[t] if h is None else torch.baddbmm(projected[t], h, w_hh)
        gates.sigmoid_()
        i, f, g, o = gates.chunk(_GATES, dim=-1)
        # c = f * c + i * tanh(z_g), with tanh(z_g) = 2 * sigmoid(2 z_g) - 1
        cell.mul_(f).addcmul_(i, g, value=2.0).sub_(i)
        torch.tanh(cell, out=tanh_cell)
        h = torch.mul(o, tanh_cell, out=out[t])
    return out
