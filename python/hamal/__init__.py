"""hamal: agentless block-level sync of virtual machine disks.

The data plane is Rust (``hamal._native``); this package is the thin control plane around it.
"""

from hamal import errors
from hamal._native import Job, __version__, io_uring_status, load_changed_file, start_sync, verify
from hamal.config import load_config
from hamal.errors import *  # noqa: F403 - the exception tree is part of the public API

__all__ = [
    "Job",
    "__version__",
    "io_uring_status",
    "load_changed_file",
    "load_config",
    "start_sync",
    "verify",
    *errors.__all__,
]
