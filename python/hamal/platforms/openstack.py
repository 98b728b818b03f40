"""OpenStack servers whose volumes live on Ceph: volumes found through Nova and Cinder
(``openstack_api.Cloud``), data read through librbd (the engine's ``rbd:`` source, ``from_snap``
diffs), in one of two snapshot modes per task:

- ``snapshot_mode = "cinder"`` (default): Cinder snapshots named ``hamal-<ms>`` (``force`` for
  in-use volumes), visible to the cloud's operator; Ceph holds them as ``snapshot-<id>``;
- ``snapshot_mode = "rbd"``: RBD snapshots ``hamal-<ms>`` taken directly (faster, no Cinder
  load). Caveat: Cinder cannot delete a volume that still has them; hamal removes its own
  when the task is deleted, and a snapshot a crash left behind at the next cycle.

The current snapshot stays as the base of the next diff; the previous one goes after the commit.
A full sync, said why: the first cycle, the base snapshot gone, the volume's image changed (a
migration or retype), the volume grew (the target grows with it). A volume that shrank is an
error. A volume detached from the server is said once per cycle; its cursor is kept.

Connection keys beyond ``openstack_api``'s: ``ceph_conf``, ``ceph_id``, ``keyring`` (the Ceph
client, by file), ``whole_object = true`` (diff whole RADOS objects: the fast mode, the
original's "rbd du"), ``images_rbd_pool`` (boot-from-image root disks ``<uuid>_disk`` there),
``snapshot_timeout`` (seconds, default 600), ``ceph_timeout`` (seconds per Ceph operation: an
OSD that stops answering fails the disk's sync within it, and the cycle is retried).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any
from urllib.parse import urlencode

from hamal import _native
from hamal.errors import CephError, HamalError, PlanError
from hamal.platforms.base import (
    AbortByCommit,
    Cycle,
    DiskCycle,
    DiskInfo,
    VmInfo,
    abort_after_failure,
    is_ours,
    new_snapshot_name,
    now_iso,
    parse_cursor,
)
from hamal.platforms.openstack_api import Cloud, OpenStackError, cloud_for

log = logging.getLogger("hamal.platforms.openstack")
MODES = ("cinder", "rbd")


class OpenStackAdapter(AbortByCommit):
    name = "openstack"

    def mode(self, task: Any) -> str:
        mode = task.connection.get("snapshot_mode", "cinder")
        if mode not in MODES:
            raise PlanError(f"task {task.id}: connection.snapshot_mode {mode!r} is not cinder or rbd")
        return str(mode)

    def uri(self, task: Any, pool: str, image: str, snap: str | None = None, **extra: str) -> str:
        c = task.connection
        query: dict[str, str] = {}
        for key, opt in (("ceph_conf", "conf"), ("keyring", "keyring")):
            if c.get(key) is not None:
                if not isinstance(c[key], str) or not os.path.isabs(c[key]):
                    raise PlanError(f"task {task.id}: connection.{key} must be an absolute path")
                query[opt] = c[key]
        if c.get("ceph_id"):
            query["id"] = str(c["ceph_id"])
        if c.get("ceph_timeout") is not None:
            query["timeout"] = str(int(c["ceph_timeout"]))
        query |= extra
        at = f"@{snap}" if snap else ""
        return f"rbd:{pool}/{image}{at}" + (f"?{urlencode(query, safe='/')}" if query else "")

    # Discovery

    def discover(self, task: Any) -> VmInfo:
        cloud = cloud_for(task)
        server = cloud.server(task.vm_uuid)
        disks = []
        for att in cloud.attachments(task.vm_uuid):
            vid = att["volumeId"]
            pool, image = cloud.rbd_location(vid)
            size = _native.rbd_image_size(self.uri(task, pool, image))
            disks.append(DiskInfo(id=vid, size=size, ref={"pool": pool, "image": image, "volume": vid}))
        root_pool = task.connection.get("images_rbd_pool")
        if root_pool:
            image = f"{task.vm_uuid}_disk"
            try:
                size = _native.rbd_image_size(self.uri(task, root_pool, image))
                disks.append(DiskInfo(id="root", size=size, ref={"pool": root_pool, "image": image}))
            except CephError as e:
                log.info("no boot-from-image root disk %s/%s: %s", root_pool, image, e)
        addresses = {
            net: [a["addr"] for a in entries if a.get("addr")]
            for net, entries in (server.get("addresses") or {}).items()
        }
        return VmInfo(
            name=server.get("name", task.vm_name), uuid=task.vm_uuid, disks=disks, addresses=addresses
        )

    # The cycle

    def _full_reason(self, task: Any, d: DiskInfo, old: dict[str, Any] | None) -> str | None:
        if old is None:
            return "first cycle (or a full resync was asked for)"
        here = f"{d.ref['pool']}/{d.ref['image']}"
        if old.get("image") != here:
            return f"the volume's image changed from {old.get('image')} to {here} (migrated or retyped)"
        if d.size < int(old.get("size", 0)):
            raise HamalError(
                f"volume {d.id} shrank from {old['size']} to {d.size} bytes: restore or recreate the target, "
                "then resync (hamal task resync)"
            )
        names = {s["name"] for s in _native.rbd_list_snapshots(self.uri(task, d.ref["pool"], d.ref["image"]))}
        if old.get("snap") not in names:
            return f"its base snapshot {old.get('snap')} is gone from {here}"
        if d.size > int(old.get("size", 0)):
            return f"the volume grew from {old['size']} to {d.size} bytes (the target grows with it)"
        return None

    def _snapshot(self, task: Any, cloud: Cloud, d: DiskInfo, name: str) -> tuple[str, str | None]:
        """Takes the disk's snapshot; returns (its RBD name, its Cinder id or None). A Cinder
        snapshot is only asked for here; ``begin`` waits for all of them together."""
        if self.mode(task) == "cinder" and d.ref.get("volume"):
            sid = cloud.create_snapshot(d.ref["volume"], name)
            return f"snapshot-{sid}", sid
        _native.rbd_create_snapshot(self.uri(task, d.ref["pool"], d.ref["image"]), name)
        return name, None

    def begin(self, task: Any, vm: VmInfo, cursors: dict[str, str | None]) -> Cycle:
        cloud = cloud_for(task)
        name = new_snapshot_name()
        cycle = Cycle(vm=vm, disks=[], snapshot_time=now_iso(), handle=(task, cloud))
        try:
            for d in vm.disks:
                old = parse_cursor(cursors.get(d.id))
                reason = self._full_reason(task, d, old)
                if reason:
                    log.warning("disk %s: full sync: %s", d.id, reason)
                snap, sid = self._snapshot(task, cloud, d, name)
                extra = {} if reason or old is None else {"from_snap": str(old["snap"])}
                if task.connection.get("whole_object"):
                    extra["whole_object"] = "1"
                new = {"image": f"{d.ref['pool']}/{d.ref['image']}", "snap": snap, "cinder_snapshot": sid,
                       "size": d.size}  # fmt: skip
                cycle.disks.append(
                    DiskCycle(
                        disk=d,
                        source=self.uri(task, d.ref["pool"], d.ref["image"], snap, **extra),
                        new_cursor=json.dumps(new, sort_keys=True),
                        old_cursor=cursors.get(d.id),
                        full_reason=reason,
                    )
                )
            timeout = float(task.connection.get("snapshot_timeout", 600))
            for dc in cycle.disks:
                sid = json.loads(dc.new_cursor)["cinder_snapshot"]
                if sid:
                    cloud.wait_snapshot(sid, "available", timeout)
        except BaseException:
            abort_after_failure(self, cycle)
            raise
        return cycle

    def _drop(self, task: Any, cloud: Cloud, cursor: dict[str, Any]) -> None:
        """Removes a snapshot; a Cinder one is only asked for (``commit`` waits for all)."""
        if cursor.get("cinder_snapshot"):
            cloud.delete_snapshot(str(cursor["cinder_snapshot"]), None)
            return
        pool, image = str(cursor["image"]).split("/", 1)
        try:
            _native.rbd_remove_snapshot(self.uri(task, pool, image), str(cursor["snap"]), unprotect=True)
        except CephError as e:
            if "no snapshot" not in str(e):
                raise

    def commit(self, cycle: Cycle) -> None:
        """Drops each committed disk's previous snapshot, or a failed disk's new one."""
        task, cloud = cycle.handle
        dropped = []
        for dc in cycle.disks:
            gone = parse_cursor(dc.old_cursor if dc.committed else dc.new_cursor)
            if gone:
                self._drop(task, cloud, gone)
                dropped.append(gone)
        timeout = float(task.connection.get("snapshot_timeout", 600))
        for gone in dropped:
            if gone.get("cinder_snapshot"):
                cloud.wait_snapshot(str(gone["cinder_snapshot"]), None, timeout)

    def cleanup_orphans(self, task: Any, known: set[str]) -> list[str]:
        """hamal's snapshots (Cinder or RBD) that no cursor references; and a word on volumes
        detached since their last cycle (their cursors are kept)."""
        cloud = cloud_for(task)
        keep = {c["snap"] for c in map(parse_cursor, known) if c}
        removed = []
        attached = {att["volumeId"] for att in cloud.attachments(task.vm_uuid)}
        for c in filter(None, map(parse_cursor, known)):
            vid = str(c.get("image", "")).rsplit("volume-", 1)[-1]
            if c.get("image", "").find("volume-") >= 0 and vid not in attached:
                log.warning(
                    "volume %s is no longer attached to server %s; its cursor is kept", vid, task.vm_uuid
                )
        for vid in sorted(attached):
            for s in cloud.snapshots_of(vid):
                if is_ours(s.get("name") or "") and f"snapshot-{s['id']}" not in keep:
                    cloud.delete_snapshot(s["id"], float(task.connection.get("snapshot_timeout", 600)))
                    removed.append(f"Cinder snapshot {s['name']} ({s['id']}) of volume {vid}")
            pool, image = cloud.rbd_location(vid)
            for s in _native.rbd_list_snapshots(self.uri(task, pool, image)):
                if is_ours(s["name"]) and s["name"] not in keep:
                    _native.rbd_remove_snapshot(self.uri(task, pool, image), s["name"], unprotect=True)
                    removed.append(f"RBD snapshot {pool}/{image}@{s['name']}")
        return removed


__all__ = ["OpenStackAdapter", "OpenStackError"]
