//! One open VDDK disk inside the worker process: InitEx, ConnectEx, Open, reads, and on every
//! path out (success, error, parent gone) Close, Disconnect and Exit, in that order.

use super::log::{log_debug, log_panic, log_warn};
use super::protocol::{Allocated, OpenRequest, Opened, ACCESS_IDENTITY, ACCESS_PREPARE};
use std::ffi::{c_void, CStr, CString};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use vmware_vddk_sys as sys;

pub struct Session {
    api: sys::Api,
    initialised: bool,
    conn: sys::Connection,
    handle: sys::Handle,
    pub capacity: u64,
    max_read: u64,
    server: String,
}

fn cstring(what: &str, s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} contains a NUL byte"))
}

impl Session {
    pub fn open(req: &OpenRequest) -> Result<(Session, Opened), String> {
        let api = sys::Api::load(Path::new(&req.libdir))?;
        let mut s = Session {
            api,
            initialised: false,
            conn: std::ptr::null_mut(),
            handle: std::ptr::null_mut(),
            capacity: 0,
            max_read: req.max_read_blocks.max(1),
            server: req.server.clone(),
        };
        let libdir = cstring("libdir", &req.libdir)?;
        let config = req
            .config
            .as_deref()
            .map(|c| cstring("config", c))
            .transpose()?;
        // SAFETY: the log functions match VixDiskLibGenericLogFunc; the strings outlive the call.
        let err = unsafe {
            (s.api.init_ex)(
                s.api.major,
                0,
                Some(log_debug),
                Some(log_warn),
                Some(log_panic),
                libdir.as_ptr(),
                config.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        };
        s.check(err, "InitEx")?;
        s.initialised = true;
        if let Some(what) = req.access.as_deref() {
            s.access(req, what == ACCESS_PREPARE)?;
            let opened = Opened {
                capacity_sectors: 0,
                transport: String::new(),
                library: s.api.path.display().to_string(),
                major: s.api.major,
                optional_symbols: Vec::new(),
                sector_sizes: None,
            };
            return Ok((s, opened));
        }
        s.connect(req)?;
        let path = cstring("disk path", &req.disk)?;
        let mut handle = std::ptr::null_mut();
        // SAFETY: `conn` is connected; `path` is NUL-terminated; `handle` is an out-parameter.
        let err = unsafe { (s.api.open)(s.conn, path.as_ptr(), sys::OPEN_READ_ONLY, &mut handle) };
        s.check(err, "Open")?;
        s.handle = handle;
        let mut info: *mut sys::Info = std::ptr::null_mut();
        // SAFETY: `handle` is open; `info` is an out-parameter freed below.
        let err = unsafe { (s.api.get_info)(s.handle, &mut info) };
        s.check(err, "GetInfo")?;
        // SAFETY: GetInfo succeeded, so `info` points at a VixDiskLibInfo of this library's
        // version; only the fields every version has are read.
        s.capacity = unsafe { (*info).capacity };
        let sector_sizes = if s.api.major >= 7 {
            // SAFETY: as above; the sector-size fields exist from VDDK 7 on, so an older
            // library's (shorter) struct is never read past its end.
            Some(unsafe { ((*info).logical_sector_size, (*info).physical_sector_size) })
        } else {
            None
        };
        // SAFETY: `info` came from GetInfo and is freed once.
        unsafe { (s.api.free_info)(info) };
        // SAFETY: `handle` is open; the result is a static string or NULL.
        let mode = unsafe { (s.api.get_transport_mode)(s.handle) };
        let transport = if mode.is_null() {
            String::new()
        } else {
            // SAFETY: non-NULL, NUL-terminated, owned by the library.
            unsafe { CStr::from_ptr(mode) }
                .to_string_lossy()
                .into_owned()
        };
        let opened = Opened {
            capacity_sectors: s.capacity,
            transport,
            library: s.api.path.display().to_string(),
            major: s.api.major,
            optional_symbols: s
                .api
                .optional_present()
                .iter()
                .map(|n| n.to_string())
                .collect(),
            sector_sizes,
        };
        Ok((s, opened))
    }

    fn check(&self, err: sys::VixError, call: &str) -> Result<(), String> {
        if err == sys::VIX_OK {
            return Ok(());
        }
        Err(format!("{call} failed: {}", self.api.error_text(err)))
    }

    fn connect(&mut self, req: &OpenRequest) -> Result<(), String> {
        let snapshot = cstring("snapshot", &req.snapshot)?;
        let modes = cstring("transports", &req.transports)?;
        let connect_ex = self.api.connect_ex;
        let mut conn = std::ptr::null_mut();
        // SAFETY: `params` is filled and valid for the call; the strings outlive it.
        let err = self.with_params(req, |params| unsafe {
            connect_ex(params, 1, snapshot.as_ptr(), modes.as_ptr(), &mut conn)
        })?;
        self.conn = if err == sys::VIX_OK {
            conn
        } else {
            std::ptr::null_mut()
        };
        self.check(err, &format!("ConnectEx to {}", self.server))
    }

    /// `PrepareForAccess` (`begin`) or `EndAccess` for the request's VM on vCenter: vSphere
    /// keeps the VM from moving (Storage vMotion) while its disks are read. Skipped, with a
    /// warning, for a library without the call.
    fn access(&mut self, req: &OpenRequest, begin: bool) -> Result<(), String> {
        let (call, name) = if begin {
            (self.api.prepare_for_access, "PrepareForAccess")
        } else {
            (self.api.end_access, "EndAccess")
        };
        let Some(call) = call else {
            eprintln!(
                "warning this VDDK has no {name}: the VM is not kept from moving while it is read"
            );
            return Ok(());
        };
        let identity = cstring("identity", ACCESS_IDENTITY)?;
        // SAFETY: `params` is filled and valid for the call; `identity` outlives it.
        let err = self.with_params(req, |params| unsafe { call(params, identity.as_ptr()) })?;
        self.check(err, &format!("{name} for {} on {}", req.vm, self.server))
    }

    /// Runs `f` with ConnectParams filled from the request (VM, server, thumbprint, user and
    /// password or cookie), then clears and frees them.
    fn with_params<R>(
        &self,
        req: &OpenRequest,
        f: impl FnOnce(*const sys::ConnectParams) -> R,
    ) -> Result<R, String> {
        let text = |what: &str, v: &str| cstring(what, v);
        let vmx = text("vm", &format!("moref={}", req.vm))?;
        let server = text("server", &req.server)?;
        let thumb = text("thumbprint", &req.thumbprint)?;
        let user = req.user.as_deref().map(|u| text("user", u)).transpose()?;
        let secret = match (&req.password, &req.cookie) {
            (Some(p), _) => text("password", p)?,
            (None, Some(c)) => text("cookie", c)?,
            (None, None) => return Err("no password or cookie".into()),
        };
        let owned = self.api.allocate_connect_params.is_none();
        let params: *mut sys::ConnectParams = match self.api.allocate_connect_params {
            // SAFETY: AllocateConnectParams returns a zeroed struct the library owns.
            Some(alloc) => unsafe { alloc() },
            // SAFETY: an all-zero ConnectParams (NULL pointers, zero numbers) is valid.
            None => Box::into_raw(Box::new(unsafe {
                std::mem::zeroed::<sys::ConnectParams>()
            })),
        };
        if params.is_null() {
            return Err("AllocateConnectParams returned NULL".into());
        }
        // SAFETY: `params` is valid and exclusively ours until freed below; the strings it
        // points to live until after `f`.
        let out = unsafe {
            let p = &mut *params;
            p.vmx_spec = vmx.as_ptr().cast_mut();
            p.server_name = server.as_ptr().cast_mut();
            p.thumb_print = thumb.as_ptr().cast_mut();
            p.port = req.port.map_or(0, u32::from);
            p.nfc_host_port = req.nfc_host_port.unwrap_or(0);
            let user = user
                .as_ref()
                .map_or(std::ptr::null_mut(), |u| u.as_ptr().cast_mut());
            if req.password.is_some() {
                p.cred_type = sys::CRED_UID;
                p.creds.uid = sys::UidPasswdCreds {
                    user_name: user,
                    password: secret.as_ptr().cast_mut(),
                };
            } else {
                p.cred_type = sys::CRED_SESSIONID;
                p.creds.session_id = sys::SessionIdCreds {
                    cookie: secret.as_ptr().cast_mut(),
                    user_name: user,
                    key: std::ptr::null_mut(),
                };
            }
            let out = f(params);
            // The library may keep pointers only during the call: clear ours before freeing.
            p.vmx_spec = std::ptr::null_mut();
            p.server_name = std::ptr::null_mut();
            p.thumb_print = std::ptr::null_mut();
            p.creds.reserved = std::ptr::null_mut();
            out
        };
        if owned {
            // SAFETY: allocated by Box above, freed once.
            drop(unsafe { Box::from_raw(params) });
        } else if let Some(free) = self.api.free_connect_params {
            // SAFETY: allocated by AllocateConnectParams, freed once.
            unsafe { free(params) };
        }
        Ok(out)
    }

    /// Reads each `(disk offset, buffer)`: sector-aligned, the buffer's length. Each range is
    /// cut into calls of at most `max_read_blocks` sectors, issued with ReadAsync and awaited
    /// together when the library has it.
    pub fn read(&mut self, reqs: &mut [(u64, &mut [u8])]) -> Result<(), String> {
        // (first sector, sectors, where they go); the buffers outlive every call below.
        let mut pieces: Vec<(u64, u64, *mut u8)> = Vec::new();
        for (offset, buf) in reqs.iter_mut() {
            let (offset, len) = (*offset, buf.len() as u64);
            if offset % sys::SECTOR_SIZE != 0 || len % sys::SECTOR_SIZE != 0 {
                return Err(format!(
                    "read at offset {offset} of {len} bytes is not sector-aligned"
                ));
            }
            let (mut sector, mut left, mut at) =
                (offset / sys::SECTOR_SIZE, len / sys::SECTOR_SIZE, 0);
            while left > 0 {
                let n = left.min(self.max_read);
                // SAFETY: `at + n` sectors stay within `buf` (the loop stops at its length).
                pieces.push((sector, n, unsafe { buf.as_mut_ptr().add(at) }));
                (sector, left, at) = (sector + n, left - n, at + (n * sys::SECTOR_SIZE) as usize);
            }
        }
        match (self.api.read_async, self.api.wait) {
            (Some(read_async), Some(wait)) => self.read_async(&pieces, read_async, wait),
            _ => pieces.iter().try_for_each(|&(sector, n, buf)| {
                // SAFETY: `handle` is open; `buf` points at `n` writable sectors.
                let err = unsafe { (self.api.read)(self.handle, sector, n, buf) };
                self.check(err, &read_what(sector, n))
            }),
        }
    }

    fn read_async(
        &self,
        pieces: &[(u64, u64, *mut u8)],
        read_async: unsafe extern "C" fn(
            sys::Handle,
            u64,
            u64,
            *mut u8,
            sys::CompletionFn,
            *mut c_void,
        ) -> sys::VixError,
        wait: unsafe extern "C" fn(sys::Handle) -> sys::VixError,
    ) -> Result<(), String> {
        // One slot per call; the Vec is never resized while reads are queued.
        let slots: Vec<Slot> = pieces.iter().map(|_| Slot::default()).collect();
        let mut first_err = None;
        for (i, &(sector, n, buf)) in pieces.iter().enumerate() {
            // SAFETY: `buf` points at `n` writable sectors and `slots[i]` lives until Wait
            // returns below; the callback only touches the slot's atomics.
            let err = unsafe {
                read_async(
                    self.handle,
                    sector,
                    n,
                    buf,
                    on_complete,
                    (&slots[i] as *const Slot).cast_mut().cast(),
                )
            };
            if err != sys::VIX_ASYNC && err != sys::VIX_OK {
                first_err = Some(self.check(err, &read_what(sector, n)).unwrap_err());
                break;
            }
            if err == sys::VIX_OK && !slots[i].done.load(Ordering::Acquire) {
                // Completed at once without a callback.
                slots[i].done.store(true, Ordering::Release);
            }
        }
        // SAFETY: `handle` is open; Wait returns once every queued callback has run.
        let err = unsafe { wait(self.handle) };
        if let Some(e) = first_err {
            return Err(e);
        }
        self.check(err, "Wait")?;
        for (slot, &(sector, n, _)) in slots.iter().zip(pieces) {
            if !slot.done.load(Ordering::Acquire) {
                return Err(format!("{} did not complete by Wait", read_what(sector, n)));
            }
            self.check(slot.result.load(Ordering::Acquire), &read_what(sector, n))?;
        }
        Ok(())
    }

    /// Allocated byte ranges from QueryAllocatedBlocks, in chunks of `chunk` sectors.
    pub fn allocated(&self, chunk: u64) -> Allocated {
        let (Some(query), Some(free)) = (self.api.query_allocated_blocks, self.api.free_block_list)
        else {
            return Allocated {
                ranges: None,
                reason: Some(format!(
                    "{} has no QueryAllocatedBlocks",
                    self.api.path.display()
                )),
            };
        };
        let chunk = chunk.max(sys::MIN_CHUNK_SIZE);
        let whole = self.capacity / chunk * chunk;
        let (mut ranges, mut start): (Vec<(u64, u64)>, u64) = (Vec::new(), 0);
        while start < whole {
            let n = (whole - start).min(chunk * sys::MAX_CHUNK_NUMBER);
            let mut list: *mut sys::BlockList = std::ptr::null_mut();
            // SAFETY: `handle` is open; start and n are multiples of `chunk` within the disk.
            let err = unsafe { query(self.handle, start, n, chunk, &mut list) };
            if let Err(e) = self.check(err, "QueryAllocatedBlocks") {
                return Allocated {
                    ranges: None,
                    reason: Some(e),
                };
            }
            // SAFETY: on success `list` holds `num_blocks` entries in place of `blocks`.
            unsafe {
                let count = (*list).num_blocks as usize;
                let blocks = std::ptr::addr_of!((*list).blocks).cast::<sys::Block>();
                for b in std::slice::from_raw_parts(blocks, count) {
                    ranges.push((b.offset * sys::SECTOR_SIZE, b.length * sys::SECTOR_SIZE));
                }
                free(list);
            }
            start += n;
        }
        if whole < self.capacity {
            // A tail shorter than one chunk cannot be queried: count it as data.
            ranges.push((
                whole * sys::SECTOR_SIZE,
                (self.capacity - whole) * sys::SECTOR_SIZE,
            ));
        }
        Allocated {
            ranges: Some(ranges),
            reason: None,
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            // SAFETY: opened by Open, closed once; no reads are in flight (reads wait).
            unsafe { (self.api.close)(self.handle) };
        }
        if !self.conn.is_null() {
            // SAFETY: connected by ConnectEx, disconnected once, after Close.
            unsafe { (self.api.disconnect)(self.conn) };
        }
        if self.initialised {
            // SAFETY: InitEx succeeded; Exit is the last call into the library.
            unsafe { (self.api.exit)() };
        }
    }
}

fn read_what(sector: u64, n: u64) -> String {
    format!(
        "Read of {n} sectors at sector {sector} (offset {})",
        sector * sys::SECTOR_SIZE
    )
}

/// Result of one ReadAsync, set by its callback on a VDDK thread.
#[derive(Default)]
struct Slot {
    result: AtomicU64,
    done: AtomicBool,
}

unsafe extern "C" fn on_complete(data: *mut c_void, result: sys::VixError) {
    // SAFETY: `data` is the `Slot` passed to ReadAsync, alive until Wait returns.
    let slot = unsafe { &*data.cast::<Slot>() };
    slot.result.store(result, Ordering::Release);
    slot.done.store(true, Ordering::Release);
}
