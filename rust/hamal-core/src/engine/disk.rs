//! Sync of one disk: readers fill chunk buffers from the source, writers put them on the
//! target (a local file-to-file sync copies in `writers` threads that do both, see `copy.rs`), and
//! the durability step flushes the target then journals the finished chunks.
//!
//! Order of one chunk: read -> zero check (+ checksum) -> write or zero the range -> (later)
//! target flush -> journal append. A chunk is only journaled after a flush that follows its
//! write, so a crash at any point loses at most work, never correctness. The journal is removed
//! (the commit) after the last flush.

use super::changed::validate_changed;
use super::journal::{DoneSet, Journal};
use super::plan::{DiskPlan, Tuning};
use super::pool::{BufferPool, ChunkBuf};
use super::progress::{DiskProgress, DiskState};
use super::throttle::{release_cpu, Pacer};
use crate::checksum::{is_zero, ChunkHasher, ContentDigest, Digest};
use crate::extent::{ChunkIter, ChunkWork, Extent, ExtentMap};
use crate::io::{ReadReq, WriteReq};
use crate::source::{FcSource, FileSource, NbdSource, RbdSource, Source, VddkSource};
use crate::store::{StoreSource, StoreSync, StoreTarget};
use crate::target::{CommitInfo, Done, FileTarget, NbdTarget, Target};
use crate::uri::DiskUri;
use crate::{Error, Result};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What one finished disk sync reports.
#[derive(Clone, Debug, Serialize)]
pub struct DiskSummary {
    pub disk_id: String,
    pub source: String,
    pub target: String,
    pub size: u64,
    pub mode: &'static str,
    pub bytes_total: u64,
    pub bytes_written: u64,
    pub bytes_zero: u64,
    pub bytes_resumed: u64,
    pub holes_zeroed: u64,
    pub chunks: u64,
    pub seconds: f64,
    pub io_backend: &'static str,
    pub checksum: Option<&'static str>,
    /// Order-independent digest over all chunks of the plan (see `checksum::ContentDigest`).
    pub content_digest: Option<String>,
    /// The version committed, for a chunk-store target.
    pub version: Option<String>,
    /// The version an incremental into a chunk store was applied to.
    pub parent: Option<String>,
    /// Why a sync asked to be incremental ran in full.
    pub full_reason: Option<String>,
}

/// A chunk read and checked, on its way to a writer.
struct Filled {
    buf: ChunkBuf,
    chunk: ChunkDone,
}

/// What the journal and the progress learn of one chunk once it is written.
pub(super) struct ChunkDone {
    pub work: ChunkWork,
    pub zero: bool,
    pub digest: Digest,
    /// Bytes a chunk sink stored for it.
    pub stored: u64,
}

/// Chunks written but not yet flushed, and the journal they go to after the flush. Writers
/// only push to `pending`; the flusher thread (and the final flush) do the slow part without
/// holding that lock.
pub(super) struct Durability<'t> {
    target: &'t dyn Target,
    warn_after: Option<Duration>,
    journal: Mutex<Journal>,
    pending: Mutex<Vec<Done>>,
    digest: Mutex<ContentDigest>,
}

impl Durability<'_> {
    /// Flushes the target, then journals every chunk written before the flush began.
    fn flush(&self) -> Result<()> {
        let batch = std::mem::take(&mut *self.pending.lock().unwrap());
        let t0 = Instant::now();
        self.target.flush()?;
        if let Some(limit) = self.warn_after.filter(|l| t0.elapsed() > *l) {
            let took = t0.elapsed().as_secs_f64();
            tracing::warn!(target_path = %self.target.describe(), "flush took {took:.1} s, over fsync_timeout {} s", limit.as_secs());
        }
        self.journal.lock().unwrap().append(&batch)
    }
}

