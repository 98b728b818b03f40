//! `Job`: the handle Python keeps on a running sync. All waiting happens with the GIL released.

use crate::convert;
use crate::errors::{self, kind, PlanError};
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

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Leaving a `with` block cancels a job that still runs and waits until it has stopped
    /// (its disks flushed and journaled); exceptions pass through.
    fn __exit__(
        &self,
        py: Python<'_>,
        _ty: Option<Bound<'_, PyAny>>,
        _value: Option<Bound<'_, PyAny>>,
        _tb: Option<Bound<'_, PyAny>>,
    ) -> bool {
        if !self.inner.is_finished() {
            self.inner.cancel();
            py.detach(|| self.inner.wait(None));
        }
        false
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

/// Starts a sync job over `disks` (a list of dicts, see `hamal.sync`). Settings come from
/// `config` (a loaded `hamal.conf`, used as it is; defaults without one) and the keyword
/// overrides. The plan is checked before this returns; disk-level errors are raised by
/// `Job.wait()`.
#[pyfunction]
#[pyo3(signature = (disks, config=None, *, chunk_size=None, readers=None, writers=None, queue_depth=None,
    parallel_disks=None, checksum=None, platform=None, release_cpu_ms_per_mb=None, bwlimit_bps=None,
    io_mode=None, memory_budget=None, fsync_period_s=None, key_file=None))]
pub fn start_sync(
    disks: Vec<Bound<'_, PyDict>>,
    config: Option<PyRef<'_, crate::config::Config>>,
    chunk_size: Option<u64>,
    readers: Option<u32>,
    writers: Option<u32>,
    queue_depth: Option<u32>,
    parallel_disks: Option<u32>,
    checksum: Option<&str>,
    platform: Option<&str>,
    release_cpu_ms_per_mb: Option<u32>,
    bwlimit_bps: Option<u64>,
    io_mode: Option<&str>,
    memory_budget: Option<u64>,
    fsync_period_s: Option<f64>,
    key_file: Option<String>,
) -> PyResult<Job> {
    let conf = config.as_ref().map(|c| c.core());
    let mut t = conf.map_or_else(Tuning::default, Tuning::from_config);
    macro_rules! set {
        ($($field:ident = $v:expr;)*) => { $( if let Some(v) = $v { t.$field = v; } )* };
    }
    set! {
        chunk_size = chunk_size;
        readers = readers;
        writers = writers;
        queue_depth = queue_depth;
        parallel_disks = parallel_disks;
        bwlimit_bps = bwlimit_bps.map(Some);
        memory_budget = memory_budget;
    }
    t.checksum = convert::checksum(checksum)?;
    if let Some(m) = io_mode {
        t.io_mode = convert::io_mode(m)?;
    }
    if let Some(s) = fsync_period_s {
        t.fsync_period = convert::seconds("fsync period", s)?;
    }
    if let Some(k) = key_file.filter(|k| !k.is_empty()) {
        t.store.key_file = Some(k.into());
    }
    t.release_cpu_ms_per_mb = match (release_cpu_ms_per_mb, platform, conf) {
        (Some(ms), _, _) => ms,
        (None, Some("vmware"), Some(c)) => c.period.vmware_release_cpu_time as u32,
        (None, Some("openstack"), Some(c)) => c.period.openstack_release_cpu_time as u32,
        (None, Some("vmware" | "openstack") | None, _) => 0,
        (None, Some(p), _) => {
            return Err(PlanError::new_err(format!(
                "unknown platform '{p}': use vmware or openstack"
            )))
        }
    };
    if let Some(c) = conf {
        t.check_limits(c).map_err(|e| errors::to_py(&e))?;
    }
    let disks = disks
        .iter()
        .enumerate()
        .map(|(i, d)| convert::disk_plan(d, i))
        .collect::<PyResult<Vec<_>>>()?;
    let inner = engine::Job::start(JobPlan { disks, tuning: t }).map_err(|e| errors::to_py(&e))?;
    Ok(Job { inner })
}

/// Compares source and target chunk by chunk; returns a report dict (see `VerifyReport`).
#[pyfunction]
#[pyo3(signature = (source, target, config=None, *, changed=None, changed_origin="changed list",
    chunk_size=4*1024*1024, checksum="blake3", io_mode="auto"))]
pub fn verify(
    py: Python<'_>,
    source: &str,
    target: &str,
    config: Option<PyRef<'_, crate::config::Config>>,
    changed: Option<Vec<(i128, i128)>>,
    changed_origin: &str,
    chunk_size: u64,
    checksum: &str,
    io_mode: &str,
) -> PyResult<Py<PyAny>> {
    let tuning = Tuning {
        chunk_size,
        checksum: convert::checksum(Some(checksum))?,
        io_mode: convert::io_mode(io_mode)?,
        ..config
            .as_ref()
            .map_or_else(Tuning::default, |c| Tuning::from_config(c.core()))
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
    let report = crate::interrupt::run(py, move |cancel| {
        engine::verify(&s, &t, changed.as_ref(), &tuning, cancel)
    })?;
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
#[pyo3(signature = (source, config=None, *, bitmap=None))]
pub fn map_source(
    py: Python<'_>,
    source: &str,
    config: Option<PyRef<'_, crate::config::Config>>,
    bitmap: Option<&str>,
) -> PyResult<Py<PyAny>> {
    let tuning = config
        .as_ref()
        .map_or_else(Tuning::default, |c| Tuning::from_config(c.core()));
    let uri = hamal_core::uri::DiskUri::parse(source).map_err(|e| errors::to_py(&e))?;
    let bitmap = bitmap.map(str::to_owned);
    let map = crate::interrupt::run(py, move |_| {
        engine::map_source(&uri, bitmap.as_deref(), &tuning)
    })?;
    convert::to_py(py, &map)
}

/// `PrepareForAccess` (`begin=True`) or `EndAccess` for the VM of a `vddk://` URI (any of its
/// disks), through a VDDK worker process: vCenter keeps the VM from moving while it is read.
#[pyfunction]
#[pyo3(signature = (uri, begin, config=None))]
pub fn vddk_access(
    py: Python<'_>,
    uri: &str,
    begin: bool,
    config: Option<PyRef<'_, crate::config::Config>>,
) -> PyResult<()> {
    let tuning = config
        .as_ref()
        .map_or_else(Tuning::default, |c| Tuning::from_config(c.core()));
    let parsed = hamal_core::uri::DiskUri::parse(uri).map_err(|e| errors::to_py(&e))?;
    let hamal_core::uri::DiskUri::Vddk(vddk) = parsed else {
        return Err(errors::PlanError::new_err(format!(
            "'{uri}' is not a vddk:// URI"
        )));
    };
    py.detach(|| hamal_core::vddk::Worker::access(&vddk, &tuning.vddk, begin))
        .map_err(|e| errors::to_py(&e))
}
