//! `hamal._native`: the Python face of the data plane. Only plain data and handles cross
//! this boundary; disk blocks never do. Engine events go through `tracing` to Python's
//! `logging` (loggers under `hamal.`).

// Python keyword arguments become Rust parameters one to one.
#![allow(clippy::too_many_arguments)]

mod ceph;
mod config;
mod convert;
mod errors;
mod fc;
mod interrupt;
mod job;
mod log_bridge;
mod store;

use pyo3::prelude::*;

/// Runs this process as a VDDK worker (`python -m hamal._vddk_worker`, started by the engine
/// for each VMware disk reader); returns its exit code.
#[pyfunction]
fn _vddk_worker_main(py: Python<'_>) -> i32 {
    py.detach(hamal_core::vddk::worker::main)
}

/// Whether io_uring works on this host (None) or why not (a message).
#[pyfunction]
fn io_uring_status() -> Option<String> {
    hamal_core::io::uring_probe().clone().err()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    log_bridge::install();
    hamal_core::io::return_large_frees();
    // VDDK never loads into this process: the engine starts this interpreter as its worker.
    let python: String = m.py().import("sys")?.getattr("executable")?.extract()?;
    hamal_core::vddk::set_worker_command(vec![python, "-m".into(), "hamal._vddk_worker".into()]);
    m.add_class::<job::Job>()?;
    m.add_class::<config::Config>()?;
    m.add_function(wrap_pyfunction!(job::start_sync, m)?)?;
    m.add_function(wrap_pyfunction!(job::verify, m)?)?;
    m.add_function(wrap_pyfunction!(job::load_changed_file, m)?)?;
    m.add_function(wrap_pyfunction!(job::map_source, m)?)?;
    m.add_function(wrap_pyfunction!(job::vddk_access, m)?)?;
    m.add_function(wrap_pyfunction!(config::load_config, m)?)?;
    m.add_function(wrap_pyfunction!(store::list_versions, m)?)?;
    m.add_function(wrap_pyfunction!(store::verify_store, m)?)?;
    m.add_function(wrap_pyfunction!(store::prune_store, m)?)?;
    m.add_function(wrap_pyfunction!(ceph::rbd_list_snapshots, m)?)?;
    m.add_function(wrap_pyfunction!(ceph::rbd_image_size, m)?)?;
    m.add_function(wrap_pyfunction!(ceph::rbd_create_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(ceph::rbd_remove_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(ceph::rbd_protect_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(fc::fc_bitmap_extents, m)?)?;
    m.add_function(wrap_pyfunction!(io_uring_status, m)?)?;
    m.add_function(wrap_pyfunction!(_vddk_worker_main, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
