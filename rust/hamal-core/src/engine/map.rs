//! `map`: what a source reports about itself: size, allocated extents, and the changed
//! extents of its own change tracking (an NBD dirty bitmap).

use super::disk::open_source;
use super::plan::Tuning;
use crate::uri::DiskUri;
use crate::Result;
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct SourceMap {
    pub source: String,
    pub size: u64,
    /// `[offset, length]` pairs that hold data (zero extents left out).
    pub allocated: Vec<(u64, u64)>,
    /// `[offset, length]` pairs marked dirty, when a bitmap was given.
    pub changed: Option<Vec<(u64, u64)>>,
}

pub fn map_source(uri: &DiskUri, bitmap: Option<&str>, tuning: &Tuning) -> Result<SourceMap> {
    let src = open_source(uri, tuning, bitmap, "", None, true)?;
    let pairs =
        |m: crate::extent::ExtentMap| m.extents().iter().map(|e| (e.offset, e.len)).collect();
    Ok(SourceMap {
        source: src.describe(),
        size: src.size(),
        allocated: pairs(src.allocated()?),
        changed: src.changed()?.map(pairs),
    })
}
