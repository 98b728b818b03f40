"""The service's state, in one SQLite database (``hamal_lib_dir/hamal.db``, WAL).

Tables: ``tasks`` (each task's definition, where it came from, operator flags), ``disks``
(per task and disk: the cursor and the committed version), ``cycles`` (history: one row per
attempt with its outcome), ``problems`` (bad task files and the like), ``meta`` (the loop's last
tick, the control plane's link), ``outbox`` (messages for the control plane, durable until
delivered), ``commands`` (the control plane's commands, each carried out once). The file is
mode 0600 (tasks from the control plane may carry credentials); SQLite gives its ``-wal`` and
``-shm`` files the same mode. The schema is versioned with ``PRAGMA user_version``;
``MIGRATIONS[i]`` takes version i to i + 1, so an upgrade keeps the data.

The only writer of a cursor is ``commit_disk``: the new cursor and the version that holds its
data are recorded in one transaction, called only after the target committed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hamal.errors import StateError
from hamal.platforms.base import now_iso

MIGRATIONS = [
    # 0 -> 1
    """
    CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        origin TEXT NOT NULL,          -- task file path, or 'mass'
        spec TEXT NOT NULL,            -- the task as JSON
        paused INTEGER NOT NULL DEFAULT 0,
        resync_reason TEXT,            -- a full resync asked for, and by whom
        run_now INTEGER NOT NULL DEFAULT 0,
        updated TEXT NOT NULL
    );
    CREATE TABLE disks (
        task_id TEXT NOT NULL,
        disk_id TEXT NOT NULL,
        cursor TEXT,                   -- where the next changes are computed from
        version TEXT,                  -- the committed version holding the cursor's data
        snapshot_time TEXT,            -- when that data was taken (lag is measured from it)
        committed_at TEXT,
        size INTEGER,
        bytes_last INTEGER,            -- bytes moved by the last committed cycle
        bytes_total INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (task_id, disk_id)
    );
    CREATE TABLE cycles (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        started TEXT NOT NULL,
        ended TEXT,
        state TEXT NOT NULL,           -- running, ok, partial, failed, cancelled, interrupted
        error TEXT,
        bytes INTEGER,
        seconds REAL,
        detail TEXT                    -- per-disk results as JSON
    );
    CREATE INDEX cycles_by_task ON cycles (task_id, id);
    CREATE TABLE problems (
        origin TEXT PRIMARY KEY,       -- a task file, or a task id
        message TEXT NOT NULL,
        at TEXT NOT NULL
    );
    CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
    """,
    # 1 -> 2: the control plane's outbox and commands
    """
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- sent in this order
        kind TEXT NOT NULL,            -- result, rejection, ack
        task_id TEXT,
        route TEXT NOT NULL,           -- path under /sync-proxies/<proxy id>/
        body TEXT NOT NULL,            -- JSON
        created TEXT NOT NULL
    );
    CREATE TABLE commands (
        id TEXT PRIMARY KEY,           -- Mass's command id: each is carried out once
        task_id TEXT NOT NULL,
        action TEXT NOT NULL,
        state TEXT NOT NULL,           -- done, rejected, pending (a delete in progress)
        at TEXT NOT NULL
    );
    ALTER TABLE tasks ADD COLUMN deleting TEXT;   -- the command id of a pending delete
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


