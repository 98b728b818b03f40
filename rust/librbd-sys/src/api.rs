//! The symbol table: one list of the functions hamal calls drives the loader.

use crate::types::*;
use libloading::Library;
use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

/// The library to load; `HAMAL_LIBRBD` names another file (a test uses a missing one).
pub const LIBRBD: &str = "librbd.so.1";
const INSTALL_HINT: &str =
    "install Ceph's client library (Debian/Ubuntu: apt-get install librbd1; RHEL: dnf install librbd1)";

macro_rules! api {
    ($($name:ident: fn($($arg:ty),*) $(-> $ret:ty)?;)*) => {
        /// Function pointers into the loaded libraries, valid while `_lib` lives (forever: the
        /// table sits in a process-wide `OnceLock`).
        pub struct Api {
            $(pub $name: unsafe extern "C" fn($($arg),*) $(-> $ret)?,)*
            _lib: Library,
        }

        impl Api {
            fn load(path: &str) -> Result<Api, String> {
                // SAFETY: loading librbd runs its (and librados') initialisers, which only set
                // up their own globals; nothing else in hamal depends on their state.
                let lib = unsafe { Library::new(path) }
                    .map_err(|e| format!("cannot load {path}: {e}; {INSTALL_HINT}"))?;
                // librbd links librados, so one handle resolves both libraries' symbols.
                $(
                    // SAFETY: the pointer type is the C prototype from the Ceph headers.
                    let $name = *unsafe {
                        lib.get::<unsafe extern "C" fn($($arg),*) $(-> $ret)?>(
                            concat!(stringify!($name), "\0").as_bytes(),
                        )
                    }
                    .map_err(|e| format!("{path} has no {}: {e}; {INSTALL_HINT}", stringify!($name)))?;
                )*
                Ok(Api { $($name,)* _lib: lib })
            }
        }
    };
}

api! {
    rados_create: fn(*mut Rados, *const c_char) -> c_int;
    rados_conf_read_file: fn(Rados, *const c_char) -> c_int;
    rados_conf_parse_env: fn(Rados, *const c_char) -> c_int;
    rados_conf_set: fn(Rados, *const c_char, *const c_char) -> c_int;
    rados_connect: fn(Rados) -> c_int;
    rados_shutdown: fn(Rados);
    rados_ioctx_create: fn(Rados, *const c_char, *mut IoCtx) -> c_int;
    rados_ioctx_destroy: fn(IoCtx);
    rados_ioctx_set_namespace: fn(IoCtx, *const c_char);
    rbd_open: fn(IoCtx, *const c_char, *mut Image, *const c_char) -> c_int;
    rbd_open_read_only: fn(IoCtx, *const c_char, *mut Image, *const c_char) -> c_int;
    rbd_close: fn(Image) -> c_int;
    rbd_get_size: fn(Image, *mut u64) -> c_int;
    rbd_get_id: fn(Image, *mut c_char, usize) -> c_int;
    rbd_diff_iterate2: fn(Image, *const c_char, u64, u64, u8, u8, DiffCallback, *mut c_void) -> c_int;
    rbd_aio_create_completion: fn(*mut c_void, CompletionCallback, *mut Completion) -> c_int;
    rbd_aio_read: fn(Image, u64, usize, *mut c_char, Completion) -> c_int;
    rbd_aio_wait_for_complete: fn(Completion) -> c_int;
    rbd_aio_get_return_value: fn(Completion) -> isize;
    rbd_aio_release: fn(Completion);
    rbd_snap_list: fn(Image, *mut SnapInfo, *mut c_int) -> c_int;
    rbd_snap_list_end: fn(*mut SnapInfo);
    rbd_snap_create: fn(Image, *const c_char) -> c_int;
    rbd_snap_remove: fn(Image, *const c_char) -> c_int;
    rbd_snap_protect: fn(Image, *const c_char) -> c_int;
    rbd_snap_unprotect: fn(Image, *const c_char) -> c_int;
    rbd_snap_is_protected: fn(Image, *const c_char, *mut c_int) -> c_int;
}

/// The loaded API, or why it could not be loaded (said the same way on every call).
pub fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let path = std::env::var("HAMAL_LIBRBD").unwrap_or_else(|_| LIBRBD.to_owned());
        Api::load(&path)
    })
    .as_ref()
    .map_err(Clone::clone)
}
