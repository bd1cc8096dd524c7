"""The project's own errors. The CLI prints these as one plain line (exit 2; StageFailed exit 1)
and keeps the traceback for every other exception, which is a bug to report, not an input to fix.
Each also subclasses the builtin it refines, so callers catching ValueError and the like still do."""


class GendertuneError(Exception):
    """Base of every error whose message tells the user what to change."""


class UserInputError(GendertuneError, ValueError):
    """A setting, file or argument the project cannot use; the message names it and what to do."""


class MissingInputError(GendertuneError, FileNotFoundError):
    """A file or folder the command needs is not there."""


class UnreachableError(GendertuneError, ConnectionError):
    """A server the command needs (a Ray cluster, an MLflow tracking server) does not answer."""


class StageFailed(GendertuneError, RuntimeError):
    """The work itself failed (not the input); the message says what is kept and how to go on."""
