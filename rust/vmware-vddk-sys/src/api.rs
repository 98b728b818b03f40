//! The symbol table: one list of required and optional functions drives the loader.

use crate::types::*;
use libloading::Library;
use std::ffi::{c_char, c_void, CStr};
use std::path::{Path, PathBuf};

/// Library versions probed, newest first (`libvixDiskLib.so.N`).
pub const SONAME_VERSIONS: [u32; 4] = [9, 8, 7, 6];

macro_rules! vddk_api {
    (
        required { $($req:ident = $rsym:literal: fn($($rarg:ty),*) $(-> $rret:ty)?;)* }
        optional { $($opt:ident = $osym:literal: fn($($oarg:ty),*) $(-> $oret:ty)?;)* }
    ) => {
        /// Function pointers into a loaded VixDiskLib; valid while this value lives.
        pub struct Api {
            $(pub $req: unsafe extern "C" fn($($rarg),*) $(-> $rret)?,)*
            $(pub $opt: Option<unsafe extern "C" fn($($oarg),*) $(-> $oret)?>,)*
            /// The soname's version (`libvixDiskLib.so.8` -> 8).
            pub major: u32,
            pub path: PathBuf,
            _lib: Library,
        }

        impl Api {
            fn resolve(lib: Library, path: PathBuf, major: u32) -> Result<Api, String> {
                $(
                    // SAFETY: the pointer type is the prototype from vixDiskLib.h.
                    let $req = *unsafe {
                        lib.get::<unsafe extern "C" fn($($rarg),*) $(-> $rret)?>(
                            concat!($rsym, "\0").as_bytes(),
                        )
                    }
                    .map_err(|e| format!("{} lacks the required symbol {}: {e}", path.display(), $rsym))?;
                )*
                $(
                    // SAFETY: as above; a missing optional symbol is `None`.
                    let $opt = unsafe {
                        lib.get::<unsafe extern "C" fn($($oarg),*) $(-> $oret)?>(
                            concat!($osym, "\0").as_bytes(),
                        )
                    }
                    .ok()
                    .map(|s| *s);
                )*
                Ok(Api { $($req,)* $($opt,)* major, path, _lib: lib })
            }

            /// Names of the optional symbols this library has.
            pub fn optional_present(&self) -> Vec<&'static str> {
                let mut v = Vec::new();
                $( if self.$opt.is_some() { v.push($osym); } )*
                v
            }
        }
    };
}

vddk_api! {
    required {
        init_ex = "VixDiskLib_InitEx": fn(u32, u32, Option<LogFn>, Option<LogFn>, Option<LogFn>, *const c_char, *const c_char) -> VixError;
        exit = "VixDiskLib_Exit": fn();
        get_error_text = "VixDiskLib_GetErrorText": fn(VixError, *const c_char) -> *mut c_char;
        free_error_text = "VixDiskLib_FreeErrorText": fn(*mut c_char);
        connect_ex = "VixDiskLib_ConnectEx": fn(*const ConnectParams, c_char, *const c_char, *const c_char, *mut Connection) -> VixError;
        open = "VixDiskLib_Open": fn(Connection, *const c_char, u32, *mut Handle) -> VixError;
        get_transport_mode = "VixDiskLib_GetTransportMode": fn(Handle) -> *const c_char;
        get_info = "VixDiskLib_GetInfo": fn(Handle, *mut *mut Info) -> VixError;
        free_info = "VixDiskLib_FreeInfo": fn(*mut Info);
        read = "VixDiskLib_Read": fn(Handle, u64, u64, *mut u8) -> VixError;
        close = "VixDiskLib_Close": fn(Handle) -> VixError;
        disconnect = "VixDiskLib_Disconnect": fn(Connection) -> VixError;
    }
    optional {
        // VDDK 5.0
        prepare_for_access = "VixDiskLib_PrepareForAccess": fn(*const ConnectParams, *const c_char) -> VixError;
        end_access = "VixDiskLib_EndAccess": fn(*const ConnectParams, *const c_char) -> VixError;
        // VDDK 6.0
        read_async = "VixDiskLib_ReadAsync": fn(Handle, u64, u64, *mut u8, CompletionFn, *mut c_void) -> VixError;
        wait = "VixDiskLib_Wait": fn(Handle) -> VixError;
        // VDDK 6.7
        query_allocated_blocks = "VixDiskLib_QueryAllocatedBlocks": fn(Handle, u64, u64, u64, *mut *mut BlockList) -> VixError;
        free_block_list = "VixDiskLib_FreeBlockList": fn(*mut BlockList) -> VixError;
        allocate_connect_params = "VixDiskLib_AllocateConnectParams": fn() -> *mut ConnectParams;
        free_connect_params = "VixDiskLib_FreeConnectParams": fn(*mut ConnectParams);
    }
}

impl Api {
    /// Loads the newest `libvixDiskLib.so.N` under `<libdir>/lib64`. Errors name the directory
    /// probed, the file, or the missing symbol.
    pub fn load(libdir: &Path) -> Result<Api, String> {
        let lib64 = libdir.join("lib64");
        for major in SONAME_VERSIONS {
            let path = lib64.join(format!("libvixDiskLib.so.{major}"));
            if !path.exists() {
                continue;
            }
            // SAFETY: loading runs VixDiskLib's initialisers; the caller is a process started
            // only to host VDDK, with VDDK's own lib64 first on its library path.
            let lib = unsafe { Library::new(&path) }
                .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
            return Api::resolve(lib, path, major);
        }
        let names: Vec<String> = SONAME_VERSIONS.iter().map(|v| format!(".{v}")).collect();
        Err(format!(
            "no VDDK in {}: found none of libvixDiskLib.so{}",
            lib64.display(),
            names.join(", ")
        ))
    }

    /// The library's text for `err`, with its code.
    pub fn error_text(&self, err: VixError) -> String {
        // SAFETY: GetErrorText takes any error value and a NULL locale; it returns NULL or a
        // NUL-terminated string that must go back through FreeErrorText.
        let text = unsafe { (self.get_error_text)(err, std::ptr::null()) };
        let msg = if text.is_null() {
            "unknown error".to_owned()
        } else {
            // SAFETY: non-NULL, NUL-terminated, alive until FreeErrorText below.
            let s = unsafe { CStr::from_ptr(text) }
                .to_string_lossy()
                .trim()
                .to_owned();
            // SAFETY: `text` came from GetErrorText and is freed once.
            unsafe { (self.free_error_text)(text) };
            s
        };
        format!("{msg} (VDDK error {})", error_code(err))
    }
}
