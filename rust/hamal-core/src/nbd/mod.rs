//! A native NBD client: fixed newstyle handshake, `NBD_OPT_GO` with block-size info,
//! structured replies, block status (`base:allocation`, `qemu:dirty-bitmap:NAME`) and pipelined
//! reads and writes. One [`Connection`] per engine thread; nothing here is shared between
//! threads. Protocol reference: the NBD protocol document (`doc/proto.md` of the NBD project).
//!
//! No reply is trusted (see `transmit`): a read counts only when its chunks cover it exactly
//! once, every length is checked against the request and the agreed limits before anything is
//! allocated, and an export must say its size. A server that closes the connection or breaks
//! the protocol gives an error naming the URI and the request's offset; one that stalls or
//! trickles hits the per-request deadline, and a cancel ends any wait within a second.

mod client;
mod coverage;
mod proto;
mod status;
mod stream;
mod tls;
mod transmit;
mod uri;

pub use client::{Connection, ExportInfo, NbdFail, StatusExtent, MAX_EXPORT_SIZE};
pub use proto::STATE_ZERO;
pub use stream::CANCELLED;
pub use uri::NbdUri;

#[cfg(test)]
mod tests;
