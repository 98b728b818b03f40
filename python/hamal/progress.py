"""Showing a running job: a progress bar on a terminal, nothing otherwise."""

from __future__ import annotations

import sys
from typing import Any

from hamal import _native
from hamal.units import human

POLL_S = 0.25


def wait_with_progress(job: _native.Job, show: bool) -> Any:
    """Waits for ``job``; draws a bar on stderr when ``show``. Ctrl-C cancels the job cleanly
    (finished chunks stay journaled) and re-raises."""
    bar = _make_bar() if show else None
    try:
        while True:
            summaries = job.wait(timeout=POLL_S)
            if bar is not None:
                _update(bar, job.progress())
            if summaries is not None:
                return summaries
    except KeyboardInterrupt:
        job.cancel()
        job.wait(timeout=60)
        raise
    finally:
        if bar is not None:
            bar.close()


def _make_bar() -> Any | None:
    from tqdm import tqdm

    return tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, desc="sync")


def _update(bar: Any, p: dict[str, Any]) -> None:
    total = p["bytes_total"]
    if bar.total != total:
        bar.total = total
    bar.n = p["bytes_done"] + p["bytes_resumed"]
    bar.set_postfix(zero=human(p["bytes_zero"]), resumed=human(p["bytes_resumed"]), refresh=False)
    bar.refresh()
