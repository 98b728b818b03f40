//! hamal's data plane: extent maps, sources, targets and the transfer engine.
//!
//! This crate has no Python in it; `hamal-py` exposes it as `hamal._native`. See
//! ARCHITECTURE.md at the repository root for how the parts fit together.

pub mod ceph;
pub mod checksum;
pub mod config;
pub mod engine;
pub mod error;
pub mod extent;
pub mod fc;
pub mod holder;
pub mod io;
pub mod nbd;
pub mod source;
pub mod store;
pub mod target;
pub mod tls_failure;
pub mod uri;
pub mod vddk;

pub use error::{Error, Result};
