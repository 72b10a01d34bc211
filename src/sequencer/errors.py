"""User-facing errors.

Anything a user can cause (bad argument, missing folder, foreign checkpoint, ...) raises `SequencerError` with a
one-line message that names the culprit and, where possible, a hint. The CLI prints it as
``sequencer COMMAND: error: <message> (hint: <hint>)`` and exits with status 2, without a traceback.

Library messages name the library's parameters, written in backticks (`` `batch_size=8` ``, `` `class_map` ``);
the command line rewrites those it has a flag for (``--batch-size 8``, ``--class-map``), see
``sequencer.commands.common.as_flags``.
"""
import contextlib
import importlib
import operator
import threading
import warnings

DISTRIBUTION = "sequencer-vision"  # what ``pip install`` calls this package (PyPI's "sequencer" is another project)


class SequencerError(Exception):
    """An error caused by user input. ``message`` names the culprit in one line; ``hint`` (or None) says what to do;
    ``str(error)`` is both, as the CLI shows them."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message, hint)

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class ArgumentValueError(SequencerError, ValueError):
    """A value the caller passed is refused (e.g. a model's ``union="diagonal"``): a user error for the CLI, and a
    ValueError for Python callers that catch one."""


def checked_positive_int(name: str, value) -> int:
    """``value`` as an int >= 1, else ArgumentValueError (one line) naming ``name``; a float, a text or a bool is
    refused, not converted."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or number < 1:
        raise ArgumentValueError(f"{name}={value!r}: must be a positive integer")
    return number


def optional_import(module: str, needed_for: str, extra: str | None = None):
    """``import module`` for a package the core install leaves out (``pyproject.toml``'s optional dependencies), or a
    SequencerError saying what needs it and what to install: ``pip install 'sequencer-vision[EXTRA]'`` when an extra
    brings it, else the package itself. Only the module's own absence is turned into that error: a package that is
    installed but fails to import (a missing dependency of its own, a broken build) keeps its traceback."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        missing = (error.name or module).partition(".")[0]
        if missing != module.partition(".")[0]:
            raise
        install = f"pip install '{DISTRIBUTION}[{extra}]'" if extra else f"pip install {missing}"
        raise SequencerError(f"{needed_for} needs the {missing} package, which is not installed",
                             hint=install) from None


_filters_lock = threading.RLock()  # the package's own changes to the process's warning filters, one at a time


@contextlib.contextmanager
def warnings_ignored(messages: tuple[str, ...] = (), categories: tuple[type[Warning], ...] = ()):
    """The body with the warnings ignored whose message matches one of ``messages`` (regular expressions, matched at
    its start) or whose class is one of ``categories``; the process's warning filters put back after it.

    ``warnings.catch_warnings`` swaps the filter list of the whole process and puts back the list it found. Two such
    blocks in the caller's threads (checkpoints read by a server's threads) that overlapped put back each other's
    lists: the one that ended last restored the list holding the other's filter, left in the caller's process for
    good. The package's blocks take turns."""
    with _filters_lock, warnings.catch_warnings():
        for message in messages:
            warnings.filterwarnings("ignore", message=message)
        for category in categories:
            warnings.filterwarnings("ignore", category=category)
        yield
