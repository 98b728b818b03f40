//! `verify`: compares source and target chunk by chunk over the given extents, or over
//! everything either side has allocated, and reports the offsets that differ.

use super::changed::validate_changed;
use super::disk::{open_source, read_requests};
use super::plan::{check_chunk_size, ChangedList, Tuning};
use crate::checksum::{ChecksumKind, ContentDigest};
use crate::extent::ExtentMap;
use crate::uri::DiskUri;
use crate::{Error, Result};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub source: String,
    pub target: String,
    pub bytes_compared: u64,
    pub chunks: u64,
    pub checksum: &'static str,
    /// Digest of the source over the compared chunks; equals a sync's `content_digest` when the
    /// same extents and chunk size were used.
    pub content_digest: String,
    pub mismatched_chunks: u64,
    /// Offsets of the first differing chunks (at most 16).
    pub mismatch_offsets: Vec<u64>,
}

/// `cancel` stops the comparison at the next chunk (`Error::Cancelled`).
pub fn verify(
    source: &DiskUri,
    target: &DiskUri,
    changed: Option<&ChangedList>,
    tuning: &Tuning,
    cancel: &AtomicBool,
) -> Result<VerifyReport> {
    check_chunk_size(tuning.chunk_size)?;
    let kind = tuning.checksum.unwrap_or(ChecksumKind::Blake3);
    let (src, tgt) = (
        open_source(source, tuning, None, "", None, changed.is_none())?,
        open_source(target, tuning, None, "", None, changed.is_none())?,
    );
    let size = src.size();
    if tgt.size() < size {
        return Err(Error::Mismatch(format!(
            "target {} is smaller than the source {}: {} < {size} bytes",
            tgt.describe(),
            src.describe(),
            tgt.size()
        )));
    }
    let extents = match changed {
        Some(c) => validate_changed(&c.pairs, size, &c.origin)?,
        None => src
            .allocated()?
            .union(&tgt.allocated()?)
            .intersect(&ExtentMap::whole(size)),
    };
    let (mut rs, mut rt) = (src.reader(1)?, tgt.reader(1)?);
    let mut report = VerifyReport {
        source: src.describe(),
        target: tgt.describe(),
        bytes_compared: 0,
        chunks: 0,
        checksum: kind.name(),
        content_digest: String::new(),
        mismatched_chunks: 0,
        mismatch_offsets: Vec::new(),
    };
    let mut digest = ContentDigest::default();
    let (mut a, mut b) = (
        vec![0u8; tuning.chunk_size as usize],
        vec![0u8; tuning.chunk_size as usize],
    );
    for chunk in extents.chunks(tuning.chunk_size) {
        if cancel.load(Relaxed) {
            return Err(Error::Cancelled);
        }
        let len = chunk.len() as usize;
        for (reader, buf) in [(&mut rs, &mut a), (&mut rt, &mut b)] {
            reader.read_batch(&mut read_requests(&chunk, buf))?;
        }
        let (da, db) = (kind.digest([&a[..len]]), kind.digest([&b[..len]]));
        digest.add(chunk.index, &da);
        report.chunks += 1;
        report.bytes_compared += len as u64;
        if da != db {
            report.mismatched_chunks += 1;
            if report.mismatch_offsets.len() < 16 {
                report.mismatch_offsets.push(chunk.first_offset());
            }
        }
    }
    report.content_digest = digest.hex();
    Ok(report)
}
