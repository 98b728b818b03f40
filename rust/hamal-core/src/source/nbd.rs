//! An NBD export as a source. Allocation comes from `base:allocation` (zero extents are not
//! read); with a bitmap, the changed extents come from `qemu:dirty-bitmap:NAME`. A server
//! without structured replies has no block status: everything is read (zero chunks are still
//! found and not written as data), and a bitmap is refused.
//!
//! The first reader shares the connection the source opened. More readers get connections of
//! their own when the server advertises multi-conn; otherwise they start on the shared
//! connection (each batch pipelined on it) while a connection of their own is tried in the
//! background, and switch to it if the server takes it within [`EXTRA_TIMEOUT`] (a default
//! `qemu-nbd` serves one client and leaves the next waiting). Nobody waits for the probe.

use super::{Source, SourceReader};
use crate::extent::{Extent, ExtentMap};
use crate::io::ReadReq;
use crate::nbd::{Connection, NbdUri, STATE_ZERO};
use crate::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const ALLOCATION: &str = "base:allocation";
const DIRTY: u32 = 1;
/// A server that answers nothing for this long fails the sync instead of hanging it.
pub const NBD_TIMEOUT: Duration = Duration::from_secs(60);
/// Extents a block-status map holds at most (16 MiB of them).
const MAX_MAP_EXTENTS: usize = 1 << 20;
/// How long a further connection may take to be served before readers share the first one.
pub const EXTRA_TIMEOUT: Duration = Duration::from_secs(2);

pub struct NbdSource {
    uri: NbdUri,
    bitmap: Option<String>,
    control: Arc<Mutex<Connection>>,
    size: u64,
    /// The first reader has taken the shared connection.
    shared_taken: AtomicBool,
    /// The job's cancel: every connection's waits end soon after it is set.
    stop: OnceLock<Arc<AtomicBool>>,
}

fn bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

impl NbdSource {
    pub fn open(uri: &NbdUri, bitmap: Option<&str>) -> Result<NbdSource> {
        let mut contexts = vec![ALLOCATION.to_owned()];
        contexts.extend(bitmap.map(bitmap_context));
        let control = Connection::connect(uri, &contexts, NBD_TIMEOUT).map_err(|e| {
            Error::source_io(&uri.text, "cannot open NBD export", e.offset, e.error)
        })?;
        if bitmap.is_some() && !control.info().structured {
            return Err(Error::Plan(format!(
                "{}: the server lacks structured replies, which --bitmap needs (block status); a full copy works without it",
                uri.text
            )));
        }
        let size = control.info().size;
        Ok(NbdSource {
            uri: uri.clone(),
            bitmap: bitmap.map(str::to_owned),
            control: Arc::new(Mutex::new(control)),
            size,
            shared_taken: AtomicBool::new(false),
            stop: OnceLock::new(),
        })
    }

    /// Extents of a metadata context whose flags satisfy `keep`. However many extents the
    /// server reports, the map holds at most [`MAX_MAP_EXTENTS`]: past that its extents are
    /// widened to ever coarser blocks (reading more than changed is safe, less never is).
    fn map(&self, context: &str, keep: impl Fn(u32) -> bool) -> Result<ExtentMap> {
        let mut kept = ExtentMap::new();
        let mut grid = 1u64;
        let size = self.size;
        self.control
            .lock()
            .unwrap()
            .block_status(context, 0, size, |e| {
                if keep(e.flags) {
                    kept.push(Extent::new(e.offset, e.len));
                    while kept.extents().len() > MAX_MAP_EXTENTS {
                        grid = (grid * 2).max(4096);
                        kept = kept.align_to_grid(grid, size);
                    }
                }
            })
            .map_err(|e| {
                Error::source_io(&self.uri.text, "block status failed", e.offset, e.error)
            })?;
        if grid > 1 {
            tracing::warn!(export = %self.uri.text, context, grid, "the server reported too many extents to keep: whole blocks of {grid} bytes are read instead");
            kept = kept.align_to_grid(grid, size);
        }
        Ok(kept)
    }
}

impl Source for NbdSource {
    fn describe(&self) -> String {
        self.uri.text.clone()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn alignment(&self) -> u64 {
        u64::from(self.control.lock().unwrap().info().min_block)
    }

    fn allocated(&self) -> Result<ExtentMap> {
        if !self.control.lock().unwrap().info().has_context(ALLOCATION) {
            return Ok(ExtentMap::whole(self.size)); // no block status: read it all
        }
        self.map(ALLOCATION, |f| f & STATE_ZERO == 0)
    }

    fn changed(&self) -> Result<Option<ExtentMap>> {
        match &self.bitmap {
            Some(b) => self.map(&bitmap_context(b), |f| f & DIRTY != 0).map(Some),
            None => Ok(None),
        }
    }

    fn stop_on(&self, stop: &Arc<AtomicBool>) {
        if self.stop.set(stop.clone()).is_ok() {
            self.control.lock().unwrap().set_stop(stop.clone());
        }
    }

    /// An export says nothing about which snapshot it serves: a new one may appear at the same
    /// URI, so only the caller's `source_id` makes a journal trustworthy.
    fn identity(&self) -> Option<String> {
        None
    }

    fn reader(&self, depth: u32) -> Result<Box<dyn SourceReader>> {
        let _ = depth; // every request of a batch is in flight at once
        let uri = self.uri.text.clone();
        if !self.shared_taken.swap(true, Relaxed) {
            return Ok(Box::new(NbdReader::Shared(self.control.clone(), uri, None)));
        }
        let stop = self.stop.get().cloned();
        if self.control.lock().unwrap().info().can_multi_conn() {
            let mut conn = Connection::connect(&self.uri, &[], NBD_TIMEOUT)
                .map_err(|e| Error::source_io(&uri, "cannot open NBD export", e.offset, e.error))?;
            if let Some(stop) = stop {
                conn.set_stop(stop);
            }
            return Ok(Box::new(NbdReader::Own(conn, uri)));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let target = self.uri.clone();
        std::thread::spawn(
            move || match Connection::connect(&target, &[], EXTRA_TIMEOUT) {
                Ok(mut c) => {
                    c.set_timeout(NBD_TIMEOUT);
                    if let Some(stop) = &stop {
                        c.set_stop(stop.clone());
                    }
                    drop(tx.send(c))
                }
                Err(e) => {
                    tracing::debug!(export = %target.text, "readers share one connection: {}", e.error)
                }
            },
        );
        Ok(Box::new(NbdReader::Shared(
            self.control.clone(),
            uri,
            Some(rx),
        )))
    }
}

/// A reader with a connection of its own, or one sharing the source's connection (and maybe
/// waiting for its own).
enum NbdReader {
    Own(Connection, String),
    Shared(Arc<Mutex<Connection>>, String, Option<Receiver<Connection>>),
}

impl SourceReader for NbdReader {
    fn read_batch(&mut self, reqs: &mut [ReadReq<'_>]) -> Result<()> {
        if let NbdReader::Shared(_, uri, Some(rx)) = self {
            if let Ok(conn) = rx.try_recv() {
                *self = NbdReader::Own(conn, std::mem::take(uri));
            }
        }
        let (r, uri) = match self {
            NbdReader::Own(c, uri) => (c.read_batch(reqs), uri),
            NbdReader::Shared(c, uri, _) => (c.lock().unwrap().read_batch(reqs), uri),
        };
        r.map_err(|e| Error::source_io(uri.as_str(), "NBD read failed", e.offset, e.error))
    }

    fn backend(&self) -> &'static str {
        "nbd"
    }
}
