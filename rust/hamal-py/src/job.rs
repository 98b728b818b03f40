//! `Job`: the handle Python keeps on a running sync. All waiting happens with the GIL released.

use crate::convert;
use crate::errors::{self, kind};
use hamal_core::engine::{self, JobPlan, Tuning};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::time::{Duration, Instant};

/// A running (or finished) sync job. Create it with `start_sync`.
#[pyclass(module = "hamal._native", frozen)]
pub struct Job {
    inner: engine::Job,
}

#[pymethods]
impl Job {
    /// Totals and per-disk counters: bytes total/done/zero/resumed, rate, ETA, state.
    fn progress(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        convert::to_py(py, &self.inner.progress())
    }

    /// True once every disk has finished, failed or been cancelled.
    #[getter]
    fn finished(&self) -> bool {
        self.inner.is_finished()
    }

    /// Waits for the job. Returns the per-disk summaries, or None if `timeout` seconds passed.
    /// Raises the mapped exception of the first failed disk (see `results()` for all of them).
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Py<PyAny>>> {
        let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
        loop {
            // Wait in short slices so Ctrl-C reaches Python promptly.
            let slice = match deadline {
                Some(d) => d
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(200)),
                None => Duration::from_millis(200),
            };
            if py.detach(|| self.inner.wait(Some(slice))) {
                break;
            }
            py.check_signals()?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
        }
        let mut summaries = Vec::new();
        for outcome in self.inner.outcomes().into_iter().flatten() {
            match outcome {
                Ok(s) => summaries.push(s),
                Err(e) => return Err(errors::to_py(&e)),
            }
        }
        convert::to_py(py, &summaries).map(Some)
    }

    /// Asks the job to stop; chunks already durable stay journaled for a resume.
    fn cancel(&self) {
        self.inner.cancel();
    }

    /// One dict per disk: `disk_id`, `state`, and `summary` or `error` with `error_kind`.
    fn results<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        let progress = self.inner.progress();
        for (view, outcome) in progress.disks.iter().zip(self.inner.outcomes()) {
            let d = PyDict::new(py);
            d.set_item("disk_id", &view.disk_id)?;
            d.set_item("state", convert::to_py(py, &view.state)?)?;
            match outcome {
                Some(Ok(s)) => d.set_item("summary", convert::to_py(py, &s)?)?,
                Some(Err(e)) => {
                    d.set_item("error", e.to_string())?;
                    d.set_item("error_kind", kind(&e))?;
                }
                None => {}
            }
            out.append(d)?;
        }
        Ok(out)
    }
}

/// Starts a sync job over `disks` (a list of dicts, see `hamal.sync`). The plan is checked
/// before this returns; disk-level errors are raised by `Job.wait()`.
#[pyfunction]
#[pyo3(signature = (disks, *, chunk_size=4*1024*1024, readers=2, writers=1, queue_depth=4, parallel_disks=4,
    checksum=None, release_cpu_ms_per_mb=0, bwlimit_bps=None, io_mode="auto", memory_budget=256*1024*1024,
    fsync_period_s=3.0, fsync_timeout_s=0, store=None, vddk=None, lock_dir=None))]
pub fn start_sync(
    disks: Vec<Bound<'_, PyDict>>,
    chunk_size: u64,
    readers: u32,
    writers: u32,
    queue_depth: u32,
    parallel_disks: u32,
    checksum: Option<&str>,
    release_cpu_ms_per_mb: u32,
    bwlimit_bps: Option<u64>,
    io_mode: &str,
    memory_budget: u64,
    fsync_period_s: f64,
    fsync_timeout_s: u64,
    store: Option<Bound<'_, PyDict>>,
    vddk: Option<Bound<'_, PyDict>>,
    lock_dir: Option<String>,
) -> PyResult<Job> {
    let tuning = Tuning {
        chunk_size,
        readers,
        writers,
        queue_depth,
        parallel_disks,
        checksum: convert::checksum(checksum)?,
        release_cpu_ms_per_mb,
        bwlimit_bps,
        io_mode: convert::io_mode(io_mode)?,
        memory_budget,
        fsync_period: convert::seconds("fsync period", fsync_period_s)?,
        fsync_warn_after: (fsync_timeout_s > 0).then(|| Duration::from_secs(fsync_timeout_s)),
        store: crate::store::options(store.as_ref())?,
        vddk: convert::vddk_options(vddk.as_ref())?,
        lock_dir: lock_dir.map_or_else(|| Tuning::default().lock_dir, Into::into),
    };
    let disks = disks
        .iter()
        .enumerate()
        .map(|(i, d)| convert::disk_plan(d, i))
        .collect::<PyResult<Vec<_>>>()?;
    let inner = engine::Job::start(JobPlan { disks, tuning }).map_err(|e| errors::to_py(&e))?;
    Ok(Job { inner })
}

/// Compares source and target chunk by chunk; returns a report dict (see `VerifyReport`).
#[pyfunction]
#[pyo3(signature = (source, target, *, changed=None, changed_origin="changed list", chunk_size=4*1024*1024,
    checksum="blake3", io_mode="auto", vddk=None))]
pub fn verify(
    py: Python<'_>,
    source: &str,
    target: &str,
    changed: Option<Vec<(i128, i128)>>,
    changed_origin: &str,
    chunk_size: u64,
    checksum: &str,
    io_mode: &str,
    vddk: Option<Bound<'_, PyDict>>,
) -> PyResult<Py<PyAny>> {
    let tuning = Tuning {
        chunk_size,
        checksum: convert::checksum(Some(checksum))?,
        io_mode: convert::io_mode(io_mode)?,
        vddk: convert::vddk_options(vddk.as_ref())?,
        ..Tuning::default()
    };
    let to_py_err = |e: hamal_core::Error| errors::to_py(&e);
    let (s, t) = (
        hamal_core::uri::DiskUri::parse(source).map_err(to_py_err)?,
        hamal_core::uri::DiskUri::parse(target).map_err(to_py_err)?,
    );
    let changed = changed.map(|pairs| engine::ChangedList {
        pairs,
        origin: changed_origin.to_owned(),
    });
    let report = py
        .detach(|| engine::verify(&s, &t, changed.as_ref(), &tuning))
        .map_err(to_py_err)?;
    convert::to_py(py, &report)
}

/// Parses a changed-extent JSON file into `[(offset, length), ...]`; errors name the file.
#[pyfunction]
pub fn load_changed_file(path: &str) -> PyResult<Vec<(i128, i128)>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        errors::PlanError::new_err(format!("{path}: cannot read changed list: {e}"))
    })?;
    engine::parse_changed_json(&text, path).map_err(|e| errors::to_py(&e))
}

/// Size, allocated extents and (with `bitmap`) dirty extents of a source.
#[pyfunction]
#[pyo3(signature = (source, *, bitmap=None, vddk=None))]
pub fn map_source(
    py: Python<'_>,
    source: &str,
    bitmap: Option<&str>,
    vddk: Option<Bound<'_, PyDict>>,
) -> PyResult<Py<PyAny>> {
    let tuning = Tuning {
        vddk: convert::vddk_options(vddk.as_ref())?,
        ..Tuning::default()
    };
    let uri = hamal_core::uri::DiskUri::parse(source).map_err(|e| errors::to_py(&e))?;
    let map = py
        .detach(|| engine::map_source(&uri, bitmap, &tuning))
        .map_err(|e| errors::to_py(&e))?;
    convert::to_py(py, &map)
}
