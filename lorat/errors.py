"""Exceptions raised for bad user input, and the CLI wrapper that turns them into messages.

Every error a user can cause (a missing file, a wrong checkpoint, a bad config key) is raised
as a :class:`LoratError` subclass with a message that names the offending file or key. The
command-line entry points print that message and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

__all__ = ["LoratError", "ConfigError", "WeightsError", "run_cli", "listed", "first_line"]


class LoratError(Exception):
    """Base class of errors caused by user input; the message is meant for the user.

    ``missing`` names a value the caller should add (``"backbone_weights"``); the command-line
    wrapper turns it into the option that gives it (:data:`OPTIONS`).
    """

    def __init__(self, message: str, missing: str | None = None):
        super().__init__(message)
        self.missing = missing


# How every command takes the values a LoratError may ask for.
OPTIONS = {"backbone_weights": "--backbone-weights FILE", "weights": "--weights FILE",
           "phase1_weights": "--phase1-weights FILE"}


class ConfigError(LoratError, ValueError):
    """A config file or override is malformed: unknown key, wrong type, impossible value."""


class WeightsError(LoratError, ValueError):
    """A weight file is missing, unreadable, of an unknown format, or does not fit the model."""


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; print :class:`LoratError` messages (no traceback) and return 2.

    Ctrl-C returns 130, the shell convention. Any other exception propagates: that is a bug.
    """
    try:
        return int(main(argv) or 0)
    except LoratError as err:
        hint = f"; pass {OPTIONS[err.missing]}" if err.missing in OPTIONS else ""
        print(f"error: {err}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def listed(items: list[str], limit: int = 5) -> str:
    """The first ``limit`` items, comma-separated, with ``(+N more)`` for the rest: for messages."""
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def first_line(err: BaseException) -> str:
    """The first line of a library's error message (its type's name when it has none), for one-line errors."""
    return str(err).splitlines()[0] if str(err).strip() else type(err).__name__
