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
import subprocess
import tempfile
import time
from typing import Any

from hamal import _native, sync
from hamal.errors import SourceError

log = logging.getLogger("hamal.platforms.kvm")
PREFIX = "hamal-"


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
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode().strip() if self.proc.stderr else ""
                raise SourceError(f"qemu-nbd could not export {self.image}: {err}")
            if time.monotonic() > deadline:
                self.__exit__()
                raise SourceError(f"qemu-nbd did not start serving {self.image} within 10 s")
            time.sleep(0.02)
        return self

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
    """One cycle for a qcow2 image (see the module doc). Returns the engine's summary."""
    if not os.path.isfile(image):
        raise SourceError(f"{image}: no such qcow2 image")
    state_dir = state_dir or os.path.join(cfg.as_dict()["DEFAULT"]["hamal_lib_dir"], "kvm")
    state = ImageState(state_dir, image)
    cursors = state.cursors()
    present = bitmaps(image)
    cursor = None if full else cursors.get(target)
    if cursor and cursor not in present:
        log.warning("%s: cursor bitmap %s is gone; doing a full sync", image, cursor)
        cursor = None
    if cursor and "in-use" in present[cursor]:
        log.warning(
            "%s: bitmap %s was left inconsistent by a crashed writer; doing a full sync", image, cursor
        )
        remove_bitmap(image, cursor)
        cursor = None
    in_use = set(cursors.values()) | {cursor}
    for name in present:  # leftovers of failed cycles
        if name.startswith(PREFIX) and name not in in_use:
            remove_bitmap(image, name)
    new = f"{PREFIX}{int(time.time() * 1000)}"
    add_bitmap(image, new)
    try:
        with Export(image, cursor) as export:
            # The new bitmap names the point in time read: a chunk store records it as the
            # version's cursor, and a journal is trusted only within this cycle.
            disk = sync.disk(
                export.uri,
                target,
                disk_id=os.path.basename(image),
                bitmap=cursor,
                journal=journal,
                source_id=new,
            )
            (summary,) = sync.start([disk], cfg, options).wait()
    except BaseException:
        remove_bitmap(image, new)
        raise
    old = cursors.get(target)
    cursors[target] = new
    state.save(cursors)
    if old and old in present and old not in cursors.values():
        remove_bitmap(image, old)
    summary["bitmap"] = new
    return summary