/// One read per range of `chunk`, packed back to back at the start of `buf`.
pub(crate) fn read_requests<'b>(chunk: &ChunkWork, buf: &'b mut [u8]) -> Vec<ReadReq<'b>> {
    let mut rest = buf;
    let mut reqs = Vec::with_capacity(chunk.ranges.len());
    for r in &chunk.ranges {
        let (head, tail) = rest.split_at_mut(r.len as usize);
        reqs.push(ReadReq {
            offset: r.offset,
            buf: head,
        });
        rest = tail;
    }
    reqs
}

pub(crate) const SOURCE_ONLY: &str =
    "RBD images, VDDK disks and FusionCompute volumes are sources only; sync them to a file, device, NBD export or store";

pub(crate) fn open_source(
    uri: &DiskUri,
    t: &Tuning,
    bitmap: Option<&str>,
    disk_id: &str,
    version: Option<&str>,
    full: bool,
) -> Result<Box<dyn Source>> {
    match uri {
        DiskUri::File(p) => Ok(Box::new(FileSource::open(p, t.io_mode)?)),
        DiskUri::Nbd(u) => Ok(Box::new(NbdSource::open(u, bitmap)?)),
        DiskUri::Store(u) => Ok(Box::new(StoreSource::open(u, &t.store, disk_id, version)?)),
        DiskUri::Rbd(u) => Ok(Box::new(RbdSource::open(u)?)),
        DiskUri::Vddk(u) => Ok(Box::new(VddkSource::open(u, &t.vddk, full)?)),
        DiskUri::Fc(u) => Ok(Box::new(FcSource::open(u, &t.fc, &t.lock_dir)?)),
    }
}

fn open_target(plan: &DiskPlan, size: u64, t: &Tuning, full: bool) -> Result<Box<dyn Target>> {
    let purpose = format!("sync of disk {}", plan.disk_id);
    match &plan.target {
        DiskUri::File(p) => Ok(Box::new(FileTarget::open(p, size, t.io_mode)?)),
        DiskUri::Nbd(u) => Ok(Box::new(NbdTarget::open(u, size, &t.lock_dir, &purpose)?)),
        DiskUri::Store(u) => Ok(Box::new(StoreTarget::open(
            u,
            &t.store,
            &StoreSync {
                disk: &plan.disk_id,
                size,
                chunk_size: t.chunk_size,
                full,
                parent: plan.parent.as_deref(),
                full_on_mismatch: plan.full_on_mismatch,
            },
        )?)),
        DiskUri::Rbd(_) | DiskUri::Vddk(_) | DiskUri::Fc(_) => {
            Err(Error::Plan(format!("{}: {SOURCE_ONLY}", plan.target)))
        }
    }
}

