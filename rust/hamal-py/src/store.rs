//! Chunk-store commands: list versions, verify, prune. Restores run through `start_sync` with
//! the store as the source.

use crate::config::Config;
use crate::convert;
use crate::errors::{self, PlanError};
use crate::interrupt;
use hamal_core::store::{self, StoreOptions, StoreUri};
use pyo3::prelude::*;

/// Store options from `config` (defaults without one), with `key_file` overriding
/// `[store] encryption_key_file`.
fn options(config: Option<&Config>, key_file: Option<String>) -> StoreOptions {
    let mut o = config.map_or_else(StoreOptions::default, |c| {
        StoreOptions::from_config(c.core())
    });
    if let Some(k) = key_file.filter(|k| !k.is_empty()) {
        o.key_file = Some(k.into());
    }
    o
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
#[pyo3(signature = (store, config=None, *, disk=None, key_file=None))]
pub fn list_versions(
    py: Python<'_>,
    store: &str,
    config: Option<PyRef<'_, Config>>,
    disk: Option<&str>,
    key_file: Option<String>,
) -> PyResult<(Py<PyAny>, Vec<String>)> {
    let (uri, o) = (store_uri(store)?, options(config.as_deref(), key_file));
    let disk = disk.map(str::to_owned);
    let (versions, damaged) =
        interrupt::run(py, move |_| store::list_versions(&uri, &o, disk.as_deref()))?;
    Ok((convert::to_py(py, &versions)?, damaged))
}

/// Checks records, index pages and chunks (`deep`: re-reads and re-hashes every chunk, or with
/// `sample = (part, parts)` that share of them). Returns a report dict whose `problems` lists
/// what is wrong.
#[pyfunction]
#[pyo3(signature = (store, config=None, *, disk=None, version=None, deep=false, key_file=None, sample=None))]
#[allow(clippy::too_many_arguments)]
pub fn verify_store(
    py: Python<'_>,
    store: &str,
    config: Option<PyRef<'_, Config>>,
    disk: Option<&str>,
    version: Option<&str>,
    deep: bool,
    key_file: Option<String>,
    sample: Option<(u32, u32)>,
) -> PyResult<Py<PyAny>> {
    let (uri, o) = (store_uri(store)?, options(config.as_deref(), key_file));
    let (disk, version) = (disk.map(str::to_owned), version.map(str::to_owned));
    let sample = sample.map(|(part, parts)| store::Sample { part, parts });
    let report = interrupt::run(py, move |cancel| {
        store::verify_sample(
            &uri,
            &o,
            disk.as_deref(),
            version.as_deref(),
            deep,
            sample,
            cancel,
        )
    })?;
    convert::to_py(py, &report)
}

/// Keeps the newest `keep` versions per disk and (with `collect`) removes unreferenced objects.
#[pyfunction]
#[pyo3(signature = (store, keep, config=None, *, disk=None, key_file=None, collect=true))]
pub fn prune_store(
    py: Python<'_>,
    store: &str,
    keep: usize,
    config: Option<PyRef<'_, Config>>,
    disk: Option<&str>,
    key_file: Option<String>,
    collect: bool,
) -> PyResult<Py<PyAny>> {
    let (uri, o) = (store_uri(store)?, options(config.as_deref(), key_file));
    let disk = disk.map(str::to_owned);
    let report = interrupt::run(py, move |_| {
        store::prune(&uri, &o, keep, disk.as_deref(), collect)
    })?;
    convert::to_py(py, &report)
}
