"""hamal: agentless block-level sync of virtual machine disks.

The data plane is Rust (``hamal._native``); this package is the thin control plane around it.
"""

from hamal._native import Job, __version__, io_uring_status, load_changed_file, start_sync, verify
from hamal.config import load_config
from hamal.errors import (
    ConfigError,
    HamalError,
    InternalError,
    JournalError,
    MismatchError,
    PlanError,
    SourceError,
    SyncCancelled,
    TargetError,
)

__all__ = [
    "ConfigError",
    "HamalError",
    "InternalError",
    "Job",
    "JournalError",
    "MismatchError",
    "PlanError",
    "SourceError",
    "SyncCancelled",
    "TargetError",
    "__version__",
    "io_uring_status",
    "load_changed_file",
    "load_config",
    "start_sync",
    "verify",
]
