//! The C ABI of VMware's VixDiskLib (VDDK 6.0 to 9), loaded at run time.
//!
//! VDDK cannot be shipped (its licence forbids it), so nothing links against it: [`Api::load`]
//! probes `libvixDiskLib.so.9`, `.8`, `.7`, `.6` under `<libdir>/lib64` and resolves one table of
//! required and optional symbols. Types mirror `vixDiskLib.h`; fields that only some versions
//! have are marked, and callers must check [`Api::major`] before touching them.
//!
//! Load this only in a process started for it (VDDK brings its own libcrypto and libstdc++ and
//! expects `LD_LIBRARY_PATH=<libdir>/lib64`); hamal's engine does so in its VDDK worker.

mod api;
mod types;

pub use api::{Api, SONAME_VERSIONS};
pub use types::*;
