//! VDDK's log functions (`InitEx`'s log, warn and panic callbacks): each message is formatted
//! with `vsnprintf` and written to the worker's stderr as `LEVEL vddk: text`, which the engine
//! forwards into its own log.

use std::ffi::{c_char, c_int, c_void, CStr};

extern "C" {
    /// `vsnprintf` with the `va_list` passed on as the pointer it is on this ABI.
    fn vsnprintf(buf: *mut c_char, n: usize, fmt: *const c_char, args: *mut c_void) -> c_int;
}

/// Formats a VDDK log message and writes it to stderr as `LEVEL vddk: text`; the engine reads
/// those lines into its log.
unsafe fn emit(level: &str, fmt: *const c_char, args: *mut c_void) {
    if fmt.is_null() {
        return;
    }
    let mut buf = [0 as c_char; 2048];
    // SAFETY: `fmt` and `args` are the pair VDDK passed to its log function; `buf` bounds the
    // output and vsnprintf NUL-terminates it.
    unsafe { vsnprintf(buf.as_mut_ptr(), buf.len(), fmt, args) };
    // SAFETY: NUL-terminated by vsnprintf.
    let msg = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
    for line in msg.lines().filter(|l| !l.trim().is_empty()) {
        eprintln!("{level} vddk: {}", line.trim_end());
    }
}

pub(super) unsafe extern "C" fn log_debug(fmt: *const c_char, args: *mut c_void) {
    // SAFETY: forwarded from VDDK unchanged.
    unsafe { emit("debug", fmt, args) }
}

pub(super) unsafe extern "C" fn log_warn(fmt: *const c_char, args: *mut c_void) {
    // SAFETY: forwarded from VDDK unchanged.
    unsafe { emit("warn", fmt, args) }
}

pub(super) unsafe extern "C" fn log_panic(fmt: *const c_char, args: *mut c_void) {
    // SAFETY: forwarded from VDDK unchanged.
    unsafe { emit("error", fmt, args) }
}
