"""The library as a guest in the caller's process: what :func:`sequencer.train` and :func:`sequencer.validate`
show on the console, and the caller's random state and warning filters, kept (its modules:
:mod:`sequencer.models.caller_module`).

Messages are records of the ``"sequencer"`` logger (progress and notes at INFO, problems at WARNING); notes a Python
user may want to filter are ``warnings.warn`` (:func:`warn`). What :func:`console` changes is undone when the call
returns and touches only the calling thread's records: a handler on the ``"sequencer"`` logger filtered to that
thread, or (``progress=False``) a filter on the console handlers that drops that thread's records. Two changes are
shared by every thread: the ``"sequencer"`` logger's level (INFO while a ``progress=True`` call runs, if the caller
set none) and torch's default dtype (float32 while a call runs, where the caller set another: :func:`own_modes`).
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import threading
import warnings

_logger = logging.getLogger(__name__)
_quiet = contextvars.ContextVar("sequencer_quiet", default=False)


class _SharedOverride:
    """A process-wide setting that the calls running at once (in any thread, nested or overlapping) override
    together: the first that finds ``needed()`` saves the caller's value and sets the call's, each later one while
    any runs is counted too, and the last to finish puts the caller's value back (one overlapping call's end does
    not undo the setting under another still running)."""

    def __init__(self, read, write, ours, needed):
        """``read()``: the current value; ``write(value)`` sets it; ``ours()``: the calls' value (None: the calls set
        none, only the caller's is put back); ``needed(current)``: whether a call that finds ``current`` (with none
        running) overrides it."""
        self._read, self._write, self._ours, self._needed = read, write, ours, needed
        self._lock = threading.Lock()
        self._users = 0
        self._callers = None

    @contextlib.contextmanager
    def __call__(self):
        with self._lock:
            current = None if self._users else self._read()  # read once: for the random state it is a full copy
            counted = self._users > 0 or self._needed(current)
            if counted:
                if not self._users:
                    self._callers = current
                    if self._ours is not None:
                        self._write(self._ours())
                self._users += 1
        try:
            yield
        finally:
            if counted:
                with self._lock:
                    self._users -= 1
                    if not self._users:
                        self._write(self._callers)


def warn(message: str) -> None:
    """A note for the user: ``warnings.warn`` (filterable as usual), or only a WARNING log record inside a
    ``progress=False`` call, which prints nothing."""
    if _quiet.get():
        _logger.warning(message)
    else:
        warnings.warn(message, stacklevel=2)


def printable(text: str) -> str:
    """``text`` writable on any UTF-8 console: the bytes of a file name that is not UTF-8 (a Latin-1 ``caf\xe9.jpg``
    from an old zip, which Python holds as a lone surrogate) spelled ``\xe9``; a UTF-8 terminal refuses the
    surrogate (UnicodeEncodeError)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class ConsoleHandler(logging.Handler):
    """Log records as console lines: INFO on stdout, WARNING and above on stderr, each the message alone, passed
    through ``rewrite`` (the CLI writes parameters as its flags). The stream is looked up per record, so a swapped
    ``sys.stdout`` is honoured. ``thread``: only that thread's records (a ``progress=True`` call's own handler);
    None: every record (the CLI's)."""

    def __init__(self, level: int = logging.INFO, rewrite=str, thread: int | None = None):
        super().__init__(level)
        self.rewrite = rewrite
        self.thread = thread
        if thread is not None:
            self.addFilter(lambda record: record.thread == thread)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(printable(self.rewrite(record.getMessage())) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 -- logging's contract: a failing handler reports and carries on
            self.handleError(record)


class _Silence(logging.Handler):
    """Swallows one thread's records, so that Python's last-resort handler does not print them on stderr."""

    def __init__(self, thread: int):
        super().__init__(logging.NOTSET)
        self.addFilter(lambda record: record.thread == thread)

    def emit(self, record: logging.LogRecord) -> None:
        pass


def _console_handlers(logger: logging.Logger, thread: int) -> list[logging.Handler]:
    """The handlers that show ``thread``'s records of ``logger`` on stdout/stderr (the CLI's, the caller's
    ``logging.basicConfig``, or the handler of a ``progress=True`` call this one runs inside: a validation in a
    training's callback), up the hierarchy as records propagate."""
    consoles = {sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__}
    found = []
    while logger is not None:
        found += [h for h in logger.handlers if isinstance(h, ConsoleHandler) and h.thread in (None, thread)
                  or isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in consoles]
        logger = logger.parent if logger.propagate else None
    return found


@contextlib.contextmanager
def console(progress: bool):
    """The call's console output. ``progress=True``: the log lines on stdout (problems on stderr) unless the
    caller's logging already prints them, and a download's progress bar; ``progress=False``: nothing on stdout or
    stderr (the call's records still reach the caller's other handlers, e.g. a log file)."""
    from ..models.hub import download_progress  # here: the command line's console handler needs no torch

    logger = logging.getLogger("sequencer")
    thread = threading.get_ident()
    token = _quiet.set(not progress)
    bar_token = download_progress.set(progress)  # a download's progress bar (released weights) is console output too
    consoles = _console_handlers(logger, thread)
    handler = _Silence(thread) if not progress else ConsoleHandler(thread=thread) if not consoles else None
    not_this_thread = _OtherThreads(thread)
    muted = [] if progress else consoles
    for h in muted:
        h.addFilter(not_this_thread)
    if handler is not None:
        logger.addHandler(handler)
    try:
        with _info_level() if progress and handler is not None else contextlib.nullcontext():
            yield
    finally:
        if handler is not None:
            logger.removeHandler(handler)
        for h in muted:
            h.removeFilter(not_this_thread)
        _quiet.reset(token)
        download_progress.reset(bar_token)


class _OtherThreads(logging.Filter):
    """Lets through the records of every thread but one (a ``progress=False`` call's)."""

    def __init__(self, thread: int):
        super().__init__()
        self.thread = thread

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread


# the "sequencer" logger at INFO (its records shown by the call's handler) unless the caller set its level
_info_level = _SharedOverride(read=lambda: logging.getLogger("sequencer").level,
                              write=lambda level: logging.getLogger("sequencer").setLevel(level),
                              ours=lambda: logging.INFO, needed=lambda level: level == logging.NOTSET)


@contextlib.contextmanager
def poly_schedule_note_dropped():
    """The body with the calling thread's "Cosine annealing scheduler will have no effect on the learning rate since
    t_initial = t_mul = eta_mul = 1" dropped: timm's poly schedule logs it when one update follows the warmup, though
    it is no cosine schedule and the run set none of those (`segment train --iters 3 --warmup-iters 2` printed it
    first of all). timm's other records, and other threads', pass."""
    thread = threading.get_ident()

    def kept(record: logging.LogRecord) -> bool:
        return record.thread != thread or not record.getMessage().startswith("Cosine annealing scheduler will")

    logger = logging.getLogger("timm.scheduler.poly_lr")
    logger.addFilter(kept)
    try:
        yield
    finally:
        logger.removeFilter(kept)


def _dynamos_filter(entry: tuple) -> bool:
    """Whether a ``warnings.filters`` entry is the one torch 2.6's dynamo adds (torch.distributed's UserWarnings
    ignored)."""
    action, _, category, module, _ = entry
    return action == "ignore" and category is UserWarning and getattr(module, "pattern", None) == "torch.distributed"


@contextlib.contextmanager
def own_modes():
    """Run the body (a library entry point's work) in its own modes, whatever the calling thread's: gradients on,
    outside inference mode, no autocast (the work autocasts where its ``amp`` says: ``engine.amp.autocast``), float32
    as the default dtype (:func:`float32_default`), the CPU as the default device (:func:`cpu_default_device`). A
    caller's ``torch.no_grad()``, ``torch.inference_mode()`` or ``torch.autocast`` block reached the whole run: a
    training's backward raised, a run without ``amp`` (its data transforms too) ran in bfloat16. Thread-local, as the
    caller's own blocks, save the default dtype: they are the caller's again on return."""
    import torch

    with torch.enable_grad(), torch.inference_mode(False), torch.autocast("cpu", enabled=False), \
            torch.autocast("cuda", enabled=False), float32_default(), cpu_default_device():
        yield


@contextlib.contextmanager
def cpu_default_device():
    """The body with torch's default device the CPU, as in a fresh process (the library's work names the devices it
    means: ``device=``, ``.to(device)``). A caller's ``torch.set_default_device("meta")`` (deferred init) or ``with
    torch.device("cuda")`` reached the whole run: a checkpoint's weights were copied into meta tensors (a no-op, a
    UserWarning per tensor) and a run failed deep in torch ('Tensor.item() cannot be called on meta tensors').
    Thread-local, as the caller's setting: theirs again on return. Nothing entered where the CPU is already the
    default (a device mode sees every torch call)."""
    import torch

    with contextlib.nullcontext() if torch.get_default_device() == torch.device("cpu") else torch.device("cpu"):
        yield


@contextlib.contextmanager
def float32_default():
    """The body with torch's default dtype float32 (the library calls' and the exports': they make float32 images
    and inputs, and build float32 models). A caller's ``torch.set_default_dtype(torch.float64)`` reached
    the whole run: a model built by name trained in float64 (another run than the seed's, ``amp`` inert, checkpoints
    twice the size) and the images came as float64 (``ToTensor``, normalisation, soft targets follow the default),
    which a float32 module refused with ATen's dtype error. torch's default dtype is process-wide (no per-thread
    one): with float32 already the default, nothing is changed; otherwise the caller's other threads see float32
    until the last such call returns, which puts the caller's default back."""
    with _float32_default():
        yield


def _default_dtype():
    import torch  # here: the command line's console handler needs no torch

    return torch.get_default_dtype()


def _set_default_dtype(dtype) -> None:
    import torch

    torch.set_default_dtype(dtype)


def _float32():
    import torch

    return torch.float32


_float32_default = _SharedOverride(read=_default_dtype, write=_set_default_dtype, ours=_float32,
                                   needed=lambda dtype: dtype != _float32())


@contextlib.contextmanager
def caller_state_kept():
    """Run the body (a library entry point's work), then give back the process state it may change on the way: the
    state of ``random``, ``numpy.random`` and torch's CPU and CUDA generators (CUDA first used inside the body is
    reseeded with the caller's torch seed; calls overlapping in several threads: when the last ends), and the warning
    filters as far as dynamo changed them
    (:func:`_dynamos_filter_undone`: the body may torch.compile or torch.export a module, ours or the caller's)."""
    import torch

    from .checkpoint import get_rng_state, set_rng_state

    depth = getattr(_kept_in_this_thread, "depth", 0)
    saved = get_rng_state() if depth else None
    seed = torch.initial_seed()
    cuda_was_initialized = torch.cuda.is_available() and torch.cuda.is_initialized()
    filters = list(warnings.filters)
    _kept_in_this_thread.depth = depth + 1
    try:
        with _callers_random_state():
            yield
    finally:
        _kept_in_this_thread.depth = depth
        if depth:  # nested in this thread's call (its own draws kept from what follows): the state it found
            set_rng_state(saved)
        if not cuda_was_initialized and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(seed)
        _dynamos_filter_undone(filters)


def _random_state() -> dict:
    from .checkpoint import get_rng_state

    return get_rng_state()


def _set_random_state(state: dict) -> None:
    from .checkpoint import set_rng_state

    set_rng_state(state)


# the generators are process-wide: calls overlapping in several threads give back the state the first found when the
# last ends (each giving back its own put the first's state mid-run under the other, and left the caller the
# other's); a call nested in one of them gives back its own (:func:`caller_state_kept`)
_callers_random_state = _SharedOverride(read=_random_state, write=_set_random_state, ours=None,
                                        needed=lambda state: True)
_kept_in_this_thread = threading.local()  # .depth: the caller_state_kept calls running in this thread


def _dynamos_filter_undone(before: list) -> None:
    """Take out of the process's warning filters the one torch 2.6's dynamo puts there at every frame it traces
    (torch.compile's and torch.export's), process-wide (ignore torch.distributed's UserWarnings; torch 2.7 on scopes
    it to the trace), unless the caller had it in ``before`` (the filters when the call began), where it keeps its
    place."""
    after = list(warnings.filters)
    if after != before and any(_dynamos_filter(f) for f in after):
        kept = [f for f in after if not _dynamos_filter(f)]
        for index, entry in enumerate(before):
            if _dynamos_filter(entry):
                kept.insert(index, entry)
        warnings.resetwarnings()  # public, and it tells the warnings module its filters changed
        warnings.filters[:] = kept
