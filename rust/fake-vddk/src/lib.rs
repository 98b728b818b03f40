//! A fake `libvixDiskLib.so` for hamal's tests: the VixDiskLib C API over local raw files.
//!
//! Built by the tests in variants (Cargo features: `v8` has every symbol hamal uses, no
//! features is a VDDK 6 without the optional ones, `no_read` lacks a required symbol) and
//! never shipped. Disk paths map to files: `[datastore] dir/disk.vmdk` is
//! `$FAKE_VDDK_ROOT/dir/disk.vmdk`. Every call is recorded in `$FAKE_VDDK_LOG`; faults come
//! from `$FAKE_VDDK_FAIL` (see `record::Faults`).

// The exported names and the `unsafe extern "C"` contract are VDDK's.
#![allow(non_snake_case, clippy::missing_safety_doc)]
// Variants built without the optional symbols leave their helpers unused.
#![cfg_attr(any(not(feature = "v8"), feature = "no_read"), allow(dead_code))]

mod abi;
mod disk;
mod record;

use abi::*;
use disk::Disk;
use record::{env, faults, record};
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::PathBuf;
use std::sync::Mutex;

static LOGGER: Mutex<Option<LogFn>> = Mutex::new(None);

/// A string argument, or "" for NULL.
unsafe fn text(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the caller passes a NUL-terminated string, per the VDDK API.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Sends one message through the log function given to InitEx. The message has no
/// conversions, so the `va_list` is never read; a zeroed one stands in.
fn log(msg: &str) {
    let Some(f) = *LOGGER.lock().unwrap() else {
        return;
    };
    let msg = CString::new(msg.replace('%', "%%")).unwrap();
    let mut va = [0u64; 4];
    // SAFETY: `f` is the caller's log function; the format has no conversions.
    unsafe { f(msg.as_ptr(), va.as_mut_ptr().cast()) };
}

#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_InitEx(
    major: u32,
    minor: u32,
    log_fn: Option<LogFn>,
    _warn: Option<LogFn>,
    _panic: Option<LogFn>,
    lib_dir: *const c_char,
    config: *const c_char,
) -> VixError {
    // SAFETY: NUL-terminated strings or NULL, per the API.
    let (dir, conf) = unsafe { (text(lib_dir), text(config)) };
    record(&format!(
        "InitEx major={major} minor={minor} libdir={dir} config={conf}"
    ));
    if faults().init {
        return VIX_E_FAIL;
    }
    *LOGGER.lock().unwrap() = log_fn;
    log(&format!(
        "fake VixDiskLib {major}.{minor} initialised (100% fake)"
    ));
    VIX_OK
}

#[no_mangle]
pub extern "C" fn VixDiskLib_Exit() {
    record("Exit");
    *LOGGER.lock().unwrap() = None;
}

#[no_mangle]
pub extern "C" fn VixDiskLib_GetErrorText(err: VixError, _locale: *const c_char) -> *mut c_char {
    CString::new(error_text(err)).unwrap().into_raw()
}

#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_FreeErrorText(p: *mut c_char) {
    if !p.is_null() {
        // SAFETY: `p` came from GetErrorText's `into_raw`.
        drop(unsafe { CString::from_raw(p) });
    }
}

struct Conn {
    snapshot: String,
}

#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_ConnectEx(
    p: *const ConnectParams,
    read_only: c_char,
    snapshot: *const c_char,
    modes: *const c_char,
    out: *mut *mut c_void,
) -> VixError {
    // SAFETY: the caller passes a valid ConnectParams and strings, per the API.
    let p = unsafe { &*p };
    // SAFETY: as above; each field is a string or NULL.
    let (vm, server, thumb, snap, modes) = unsafe {
        (
            text(p.vmx_spec),
            text(p.server_name),
            text(p.thumb_print),
            text(snapshot),
            text(modes),
        )
    };
    let (cred, user, secret) = match p.cred_type {
        // SAFETY: `creds` holds {user, password} for a UID login.
        1 => ("uid", unsafe { text(p.creds[0]) }, unsafe {
            text(p.creds[1])
        }),
        // SAFETY: `creds` holds {cookie, user, key} for a session login.
        2 => ("session", unsafe { text(p.creds[1]) }, unsafe {
            text(p.creds[0])
        }),
        _ => ("unknown", String::new(), String::new()),
    };
    record(&format!(
        "ConnectEx server={server} port={} vm={vm} snapshot={snap} transports={modes} readonly={read_only} cred={cred} user={user} thumbprint={thumb} secret_len={}",
        p.port,
        secret.len()
    ));
    log(&format!("connecting to {server}"));
    if faults().connect {
        return VIX_E_CONNECT_REFUSED;
    }
    if env("FAKE_VDDK_THUMBPRINT").is_some_and(|t| !t.eq_ignore_ascii_case(&thumb)) {
        return VIX_E_THUMBPRINT;
    }
    if env("FAKE_VDDK_PASSWORD").is_some_and(|pw| pw != secret) {
        return VIX_E_LOGIN;
    }
    // SAFETY: `out` is the caller's out-parameter.
    unsafe { *out = Box::into_raw(Box::new(Conn { snapshot: snap })).cast() };
    VIX_OK
}

