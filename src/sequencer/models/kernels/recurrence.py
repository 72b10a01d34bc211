"""Running the token mixers' recurrent layers: backend choice, the fused-Triton LSTM, and a compile-friendly ATen op.

Backends (model kwarg ``lstm_backend``, else the environment variable ``SEQUENCER_LSTM_BACKEND``):

* ``native``: the ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` module's own kernels (cuDNN, oneDNN, ATen).
* ``triton``: LSTMs run :mod:`.triton_lstm` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``); ATen's LSTM is
  never called. GRU/RNN layers stay native. It computes in float32 at most: float64 is refused.
* ``cpu``: BiLSTM2D's LSTMs (and the 1D Sequencer's) run :mod:`.cpu_lstm` (one GEMM for all directions' input
  projections, one batched scan) in CPU inference; where a gradient is needed, or for GRU/RNN/multi-layer LSTMs,
  the ``native`` kernels run.
* ``auto`` (default): decided per call by :func:`auto_takes_triton`, from measurements (BENCHMARKS.md "GPU"):
  ``triton`` for LSTM inference in bf16/fp16 on the GPUs where it was measured faster than cuDNN, else ``native``
  (cuDNN for GPU training, where Triton's backward measured slower; on a Zen 5 CPU oneDNN's LSTM measured as fast as
  or faster than ``cpu``, BENCHMARKS.md "CPU recurrence").

Under ``torch.compile`` the native layers run as the opaque custom op ``sequencer::rnn_native`` (dynamo cannot trace
``nn.LSTM`` and would break the graph at each one); its backward recomputes the layer. CPU training of single-layer
LSTMs (BiLSTM2D's) takes :mod:`.onednn_lstm` instead, whose backward reads oneDNN's saved workspace, as eager does.
Under autocast the ops cast as ATen's autocast casts ``nn.LSTM`` and ``nn.RNN``, and run a CPU GRU's steps under
autocast as ATen's GRU does (:func:`autocast_rnn_dtype`), so compiled and eager mixed precision compute the same.
TorchScript, ONNX export and ``torch.export`` (:func:`exporting`) always take the module itself, so the program they
capture holds ATen's own recurrent ops, which their runtimes know. Every op call carries a fingerprint of this
package's kernel sources (:mod:`.code_key`), so that inductor's on-disk caches recompile after they change.
"""
from __future__ import annotations

import contextlib
import os
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ArgumentValueError, SequencerError

from . import onednn_lstm
from .onednn import autocast_applies_to, onednn_bf16_supported
from .capture import assume_constant_result, exporting, forward_ad_active, hooked
from .code_key import KERNEL_CODE

_UNLOADED = object()


def _triton_lstm():
    """:mod:`.triton_lstm` (which registers the ``sequencer::lstm_scan`` ops), imported on the first ask; None without
    Triton, where only the native backends exist. Its import takes Triton and ``torch._inductor`` (a second or more),
    which building a model, or running one on the CPU, never needs. Held as this module's ``triton_lstm``."""
    module = globals().get("triton_lstm", _UNLOADED)
    if module is _UNLOADED:
        try:
            from . import triton_lstm as module
        except ImportError:
            module = None
        globals()["triton_lstm"] = module
    return module


@assume_constant_result  # under dynamo: asked eagerly, a constant of the graph
def triton_installed() -> bool:
    """Whether the Triton backend exists here (imports it on the first ask)."""
    return _triton_lstm() is not None


def __getattr__(name: str):
    if name == "triton_lstm":  # the module or None, imported on first use (:func:`_triton_lstm`)
        return _triton_lstm()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

BACKENDS = ("auto", "triton", "native", "cpu")
BACKEND_ENV = "SEQUENCER_LSTM_BACKEND"
_VF_MODES = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn"}


# The layers below are torch's nn.LSTM / nn.GRU / nn.RNN (tanh) in every respect but their class: same parameters,
# state_dict, initialisation and forward (torch's own, borrowed). dynamo refuses to trace anything that is an
# instance of torch's three classes (a graph break at every layer), and :func:`run_rnn` needs only the weights.
class LSTM(nn.RNNBase):
    """``nn.LSTM(input_size, hidden_size, num_layers, ...)``; see the note above."""

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden
    forward = nn.LSTM.forward


