"""Where the project's progress lines go. Each module logs to its own logger
(`logging.getLogger(__name__)`); the command line sends those of the project's packages to stdout
as plain lines. Used as a library, nothing is printed until the caller configures logging.

Ray workers are configured by Ray, not here: a Ray Train worker's root logger prints to its
stdout, which Ray forwards to the driver's console.
"""

from __future__ import annotations

import logging
import sys

PACKAGES = ("gendertune",)


class StdoutLines(logging.StreamHandler):
    """`%(message)s` lines to whatever sys.stdout is when each line is written, as print() does,
    so contextlib.redirect_stdout and pytest's capture see them too."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout  # Handler.handle holds the handler's lock around emit
        super().emit(record)


def print_progress_to_stdout() -> None:
    """INFO and above of the project's loggers to stdout, once per process however often it is
    called (main() may run several times in one process).

    The handler goes on the package loggers, not the root logger, which stays as Ray and the user
    left it: a root handler would also print every other library's records. Records still
    propagate to the root, so a handler the user put there (or pytest's caplog) sees them too."""
    handler = StdoutLines()
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not any(isinstance(existing, StdoutLines) for existing in logger.handlers):
            logger.addHandler(handler)
