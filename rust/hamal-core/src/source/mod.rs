//! Sources: where disk bytes come from. A source knows its size and which extents hold data;
//! each engine reader thread gets its own [`SourceReader`].

pub(crate) mod fc;
pub(crate) mod file;
pub(crate) mod nbd;
pub(crate) mod rbd;
pub(crate) mod vddk;

pub use fc::FcSource;
pub use file::FileSource;
pub use nbd::NbdSource;
pub use rbd::RbdSource;
pub use vddk::VddkSource;

use crate::extent::ExtentMap;
use crate::io::shm::SharedMem;
use crate::io::ReadReq;
use crate::Result;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub trait Source: Send + Sync {
    /// Human-readable name used in messages (a path or URI).
    fn describe(&self) -> String;
    /// Disk size in bytes.
    fn size(&self) -> u64;
    /// Extents that may hold data; everything else reads as zero.
    fn allocated(&self) -> Result<ExtentMap>;
    /// Extents changed since the source's own change-tracking point (a dirty bitmap), or
    /// `None` when the source tracks no changes.
    fn changed(&self) -> Result<Option<ExtentMap>> {
        Ok(None)
    }
    /// Reads must start and end on multiples of this (NBD minimum block size).
    fn alignment(&self) -> u64 {
        1
    }
    /// A string that changes when the source content may have changed (journal fingerprint);
    /// `None` when the source cannot tell (then a journal is only trusted with a plan's
    /// `source_id`).
    fn identity(&self) -> Option<String>;
    /// A reader for one engine thread, with up to `depth` reads in flight.
    fn reader(&self, depth: u32) -> Result<Box<dyn SourceReader>>;
    /// A flag (the job's cancel) that, once set, ends the source's waits on a peer within a
    /// second, even while a server says nothing.
    fn stop_on(&self, _stop: &Arc<AtomicBool>) {}
    /// Reads are plain file I/O on this host (see `Target::local_io`).
    fn local_io(&self) -> bool {
        false
    }
    /// For a source that reads in another process: `bytes` of shared memory for the engine's
    /// chunk buffers, which its readers (made after this call) then fill in place. `None`:
    /// plain heap buffers.
    fn shared_buffers(&self, _bytes: usize) -> Result<Option<Arc<SharedMem>>> {
        Ok(None)
    }
    /// Chunk-sized buffers of its own a read holds besides the engine's (a chunk store's
    /// object): they count against the disk's memory budget.
    fn buffers_per_read(&self) -> u64 {
        0
    }
}

pub trait SourceReader: Send {
    /// Fills every request's buffer; errors name the source and the failing offset.
    fn read_batch(&mut self, reqs: &mut [ReadReq<'_>]) -> Result<()>;
    /// Name of the I/O back end in use ("io_uring", "pread", ...).
    fn backend(&self) -> &'static str;
}
