"""Building sync jobs from ``hamal.conf`` and caller overrides.

Adapters and the CLI describe *what* to sync (disks with source, target and changed extents);
this module adds *how* (threads, cadence, throttles) from the config and starts the engine.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from hamal import _native
from hamal.errors import PlanError

# Which [period] key throttles which platform's reads.
RELEASE_CPU_KEYS = {"vmware": "vmware_release_cpu_time", "openstack": "openstack_release_cpu_time"}


@dataclass
class SyncOptions:
    """Engine settings; ``None`` means "from hamal.conf"."""

    chunk_size: int = 4 << 20
    readers: int | None = None
    writers: int = 1
    queue_depth: int = 4
    parallel_disks: int | None = None
    checksum: str | None = None
    platform: str | None = None
    release_cpu_ms_per_mb: int | None = None
    bwlimit_bps: int | None = None
    io_mode: str = "auto"
    memory_budget: int = 256 << 20
    fsync_period_s: float | None = None

    def engine_kwargs(self, cfg: _native.Config) -> dict[str, Any]:
        """Keyword arguments for ``start_sync``, with the config's values filled in and checked."""
        conf = cfg.as_dict()
        v2 = conf["data_sync_v2"]
        readers = self.readers if self.readers is not None else v2["pre_disk_readers_count"]
        if readers > v2["max_pre_disk_readers_count"]:
            raise PlanError(
                f"readers = {readers} exceeds [data_sync_v2] max_pre_disk_readers_count = "
                f"{v2['max_pre_disk_readers_count']} in {cfg.path}"
            )
        parallel = self.parallel_disks if self.parallel_disks is not None else v2["parallel_sync_disks_count"]
        if parallel > v2["max_parallel_sync_disks_count"]:
            raise PlanError(
                f"parallel disks = {parallel} exceeds [data_sync_v2] max_parallel_sync_disks_count = "
                f"{v2['max_parallel_sync_disks_count']} in {cfg.path}"
            )
        release = self.release_cpu_ms_per_mb
        if release is None:
            key = RELEASE_CPU_KEYS.get(self.platform or "")
            release = conf["period"][key] if key else 0
        fsync = (
            self.fsync_period_s if self.fsync_period_s is not None else float(v2["fsync_period_frequency"])
        )
        return {
            "chunk_size": self.chunk_size,
            "readers": readers,
            "writers": self.writers,
            "queue_depth": self.queue_depth,
            "parallel_disks": parallel,
            "checksum": self.checksum,
            "release_cpu_ms_per_mb": release,
            "bwlimit_bps": self.bwlimit_bps,
            "io_mode": self.io_mode,
            "memory_budget": self.memory_budget,
            "fsync_period_s": fsync,
            "fsync_timeout_s": v2["fsync_timeout"],
        }


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
) -> dict[str, Any]:
    """One disk of a plan. With neither ``changed`` nor ``bitmap`` every allocated extent is
    synced (a full sync); ``bitmap`` names the dirty bitmap of an NBD source to take changes from.
    ``source_id`` names the snapshot read; a resume journal is trusted only for the same id
    (file sources identify themselves by their modification time)."""
    return {
        "bitmap": bitmap,
        "source_id": source_id,
        "disk_id": disk_id or target,
        "source": source,
        "target": target,
        "changed": changed,
        "changed_origin": changed_origin or "changed list",
        "journal": journal,
    }


def is_remote(uri: str) -> bool:
    """True for a URI that is not a local file (NBD today)."""
    return "://" in uri and not uri.startswith("file://")


def journal_path(cfg: _native.Config, disk_id: str) -> str:
    """Resume journal of a disk whose target is not a local file: under ``hamal_lib_dir``."""
    lib_dir = cfg.as_dict()["DEFAULT"]["hamal_lib_dir"]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", disk_id)[-120:]
    os.makedirs(os.path.join(lib_dir, "journal"), exist_ok=True)
    return os.path.join(lib_dir, "journal", f"{safe}.journal")


def start(
    disks: list[dict[str, Any]], cfg: _native.Config, options: SyncOptions | None = None
) -> _native.Job:
    """Starts a job; the returned handle has ``progress()``, ``wait(timeout)`` and ``cancel()``."""
    for d in disks:
        if d.get("journal") is None and is_remote(d["target"]):
            d["journal"] = journal_path(cfg, d["disk_id"])
    return _native.start_sync(disks, **(options or SyncOptions()).engine_kwargs(cfg))
