"""User-facing errors.

Anything a user can cause (bad argument, missing folder, foreign checkpoint, ...) raises `SequencerError` with a
one-line message that names the culprit and, where possible, a hint. The CLI prints it as
``sequencer COMMAND: error: <message> (hint: <hint>)`` and exits with status 2, without a traceback.

Library messages name the library's parameters, written in backticks (`` `batch_size=8` ``, `` `class_map` ``);
the command line rewrites those it has a flag for (``--batch-size 8``, ``--class-map``), see
``sequencer.commands.common.as_flags``.
"""


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
