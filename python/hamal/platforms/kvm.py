"""KVM / qcow2: change tracking with persistent qemu dirty bitmaps, data over NBD.

One cycle for an image whose guest is not writing to it (or a copy of it):

1. a new bitmap ``hamal-<ms>`` is added first, so every write from now on is tracked;
2. the image is exported read-only by qemu-nbd on a private unix socket, with the previous
   cycle's bitmap (the cursor) when there is one;
3. the engine syncs the extents dirty in the cursor (all allocated extents on the first
   cycle, or when the cursor is missing or was left inconsistent by a crashed writer);
4. only after the sync committed is the new bitmap recorded as the cursor and the old one
   removed. A failed cycle removes the new bitmap and keeps the old cursor, which has kept
   tracking, so the next cycle covers everything.

Any other NBD export with a bitmap (a libvirt pull-mode backup, for instance) is a source as it
is: ``hamal sync nbd+unix:///EXPORT?socket=PATH TARGET --bitmap NAME``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from hamal import _native, sync
from hamal.errors import PlanError, SourceError
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
from hamal.progress import wait_with_progress

log = logging.getLogger("hamal.platforms.kvm")


def _run(*cmd: str) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise SourceError(f"{cmd[0]} not found: install qemu-utils") from None
    if p.returncode != 0:
        raise SourceError(f"{' '.join(cmd)}: {p.stderr.strip() or 'exit ' + str(p.returncode)}")
    return p.stdout


def bitmaps(image: str) -> dict[str, list[str]]:
    """Persistent bitmaps of a qcow2 image: name -> flags (``auto``, ``in-use``)."""
    info = json.loads(_run("qemu-img", "info", "--output=json", "-f", "qcow2", image))
    data = info.get("format-specific", {}).get("data", {})
    return {b["name"]: b.get("flags", []) for b in data.get("bitmaps", [])}


def add_bitmap(image: str, name: str) -> None:
    _run("qemu-img", "bitmap", "--add", "-f", "qcow2", image, name)


def remove_bitmap(image: str, name: str) -> None:
    _run("qemu-img", "bitmap", "--remove", "-f", "qcow2", image, name)


class Export:
    """``qemu-nbd`` serving ``image`` read-only on a private unix socket, stopped on exit."""

    def __init__(self, image: str, bitmap: str | None) -> None:
        self.image, self.bitmap = image, bitmap
        self.dir = tempfile.mkdtemp(prefix="hamal-nbd-")
        self.sock = os.path.join(self.dir, "nbd.sock")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def __enter__(self) -> Export:
        cmd = ["qemu-nbd", "-r", "-f", "qcow2", "-t", "-e", "8", "-k", self.sock]
        if self.bitmap:
            cmd += ["-B", self.bitmap]
        self.proc = subprocess.Popen([*cmd, self.image], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        # The socket file appears at bind(), a moment before listen(): wait until it answers.
        while not self._listening():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode().strip() if self.proc.stderr else ""
                raise SourceError(f"qemu-nbd could not export {self.image}: {err}")
            if time.monotonic() > deadline:
                self.__exit__()
                raise SourceError(f"qemu-nbd did not start serving {self.image} within 10 s")
            time.sleep(0.02)
        return self

    def _listening(self) -> bool:
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(self.sock)
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class ImageState:
    """Which bitmap is the cursor of each target of an image, in ``hamal_lib_dir/kvm``.
    Bitmaps live in the image, shared by its targets: one referenced by no target is a
    leftover of a failed cycle. Written atomically, after a sync committed."""

    def __init__(self, state_dir: str, image: str) -> None:
        self.image = os.path.abspath(image)
        key = hashlib.sha256(self.image.encode()).hexdigest()[:32]
        self.path = os.path.join(state_dir, f"{key}.json")

    def cursors(self) -> dict[str, str]:
        try:
            with open(self.path) as f:
                return dict(json.load(f).get("cursors", {}))
        except FileNotFoundError:
            return {}

    def save(self, cursors: dict[str, str]) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"image": self.image, "cursors": cursors}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def image_size(image: str) -> int:
    info = json.loads(_run("qemu-img", "info", "--output=json", "-f", "qcow2", image))
    return int(info["virtual-size"])


def outside_backing_files(image: str) -> list[str]:
    """The files of ``image``'s backing chain that lie outside its folder (symbolic links
    resolved): what the image would read from elsewhere on the host."""
    folder = os.path.realpath(os.path.dirname(image))
    chain = json.loads(_run("qemu-img", "info", "--backing-chain", "--output=json", "-f", "qcow2", image))
    out = []
    for layer in chain[1:] if isinstance(chain, list) else []:
        real = os.path.realpath(str(layer.get("filename", "")))
        if os.path.dirname(real) != folder and not real.startswith(folder + "/"):
            out.append(real)
    return out


@dataclass
class _Export:
    """The cycle's handle: the exports serving each disk, stopped at commit or abort."""

    exports: list[Export]

    def stop(self) -> None:
        for e in self.exports:
            e.__exit__()


