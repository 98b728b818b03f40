//! RBD snapshot helpers for the OpenStack adapter: list, create, remove, protect. Each call
//! connects, acts and disconnects, bounded by the URI's `timeout` (default 60 s).

use crate::convert;
use crate::errors::{self, PlanError};
use hamal_core::ceph::{self, RbdUri};
use pyo3::prelude::*;

fn image_uri(s: &str) -> PyResult<RbdUri> {
    match RbdUri::parse(s) {
        Some(r) => r.map_err(|e| errors::to_py(&e)),
        None => Err(PlanError::new_err(format!(
            "'{s}' is not an RBD image: use rbd:POOL/IMAGE[?conf=PATH&id=NAME&keyring=PATH&timeout=S]"
        ))),
    }
}

/// The image's snapshots, oldest first: dicts with `id`, `name`, `size`, `protected`.
#[pyfunction]
pub fn rbd_list_snapshots(py: Python<'_>, image: &str) -> PyResult<Py<PyAny>> {
    let uri = image_uri(image)?;
    let snaps = py
        .detach(|| ceph::list_snapshots(&uri))
        .map_err(|e| errors::to_py(&e))?;
    convert::to_py(py, &snaps)
}

/// The image's size now, in bytes.
#[pyfunction]
pub fn rbd_image_size(py: Python<'_>, image: &str) -> PyResult<u64> {
    let uri = image_uri(image)?;
    py.detach(|| ceph::image_size(&uri))
        .map_err(|e| errors::to_py(&e))
}

/// Takes a snapshot (protected if asked) and returns it as `rbd_list_snapshots` does.
#[pyfunction]
#[pyo3(signature = (image, name, *, protect=false))]
pub fn rbd_create_snapshot(
    py: Python<'_>,
    image: &str,
    name: &str,
    protect: bool,
) -> PyResult<Py<PyAny>> {
    let uri = image_uri(image)?;
    let snap = py
        .detach(|| ceph::create_snapshot(&uri, name, protect))
        .map_err(|e| errors::to_py(&e))?;
    convert::to_py(py, &snap)
}

/// Removes a snapshot; a protected one only with `unprotect=True`.
#[pyfunction]
#[pyo3(signature = (image, name, *, unprotect=false))]
pub fn rbd_remove_snapshot(
    py: Python<'_>,
    image: &str,
    name: &str,
    unprotect: bool,
) -> PyResult<()> {
    let uri = image_uri(image)?;
    py.detach(|| ceph::remove_snapshot(&uri, name, unprotect))
        .map_err(|e| errors::to_py(&e))
}

/// Protects (`protected=True`) or unprotects a snapshot.
#[pyfunction]
#[pyo3(signature = (image, name, *, protected=true))]
pub fn rbd_protect_snapshot(
    py: Python<'_>,
    image: &str,
    name: &str,
    protected: bool,
) -> PyResult<()> {
    let uri = image_uri(image)?;
    py.detach(|| ceph::set_protected(&uri, name, protected))
        .map_err(|e| errors::to_py(&e))
}
