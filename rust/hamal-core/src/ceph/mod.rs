//! Ceph RBD through librbd, loaded at run time: the `rbd:` URI, pool and image handles, and the
//! snapshot helpers the OpenStack adapter uses. The source itself is `source::RbdSource`.

mod cluster;
mod uri;

pub use cluster::{DiffExtent, Pool, RbdImage, Snapshot};
pub use uri::{RbdUri, DEFAULT_TIMEOUT};

use crate::{Error, Result};
use std::sync::Arc;

/// The image of an `rbd:` URI opened writable at its head (snapshots are taken there).
fn open_head(uri: &RbdUri) -> Result<RbdImage> {
    if let Some(s) = &uri.snap {
        return Err(Error::Plan(format!(
            "'{}': name the image without @{s} for snapshot operations",
            uri.text
        )));
    }
    Arc::new(Pool::connect(uri)?).open(None, true)
}

/// The image's snapshots, oldest first.
pub fn list_snapshots(uri: &RbdUri) -> Result<Vec<Snapshot>> {
    let mut snaps = Arc::new(Pool::connect(uri)?)
        .open(None, false)?
        .snapshots()?;
    snaps.sort_by_key(|s| s.id);
    Ok(snaps)
}

/// The image's size now, in bytes.
pub fn image_size(uri: &RbdUri) -> Result<u64> {
    open_head(uri)?.size()
}

/// Takes snapshot `name` of the image, protected if asked (Cinder protects its snapshots).
pub fn create_snapshot(uri: &RbdUri, name: &str, protect: bool) -> Result<Snapshot> {
    let image = open_head(uri)?;
    image.snap_op("create", name)?;
    if protect {
        image.snap_op("protect", name)?;
    }
    image
        .snapshots()?
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| {
            Error::Ceph(format!(
                "{}: snapshot '{name}' vanished after creation",
                uri.text
            ))
        })
}

/// Removes snapshot `name`; a protected one only with `unprotect` (it is unprotected first).
pub fn remove_snapshot(uri: &RbdUri, name: &str, unprotect: bool) -> Result<()> {
    let image = open_head(uri)?;
    if unprotect
        && image
            .snapshots()?
            .iter()
            .any(|s| s.name == name && s.protected)
    {
        image.snap_op("unprotect", name)?;
    }
    image.snap_op("remove", name)
}

/// Protects or unprotects snapshot `name`.
pub fn set_protected(uri: &RbdUri, name: &str, protected: bool) -> Result<()> {
    open_head(uri)?.snap_op(if protected { "protect" } else { "unprotect" }, name)
}
