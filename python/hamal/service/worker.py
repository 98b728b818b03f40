"""One cycle of one VM, in a process of its own (``python -m hamal.service.worker``), so a crash
inside a native library (librbd, VDDK) fails that VM's cycle only.

The loop writes one JSON line to the worker's stdin (the job) and keeps the pipe open: when it
closes (the loop died) the cycle is cancelled. The worker writes JSON lines to stdout:
``{"event": "progress", ...}`` at least every ``task_update_wait_time`` seconds (the loop kills a
worker that goes silent), and one ``{"event": "result", ...}`` at the end. Its log is the VM's
log file; errors also go to stderr, which the loop copies to ``hamal-period-subprocess.log``.

A cycle: remove orphan snapshots, discover the VM, choose its disks, ``begin`` (snapshot and
changes), sync every disk in one engine job, record each committed disk's cursor and version
(state, one transaction each), ``commit`` (drop the old snapshots) or ``abort``, prune old
versions, and write the VM's addresses to ``ip_mapping.backup``. SIGTERM cancels at a chunk
boundary: what is durable stays journaled and the next cycle resumes or redoes it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from hamal import _native, platforms, sync
from hamal.config import load_config
from hamal.errors import HamalError
from hamal.platforms.base import Cycle, selectable
from hamal.service import confine, logs
from hamal.service.state import State, db_path
from hamal.service.tasks import Task, check_disk_id, parse_task, secret_values

log = logging.getLogger("hamal.cycle")


class Reporter:
    """Writes JSON lines for the loop; a thread keeps reporting while the cycle is busy."""

    def __init__(self, every: float) -> None:
        self.every = max(every, 0.2)
        self.lock = threading.Lock()
        self.status: dict[str, Any] = {"event": "progress", "phase": "starting"}
        self.stop = threading.Event()
        threading.Thread(target=self._beat, daemon=True).start()

    def emit(self, msg: dict[str, Any]) -> None:
        with self.lock:
            sys.stdout.write(json.dumps(msg) + "\n")
            sys.stdout.flush()

    def update(self, **fields: Any) -> None:
        with self.lock:
            self.status.update(fields)

    def _beat(self) -> None:
        while not self.stop.wait(self.every):
            with self.lock:
                msg = dict(self.status)
            self.emit(msg)


class Cancel:
    """Set by SIGTERM or when the loop's pipe closes; the running job is cancelled."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.job: Any = None
        signal.signal(signal.SIGTERM, lambda *_: self.set("SIGTERM"))
        threading.Thread(target=self._watch_stdin, daemon=True).start()

    def set(self, why: str) -> None:
        if not self.event.is_set():
            log.warning("cancelling the cycle: %s", why)
        self.event.set()
        if self.job is not None:
            self.job.cancel()

    def _watch_stdin(self) -> None:
        sys.stdin.read()  # returns at EOF: the loop is gone
        self.set("the service stopped")


def task_lock(lib_dir: str, task_id: str, wait_s: float = 20) -> int:
    """One worker per task at a time, also across a restart of the loop (a worker of the old
    loop may still be finishing). Returns the held file descriptor."""
    folder = os.path.join(lib_dir, "locks")
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, f"task-{logs.safe_name(task_id)}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise HamalError(f"task {task_id}: an earlier cycle's worker still runs") from None
            time.sleep(0.2)