/// Fingerprint of everything a journal's entries depend on.
fn fingerprint(
    plan: &DiskPlan,
    source: &dyn Source,
    target: &dyn Target,
    t: &Tuning,
    hasher: Option<ChunkHasher>,
    data: &ExtentMap,
) -> Digest {
    let identity = match (&plan.source_id, source.identity()) {
        (Some(id), own) => format!("{id}\0{}", own.unwrap_or_default()),
        (None, Some(own)) => own,
        // Nothing identifies the content: a journal of an earlier run must never match.
        (None, None) => format!(
            "unidentified:{}:{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ),
    };
    let mut h = blake3::Hasher::new();
    let base = target.as_chunk_sink().map(|s| s.base()).unwrap_or_default();
    for part in [
        identity,
        target.describe(),
        base,
        hasher.map_or("none", |h| h.name()).to_owned(),
    ] {
        h.update(part.as_bytes()).update(&[0]);
    }
    h.update(&t.chunk_size.to_le_bytes());
    for e in data.extents() {
        h.update(&e.offset.to_le_bytes())
            .update(&e.len.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

pub(crate) struct DiskRun<'a> {
    pub plan: &'a DiskPlan,
    pub tuning: &'a Tuning,
    pub progress: &'a DiskProgress,
    pub cancel: &'a Arc<AtomicBool>,
    pub pacer: &'a Pacer,
    pub memory_budget: u64,
}

impl DiskRun<'_> {
    pub fn run(&self) -> Result<DiskSummary> {
        let (t, plan) = (self.tuning, self.plan);
        let started = Instant::now();
        let source = open_source(
            &plan.source,
            t,
            plan.bitmap.as_deref(),
            &plan.disk_id,
            plan.version.as_deref(),
            plan.changed.is_none(),
        )?;
        source.stop_on(self.cancel);
        let size = source.size();
        let changed = match &plan.changed {
            Some(c) => Some(validate_changed(&c.pairs, size, &c.origin)?),
            None => source.changed()?,
        };
        let allocated = source.allocated()?;
        let target = open_target(plan, size, t, changed.is_none())?;
        let out = self.run_on(&*source, &*target, changed, allocated, started);
        if out.is_err() && self.progress.snapshot().bytes_done == 0 {
            // A run that failed before writing anything leaves no journal, and no target file
            // it created.
            Journal::remove_if_empty(&plan.journal_path()?);
            if target.is_fresh() {
                target.abandon();
            }
        }
        out
    }

    fn run_on(
        &self,
        source: &dyn Source,
        target: &dyn Target,
        changed: Option<ExtentMap>,
        allocated: ExtentMap,
        started: Instant,
    ) -> Result<DiskSummary> {
        let (t, plan) = (self.tuning, self.plan);
        let size = source.size();
        let sink = target.as_chunk_sink();
        let full_reason = sink.and_then(|s| s.full_reason());
        let changed = match (changed, sink) {
            (_, Some(_)) if full_reason.is_some() => None,
            (Some(c), Some(s)) => {
                let redo = s.repairs().into_iter().map(|i| {
                    Extent::new(i * t.chunk_size, t.chunk_size.min(size - i * t.chunk_size))
                });
                Some(c.union(&ExtentMap::from_extents(redo)))
            }
            (c, _) => c,
        };
        let hasher = sink
            .map(|s| s.hasher())
            .or(t.checksum.map(ChunkHasher::Plain));
        // Changes are handled in whole blocks of the alignment (a chunk for a chunk store).
        let align = source.alignment().max(target.alignment());
        let changed = changed.map(|c| {
            if align > 1 {
                c.align_to_grid(align, size)
            } else {
                c
            }
        });
        // Read only what holds data; what changed into zeros (or is a hole of a full sync onto an
        // old target) is zeroed on the target without reading.
        let (data, zeros) = match &changed {
            Some(ch) => (ch.intersect(&allocated), ch.subtract(&allocated)),
            None if target.is_fresh() => (allocated, ExtentMap::new()),
            None => (
                allocated.clone(),
                ExtentMap::whole(size).subtract(&allocated),
            ),
        };
        let full = changed.is_none();
        let data = if align > 1 {
            data.align_to_grid(align, size)
        } else {
            data
        };
        let zeros = zeros.subtract(&data);
        let journal_path = plan.journal_path()?;
        if plan.source_id.is_none() && source.identity().is_none() && journal_path.exists() {
            // Not damage: nothing says the export still serves the same snapshot.
            tracing::warn!(journal = %journal_path.display(), "not resuming: {} cannot tell which snapshot it serves; give the snapshot's name as the source id (--source-id) to resume from a journal", source.describe());
            let _ = std::fs::remove_file(&journal_path);
        }
        let mut journal = Journal::open(
            &journal_path,
            &fingerprint(plan, source, target, t, hasher, &data),
            size.div_ceil(t.chunk_size),
            sink.is_some(),
        )?;
        if let Some(sink) = sink {
            if !sink.resume(&journal.resumed)? {
                journal.restart()?;
            }
        }
        let p = self.progress;
        p.bytes_total.store(data.total_len(), Relaxed);
        p.chunks_total
            .store(data.chunk_count(t.chunk_size), Relaxed);
        if journal.resumed_chunks > 0 {
            tracing::info!(disk = %plan.disk_id, chunks = journal.resumed_chunks, "resuming from journal");
        }
        for hole in zeros.extents() {
            if self.cancel.load(Relaxed) {
                return Err(Error::Cancelled);
            }
            target.zero_range(hole.offset, hole.len)?;
        }
        let resumed_digest = journal.resumed_digest;
        let snapshot_time = plan.snapshot_time.clone().unwrap_or_else(|| {
            chrono::DateTime::from_timestamp_millis(journal.started_ms as i64)
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        });
        let durable = Durability {
            target,
            warn_after: t.fsync_warn_after,
            journal: Mutex::new(journal),
            pending: Mutex::new(Vec::new()),
            digest: Mutex::new(ContentDigest::default()),
        };
        let backend = self.pipeline(source, target, hasher, &data, &durable)?;
        let mut digest = durable.digest.into_inner().unwrap();
        digest.merge(&resumed_digest);
        let snap = p.snapshot();
        let version = match sink {
            Some(sink) => Some(sink.commit(&CommitInfo {
                source: source.describe(),
                snapshot_time,
                cursor: plan.source_id.clone().or(plan.bitmap.clone()),
                full,
                bytes_read: snap.bytes_done + snap.bytes_resumed,
                chunks_changed: snap.chunks_total + zeros.chunk_count(t.chunk_size),
                chunks_zero: zeros.chunk_count(t.chunk_size),
                millis: started.elapsed().as_millis() as u64,
            })?),
            None => None,
        };
        durable.journal.into_inner().unwrap().remove()?;
        Ok(DiskSummary {
            disk_id: plan.disk_id.clone(),
            source: source.describe(),
            target: target.describe(),
            size,
            mode: if full { "full" } else { "incremental" },
            bytes_total: snap.bytes_total,
            bytes_written: snap.bytes_done - snap.bytes_zero,
            bytes_zero: snap.bytes_zero,
            bytes_resumed: snap.bytes_resumed,
            holes_zeroed: zeros.total_len(),
            chunks: snap.chunks_total,
            seconds: started.elapsed().as_secs_f64(),
            io_backend: backend,
            checksum: hasher.map(|h| h.name()),
            content_digest: hasher.map(|_| digest.hex()),
            version,
            parent: sink.and_then(|s| s.parent()),
            full_reason,
        })
    }

    /// Runs readers and writers until every chunk is done, then flushes. Returns the name of
    /// the I/O back end used.
    fn pipeline(
        &self,
        source: &dyn Source,
        target: &dyn Target,
        hasher: Option<ChunkHasher>,
        data: &ExtentMap,
        durable: &Durability,
    ) -> Result<&'static str> {
        let t = self.tuning;
        // Local file to local file: each copy thread reads and writes (copy.rs). Writes to one
        // file or device take its inode lock in turn, so threads beyond `writers` would spin on
        // it: one thread by default, as fast as two (the kernel reads ahead) at less CPU. A
        // target written with O_DIRECT takes no lock but makes each write wait for the device:
        // two threads at least, one reading while the other waits.
        let local = source.local_io() && target.local_io();
        // Threads that read: the reader threads, or the copy threads of a local copy.
        let reading = match local {
            true if target.joins_writes() => t.writers.max(2),
            true => t.writers,
            false => t.readers,
        };
        // Everything chunk-sized in flight shares the disk's memory budget: the engine's
        // buffers, a chunk sink's objects (one per upload, so at most half the budget) and what
        // the source's reads hold of their own. A job of 8 disks into a store took 516 MiB.
        let budget = (self.memory_budget / t.chunk_size).max(2);
        let sink = target.as_chunk_sink();
        let writers = match sink {
            _ if local => 0,
            Some(s) => s.writers().max(t.writers).min((budget / 2) as u32),
            None => t.writers,
        };
        let objects = sink.map_or(0, |_| u64::from(writers));
        // Buffers for every request in flight. A chunk sink's writers hold one only while they
        // encode a chunk, not while it uploads: fewer buffers, reused while still warm.
        let in_flight = match (local, sink) {
            (true, _) => reading,
            (false, Some(_)) => reading * t.queue_depth,
            (false, None) => reading * t.queue_depth + writers * t.queue_depth,
        };
        let buffers = ((budget - objects) / (1 + source.buffers_per_read()))
            .clamp(2, u64::from(in_flight + 2));
        let (size, count) = (t.chunk_size as usize, buffers as usize);
        let pool = match source.shared_buffers(size * count)? {
            Some(mem) => BufferPool::shared(size, count, mem),
            None => BufferPool::new(size, count),
        };
        let done = durable.journal.lock().unwrap().done_set();
        let work = Mutex::new(data.chunks(t.chunk_size));
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        let abort = AtomicBool::new(false);
        let fail = |e: Error| {
            failure.lock().unwrap().get_or_insert(e);
            abort.store(true, Relaxed);
        };
        let backend = Mutex::new("pread");
        let (tx, rx) = sync_channel::<Filled>(buffers as usize);
        let rx = Mutex::new(rx);
        let live_writers = &LiveCount::new(if local { reading } else { writers } as usize);
        std::thread::scope(|s| {
            for _ in 0..reading {
                let tx = tx.clone();
                let (work, pool, abort, done, backend) = (&work, &pool, &abort, &done, &backend);
                s.spawn(move || {
                    let r = match local {
                        true => self.copy_loop(
                            source, target, hasher, work, pool, abort, done, durable, backend,
                        ),
                        false => {
                            self.reader_loop(source, hasher, work, pool, abort, done, tx, backend)
                        }
                    };
                    if let Err(e) = r {
                        fail(e);
                    }
                    if local {
                        live_writers.finished();
                    }
                });
            }
            drop(tx);
            for _ in 0..writers {
                let (rx, pool, abort) = (&rx, &pool, &abort);
                s.spawn(move || {
                    if let Err(e) = self.writer_loop(target, rx, pool, abort, durable) {
                        fail(e);
                        // Keep draining so readers blocked on the channel can finish.
                        while let Ok(f) = rx.lock().unwrap().recv() {
                            pool.put(f.buf);
                        }
                    }
                    live_writers.finished();
                });
            }
            s.spawn(move || {
                if let Err(e) = self.flusher_loop(durable, live_writers) {
                    fail(e);
                }
            });
        });
        // Make everything written durable and journaled, also after an error or a cancel,
        // so that a rerun resumes from here.
        let flushed = durable.flush();
        if let Some(e) = failure.into_inner().unwrap() {
            return Err(e);
        }
        flushed?;
        if self.cancel.load(Relaxed) {
            return Err(Error::Cancelled);
        }
        Ok(backend.into_inner().unwrap())
    }

    #[allow(clippy::too_many_arguments)]
    fn reader_loop(
        &self,
        source: &dyn Source,
        hasher: Option<ChunkHasher>,
        work: &Mutex<ChunkIter<'_>>,
        pool: &BufferPool,
        abort: &AtomicBool,
        done: &DoneSet,
        tx: SyncSender<Filled>,
        backend: &Mutex<&'static str>,
    ) -> Result<()> {
        let t = self.tuning;
        let mut reader = source.reader(t.queue_depth)?;
        *backend.lock().unwrap() = reader.backend();
        let stop = || abort.load(Relaxed) || self.cancel.load(Relaxed);
        // A batch never needs more buffers than the pool has (a small memory budget).
        let depth = (t.queue_depth as usize).min(pool.capacity());
        loop {
            if stop() {
                return Ok(());
            }
            let batch = self.next_batch(work, done, depth);
            if batch.is_empty() || !self.pacer.pace(batch_len(&batch), &stop) {
                return Ok(());
            }
            let Some(mut bufs) = pool.get_many(batch.len(), abort) else {
                return Ok(());
            };
            let mut reqs = Vec::new();
            for (c, buf) in batch.iter().zip(bufs.iter_mut()) {
                reqs.extend(read_requests(c, buf));
            }
            reader.read_batch(&mut reqs)?;
            drop(reqs);
            for (work, buf) in batch.into_iter().zip(bufs) {
                let len = work.len() as usize;
                let zero = is_zero(&buf[..len]);
                let digest = hasher.map_or([0; 32], |h| h.digest(&buf[..len]));
                release_cpu(t.release_cpu_ms_per_mb, len as u64, &stop);
                let chunk = ChunkDone {
                    work,
                    zero,
                    digest,
                    stored: 0,
                };
                if tx.send(Filled { buf, chunk }).is_err() {
                    return Ok(());
                }
            }
        }
    }

    fn writer_loop(
        &self,
        target: &dyn Target,
        rx: &Mutex<Receiver<Filled>>,
        pool: &BufferPool,
        abort: &AtomicBool,
        durable: &Durability,
    ) -> Result<()> {
        let t = self.tuning;
        let sink = target.as_chunk_sink();
        let mut writer = match sink {
            Some(_) => None,
            None => Some(target.writer(t.queue_depth)?),
        };
        loop {
            let batch: Vec<Filled> = {
                let rx = rx.lock().unwrap();
                let Ok(first) = rx.recv() else { return Ok(()) };
                let mut b = vec![first];
                while b.len() < writer_batch(target, t) as usize {
                    match rx.try_recv() {
                        Ok(f) => b.push(f),
                        Err(_) => break,
                    }
                }
                b
            };
            if abort.load(Relaxed) {
                batch.into_iter().for_each(|f| pool.put(f.buf));
                continue;
            }
            let Some(writer) = writer.as_mut() else {
                let sink = sink.expect("a target without a writer is a chunk sink");
                // Whole chunks by name; zero chunks are recorded, not stored, and journaled
                // with the all-zero name.
                for Filled { buf, chunk: mut c } in batch {
                    let len = c.work.len();
                    let prepared = match c.zero {
                        true => target.zero_range(c.work.first_offset(), len).map(|_| None),
                        false => sink.prepare(c.work.index, &buf[..len as usize], &c.digest),
                    };
                    // Encoded: the buffer is free for the next read while the chunk uploads.
                    pool.put(buf);
                    if let Some(p) = prepared? {
                        c.stored = p.send()?;
                    }
                    self.finish_chunks([c], durable, true);
                }
                continue;
            };
            let mut reqs = Vec::new();
            for f in batch.iter().filter(|f| !f.chunk.zero) {
                let mut pos = 0usize;
                for r in &f.chunk.work.ranges {
                    reqs.push(WriteReq {
                        offset: r.offset,
                        buf: &f.buf[pos..pos + r.len as usize],
                    });
                    pos += r.len as usize;
                }
            }
            writer.write_batch(&reqs)?;
            drop(reqs);
            for f in batch.iter().filter(|f| f.chunk.zero) {
                for r in &f.chunk.work.ranges {
                    target.zero_range(r.offset, r.len)?;
                }
            }
            self.finish_chunks(recycle(batch, pool), durable, false);
        }
    }

    /// The next chunks to read, up to `depth`; chunks a journal already holds are counted as
    /// resumed and skipped. Empty when the work is done.
    pub(super) fn next_batch(
        &self,
        work: &Mutex<ChunkIter<'_>>,
        done: &DoneSet,
        depth: usize,
    ) -> Vec<ChunkWork> {
        let p = self.progress;
        let mut batch = Vec::with_capacity(depth);
        let mut it = work.lock().unwrap();
        while batch.len() < depth {
            let Some(c) = it.next() else { break };
            if done.contains(c.index) {
                p.bytes_resumed.fetch_add(c.len(), Relaxed);
                p.chunks_done.fetch_add(1, Relaxed);
            } else {
                batch.push(c);
            }
        }
        batch
    }

    /// Counts written chunks and queues them for the journal.
    pub(super) fn finish_chunks(
        &self,
        chunks: impl IntoIterator<Item = ChunkDone>,
        durable: &Durability,
        zero_names: bool,
    ) {
        let p = self.progress;
        let mut pending = durable.pending.lock().unwrap();
        let mut digest = durable.digest.lock().unwrap();
        for f in chunks {
            let len = f.work.len();
            p.bytes_done.fetch_add(len, Relaxed);
            if f.zero {
                p.bytes_zero.fetch_add(len, Relaxed);
            }
            p.chunks_done.fetch_add(1, Relaxed);
            let name = if f.zero && zero_names {
                [0; 32]
            } else {
                f.digest
            };
            digest.add(f.work.index, &name);
            pending.push(Done {
                index: f.work.index,
                name,
                stored: f.stored,
            });
        }
    }

    /// While writers run: flushes + journals every `fsync_period`. Writers never wait for it;
    /// it ends as soon as the last writer does (the final flush follows at once).
    fn flusher_loop(&self, durable: &Durability, live_writers: &LiveCount) -> Result<()> {
        while !live_writers.wait_none(self.tuning.fsync_period) {
            durable.flush()?;
        }
        Ok(())
    }
}

/// Threads still running, for a thread that waits until none is.
struct LiveCount {
    live: Mutex<usize>,
    changed: Condvar,
}

impl LiveCount {
    fn new(n: usize) -> LiveCount {
        LiveCount {
            live: Mutex::new(n),
            changed: Condvar::new(),
        }
    }

    fn finished(&self) {
        *self.live.lock().unwrap() -= 1;
        self.changed.notify_all();
    }

    /// Waits up to `timeout` for every thread to finish; true when none is left.
    fn wait_none(&self, timeout: Duration) -> bool {
        let live = self.live.lock().unwrap();
        let (live, _) = self
            .changed
            .wait_timeout_while(live, timeout, |n| *n > 0)
            .unwrap();
        *live == 0
    }
}

/// Gives the buffers of `batch` back to the pool, keeping what the journal needs.
fn recycle(batch: Vec<Filled>, pool: &BufferPool) -> impl Iterator<Item = ChunkDone> + '_ {
    batch.into_iter().map(|f| {
        pool.put(f.buf);
        f.chunk
    })
}

