"""hamal's exception tree, defined here once: the Rust extension imports these classes and
raises them (``rust/hamal-py/src/errors.rs`` maps each engine error to one). They pickle, so
errors cross process boundaries (the service's workers, multiprocessing) intact."""

from __future__ import annotations


class HamalError(Exception):
    """Base of every error raised by hamal."""


class ConfigError(HamalError):
    """hamal.conf could not be read or holds a bad value."""


class PlanError(HamalError):
    """Invalid plan or input; nothing was touched."""


class SourceError(HamalError):
    """The source disk could not be opened or read."""


class TargetError(HamalError):
    """The target could not be opened, written or flushed."""


class JournalError(HamalError):
    """The resume journal could not be read or written."""


class StoreError(HamalError):
    """A chunk store could not be opened, read or written (credentials, bucket, I/O)."""


class BusyError(HamalError):
    """Another run holds the target or store (one writer per target); nothing was written."""


class CephError(HamalError):
    """A Ceph cluster, pool, image or snapshot could not be reached or used."""


class VddkError(HamalError):
    """A VMware disk could not be read through VDDK (library, connection, thumbprint, open,
    read, worker crash)."""


class MismatchError(HamalError):
    """Verification found different content, or stored data failed its check."""


class SyncCancelled(HamalError):
    """The job was cancelled; finished chunks are kept for a resume."""


class MassError(HamalError):
    """The control plane (Mass) could not be reached or refused a request. ``kind`` says where
    it failed: dns, tcp, tls, pin, timeout, http, auth, unknown_proxy, route, protocol."""

    def __init__(self, kind: str, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.kind, self.status, self.code = kind, status, code

    @property
    def retryable(self) -> bool:
        """Worth trying again later: the network or Mass itself failed, not the request."""
        if self.kind in ("dns", "tcp", "tls", "timeout"):
            return True
        return self.kind == "http" and self.status is not None and (self.status >= 500 or self.status == 429)

    def __reduce__(self):  # type: ignore[override]
        return (MassError, (self.kind, str(self), self.status, self.code))


class InternalError(HamalError):
    """A bug in hamal; please report it."""


class StateError(RuntimeError):
    """The service's state database cannot be used (missing, newer schema, unknown task).
    Defined here so that the CLI can catch it without importing the service (and sqlite3)."""


__all__ = [
    "BusyError",
    "CephError",
    "ConfigError",
    "HamalError",
    "InternalError",
    "JournalError",
    "MassError",
    "MismatchError",
    "PlanError",
    "SourceError",
    "StoreError",
    "SyncCancelled",
    "TargetError",
    "VddkError",
]