class GRU(nn.RNNBase):
    """``nn.GRU(input_size, hidden_size, num_layers, ...)``; see the note above."""

    def __init__(self, *args, **kwargs):
        super().__init__("GRU", *args, **kwargs)

    forward = nn.GRU.forward


class RNN(nn.RNNBase):
    """``nn.RNN(input_size, hidden_size, num_layers, ...)`` with tanh; see the note above."""

    def __init__(self, *args, **kwargs):
        super().__init__("RNN_TANH", *args, **kwargs)

    forward = nn.RNN.forward


RNN_TYPES = {"lstm": LSTM, "gru": GRU, "rnn": RNN}


def resolve_backend(requested: str | None = None) -> str:
    """``requested`` (a model kwarg) or else ``$SEQUENCER_LSTM_BACKEND`` or else "auto", checked."""
    name = requested if requested is not None else os.environ.get(BACKEND_ENV, "auto")
    if name not in BACKENDS:
        source = "lstm_backend" if requested is not None else BACKEND_ENV
        raise ArgumentValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


# Where ``auto`` takes the Triton kernel: CUDA compute capabilities on which it was measured faster than cuDNN, and
# for what. Measured on an H100 80GB (sm_90; torch 2.11.0+cu130, Triton 3.6.0, cuDNN 9.19, the project at 97f2861;
# BENCHMARKS.md "GPU"), bf16 autocast, sequencer2d_s's mixer: inference 2.02x cuDNN at hidden 48, 2.67x at hidden
# 96; forward+backward 0.70x (hidden 48) and out of shared memory (hidden 96), so training stays on cuDNN; fp32
# hidden 96 ran out of shared memory too. fp16 was not timed: it has bf16's element width (same tiles, same traffic)
# and measured far more accurate than cuDNN's (top-1 agreement with fp32 100% vs 90.6%). Other chips, hidden sizes
# above 96 (the 2x-hidden ablation) and training keep cuDNN until a GPU session measures them.
AUTO_TRITON_MEASURED = {"capabilities": {(9, 0)}, "dtypes": {torch.bfloat16, torch.float16}, "max_hidden": 96}


