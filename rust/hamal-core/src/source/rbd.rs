//! A Ceph RBD image at a snapshot as a source. Allocation is `rbd_diff_iterate2` without a base
//! snapshot; with `from_snap`, the changed extents are the diff since it (ranges that no longer
//! exist are in the change but not allocated, so the engine zeroes them on the target instead
//! of reading them; a full listing is per RADOS object and would count them as data). Reads
//! are librbd asynchronous reads, `depth` in flight per reader thread.

use super::{Source, SourceReader};
use crate::ceph::{DiffExtent, Pool, RbdImage, RbdUri};
use crate::extent::{Extent, ExtentMap};
use crate::io::ReadReq;
use crate::{Error, Result};
use std::sync::{Arc, OnceLock};

pub struct RbdSource {
    uri: RbdUri,
    image: Arc<RbdImage>,
    size: u64,
    identity: String,
    /// The diff since `from_snap`, listed once for `changed` and `allocated`.
    since_base: OnceLock<Vec<DiffExtent>>,
}

impl RbdSource {
    pub fn open(uri: &RbdUri) -> Result<RbdSource> {
        let Some(snap) = uri.snap.as_deref() else {
            return Err(Error::Plan(format!(
                "'{}': a sync reads a snapshot, not the live image: add @SNAP",
                uri.text
            )));
        };
        let image = Arc::new(Pool::connect(uri)?).open(Some(snap), false)?;
        let size = image.size()?;
        // Snapshots are immutable and their ids never reused: image id + snapshot ids pin the
        // content a resume journal refers to.
        let snaps = image.snapshots()?;
        let snap_id = |name: &str| {
            snaps
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.id)
                .ok_or_else(|| {
                    Error::Ceph(format!(
                        "{}: no snapshot '{name}' on {}",
                        uri.text,
                        uri.image_spec()
                    ))
                })
        };
        let mut identity = format!("rbd:{}@{}", image.id()?, snap_id(snap)?);
        if let Some(from) = &uri.from_snap {
            identity.push_str(&format!("-from-{}", snap_id(from)?));
        }
        Ok(RbdSource {
            uri: uri.clone(),
            image: Arc::new(image),
            size,
            identity,
            since_base: OnceLock::new(),
        })
    }

    /// The diff since `from_snap` (`None` without one).
    fn since_base(&self) -> Result<Option<&[DiffExtent]>> {
        let Some(from) = &self.uri.from_snap else {
            return Ok(None);
        };
        if self.since_base.get().is_none() {
            let diff = self.image.diff(Some(from), self.uri.whole_object)?;
            let _ = self.since_base.set(diff);
        }
        Ok(self.since_base.get().map(Vec::as_slice))
    }

    fn extents(diff: &[DiffExtent], keep: impl Fn(&DiffExtent) -> bool) -> ExtentMap {
        ExtentMap::from_extents(
            diff.iter()
                .filter(|d| keep(d))
                .map(|d| Extent::new(d.offset, d.len)),
        )
    }
}

impl Source for RbdSource {
    fn describe(&self) -> String {
        self.uri.text.clone()
    }

    fn size(&self) -> u64 {
        self.size
    }

    /// Allocated RADOS objects, less the ranges the incremental diff reports as gone (they
    /// read as zeros even inside an object that still exists).
    fn allocated(&self) -> Result<ExtentMap> {
        let diff = self.image.diff(None, self.uri.whole_object)?;
        let objects = Self::extents(&diff, |d| d.exists);
        Ok(match self.since_base()? {
            Some(base) => objects.subtract(&Self::extents(base, |d| !d.exists)),
            None => objects,
        })
    }

    fn changed(&self) -> Result<Option<ExtentMap>> {
        Ok(self.since_base()?.map(|d| Self::extents(d, |_| true)))
    }

    fn identity(&self) -> Option<String> {
        Some(self.identity.clone())
    }

    fn reader(&self, depth: u32) -> Result<Box<dyn SourceReader>> {
        Ok(Box::new(RbdReader {
            image: Arc::clone(&self.image),
            uri: self.uri.text.clone(),
            depth: depth.max(1) as usize,
        }))
    }
}

/// Readers share the image handle; librbd runs their reads concurrently.
struct RbdReader {
    image: Arc<RbdImage>,
    uri: String,
    depth: usize,
}

impl SourceReader for RbdReader {
    fn read_batch(&mut self, reqs: &mut [ReadReq<'_>]) -> Result<()> {
        self.image
            .read_batch(reqs, self.depth)
            .map_err(|e| Error::source_io(&self.uri, "RBD read failed", Some(e.offset), e.error))
    }

    fn backend(&self) -> &'static str {
        "librbd"
    }
}
