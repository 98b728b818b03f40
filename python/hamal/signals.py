"""Stopping at a safe point: Ctrl-C raises KeyboardInterrupt, and ``handle_sigterm`` makes
SIGTERM (``docker stop``, a service manager) raise ``Terminated`` the same way, so a running
job is cancelled at a chunk boundary with its journal kept, instead of the process dying."""

from __future__ import annotations

import signal

# Imported for type checkers only: `typing` costs the CLI's start ~5 ms (tools/bench --only local).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Terminated(BaseException):
    """SIGTERM arrived."""


def _raise(_signum: int, _frame: Any) -> None:
    raise Terminated()


def handle_sigterm() -> None:
    signal.signal(signal.SIGTERM, _raise)


STOPS = (KeyboardInterrupt, Terminated)
