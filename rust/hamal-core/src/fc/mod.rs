//! Huawei FusionCompute: a VM volume at a CBT backup snapshot, read through the backup data
//! channel of the CNA host that holds it (`fc://`, a source).
//!
//! The VRM side (login, snapshots, `getcbt`, `backupresources`) is the Python adapter's; it
//! hands the engine the CNA host, port and resource, a file holding the channel token, the
//! CA of a `lanssl` channel and, for a full sync, the volume's allocated extents. What this
//! side assumes about FusionCompute's own formats is unverified against a real CNA and kept
//! in two places, so that a correction is a change there only: [`wire`] (the channel framing)
//! and [`bitmap`] (the CBT bitmap's bit order). README: "FusionCompute: what is unverified".

pub mod bitmap;
pub(crate) mod slots;
pub mod uri;
pub mod wire;

pub use uri::FcUri;

use std::net::IpAddr;

/// `[fusion_compute]` settings the data channel uses.
#[derive(Clone, Debug, Default)]
pub struct FcOptions {
    /// Sockets to one CNA host at once, over every process on this proxy
    /// (`max_socket_connections_per_host`).
    pub max_connections_per_host: u32,
    /// Local address the sockets are bound to (`local_host_ip`; `None`: the kernel's choice).
    pub local_ip: Option<IpAddr>,
}
