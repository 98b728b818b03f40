//! Targets: where synced bytes go. Writes are positional; a target can zero a range without
//! storing data, and `flush` makes everything written so far durable.

mod file;
mod nbd;

pub use file::FileTarget;
pub use nbd::NbdTarget;

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
    /// Starts write-back of completed writes without waiting for it (a hint; errors surface
    /// at the next `flush`).
    fn start_writeback(&self) {}
    /// A writer for one engine thread, with up to `depth` writes in flight.
    fn writer(&self, depth: u32) -> Result<Box<dyn TargetWriter>>;
}

pub trait TargetWriter: Send {
    fn write_batch(&mut self, reqs: &[WriteReq<'_>]) -> Result<()>;
}
