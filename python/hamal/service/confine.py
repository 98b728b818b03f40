"""Where tasks from the control plane may write.

A task file is the operator's own word and may name any path. A task from Mass is not: its
target (a store folder, a file or device, an NBD socket) must lie inside ``[mass]
allowed_target_roots`` (comma-separated folders or devices; empty: ``hamal_lib_dir``), after
``{disk}`` is filled in and every symbolic link resolved, and an existing regular file is written
only when it is the task's own target (a disk that has committed to it before). S3 stores and NBD
exports over TCP write nothing on this host and are not confined.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs, urlparse

from hamal.service.tasks import Task, TaskError


def allowed_roots(conf: dict[str, Any]) -> list[str]:
    """The configured roots, resolved."""
    text = str(conf["mass"]["allowed_target_roots"])
    roots = [r.strip() for r in text.split(",") if r.strip()] or [str(conf["DEFAULT"]["hamal_lib_dir"])]
    return [os.path.realpath(r) for r in roots]


def local_path(uri: str) -> str | None:
    """The path on this host a target URI writes, or ``None`` for a network target."""
    if uri.startswith(("s3://", "nbd://", "nbds://")):
        return None
    if uri.startswith(("nbd+unix://", "nbds+unix://")):
        socket = parse_qs(urlparse(uri).query).get("socket", [""])[0]
        return socket
    for scheme in ("dir:", "file:"):
        if uri.startswith(scheme):
            return uri[len(scheme) :]
    return uri


def check_path(path: str, roots: list[str], where: str) -> str:
    """``path`` resolved, when it lies inside one of ``roots``; else a ``TaskError`` naming it."""
    if not path or any(ord(c) < 32 or c == "\x7f" for c in path):
        raise TaskError(f"{where}: {path!r} is empty or holds control characters")
    if not os.path.isabs(path) or ".." in path.split("/"):
        raise TaskError(f"{where}: {path!r} must be an absolute path without '..'")
    real = os.path.realpath(path)
    for root in roots:
        if real == root or real.startswith(root.rstrip("/") + "/"):
            return real
    raise TaskError(
        f"{where}: {path} is outside the folders tasks from Mass may write"
        f" ([mass] allowed_target_roots: {', '.join(roots)})"
    )


def check_task(
    task: Task, conf: dict[str, Any], disks: Iterable[str] = ("disk",), owned: Iterable[str] = ()
) -> None:
    """Checks a Mass task's targets for ``disks`` (names already checked safe); an existing
    regular file is refused unless its disk is in ``owned``. Task files pass unchecked."""
    if task.origin != "mass":
        return
    roots, owned = allowed_roots(conf), set(owned)
    for disk in disks:
        path = local_path(task.target_for(disk))
        if path is None:
            continue
        real = check_path(path, roots, f"task {task.id}: target.uri")
        if task.is_store() or disk in owned:
            continue
        try:
            mode = os.stat(real).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISREG(mode):
            raise TaskError(
                f"task {task.id}: target {real} of disk {disk} exists and this task has never written it:"
                " it is not overwritten (remove it, or name a new file)"
            )
