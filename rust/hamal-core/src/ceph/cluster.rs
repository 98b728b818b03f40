//! Safe handles over librados and librbd: a connected pool and an open image. Every call is
//! bounded by the URI's timeout (librados' mount, monitor and OSD operation timeouts), so an
//! unreachable cluster fails instead of hanging.

use super::RbdUri;
use crate::io::{BatchError, ReadReq};
use crate::{Error, Result};
use librbd_sys::{self as ffi, Api, SnapInfo};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io;
use std::path::Path;
use std::ptr;
use std::sync::Arc;

/// A connection to the cluster with an I/O context on the URI's pool (and namespace).
pub struct Pool {
    api: &'static Api,
    rados: ffi::Rados,
    ioctx: ffi::IoCtx,
    uri: RbdUri,
}

// SAFETY: librados cluster and I/O context handles may be used from any thread (librados is
// thread-safe); `Pool` only destroys them in `drop`, when no other reference exists.
unsafe impl Send for Pool {}
// SAFETY: see `Send`; shared use only issues thread-safe librados calls.
unsafe impl Sync for Pool {}

fn cstr(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Ceph(format!("{what} '{s}' contains a NUL byte")))
}

fn path_cstr(what: &str, p: &Path) -> Result<CString> {
    cstr(what, &p.to_string_lossy())
}

fn errno(r: c_int) -> io::Error {
    io::Error::from_raw_os_error(-r)
}

impl Pool {
    pub fn connect(uri: &RbdUri) -> Result<Pool> {
        let api = ffi::api().map_err(Error::Ceph)?;
        let fail = |what: String| Error::Ceph(format!("{}: {what}", uri.text));
        let id = uri
            .id
            .as_deref()
            .map(|i| cstr("client id", i))
            .transpose()?;
        let mut rados: ffi::Rados = ptr::null_mut();
        // SAFETY: `rados` is a valid out pointer; `id` is NUL-terminated or null (= admin).
        let r = unsafe {
            (api.rados_create)(&mut rados, id.as_ref().map_or(ptr::null(), |c| c.as_ptr()))
        };
        if r < 0 {
            return Err(fail(format!("cannot create a RADOS client: {}", errno(r))));
        }
        // From here `pool` owns the handle, so every error path shuts it down.
        let mut pool = Pool {
            api,
            rados,
            ioctx: ptr::null_mut(),
            uri: uri.clone(),
        };
        pool.configure()?;
        // SAFETY: `rados` is a configured, unconnected handle.
        let r = unsafe { (api.rados_connect)(pool.rados) };
        if r < 0 {
            return Err(fail(connect_error(uri, r)));
        }
        let name = cstr("pool", &uri.pool)?;
        // SAFETY: connected handle, NUL-terminated name, valid out pointer.
        let r = unsafe { (api.rados_ioctx_create)(pool.rados, name.as_ptr(), &mut pool.ioctx) };
        if r < 0 {
            let why = if r == -libc::ENOENT {
                "no such pool".to_owned()
            } else {
                errno(r).to_string()
            };
            return Err(fail(format!("cannot open pool '{}': {why}", uri.pool)));
        }
        if let Some(ns) = &uri.namespace {
            let ns = cstr("namespace", ns)?;
            // SAFETY: valid I/O context and NUL-terminated name (copied by librados).
            unsafe { (api.rados_ioctx_set_namespace)(pool.ioctx, ns.as_ptr()) };
        }
        Ok(pool)
    }

    fn set(&self, key: &str, value: &str) -> Result<()> {
        let (k, v) = (cstr("option", key)?, cstr("value", value)?);
        // SAFETY: unconnected handle, NUL-terminated strings copied by librados.
        let r = unsafe { (self.api.rados_conf_set)(self.rados, k.as_ptr(), v.as_ptr()) };
        if r < 0 {
            return Err(Error::Ceph(format!(
                "{}: cannot set {key}: {}",
                self.uri.text,
                errno(r)
            )));
        }
        Ok(())
    }

