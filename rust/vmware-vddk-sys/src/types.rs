//! `#[repr(C)]` mirrors of the VixDiskLib types hamal uses.

use std::ffi::{c_char, c_int, c_long, c_void};

/// A 64-bit error; the low 16 bits are the code (`VIX_ERROR_CODE`).
pub type VixError = u64;
pub const VIX_OK: VixError = 0;
/// `ReadAsync` queued the request; its callback reports the result.
pub const VIX_ASYNC: VixError = 25000;

pub fn error_code(e: VixError) -> u64 {
    e & 0xFFFF
}

/// Reads and `capacity` are in 512-byte sectors.
pub const SECTOR_SIZE: u64 = 512;

/// `VixDiskLib_Open` flags.
pub const OPEN_UNBUFFERED: u32 = 1;
pub const OPEN_SINGLE_LINK: u32 = 2;
pub const OPEN_READ_ONLY: u32 = 4;

/// `QueryAllocatedBlocks`: smallest chunk (in sectors) and most chunks per call.
pub const MIN_CHUNK_SIZE: u64 = 128;
pub const MAX_CHUNK_NUMBER: u64 = 512 * 1024;

/// Opaque handles.
pub type Connection = *mut c_void;
pub type Handle = *mut c_void;

/// `VixDiskLibGenericLogFunc(const char *fmt, va_list args)`. A `va_list` parameter is passed
/// as a pointer on the ABIs hamal supports (x86-64 and AArch64 SysV), so it is typed as one
/// and handed to `vsnprintf` unchanged.
pub type LogFn = unsafe extern "C" fn(fmt: *const c_char, args: *mut c_void);
/// `VixDiskLibCompletionCB(void *cbData, VixError result)`, called from a VDDK thread.
pub type CompletionFn = unsafe extern "C" fn(data: *mut c_void, result: VixError);

/// `VixDiskLibCredType`.
pub const CRED_UID: c_int = 1;
pub const CRED_SESSIONID: c_int = 2;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UidPasswdCreds {
    pub user_name: *mut c_char,
    pub password: *mut c_char,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct SessionIdCreds {
    pub cookie: *mut c_char,
    pub user_name: *mut c_char,
    pub key: *mut c_char,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub union Creds {
    pub uid: UidPasswdCreds,
    pub session_id: SessionIdCreds,
    pub reserved: *mut c_void,
}

/// `VixDiskLibVStorageObjectSpec` (first-class disks; unused by hamal).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VStorageObjectSpec {
    pub id: *mut c_char,
    pub datastore_moref: *mut c_char,
    pub ss_id: *mut c_char,
}

/// `VixDiskLibConnectParams`. `spec` and `spec_type` exist from VDDK 6.7; older libraries read
/// only the fields before them, so a zeroed struct of this (larger) size is valid for all.
#[repr(C)]
pub struct ConnectParams {
    pub vmx_spec: *mut c_char,
    pub server_name: *mut c_char,
    pub thumb_print: *mut c_char,
    pub reserved1: c_long,
    pub cred_type: c_int,
    pub creds: Creds,
    pub port: u32,
    pub nfc_host_port: u32,
    pub reserved2: *mut c_char,
    pub reserved3: [c_char; 8],
    pub reserved4: *mut c_void,
    pub spec: VStorageObjectSpec,
    pub spec_type: c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub cylinders: u32,
    pub heads: u32,
    pub sectors: u32,
}

/// `VixDiskLibInfo`. The two sector-size fields exist only from VDDK 7: read them only when
/// [`crate::Api::major`] is 7 or more.
#[repr(C)]
pub struct Info {
    pub bios_geo: Geometry,
    pub phys_geo: Geometry,
    /// Disk size in sectors.
    pub capacity: u64,
    pub adapter_type: c_int,
    pub num_links: c_int,
    pub parent_file_name_hint: *mut c_char,
    pub uuid: *mut c_char,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
}

/// One allocated range, in sectors.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Block {
    pub offset: u64,
    pub length: u64,
}

/// `VixDiskLibBlockList`: `num_blocks` entries follow in place of `blocks`.
#[repr(C)]
pub struct BlockList {
    pub num_blocks: u32,
    pub blocks: [Block; 1],
}
