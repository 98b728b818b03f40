"""Huawei FusionCompute VMs: CBT backup snapshots and changed-block bitmaps through the VRM
(``fc_api.Vrm``), data through the CNA hosts' backup data channel (the engine's ``fc://``
source).

A cycle: take the snapshot ``hamal-<ms>`` (type ``CBTbackup``, at most 32 per VM), read each
volume's ``snapUuid``, ``volCBTCreateTime`` and ``chgID`` from it, ask ``getcbt`` for the
blocks changed since the disk's last chgID (paged until the volume's end), prepare the
volume's backup resource (a CNA host, port, token and CA), sync, release the resources. The
current snapshot stays; the previous one goes after the commit (a failed disk keeps its own).
A full sync instead, said why: the first cycle, the volume replaced, the volume grew (the
target grows with it), ``volCBTCreateTime`` changed (CBT reset: HA, a revert, an expansion, a
host reboot), the chgID chain broken (the new chgID is not the last + 1), the VRM unable to
give the changes. A full sync reads the allocated blocks (``getcbt`` since chgID "0") and zeroes
the rest of the target. A volume that shrank is an error.

Connection keys: ``fc_api``'s, plus ``transport = "lanssl"`` (TLS on the data channel, the
default) or ``"lan"``, and ``quiesce``. Timeouts and socket limits: ``[fusion_compute]``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any
from urllib.parse import quote, urlencode

from hamal.errors import HamalError, PlanError
from hamal.platforms import fc_names as N
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
from hamal.platforms.fc_api import FcError, Vrm, urn_to_uri, vrm_for

log = logging.getLogger("hamal.platforms.fusioncompute")
GIB = 1 << 30


def _dig(doc: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        doc = (doc or {}).get(key) or {}
    return doc


def _write_private(path: str, text: str) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


class Handle:
    """What a cycle holds: the VRM session, its files (tokens, CAs, extents), the snapshot,
    the data channel resources to release."""

    def __init__(self, vrm: Vrm, folder: str) -> None:
        self.vrm, self.folder = vrm, folder
        self.snapshot: dict[str, Any] | None = None
        self.resources: list[str] = []


class FusionComputeAdapter(AbortByCommit):
    name = "fusioncompute"

    def __init__(self, conf: dict[str, Any] | None = None) -> None:
        section = (conf or {}).get("fusion_compute", {})
        self.task_timeout = float(section.get("task_timeout", 3600))
        self.create_timeout = float(section.get("create_snap_task_timeout", 3600))
        self.delete_timeout = float(section.get("delete_snap_task_timeout", 3600))
        self.local_ip = str(section.get("local_host_ip") or "")

    def transport(self, task: Any) -> str:
        mode = str(task.connection.get("transport", "lanssl"))
        if mode not in N.TRANS_MODES:
            raise PlanError(f"task {task.id}: connection.transport {mode!r} is not lan or lanssl")
        return mode

    # Discovery

    def _disks(self, vm: dict[str, Any]) -> list[DiskInfo]:
        out = []
        for d in _dig(vm, N.VM_DISKS) or []:
            urn = d.get(N.DISK_VOLUME_URN)
            if not urn:
                continue
            flags = ["independent"] if d.get(N.DISK_INDEPENDENT) else []
            size = int(float(d.get(N.DISK_SIZE_GB, 0)) * GIB)
            out.append(
                DiskInfo(id=f"disk{d.get(N.DISK_SEQ)}", size=size, flags=flags, ref={"volume_urn": urn})
            )
        return out

    def discover(self, task: Any) -> VmInfo:
        vm = vrm_for(task).find_vm(task.vm_uuid)
        addresses = {}
        for nic in _dig(vm, N.VM_NICS) or []:
            ips = [ip for ip in [nic.get(N.NIC_IP), *(nic.get(N.NIC_IP6) or [])] if ip and ip != "0.0.0.0"]
            if ips:
                addresses[str(nic.get(N.NIC_MAC))] = ips
        return VmInfo(
            name=vm.get(N.VM_NAME, task.vm_name),
            uuid=task.vm_uuid,
            disks=self._disks(vm),
            addresses=addresses,
        )

    # The cycle

    def _full_reason(self, d: DiskInfo, vs: dict[str, Any], old: dict[str, Any] | None) -> str | None:
        if old is None:
            return "first cycle (or a full resync was asked for)"
        if old.get("volume_urn") != d.ref["volume_urn"]:
            return f"the volume was replaced ({old.get('volume_urn')} -> {d.ref['volume_urn']})"
        if d.size < int(old.get("size", 0)):
            raise HamalError(
                f"volume {d.ref['volume_urn']} ({d.id}) shrank from {old['size']} to {d.size} bytes: "
                "restore or recreate the target, then resync (hamal task resync)"
            )
        if d.size > int(old.get("size", 0)):
            return f"the volume grew from {old['size']} to {d.size} bytes (the target grows with it)"
        if str(vs.get(N.VS_CBT_TIME)) != str(old.get("cbt_time")):
            return (
                f"CBT was reset (volCBTCreateTime {old.get('cbt_time')} -> {vs.get(N.VS_CBT_TIME)}: "
                "after HA, a snapshot revert, a volume expansion or a host reboot)"
            )
        try:
            chain = int(vs.get(N.VS_CHG_ID)) == int(old.get("chg_id")) + 1  # type: ignore[arg-type]
        except (TypeError, ValueError):
            chain = False
        if not chain:
            return (
                f"the chgID chain is broken ({old.get('chg_id')} -> {vs.get(N.VS_CHG_ID)}; "
                "a cycle failed after its snapshot, or CBT lost its state)"
            )
        return None

    def begin(self, task: Any, vm_info: VmInfo, cursors: dict[str, str | None]) -> Cycle:
        vrm = vrm_for(task)
        handle = Handle(vrm, tempfile.mkdtemp(prefix="hamal-fc-"))  # 0700: tokens of the channel
        cycle = Cycle(vm=vm_info, disks=[], snapshot_time=now_iso(), handle=handle)
        try:
            vm = vrm.find_vm(task.vm_uuid)
            vm_uri = vm[N.VM_URI]
            held = [s for s in vrm.snapshots(vm_uri) if s.get(N.SNAPSHOT_TYPE) == N.SNAPSHOT_TYPE_CBT]
            if len(held) >= N.MAX_BACKUP_SNAPSHOTS:
                raise HamalError(
                    f"VM {vm.get(N.VM_NAME)} holds {len(held)} backup snapshots (the most "
                    f"FusionCompute allows is {N.MAX_BACKUP_SNAPSHOTS}): remove some first"
                )
            name = new_snapshot_name()
            cycle.snapshot_time = now_iso()
            snap = handle.snapshot = vrm.create_snapshot(vm_uri, name, self.create_timeout)
            by_volume = {vs.get(N.VS_VOLUME_URN): vs for vs in snap.get(N.VOLSNAPSHOTS) or []}
            now = {d.id: d for d in self._disks(vm)}
            for d in vm_info.disks:
                d = now.get(d.id, d)
                vs = by_volume.get(d.ref["volume_urn"])
                if vs is None:
                    raise HamalError(f"volume {d.ref['volume_urn']} ({d.id}) is not in snapshot {name}")
                cycle.disks.append(self._plan_disk(task, handle, d, vs, cursors.get(d.id)))
        except BaseException:
            abort_after_failure(self, cycle)
            raise
        return cycle

    def _plan_disk(
        self, task: Any, h: Handle, d: DiskInfo, vs: dict[str, Any], cursor: str | None
    ) -> DiskCycle:
        vrm, snap = h.vrm, h.snapshot or {}
        volume_uri = urn_to_uri(d.ref["volume_urn"])
        old = parse_cursor(cursor)
        reason = self._full_reason(d, vs, old)
        changed = None
        if reason is None and old is not None:
            try:
                changed, _ = vrm.changed_bitmap(volume_uri, vs, str(old["chg_id"]), d.size)
            except FcError as e:
                reason = f"the VRM cannot give the changes since chgID {old['chg_id']}: {e}"
        extra: dict[str, str] = {}
        if reason is not None:
            log.warning("disk %s: full sync: %s", d.id, reason)
            allocated, _ = vrm.changed_bitmap(volume_uri, vs, N.CHG_ID_FULL, d.size)
            extra["allocated"] = _write_private(
                os.path.join(h.folder, f"{d.id}.allocated.json"), json.dumps(allocated)
            )
        mode = self.transport(task)
        local_ip = self.local_ip or vrm.local_address()
        body = {
            "taskType": "CBTBackup",
            "ip": local_ip,
            "snapUrn1": snap.get(N.SNAPSHOT_URN),
            "snapUrn2": (old or {}).get("snapshot_urn", "") if changed is not None else "",
            "transMode": mode,
        }
        res_uri, res = vrm.backup_resource(volume_uri, body, self.task_timeout)
        h.resources.append(res_uri)
        query = {
            "token_file": _write_private(os.path.join(h.folder, f"{d.id}.token"), str(res[N.RES_TOKEN])),
            "snapshot": str(vs[N.VS_SNAP_UUID]),
            "size": str(d.size),
            "mode": mode,
        }
        if mode == "lanssl":
            query["ca_file"] = _write_private(os.path.join(h.folder, f"{d.id}.ca.pem"), str(res[N.RES_CA]))
        query |= extra
        host = str(res[N.RES_HOST])
        source = f"fc://{f'[{host}]' if ':' in host else host}:{int(res[N.RES_PORT])}/"
        source += quote(str(res[N.RES_URL]), safe="") + "?" + urlencode(query, safe="/")
        new = {
            "snapshot_uri": snap.get(N.SNAPSHOT_URI),
            "snapshot_urn": snap.get(N.SNAPSHOT_URN),
            "volume_urn": d.ref["volume_urn"],
            "chg_id": str(vs.get(N.VS_CHG_ID)),
            "cbt_time": str(vs.get(N.VS_CBT_TIME)),
            "size": d.size,
        }
        return DiskCycle(
            disk=d,
            source=source,
            new_cursor=json.dumps(new, sort_keys=True),
            old_cursor=cursor,
            changed=changed,
            full_reason=reason,
        )

    def commit(self, cycle: Cycle) -> None:
        """Releases the data channels, then deletes every snapshot of the cycle's that no disk's
        cursor holds any more: the previous one once all disks moved on, the new one when no
        disk was committed."""
        h: Handle = cycle.handle
        try:
            for uri in h.resources:
                h.vrm.delete_resource(uri)
            h.resources = []
            held, candidates = set(), {}
            if h.snapshot:
                candidates[h.snapshot.get(N.SNAPSHOT_URI)] = h.snapshot.get(N.SNAPSHOT_NAME)
            for dc in cycle.disks:
                old = parse_cursor(dc.old_cursor) or {}
                if old.get("snapshot_uri"):
                    candidates[old["snapshot_uri"]] = "the previous snapshot"
                kept = parse_cursor(dc.new_cursor if dc.committed else dc.old_cursor) or {}
                held.add(kept.get("snapshot_uri"))
            for uri, what in candidates.items():
                if uri and uri not in held:
                    h.vrm.delete_snapshot(uri, f"snapshot {what}", self.delete_timeout)
            h.snapshot = None
        finally:
            h.vrm.logout()
            shutil.rmtree(h.folder, ignore_errors=True)

    def cleanup_orphans(self, task: Any, known: set[str]) -> list[str]:
        """hamal's snapshots on the VM that no cursor holds (left by a crash); other tools'
        snapshots are never touched. (A crashed cycle's data channel resources cannot be
        listed through the VRM; the VRM expires them.)"""
        keep = {c.get("snapshot_uri") for c in map(parse_cursor, known) if c}
        vrm = vrm_for(task)
        removed = []
        vm = vrm.find_vm(task.vm_uuid)
        for s in vrm.snapshots(vm[N.VM_URI]):
            name = str(s.get(N.SNAPSHOT_NAME) or "")
            if is_ours(name) and s.get(N.SNAPSHOT_URI) not in keep:
                vrm.delete_snapshot(s[N.SNAPSHOT_URI], f"orphan snapshot {name}", self.delete_timeout)
                removed.append(f"snapshot {name}")
        return removed


__all__ = ["FusionComputeAdapter", "FcError"]
