"""Building sync jobs from ``hamal.conf`` and caller overrides.

Adapters and the CLI describe *what* to sync (disks with source, target and changed extents);
this module adds *how* (threads, cadence, throttles) from the config and starts the engine.
"""

from __future__ import annotations

import hashlib
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

    key_file: str | None = None

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
            "store": store_settings(cfg, self.key_file),
            "vddk": vddk_settings(cfg),
            "lock_dir": os.path.join(conf["DEFAULT"]["hamal_lib_dir"], "locks"),
        }


def vddk_settings(cfg: _native.Config) -> dict[str, Any]:
    """Where VDDK is and how it reads, from ``[vmware]`` (a ``vddk://`` URI's own ``libdir=`` and
    ``transports=`` win)."""
    vm = cfg.as_dict()["vmware"]
    return {
        "libdir": vm["vddk_libdir"],
        "transports": vm["transport_modes"],
        "max_read_blocks": vm["max_read_blocks"],
    }


def store_settings(cfg: _native.Config, key_file: str | None = None) -> dict[str, Any]:
    """Chunk-store options from ``[store]``, ``[s3]`` and ``[sync]`` (``key_file`` overrides
    ``[store] encryption_key_file``). Empty S3 keys are filled from the ``AWS_*`` environment."""
    conf = cfg.as_dict()
    st, s3, sy = conf["store"], conf["s3"], conf["sync"]
    return {
        "compression_level": st["compression_level"],
        "key_file": key_file or st["encryption_key_file"] or None,
        "upload_threads": st["upload_threads"],
        "local_metadata": os.path.join(conf["DEFAULT"]["hamal_lib_dir"], "snapshot_metadata"),
        "save_local": sy["save_local_snapshot_metadata"],
        "upload_metadata": sy["upload_metadata_to_oss"],
        "s3_endpoint": s3["endpoint"],
        "s3_region": s3["region"],
        "s3_access_key_id": s3["access_key_id"],
        "s3_secret_access_key": s3["secret_access_key"],
        "s3_virtual_hosted": s3["addressing_style"] == "virtual",
        "s3_ca_file": s3["ca_file"],
        "s3_timeout_s": s3["request_timeout"],
        "s3_max_retries": s3["max_retries"],
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


def journal_path(cfg: _native.Config, disk_id: str) -> str:
    """Resume journal of a disk whose target is not a local file: under ``hamal_lib_dir``."""
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
        if d.get("journal") is None and is_remote(d["target"]):
            key = f"{d['target']}#{d['disk_id']}" if is_store(d["target"]) else d["disk_id"]
            d["journal"] = journal_path(cfg, key)
    return _native.start_sync(disks, **(options or SyncOptions()).engine_kwargs(cfg))
