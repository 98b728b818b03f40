"""The service's link to Mass: a thread of ``hamal-period`` that registers, sends heartbeats,
fetches the task list (ETag), carries out Mass's commands and delivers the outbox.

Everything it learns goes into the state database (tasks with origin ``mass``, flags, the
commands table) and the loop picks it up from there, so a restart with Mass down runs the
cached tasks. Results, task rejections and command acknowledgements go through the durable
outbox (state database), in order, and leave it only once Mass accepted them (a message resent
after a lost answer carries the same ``message_id``). Progress is not worth a disk write: the
loop hands the link each task's newest progress (at most one per ``task_update_wait_time``),
kept in memory, newer replacing older, and sent after the outbox's messages.

Failures: connection errors, timeouts, 5xx and 429 are retried with backoff and jitter; a
rejected ``auth_key`` or a pinned-key mismatch waits ``[period] interval`` between tries; a 4xx
on one message drops that message, said once. Each change of connectivity is logged once.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from hamal.control.mass import MassClient, hamal_info, lib_free_bytes, message_id, utc_now
from hamal.errors import MassError
from hamal.service import confine, logs
from hamal.service.state import State
from hamal.service.tasks import ID_RE, TaskError, parse_task, secret_values

log = logging.getLogger("hamal.mass")

FLAG_ACTIONS: dict[str, Callable[[str, str], dict[str, Any]]] = {
    "sync_now": lambda cid, why: {"run_now": 1},
    "pause": lambda cid, why: {"paused": 1},
    "resume": lambda cid, why: {"paused": 0},
    "resync": lambda cid, why: {"resync_reason": f"asked by Mass (command {cid}){': ' + why if why else ''}"},
}
BACKOFF_FIRST_S = 1.0
BACKOFF_CAP_S = 60.0


# Messages, queued by whoever has news (the loop, the link); the link sends them.


def queue_ack(state: State, cid: str, tid: str, action: str, outcome: str, message: str = "") -> None:
    body = {
        "message_id": message_id(),
        "command_id": cid,
        "task_id": tid,
        "action": action,
        "state": outcome,
        "message": message,
        "time": utc_now(),
    }
    state.outbox_put("ack", tid, f"commands/{cid}/ack", body)


def progress_body(tid: str, cycle_id: int, attempt: int, msg: dict[str, Any]) -> dict[str, Any]:
    return {
        "message_id": message_id(),
        "task_id": tid,
        "cycle_id": cycle_id,
        "attempt": attempt,
        "phase": msg.get("phase", "starting"),
        "time": utc_now(),
        "disks": msg.get("disks", []),
    }


def queue_result(
    state: State, tid: str, cycle_id: int, attempt: int, started: str, seconds: float, r: dict[str, Any]
) -> None:
    disks = []
    for disk, d in sorted((r.get("disks") or {}).items()):
        s = d.get("summary") or {}
        entry: dict[str, Any] = {"disk": disk, "state": d.get("state", "failed"), "error": d.get("error")}
        if s:
            entry |= {
                "version": s.get("version"),
                "cursor": d.get("cursor"),
                "mode": s["mode"],
                "full_reason": s.get("full_reason"),
                "size": s["size"],
                "bytes_written": s["bytes_written"],
                "bytes_zero": s["bytes_zero"],
                "seconds": s["seconds"],
            }
        disks.append(entry)
    body = {
        "message_id": message_id(),
        "task_id": tid,
        "cycle_id": cycle_id,
        "attempt": attempt,
        "state": r["state"],
        "started": started,
        "ended": utc_now(),
        "seconds": round(seconds, 3),
        "bytes": int(r.get("bytes") or 0),
        "error": r.get("error"),
        "disks": disks,
    }
    state.outbox_put("result", tid, f"tasks/{tid}/results", body)


class MassLink:
    def __init__(
        self,
        conf: dict[str, Any],
        state_path: str,
        stats: Callable[[], tuple[int, int]],
        on_registered: Callable[[dict[str, Any]], None] = lambda info: None,
    ) -> None:
        self.conf = conf
        self.client = MassClient(conf)
        self.state_path = state_path
        self.stats = stats  # (running cycles, tasks)
        self.on_registered = on_registered
        self.interval = float(conf["period"]["interval"])
        self.heartbeats = bool(conf["mass"]["enable_heartbeat_msg"])
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.changed = threading.Event()  # tasks or flags changed: the loop reloads
        self.registered = False
        self.reregisters = 0
        self.bad_commands: set[str] = set()
        self.public_ip_warned = False
        self.failures = 0
        self.down_reason: str | None = None
        self.started = utc_now()
        self.cpu_s = 0.0  # the thread's CPU time so far (tools/bench_mass.py)
        self.progress_lock = threading.Lock()
        self.progress: dict[str, dict[str, Any]] = {}  # task id -> its newest progress
        self.thread = threading.Thread(target=self._run, name="mass-link", daemon=True)

    def start(self) -> None:
        if self.client.http.scheme == "http":
            log.warning(
                "Mass endpoint %s is plain HTTP: auth_key and tasks travel unencrypted", self.client.endpoint
            )
        log.info(
            "control plane: Mass at %s (%s), proxy %s",
            self.client.endpoint,
            self.client.http.trust(),
            self.client.proxy_id,
        )
        self.thread.start()

    def stop(self, wait_s: float = 3.0) -> None:
        """Stops the thread; what the outbox still holds is sent after the next start."""
        self.stopping.set()
        self.wake.set()
        self.thread.join(wait_s)

    # Called by the loop

    def queue_progress(self, tid: str, cycle_id: int, attempt: int, msg: dict[str, Any]) -> None:
        with self.progress_lock:
            self.progress[tid] = progress_body(tid, cycle_id, attempt, msg)
        self.wake.set()

    def queue_result(
        self,
        state: State,
        tid: str,
        cycle_id: int,
        attempt: int,
        started: str,
        seconds: float,
        r: dict[str, Any],
    ) -> None:
        with self.progress_lock:
            self.progress.pop(tid, None)  # the result says it all; no progress after it
        queue_result(state, tid, cycle_id, attempt, started, seconds, r)
        self.wake.set()

    # The thread

    def _run(self) -> None:
        state = State(self.state_path)
        next_beat = next_tasks = 0.0
        while not self.stopping.is_set():
            wait = self.interval
            try:
                if not self.registered:
                    self._register()
                    next_beat = next_tasks = 0.0
                now = time.monotonic()
                if self.heartbeats and now >= next_beat:
                    answer = self.client.heartbeat(self._heartbeat(state))
                    next_beat = now + self.interval
                    self._commands(state, answer.get("commands") or [])
                    if answer.get("tasks_changed"):
                        next_tasks = 0.0
                if now >= next_tasks:
                    self._fetch_tasks(state)
                    next_tasks = now + self.interval
                self._drain(state)
                self._link_up(state)
                due = min(next_tasks, next_beat if self.heartbeats else next_tasks)
                wait = max(0.05, due - time.monotonic())
            except MassError as e:
                wait = self._link_down(state, e)
            except Exception as e:  # a bug here must not stop the link for good
                log.exception("control plane link: unexpected error")
                wait = self._link_down(state, MassError("protocol", f"unexpected: {e}"))
            self.cpu_s = time.thread_time()
            self.wake.wait(wait)
            self.wake.clear()
        self.cpu_s = time.thread_time()
        self.client.close()
        state.close()

    def _register(self) -> None:
        public: list[str] = []
        if self.conf["mass"]["enable_get_public_ips"]:
            try:
                public = [self.client.public_ip()]
            except MassError as e:
                if e.kind not in ("http", "route", "protocol", "timeout"):
                    raise  # Mass is not reachable at all: registering waits for it
                if not self.public_ip_warned:
                    log.warning("public address not known (registering without it): %s", e)
                    self.public_ip_warned = True
        info = hamal_info(public, self.started)
        self.client.register(info)
        self.registered = True
        self.on_registered(info)
        log.info("registered with Mass as proxy %s", self.client.proxy_id)

    def _heartbeat(self, state: State) -> dict[str, Any]:
        running, tasks = self.stats()
        return {
            "time": utc_now(),
            "load": [round(x, 2) for x in os.getloadavg()],
            "running_cycles": running,
            "lib_dir_free_bytes": lib_free_bytes(self.conf["DEFAULT"]["hamal_lib_dir"]),
            "tasks": tasks,
            "buffered_messages": state.outbox_count(),
            "tasks_etag": state.meta("mass_tasks_etag"),
        }

    def _link_up(self, state: State) -> None:
        self.failures = 0
        self.reregisters = 0
        if self.down_reason is not None or state.meta("mass_link") is None:
            if self.down_reason is not None:
                log.warning("Mass reachable again; buffered messages delivered")
            self.down_reason = None
            state.set_meta("mass_link", json.dumps({"state": "up", "since": utc_now(), "error": None}))

    def _link_down(self, state: State, e: MassError) -> float:
        """Says a change of connectivity once; returns how long to wait before the next try."""
        self.client.close()
        if e.kind == "unknown_proxy":
            # At once the first time, then backing off: a Mass that forgets the proxy again
            # after every registration must not be hammered.
            wait = min(self.interval, 0.05 * 2**self.reregisters)
            self.reregisters += 1
            log.warning("Mass does not know this proxy (%s): registering again in %.1f s", e, wait)
            self.registered = False
            return wait
        # Said once per change: up -> unreachable, unreachable <-> refused; not at every try,
        # nor when only the error's wording changes (refused, reset, timed out...).
        how = "refused" if e.kind in ("auth", "pin") else "unreachable"
        if how != self.down_reason:
            if how == "refused":
                log.error("Mass refused: %s; trying again every %.0f s", e, self.interval)
            else:
                log.warning("Mass unreachable (%s): cached tasks keep running, results are buffered", e)
            self.down_reason = how
            state.set_meta("mass_link", json.dumps({"state": "down", "since": utc_now(), "error": str(e)}))
        if e.kind in ("auth", "pin", "route"):
            return self.interval
        self.failures += 1
        cap = min(BACKOFF_CAP_S, max(self.interval, BACKOFF_FIRST_S))
        step = min(cap, BACKOFF_FIRST_S * 2 ** (self.failures - 1))
        return random.uniform(step / 2, step)  # jitter: proxies do not retry in step

    # Tasks and commands

    def _fetch_tasks(self, state: State) -> None:
        answer = self.client.tasks(state.meta("mass_tasks_etag"))
        if answer.status == 304:
            return
        data = answer.data if isinstance(answer.data, dict) else {}
        listed = data.get("tasks")
        if not isinstance(listed, list):
            raise MassError("protocol", "the task list answer has no 'tasks' list")
        commands = data.get("commands") or []
        self._commands(state, commands, only_known=True)  # a delete of a task leaving the list
        stored = {r["id"]: r for r in state.task_rows()}
        good: dict[str, tuple[str, dict[str, Any]]] = {}
        where: dict[str, int] = {}
        rejected: list[tuple[int, str | None, str]] = []
        for i, spec in enumerate(listed):
            for secret in secret_values(spec):
                logs.add_secret(secret)
            tid = spec.get("id") if isinstance(spec, dict) and isinstance(spec.get("id"), str) else None
            label = f"Mass task #{i}" + (f" ({tid})" if tid else "")
            try:
                task = parse_task(spec, "mass")
                confine.check_task(task, self.conf)
            except TaskError as e:
                rejected.append((i, tid, f"{label}: {str(e).removeprefix('mass: ')}"))
                old = stored.get(tid) if tid else None
                if old is not None and old["origin"] == "mass":  # a bad update: the last good one runs on
                    good[old["id"]] = ("mass", json.loads(old["spec"]))
                continue
            if task.id in where:
                rejected.append((i, tid, f"{label}: id {task.id!r} is also task #{where[task.id]}"))
                continue
            where[task.id] = i
            good[task.id] = ("mass", spec)
        for tid, origin in state.sync_tasks(good, "mass").items():
            rejected.append(
                (where.get(tid, 0), tid, f"Mass task ({tid}): id {tid!r} is already used by {origin}")
            )
        problems = {}
        for i, tid, err in rejected:
            log.error("%s", err)
            problems[f"mass:{tid or '#' + str(i)}"] = err
            body = {"message_id": message_id(), "task_id": tid, "index": i, "error": err, "time": utc_now()}
            state.outbox_put("rejection", tid, "task-rejections", body)
        state.set_problems(problems, "mass:")
        self._commands(state, commands)
        state.set_meta("mass_tasks_etag", answer.etag or "")
        log.info("task list from Mass: %d tasks (%d rejected)", len(listed), len(rejected))
        self.changed.set()

    def _commands(self, state: State, commands: list[Any], only_known: bool = False) -> None:
        for c in commands:
            if not (
                isinstance(c, dict) and all(isinstance(c.get(k), str) for k in ("id", "task_id", "action"))
            ):
                log.error("a command from Mass without id, task_id and action was ignored")
                continue
            cid, tid, action, why = c["id"], c["task_id"], c["action"], str(c.get("reason") or "")
            if not (ID_RE.match(cid) and ID_RE.match(tid)):
                # It could never be acknowledged (the id goes into the route): said once, ignored.
                if cid not in self.bad_commands:
                    self.bad_commands.add(cid)
                    log.error(
                        "a command from Mass with id %r for task %r was ignored: ids are 1 to 64"
                        " letters, digits, '.', '_' or '-'",
                        cid,
                        tid,
                    )
                continue
            if state.command(cid) is not None:
                continue  # carried out already (Mass resends until it sees the acknowledgement)
            row = state.task_row(tid)
            if row is None and only_known:
                continue
            problem = None
            if row is None:
                problem = f"no task {tid} on this proxy"
            elif row["origin"] != "mass":
                problem = f"task {tid} comes from the task file {row['origin']}, not from Mass"
            elif action != "delete" and action not in FLAG_ACTIONS:
                problem = f"unknown action {action!r}"
            if problem is not None:
                log.error("command %s (%s of task %s) refused: %s", cid, action, tid, problem)
                state.record_command(cid, tid, action, "rejected")
                queue_ack(state, cid, tid, action, "rejected", problem)
                continue
            log.info("command %s from Mass: %s task %s%s", cid, action, tid, f" ({why})" if why else "")
            if action == "delete":
                state.set_flag(tid, deleting=cid)  # the loop cancels, cleans up, then acknowledges
                state.record_command(cid, tid, action, "pending")
            else:
                state.set_flag(tid, **FLAG_ACTIONS[action](cid, why))
                state.record_command(cid, tid, action, "done")
                queue_ack(state, cid, tid, action, "done")
            self.changed.set()

    # The outbox

    def _drain(self, state: State) -> None:
        """The outbox in order, then the newest progress of each task. Delivered messages are
        removed in batches (one disk write each): after a crash a few may be sent again."""
        while not self.stopping.is_set():
            rows = state.outbox_head()
            if not rows:
                break
            done: list[int] = []
            try:
                for r in rows:
                    try:
                        self.client.post(r["route"], json.loads(r["body"]))
                    except MassError as e:
                        if e.kind != "http" or e.retryable:
                            raise  # the link is down: keep the message and the order
                        log.error(
                            "Mass refused a %s message (task %s), dropped: %s", r["kind"], r["task_id"], e
                        )
                    done.append(r["seq"])
            finally:
                state.outbox_done(done)
        while not self.stopping.is_set():
            with self.progress_lock:
                if not self.progress:
                    return
                tid, body = next(iter(self.progress.items()))
                del self.progress[tid]
            try:
                self.client.post(f"tasks/{tid}/progress", body)
            except MassError as e:
                if e.kind != "http" or e.retryable:
                    with self.progress_lock:
                        self.progress.setdefault(tid, body)  # unless a newer one came meanwhile
                    raise
                log.error("Mass refused a progress message of task %s: %s", tid, e)
