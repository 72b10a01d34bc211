"""Whether the forward is running eagerly or being captured, and by what: the one place the kernels ask.

The kernels of this package choose their path from the answer:

* :func:`exporting`: captured into a program meant to run without this package (TorchScript, ONNX, ``torch.export``):
  only ATen's own ops may appear.
* :func:`plain_eager`: none of the capturing or transforming modes is on, so the eager-only paths (oneDNN autograd
  Functions, the ``cpu`` LSTM scan) may run.
* :func:`functorch_active`: a ``torch.func`` transform is running; :func:`forward_ad_active`: forward-mode AD is on.
* :func:`assume_constant_result`: ``torch.compiler.assume_constant_result`` without importing ``torch._dynamo``.
* :func:`hooked`: a submodule carries the caller's forward hooks (``torch.nn.utils.prune``, the old
  ``weight_norm``, a feature-capturing hook), so it must be called, not have its weights read by a fused path.
"""
from __future__ import annotations

import torch


def assume_constant_result(fn):
    """``torch.compiler.assume_constant_result``: dynamo runs ``fn`` while tracing and puts its result in the graph as
    a constant. torch's decorator imports ``torch._dynamo`` (a second or more, and Triton with it) only to set this
    mark, so the kernels set it themselves and building a model costs no dynamo; a test checks that torch's decorator
    still sets exactly this."""
    fn._dynamo_marked_constant = True
    return fn


def exporting() -> bool:
    """Whether the forward is being captured into a program meant to run without this package: a TorchScript trace
    or script, an ONNX export, or ``torch.export`` (whose programs AOTInductor compiles for C++). The package's
    custom ops would tie such a program to ``import sequencer`` in a Python process."""
    return (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or _torch_exporting())


def plain_eager() -> bool:
    """Whether the forward runs eagerly with no capture or transform on: not under ``torch.compile`` (checked first,
    since dynamo may not trace the other queries), TorchScript, ONNX export, a ``torch.func`` transform or forward-mode
    AD."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                or functorch_active() or forward_ad_active())


def forward_ad_active() -> bool:
    """Whether forward-mode AD (``torch.autograd.forward_ad.dual_level``) is on: the eager-only paths' oneDNN ops and
    in-place scans have no forward derivative, and tangents (of a dual input, or of frozen weights' duals) through them
    would be dropped silently, so the standard ops run. torch exposes the level only as this module global."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ...) is running: the eager-only paths'
    autograd Functions have no ``setup_context`` (which those transforms require), so the standard ops run under
    them."""
    return torch._C._are_functorch_transforms_active()


def hooked(*modules: torch.nn.Module | None) -> bool:
    """Whether any of ``modules`` has forward (pre-)hooks, its own or global ones. The fused paths read a layer's
    weights and skip its call: ``torch.nn.utils.prune`` recomputes ``weight`` (= ``weight_orig * mask``) in a pre-hook,
    so read directly it would be the tensor of the last call (trained no further: ``weight_orig`` got no gradient),
    and a hook capturing the layer's output would never fire."""
    from torch.nn.modules import module as nn_module
    if nn_module._global_forward_pre_hooks or nn_module._global_forward_hooks:
        return True
    return any(m is not None and bool(m._forward_pre_hooks or m._forward_hooks) for m in modules)


def _exporting_before_2_7() -> bool:
    """torch.export on a torch without ``torch.compiler.is_exporting`` (2.6): non-strict export runs the forward
    under make_fx (fx tracing on), strict export under dynamo in its export mode; both count as compiling, so eager
    calls (every LSTM of every forward) stop at the first, cheap test."""
    return torch.compiler.is_compiling() and (torch.fx._symbolic_trace.is_fx_tracing() or _dynamo_exporting())


@assume_constant_result
def _dynamo_exporting() -> bool:
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        return bool(getattr(InstructionTranslator.current_tx(), "export", False))
    except Exception:  # noqa: BLE001 - not under dynamo (no current frame), or its internals moved: not exporting
        return False


_torch_exporting = getattr(torch.compiler, "is_exporting", _exporting_before_2_7)
