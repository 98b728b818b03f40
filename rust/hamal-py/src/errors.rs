//! The one place Rust errors are mapped onto Python's exception tree. The classes are defined
//! once, in Python (`hamal/errors.py`), so they live in the `hamal` package and pickle; this
//! module imports them.

use hamal_core::Error;
use pyo3::import_exception;
use pyo3::prelude::*;

import_exception!(hamal.errors, HamalError);
import_exception!(hamal.errors, ConfigError);
import_exception!(hamal.errors, PlanError);
import_exception!(hamal.errors, SourceError);
import_exception!(hamal.errors, TargetError);
import_exception!(hamal.errors, JournalError);
import_exception!(hamal.errors, StoreError);
import_exception!(hamal.errors, BusyError);
import_exception!(hamal.errors, CephError);
import_exception!(hamal.errors, VddkError);
import_exception!(hamal.errors, MismatchError);
import_exception!(hamal.errors, SyncCancelled);
import_exception!(hamal.errors, InternalError);

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
