//! The C ABI of Ceph's librados and librbd that hamal uses, loaded at run time.
//!
//! Nothing links against Ceph at build time: a wheel that did would need Ceph's client
//! libraries on every host, also where no `rbd:` URI is ever used. [`api`] loads `librbd.so.1`
//! (or the file `HAMAL_LIBRBD` names) with `dlopen` on first use and resolves one table of
//! symbols; librbd brings librados, so one handle serves both. Only the calls hamal makes are
//! listed; types and prototypes follow `rados/librados.h` and `rbd/librbd.h` (a stable C ABI
//! since Luminous). The safe wrappers, and the callbacks hamal hands to librbd, live in
//! `hamal-core` (`ceph/cluster.rs`).

mod api;
mod types;

pub use api::{api, Api, LIBRBD};
pub use types::*;
