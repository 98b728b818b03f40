"""Type stub of the compiled data plane (rust/hamal-py). Checked against the module by
tests/test_python_api.py and mypy's stubtest."""

from typing import Any, Literal, TypedDict, final, type_check_only

_DiskState = Literal["pending", "running", "done", "failed", "cancelled"]

@type_check_only
class Counters(TypedDict):
    bytes_total: int
    bytes_done: int
    bytes_zero: int
    bytes_resumed: int
    chunks_total: int
    chunks_done: int
    elapsed_s: float
    rate_bps: float
    eta_s: float | None

@type_check_only
class DiskProgress(Counters):
    disk_id: str
    state: _DiskState

@type_check_only
class Progress(Counters):
    finished: bool
    disks: list[DiskProgress]

@type_check_only
class DiskSummary(TypedDict):
    disk_id: str
    source: str
    target: str
    size: int
    mode: Literal["full", "incremental"]
    bytes_total: int
    bytes_written: int
    bytes_zero: int
    bytes_resumed: int
    holes_zeroed: int
    chunks: int
    seconds: float
    io_backend: str
    checksum: str | None
    content_digest: str | None
    version: str | None
    parent: str | None
    full_reason: str | None

@type_check_only
class DiskResult(TypedDict, total=False):
    disk_id: str
    state: _DiskState
    summary: DiskSummary
    error: str
    error_kind: str

__all__ = [
    "Config",
    "Job",
    "__version__",
    "_vddk_worker_main",
    "fc_bitmap_extents",
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
    "vddk_access",
    "verify",
    "verify_store",
]

__version__: str

@final
class Job:
    """A running (or finished) sync job. Create it with `start_sync`."""

    @property
    def finished(self) -> bool: ...
    def progress(self) -> Progress: ...
    def wait(self, timeout: float | None = None) -> list[DiskSummary] | None: ...
    def cancel(self) -> None: ...
    def results(self) -> list[DiskResult]: ...
    def __enter__(self) -> Job: ...
    def __exit__(self, ty: object, value: object, tb: object) -> bool: ...

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
    config: Config | None = None,
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
) -> Job: ...
def verify(
    source: str,
    target: str,
    config: Config | None = None,
    *,
    changed: list[tuple[int, int]] | None = None,
    changed_origin: str = "changed list",
    chunk_size: int = ...,
    checksum: str = "blake3",
    io_mode: str = "auto",
) -> dict[str, Any]: ...
def load_changed_file(path: str) -> list[tuple[int, int]]: ...
def map_source(source: str, config: Config | None = None, *, bitmap: str | None = None) -> dict[str, Any]: ...
def load_config(path: str | None = None) -> Config: ...
def io_uring_status() -> str | None: ...
def list_versions(
    store: str, config: Config | None = None, *, disk: str | None = None, key_file: str | None = None
) -> tuple[list[dict[str, Any]], list[str]]: ...
def verify_store(
    store: str,
    config: Config | None = None,
    *,
    disk: str | None = None,
    version: str | None = None,
    deep: bool = False,
    key_file: str | None = None,
    sample: tuple[int, int] | None = None,
) -> dict[str, Any]: ...
def prune_store(
    store: str,
    keep: int,
    config: Config | None = None,
    *,
    disk: str | None = None,
    key_file: str | None = None,
    collect: bool = True,
) -> dict[str, Any]: ...
def rbd_list_snapshots(image: str) -> list[dict[str, Any]]: ...
def rbd_image_size(image: str) -> int: ...
def rbd_create_snapshot(image: str, name: str, *, protect: bool = False) -> dict[str, Any]: ...
def rbd_remove_snapshot(image: str, name: str, *, unprotect: bool = False) -> None: ...
def rbd_protect_snapshot(image: str, name: str, *, protected: bool = True) -> None: ...
def fc_bitmap_extents(
    bitmap: bytes, bits: int, block_size: int, start_block: int, disk_size: int
) -> tuple[list[tuple[int, int]], int]: ...
def vddk_access(uri: str, begin: bool, config: Config | None = None) -> None: ...
def _vddk_worker_main() -> int: ...