    fn configure(&self) -> Result<()> {
        let conf = self
            .uri
            .conf
            .as_deref()
            .map(|p| path_cstr("conf", p))
            .transpose()?;
        // SAFETY: handle not yet connected; path NUL-terminated or null (default search, which
        // honours CEPH_CONF).
        let r = unsafe {
            (self.api.rados_conf_read_file)(
                self.rados,
                conf.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
            )
        };
        if r < 0 {
            let which = match &self.uri.conf {
                Some(p) => format!("cannot read Ceph config {}", p.display()),
                None => "no Ceph config found (CEPH_CONF, /etc/ceph/ceph.conf; or give conf=PATH)"
                    .into(),
            };
            return Err(Error::Ceph(format!(
                "{}: {which}: {}",
                self.uri.text,
                errno(r)
            )));
        }
        // SAFETY: null means the CEPH_ARGS variable, as the `rbd` tool does.
        unsafe { (self.api.rados_conf_parse_env)(self.rados, ptr::null()) };
        if let Some(k) = &self.uri.keyring {
            if let Err(e) = std::fs::metadata(k) {
                return Err(Error::Ceph(format!(
                    "{}: keyring {}: {e}",
                    self.uri.text,
                    k.display()
                )));
            }
            self.set("keyring", &k.to_string_lossy())?;
        }
        let secs = self.uri.timeout.as_secs().to_string();
        for key in [
            "client_mount_timeout",
            "rados_mon_op_timeout",
            "rados_osd_op_timeout",
        ] {
            self.set(key, &secs)?;
        }
        // hamal reports failures itself, in one line.
        self.set("log_to_stderr", "false")?;
        self.set("err_to_stderr", "false")
    }

    /// Opens the image: read-only at `snap`, or writable at its head for snapshot changes.
    pub fn open(self: &Arc<Self>, snap: Option<&str>, writable: bool) -> Result<RbdImage> {
        let name = cstr("image", &self.uri.image)?;
        let snap_c = snap.map(|s| cstr("snapshot", s)).transpose()?;
        let mut image: ffi::Image = ptr::null_mut();
        let open = if writable {
            self.api.rbd_open
        } else {
            self.api.rbd_open_read_only
        };
        // SAFETY: valid I/O context, NUL-terminated names (snap may be null = head), out pointer.
        let r = unsafe {
            open(
                self.ioctx,
                name.as_ptr(),
                &mut image,
                snap_c.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
            )
        };
        if r < 0 {
            let why = match (r == -libc::ENOENT, snap) {
                (true, Some(s)) => format!(
                    "no image '{}' or no snapshot '{s}' on it",
                    self.uri.image_spec()
                ),
                (true, None) => format!("no image '{}'", self.uri.image_spec()),
                (false, _) => format!("cannot open image {}: {}", self.uri.image_spec(), errno(r)),
            };
            return Err(Error::Ceph(format!("{}: {why}", self.uri.text)));
        }
        Ok(RbdImage {
            pool: Arc::clone(self),
            handle: image,
        })
    }
}

fn connect_error(uri: &RbdUri, r: c_int) -> String {
    let who = format!("client.{}", uri.id.as_deref().unwrap_or("admin"));
    match -r {
        libc::ETIMEDOUT => format!(
            "no answer from the Ceph monitors within {} s (check mon host in the config and that the cluster is up)",
            uri.timeout.as_secs()
        ),
        libc::EACCES | libc::EPERM => format!("authentication as {who} refused (check id and keyring)"),
        libc::ENOENT => format!("no key for {who} found (give keyring=PATH): {}", errno(r)),
        _ => format!("cannot connect to the Ceph cluster as {who}: {}", errno(r)),
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if !self.ioctx.is_null() {
            // SAFETY: created by rados_ioctx_create; images holding it keep the Pool alive.
            unsafe { (self.api.rados_ioctx_destroy)(self.ioctx) };
        }
        // SAFETY: created by rados_create; nothing uses it after drop.
        unsafe { (self.api.rados_shutdown)(self.rados) };
    }
}

/// An open image (at a snapshot or at its head).
pub struct RbdImage {
    pool: Arc<Pool>,
    handle: ffi::Image,
}

// SAFETY: librbd image handles are thread-safe (its own locks guard the image context), and
// `RbdImage` closes the handle only in `drop`.
unsafe impl Send for RbdImage {}
// SAFETY: see `Send`; concurrent aio reads and metadata queries on one handle are supported.
unsafe impl Sync for RbdImage {}

/// One range of a diff: `exists == false` means it reads as zeros (discarded or never written).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiffExtent {
    pub offset: u64,
    pub len: u64,
    pub exists: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub protected: bool,
}