/// PrepareForAccess / EndAccess: recorded with the VM and identity; the thumbprint is checked
/// as ConnectEx does; `FAKE_VDDK_FAIL=access` refuses them.
unsafe fn access(call: &str, p: *const ConnectParams, identity: *const c_char) -> VixError {
    // SAFETY: the caller passes a valid ConnectParams and string, per the API.
    let (vm, thumb, identity) = unsafe {
        let p = &*p;
        (text(p.vmx_spec), text(p.thumb_print), text(identity))
    };
    record(&format!("{call} vm={vm} identity={identity}"));
    if faults().access {
        return VIX_E_CONNECT_REFUSED;
    }
    if env("FAKE_VDDK_THUMBPRINT").is_some_and(|t| !t.eq_ignore_ascii_case(&thumb)) {
        return VIX_E_THUMBPRINT;
    }
    VIX_OK
}

#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_PrepareForAccess(
    p: *const ConnectParams,
    identity: *const c_char,
) -> VixError {
    // SAFETY: forwarded as the caller gave them.
    unsafe { access("PrepareForAccess", p, identity) }
}

#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_EndAccess(
    p: *const ConnectParams,
    identity: *const c_char,
) -> VixError {
    // SAFETY: forwarded as the caller gave them.
    unsafe { access("EndAccess", p, identity) }
}

#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Disconnect(conn: *mut c_void) -> VixError {
    record("Disconnect");
    if !conn.is_null() {
        // SAFETY: `conn` came from ConnectEx and is disconnected once.
        drop(unsafe { Box::from_raw(conn.cast::<Conn>()) });
    }
    VIX_OK
}

#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Open(
    conn: *mut c_void,
    path: *const c_char,
    flags: u32,
    out: *mut *mut c_void,
) -> VixError {
    // SAFETY: a string per the API; `conn` came from ConnectEx.
    let (path, conn) = unsafe { (text(path), &*conn.cast::<Conn>()) };
    record(&format!(
        "Open path={} flags={flags} snapshot={}",
        path.replace(' ', "%20"),
        conn.snapshot
    ));
    let file = match path.strip_prefix('[').and_then(|p| p.split_once("] ")) {
        Some((_ds, rel)) => PathBuf::from(env("FAKE_VDDK_ROOT").unwrap_or_default()).join(rel),
        None => PathBuf::from(&path),
    };
    if faults().open {
        return VIX_E_FILE_NOT_FOUND;
    }
    let Ok(disk) = std::fs::File::open(&file).and_then(Disk::new) else {
        return VIX_E_FILE_NOT_FOUND;
    };
    // SAFETY: `out` is the caller's out-parameter.
    unsafe { *out = Box::into_raw(Box::new(disk)).cast() };
    VIX_OK
}

#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Close(h: *mut c_void) -> VixError {
    record("Close");
    if !h.is_null() {
        // SAFETY: `h` came from Open and is closed once.
        drop(unsafe { Box::from_raw(h.cast::<Disk>()) });
    }
    VIX_OK
}

#[no_mangle]
pub extern "C" fn VixDiskLib_GetTransportMode(_h: *mut c_void) -> *const c_char {
    c"nbdssl".as_ptr()
}

#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_GetInfo(h: *mut c_void, out: *mut *mut Info) -> VixError {
    // SAFETY: `h` came from Open.
    let disk = unsafe { &*h.cast::<Disk>() };
    record("GetInfo");
    let info = Info {
        bios_geo: [0; 3],
        phys_geo: [0; 3],
        capacity: disk.sectors,
        adapter_type: 3,
        num_links: 1,
        parent_file_name_hint: std::ptr::null_mut(),
        uuid: std::ptr::null_mut(),
        #[cfg(feature = "sector_sizes")]
        logical_sector_size: 512,
        #[cfg(feature = "sector_sizes")]
        physical_sector_size: 4096,
    };
    // SAFETY: `out` is the caller's out-parameter.
    unsafe { *out = Box::into_raw(Box::new(info)) };
    VIX_OK
}

