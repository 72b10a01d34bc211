"""oneDNN paths for the CPU: matmuls (optionally with GELU fused) and the autograd Functions built on them.

Each path is the same math as the plain PyTorch ops it replaces and is taken only in eager CPU execution in the
weights' own dtype (see :func:`_onednn_linear_ok`); everywhere else the standard ops run.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .capture import plain_eager

_logger = logging.getLogger(__name__)


def _onednn_linear_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN's matmul can replace ``F.linear`` here with the same math.

    On this project's AMD CPUs oneDNN's fp32 GEMM is 5-20% faster than PyTorch's default (MKL) on the model's
    shapes (measured on 2 Zen 5 cores: 135-221 vs 132-192 GFLOP/s), and it can fuse GELU. The oneDNN path is taken
    only in plain eager CPU execution (:func:`.capture.plain_eager`) in the weights' own dtype: under autocast,
    tracing, scripting, ``torch.compile``, ONNX export or a ``torch.func`` transform the standard op is used, so
    exported and compiled graphs see ordinary ``aten.linear``.
    """
    return (plain_eager() and x.device.type == "cpu" and x.dtype == weight.dtype
            and (x.dtype == torch.float32 or x.dtype == torch.bfloat16 and onednn_bf16_supported())
            and x.dim() >= 2 and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu"))


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   gelu: bool = False) -> torch.Tensor:
    """oneDNN's ``x @ weight^T + bias`` (then exact GELU, fused, with ``gelu=True``). x: (..., in), weight: (out, in)
    dense (oneDNN's path for strided weights is ~100x slower).

    Where autograd records (a backward run with ``create_graph=True``: a gradient penalty, double backward) the plain
    ops run instead, so that the gradient of this gradient is computed: oneDNN's op has no autograd formula, and
    torch would treat it as a constant (second-order gradients silently wrong, with only a warning).
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        y = F.linear(x, weight, bias)
        return F.gelu(y) if gelu else y
    if gelu:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinearFunction(torch.autograd.Function):
    """``y = x @ W^T + b`` with forward and both backward matmuls on oneDNN. x: (..., in), W: (out, in)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        g2 = grad.reshape(-1, grad.shape[-1])  # (N, out)
        if ctx.needs_input_grad[0]:
            # dL/dx = g @ W: a linear with weight W^T (in, out). oneDNN needs it dense (strided weights take a
            # reference path that is ~100x slower); the copy is weight-sized, not activation-sized.
            grad_x = _onednn_linear(grad.contiguous(), weight.t().contiguous())
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(g2.t(), x.reshape(-1, x.shape[-1]))  # (out, in); oneDNN is no faster on this shape
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b


