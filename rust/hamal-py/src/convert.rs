//! Plain data across the boundary: serde values to Python objects, Python dicts to plans.

use crate::errors::PlanError;
use hamal_core::checksum::ChecksumKind;
use hamal_core::engine::{ChangedList, DiskPlan};
use hamal_core::io::IoMode;
use hamal_core::uri::DiskUri;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::time::Duration;

/// Converts any serde-serializable value (summaries, progress) into Python objects.
pub fn to_py<T: serde::Serialize>(py: Python<'_>, v: &T) -> PyResult<Py<PyAny>> {
    let value =
        serde_json::to_value(v).map_err(|e| PlanError::new_err(format!("internal: {e}")))?;
    json_to_py(py, &value)
}

fn json_to_py(py: Python<'_>, v: &serde_json::Value) -> PyResult<Py<PyAny>> {
    use serde_json::Value as V;
    Ok(match v {
        V::Null => py.None(),
        V::Bool(b) => b.into_pyobject(py)?.to_owned().into_any().unbind(),
        V::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u.into_pyobject(py)?.into_any().unbind(),
            (None, Some(i)) => i.into_pyobject(py)?.into_any().unbind(),
            _ => n
                .as_f64()
                .unwrap_or(f64::NAN)
                .into_pyobject(py)?
                .into_any()
                .unbind(),
        },
        V::String(s) => s.into_pyobject(py)?.into_any().unbind(),
        V::Array(a) => {
            let items: PyResult<Vec<_>> = a.iter().map(|x| json_to_py(py, x)).collect();
            PyList::new(py, items?)?.into_any().unbind()
        }
        V::Object(o) => {
            let d = PyDict::new(py);
            for (k, x) in o {
                d.set_item(k, json_to_py(py, x)?)?;
            }
            d.into_any().unbind()
        }
    })
}

fn item<'py, T>(d: &Bound<'py, PyDict>, key: &str, i: usize) -> PyResult<Option<T>>
where
    T: for<'a> FromPyObject<'a, 'py, Error = PyErr>,
{
    match d.get_item(key)? {
        None => Ok(None),
        Some(v) if v.is_none() => Ok(None),
        Some(v) => v
            .extract()
            .map(Some)
            .map_err(|e| PlanError::new_err(format!("disk {i}: key '{key}': {e}"))),
    }
}

/// Refuses keys of `d` that are not in `known` (a typo must not silently change the plan).
pub fn check_keys(d: &Bound<'_, PyDict>, known: &[&str], what: &str) -> PyResult<()> {
    for key in d.keys() {
        let key: String = key
            .extract()
            .map_err(|_| PlanError::new_err(format!("{what}: keys must be strings")))?;
        if !known.contains(&key.as_str()) {
            return Err(PlanError::new_err(format!(
                "{what}: unknown key '{key}' (known: {})",
                known.join(", ")
            )));
        }
    }
    Ok(())
}

const DISK_KEYS: &[&str] = &[
    "disk_id",
    "source",
    "target",
    "changed",
    "changed_origin",
    "journal",
    "bitmap",
    "source_id",
    "version",
    "parent",
    "full_on_mismatch",
    "snapshot_time",
];

/// Reads one disk of a plan from a dict with keys `disk_id`, `source`, `target`, and optional
/// `changed` (list of `[offset, length]`), `changed_origin`, `journal`, `bitmap`, `source_id`,
/// `version`, `parent`, `full_on_mismatch`, `snapshot_time`.
pub fn disk_plan(d: &Bound<'_, PyDict>, i: usize) -> PyResult<DiskPlan> {
    check_keys(d, DISK_KEYS, &format!("disk {i}"))?;
    let need = |key: &str| -> PyResult<String> {
        item::<String>(d, key, i)?
            .ok_or_else(|| PlanError::new_err(format!("disk {i}: missing key '{key}'")))
    };
    let uri = |key: &str| -> PyResult<DiskUri> {
        DiskUri::parse(&need(key)?).map_err(|e| crate::errors::to_py(&e))
    };
    let changed = item::<Vec<(i128, i128)>>(d, "changed", i)?.map(|pairs| ChangedList {
        pairs,
        origin: item::<String>(d, "changed_origin", i)
            .ok()
            .flatten()
            .unwrap_or_else(|| "changed list".into()),
    });
    Ok(DiskPlan {
        disk_id: item::<String>(d, "disk_id", i)?.unwrap_or_else(|| format!("disk{i}")),
        source: uri("source")?,
        target: uri("target")?,
        changed,
        journal: item::<String>(d, "journal", i)?.map(Into::into),
        bitmap: item::<String>(d, "bitmap", i)?,
        source_id: item::<String>(d, "source_id", i)?,
        version: item::<String>(d, "version", i)?,
        parent: item::<String>(d, "parent", i)?,
        full_on_mismatch: item::<bool>(d, "full_on_mismatch", i)?.unwrap_or(false),
        snapshot_time: item::<String>(d, "snapshot_time", i)?,
    })
}

pub fn checksum(name: Option<&str>) -> PyResult<Option<ChecksumKind>> {
    name.map(|c| {
        ChecksumKind::parse(c).ok_or_else(|| {
            PlanError::new_err(format!("unknown checksum '{c}': use blake3 or sha256"))
        })
    })
    .transpose()
}

pub fn io_mode(name: &str) -> PyResult<IoMode> {
    IoMode::parse(name).ok_or_else(|| {
        PlanError::new_err(format!(
            "unknown io mode '{name}': use auto, uring or pread"
        ))
    })
}

pub fn seconds(name: &str, s: f64) -> PyResult<Duration> {
    if s > 0.0 && s.is_finite() {
        Ok(Duration::from_secs_f64(s))
    } else {
        Err(PlanError::new_err(format!(
            "{name} {s} must be a positive number of seconds"
        )))
    }
}