#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_FreeInfo(info: *mut Info) {
    if !info.is_null() {
        // SAFETY: `info` came from GetInfo.
        drop(unsafe { Box::from_raw(info) });
    }
}

/// The buffer of a read of `count` sectors.
unsafe fn sectors<'a>(buf: *mut u8, count: u64) -> &'a mut [u8] {
    // SAFETY: the caller passes `count` sectors of writable memory, per the API.
    unsafe { std::slice::from_raw_parts_mut(buf, (count * disk::SECTOR) as usize) }
}

#[cfg(not(feature = "no_read"))]
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Read(
    h: *mut c_void,
    start: u64,
    count: u64,
    buf: *mut u8,
) -> VixError {
    record(&format!("Read start={start} n={count}"));
    // SAFETY: `h` came from Open; `buf` holds `count` sectors.
    let (disk, buf) = unsafe { (&*h.cast::<Disk>(), sectors(buf, count)) };
    Disk::read(&disk.file, disk.sectors, start, count, buf)
}

#[cfg(feature = "async")]
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_ReadAsync(
    h: *mut c_void,
    start: u64,
    count: u64,
    buf: *mut u8,
    cb: CompletionFn,
    data: *mut c_void,
) -> VixError {
    record(&format!("ReadAsync start={start} n={count}"));
    // SAFETY: `h` came from Open and is not closed while reads are queued.
    let disk = unsafe { &mut *h.cast::<Disk>() };
    disk.queue(start, count, buf, cb, data);
    VIX_ASYNC
}

#[cfg(feature = "async")]
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Wait(h: *mut c_void) -> VixError {
    record("Wait");
    // SAFETY: `h` came from Open.
    unsafe { &*h.cast::<Disk>() }.wait();
    VIX_OK
}

#[cfg(feature = "vddk67")]
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_QueryAllocatedBlocks(
    h: *mut c_void,
    start: u64,
    count: u64,
    chunk: u64,
    out: *mut *mut c_void,
) -> VixError {
    record(&format!(
        "QueryAllocatedBlocks start={start} n={count} chunk={chunk}"
    ));
    // SAFETY: `h` came from Open.
    let disk = unsafe { &*h.cast::<Disk>() };
    let bad = chunk < 128 || start % chunk != 0 || count % chunk != 0 || count / chunk > 512 * 1024;
    if bad || start + count > disk.sectors {
        return VIX_E_INVALID_ARG;
    }
    if faults().query {
        return VIX_E_FAIL;
    }
    let blocks = disk.allocated(start, count, chunk);
    // struct { uint32_t numBlocks; (pad) struct { uint64_t offset, length; } blocks[]; }
    let size = 8 + 16 * blocks.len().max(1);
    // SAFETY: malloc of a plain buffer, filled below and freed by FreeBlockList.
    let list = unsafe { libc::calloc(1, size) }.cast::<u8>();
    if list.is_null() {
        return VIX_E_FAIL;
    }
    // SAFETY: `list` has `size` bytes, 8-aligned (malloc), room for the header and blocks.
    unsafe {
        list.cast::<u32>().write(blocks.len() as u32);
        for (i, (off, len)) in blocks.iter().enumerate() {
            let b = list.add(8 + 16 * i).cast::<u64>();
            b.write(*off);
            b.add(1).write(*len);
        }
        *out = list.cast();
    }
    VIX_OK
}

#[cfg(feature = "vddk67")]
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_FreeBlockList(list: *mut c_void) -> VixError {
    // SAFETY: `list` came from QueryAllocatedBlocks' calloc.
    unsafe { libc::free(list) };
    VIX_OK
}

#[cfg(feature = "vddk67")]
#[no_mangle]
pub extern "C" fn VixDiskLib_AllocateConnectParams() -> *mut ConnectParams {
    record("AllocateConnectParams");
    // SAFETY: an all-zero ConnectParams (NULL pointers, zero numbers) is valid.
    Box::into_raw(Box::new(unsafe { std::mem::zeroed::<ConnectParams>() }))
}

#[cfg(feature = "vddk67")]
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_FreeConnectParams(p: *mut ConnectParams) {
    record("FreeConnectParams");
    if !p.is_null() {
        // SAFETY: `p` came from AllocateConnectParams.
        drop(unsafe { Box::from_raw(p) });
    }
}
