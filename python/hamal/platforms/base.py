"""The platform adapter interface: the one seam between the service and a platform.

An adapter takes snapshots, says what changed and cleans up; it never moves bytes. The service
drives it per cycle of one VM (in that cycle's worker process):

1. ``cleanup_orphans(task, known)``: hamal's own snapshots (or bitmaps) that no cursor in
   ``known`` references are leftovers of a crash; remove them.
2. ``discover(task)``: the VM and its disks (id, size, flags, NIC addresses).
3. ``begin(task, vm, cursors)``: take the cycle's snapshot; per disk, the engine source URI,
   the changed extents (or a full sync and why) and the cursor the disk will have once synced.
4. the engine syncs each disk; the service records each committed disk's version and new
   cursor in its state (one transaction, after the target commit).
5. ``commit(cycle)``: per disk, drop what the old cursor held for a committed disk (the previous
   snapshot), or what the new one took for a disk that failed; then release the cycle.
   ``abort(cycle)`` when the cycle fails before any disk was synced (or is cancelled).

Cursors are opaque strings to the service (a bitmap name, a snapshot name, a changeId).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from hamal.errors import PlanError

log = logging.getLogger("hamal.platforms")

MIB = 1 << 20


@dataclass
class DiskInfo:
    """One disk of a VM as the platform reports it."""

    id: str
    size: int
    #: Platform flags: "independent", "rdm", ... (a disk with one of ``SKIPPED_FLAGS`` is left out).
    flags: list[str] = field(default_factory=list)
    #: Platform detail the adapter needs later (image path, pool/image, device key).
    ref: dict[str, Any] = field(default_factory=dict)


@dataclass
class VmInfo:
    name: str
    uuid: str
    disks: list[DiskInfo]
    #: NIC -> addresses, as the platform reports them (``ip_mapping.backup``).
    addresses: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class DiskCycle:
    """What the engine needs for one disk in a cycle, and what the disk becomes after it."""

    disk: DiskInfo
    #: Engine source URI (the disk at the cycle's snapshot).
    source: str
    #: Cursor once this disk's cycle is committed.
    new_cursor: str
    #: Cursor the changes are relative to (``None``: full sync).
    old_cursor: str | None = None
    #: Changed extents as ``[offset, length]`` pairs; ``None`` with ``bitmap`` or a full sync.
    changed: list[tuple[int, int]] | None = None
    #: NBD dirty bitmap holding the changes.
    bitmap: str | None = None
    #: Why this disk is synced in full (``None`` for an incremental).
    full_reason: str | None = None
    #: Set by the service: the disk's data is committed on the target.
    committed: bool = False


@dataclass
class Cycle:
    vm: VmInfo
    disks: list[DiskCycle]
    #: When the snapshot was taken (RFC 3339): the versions' time.
    snapshot_time: str
    #: Adapter state held for the cycle (an export process, a snapshot reference).
    handle: Any = None


class Adapter(Protocol):
    """One per platform (``platforms/<name>.py``), built by ``platforms.adapter_for``."""

    name: str

    def discover(self, task: Any) -> VmInfo: ...

    def begin(self, task: Any, vm: VmInfo, cursors: dict[str, str | None]) -> Cycle: ...

    def commit(self, cycle: Cycle) -> None: ...

    def abort(self, cycle: Cycle) -> None: ...

    def cleanup_orphans(self, task: Any, known: set[str]) -> list[str]: ...


class AbortByCommit:
    """``abort`` for adapters whose ``commit`` already drops what an uncommitted disk took:
    every disk is marked uncommitted, then ``commit`` cleans up."""

    def commit(self, cycle: Cycle) -> None:  # each adapter has its own
        raise NotImplementedError

    def abort(self, cycle: Cycle) -> None:
        for dc in cycle.disks:
            dc.committed = False
        self.commit(cycle)


def abort_after_failure(adapter: Adapter, cycle: Cycle) -> None:
    """For ``begin`` when it fails: undoes what it took, but never hides that failure behind
    a cleanup error (logged instead; the next cycle's ``cleanup_orphans`` removes what is left)."""
    try:
        adapter.abort(cycle)
    except Exception as e:
        log.warning(
            "cleaning up after the failed start failed too (the next cycle removes what is left): %s", e
        )


#: Disks that cannot be snapshotted or tracked.
SKIPPED_FLAGS = {"independent", "rdm"}


def selectable(disks: list[DiskInfo], skip_disk_flag: bool, disk_flag_size_mb: int) -> list[DiskInfo]:
    """The disks a cycle syncs. Disks the platform cannot snapshot (independent, physical RDM)
    are left out. Unless ``skip_disk_flag`` is set, a disk smaller than ``disk_flag_size`` MB is
    read as a flag (marker) disk, not data, and left out too: our reading of the manual's
    ``[vmware]`` / ``[openstack_ceph]`` ``skip_disk_flag`` and ``disk_flag_size``. Each is said."""
    out = []
    for d in disks:
        bad = SKIPPED_FLAGS.intersection(d.flags)
        if bad:
            log.info("disk %s left out: %s disks cannot be snapshotted", d.id, "/".join(sorted(bad)))
        elif not skip_disk_flag and d.size < disk_flag_size_mb * MIB:
            log.info(
                "disk %s left out: %d bytes is under disk_flag_size = %d MB (a flag disk)",
                d.id,
                d.size,
                disk_flag_size_mb,
            )
        else:
            out.append(d)
    return out


#: hamal's snapshots and bitmaps are named ``hamal-<ms>``, so its orphans can be found by name
#: and another tool's snapshot is never touched.
PREFIX = "hamal-"


def new_snapshot_name() -> str:
    return f"{PREFIX}{int(time.time() * 1000)}"


def task_secret(task: Any, key: str) -> str | None:
    """A credential of a task: inline ``key`` (only tasks from the control plane carry them),
    else the content of the file ``<key>_file`` names; ``None`` when neither is given."""
    c = task.connection
    if c.get(key) is not None:
        return str(c[key])
    path = c.get(f"{key}_file")
    if path is None:
        return None
    if not isinstance(path, str) or not os.path.isabs(path):
        raise PlanError(f"task {task.id}: connection.{key}_file must be an absolute path")
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        raise PlanError(f"task {task.id}: connection.{key}_file = {path}: {e.strerror}") from None


def session_key(task: Any) -> str:
    """Names a task's platform session in a per-process cache: its id and connection settings
    (a changed connection gets a session of its own)."""
    return json.dumps([task.id, task.connection], sort_keys=True, default=str)


def parse_cursor(text: str | None) -> dict[str, Any] | None:
    """A JSON cursor as a dict; ``None`` for none or one this adapter did not write."""
    try:
        c = json.loads(text) if text else None
    except ValueError:
        return None
    return c if isinstance(c, dict) else None


def now_iso(offset_s: float = 0.0) -> str:
    """The current UTC time (plus ``offset_s``), RFC 3339 with milliseconds (the form version
    records use)."""
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=offset_s)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_ours(name: str) -> bool:
    return name.startswith(PREFIX) and name[len(PREFIX) :].isdigit()
