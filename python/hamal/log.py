"""Python's ``logging``, imported when something is first logged. The import (with the
``traceback`` and ``tokenize`` it pulls in) was a fifth of a short ``hamal sync``'s start-up; a
command that logs nothing now never pays it. The CLI's set-up waits here until then, and the
engine's log bridge (Rust) calls :func:`ready` before its first record."""

from __future__ import annotations

import sys

# For type checkers only: importing `typing` costs every command ~3 ms of its start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from types import ModuleType

_waiting: int | None = None  # the CLI's level, not applied yet


def cli(verbose: int, lazy: bool) -> None:
    """``hamal: LEVEL: message`` on stderr, WARNING and up (INFO with -v, DEBUG with -vv); with
    ``lazy``, once something is logged."""
    global _waiting
    _waiting = 30 if verbose == 0 else 20 if verbose == 1 else 10
    if verbose or not lazy:
        ready()


def ready() -> ModuleType:
    """Imports ``logging``, applies the set-up that waited, if any, and returns the module."""
    global _waiting
    import logging

    if _waiting is not None:
        level, _waiting = _waiting, None
        logging.basicConfig(level=level, format="hamal: %(levelname)s: %(message)s", stream=sys.stderr)
    return logging


def get(name: str) -> logging.Logger:
    """The logger ``name``, set up."""
    return ready().getLogger(name)
