"""Type stub of the compiled data plane (rust/hamal-py). Checked against the module by
tests/test_python_api.py and mypy's stubtest."""

from typing import Any, final

__all__ = [
    "BusyError",
    "CephError",
    "Config",
    "ConfigError",
    "HamalError",
    "InternalError",
    "Job",
    "JournalError",
    "MismatchError",
    "PlanError",
    "SourceError",
    "StoreError",
    "SyncCancelled",
    "TargetError",
    "VddkError",
    "__version__",
    "_vddk_worker_main",
    "io_uring_status",
    "load_changed_file",
    "list_versions",
    "load_config",
    "map_source",
    "prune_store",
    "rbd_create_snapshot",
    "rbd_image_size",
    "rbd_list_snapshots",
    "rbd_protect_snapshot",
    "rbd_remove_snapshot",
    "start_sync",
    "verify",
    "verify_store",
]

__version__: str

class HamalError(Exception): ...
class ConfigError(HamalError): ...
class PlanError(HamalError): ...
class SourceError(HamalError): ...
class TargetError(HamalError): ...
class JournalError(HamalError): ...
class StoreError(HamalError): ...
class BusyError(HamalError): ...
class CephError(HamalError): ...
class VddkError(HamalError): ...
class MismatchError(HamalError): ...
class SyncCancelled(HamalError): ...
class InternalError(HamalError): ...

@final
class Job:
    """A running (or finished) sync job. Create it with `start_sync`."""

    @property
    def finished(self) -> bool: ...
    def progress(self) -> dict[str, Any]: ...
    def wait(self, timeout: float | None = None) -> list[dict[str, Any]] | None: ...
    def cancel(self) -> None: ...
    def results(self) -> list[dict[str, Any]]: ...

@final
class Config:
    """A loaded hamal.conf."""

    @property
    def path(self) -> str: ...
    @property
    def found(self) -> bool: ...
    @property
    def warnings(self) -> list[str]: ...
    def as_dict(self) -> dict[str, dict[str, Any]]: ...
    def render(self) -> str: ...
    def secret_keys(self) -> list[tuple[str, str]]: ...

def start_sync(
    disks: list[dict[str, Any]],
    *,
    chunk_size: int = ...,
    readers: int = 2,
    writers: int = 1,
    queue_depth: int = 4,
    parallel_disks: int = 4,
    checksum: str | None = None,
    release_cpu_ms_per_mb: int = 0,
    bwlimit_bps: int | None = None,
    io_mode: str = "auto",
    memory_budget: int = ...,
    fsync_period_s: float = 3.0,
    fsync_timeout_s: int = 0,
    store: dict[str, Any] | None = None,
    vddk: dict[str, Any] | None = None,
    lock_dir: str | None = None,
) -> Job: ...
def verify(
    source: str,
    target: str,
    *,
    changed: list[tuple[int, int]] | None = None,
    changed_origin: str = "changed list",
    chunk_size: int = ...,
    checksum: str = "blake3",
    io_mode: str = "auto",
    vddk: dict[str, Any] | None = None,
) -> dict[str, Any]: ...
def load_changed_file(path: str) -> list[tuple[int, int]]: ...
def map_source(
    source: str, *, bitmap: str | None = None, vddk: dict[str, Any] | None = None
) -> dict[str, Any]: ...
def load_config(path: str | None = None) -> Config: ...
def io_uring_status() -> str | None: ...
def list_versions(
    store: str, *, disk: str | None = None, options: dict[str, Any] | None = None
) -> tuple[list[dict[str, Any]], list[str]]: ...
def verify_store(
    store: str,
    *,
    disk: str | None = None,
    version: str | None = None,
    deep: bool = False,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]: ...
def prune_store(
    store: str, keep: int, *, disk: str | None = None, options: dict[str, Any] | None = None
) -> dict[str, Any]: ...
def rbd_list_snapshots(image: str) -> list[dict[str, Any]]: ...
def rbd_image_size(image: str) -> int: ...
def rbd_create_snapshot(image: str, name: str, *, protect: bool = False) -> dict[str, Any]: ...
def rbd_remove_snapshot(image: str, name: str, *, unprotect: bool = False) -> None: ...
def rbd_protect_snapshot(image: str, name: str, *, protected: bool = True) -> None: ...
def _vddk_worker_main() -> int: ...
