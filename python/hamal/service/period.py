"""``hamal-period``: the sync proxy service's loop (also ``python -m hamal.service.period``).

Every second it reaps and watches workers; every ``[period] interval`` seconds (and on SIGHUP,
which also reloads ``hamal.conf``) it reloads the tasks (``[period] tasks_dir``). A task is due
``interval`` seconds (its own ``schedule.interval`` or ``[period] interval``) after its last
cycle started, inside its time windows, unless paused; ``hamal task run-now`` makes it due at
once. A VM's cycles are strictly serial; different VMs run in parallel, with at most
``[data_sync_v2] parallel_sync_disks_count`` disks in flight across the proxy (a cycle takes
one slot per disk). A failed cycle is retried ``cycle_retries`` times ``cycle_retry_delay``
seconds apart, then waits for its next interval.

Each cycle runs in a worker process (``worker.py``) that reports at least every
``task_update_wait_time`` seconds; one silent for ``worker_silence_timeout`` seconds is killed.
SIGTERM (``docker stop``): no new cycle, running ones are cancelled at a chunk boundary (their
journals kept, their snapshots released) and the process exits within 10 s. Started again, it
marks cycles it did not see end as interrupted and runs them again: each worker first removes
hamal's snapshots that no cursor references, and the journal resumes what was durable.

With ``[mass] mass_endpoint`` set, a link thread (``hamal.control.link``) brings Mass's tasks
and commands into the state database and delivers the outbox; the loop hands it each cycle's
progress (at most one per task per ``task_update_wait_time``, kept in memory) and queues its
result in the outbox. A task Mass
deletes is cancelled if running, then a worker removes hamal's snapshots of it, and the task,
its cursors and history are forgotten.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from hamal import _native
from hamal.config import load_config
from hamal.control import link as mass
from hamal.control.mass import hamal_info, utc_now
from hamal.errors import ConfigError, HamalError
from hamal.service import logs
from hamal.service.state import State, StateError, db_path
from hamal.service.tasks import Task, TaskError, load_dir, parse_task, secret_values

log = logging.getLogger("hamal.period")
STOP_GRACE_S = 8.0  # workers get this long to stop after SIGTERM; docker waits 10 s


@dataclass
class Worker:
    task: Task
    proc: subprocess.Popen[str]
    cycle_id: int
    attempt: int
    slots: int
    started: float
    last_seen: float
    kind: str = "cycle"  # or "delete": removing a deleted task's snapshots
    started_wall: str = field(default_factory=utc_now)
    events: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    result: dict[str, Any] | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    progress_sent: float = 0.0
    term_sent: bool = False


@dataclass
class Schedule:
    next_due: float = 0.0
    attempt: int = 1
    last_state: str | None = None


def _read_lines(stream: Any, sink: Any) -> None:
    for line in stream:
        sink(line.rstrip("\n"))


class Service:
    def __init__(self, config: str | None, once: bool = False) -> None:
        self.config_path = config
        self.once = once
        self.stopping = False
        self.reload_asked = False
        self.workers: dict[str, Worker] = {}
        self.schedule: dict[str, Schedule] = {}
        self.tasks: dict[str, Task] = {}
        self.task_errors: dict[str, str] = {}
        self.load_config()
        self.state = State(db_path(self.conf["DEFAULT"]["hamal_lib_dir"]))
        self.once_done: set[str] = set()
        self.failures = 0
        self.link: mass.MassLink | None = None
        self.delete_after: dict[str, float] = {}  # a failed delete is tried again after this

    def load_config(self) -> None:
        self.cfg = load_config(self.config_path)
        self.conf = self.cfg.as_dict()
        self.sublog = logs.setup_service(self.conf)
        for section, key in self.cfg.secret_keys():
            logs.add_secret(str(self.conf[section][key]))

    # Tasks

    def reload_tasks(self) -> None:
        folder = self.conf["period"]["tasks_dir"]
        tasks, errors = load_dir(folder)
        for path, msg in errors.items():
            if self.task_errors.get(path) != msg:  # said once, not at every reload
                log.error("task file not used: %s", msg)
        self.task_errors = errors
        self.state.set_problems(errors, folder)
        self.state.trim_history()
        self.state.sync_tasks({t.id: (t.origin, t.raw) for t in tasks}, "file")
        self.tasks = {}
        for row in self.state.task_rows():
            if row["origin"] == "mass":
                for secret in secret_values(json.loads(row["spec"])):
                    logs.add_secret(secret)
            try:
                self.tasks[row["id"]] = parse_task(json.loads(row["spec"]), row["origin"], row["id"])
            except TaskError as e:  # stored specs were checked when stored; a downgrade may differ
                log.error("%s", e)
        for tid in list(self.schedule):
            if tid not in self.tasks:
                del self.schedule[tid]
        log.info("%d tasks loaded from %s (%d bad files)", len(self.tasks), folder, len(errors))
        self.last_reload = time.monotonic()

    def interval(self, task: Task) -> int:
        return task.interval or int(self.conf["period"]["interval"])

    def due(self, now: float, rows: dict[str, Any] | None = None) -> list[Task]:
        wall = dt.datetime.now()
        if rows is None:
            rows = {r["id"]: r for r in self.state.task_rows()}
        out = []
        for tid, task in self.tasks.items():
            row = rows.get(tid)
            if row is None or tid in self.workers or not task.enabled or row["paused"] or row["deleting"]:
                continue
            if self.once and tid in self.once_done:
                continue
            sched = self.schedule.setdefault(tid, Schedule(next_due=now))
            if row["run_now"] or (sched.next_due <= now and task.in_window(wall)):
                out.append(task)
        return out

    # Workers

    def slots_free(self) -> int:
        limit = int(self.conf["data_sync_v2"]["parallel_sync_disks_count"])
        return limit - sum(w.slots for w in self.workers.values())

    def weight(self, task: Task) -> int:
        images = task.connection.get("images")
        n = len(images) if isinstance(images, dict) else 1
        return max(1, min(n, int(self.conf["data_sync_v2"]["parallel_sync_disks_count"])))

    def start_worker(self, task: Task, kind: str = "cycle") -> None:
        row = self.state.task_row(task.id)
        sched = self.schedule.setdefault(task.id, Schedule())
        if kind == "cycle":
            slots = min(self.weight(task), max(self.slots_free(), 0))
            cycle_id = self.state.start_cycle(task.id, sched.attempt)
        else:
            slots, cycle_id = 0, 0
        if row and row["run_now"]:
            self.state.set_flag(task.id, run_now=0)
        job = {
            "config": self.config_path,
            "mode": kind,
            "task": {"id": task.id, "origin": task.origin, "spec": task.raw},
            "attempt": sched.attempt,
            "cycle_id": cycle_id,
            "slots": slots,
            "resync": row["resync_reason"] if row else None,
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "hamal.service.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a terminal's Ctrl-C reaches the loop, which stops workers
        )
        now = time.monotonic()
        w = Worker(task, proc, cycle_id, sched.attempt, slots, now, now, kind=kind)
        assert proc.stdin and proc.stdout and proc.stderr
        proc.stdin.write(json.dumps(job) + "\n")
        proc.stdin.flush()
        threading.Thread(
            target=_read_lines, args=(proc.stdout, lambda ln: self._event(w, ln)), daemon=True
        ).start()
        prefix = f"[{task.id} pid {proc.pid}] "
        threading.Thread(
            target=_read_lines,
            args=(proc.stderr, lambda ln: self.sublog.info("%s%s", prefix, ln)),
            daemon=True,
        ).start()
        self.workers[task.id] = w
        if kind == "delete":
            self.sublog.info("started worker pid %d to remove deleted task %s", proc.pid, task.id)
            return
        sched.next_due = time.monotonic() + self.interval(task)
        self.sublog.info(
            "started worker pid %d for task %s (cycle %d, attempt %d)",
            proc.pid,
            task.id,
            cycle_id,
            sched.attempt,
        )
        log.info("cycle of task %s (VM %s) started, attempt %d", task.id, task.vm_name, sched.attempt)

    def _event(self, w: Worker, line: str) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            self.sublog.info("[%s] %s", w.task.id, line)
            return
        w.events.put(msg)

    def poll_workers(self) -> None:
        now = time.monotonic()
        silence = float(self.conf["period"]["worker_silence_timeout"])
        for tid, w in list(self.workers.items()):
            while not w.events.empty():
                msg = w.events.get()
                w.last_seen = now
                if msg.get("event") == "result":
                    w.result = msg
                else:
                    w.progress = msg
            if (
                self.link
                and w.progress
                and w.task.origin == "mass"
                and w.kind == "cycle"
                and now - w.progress_sent >= self.progress_every()
            ):
                self.link.queue_progress(tid, w.cycle_id, w.attempt, w.progress)
                w.progress_sent = now
            code = w.proc.poll()
            if code is None:
                if now - w.last_seen > silence:
                    self.sublog.error(
                        "worker pid %d of task %s silent for %.0f s: killed", w.proc.pid, tid, silence
                    )
                    w.proc.kill()
                continue
            # Drain what the reader thread has not handed over yet.
            time.sleep(0.05)
            while not w.events.empty():
                msg = w.events.get()
                if msg.get("event") == "result":
                    w.result = msg
            self.finish(w, code)
            del self.workers[tid]

    def progress_every(self) -> float:
        return max(float(self.conf["period"]["task_update_wait_time"]), 0.2)

    def finish(self, w: Worker, code: int) -> None:
        _stop_helpers(w.proc.pid)
        r = w.result or {
            "state": "failed",
            "error": f"the worker died ({'signal ' + str(-code) if code < 0 else 'exit ' + str(code)}) "
            "before reporting a result",
        }
        if w.kind == "delete":
            self.finish_delete(w, r)
            return
        outcome = r["state"]
        took = time.monotonic() - w.started
        if self.link is not None and w.task.origin == "mass":
            self.link.queue_result(self.state, w.task.id, w.cycle_id, w.attempt, w.started_wall, took, r)
        self.state.end_cycle(
            w.cycle_id,
            outcome,
            error=r.get("error"),
            bytes_moved=int(r.get("bytes") or 0),
            seconds=took,
            detail=r.get("disks"),
        )
        sched = self.schedule.setdefault(w.task.id, Schedule())
        sched.last_state = outcome
        self.sublog.info("worker pid %d of task %s ended: %s", w.proc.pid, w.task.id, outcome)
        if outcome == "ok":
            log.info("cycle of task %s ok in %.1f s, %d bytes", w.task.id, took, int(r.get("bytes") or 0))
            sched.attempt = 1
            row = self.state.task_row(w.task.id)
            if row and row["resync_reason"]:
                self.state.set_flag(w.task.id, resync_reason=None)
        elif outcome == "cancelled":
            log.warning("cycle of task %s cancelled", w.task.id)
        else:
            self.failures += 1
            log.error("cycle of task %s %s: %s", w.task.id, outcome, r.get("error"))
            retries = int(self.conf["period"]["cycle_retries"])
            if sched.attempt <= retries and not self.once:
                delay = float(self.conf["period"]["cycle_retry_delay"])
                sched.attempt += 1
                sched.next_due = time.monotonic() + delay
                log.info("task %s: attempt %d in %.0f s", w.task.id, sched.attempt, delay)
            else:
                sched.attempt = 1
        if self.once:
            self.once_done.add(w.task.id)

    # Tasks deleted by Mass

    def handle_deletions(self, rows: dict[str, Any]) -> None:
        """Deleted tasks: a running cycle is cancelled, then a worker removes the snapshots."""
        for row in rows.values():
            tid = row["id"]
            if not row["deleting"] or time.monotonic() < self.delete_after.get(tid, 0.0):
                continue
            w = self.workers.get(tid)
            if w is not None:
                if w.kind == "cycle" and not w.term_sent and w.proc.poll() is None:
                    log.info("task %s deleted by Mass: cancelling its running cycle", tid)
                    w.proc.send_signal(signal.SIGTERM)
                    w.term_sent = True
                continue
            try:
                task = parse_task(json.loads(row["spec"]), row["origin"], tid)
            except TaskError as e:
                log.error("deleted task %s: %s; forgotten without cleanup", tid, e)
                self.forget(tid, row["deleting"], "rejected", str(e))
                continue
            self.start_worker(task, kind="delete")

    def finish_delete(self, w: Worker, r: dict[str, Any]) -> None:
        tid = w.task.id
        row = self.state.task_row(tid)
        if row is None or not row["deleting"]:
            return
        if r["state"] == "ok":
            log.info("task %s deleted: %s", tid, r.get("detail") or "nothing of hamal's was left on the VM")
            self.forget(tid, row["deleting"], "done", str(r.get("detail") or ""))
        else:
            log.error(
                "deleting task %s failed (tried again in %.0f s): %s",
                tid,
                self.interval(w.task),
                r.get("error"),
            )
            self.delete_after[tid] = time.monotonic() + self.interval(w.task)

    def forget(self, tid: str, cid: str, outcome: str, message: str) -> None:
        self.state.delete_task(tid)
        self.state.record_command(cid, tid, "delete", outcome)
        mass.queue_ack(self.state, cid, tid, "delete", outcome, message)
        self.schedule.pop(tid, None)
        self.tasks.pop(tid, None)
        self.delete_after.pop(tid, None)
        if self.link:
            self.link.wake.set()

    # The loop

    def write_info(self, info: dict[str, Any] | None = None) -> None:
        """``hamal_info_path``: what this proxy is (also what it registers with Mass)."""
        path = self.conf["DEFAULT"]["hamal_info_path"]
        info = dict(info or hamal_info([], utc_now()))
        info["pid"] = os.getpid()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(info, f, indent=2)
        os.replace(tmp, path)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._reload)
        interrupted = self.state.interrupt_running()
        if interrupted:
            log.warning("%d cycles were interrupted by the last stop; they run again", interrupted)
        self.write_info()
        from hamal.service import metrics

        metrics.serve(self.conf, self.state.path)
        self.reload_tasks()
        if self.conf["mass"]["mass_endpoint"]:
            self.link = mass.MassLink(
                self.conf, self.state.path, lambda: (len(self.workers), len(self.tasks)), self.write_info
            )
            self.link.start()
        log.info("hamal-period %s started (pid %d)", _native.__version__, os.getpid())
        while not self.stopping:
            if self.link and self.link.changed.is_set():
                self.link.changed.clear()
                self.reload_tasks()
            if self.reload_asked:
                self.reload_asked = False
                log.info("SIGHUP: reloading the configuration and the tasks")
                self.load_config()
                self.reload_tasks()
            elif time.monotonic() - self.last_reload >= float(self.conf["period"]["interval"]):
                self.reload_tasks()
            self.poll_workers()
            rows = {r["id"]: r for r in self.state.task_rows()}  # one read per tick, not per task
            self.handle_deletions(rows)
            now = time.monotonic()
            for task in self.due(now, rows):
                if self.slots_free() <= 0:
                    break
                self.start_worker(task)
            self.state.tick()
            if self.once and not self.workers and not self.due(time.monotonic()):
                break
            time.sleep(0.2 if self.workers else 0.5)
        self.shutdown()
        return 1 if self.once and self.failures else 0

    def _stop(self, signum: int, _frame: Any) -> None:
        if not self.stopping:
            log.info("%s: stopping", signal.Signals(signum).name)
        self.stopping = True

    def _reload(self, _signum: int, _frame: Any) -> None:
        self.reload_asked = True

    def shutdown(self) -> None:
        for w in self.workers.values():
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while self.workers and time.monotonic() < deadline:
            self.poll_workers()
            time.sleep(0.05)
        for w in list(self.workers.values()):
            self.sublog.error("worker pid %d of task %s did not stop in time: killed", w.proc.pid, w.task.id)
            w.proc.kill()
            w.proc.wait()
            self.finish(w, w.proc.returncode)
        self.workers.clear()
        self.state.tick()
        if self.link:
            self.link.stop()
        loop_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        worker_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        log.info(
            "hamal-period stopped (peak RSS: loop %d MiB, largest worker %d MiB)",
            loop_kib >> 10,
            worker_kib >> 10,
        )


def _stop_helpers(pgid: int) -> None:
    """Stops what is left of a finished worker's process group (it leads its own session):
    helpers such as a KVM disk's qemu-nbd export outlive a worker that was killed, and would
    keep the image open for good."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left: the worker stopped its helpers itself


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hamal-period", description="the hamal sync proxy service")
    p.add_argument("--config", help="hamal.conf path (default: $HAMAL_CONF or /etc/hamal/hamal.conf)")
    p.add_argument(
        "--once", action="store_true", help="run one cycle of every due task, then exit (1 if one failed)"
    )
    args = p.parse_args(argv)
    try:
        if args.config is not None and not os.path.isfile(args.config):
            raise ConfigError(f"--config {args.config}: no such file")
        return Service(args.config, once=args.once).run()
    except (HamalError, StateError, OSError) as e:
        print(f"hamal-period: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
