"""Building sync jobs from ``hamal.conf`` and caller overrides.

Adapters and the CLI describe *what* to sync (disks with source, target and changed extents);
this module adds *how* (threads, cadence, throttles) from the config and starts the engine.
"""

from __future__ import annotations

import os
import re
import stat

from hamal import _native
from hamal.errors import PlanError

# Imported for type checkers only: `typing` costs the CLI's start ~5 ms (tools/bench --only local).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

PLATFORMS = ("vmware", "openstack")  # whose [period] *_release_cpu_time throttles reads


class SyncOptions:
    """Overrides of the engine settings; ``None`` keeps what ``hamal.conf`` says (the config
    object itself goes to the engine, which reads its settings there). ``platform``, "vmware"
    or "openstack", takes that platform's ``[period] *_release_cpu_time``. A plain class, not a
    dataclass: importing ``dataclasses`` cost every ``hamal sync`` ~10 ms of start-up."""

    def __init__(
        self,
        *,
        chunk_size: int | None = None,
        readers: int | None = None,
        writers: int | None = None,
        queue_depth: int | None = None,
        parallel_disks: int | None = None,
        checksum: str | None = None,
        platform: str | None = None,
        release_cpu_ms_per_mb: int | None = None,
        bwlimit_bps: int | None = None,
        io_mode: str | None = None,
        memory_budget: int | None = None,
        fsync_period_s: float | None = None,
        key_file: str | None = None,
    ) -> None:
        given = dict(locals())
        del given["self"]
        self._overrides = {k: v for k, v in given.items() if v is not None}

    def overrides(self) -> dict[str, Any]:
        return dict(self._overrides)

    def __repr__(self) -> str:
        return f"SyncOptions({', '.join(f'{k}={v!r}' for k, v in self._overrides.items())})"


def disk(
    source: str,
    target: str,
    *,
    disk_id: str | None = None,
    changed: list[tuple[int, int]] | None = None,
    changed_origin: str | None = None,
    journal: str | None = None,
    bitmap: str | None = None,
    source_id: str | None = None,
    version: str | None = None,
    parent: str | None = None,
    full_on_mismatch: bool = False,
    snapshot_time: str | None = None,
) -> dict[str, Any]:
    """One disk of a plan. With neither ``changed`` nor ``bitmap`` every allocated extent is
    synced (a full sync); ``bitmap`` names the dirty bitmap of an NBD source to take changes from.
    ``source_id`` names the snapshot read; a resume journal is trusted only for the same id
    (file sources identify themselves by their modification time). ``version`` picks the version
    read from a chunk-store source (default: the newest).

    Into a chunk store, ``parent`` names the version the changes are relative to (the one whose
    cursor they were computed from); the sync is refused when it is missing or does not fit,
    or runs in full with ``full_on_mismatch`` (the summary's ``full_reason`` says why).
    ``snapshot_time`` (RFC 3339) becomes the version's time; by default the time the first
    attempt of the sync started."""
    if disk_id is None and (is_store(target) or is_store(source)):
        raise PlanError(f"a chunk store ({target if is_store(target) else source}) needs a disk id (--disk)")
    return {
        "bitmap": bitmap,
        "source_id": source_id,
        "disk_id": disk_id or target,
        "source": source,
        "target": target,
        "changed": changed,
        "changed_origin": changed_origin or "changed list",
        "journal": journal,
        "version": version,
        "parent": parent,
        "full_on_mismatch": full_on_mismatch,
        "snapshot_time": snapshot_time,
    }


def is_store(uri: str) -> bool:
    """True for a chunk-store URI (``dir:`` or ``s3://``)."""
    return uri.startswith(("dir:", "s3://"))


def is_remote(uri: str) -> bool:
    """True for a URI that is not a local file (NBD, chunk stores)."""
    return is_store(uri) or ("://" in uri and not uri.startswith("file://"))


def is_block_device(uri: str) -> bool:
    """True for a local target (``file:PATH``, ``file://PATH`` or a plain path) that is a block
    device; False for anything else, remote URIs included (they name no local path)."""
    try:
        return stat.S_ISBLK(os.stat(re.sub(r"^file:(//)?", "", uri)).st_mode)
    except OSError:
        return False


def journal_path(cfg: _native.Config, disk_id: str) -> str:
    """Resume journal of a disk whose target is not a regular file (an NBD export, a store or
    a block device, whose ``TARGET.hamal-journal`` would land in /dev, a tmpfs that a reboot
    empties): under ``hamal_lib_dir``."""
    import hashlib  # here: its OpenSSL load costs every `hamal sync` ~5 ms of start-up

    lib_dir = cfg.as_dict()["DEFAULT"]["hamal_lib_dir"]
    safe = (
        re.sub(r"[^A-Za-z0-9._-]", "_", disk_id)[-100:]
        + "-"
        + hashlib.sha256(disk_id.encode()).hexdigest()[:8]
    )
    os.makedirs(os.path.join(lib_dir, "journal"), exist_ok=True)
    return os.path.join(lib_dir, "journal", f"{safe}.journal")


def start(
    disks: list[dict[str, Any]], cfg: _native.Config, options: SyncOptions | None = None
) -> _native.Job:
    """Starts a job; the returned handle has ``progress()``, ``wait(timeout)`` and ``cancel()``."""
    for d in disks:
        if d.get("journal") is None and (is_remote(d["target"]) or is_block_device(d["target"])):
            key = f"{d['target']}#{d['disk_id']}" if is_store(d["target"]) else d["disk_id"]
            d["journal"] = journal_path(cfg, key)
    return _native.start_sync(disks, cfg, **(options or SyncOptions()).overrides())
