//! The one Python exception tree, and the one place Rust errors are mapped onto it.

use hamal_core::Error;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    _native,
    HamalError,
    PyException,
    "Base of every error raised by hamal."
);
create_exception!(
    _native,
    ConfigError,
    HamalError,
    "hamal.conf could not be read or holds a bad value."
);
create_exception!(
    _native,
    PlanError,
    HamalError,
    "Invalid plan or input; nothing was touched."
);
create_exception!(
    _native,
    SourceError,
    HamalError,
    "The source disk could not be opened or read."
);
create_exception!(
    _native,
    TargetError,
    HamalError,
    "The target could not be opened, written or flushed."
);
create_exception!(
    _native,
    JournalError,
    HamalError,
    "The resume journal could not be read or written."
);
create_exception!(
    _native,
    StoreError,
    HamalError,
    "A chunk store could not be opened, read or written (credentials, bucket, I/O, busy)."
);
create_exception!(
    _native,
    BusyError,
    HamalError,
    "Another run holds the target or store (one writer per target); nothing was written."
);
create_exception!(
    _native,
    CephError,
    HamalError,
    "A Ceph cluster, pool, image or snapshot could not be reached or used."
);
create_exception!(
    _native,
    VddkError,
    HamalError,
    "A VMware disk could not be read through VDDK (library, connection, thumbprint, open, read, worker crash)."
);
create_exception!(
    _native,
    MismatchError,
    HamalError,
    "Verification found different content."
);
create_exception!(
    _native,
    SyncCancelled,
    HamalError,
    "The job was cancelled; finished chunks are kept for a resume."
);
create_exception!(
    _native,
    InternalError,
    HamalError,
    "A bug in hamal; please report it."
);

pub fn to_py(e: &Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Config(_) => ConfigError::new_err(msg),
        Error::Plan(_) => PlanError::new_err(msg),
        Error::Source { .. } => SourceError::new_err(msg),
        Error::Target { .. } => TargetError::new_err(msg),
        Error::Journal { .. } => JournalError::new_err(msg),
        Error::Store(_) => StoreError::new_err(msg),
        Error::Busy(_) => BusyError::new_err(msg),
        Error::Ceph(_) => CephError::new_err(msg),
        Error::Vddk(_) => VddkError::new_err(msg),
        Error::Mismatch(_) => MismatchError::new_err(msg),
        Error::Cancelled => SyncCancelled::new_err(msg),
        Error::Internal(_) => InternalError::new_err(msg),
    }
}

/// Python name of the exception class an error maps to (for per-disk results).
pub fn kind(e: &Error) -> &'static str {
    match e {
        Error::Config(_) => "ConfigError",
        Error::Plan(_) => "PlanError",
        Error::Source { .. } => "SourceError",
        Error::Target { .. } => "TargetError",
        Error::Journal { .. } => "JournalError",
        Error::Store(_) => "StoreError",
        Error::Busy(_) => "BusyError",
        Error::Ceph(_) => "CephError",
        Error::Vddk(_) => "VddkError",
        Error::Mismatch(_) => "MismatchError",
        Error::Cancelled => "SyncCancelled",
        Error::Internal(_) => "InternalError",
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("HamalError", py.get_type::<HamalError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("PlanError", py.get_type::<PlanError>())?;
    m.add("SourceError", py.get_type::<SourceError>())?;
    m.add("TargetError", py.get_type::<TargetError>())?;
    m.add("JournalError", py.get_type::<JournalError>())?;
    m.add("StoreError", py.get_type::<StoreError>())?;
    m.add("BusyError", py.get_type::<BusyError>())?;
    m.add("CephError", py.get_type::<CephError>())?;
    m.add("VddkError", py.get_type::<VddkError>())?;
    m.add("MismatchError", py.get_type::<MismatchError>())?;
    m.add("SyncCancelled", py.get_type::<SyncCancelled>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    Ok(())
}