def run_cycle(
    cfg: _native.Config, task: Task, job: dict[str, Any], reporter: Reporter, cancel: Cancel
) -> dict[str, Any]:
    conf = cfg.as_dict()
    lib_dir = conf["DEFAULT"]["hamal_lib_dir"]
    task_lock(lib_dir, task.id)
    state = State(db_path(lib_dir))
    adapter = platforms.adapter_for(task.platform, conf)
    started = time.monotonic()
    log.info("cycle of VM %s (%s), task %s, attempt %d", task.vm_name, task.vm_uuid, task.id, job["attempt"])
    rows = state.cursors(task.id)
    reporter.update(phase="cleanup")
    for what in adapter.cleanup_orphans(task, {r["cursor"] for r in rows.values() if r["cursor"]}):
        log.warning("removed an orphan left by an interrupted cycle: %s", what)
    reporter.update(phase="discover")
    vm = adapter.discover(task)
    skip, flag_mb = platforms.disk_flag_rule(conf, task.platform)
    for d in vm.disks:
        check_disk_id(d.id, f"VM {task.vm_name}: a disk the platform reports")
    vm.disks = selectable([d for d in vm.disks if task.wanted(d.id)], skip, flag_mb)
    confine.check_task(task, conf, [d.id for d in vm.disks], owned=rows)
    if not vm.disks:
        raise HamalError(f"VM {task.vm_name}: no disk to sync (all left out)")
    resync = job.get("resync")
    if resync:
        log.warning("full resync of every disk: %s", resync)
    cursors = {d.id: None if resync else (rows[d.id]["cursor"] if d.id in rows else None) for d in vm.disks}
    reporter.update(phase="snapshot")
    cycle = adapter.begin(task, vm, cursors)
    log.info("snapshot taken at %s", cycle.snapshot_time)
    try:
        results = sync_disks(cfg, task, cycle, rows, job, reporter, cancel, resync)
        for dc in cycle.disks:
            r = results[dc.disk.id]
            if "summary" in r:
                s = r["summary"]
                state.commit_disk(
                    task.id,
                    dc.disk.id,
                    cursor=dc.new_cursor,
                    version=s.get("version"),
                    snapshot_time=cycle.snapshot_time,
                    size=s["size"],
                    bytes_moved=s["bytes_written"] + s["bytes_zero"],
                )
                dc.committed = True
                r["cursor"] = dc.new_cursor
        reporter.update(phase="commit")
        adapter.commit(cycle)
    except BaseException:
        adapter.abort(cycle)
        raise
    good = [dc.disk.id for dc in cycle.disks if dc.committed]
    errors = {d: r["error"] for d, r in results.items() if "error" in r}
    for d, e in errors.items():
        log.error("disk %s failed: %s (its cursor stays; the next cycle covers it)", d, e)
    if good and task.keep:
        prune(cfg, state, task, good)
    if good and task.is_store() and not cancel.event.is_set():
        reporter.update(phase="verify")
        check_store(cfg, conf, state, task)
    if good and not errors:
        logs.write_ip_mapping(conf, task.vm_uuid, task.vm_name, vm.addresses)
    moved = sum(r["summary"]["bytes_written"] for r in results.values() if "summary" in r)
    if cancel.event.is_set():
        outcome = "cancelled"
    else:
        outcome = "ok" if not errors else "partial" if good else "failed"
    took = time.monotonic() - started
    log.info("cycle %s in %.1f s: %d of %d disks committed", outcome, took, len(good), len(results))
    return {
        "event": "result",
        "state": outcome,
        "error": "; ".join(f"disk {d}: {e}" for d, e in errors.items()) or None,
        "bytes": moved,
        "seconds": time.monotonic() - started,
        "disks": results,
    }


def sync_disks(
    cfg: _native.Config,
    task: Task,
    cycle: Cycle,
    rows: dict[str, Any],
    job: dict[str, Any],
    reporter: Reporter,
    cancel: Cancel,
    resync: str | None,
) -> dict[str, dict[str, Any]]:
    """Runs the engine over the cycle's disks; returns each disk's summary or error."""
    conf = cfg.as_dict()
    plan = []
    for dc in cycle.disks:
        d = dc.disk.id
        store = task.is_store()
        parent = rows[d]["version"] if d in rows and store and not resync else None
        changed_bytes = sum(n for _, n in dc.changed) if dc.changed else None
        what = f"full sync ({dc.full_reason})" if dc.full_reason else f"incremental from {dc.old_cursor}"
        extra = f", {changed_bytes} bytes changed" if changed_bytes is not None else ""
        log.info("disk %s (%d bytes): %s%s, source %s", d, dc.disk.size, what, extra, dc.source)
        plan.append(
            sync.disk(
                dc.source,
                task.target_for(d),
                disk_id=task.store_disk_id(d) if store else f"{task.id}-{d}",
                changed=dc.changed,
                bitmap=dc.bitmap,
                source_id=dc.new_cursor,
                parent=parent,
                full_on_mismatch=store,
                snapshot_time=cycle.snapshot_time,
                journal=sync.journal_path(cfg, f"task-{task.id}-{d}"),
            )
        )
    options = sync.SyncOptions(
        parallel_disks=max(1, min(int(job.get("slots", 1)), len(plan))),
        platform={"vmware": "vmware", "openstack": "openstack", "rbd": "openstack"}.get(task.platform),
        bwlimit_bps=task.bandwidth_at(dt.datetime.now()),
        key_file=task.key_file,
    )
    reporter.update(phase="sync")
    if cancel.event.is_set():
        raise HamalError("cancelled before the sync started")
    engine = sync.start(plan, cfg, options)
    cancel.job = engine
    if cancel.event.is_set():
        engine.cancel()
    every = max(float(conf["period"]["task_update_wait_time"]), 0.2)
    while True:
        try:
            if engine.wait(timeout=every) is not None:
                break
        except HamalError:
            break  # finished with a failed disk: results() has each disk's outcome
        p = engine.progress()
        disks = [
            {
                "disk": dc.disk.id,
                "state": dp["state"],
                "bytes_done": dp["bytes_done"],
                "bytes_total": dp["bytes_total"],
                "rate_bps": round(dp["rate_bps"], 1),
                "eta_seconds": None if dp["eta_s"] is None else round(dp["eta_s"], 1),
            }
            for dc, dp in zip(cycle.disks, p["disks"])
        ]
        reporter.update(bytes_done=p["bytes_done"], bytes_total=p["bytes_total"], disks=disks)
    out = {}
    for dc, r in zip(cycle.disks, engine.results()):
        entry: dict[str, Any] = {"state": r["state"]}
        if "summary" in r:
            s = r["summary"]
            entry["summary"] = s
            if s.get("full_reason"):
                log.warning("disk %s: synced in full: %s", dc.disk.id, s["full_reason"])
            log.info(
                "disk %s: %s sync, %d bytes written, %d zero, %d resumed in %.2f s; version %s",
                dc.disk.id,
                s["mode"],
                s["bytes_written"],
                s["bytes_zero"],
                s["bytes_resumed"],
                s["seconds"],
                s.get("version") or "-",
            )
        else:
            entry["error"] = r.get("error", "did not run")
            entry["error_kind"] = r.get("error_kind")
        out[dc.disk.id] = entry
    return out


