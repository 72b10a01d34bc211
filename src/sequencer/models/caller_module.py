"""The caller's module given back as it was after a call used it: :func:`caller_module_kept`. The library never
changes what the caller passed beyond a call's purpose (training changes the weights, nothing else)."""
from __future__ import annotations

import contextlib
import threading
import weakref

from torch import nn

_module_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # {caller's module: the lock its calls hold}
_module_locks_lock = threading.Lock()


@contextlib.contextmanager
def caller_module_kept(module: nn.Module | None, tensors: bool = True):
    """Run the body, then put the caller's ``module`` back as it was: each submodule in the train/eval mode it was
    in, with its ``grad_checkpointing`` flag (timm's) as it was, and with ``tensors`` each parameter, gradient and
    buffer holding again the very tensor it held (on its own device, its storage shared with whatever shared it),
    whatever the body moved (an evaluation's ``module.to(device)``), also when the body raises. For a body that
    only reads the values (evaluation); training keeps its updates with ``tensors=False``. None: nothing to keep."""
    if module is None:
        yield
        return
    with _lock_of(module) if tensors else contextlib.nullcontext():
        yield from _kept(module, tensors)


def _lock_of(module: nn.Module) -> threading.RLock:
    """The lock the calls that read ``module`` (evaluations, exports: ``tensors``) hold while they use it, so that
    such calls from several threads (two validations of one module) use it one after another: overlapping, the
    first to end put its train mode back under the second's evaluation (dropout on, BatchNorm's running statistics
    updated in place, another loss) and the second left the module in eval mode, the mode it found. Re-entrant: a
    call inside another's goes on. A training holds none: its callbacks may evaluate the module in threads of their
    own and wait for them (a thread pool's validations on several datasets), which a held lock deadlocked."""
    with _module_locks_lock:
        lock = _module_locks.get(module)
        if lock is None:
            lock = _module_locks[module] = threading.RLock()
        return lock


def _kept(module: nn.Module, tensors: bool):
    flags = [(m, name, getattr(m, name)) for m in module.modules() for name in ("training", "grad_checkpointing")
             if isinstance(getattr(m, name, None), bool)]
    params = [(m, name, p, p.detach(), p.grad, None if p.grad is None else p.grad.detach())
              for m in module.modules() for name, p in m.named_parameters(recurse=False)] if tensors else []
    buffers = [(m, name, b) for m in module.modules() for name, b in m.named_buffers(recurse=False)] if tensors \
        else []
    try:
        yield
    finally:
        for m, name, value in flags:
            setattr(m, name, value)  # per submodule: a caller's frozen (eval-mode) part stays frozen
        for m, name, param, data, grad, grad_data in params:
            setattr(m, name, param)  # the same Parameter object: an optimizer holding it still holds it
            param.data = data
            if grad is not None:
                grad.data = grad_data
            param.grad = grad
        for m, name, buffer in buffers:
            setattr(m, name, buffer)
