//! Chunk-store commands: list versions, verify, prune. Restores run through `start_sync` with
//! the store as the source.

use crate::convert;
use crate::errors::{self, PlanError};
use hamal_core::store::{self, S3Options, StoreOptions, StoreUri};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::time::Duration;

/// Store options from a flat dict (keys as in `hamal.sync.StoreSettings`); missing keys keep
/// their defaults.
pub fn options(d: Option<&Bound<'_, PyDict>>) -> PyResult<StoreOptions> {
    let mut o = StoreOptions::default();
    let Some(d) = d else { return Ok(o) };
    fn get<'py, T: for<'a> FromPyObject<'a, 'py, Error = PyErr>>(
        d: &Bound<'py, PyDict>,
        key: &str,
    ) -> PyResult<Option<T>> {
        match d.get_item(key)? {
            Some(v) if !v.is_none() => v
                .extract()
                .map(Some)
                .map_err(|e| PlanError::new_err(format!("store option '{key}': {e}"))),
            _ => Ok(None),
        }
    }
    if let Some(v) = get::<i32>(d, "compression_level")? {
        o.compression_level = v;
    }
    o.key_file = get::<String>(d, "key_file")?
        .filter(|s| !s.is_empty())
        .map(Into::into);
    if let Some(v) = get::<u32>(d, "upload_threads")? {
        o.upload_threads = v;
    }
    o.local_metadata = get::<String>(d, "local_metadata")?
        .filter(|s| !s.is_empty())
        .map(Into::into);
    o.save_local = get::<bool>(d, "save_local")?.unwrap_or(false);
    if let Some(v) = get::<bool>(d, "upload_metadata")? {
        o.upload_metadata = v;
    }
    let text = |key: &str| -> PyResult<Option<String>> {
        Ok(get::<String>(d, key)?.filter(|s| !s.is_empty()))
    };
    o.s3 = S3Options {
        endpoint: text("s3_endpoint")?,
        region: text("s3_region")?,
        access_key_id: text("s3_access_key_id")?,
        secret_access_key: text("s3_secret_access_key")?,
        virtual_hosted: get::<bool>(d, "s3_virtual_hosted")?.unwrap_or(false),
        ca_file: text("s3_ca_file")?.map(Into::into),
        timeout: Duration::from_secs(get::<u64>(d, "s3_timeout_s")?.unwrap_or(60)),
        max_retries: get::<usize>(d, "s3_max_retries")?.unwrap_or(o.s3.max_retries),
    };
    Ok(o)
}

fn store_uri(s: &str) -> PyResult<StoreUri> {
    match StoreUri::parse(s) {
        Some(r) => r.map_err(|e| errors::to_py(&e)),
        None => Err(PlanError::new_err(format!(
            "'{s}' is not a chunk store: use dir:PATH or s3://BUCKET/PREFIX"
        ))),
    }
}

/// `(versions, damaged)`: the version records of a store (dicts, oldest first) and one line per
/// record that failed its check.
#[pyfunction]
#[pyo3(signature = (store, *, disk=None, options=None))]
pub fn list_versions(
    py: Python<'_>,
    store: &str,
    disk: Option<&str>,
    options: Option<Bound<'_, PyDict>>,
) -> PyResult<(Py<PyAny>, Vec<String>)> {
    let (uri, o) = (store_uri(store)?, self::options(options.as_ref())?);
    let (versions, damaged) = py
        .detach(|| store::list_versions(&uri, &o, disk))
        .map_err(|e| errors::to_py(&e))?;
    Ok((convert::to_py(py, &versions)?, damaged))
}

/// Checks records, index pages and chunks (`deep`: re-reads and re-hashes every chunk).
/// Returns a report dict whose `problems` lists what is wrong.
#[pyfunction]
#[pyo3(signature = (store, *, disk=None, version=None, deep=false, options=None))]
pub fn verify_store(
    py: Python<'_>,
    store: &str,
    disk: Option<&str>,
    version: Option<&str>,
    deep: bool,
    options: Option<Bound<'_, PyDict>>,
) -> PyResult<Py<PyAny>> {
    let (uri, o) = (store_uri(store)?, self::options(options.as_ref())?);
    let report = py
        .detach(|| store::verify_store(&uri, &o, disk, version, deep))
        .map_err(|e| errors::to_py(&e))?;
    convert::to_py(py, &report)
}

/// Keeps the newest `keep` versions per disk and removes unreferenced objects.
#[pyfunction]
#[pyo3(signature = (store, keep, *, disk=None, options=None))]
pub fn prune_store(
    py: Python<'_>,
    store: &str,
    keep: usize,
    disk: Option<&str>,
    options: Option<Bound<'_, PyDict>>,
) -> PyResult<Py<PyAny>> {
    let (uri, o) = (store_uri(store)?, self::options(options.as_ref())?);
    let report = py
        .detach(|| store::prune(&uri, &o, keep, disk))
        .map_err(|e| errors::to_py(&e))?;
    convert::to_py(py, &report)
}
