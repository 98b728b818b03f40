"""What the operator asks the service: ``hamal status``, ``hamal health``, ``hamal task ...``.
All of it reads (or flags) the state database; the running loop picks the flags up."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import tempfile
import time
from typing import Any

from hamal.service.state import State, StateError, db_path


def _age(iso: str | None, now: float) -> float | None:
    if not iso:
        return None
    return round(now - dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp(), 1)


def open_state(conf: dict[str, Any]) -> State:
    path = db_path(conf["DEFAULT"]["hamal_lib_dir"])
    if not os.path.exists(path):
        raise StateError(f"no state database at {path}: hamal-period has not run here yet")
    return State(path)


def status(conf: dict[str, Any]) -> dict[str, Any]:
    """Per task and disk: state, last committed version and its time, lag, bytes of the last
    cycle, last error; and the task files that could not be used."""
    state = open_state(conf)
    now = time.time()
    tasks = []
    for row in state.task_rows():
        spec = json.loads(row["spec"])
        cycles = state.last_cycles(row["id"], 1)
        last = cycles[0] if cycles else None
        if row["paused"]:
            current = "paused"
        elif last is None:
            current = "new"
        else:
            current = last["state"]
        disks = [
            {
                "disk": d["disk_id"],
                "version": d["version"],
                "cursor": d["cursor"],
                "committed_at": d["committed_at"],
                "lag_seconds": _age(d["snapshot_time"], now),
                "bytes_last_cycle": d["bytes_last"],
                "size": d["size"],
            }
            for d in state.cursors(row["id"]).values()
        ]
        tasks.append(
            {
                "id": row["id"],
                "vm": spec["vm"]["name"],
                "vm_uuid": spec["vm"]["uuid"],
                "platform": spec["vm"]["platform"],
                "target": spec["target"]["uri"],
                "origin": row["origin"],
                "enabled": spec.get("enabled", True),
                "state": "deleting" if row["deleting"] else current,
                "resync_asked": row["resync_reason"],
                "last_cycle": dict(last) | {"detail": None} if last else None,
                "last_error": last["error"] if last and last["state"] != "ok" else None,
                "disks": sorted(disks, key=lambda d: d["disk"]),
            }
        )
    problems = [{"origin": p["origin"], "error": p["message"], "since": p["at"]} for p in state.problems()]
    tick = state.last_tick()
    link = json.loads(state.meta("mass_link") or "null")
    if link is not None or conf["mass"]["mass_endpoint"]:
        link = (link or {"state": "not connected yet", "since": None, "error": None}) | {
            "endpoint": conf["mass"]["mass_endpoint"],
            "buffered_messages": state.outbox_count(),
        }
    state.close()
    return {
        "loop_last_tick_age_seconds": round(now - tick, 1) if tick else None,
        "control_plane": link,
        "tasks": tasks,
        "problems": problems,
    }


def health(conf: dict[str, Any]) -> list[str]:
    """Why the service is not healthy (empty: healthy): the loop ticked within 3 intervals,
    the state database opens, the log folder is writable. (The config was loaded by the caller.)"""
    problems = []
    path = db_path(conf["DEFAULT"]["hamal_lib_dir"])
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            row = con.execute("SELECT v FROM meta WHERE k = 'tick'").fetchone()
        finally:
            con.close()
        limit = 3 * int(conf["period"]["interval"])
        if row is None:
            problems.append("the service loop has not ticked yet")
        elif time.time() - float(row[0]) > limit:
            problems.append(
                f"the service loop last ticked {time.time() - float(row[0]):.0f} s ago (limit {limit} s)"
            )
    except sqlite3.Error as e:
        problems.append(f"state database {path}: {e}")
    folder = conf["DEFAULT"]["log_dir"]
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".health-"):
            pass
    except OSError as e:
        problems.append(f"log folder {folder} is not writable: {e.strerror}")
    return problems


ACTIONS = {
    "pause": {"paused": 1},
    "resume": {"paused": 0},
    "run-now": {"run_now": 1},
    "resync": {"resync_reason": "asked by the operator (hamal task resync)"},
}


def task_action(conf: dict[str, Any], action: str, task_id: str) -> str:
    state = open_state(conf)
    try:
        if not state.set_flag(task_id, **ACTIONS[action]):
            raise StateError(f"no task {task_id!r} (see hamal task list)")
    finally:
        state.close()
    return {
        "pause": f"task {task_id} paused: no new cycle starts until it is resumed",
        "resume": f"task {task_id} resumed",
        "run-now": f"task {task_id} runs at the next tick",
        "resync": f"task {task_id}: its next cycle syncs every disk in full",
    }[action]


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s / n:.1f}{unit}"
    return f"{s:.0f}s"


def render(report: dict[str, Any]) -> str:
    """``hamal status`` as text: a line per task, one per disk under it."""
    from hamal.units import human

    out = []
    tick = report["loop_last_tick_age_seconds"]
    out.append(f"service loop: last tick {_dur(tick)} ago" if tick is not None else "service loop: never ran")
    link = report.get("control_plane")
    if link:
        line = f"control plane: Mass at {link['endpoint']}: {link['state']}"
        line += f" since {link['since']}" if link["since"] else ""
        line += f", {link['buffered_messages']} messages buffered"
        out.append(line + (f" ({link['error']})" if link["error"] else ""))
    for t in report["tasks"]:
        out.append(f"{t['id']}  {t['platform']} VM {t['vm']} ({t['vm_uuid']}) -> {t['target']}: {t['state']}")
        for d in t["disks"]:
            last = human(d["bytes_last_cycle"]) if d["bytes_last_cycle"] is not None else "-"
            out.append(
                f"  {d['disk']:<12} version {d['version'] or '-':<26} committed {d['committed_at'] or '-'}"
                f"  lag {_dur(d['lag_seconds'])}  last cycle {last}"
            )
        if t["last_error"]:
            out.append(f"  last error: {t['last_error']}")
    for p in report["problems"]:
        out.append(f"problem: {p['error']}")
    return "\n".join(out)
