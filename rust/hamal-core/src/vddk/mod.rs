//! VMware disks through VDDK (VixDiskLib), which hamal loads at run time from the directory
//! the operator unpacked it into, never into the engine's own process.
//!
//! Data flow: [`crate::source::VddkSource`] starts one worker process per reader
//! ([`client::Worker`]), running `worker::main` with `LD_LIBRARY_PATH=<libdir>/lib64`. The
//! worker loads VDDK ([`vmware_vddk_sys::Api`]), opens the disk read-only at the snapshot
//! ([`session::Session`]) and serves reads over a pipe ([`protocol`]). A crash inside VDDK ends
//! only that worker, and the disk's sync fails with how it died.

mod client;
mod log;
pub mod protocol;
mod session;
mod uri;
pub mod worker;

pub use client::Worker;
pub use uri::VddkUri;

use std::path::PathBuf;
use std::sync::OnceLock;

/// Engine-wide VDDK settings (`[vmware]` in hamal.conf); a URI's own options win.
#[derive(Clone, Debug)]
pub struct VddkOptions {
    /// Where VDDK was unpacked (it holds `lib64/libvixDiskLib.so.N`).
    pub libdir: PathBuf,
    pub transports: String,
    /// Sectors per VDDK read call.
    pub max_read_blocks: u32,
}

impl Default for VddkOptions {
    fn default() -> Self {
        VddkOptions {
            libdir: PathBuf::from(DEFAULT_LIBDIR),
            transports: DEFAULT_TRANSPORTS.to_owned(),
            max_read_blocks: 1024,
        }
    }
}

pub const DEFAULT_LIBDIR: &str = "/usr/lib/vmware-vix-disklib";
pub const DEFAULT_TRANSPORTS: &str = "nbdssl:nbd";

static WORKER_COMMAND: OnceLock<Vec<String>> = OnceLock::new();

/// Sets the command that starts a worker process (the Python package sets
/// `python -m hamal._vddk_worker` when it loads). The first call wins.
pub fn set_worker_command(cmd: Vec<String>) {
    if !cmd.is_empty() {
        let _ = WORKER_COMMAND.set(cmd);
    }
}

fn worker_command() -> Result<Vec<String>, String> {
    WORKER_COMMAND.get().cloned().ok_or_else(|| {
        "no VDDK worker command is set (the engine runs outside the hamal package)".to_owned()
    })
}