extern "C" fn collect_diff(offset: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `&mut Vec<DiffExtent>` passed by `diff`, alive for the whole call.
    let out = unsafe { &mut *arg.cast::<Vec<DiffExtent>>() };
    out.push(DiffExtent {
        offset,
        len: len as u64,
        exists: exists != 0,
    });
    0
}

extern "C" fn no_callback(_: ffi::Completion, _: *mut c_void) {}

impl RbdImage {
    fn api(&self) -> &'static Api {
        self.pool.api
    }

    fn fail(&self, what: &str, r: c_int) -> Error {
        Error::Ceph(format!("{}: {what}: {}", self.pool.uri.text, errno(r)))
    }

    pub fn size(&self) -> Result<u64> {
        let mut size = 0;
        // SAFETY: open handle, valid out pointer.
        let r = unsafe { (self.api().rbd_get_size)(self.handle, &mut size) };
        if r < 0 {
            return Err(self.fail("cannot get the image size", r));
        }
        Ok(size)
    }

    /// The image's internal id (stable across renames).
    pub fn id(&self) -> Result<String> {
        let mut buf = vec![0u8; 64];
        // SAFETY: open handle; librbd writes at most `buf.len()` bytes, NUL-terminated.
        let r = unsafe { (self.api().rbd_get_id)(self.handle, buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            return Err(self.fail("cannot get the image id", r));
        }
        Ok(CStr::from_bytes_until_nul(&buf)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default())
    }

    /// What `rbd_diff_iterate2` reports for the whole image since `from_snap` (`None`: every
    /// allocated range, the parent's included).
    pub fn diff(&self, from_snap: Option<&str>, whole_object: bool) -> Result<Vec<DiffExtent>> {
        let size = self.size()?;
        let from = from_snap.map(|s| cstr("snapshot", s)).transpose()?;
        let mut out: Vec<DiffExtent> = Vec::new();
        // SAFETY: open handle; `from` NUL-terminated or null; the callback only pushes into
        // `out`, which outlives the synchronous call.
        let r = unsafe {
            (self.api().rbd_diff_iterate2)(
                self.handle,
                from.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
                0,
                size,
                1,
                u8::from(whole_object),
                collect_diff,
                (&mut out as *mut Vec<DiffExtent>).cast(),
            )
        };
        if r < 0 {
            let what = match from_snap {
                Some(s) if r == -libc::ENOENT => format!("no snapshot '{s}' to diff from"),
                Some(s) => format!("cannot diff from snapshot '{s}'"),
                None => "cannot list allocated extents".into(),
            };
            return Err(self.fail(&what, r));
        }
        Ok(out)
    }

    /// Reads every request, at most `depth` in flight. On failure, the first failed request's
    /// offset and error; every read has finished before this returns.
    pub fn read_batch(&self, reqs: &mut [ReadReq<'_>], depth: usize) -> Result<(), BatchError> {
        let mut first_error: Option<BatchError> = None;
        for window in reqs.chunks_mut(depth.max(1)) {
            let mut pending: Vec<(u64, usize, ffi::Completion)> = Vec::with_capacity(window.len());
            for req in window.iter_mut() {
                match self.submit_read(req) {
                    Ok(c) => pending.push((req.offset, req.buf.len(), c)),
                    Err(e) => {
                        first_error.get_or_insert(e);
                        break;
                    }
                }
            }
            for (offset, len, c) in pending {
                // SAFETY: `c` came from a successful rbd_aio_read; waiting, reading its result
                // and releasing it once is the documented life cycle.
                let got = unsafe {
                    (self.api().rbd_aio_wait_for_complete)(c);
                    let got = (self.api().rbd_aio_get_return_value)(c);
                    (self.api().rbd_aio_release)(c);
                    got
                };
                if got != len as isize && first_error.is_none() {
                    let error = if got < 0 {
                        errno(got as c_int)
                    } else {
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("short read: {got} of {len} bytes"),
                        )
                    };
                    first_error = Some(BatchError { offset, error });
                }
            }
            if first_error.is_some() {
                break;
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn submit_read(&self, req: &mut ReadReq<'_>) -> Result<ffi::Completion, BatchError> {
        let failure = |r: c_int| BatchError {
            offset: req.offset,
            error: errno(r),
        };
        let mut c: ffi::Completion = ptr::null_mut();
        // SAFETY: valid out pointer; the callback does nothing with its null argument.
        let r =
            unsafe { (self.api().rbd_aio_create_completion)(ptr::null_mut(), no_callback, &mut c) };
        if r < 0 {
            return Err(failure(r));
        }
        // SAFETY: the buffer stays borrowed (and alive) until `read_batch` has waited for this
        // completion, on every path.
        let r = unsafe {
            (self.api().rbd_aio_read)(
                self.handle,
                req.offset,
                req.buf.len(),
                req.buf.as_mut_ptr().cast(),
                c,
            )
        };
        if r < 0 {
            // SAFETY: the read was not queued, so nothing else refers to `c`.
            unsafe { (self.api().rbd_aio_release)(c) };
            return Err(failure(r));
        }
        Ok(c)
    }

    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let mut max: c_int = 16;
        loop {
            let mut infos: Vec<SnapInfo> = (0..max)
                .map(|_| SnapInfo {
                    id: 0,
                    size: 0,
                    name: ptr::null(),
                })
                .collect();
            // SAFETY: `infos` holds `max` entries; librbd fills at most that many (the last one
            // a terminator) or says how many it needs with -ERANGE.
            let r =
                unsafe { (self.api().rbd_snap_list)(self.handle, infos.as_mut_ptr(), &mut max) };
            if r == -libc::ERANGE {
                continue;
            }
            if r < 0 {
                return Err(self.fail("cannot list snapshots", r));
            }
            let mut snaps = Vec::with_capacity(r as usize);
            for info in &infos[..r as usize] {
                // SAFETY: librbd set a NUL-terminated name on each of the first `r` entries.
                let name = unsafe { CStr::from_ptr(info.name) }
                    .to_string_lossy()
                    .into_owned();
                snaps.push(Snapshot {
                    id: info.id,
                    size: info.size,
                    name,
                    protected: false,
                });
            }
            // SAFETY: frees the names librbd allocated in this list, once.
            unsafe { (self.api().rbd_snap_list_end)(infos.as_mut_ptr()) };
            for s in &mut snaps {
                s.protected = self.is_protected(&s.name)?;
            }
            return Ok(snaps);
        }
    }

    fn is_protected(&self, snap: &str) -> Result<bool> {
        let name = cstr("snapshot", snap)?;
        let mut p: c_int = 0;
        // SAFETY: open handle, NUL-terminated name, valid out pointer.
        let r = unsafe { (self.api().rbd_snap_is_protected)(self.handle, name.as_ptr(), &mut p) };
        if r < 0 {
            return Err(self.fail(&format!("cannot query snapshot '{snap}'"), r));
        }
        Ok(p != 0)
    }

    /// Runs a snapshot call (create, remove, protect, unprotect) by name.
    pub fn snap_op(&self, what: &str, snap: &str) -> Result<()> {
        type Op = unsafe extern "C" fn(ffi::Image, *const c_char) -> c_int;
        let op: Op = match what {
            "create" => self.api().rbd_snap_create,
            "remove" => self.api().rbd_snap_remove,
            "protect" => self.api().rbd_snap_protect,
            "unprotect" => self.api().rbd_snap_unprotect,
            _ => {
                return Err(Error::Internal(format!(
                    "unknown snapshot operation {what}"
                )))
            }
        };
        let name = cstr("snapshot", snap)?;
        // SAFETY: open (writable) handle and NUL-terminated name.
        let r = unsafe { op(self.handle, name.as_ptr()) };
        if r < 0 {
            let why = match -r {
                libc::EEXIST => {
                    return Err(Error::Ceph(format!(
                        "{}: snapshot '{snap}' already exists",
                        self.pool.uri.text
                    )))
                }
                libc::ENOENT => {
                    return Err(Error::Ceph(format!(
                        "{}: no snapshot '{snap}'",
                        self.pool.uri.text
                    )))
                }
                libc::EBUSY if what == "remove" => {
                    return Err(Error::Ceph(format!(
                        "{}: snapshot '{snap}' is protected (unprotect it first) or has clones",
                        self.pool.uri.text
                    )))
                }
                _ => format!("cannot {what} snapshot '{snap}'"),
            };
            return Err(self.fail(&why, r));
        }
        Ok(())
    }
}

impl Drop for RbdImage {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open*; no reads are in flight (read_batch waits for all).
        unsafe { (self.api().rbd_close)(self.handle) };
    }
}