pub(super) fn batch_len(batch: &[ChunkWork]) -> u64 {
    batch.iter().map(|c| c.len()).sum()
}

/// Chunks one writer takes at a time: a queue depth of positional writes, or one chunk for a
/// chunk sink (each of its writers uploads one chunk at a time; it runs more writers instead).
fn writer_batch(target: &dyn Target, t: &Tuning) -> u32 {
    if target.as_chunk_sink().is_some() {
        1
    } else {
        t.queue_depth
    }
}

/// Runs one disk, keeping its state current.
pub(crate) fn run_disk(run: DiskRun<'_>) -> Result<DiskSummary> {
    run.progress.set_state(DiskState::Running);
    let out = run.run();
    run.progress.set_state(match &out {
        Ok(_) => DiskState::Done,
        Err(Error::Cancelled) => DiskState::Cancelled,
        Err(_) => DiskState::Failed,
    });
    match &out {
        Ok(s) => {
            tracing::info!(disk = %s.disk_id, bytes = s.bytes_written, zero = s.bytes_zero, resumed = s.bytes_resumed, seconds = s.seconds, "disk synced")
        }
        // The caller reports the error itself (the CLI prints it once); this is the trace.
        Err(e) => tracing::info!(disk = %run.plan.disk_id, "disk sync stopped: {e}"),
    }
    out
}
