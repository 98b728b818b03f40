"""Ceph RBD images synced through their own snapshots (no cloud API in between).

Task connection::

    conf = "/etc/ceph/ceph.conf"            # optional (else CEPH_CONF, librados' default)
    id = "admin"                            # optional client name
    keyring = "/etc/ceph/ceph.client.admin.keyring"   # optional
    timeout = 60                            # optional, seconds per cluster operation
    whole_object = false                    # optional: diff whole RADOS objects (fast-diff)
    images = { disk0 = "pool/image", disk1 = "pool/namespace/image2" }

Each cycle takes a snapshot ``hamal-<ms>`` of every image; the engine reads it with
``from_snap`` = the previous one (the cursor), so only what changed is read and discarded
ranges are zeroed. After the commit the previous snapshot is removed; the current one stays
as the base of the next diff. A base snapshot that is gone means a full sync, said why.
"""

from __future__ import annotations

import logging
import os
from typing import Any
from urllib.parse import urlencode

from hamal import _native
from hamal.errors import CephError, PlanError
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
)

log = logging.getLogger("hamal.platforms.rbd")


class RbdAdapter(AbortByCommit):
    name = "rbd"

    def _options(self, task: Any) -> dict[str, str]:
        c = task.connection
        opts = {}
        for k in ("conf", "keyring"):
            if c.get(k) is not None:
                if not isinstance(c[k], str) or not os.path.isabs(c[k]):
                    raise PlanError(f"task {task.id}: connection.{k}: {c[k]!r} is not an absolute path")
                opts[k] = c[k]
        if c.get("id") is not None:
            opts["id"] = str(c["id"])
        if c.get("timeout") is not None:
            opts["timeout"] = str(int(c["timeout"]))
        return opts

    def images(self, task: Any) -> dict[str, str]:
        images = task.connection.get("images")
        if not isinstance(images, dict) or not images:
            raise PlanError(f"task {task.id}: connection.images must map disk ids to POOL/IMAGE names")
        for disk, spec in images.items():
            if not isinstance(spec, str) or spec.count("/") not in (1, 2) or "@" in spec or "?" in spec:
                where = f"task {task.id}: connection.images.{disk}"
                raise PlanError(f"{where}: {spec!r} is not POOL[/NAMESPACE]/IMAGE")
        return dict(images)

    def uri(self, task: Any, spec: str, snap: str | None = None, **extra: str) -> str:
        query = {**self._options(task), **extra}
        at = f"@{snap}" if snap else ""
        return f"rbd:{spec}{at}" + (f"?{urlencode(query, safe='/')}" if query else "")

    def discover(self, task: Any) -> VmInfo:
        disks = []
        for disk, spec in self.images(task).items():
            size = _native.rbd_image_size(self.uri(task, spec))
            disks.append(DiskInfo(id=disk, size=size, ref={"spec": spec}))
        return VmInfo(name=task.vm_name, uuid=task.vm_uuid, disks=disks)

    def begin(self, task: Any, vm: VmInfo, cursors: dict[str, str | None]) -> Cycle:
        name = new_snapshot_name()
        cycle = Cycle(vm=vm, disks=[], snapshot_time=now_iso(), handle=task)
        try:
            for d in vm.disks:
                spec = d.ref["spec"]
                head = self.uri(task, spec)
                base = cursors.get(d.id)
                reason = None if base else "first cycle (or a full resync was asked for)"
                if base and base not in {s["name"] for s in _native.rbd_list_snapshots(head)}:
                    reason = f"its base snapshot {base} is gone from {spec}"
                    log.warning("disk %s: full sync: %s", d.id, reason)
                    base = None
                _native.rbd_create_snapshot(head, name)
                extra = {"from_snap": base} if base else {}
                if task.connection.get("whole_object"):
                    extra["whole_object"] = "1"
                cycle.disks.append(
                    DiskCycle(
                        disk=d,
                        source=self.uri(task, spec, name, **extra),
                        new_cursor=name,
                        old_cursor=base,
                        full_reason=reason,
                    )
                )
        except BaseException:
            abort_after_failure(self, cycle)
            raise
        return cycle

    def commit(self, cycle: Cycle) -> None:
        """Removes each committed disk's previous snapshot, or a failed disk's new one."""
        task = cycle.handle
        for dc in cycle.disks:
            gone = dc.old_cursor if dc.committed else dc.new_cursor
            if gone:
                self._remove(task, dc.disk.ref["spec"], gone)

    def _remove(self, task: Any, spec: str, snap: str) -> None:
        head = self.uri(task, spec)
        try:
            _native.rbd_remove_snapshot(head, snap, unprotect=True)
        except CephError as e:
            if "no snapshot" not in str(e):
                raise

    def cleanup_orphans(self, task: Any, known: set[str]) -> list[str]:
        removed = []
        for disk, spec in self.images(task).items():
            for s in _native.rbd_list_snapshots(self.uri(task, spec)):
                if is_ours(s["name"]) and s["name"] not in known:
                    self._remove(task, spec, s["name"])
                    removed.append(f"{disk}: snapshot {spec}@{s['name']}")
        return removed
