//! Handles and structures of the C API, as the Ceph headers declare them.

use std::ffi::{c_char, c_int, c_void};

/// `rados_t`: a cluster connection.
pub type Rados = *mut c_void;
/// `rados_ioctx_t`: a pool (and namespace) opened on a connection.
pub type IoCtx = *mut c_void;
/// `rbd_image_t`: an open image.
pub type Image = *mut c_void;
/// `rbd_completion_t`: one asynchronous request.
pub type Completion = *mut c_void;
/// `rbd_diff_iterate2`'s callback: (offset, length, exists, argument) -> 0 to go on.
pub type DiffCallback = extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;
/// `rbd_callback_t`: called when a completion finishes.
pub type CompletionCallback = extern "C" fn(Completion, *mut c_void);

/// `rbd_snap_info_t`.
#[repr(C)]
pub struct SnapInfo {
    pub id: u64,
    pub size: u64,
    pub name: *const c_char,
}