def retire_task(cfg: _native.Config, task: Task) -> dict[str, Any]:
    """A task the control plane deleted: hamal's snapshots of its VM and its journals go."""
    conf = cfg.as_dict()
    lib_dir = conf["DEFAULT"]["hamal_lib_dir"]
    task_lock(lib_dir, task.id)
    state = State(db_path(lib_dir))
    removed = platforms.adapter_for(task.platform, conf).cleanup_orphans(task, set())
    for what in removed:
        log.info("task deleted: removed %s", what)
    for disk in state.cursors(task.id):
        journal = sync.journal_path(cfg, f"task-{task.id}-{disk}")
        if os.path.exists(journal):
            os.remove(journal)
    detail = f"removed {', '.join(removed)}" if removed else "no snapshot of hamal's was left"
    log.info("task %s deleted by the control plane: %s", task.id, detail)
    return {"event": "result", "state": "ok", "detail": detail}


#: Unreferenced chunks are collected at most this often per store (a collection lists the
#: whole store); old version records go at every good cycle.
COLLECT_EVERY_S = 3600


def prune(cfg: _native.Config, state: State, task: Task, disks: list[str]) -> None:
    key = f"collected:{task.target_uri}"
    due = time.time() - float(state.meta(key) or 0) >= COLLECT_EVERY_S
    for i, d in enumerate(disks):
        collect = due and i == len(disks) - 1  # once, after the last disk's records went
        try:
            report = _native.prune_store(
                task.target_uri,
                task.keep or 1,
                cfg,
                disk=task.store_disk_id(d),
                key_file=task.key_file,
                collect=collect,
            )
        except HamalError as e:
            log.warning("disk %s: pruning old versions failed: %s", d, e)
            continue
        if report["removed_versions"]:
            log.info("disk %s: pruned %s", d, ", ".join(report["removed_versions"]))
        if collect and report["gc_skipped"] is None:
            state.set_meta(key, str(time.time()))
            log.info(
                "collected %d chunks and %d index pages", report["removed_chunks"], report["removed_pages"]
            )


def check_store(cfg: _native.Config, conf: dict[str, Any], state: State, task: Task) -> None:
    """Every ``[store] verify_interval`` seconds, re-reads and re-hashes a share of the store's
    chunks, so that every chunk is read within ``verify_full_period``: damage is found without
    waiting for an operator, and a damaged chunk is quarantined for the next cycle to heal."""
    every = int(conf["store"]["verify_interval"])
    if not every:
        return
    key = f"verified:{task.target_uri}"
    last, done = (state.meta(key) or "0 0").split()
    if time.time() - float(last) < every:
        return
    parts = max(1, -(-int(conf["store"]["verify_full_period"]) // every))
    part = int(done) % parts
    try:
        report = _native.verify_store(
            task.target_uri, cfg, deep=True, key_file=task.key_file, sample=(part, parts)
        )
    except HamalError as e:
        log.warning("store check (share %d of %d) failed: %s", part + 1, parts, e)
        return
    state.set_meta(key, f"{time.time()} {int(done) + 1}")
    log.info(
        "store checked: %d chunks re-read (share %d of %d), %d problems",
        report["chunks"],
        part + 1,
        parts,
        len(report["problems"]),
    )
    for problem in report["problems"][:20]:
        log.warning("store check: %s", problem)
    if report["quarantined"]:
        log.warning(
            "store check: %d damaged chunks quarantined; the next cycle reads their data again",
            report["quarantined"],
        )


def main() -> int:
    job = json.loads(sys.stdin.readline())
    try:
        cfg = load_config(job.get("config"))
        conf = cfg.as_dict()
        task = parse_task(job["task"]["spec"], job["task"]["origin"], job["task"]["id"])
        logs.setup_worker(conf, task.log_name())
    except (HamalError, OSError, ValueError) as e:
        print(json.dumps({"event": "result", "state": "failed", "error": str(e)}), flush=True)
        return 1
    for secret in secret_values(job["task"]["spec"]):
        logs.add_secret(secret)
    reporter = Reporter(float(conf["period"]["task_update_wait_time"]))
    cancel = Cancel()
    try:
        if job.get("mode") == "delete":
            result = retire_task(cfg, task)
        else:
            result = run_cycle(cfg, task, job, reporter, cancel)
    except (HamalError, OSError, ValueError) as e:
        log.error("cycle failed: %s", e)
        outcome = "cancelled" if cancel.event.is_set() else "failed"
        result = {"event": "result", "state": outcome, "error": str(e)}
    reporter.stop.set()
    reporter.emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
