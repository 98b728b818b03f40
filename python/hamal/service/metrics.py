"""The service's Prometheus endpoint (``[metrics] listen``, default 127.0.0.1:9787; empty: off).

Every scrape reads the state database, so the figures are the ones ``hamal status`` shows:

- ``hamal_disk_lag_seconds{task,disk}``: now minus the time of the disk's last committed data;
- ``hamal_disk_last_success_timestamp_seconds{task,disk}``;
- ``hamal_disk_synced_bytes_total{task,disk}``: bytes moved by committed cycles;
- ``hamal_cycle_duration_seconds{task}``: the last cycle's wall time;
- ``hamal_cycle_failures_total{task}``: failed cycles in the kept history;
- ``hamal_snapshots_held{task}``: snapshots (or bitmaps) kept on the platform as cursors;
- ``hamal_loop_last_tick_timestamp_seconds``.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("hamal.metrics")


def _ts(iso: str | None) -> float | None:
    if not iso:
        return None
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class StateCollector:
    def __init__(self, db: str) -> None:
        self.db = db

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        now = dt.datetime.now(dt.timezone.utc).timestamp()
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        try:
            disks = con.execute(
                "SELECT task_id, disk_id, snapshot_time, committed_at, bytes_total, cursor FROM disks"
            )
            lag = GaugeMetricFamily(
                "hamal_disk_lag_seconds", "Age of the disk's last committed data", labels=["task", "disk"]
            )
            ok = GaugeMetricFamily(
                "hamal_disk_last_success_timestamp_seconds",
                "When the disk last committed",
                labels=["task", "disk"],
            )
            moved = CounterMetricFamily(
                "hamal_disk_synced_bytes", "Bytes moved by committed cycles", labels=["task", "disk"]
            )
            held = GaugeMetricFamily(
                "hamal_snapshots_held", "Snapshots or bitmaps kept as cursors", labels=["task"]
            )
            per_task: dict[str, int] = {}
            for task, disk, snap, committed, total, cursor in disks:
                if snap:
                    lag.add_metric([task, disk], now - (_ts(snap) or now))
                if committed:
                    ok.add_metric([task, disk], _ts(committed) or 0)
                moved.add_metric([task, disk], total or 0)
                per_task[task] = per_task.get(task, 0) + (1 if cursor else 0)
            for task, n in per_task.items():
                held.add_metric([task], n)
            duration = GaugeMetricFamily(
                "hamal_cycle_duration_seconds", "The last cycle's duration", labels=["task"]
            )
            for task, seconds in con.execute(
                "SELECT task_id, seconds FROM cycles WHERE id IN (SELECT MAX(id) FROM cycles "
                "WHERE state != 'running' GROUP BY task_id)"
            ):
                duration.add_metric([task], seconds or 0)
            failures = CounterMetricFamily("hamal_cycle_failures", "Failed cycles", labels=["task"])
            for task, n in con.execute(
                "SELECT task_id, COUNT(*) FROM cycles WHERE state IN ('failed', 'partial') GROUP BY task_id"
            ):
                failures.add_metric([task], n)
            tick = GaugeMetricFamily("hamal_loop_last_tick_timestamp_seconds", "The service loop's last tick")
            row = con.execute("SELECT v FROM meta WHERE k = 'tick'").fetchone()
            if row:
                tick.add_metric([], float(row[0]))
            yield from (lag, ok, moved, held, duration, failures, tick)
        except sqlite3.Error as e:
            log.warning("metrics: cannot read the state database: %s", e)
        finally:
            con.close()


def serve(conf: dict[str, Any], db: str) -> None:
    """Starts the endpoint in a thread of this process, when ``[metrics] listen`` is set."""
    listen = conf["metrics"]["listen"]
    if not listen:
        return
    from prometheus_client import CollectorRegistry, start_http_server

    host, _, port = listen.rpartition(":")
    registry = CollectorRegistry()
    registry.register(StateCollector(db))  # type: ignore[arg-type]
    try:
        start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    except OSError as e:
        log.error("metrics endpoint %s not started: %s", listen, e)
        return
    log.info("metrics on http://%s/metrics", listen)