class KvmAdapter(AbortByCommit):
    """qcow2 images of a VM whose guest does not write during a cycle (a stopped VM, or a copy).

    Task connection: ``images = {disk id = "/path/to/disk.qcow2", ...}``. The cursor of a disk
    is the name of the persistent bitmap that has tracked writes since its last synced cycle.
    An image whose backing chain reaches outside its folder is refused (it would copy host files
    into the store) unless the task says ``allow_outside_backing = true``."""

    name = "kvm"

    def images(self, task: Any) -> dict[str, str]:
        images = task.connection.get("images")
        if not isinstance(images, dict) or not images:
            raise PlanError(f"task {task.id}: connection.images must map disk ids to qcow2 image paths")
        for disk, path in images.items():
            if not isinstance(path, str) or not os.path.isabs(path):
                raise PlanError(f"task {task.id}: connection.images.{disk}: {path!r} is not an absolute path")
        return dict(images)

    def discover(self, task: Any) -> VmInfo:
        disks = []
        for disk, path in self.images(task).items():
            if not os.path.isfile(path):
                raise SourceError(f"VM {task.vm_name}: disk {disk}: image {path} does not exist")
            outside = outside_backing_files(path)
            if outside and task.connection.get("allow_outside_backing") is not True:
                raise SourceError(
                    f"VM {task.vm_name}: disk {disk}: image {path} has backing file {outside[0]} outside its"
                    " folder: refused (set connection.allow_outside_backing = true if the chain is yours)"
                )
            disks.append(DiskInfo(id=disk, size=image_size(path), ref={"image": path}))
        return VmInfo(name=task.vm_name, uuid=task.vm_uuid, disks=disks)

    def begin(self, task: Any, vm: VmInfo, cursors: dict[str, str | None]) -> Cycle:
        cycle = Cycle(vm=vm, disks=[], snapshot_time=now_iso(), handle=_Export([]))
        try:
            for d in vm.disks:
                cycle.disks.append(self._begin_disk(d, cursors.get(d.id), cycle.handle))
        except BaseException:
            abort_after_failure(self, cycle)
            raise
        return cycle

    def _begin_disk(self, d: DiskInfo, cursor: str | None, handle: _Export) -> DiskCycle:
        image = d.ref["image"]
        present = bitmaps(image)
        reason = None if cursor else "first cycle (or a full resync was asked for)"
        if cursor and cursor not in present:
            reason = f"its cursor bitmap {cursor} is gone from the image"
        elif cursor and "in-use" in present[cursor]:
            reason = f"its cursor bitmap {cursor} was left inconsistent by a crashed writer"
            remove_bitmap(image, cursor)
        if reason and cursor:
            log.warning("disk %s (%s): full sync: %s", d.id, image, reason)
        old = None if reason else cursor
        new = new_snapshot_name()
        if d.size:
            add_bitmap(image, new)  # every write from now on is tracked for the next cycle
        export = Export(image, old).__enter__()
        handle.exports.append(export)
        return DiskCycle(
            disk=d, source=export.uri, new_cursor=new, old_cursor=old, bitmap=old, full_reason=reason
        )

    def commit(self, cycle: Cycle) -> None:
        """Stops the exports; drops each committed disk's old bitmap, or a failed disk's new one."""
        cycle.handle.stop()
        for dc in cycle.disks:
            image = dc.disk.ref["image"]
            gone = dc.old_cursor if dc.committed else dc.new_cursor
            if gone and gone in bitmaps(image):
                remove_bitmap(image, gone)

    def cleanup_orphans(self, task: Any, known: set[str]) -> list[str]:
        removed = []
        for disk, image in self.images(task).items():
            if not os.path.isfile(image):
                continue
            for name in bitmaps(image):
                if is_ours(name) and name not in known:
                    remove_bitmap(image, name)
                    removed.append(f"{disk}: bitmap {name}")
        return removed


@dataclass
class _OneImage:
    """The KVM adapter's view of a lone image for ``hamal kvm sync``."""

    image: str
    id: str = "image"
    vm_name: str = "image"
    vm_uuid: str = "-"
    connection: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.connection = {"images": {"image": self.image}}


def sync_image(
    image: str,
    target: str,
    cfg: _native.Config,
    options: sync.SyncOptions | None = None,
    *,
    full: bool = False,
    state_dir: str | None = None,
    journal: str | None = None,
) -> dict[str, Any]:
    """One cycle for a qcow2 image (see the module doc), its cursor kept in ``state_dir``
    per target. Returns the engine's summary."""
    if not os.path.isfile(image):
        raise SourceError(f"{image}: no such qcow2 image")
    state_dir = state_dir or os.path.join(cfg.as_dict()["DEFAULT"]["hamal_lib_dir"], "kvm")
    state = ImageState(state_dir, image)
    cursors = state.cursors()
    task = _OneImage(os.path.abspath(image))
    adapter = KvmAdapter()
    adapter.cleanup_orphans(task, set(cursors.values()))
    vm = adapter.discover(task)
    cycle = adapter.begin(task, vm, {"image": None if full else cursors.get(target)})
    (dc,) = cycle.disks
    try:
        # The new bitmap names the point in time read: a chunk store records it as the
        # version's cursor, and a journal is trusted only within this cycle.
        disk = sync.disk(
            dc.source,
            target,
            disk_id=os.path.basename(image),
            bitmap=dc.bitmap,
            journal=journal,
            source_id=dc.new_cursor,
        )
        (summary,) = wait_with_progress(sync.start([disk], cfg, options), False)
    except BaseException:
        adapter.abort(cycle)
        raise
    cursors[target] = dc.new_cursor
    state.save(cursors)
    dc.committed = True
    if dc.old_cursor in cursors.values():
        dc.old_cursor = None  # another target of this image still builds on it
    adapter.commit(cycle)
    summary["bitmap"] = dc.new_cursor
    return summary
