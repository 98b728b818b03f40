"""Showing a running job: a progress bar on a terminal (binary units throughout, as the
summary), progress events as JSON lines for scripts, or nothing."""

from __future__ import annotations

import json
import sys
import time

from hamal import _native
from hamal.errors import HamalError
from hamal.signals import STOPS
from hamal.units import human

# Imported for type checkers only: `typing` costs the CLI's start ~5 ms (tools/bench --only local).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TextIO

POLL_S = 0.25
EVENT_S = 0.5


def wait_with_progress(job: _native.Job, show: bool, events: TextIO | None = None) -> Any:
    """Waits for ``job``; draws a bar on stderr when ``show``, writes a JSON progress event per
    line to ``events`` every half second when given. Ctrl-C or SIGTERM cancels the job cleanly
    (finished chunks stay journaled) and re-raises."""
    bar = _make_bar() if show else None
    last_event = 0.0
    try:
        while True:
            summaries = job.wait(timeout=POLL_S)
            p = job.progress()
            if bar is not None:
                _update(bar, p)
            if events is not None and (summaries is not None or time.monotonic() - last_event >= EVENT_S):
                events.write(json.dumps({"event": "progress", **p}) + "\n")
                events.flush()
                last_event = time.monotonic()
            if summaries is not None:
                return summaries
    except STOPS:
        job.cancel()
        try:
            job.wait(timeout=60)
        except HamalError:
            pass  # the disks' "cancelled": the interruption is what is reported
        raise
    finally:
        if bar is not None:
            bar.close()


def _make_bar() -> Any | None:
    from tqdm import tqdm

    # tqdm's own scaling would label KiB multiples "MB"; the text after the bar is ours.
    return tqdm(
        total=1, file=sys.stderr, desc="sync", bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix}"
    )


def _update(bar: Any, p: dict[str, Any]) -> None:
    total = max(p["bytes_total"], 1)
    done = p["bytes_done"] + p["bytes_resumed"]
    bar.total, bar.n = total, min(done, total)
    eta = f", {p['eta_s']:.0f} s left" if p["eta_s"] is not None and not p["finished"] else ""
    bar.set_postfix_str(
        f"{human(done)} of {human(p['bytes_total'])} at {human(p['rate_bps'])}/s{eta}; "
        f"{human(p['bytes_zero'])} zero, {human(p['bytes_resumed'])} resumed",
        refresh=False,
    )
    bar.refresh()
