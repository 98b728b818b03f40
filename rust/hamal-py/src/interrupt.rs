//! Blocking calls that Ctrl-C and SIGTERM can interrupt: the work runs on a thread of its own
//! while the calling thread waits in short slices with the GIL released and lets Python's
//! signal handlers run between them. On a signal the work's cancel flag is raised; work that
//! watches it (verify) stops at its next step, the rest is left to finish on its own thread
//! (every such call is safe to stop at any point), and the signal's exception is raised.

use hamal_core::Result;
use pyo3::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a cancelled call may take to stop before the caller stops waiting for it.
const GRACE: Duration = Duration::from_secs(2);

pub fn run<T, F>(py: Python<'_>, work: F) -> PyResult<T>
where
    T: Send + 'static,
    F: FnOnce(&AtomicBool) -> Result<T> + Send + 'static,
{
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let rx = Mutex::new(rx); // shared with the GIL-free closures below
    let flag = cancel.clone();
    std::thread::Builder::new()
        .name("hamal-call".into())
        .spawn(move || {
            let _ = tx.send(work(&flag));
        })
        .map_err(|e| {
            crate::errors::InternalError::new_err(format!("cannot start a thread: {e}"))
        })?;
    loop {
        match py.detach(|| rx.lock().unwrap().recv_timeout(Duration::from_millis(200))) {
            Ok(out) => return out.map_err(|e| crate::errors::to_py(&e)),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(crate::errors::InternalError::new_err(
                    "the call's thread died",
                ))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Err(signal) = py.check_signals() {
            cancel.store(true, Relaxed);
            let _ = py.detach(|| rx.lock().unwrap().recv_timeout(GRACE));
            return Err(signal);
        }
    }
}
