//! `hamal.conf` for Python: parsed and checked in Rust, handed over as plain dicts.

use crate::errors;
use hamal_core::config::{self, Value};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::Path;

/// A loaded `hamal.conf`.
#[pyclass(module = "hamal._native", frozen)]
pub struct Config {
    loaded: config::Loaded,
}

impl Config {
    /// The parsed configuration, for the engine (used as it is, never through dicts).
    pub fn core(&self) -> &config::Config {
        &self.loaded.config
    }
}

#[pymethods]
impl Config {
    /// The file that was read (or looked for).
    #[getter]
    fn path(&self) -> String {
        self.loaded.path.display().to_string()
    }

    /// False when the file was missing and defaults are in force.
    #[getter]
    fn found(&self) -> bool {
        self.loaded.found
    }

    /// Unknown keys and sections, one message each.
    #[getter]
    fn warnings(&self) -> Vec<String> {
        self.loaded.warnings.clone()
    }

    /// `{section: {key: value}}` with typed values; secrets are included (never log this).
    fn as_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for (section, entries) in self.loaded.config.sections() {
            let d = PyDict::new(py);
            for e in entries {
                match e.value {
                    Value::Bool(b) => d.set_item(e.key, b)?,
                    Value::Int(i) => d.set_item(e.key, i)?,
                    Value::Str(s) | Value::Secret(s) => d.set_item(e.key, s)?,
                }
            }
            out.set_item(section, d)?;
        }
        Ok(out)
    }

    /// The effective config as `hamal.conf` text, secrets masked.
    fn render(&self) -> String {
        self.loaded.config.render()
    }

    /// `(section, key)` pairs that hold secrets.
    fn secret_keys(&self) -> Vec<(String, String)> {
        let c = &self.loaded.config;
        c.sections()
            .into_iter()
            .flat_map(|(s, entries)| {
                entries
                    .into_iter()
                    .filter(move |e| c.is_secret(s, e.key))
                    .map(move |e| (s.to_owned(), e.key.to_owned()))
            })
            .collect()
    }
}

/// Loads `hamal.conf`: `path`, else `HAMAL_CONF`, else `/etc/hamal/hamal.conf`.
#[pyfunction]
#[pyo3(signature = (path=None))]
pub fn load_config(path: Option<&str>) -> PyResult<Config> {
    let p = config::resolve_path(path.map(Path::new));
    let loaded = config::load(&p).map_err(|e| errors::to_py(&e))?;
    Ok(Config { loaded })
}
