"""User-facing errors.

Anything a user can cause (bad flag, missing folder, foreign checkpoint, ...) raises `SequencerError` with a
one-line message that names the culprit and, where possible, a hint. The CLI prints it as
``sequencer: error: <message>`` and exits with status 2, without a traceback.
"""


class SequencerError(Exception):
    """An error caused by user input; its message is shown verbatim on one line."""

    def __init__(self, message: str, hint: str | None = None):
        self.hint = hint
        super().__init__(f"{message} (hint: {hint})" if hint else message)
