"""hamal's exception tree. Every error hamal raises is a ``HamalError``; the classes are
defined by the Rust extension so both sides raise the same types."""

from hamal._native import (
    BusyError,
    CephError,
    ConfigError,
    HamalError,
    InternalError,
    JournalError,
    MismatchError,
    PlanError,
    SourceError,
    StoreError,
    SyncCancelled,
    TargetError,
    VddkError,
)

__all__ = [
    "BusyError",
    "CephError",
    "ConfigError",
    "HamalError",
    "InternalError",
    "JournalError",
    "MismatchError",
    "PlanError",
    "SourceError",
    "StoreError",
    "SyncCancelled",
    "TargetError",
    "VddkError",
]
