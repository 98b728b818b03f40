//! The local copy: a file or block device synced to a file or block device on this host.
//!
//! The reader/writer pipeline hands each 4 MiB chunk from a reader thread to a writer thread,
//! so every byte crosses from one core's cache to another's and leaves both before it is
//! written. Here each thread reads a piece small enough to stay in its core's cache and writes
//! it at once, as `nbdcopy` does. There are `writers` such threads (1 by default): writes to one
//! target take its inode lock in turn, and the kernel's read-ahead keeps the source busy.
//! Chunks, the journal and the durability order are the pipeline's.

use super::disk::{batch_len, ChunkDone, DiskRun, Durability};
use super::journal::DoneSet;
use super::pool::{BufferPool, ChunkBuf};
use super::throttle::release_cpu;
use crate::checksum::{is_zero, ChunkHasher, Digest};
use crate::extent::{ChunkIter, ChunkWork, Extent};
use crate::io::{ReadReq, WriteReq};
use crate::source::{Source, SourceReader};
use crate::target::{Target, TargetWriter};
use crate::Result;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;

/// Bytes read then written in one step: the read leaves them in the L2 cache for the write.
const PIECE: usize = 256 << 10;

/// One thread's source reader and target writer.
struct Copier<'a> {
    reader: Box<dyn SourceReader>,
    writer: Box<dyn TargetWriter>,
    target: &'a dyn Target,
    hasher: Option<ChunkHasher>,
}

impl DiskRun<'_> {
    /// One copy thread: takes chunks until the work is done, copies each, and queues it for
    /// the journal like a writer does.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn copy_loop(
        &self,
        source: &dyn Source,
        target: &dyn Target,
        hasher: Option<ChunkHasher>,
        work: &Mutex<ChunkIter<'_>>,
        pool: &BufferPool,
        abort: &AtomicBool,
        done: &DoneSet,
        durable: &Durability,
        backend: &Mutex<&'static str>,
    ) -> Result<()> {
        let t = self.tuning;
        let mut copier = Copier {
            reader: source.reader(1)?,
            writer: target.writer(1)?,
            target,
            hasher,
        };
        *backend.lock().unwrap() = copier.reader.backend();
        let stop = || abort.load(Relaxed) || self.cancel.load(Relaxed);
        loop {
            if stop() {
                return Ok(());
            }
            let batch = self.next_batch(work, done, t.queue_depth as usize);
            if batch.is_empty() || !self.pacer.pace(batch_len(&batch), &stop) {
                return Ok(());
            }
            for work in batch {
                let Some(mut bufs) = pool.get_many(1, abort) else {
                    return Ok(());
                };
                let mut buf = bufs.pop().expect("one buffer asked for");
                let copied = copier.chunk(&work, &mut buf);
                pool.put(buf);
                let (zero, digest) = copied?;
                release_cpu(t.release_cpu_ms_per_mb, work.len(), &stop);
                let chunk = ChunkDone {
                    work,
                    zero,
                    digest,
                    stored: 0,
                };
                self.finish_chunks([chunk], durable, false);
                if stop() {
                    return Ok(());
                }
            }
        }
    }
}

impl Copier<'_> {
    /// Copies one chunk piece by piece; returns whether it was all zeros, and its checksum.
    /// Zero pieces are not written: a fresh target already reads zeros there, an old one has
    /// them zeroed.
    fn chunk(&mut self, work: &ChunkWork, buf: &mut ChunkBuf) -> Result<(bool, Digest)> {
        // A checksum needs the whole chunk; without one every piece reuses the buffer's start.
        let keep = self.hasher.is_some();
        let mut zeros: Vec<Extent> = Vec::new();
        let mut pos = 0usize;
        for r in &work.ranges {
            let mut offset = r.offset;
            while offset < r.end() {
                let n = (r.end() - offset).min(PIECE as u64) as usize;
                let piece = &mut buf[pos..pos + n];
                self.reader
                    .read_batch(&mut [ReadReq { offset, buf: piece }])?;
                if is_zero(piece) {
                    match zeros.last_mut() {
                        Some(z) if z.end() == offset => z.len += n as u64,
                        _ => zeros.push(Extent::new(offset, n as u64)),
                    }
                } else {
                    self.writer
                        .write_batch(&[WriteReq { offset, buf: piece }])?;
                }
                if keep {
                    pos += n;
                }
                offset += n as u64;
            }
        }
        if !self.target.is_fresh() {
            for z in &zeros {
                self.target.zero_range(z.offset, z.len)?;
            }
        }
        let zero = zeros.iter().map(|z| z.len).sum::<u64>() == work.len();
        let digest = self
            .hasher
            .map_or([0; 32], |h| h.digest(&buf[..work.len() as usize]));
        Ok((zero, digest))
    }
}
