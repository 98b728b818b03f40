//! A native NBD client: fixed newstyle handshake, `NBD_OPT_GO` with block-size info,
//! structured replies, block status (`base:allocation`, `qemu:dirty-bitmap:NAME`) and pipelined
//! reads and writes. One [`Connection`] per engine thread; nothing here is shared between
//! threads. Protocol reference: the NBD protocol document (`doc/proto.md` of the NBD project).
//!
//! Failure modes: a server that closes the connection or sends a malformed reply gives an
//! error naming the URI and the request's offset; a hung server hits the socket timeout
//! instead of hanging the sync.

mod client;
mod proto;
mod tls;
mod uri;

pub use client::{Connection, ExportInfo, NbdFail, StatusExtent};
pub use proto::STATE_ZERO;
pub use uri::NbdUri;
