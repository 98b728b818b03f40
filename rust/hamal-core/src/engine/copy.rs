//! The local copy: a file or block device synced to a file or block device on this host.
//!
//! The reader/writer pipeline hands each 4 MiB chunk from a reader thread to a writer thread,
//! so every byte crosses from one core's cache to another's and leaves both before it is
//! written. Here each thread reads a piece small enough to stay in its core's cache and writes
//! it at once, as `nbdcopy` does. There are `writers` such threads (1 by default): writes to one
//! target take its inode lock in turn, and the kernel's read-ahead keeps the source busy. A block
//! device written with `O_DIRECT` gets a chunk's contiguous data in one write, which waits for
//! the device, from two threads at least.
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
    /// them zeroed. A target that joins writes gets each run of data pieces in one write.
    fn chunk(&mut self, work: &ChunkWork, buf: &mut ChunkBuf) -> Result<(bool, Digest)> {
        let join = self.target.joins_writes();
        // A checksum or a joined write needs the whole chunk; otherwise every piece reuses the
        // buffer's start.
        let keep = self.hasher.is_some() || join;
        let mut zeros: Vec<Extent> = Vec::new();
        let mut pos = 0usize;
        // Data read and not yet written (joined writes): its offset and its start in `buf`.
        let mut run: Option<(u64, usize)> = None;
        for r in &work.ranges {
            let mut offset = r.offset;
            while offset < r.end() {
                let n = (r.end() - offset).min(PIECE as u64) as usize;
                let piece = &mut buf[pos..pos + n];
                self.reader
                    .read_batch(&mut [ReadReq { offset, buf: piece }])?;
                if is_zero(piece) {
                    self.write_run(&mut run, &buf[..pos])?;
                    match zeros.last_mut() {
                        Some(z) if z.end() == offset => z.len += n as u64,
                        _ => zeros.push(Extent::new(offset, n as u64)),
                    }
                } else if join {
                    run.get_or_insert((offset, pos));
                } else {
                    self.writer
                        .write_batch(&[WriteReq { offset, buf: piece }])?;
                }
                if keep {
                    pos += n;
                }
                offset += n as u64;
            }
            self.write_run(&mut run, &buf[..pos])?;
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

    /// Writes the pending run, which ends where `read` (the chunk read so far) ends.
    fn write_run(&mut self, run: &mut Option<(u64, usize)>, read: &[u8]) -> Result<()> {
        match run.take() {
            Some((offset, start)) => self.writer.write_batch(&[WriteReq {
                offset,
                buf: &read[start..],
            }]),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    const MIB: usize = 1 << 20;

    /// A disk in memory: data in [0, 1 MiB) and [1.5, 3 MiB), zeros elsewhere.
    fn disk() -> Vec<u8> {
        let mut d = vec![0u8; 4 * MIB];
        for (i, b) in d.iter_mut().enumerate() {
            if i < MIB || (3 * MIB / 2..3 * MIB).contains(&i) {
                *b = (i % 251) as u8 + 1;
            }
        }
        d
    }

    struct MemReader(Vec<u8>);
    impl SourceReader for MemReader {
        fn read_batch(&mut self, reqs: &mut [ReadReq<'_>]) -> Result<()> {
            for r in reqs {
                let at = r.offset as usize;
                r.buf.copy_from_slice(&self.0[at..at + r.buf.len()]);
            }
            Ok(())
        }
        fn backend(&self) -> &'static str {
            "memory"
        }
    }

    /// Every write's offset and bytes.
    type Writes = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

    /// Records every write; joins writes when `join` says so.
    struct Recorder {
        join: bool,
        writes: Writes,
    }
    impl Target for Recorder {
        fn describe(&self) -> String {
            "recorder".into()
        }
        fn is_fresh(&self) -> bool {
            true
        }
        fn zero_range(&self, _: u64, _: u64) -> Result<()> {
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn joins_writes(&self) -> bool {
            self.join
        }
        fn writer(&self, _: u32) -> Result<Box<dyn TargetWriter>> {
            Ok(Box::new(RecordWriter(Arc::clone(&self.writes))))
        }
    }
    struct RecordWriter(Writes);
    impl TargetWriter for RecordWriter {
        fn write_batch(&mut self, reqs: &[WriteReq<'_>]) -> Result<()> {
            let mut w = self.0.lock().unwrap();
            w.extend(reqs.iter().map(|r| (r.offset, r.buf.to_vec())));
            Ok(())
        }
    }

    /// Copies chunk 0 (all 4 MiB, as two ranges) and returns the writes' (offset, length).
    fn copy(join: bool) -> Vec<(u64, usize)> {
        let src = disk();
        let target = Recorder {
            join,
            writes: Arc::default(),
        };
        let mut copier = Copier {
            reader: Box::new(MemReader(src.clone())),
            writer: target.writer(1).unwrap(),
            target: &target,
            hasher: None,
        };
        let work = ChunkWork {
            index: 0,
            ranges: vec![
                Extent::new(0, 2 * MIB as u64),
                Extent::new(2 * MIB as u64, 2 * MIB as u64),
            ],
        };
        let pool = BufferPool::new(4 * MIB, 1);
        let mut buf = pool
            .get_many(1, &AtomicBool::new(false))
            .unwrap()
            .pop()
            .unwrap();
        let (zero, _) = copier.chunk(&work, &mut buf).unwrap();
        assert!(!zero);
        let writes = target.writes.lock().unwrap();
        for (offset, data) in writes.iter() {
            let at = *offset as usize;
            assert_eq!(
                data[..],
                src[at..at + data.len()],
                "bytes written at {offset}"
            );
        }
        writes.iter().map(|(o, d)| (*o, d.len())).collect()
    }

    #[test]
    fn pieces_are_written_as_read_unless_the_target_joins_writes() {
        let pieces = copy(false);
        assert_eq!(
            pieces.len(),
            10,
            "each 256 KiB of data on its own: {pieces:?}"
        );
        assert!(pieces.iter().all(|&(_, n)| n == PIECE));
        // Joined: one write per run of data, split where a range ends and where zeros are.
        let joined = copy(true);
        let m = MIB as u64;
        assert_eq!(joined, [(0, MIB), (3 * m / 2, MIB / 2), (2 * m, MIB)]);
    }
}
