"""Errors every stage can raise that the CLI reports as one plain message instead of a traceback."""


class StageFailed(RuntimeError):
    """The work itself failed (not the input); the message says what is kept and how to go on."""
