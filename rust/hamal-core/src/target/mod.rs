//! Targets: where synced bytes go. Writes are positional; a target can zero a range without
//! storing data, and `flush` makes everything written so far durable.

mod file;
pub(crate) mod lock;
mod nbd;

pub use file::FileTarget;
pub use nbd::NbdTarget;

use crate::checksum::{ChunkHasher, Digest};
use crate::io::WriteReq;
use crate::Result;

pub trait Target: Send + Sync {
    fn describe(&self) -> String;
    /// Writes must start and end on multiples of this (NBD minimum block size).
    fn alignment(&self) -> u64 {
        1
    }
    /// True when the target was created empty by this run (known zero everywhere).
    fn is_fresh(&self) -> bool;
    /// Makes `[offset, offset + len)` read as zeros without storing data where possible.
    fn zero_range(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes every completed write durable (fsync / FLUSH).
    fn flush(&self) -> Result<()>;
    /// Undoes what opening did when the run is refused before writing (a file it created).
    fn abandon(&self) {}
    /// Writes are plain positional file I/O on this host (not a server, not a chunk sink): with
    /// a local source the engine then copies in cache-sized pieces, each thread writing what it
    /// read.
    fn local_io(&self) -> bool {
        false
    }
    /// Each write waits for the device (`O_DIRECT`): the local copy then writes a chunk's
    /// contiguous data at once instead of piece by piece.
    fn joins_writes(&self) -> bool {
        false
    }
    /// A writer for one engine thread, with up to `depth` writes in flight.
    fn writer(&self, depth: u32) -> Result<Box<dyn TargetWriter>>;
    /// The chunk-store face of a target that keeps whole chunks by name instead of writing
    /// at offsets.
    fn as_chunk_sink(&self) -> Option<&dyn ChunkSink> {
        None
    }
}

/// A target that stores whole chunks (aligned to the chunk grid, see `alignment`) named by a
/// hash of their content, and commits a version at the end.
pub trait ChunkSink: Sync {
    /// How chunks are named; engine readers hash, and the journal keeps the names.
    fn hasher(&self) -> ChunkHasher;
    /// Writer (upload) threads the engine should run for this target.
    fn writers(&self) -> u32;
    /// Readies chunk `index` (its whole bytes) named `name` for the target: `None` when the
    /// target already has that content (the chunk is recorded), else what `Prepared::send`
    /// stores. The engine reuses `data`'s buffer as soon as this returns.
    fn prepare(
        &self,
        index: u64,
        data: &[u8],
        name: &Digest,
    ) -> Result<Option<Box<dyn Prepared + '_>>>;
    /// Takes back the chunks an interrupted run journaled (zero chunks have the all-zero
    /// name). Returns false when one of them is gone from the target; the run then starts over.
    fn resume(&self, done: &[Done]) -> Result<bool>;
    /// Why this incremental must be a full sync instead (its parent cannot be used).
    fn full_reason(&self) -> Option<String> {
        None
    }
    /// Chunk indexes to read again although they did not change (the parent's copy is damaged).
    fn repairs(&self) -> Vec<u64> {
        Vec::new()
    }
    /// The version the changes are applied to.
    fn parent(&self) -> Option<String> {
        None
    }
    /// What the chunks build on (the parent version), for the journal's fingerprint.
    fn base(&self) -> String;
    /// Makes the run a version (the commit point) after everything is flushed; returns its id.
    fn commit(&self, info: &CommitInfo) -> Result<String>;
}

/// A chunk encoded for a chunk sink, not stored yet.
pub trait Prepared: Send {
    /// Stores it and records the chunk; returns the bytes stored.
    fn send(self: Box<Self>) -> Result<u64>;
}

/// A chunk made durable, as the journal keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    pub index: u64,
    /// Its content name (all zeros for a zero chunk), or a checksum where the plan has one.
    pub name: Digest,
    /// Bytes a chunk sink stored for it (0: the content was already there, or not a sink).
    pub stored: u64,
}

/// What a committed version records about its sync.
#[derive(Clone, Debug)]
pub struct CommitInfo {
    pub source: String,
    /// When the source's content was taken (RFC 3339).
    pub snapshot_time: String,
    pub cursor: Option<String>,
    pub full: bool,
    pub bytes_read: u64,
    pub chunks_changed: u64,
    pub chunks_zero: u64,
    pub millis: u64,
}

pub trait TargetWriter: Send {
    fn write_batch(&mut self, reqs: &[WriteReq<'_>]) -> Result<()>;
}
