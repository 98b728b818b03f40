//! Rust's log records (and `tracing` events, which become them) into Python's `logging`,
//! through pyo3-log, set up at the first record that could be shown. Importing `logging` was a
//! fifth of a short `hamal sync`'s start-up, and most runs log nothing a user sees.
//!
//! Until then a record below WARNING is dropped when Python has not imported `logging`: nothing
//! can have given it a handler, and `logging`'s last-resort handler shows WARNING and up only.
//! At the bridge's creation `hamal.log.ready()` applies the set-up the CLI left waiting.

use log::{Level, LevelFilter, Log, Metadata, Record};
use pyo3::prelude::*;
use std::sync::OnceLock;

/// Targets starting with this never reach Python (rustls, rustls_platform_verifier): rustls
/// logs a refused certificate as an ERROR, and hamal says why in the error it raises.
const SILENT: &str = "rustls";

struct LazyBridge {
    bridge: OnceLock<pyo3_log::Logger>,
}

pub fn install() {
    let logger = LazyBridge {
        bridge: OnceLock::new(),
    };
    // Already installed when the module is imported again.
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(LevelFilter::Debug);
    }
}

impl LazyBridge {
    fn bridge(&self, py: Python<'_>, level: Level) -> Option<&pyo3_log::Logger> {
        if let Some(b) = self.bridge.get() {
            return Some(b);
        }
        if level > Level::Warn && !logging_imported(py) {
            return None;
        }
        if let Err(e) = py.import("hamal.log").and_then(|m| m.call_method0("ready")) {
            e.print(py);
        }
        // `Caching::Nothing` keeps Python-side level changes effective at once (hamal logs
        // little on hot paths).
        // `enabled` has filtered SILENT already.
        let logger = pyo3_log::Logger::new(py, pyo3_log::Caching::Nothing)
            .ok()?
            .set_prefix("hamal");
        Some(self.bridge.get_or_init(|| logger))
    }
}

fn logging_imported(py: Python<'_>) -> bool {
    py.import("sys")
        .and_then(|sys| sys.getattr("modules"))
        .and_then(|modules| modules.contains("logging"))
        .unwrap_or(true)
}

impl Log for LazyBridge {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= LevelFilter::Debug && !metadata.target().starts_with(SILENT)
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            Python::attach(|py| {
                if let Some(b) = self.bridge(py, record.level()) {
                    b.log(record);
                }
            });
        }
    }

    fn flush(&self) {}
}