def auto_takes_triton(rnn: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``auto`` runs ``rnn`` on the Triton kernel for input ``x``: where it was measured faster (above)."""
    if (rnn.mode != "LSTM" or x.device.type != "cuda" or not triton_installed() or torch.version.hip is not None
            or rnn.proj_size or not rnn.batch_first or (rnn.dropout and rnn.training)):
        return False
    if exporting() or forward_ad_active():  # (the kernel has no forward derivative)
        return False
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in rnn.parameters()))
    return (not needs_grad and rnn.hidden_size <= AUTO_TRITON_MEASURED["max_hidden"]
            and compute_dtype(x, rnn.weight_ih_l0) in AUTO_TRITON_MEASURED["dtypes"]
            and _device_capability(x.device.index) in AUTO_TRITON_MEASURED["capabilities"])


@assume_constant_result
def _device_capability(index: int | None) -> tuple[int, int]:
    """The CUDA device's compute capability, a constant to dynamo (the device does not change under a graph)."""
    return torch.cuda.get_device_capability(index)


def uses_fused_lstm(rnn: nn.Module, backend: str, x: torch.Tensor) -> bool:
    """Whether ``rnn`` runs the Triton kernel for input ``x`` under ``backend``."""
    if backend == "auto":
        return auto_takes_triton(rnn, x)
    if backend != "triton" or rnn.mode != "LSTM":
        return False
    if exporting():
        return False
    if not triton_installed():
        raise SequencerError("lstm_backend 'triton' needs the triton package", hint="pip install triton")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise SequencerError(f"lstm_backend 'triton' needs a CUDA device or TRITON_INTERPRET=1, got "
                             f"{x.device.type} tensors", hint=f"use {BACKEND_ENV}=native on this device")
    if rnn.proj_size or (rnn.dropout and rnn.training) or not rnn.batch_first:
        raise SequencerError("lstm_backend 'triton' supports batch_first LSTMs without proj_size or dropout")
    if compute_dtype(x, rnn.weight_ih_l0) == torch.float64:  # its kernels compute in float32: no silent downcast
        raise SequencerError("lstm_backend 'triton' computes in float32 at most, not in this model's float64",
                             hint="use lstm_backend='native' (or 'auto') for float64")
    return True


def lstm_weights(rnn: nn.LSTM, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's parameters in the fused kernel's form: W_ih (D*4H, C), W_hh (D, 4H, H), bias (D*4H,) or None.

    Built from the module's own parameters (differentiable), so the state_dict is nn.LSTM's.
    """
    suffixes = ("", "_reverse") if rnn.bidirectional else ("",)
    names = [f"l{layer}{s}" for s in suffixes]
    w_ih = torch.cat([getattr(rnn, f"weight_ih_{n}") for n in names]).to(dtype)
    w_hh = torch.stack([getattr(rnn, f"weight_hh_{n}") for n in names]).to(dtype)
    bias = None
    if rnn.bias:
        bias = torch.cat([getattr(rnn, f"bias_ih_{n}") + getattr(rnn, f"bias_hh_{n}") for n in names]).to(dtype)
    return w_ih, w_hh, bias


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype autocast would give a matmul of ``x`` and ``weight`` (else the input's). Autocast casts no float64
    tensor (ATen's rule): a ``.double()`` model under autocast computes in float64."""
    if autocast_applies_to(x):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def fused_lstm(rnn: nn.LSTM, x: torch.Tensor) -> torch.Tensor:
    """All layers of ``rnn`` on the Triton kernel. x: (B, S, T, C), B*S sequences of T steps -> (B, S, T, D*H)."""
    from . import triton_lstm  # imported already: uses_fused_lstm asked triton_installed()
    dtype = compute_dtype(x, rnn.weight_ih_l0)
    x = x.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        for layer in range(rnn.num_layers):
            x = triton_lstm.lstm_layer(x, *lstm_weights(rnn, layer, dtype))
    return x


def fused_bilstm2d(rnn_v: nn.LSTM | None, rnn_h: nn.LSTM | None, x: torch.Tensor):
    """BiLSTM2D's two axes on the Triton kernel, with one GEMM for every direction's input projection.

    x: (B, H, W, C). Returns the columns' output (H, B, W, D*Hd) and the rows' (W, B, H, D*Hd) (None for an absent
    axis), the layouts of :meth:`RNN2d.forward`'s native path, as views of dense (B, W, H, .) / (B, H, W, .).
    """
    if any(r is not None and r.num_layers > 1 for r in (rnn_v, rnn_h)):
        # deeper layers read the previous layer's output, so the axes share no projection
        v = fused_lstm(rnn_v, x.transpose(1, 2)) if rnn_v is not None else None
        h = fused_lstm(rnn_h, x) if rnn_h is not None else None
    else:
        v, h = _one_layer_bilstm2d(rnn_v, rnn_h, x)
    return (v.permute(2, 0, 1, 3) if v is not None else None, h.permute(2, 0, 1, 3) if h is not None else None)


def _one_layer_bilstm2d(rnn_v: nn.LSTM | None, rnn_h: nn.LSTM | None, x: torch.Tensor):
    """(B, H, W, C) -> columns (B, W, H, D*Hd), rows (B, H, W, D*Hd): one GEMM, then one scan per axis."""
    from . import triton_lstm  # imported already: uses_fused_lstm asked triton_installed()
    rnns = [r for r in (rnn_v, rnn_h) if r is not None]
    dtype = compute_dtype(x, rnns[0].weight_ih_l0)
    weights = [lstm_weights(r, 0, dtype) for r in rnns]
    bias = torch.cat([w[2] for w in weights]) if rnns[0].bias else None
    with torch.autocast(x.device.type, enabled=False):
        xp = F.linear(x.to(dtype), torch.cat([w[0] for w in weights]), bias)  # (B, H, W, axes * D * 4Hd)
        projections = list(xp.chunk(len(rnns), dim=-1))
        if rnn_v is not None:  # columns are the sequences: (B, W) of H steps, a strided view
            projections[0] = projections[0].transpose(1, 2)
        outs = [triton_lstm.recurrence(p.unflatten(-1, (w[1].shape[0], -1)), w[1]).flatten(-2)
                for p, w in zip(projections, weights)]
    v = outs.pop(0) if rnn_v is not None else None
    h = outs.pop(0) if rnn_h is not None else None
    return v, h


def run_rnn(rnn: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """``rnn`` over (N, T, C) batch-first sequences -> (N, T, D*H), on the chosen backend."""
    if hooked(rnn):  # its hooks (pruning's among them) run only when it is called
        return rnn(_eager_input(rnn, x))[0]
    if uses_fused_lstm(rnn, backend, x):
        return fused_lstm(rnn, x.unsqueeze(0)).squeeze(0)
    if torch.compiler.is_compiling() and not exporting():
        weights = current_weights(rnn)
        dtype = _compiled_dtype(rnn, x, weights)
        if onednn_lstm.applies(rnn, x, dtype):
            return onednn_lstm.lstm(x, weights, rnn.bidirectional, rnn.bias, dtype)
        return rnn_native(x, weights, _VF_MODES[rnn.mode], rnn.num_layers, rnn.bidirectional, rnn.bias, rnn.training,
                          KERNEL_CODE, None)
    return rnn(_eager_input(rnn, x))[0]


def current_weights(rnn: nn.Module) -> list[torch.Tensor]:
    """The layer's weights as its attributes give them now, in ATen's order. ``rnn._flat_weights`` is a cache that
    the module's own forward refreshes: a parametrization (``parametrizations.weight_norm`` of ``weight_hh_l0``)
    recomputes the weight at every read, and a path that never calls the module (compiled code, the ``cpu`` backend's
    eager one) would read the weights of the module's last call, or the unparametrized original."""
    return [getattr(rnn, name) for name in rnn._flat_weights_names]


def _eager_input(rnn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``rnn`` can take it. Under CPU autocast ATen sends a float32 input with autocast's weights to oneDNN's
    LSTM, which has no float16 kernel, nor a bfloat16 one on a CPU without bf16 instructions (AVX2-only: "could not
    create a primitive descriptor"). An input in autocast's dtype takes ATen's own LSTM there, which runs the step
    matmuls in that dtype, as the model's other autocast inputs do."""
    if rnn.mode != "LSTM" or x.device.type != "cpu" or not autocast_applies_to(x):
        return x
    dtype = torch.get_autocast_dtype("cpu")
    if dtype == torch.float16 or dtype == torch.bfloat16 and not onednn_bf16_supported():
        return x.to(dtype)
    return x


def _compiled_dtype(rnn: nn.Module, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.dtype | None:
    """The dtype the compiled layer computes in: autocast's for it (as the ops' autocast kernels cast; None for a CPU
    GRU, whose steps autocast), else the input's where the weights share it (None where they do not: no oneDNN
    kernel mixes dtypes)."""
    if autocast_applies_to(x):
        return autocast_rnn_dtype(x.device.type, _VF_MODES[rnn.mode])
    return x.dtype if all(w.dtype == x.dtype for w in weights) else None


def _vf_rnn(x: torch.Tensor, weights: list[torch.Tensor], mode: str, num_layers: int, bidirectional: bool,
            has_biases: bool, train: bool, step_autocast: torch.dtype | None = None) -> torch.Tensor:
    """ATen's recurrent op as nn.LSTM/GRU/RNN(tanh) call it: zero initial state, batch-first (N, T, C).
    ``step_autocast``: run it under autocast in that dtype (see :func:`autocast_rnn_dtype`, CPU GRU)."""
    hidden = weights[1].shape[1]
    h0 = x.new_zeros((num_layers * (2 if bidirectional else 1), x.shape[0], hidden))
    fn = {"lstm": torch._VF.lstm, "gru": torch._VF.gru, "rnn": torch._VF.rnn_tanh}[mode]
    hx = (h0, torch.zeros_like(h0)) if mode == "lstm" else h0
    if step_autocast is not None:
        # Each weight cast once for all steps, as autocast's cache casts a parameter once in eager code, so that its
        # gradient sums over the steps in that dtype as eager's does. Not by that cache itself: it keeps its casts
        # for the rest of the caller's autocast region, and one made here (in an op: no autograd) would reach the
        # caller's eager code later in the region as a cast without gradient.
        weights = [w.to(step_autocast) if w.dtype == torch.float32 else w for w in weights]
    with torch.autocast(x.device.type, dtype=step_autocast, enabled=step_autocast is not None, cache_enabled=False):
        return fn(x, hx, weights, has_biases, num_layers, 0.0, train, bidirectional, True)[0]


# The custom ops' annotations say typing.List: torch < 2.8 infers no schema from PEP 585's list[...]. No argument
# has a default: the dispatcher drops an argument equal to its default before autograd sees the call, and torch < 2.8
# then wants one gradient fewer than the backward (given the filled-in inputs) returns
@torch.library.custom_op("sequencer::rnn_native", mutates_args=())
def rnn_native(x: torch.Tensor, weights: List[torch.Tensor], mode: str, num_layers: int, bidirectional: bool,
               has_biases: bool, train: bool, kernel_code: str,
               step_autocast: Optional[torch.dtype]) -> torch.Tensor:
    """ATen's LSTM/GRU/RNN as one opaque op for ``torch.compile``. x: (N, T, C) -> (N, T, D*H). ``step_autocast``:
    the autocast dtype the layer's own steps run under, where ATen autocasts them rather than the layer (CPU GRU).
    ``kernel_code``: :data:`.code_key.KERNEL_CODE`, for the compile caches' keys (unused here).

    The output always has the layout of :func:`_rnn_native_layout` (what ATen's kernels give in the common case, so
    no copy there): compiled code is built for the fake kernel's strides and checks them at run time.
    """
    out = _vf_rnn(x, weights, mode, num_layers, bidirectional, has_biases, train, step_autocast)
    expected = _rnn_native_layout(x, weights, bidirectional)
    if out.stride() != expected.stride():
        out = expected.copy_(out)
    return out


def _rnn_native_layout(x: torch.Tensor, weights: list[torch.Tensor], bidirectional: bool) -> torch.Tensor:
    """An empty (N, T, D*H) tensor in (T, N, D*H) memory: ATen runs batch-first input sequence-first and hands back
    a transposed view."""
    hidden = weights[1].shape[1]
    return x.new_empty((x.shape[1], x.shape[0], hidden * (2 if bidirectional else 1))).transpose(0, 1)


@rnn_native.register_fake
def _(x, weights, mode, num_layers, bidirectional, has_biases, train, kernel_code, step_autocast):
    return _rnn_native_layout(x, weights, bidirectional)


@torch.library.custom_op("sequencer::rnn_native_backward", mutates_args=())
def rnn_native_backward(grad: torch.Tensor, x: torch.Tensor, weights: List[torch.Tensor], mode: str,
                        num_layers: int, bidirectional: bool, has_biases: bool, kernel_code: str,
                        step_autocast: Optional[torch.dtype]) -> List[torch.Tensor]:
    """[dL/dx, dL/dw for each weight] of :func:`rnn_native`, by recomputing the layer on detached leaves
    (``kernel_code``: as :func:`rnn_native`'s).

    An op's implementation runs with autograd's dispatch keys excluded, so autograd would record nothing; they are
    re-admitted around the recomputation (the guard torch.utils.checkpoint uses), and ``torch.autograd.grad`` runs
    on plain tensors. (``torch.func.vjp`` did this before, but its wrapper tensors cannot reach cuDNN's RNN, which
    reads the weights' storage: "Cannot access storage of TensorWrapper" on CUDA.)
    """
    leaves = [t.detach().requires_grad_() for t in (x, *weights)]
    with _autograd_recorded(), torch.enable_grad():
        out = _vf_rnn(leaves[0], leaves[1:], mode, num_layers, bidirectional, has_biases, True, step_autocast)
        grads = torch.autograd.grad(out, leaves, grad)
    # Every gradient is returned dense, as the fake kernel promises (ATen's dL/dx of a strided x may come back
    # dense or in x's layout), and no two share memory: an op's outputs may not alias each other, and ATen hands out
    # one tensor for both biases' gradients. The weights' copies are weight-sized, negligible beside the recompute.
    grad_x, *grad_weights = grads
    return [grad_x.contiguous()] + [g.clone(memory_format=torch.contiguous_format) for g in grad_weights]


@contextlib.contextmanager
def _autograd_recorded():
    """Autograd records again inside an op's implementation (see rnn_native_backward)."""
    keys = torch._C.DispatchKey
    with (torch._C._SetExcludeDispatchKeyGuard(keys.AutogradFunctionality, False),
          torch._C._SetExcludeDispatchKeyGuard(keys.ADInplaceOrView, False)):
        yield


@rnn_native_backward.register_fake
def _(grad, x, weights, mode, num_layers, bidirectional, has_biases, kernel_code, step_autocast):
    return [x.new_empty(x.shape)] + [w.new_empty(w.shape) for w in weights]


def _save_inputs(ctx, inputs, output):
    x, weights, mode, num_layers, bidirectional, has_biases, _train, kernel_code, step_autocast = inputs
    ctx.save_for_backward(x, *weights)
    ctx.config = (mode, num_layers, bidirectional, has_biases, kernel_code, step_autocast)


def _rnn_native_grads(ctx, grad):
    x, *weights = ctx.saved_tensors
    grad_x, *grad_weights = rnn_native_backward(grad.contiguous(), x, weights, *ctx.config)
    return grad_x, grad_weights, None, None, None, None, None, None, None


rnn_native.register_autograd(_rnn_native_grads, setup_context=_save_inputs)


def autocast_rnn_dtype(device_type: str, mode: str) -> torch.dtype | None:
    """The dtype ATen's autocast casts ``nn.LSTM``/``GRU``/``RNN`` to on ``device_type``, which the opaque op follows;
    None where it casts the layer's steps instead (CPU GRU, below).

    * CUDA: float16, whichever dtype autocast was asked for. ATen's autocast rule for cuDNN's RNN
      (aten/src/ATen/cudnn/AutocastRNN.cpp) casts to float16 even under bfloat16 autocast. Followed deliberately:
      compiled training then computes what eager does (and was measured running, on an H100), cuDNN's RNN is not
      known to accept bfloat16 from ATen, and float32 would keep compiled runs at float32 speed (compiled cuDNN
      inference measured at half its eager speed before this rule). Its cost is accuracy: 7.3e-2 worst logit
      error against fp32 (BENCHMARKS.md "GPU"), which is why ``auto`` runs inference on the Triton kernel
      (6.2e-3 in bf16), whose h, c and accumulation stay float32.
    * CPU: the autocast dtype for LSTM (oneDNN's LSTM layer, the default CPU path, is on CPU autocast's
      lower-precision list) and tanh RNN. (oneDNN's LSTM has no float16: under float16 CPU autocast ATen's own LSTM
      runs, in eager (:func:`_eager_input`) and compiled code alike; ``sequencer train`` runs float16 requests on
      the CPU as bfloat16.) GRU is on no list, but ATen's CPU GRU is made of ops that are: eager, its step matmuls
      run in the autocast dtype while its hidden state keeps the input's dtype. The op is then given its inputs
      uncast and runs its steps under autocast (``step_autocast``), computing what eager does, bit for bit.
    """
    if device_type == "cuda":
        return torch.float16
    if mode == "gru":
        return None
    return torch.get_autocast_dtype(device_type)


def _cast_for_autocast(device_type: str, x: torch.Tensor, weights: list[torch.Tensor], dtype: torch.dtype):
    return [t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 and t.device.type == device_type
            else t for t in (x, *weights)]


def _autocast_kernel(device_type: str):
    """``rnn_native``'s kernel at the Autocast dispatch key of ``device_type``: cast (differentiably, so float32
    parameters get float32 gradients), then run the op with autocast off, as torch.library.register_autocast does
    for one fixed dtype; or, where ATen autocasts the layer's steps (CPU GRU), run them under autocast inside."""
    def kernel(x, weights, mode, num_layers, bidirectional, has_biases, train, kernel_code, step_autocast):
        dtype = autocast_rnn_dtype(device_type, mode)
        if dtype is None:
            step_autocast = torch.get_autocast_dtype(device_type)
        else:
            x, *weights = _cast_for_autocast(device_type, x, weights, dtype)
        with torch.autocast(device_type, enabled=False):
            return rnn_native(x, weights, mode, num_layers, bidirectional, has_biases, train, kernel_code,
                              step_autocast)
    return kernel


def _onednn_lstm_autocast_kernel(x, weights, bidirectional, has_biases, layout, kernel_code):
    """``onednn_lstm``'s kernel under CPU autocast, cast as ``rnn_native``'s is (the same rule, the same dtype)."""
    x, *weights = _cast_for_autocast("cpu", x, weights, autocast_rnn_dtype("cpu", "lstm"))
    with torch.autocast("cpu", enabled=False):
        return onednn_lstm.onednn_lstm(x, weights, bidirectional, has_biases, layout, kernel_code)


_AUTOCAST_LIB = torch.library.Library("sequencer", "IMPL")  # held: its registrations live as long as it does
for _device_type in ("cpu", "cuda"):
    _AUTOCAST_LIB.impl("rnn_native", _autocast_kernel(_device_type),
                       "Autocast" + torch._C._dispatch_key_for_device(_device_type))
_AUTOCAST_LIB.impl("onednn_lstm", _onednn_lstm_autocast_kernel, "AutocastCPU")
