//! The data plane's error type. Every variant names what is at fault (file, key, disk, offset),
//! so one line is enough for an operator; the binding maps each variant to one Python exception.

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `hamal.conf` could not be read or holds a bad value.
    #[error("{0}")]
    Config(String),

    /// The plan or an input file (`--changed`, chunk size, ...) is invalid; nothing was touched.
    #[error("{0}")]
    Plan(String),

    /// The source disk could not be opened or read.
    #[error("source {path}: {what}{}: {source}", at(*.offset))]
    Source {
        path: PathBuf,
        what: &'static str,
        offset: Option<u64>,
        source: io::Error,
    },

    /// The target could not be opened, written or flushed.
    #[error("target {path}: {what}{}: {source}", at(*.offset))]
    Target {
        path: PathBuf,
        what: &'static str,
        offset: Option<u64>,
        source: io::Error,
    },

    /// The resume journal could not be read or written.
    #[error("journal {path}: {what}: {source}")]
    Journal {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },

    /// A chunk store could not be opened, read or written (bad credentials, missing bucket,
    /// I/O errors, busy).
    #[error("{0}")]
    Store(String),

    /// Another run holds the target or store (one writer per target); nothing was written.
    #[error("{0}")]
    Busy(String),

    /// A Ceph cluster, pool, image or snapshot could not be reached or used (librbd missing,
    /// authentication, unknown names, timeouts).
    #[error("{0}")]
    Ceph(String),

    /// A VMware disk could not be read through VDDK (library missing, connection, thumbprint,
    /// open or read errors with VDDK's text, the worker process crashed).
    #[error("{0}")]
    Vddk(String),

    /// `verify` found different content, or stored data failed its check.
    #[error("{0}")]
    Mismatch(String),

    /// A bug: a panic caught at the disk boundary.
    #[error("{0}")]
    Internal(String),

    /// The job was cancelled; finished chunks are kept in the journal for a resume.
    #[error("cancelled")]
    Cancelled,
}

fn at(offset: Option<u64>) -> String {
    offset
        .map(|o| format!(" at offset {o}"))
        .unwrap_or_default()
}

impl Error {
    pub fn source_io(
        path: impl Into<PathBuf>,
        what: &'static str,
        offset: Option<u64>,
        e: io::Error,
    ) -> Self {
        Error::Source {
            path: path.into(),
            what,
            offset,
            source: e,
        }
    }

    pub fn target_io(
        path: impl Into<PathBuf>,
        what: &'static str,
        offset: Option<u64>,
        e: io::Error,
    ) -> Self {
        Error::Target {
            path: path.into(),
            what,
            offset,
            source: e,
        }
    }

    pub fn journal_io(path: impl Into<PathBuf>, what: &'static str, e: io::Error) -> Self {
        Error::Journal {
            path: path.into(),
            what,
            source: e,
        }
    }
}
