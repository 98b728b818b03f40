//! An NBD export as a source. Allocation comes from `base:allocation` (zero extents are not
//! read); with a bitmap, the changed extents come from `qemu:dirty-bitmap:NAME`.

use super::{Source, SourceReader};
use crate::extent::{Extent, ExtentMap};
use crate::io::ReadReq;
use crate::nbd::{Connection, NbdUri, STATE_ZERO};
use crate::{Error, Result};
use std::sync::Mutex;
use std::time::Duration;

const ALLOCATION: &str = "base:allocation";
const DIRTY: u32 = 1;
/// A server that answers nothing for this long fails the sync instead of hanging it.
pub const NBD_TIMEOUT: Duration = Duration::from_secs(60);

pub struct NbdSource {
    uri: NbdUri,
    bitmap: Option<String>,
    control: Mutex<Connection>,
    size: u64,
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
        let size = control.info().size;
        Ok(NbdSource {
            uri: uri.clone(),
            bitmap: bitmap.map(str::to_owned),
            control: Mutex::new(control),
            size,
        })
    }

    /// Extents of a metadata context whose flags satisfy `keep`.
    fn map(&self, context: &str, keep: impl Fn(u32) -> bool) -> Result<ExtentMap> {
        let extents = self
            .control
            .lock()
            .unwrap()
            .block_status(context, 0, self.size)
            .map_err(|e| {
                Error::source_io(&self.uri.text, "block status failed", e.offset, e.error)
            })?;
        Ok(ExtentMap::from_extents(
            extents
                .into_iter()
                .filter(|e| keep(e.flags))
                .map(|e| Extent::new(e.offset, e.len)),
        ))
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
        self.map(ALLOCATION, |f| f & STATE_ZERO == 0)
    }

    fn changed(&self) -> Result<Option<ExtentMap>> {
        match &self.bitmap {
            Some(b) => self.map(&bitmap_context(b), |f| f & DIRTY != 0).map(Some),
            None => Ok(None),
        }
    }

    /// An export says nothing about which snapshot it serves: a new one may appear at the same
    /// URI, so only the caller's `source_id` makes a journal trustworthy.
    fn identity(&self) -> Option<String> {
        None
    }

    fn reader(&self, depth: u32) -> Result<Box<dyn SourceReader>> {
        let _ = depth; // every request of a batch is in flight at once
        let conn = Connection::connect(&self.uri, &[], NBD_TIMEOUT).map_err(|e| {
            Error::source_io(&self.uri.text, "cannot open NBD export", e.offset, e.error)
        })?;
        Ok(Box::new(NbdReader {
            conn,
            uri: self.uri.text.clone(),
        }))
    }
}

struct NbdReader {
    conn: Connection,
    uri: String,
}

impl SourceReader for NbdReader {
    fn read_batch(&mut self, reqs: &mut [ReadReq<'_>]) -> Result<()> {
        self.conn
            .read_batch(reqs)
            .map_err(|e| Error::source_io(&self.uri, "NBD read failed", e.offset, e.error))
    }

    fn backend(&self) -> &'static str {
        "nbd"
    }
}