class State:
    """A connection to the state database; one per process (the loop, each worker)."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        # Created 0600 before SQLite opens it: the WAL and shm files inherit its mode. Never
        # open and close an existing database here: closing any descriptor of a file drops the
        # POSIX locks this process's other connections hold on it.
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as e:
            raise StateError(f"state database {path}: {e.strerror}") from None
        try:
            self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA busy_timeout=30000")
            self.migrate()
        except sqlite3.DatabaseError as e:
            raise StateError(f"state database {path}: {e}") from None

    def migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(
                f"state database {self.path} has schema {version}, newer than this hamal's "
                f"{SCHEMA_VERSION}: it was written by a newer release"
            )
        for i in range(version, SCHEMA_VERSION):
            with self.tx():
                for stmt in MIGRATIONS[i].split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
                self.db.execute(f"PRAGMA user_version = {i + 1}")

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    # Tasks

    def sync_tasks(self, tasks: dict[str, tuple[str, dict[str, Any]]], origin_kind: str) -> dict[str, str]:
        """Makes the stored tasks of one kind of origin (files, or the control plane ``mass``)
        these ``id -> (origin, spec)``; operator flags of tasks that stay are kept. A task id
        belongs to one kind: ids held by the other kind are not taken and are returned as
        ``id -> the origin holding it``. A task being deleted stays until its delete is done."""
        stamp = now_iso()
        taken: dict[str, str] = {}
        with self.tx() as db:
            rows = db.execute("SELECT id, origin, deleting FROM tasks").fetchall()
            for r in rows:
                mine = (r["origin"] == "mass") == (origin_kind == "mass")
                if not mine and r["id"] in tasks:
                    taken[r["id"]] = r["origin"]
                elif mine and r["id"] not in tasks and not r["deleting"]:
                    db.execute("DELETE FROM tasks WHERE id = ?", (r["id"],))
            for tid, (origin, spec) in tasks.items():
                if tid in taken:
                    continue
                db.execute(
                    "INSERT INTO tasks (id, origin, spec, updated) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET origin = excluded.origin, spec = excluded.spec, "
                    "updated = excluded.updated WHERE tasks.spec != excluded.spec",
                    (tid, origin, json.dumps(spec, sort_keys=True), stamp),
                )
        return taken

    def delete_task(self, tid: str) -> None:
        """Forgets a task: its row, cursors and history (its snapshots were removed first)."""
        with self.tx() as db:
            for table, col in (("tasks", "id"), ("disks", "task_id"), ("cycles", "task_id")):
                db.execute(f"DELETE FROM {table} WHERE {col} = ?", (tid,))

    def task_rows(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM tasks ORDER BY id").fetchall()

    def task_row(self, tid: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM tasks WHERE id = ?", (tid,)).fetchone()

    def set_flag(self, tid: str, **flags: Any) -> bool:
        """Sets ``paused``, ``run_now``, ``resync_reason`` or ``deleting`` of a task; False when
        the task is unknown."""
        allowed = {"paused", "run_now", "resync_reason", "deleting"}
        assert set(flags) <= allowed, flags
        sets = ", ".join(f"{k} = ?" for k in flags)
        with self.tx() as db:
            cur = db.execute(f"UPDATE tasks SET {sets} WHERE id = ?", (*flags.values(), tid))
        return cur.rowcount == 1

    # Disks: cursors and versions

    def cursors(self, tid: str) -> dict[str, sqlite3.Row]:
        rows = self.db.execute("SELECT * FROM disks WHERE task_id = ?", (tid,)).fetchall()
        return {r["disk_id"]: r for r in rows}

    def commit_disk(
        self,
        tid: str,
        disk: str,
        *,
        cursor: str,
        version: str | None,
        snapshot_time: str,
        size: int,
        bytes_moved: int,
    ) -> None:
        """Records that ``disk``'s data up to ``cursor`` is committed on the target as ``version``.
        Call only after the target's commit; this is the one place a cursor advances."""
        with self.tx() as db:
            db.execute(
                "INSERT INTO disks (task_id, disk_id, cursor, version, snapshot_time, committed_at, size, "
                "bytes_last, bytes_total) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(task_id, disk_id) DO UPDATE SET cursor = excluded.cursor, "
                "version = excluded.version, snapshot_time = excluded.snapshot_time, "
                "committed_at = excluded.committed_at, size = excluded.size, "
                "bytes_last = excluded.bytes_last, bytes_total = disks.bytes_total + excluded.bytes_last",
                (tid, disk, cursor, version, snapshot_time, now_iso(), size, bytes_moved, bytes_moved),
            )

    # Cycles

    def start_cycle(self, tid: str, attempt: int) -> int:
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO cycles (task_id, attempt, started, state) VALUES (?, ?, ?, 'running')",
                (tid, attempt, now_iso()),
            )
        return int(cur.lastrowid or 0)

    def end_cycle(
        self,
        cycle_id: int,
        state: str,
        *,
        error: str | None = None,
        bytes_moved: int = 0,
        seconds: float = 0.0,
        detail: Any = None,
    ) -> None:
        with self.tx() as db:
            db.execute(
                "UPDATE cycles SET state = ?, ended = ?, error = ?, bytes = ?, seconds = ?, detail = ? "
                "WHERE id = ? AND state = 'running'",
                (state, now_iso(), error, bytes_moved, seconds, json.dumps(detail), cycle_id),
            )

    def interrupt_running(self) -> int:
        """Marks cycles left 'running' by a process that died (called at start)."""
        with self.tx() as db:
            cur = db.execute(
                "UPDATE cycles SET state = 'interrupted', ended = ?, error = 'the service stopped "
                "during the cycle' WHERE state = 'running'",
                (now_iso(),),
            )
        return cur.rowcount

    def last_cycles(self, tid: str, n: int = 1) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT * FROM cycles WHERE task_id = ? ORDER BY id DESC LIMIT ?", (tid, n)
        ).fetchall()

    def trim_history(self, keep: int = 1000) -> None:
        """Keeps each task's newest ``keep`` cycles (the index makes each cut one range)."""
        with self.tx() as db:
            for (tid,) in db.execute("SELECT DISTINCT task_id FROM cycles").fetchall():
                db.execute(
                    "DELETE FROM cycles WHERE task_id = ? AND state != 'running' AND id <= "
                    "(SELECT id FROM cycles WHERE task_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (tid, tid, keep),
                )
            # Mass stops resending a command once acknowledged; a month covers any delay.
            db.execute("DELETE FROM commands WHERE state != 'pending' AND at < ?", (now_iso(-30 * 86400),))

    # The control plane: outbox and commands

    def outbox_put(self, kind: str, task_id: str | None, route: str, body: dict[str, Any]) -> None:
        """Queues a message for the control plane (a result, a rejection, an acknowledgement);
        it stays until delivered, never dropped."""
        with self.tx() as db:
            db.execute(
                "INSERT INTO outbox (kind, task_id, route, body, created) VALUES (?, ?, ?, ?, ?)",
                (kind, task_id, route, json.dumps(body), now_iso()),
            )

    def outbox_head(self, n: int = 50) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM outbox ORDER BY seq LIMIT ?", (n,)).fetchall()

    def outbox_done(self, seqs: list[int]) -> None:
        if seqs:
            with self.tx() as db:
                db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])

    def outbox_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def command(self, cid: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM commands WHERE id = ?", (cid,)).fetchone()

    def record_command(self, cid: str, task_id: str, action: str, state: str) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO commands VALUES (?, ?, ?, ?, ?)",
                (cid, task_id, action, state, now_iso()),
            )

    # Problems and the loop's heartbeat

    def set_problems(self, problems: dict[str, str], kind_prefix: str) -> None:
        """Replaces the problems whose origin starts with ``kind_prefix`` (a tasks folder)."""
        with self.tx() as db:
            db.execute("DELETE FROM problems WHERE origin LIKE ?", (kind_prefix + "%",))
            for origin, msg in problems.items():
                db.execute("INSERT OR REPLACE INTO problems VALUES (?, ?, ?)", (origin, msg, now_iso()))

    def problems(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM problems ORDER BY origin").fetchall()

    def set_meta(self, key: str, value: str) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    def tick(self) -> None:
        self.set_meta("tick", str(time.time()))

    def last_tick(self) -> float | None:
        v = self.meta("tick")
        return float(v) if v else None


def db_path(lib_dir: str) -> str:
    return os.path.join(lib_dir, "hamal.db")