class _MixAxesFunction(torch.autograd.Function):
    """BiLSTM2D's mixing ``fc(cat(v, h))`` without the concatenation, on oneDNN: ``v @ Wv^T + b + h @ Wh^T``.

    v: (H, B, W, Dv) and h: (W, B, H, Dh), each in the layout its recurrence wrote; weight (C, Dv + Dh).
    Returns (B, H, W, C). Only the parameter itself is saved for backward (its halves are re-made there), so
    training holds no copies of weights.
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        d_v = v.shape[-1]
        w_v, w_h = weight[:, :d_v].contiguous(), weight[:, d_v:].contiguous()
        out_v = _onednn_linear(v, w_v, bias)  # (H, B, W, C)
        out_h = _onednn_linear(h, w_h)  # (W, B, H, C)
        H, B, W, C = out_v.shape
        out = out_v.new_empty((B, H, W, C))
        torch.add(out_v.permute(1, 0, 2, 3), out_h.permute(1, 2, 0, 3), out=out)
        ctx.save_for_backward(v, h, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        v, h, weight = ctx.saved_tensors
        d_v, C = v.shape[-1], weight.shape[0]
        g_v = grad.permute(1, 0, 2, 3).contiguous()  # (H, B, W, C)
        g_h = grad.permute(2, 0, 1, 3).contiguous()  # (W, B, H, C)
        grad_v = grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_v = _onednn_linear(g_v, weight[:, :d_v].t().contiguous())
        if ctx.needs_input_grad[1]:
            grad_h = _onednn_linear(g_h, weight[:, d_v:].t().contiguous())
        if ctx.needs_input_grad[2]:
            grad_w = torch.cat([g_v.reshape(-1, C).t() @ v.reshape(-1, d_v),
                                g_h.reshape(-1, C).t() @ h.reshape(-1, h.shape[-1])], dim=1)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = g_v.reshape(-1, C).sum(0)
        return grad_v, grad_h, grad_w, grad_b


class _OneDnnMlpFunction(torch.autograd.Function):
    """``fc2(gelu(fc1(x)))`` for training on oneDNN, keeping one hidden-sized activation instead of two.

    Autograd would save both the pre-activation (for GELU's gradient) and the activation (for fc2's weight
    gradient); this saves only the pre-activation and recomputes GELU in backward (the same numbers: GELU is
    elementwise and deterministic). The hidden layer is 3x the width, so this is most of an MLP's saved memory.
    x: (..., C), w1: (3C, C), w2: (C, 3C) -> (..., C).
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        y = _onednn_linear(x, w1, b1)
        out = _onednn_linear(F.gelu(y), w2, b2)
        ctx.save_for_backward(x, y, w1, w2)
        ctx.b1 = b1  # for a double backward only (below); a parameter (or autocast's copy of it), kept alive anyway
        ctx.has_bias = b1 is not None, b2 is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, y, w1, w2 = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True (double backward): the saved pre-activation has no history, so it is recomputed
            # from the inputs, and the gradients below (plain ops, see _onednn_linear) differentiate through it
            y = F.linear(x, w1, ctx.b1)
        grad = grad.contiguous()
        g_out = grad.reshape(-1, grad.shape[-1])  # (N, C)
        grad_x = grad_w1 = grad_b1 = grad_w2 = grad_b2 = None
        if ctx.needs_input_grad[3]:
            grad_w2 = torch.mm(g_out.t(), F.gelu(y).reshape(-1, y.shape[-1]))
        if ctx.has_bias[1] and ctx.needs_input_grad[4]:
            grad_b2 = g_out.sum(0)
        grad_y = torch.ops.aten.gelu_backward(_onednn_linear(grad, w2.t().contiguous()), y)
        g_y = grad_y.reshape(-1, grad_y.shape[-1])  # (N, 3C)
        if ctx.needs_input_grad[1]:
            grad_w1 = torch.mm(g_y.t(), x.reshape(-1, x.shape[-1]))
        if ctx.has_bias[0] and ctx.needs_input_grad[2]:
            grad_b1 = g_y.sum(0)
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad_y, w1.t().contiguous())
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def onednn_bf16_supported() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX-512 BF16 or AMX); without them its bf16 matmuls fail, and
    bf16 goes through PyTorch's own (slower, working) kernels instead."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def native_dtype(dtype: torch.dtype | None, device: torch.device | str, what: str,
                 notes: list[str] | None = None) -> torch.dtype | None:
    """``dtype``, except bfloat16 on a CPU without native bf16 kernels, which becomes float32 with a logged warning.

    Without AVX512-BF16 or AMX, PyTorch runs bf16 matmuls and LSTMs on its reference kernels, ~6x slower than fp32
    (BENCHMARKS.md, CPU deployment): asking for bf16 there is never what a user wants. ``what`` names the request in
    the note (e.g. "--amp-dtype bfloat16"); with ``notes``, the note is appended to it instead of logged.
    """
    if dtype != torch.bfloat16 or torch.device(device).type != "cpu" or onednn_bf16_supported():
        return dtype
    note = f"{what}: this CPU has no native bf16 kernels (no AVX512-BF16/AMX), running float32 instead"
    if notes is not None:
        notes.append(note)
    else:
        _logger.warning(f"note: {note}")
    return torch.float32


def _under_cpu_bf16_autocast(x: torch.Tensor) -> bool:
    """Whether CPU autocast to bf16 applies to ``x`` and oneDNN can serve it (its paths then make the casts).

    Never under ``torch.compile``: the oneDNN paths are eager-only (see :func:`_onednn_linear_ok`), and dynamo cannot
    trace the bf16-support query (a graph break, an error under ``fullgraph=True``).
    """
    if torch.compiler.is_compiling():
        return False
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
            and onednn_bf16_supported())


def autocast_applies_to(*tensors: torch.Tensor) -> bool:
    """Whether autocast is on for the device of ``tensors`` (the first's) and casts them: it casts no float64 tensor
    (ATen's rule), so a ``.double()`` model computes in float64 under it."""
    return (torch.is_autocast_enabled(tensors[0].device.type)
            and all(t.dtype != torch.float64 for t in tensors))


def _autocast_bf16_copies(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The bf16 casts autocast would make; differentiable, so fp32 weights still get fp32 gradients."""
    return [t.to(torch.bfloat16) if t is not None else None for t in tensors]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """``F.linear`` (optionally followed by exact GELU) routed through oneDNN where that is the same math.

    ``activation="gelu"`` fuses the GELU into the matmul when no gradient is needed (also under CPU bf16
    autocast, whose casts are then made here). (..., in) -> (..., out).
    """
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if not needs_grad and _under_cpu_bf16_autocast(x):
        # make autocast's casts here, so that GELU is fused into the matmul below also under autocast (the matmul's
        # and the activation's outputs never coexist: a third less peak memory in the MLP)
        with torch.autocast("cpu", enabled=False):
            return linear(*_autocast_bf16_copies(x, weight, bias), activation)
    if _onednn_linear_ok(x, weight):
        x, weight = x.contiguous(), weight.contiguous()
        if not needs_grad:
            return _onednn_linear(x, weight, bias, gelu=activation == "gelu")
        y = _OneDnnLinearFunction.apply(x, weight, bias)
    else:
        y = F.linear(x, weight, bias)
    return F.gelu(y) if activation == "gelu" else y
