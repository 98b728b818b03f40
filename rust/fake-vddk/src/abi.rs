//! The fake's own mirrors of the VixDiskLib types, written from the header's layout (not
//! shared with hamal's binding, so a layout mistake on either side shows up in the tests).

use std::ffi::{c_char, c_int, c_long, c_void};

pub type VixError = u64;
pub const VIX_OK: VixError = 0;
pub const VIX_E_FAIL: VixError = 1;
pub const VIX_E_INVALID_ARG: VixError = 3;
pub const VIX_E_FILE_NOT_FOUND: VixError = 4;
pub const VIX_E_FILE_ERROR: VixError = 7;
pub const VIX_E_CONNECT_REFUSED: VixError = 18000;
pub const VIX_E_THUMBPRINT: VixError = 18001;
pub const VIX_E_LOGIN: VixError = 18002;
pub const VIX_ASYNC: VixError = 25000;

pub fn error_text(code: VixError) -> &'static str {
    match code & 0xFFFF {
        VIX_E_INVALID_ARG => "One of the parameters was invalid",
        VIX_E_FILE_NOT_FOUND => "The file was not found",
        VIX_E_FILE_ERROR => "A file access error occurred on the host or guest operating system",
        VIX_E_CONNECT_REFUSED => "Cannot connect to host: connection refused",
        VIX_E_THUMBPRINT => "The server's SSL thumbprint does not match the one given",
        VIX_E_LOGIN => "Cannot connect to host: incorrect user name or password",
        VIX_OK => "The operation was successful",
        _ => "Unknown error",
    }
}

pub type LogFn = unsafe extern "C" fn(*const c_char, *mut c_void);
pub type CompletionFn = unsafe extern "C" fn(*mut c_void, VixError);

#[repr(C)]
pub struct ConnectParams {
    pub vmx_spec: *mut c_char,
    pub server_name: *mut c_char,
    pub thumb_print: *mut c_char,
    pub reserved1: c_long,
    pub cred_type: c_int,
    /// union { {user, password}; {cookie, user, key}; void* }: three pointers wide.
    pub creds: [*mut c_char; 3],
    pub port: u32,
    pub nfc_host_port: u32,
    pub reserved2: *mut c_char,
    pub reserved3: [c_char; 8],
    pub reserved4: *mut c_void,
    #[cfg(feature = "vddk67")]
    pub spec: [*mut c_char; 3],
    #[cfg(feature = "vddk67")]
    pub spec_type: c_int,
}

#[repr(C)]
pub struct Info {
    pub bios_geo: [u32; 3],
    pub phys_geo: [u32; 3],
    pub capacity: u64,
    pub adapter_type: c_int,
    pub num_links: c_int,
    pub parent_file_name_hint: *mut c_char,
    pub uuid: *mut c_char,
    #[cfg(feature = "sector_sizes")]
    pub logical_sector_size: u32,
    #[cfg(feature = "sector_sizes")]
    pub physical_sector_size: u32,
}
