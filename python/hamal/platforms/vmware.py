"""VMware vSphere VMs: snapshots and changed block tracking (CBT) through the vSphere API
(``vsphere.Session``), data through VDDK (the engine's ``vddk://`` source, logged in with the
API session's cookie).

A cycle: enable CBT if it is off (and activate it with a snapshot created and removed; said in
the VM's log), take the snapshot ``hamal-<ms>`` (memory off, quiesced if the task says so), read
each disk's key, capacity, backing and ``changeId`` from the snapshot, ask
``QueryChangedDiskAreas`` from the disk's last changeId in a loop until the capacity (one answer
covers part of a disk), sync inside VDDK's access window on vCenter (``PrepareForAccess`` /
``EndAccess``), then remove the snapshot whatever happened. The cursor of a disk
is its changeId with the key, size and backing uuid it belongs to (JSON), stored only after the
commit. A full sync instead, said why: the first cycle, the changeId's uuid part changed (CBT
reset), vSphere "cannot compute changes" (``FileFault``), the disk grew (the target grows with
it), the disk was replaced (key or backing uuid changed). A disk that shrank is an error. A full
sync reads what VDDK's ``QueryAllocatedBlocks`` reports and zeroes the rest, so a resync onto an
old target leaves nothing stale.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any
from urllib.parse import quote

from hamal import _native
from hamal.errors import HamalError
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
from hamal.platforms.vsphere import Session, VsphereError

log = logging.getLogger("hamal.platforms.vmware")

#: vSphere supports 32 snapshots in a chain; hamal needs one more than the VM holds.
MAX_SNAPSHOTS = 31
#: CBT needs virtual hardware version 7 or later.
MIN_HW_VERSION = 7


def _hw_version(text: str | None) -> int:
    m = re.match(r"vmx-(\d+)$", text or "")
    return int(m.group(1)) if m else 0


def _walk(tree: Any) -> list[Any]:
    out = []
    for node in tree or []:
        out.append(node)
        out += _walk(node.childSnapshotList)
    return out


class Handle:
    """What a cycle holds: the API session, the VM, its snapshot, the cookie file for VDDK,
    and the URI its VDDK access window was opened with (on vCenter)."""

    def __init__(self, session: Session, vm: Any, snapshot: Any, folder: str) -> None:
        self.session, self.vm, self.snapshot, self.folder = session, vm, snapshot, folder
        self.access: str | None = None


class VmwareAdapter(AbortByCommit):
    name = "vmware"

    def __init__(self, conf: dict[str, Any] | None = None) -> None:
        self.libdir = str(((conf or {}).get("vmware") or {}).get("vddk_libdir") or "")

    # VDDK's access window (vCenter only)

    def _access(self, s: Session, uri: str, begin: bool) -> str | None:
        """``PrepareForAccess`` / ``EndAccess`` for the VM through VDDK, so that vCenter does
        not move it (Storage vMotion) while its disks are read; one window per VM and cycle,
        whatever the number of reader processes. A failure is a warning: the read itself does
        not need it. Returns the URI used, or None when not on vCenter."""
        if s.content.about.apiType != "VirtualCenter":
            return None
        if self.libdir:
            uri += f"&libdir={quote(self.libdir)}"
        try:
            _native.vddk_access(uri, begin)
        except HamalError as e:
            what = "PrepareForAccess" if begin else "EndAccess"
            log.warning("VDDK %s failed (the sync goes on; vCenter may move the VM meanwhile): %s", what, e)
        return uri

    def _cookie_file(self, s: Session, folder: str) -> str:
        cookie = os.path.join(folder, "cookie")
        if not os.path.exists(cookie):
            fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(s.cookie())
        return cookie

    # Discovery

    def _disks(self, devices: list[Any]) -> list[DiskInfo]:
        from pyVmomi import vim

        out = []
        for d in devices or []:
            if not isinstance(d, vim.vm.device.VirtualDisk):
                continue
            b = d.backing
            flags = []
            if str(getattr(b, "diskMode", "")).startswith("independent"):
                flags.append("independent")
            if isinstance(b, vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo) and (
                b.compatibilityMode == "physicalMode"
            ):
                flags.append("rdm")
            ref = {
                "key": d.key,
                "file": b.fileName,
                "uuid": getattr(b, "uuid", None),
                "change_id": getattr(b, "changeId", None),
            }
            out.append(DiskInfo(id=f"disk{d.key}", size=int(d.capacityInBytes), flags=flags, ref=ref))
        return out

    def discover(self, task: Any) -> VmInfo:
        session = Session(task)
        try:
            vm = session.find_vm(task.vm_uuid)
            p = session.props(vm, "name", "config.hardware.device", "guest.net")
        finally:
            session.logout()
        addresses = {}
        for nic in p.get("guest.net") or []:
            ips = [ip for ip in (nic.ipAddress or []) if ip]
            if ips:
                addresses[nic.macAddress or str(nic.deviceConfigId)] = ips
        return VmInfo(
            name=p.get("name", task.vm_name),
            uuid=task.vm_uuid,
            disks=self._disks(p.get("config.hardware.device")),
            addresses=addresses,
        )

    # The cycle

    def _ensure_cbt(self, s: Session, vm: Any) -> None:
        from pyVmomi import vim

        p = s.props(vm, "config.version", "config.changeTrackingEnabled", "name")
        if p.get("config.changeTrackingEnabled"):
            return
        version = p.get("config.version")
        if _hw_version(version) < MIN_HW_VERSION:
            raise HamalError(
                f"VM {p.get('name')}: virtual hardware {version} is too old for changed block tracking "
                f"(vmx-{MIN_HW_VERSION} or later): upgrade the VM's compatibility"
            )
        log.warning("VM %s: changed block tracking was off: enabling it", p.get("name"))
        spec = vim.vm.ConfigSpec(changeTrackingEnabled=True)
        s.wait(s.call("enabling CBT", vm, "ReconfigVM_Task", spec), "enabling CBT", s.timeout)
        snap = self._snapshot(s, vm, new_snapshot_name(), quiesce=False)
        self._remove(s, snap, "the snapshot that activates CBT")
        log.info("VM %s: CBT enabled and activated (a snapshot was taken and removed)", p.get("name"))

    def _snapshot(self, s: Session, vm: Any, name: str, quiesce: bool) -> Any:
        task = s.call(
            "taking a snapshot",
            vm,
            "CreateSnapshot_Task",
            name=name,
            description="hamal sync (removed after the cycle)",
            memory=False,
            quiesce=quiesce,
        )
        return s.wait(task, f"snapshot {name}", s.snapshot_timeout)

    def _remove(self, s: Session, snap: Any, what: str) -> None:
        task = s.call(f"removing {what}", snap, "RemoveSnapshot_Task", removeChildren=False, consolidate=True)
        s.wait(task, f"removing {what}", s.snapshot_timeout)

    def changed_areas(
        self, s: Session, vm: Any, snap: Any, key: int, size: int, change_id: str
    ) -> list[tuple[int, int]]:
        """``QueryChangedDiskAreas`` from ``startOffset`` 0 until the capacity: one answer covers
        only part of a large disk, and a call at the capacity is an error."""
        out: list[tuple[int, int]] = []
        offset = 0
        while offset < size:
            info = s.call(
                f"QueryChangedDiskAreas(disk {key}, offset {offset})",
                vm,
                "QueryChangedDiskAreas",
                snapshot=snap,
                deviceKey=key,
                startOffset=offset,
                changeId=change_id,
            )
            for a in info.changedArea or []:
                out.append((int(a.start), int(a.length)))
            step = int(info.startOffset) + int(info.length)
            if step <= offset:
                raise VsphereError(f"{s.where}: QueryChangedDiskAreas made no progress at offset {offset}")
            offset = step
        return out

    def _plan_disk(
        self, s: Session, vm: Any, snap: Any, d: DiskInfo, now: DiskInfo, cursor: str | None
    ) -> tuple[list[tuple[int, int]] | None, str | None]:
        """(changed areas, None) for an incremental, or (None, why) for a full sync."""
        if not cursor:
            return None, "first cycle (or a full resync was asked for)"
        try:
            old = json.loads(cursor)
        except ValueError:
            return None, f"its cursor {cursor!r} is not one of this adapter's"
        new_id = now.ref.get("change_id")
        if not new_id:
            return None, "the snapshot reports no changeId for it (CBT inactive on this disk)"
        if old.get("key") != now.ref["key"] or old.get("uuid") != now.ref.get("uuid"):
            return (
                None,
                f"the disk was replaced (key {old.get('key')} -> {now.ref['key']}, backing uuid changed)",
            )
        if now.size < int(old.get("size", 0)):
            raise HamalError(
                f"disk {d.id} shrank from {old['size']} to {now.size} bytes: vSphere does not shrink disks; "
                "restore or recreate the target, then resync (hamal task resync)"
            )
        if now.size > int(old.get("size", 0)):
            return None, f"the disk grew from {old['size']} to {now.size} bytes (the target grows with it)"
        old_id = str(old.get("change_id"))
        if old_id.rsplit("/", 1)[0] != new_id.rsplit("/", 1)[0]:
            return None, f"CBT was reset (changeId {old_id} -> {new_id})"
        try:
            return self.changed_areas(s, vm, snap, now.ref["key"], now.size, old_id), None
        except VsphereError as e:
            return None, f"vSphere cannot compute changes since {old_id}: {e}"

    def begin(self, task: Any, vm_info: VmInfo, cursors: dict[str, str | None]) -> Cycle:
        s = Session(task)
        folder = tempfile.mkdtemp(prefix="hamal-vmware-")  # 0700: the session cookie for VDDK
        handle = Handle(s, None, None, folder)
        cycle = Cycle(vm=vm_info, disks=[], snapshot_time=now_iso(), handle=handle)
        try:
            vm = handle.vm = s.find_vm(task.vm_uuid)
            p = s.props(vm, "snapshot", "runtime.consolidationNeeded", "name")
            held = len(_walk(p["snapshot"].rootSnapshotList)) if p.get("snapshot") else 0
            if held >= MAX_SNAPSHOTS:
                raise HamalError(
                    f"VM {p.get('name')} holds {held} snapshots: remove some before hamal takes one"
                )
            if p.get("runtime.consolidationNeeded"):
                raise HamalError(f"VM {p.get('name')} needs its disks consolidated first (vSphere says so)")
            self._ensure_cbt(s, vm)
            name = new_snapshot_name()
            cycle.snapshot_time = now_iso()
            handle.snapshot = self._snapshot(s, vm, name, bool(task.connection.get("quiesce", False)))
            devices = s.props(handle.snapshot, "config.hardware.device").get("config.hardware.device")
            at_snapshot = {d.id: d for d in self._disks(devices)}
            cookie = self._cookie_file(s, folder)
            for d in vm_info.disks:
                now = at_snapshot.get(d.id)
                if now is None:
                    raise HamalError(f"disk {d.id} is not in snapshot {name} (was it removed meanwhile?)")
                changed, reason = self._plan_disk(s, vm, handle.snapshot, d, now, cursors.get(d.id))
                if reason:
                    log.warning("disk %s: full sync: %s", d.id, reason)
                cursor = {
                    "change_id": now.ref.get("change_id"),
                    "key": now.ref["key"],
                    "size": now.size,
                    "uuid": now.ref.get("uuid"),
                }
                cycle.disks.append(
                    DiskCycle(
                        disk=now,
                        source=self.uri(task, s, vm, handle.snapshot, now.ref["file"], cookie),
                        new_cursor=json.dumps(cursor, sort_keys=True),
                        old_cursor=cursors.get(d.id),
                        changed=changed,
                        full_reason=reason,
                    )
                )
            if cycle.disks:
                handle.access = self._access(s, cycle.disks[0].source, begin=True)
        except BaseException:
            abort_after_failure(self, cycle)
            raise
        return cycle

    def uri(self, task: Any, s: Session, vm: Any, snap: Any, file: str, cookie: str) -> str:
        query = f"vm={vm._moId}&snapshot={snap._moId}&thumbprint={s.thumbprint}&cookie_file={quote(cookie)}"
        return f"vddk://{quote(s.user, safe='')}@{s.host}:{s.port}/{file}?{query}"

    def commit(self, cycle: Cycle) -> None:
        """Removes the cycle's snapshot (committed or not: the next changes are asked from the
        cursors' changeIds, which need no snapshot kept), then logs out."""
        h: Handle = cycle.handle
        try:
            if h.access is not None:
                self._access(h.session, h.access, begin=False)
                h.access = None
            if h.snapshot is not None:
                self._remove(h.session, h.snapshot, "the cycle's snapshot")
                h.snapshot = None
        finally:
            h.session.logout()
            shutil.rmtree(h.folder, ignore_errors=True)

    def cleanup_orphans(self, task: Any, known: set[str]) -> list[str]:
        """hamal's snapshots on the VM: a cycle removes its own, so any found at the start of a
        cycle was left by a crash. Other tools' snapshots are never touched."""
        s = Session(task)
        removed = []
        try:
            vm = s.find_vm(task.vm_uuid)
            p = s.props(vm, "snapshot")
            for node in _walk(p["snapshot"].rootSnapshotList) if p.get("snapshot") else []:
                if is_ours(node.name):
                    self._remove(s, node.snapshot, f"orphan snapshot {node.name}")
                    removed.append(f"snapshot {node.name}")
            if removed:  # the crashed cycle may have left its access window open: close it
                self._end_orphan_access(s, vm, node.snapshot)
        finally:
            s.logout()
        return removed

    def _end_orphan_access(self, s: Session, vm: Any, snap: Any) -> None:
        devices = s.props(vm, "config.hardware.device").get("config.hardware.device")
        disks = self._disks(devices)
        if not disks:
            return
        folder = tempfile.mkdtemp(prefix="hamal-vmware-")
        try:
            uri = self.uri(None, s, vm, snap, disks[0].ref["file"], self._cookie_file(s, folder))
            if self._access(s, uri, begin=False):
                log.info("closed the VDDK access window an interrupted cycle left open")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
