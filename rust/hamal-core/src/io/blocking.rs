//! Plain positional I/O, used as the fallback and to finish short io_uring transfers.

use std::io;
use std::os::fd::RawFd;

/// Reads exactly `buf.len()` bytes at `offset`; hitting the end of file is `UnexpectedEof`.
pub fn pread_exact(fd: RawFd, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a valid, writable slice of `buf.len()` bytes for the whole call.
        let n = unsafe {
            libc::pread(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                offset as libc::off_t,
            )
        };
        match n {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past the end",
                ))
            }
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => {
                buf = &mut buf[n as usize..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

/// Writes all of `buf` at `offset`.
pub fn pwrite_all(fd: RawFd, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a valid, readable slice of `buf.len()` bytes for the whole call.
        let n = unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), offset as libc::off_t) };
        match n {
            0 => return Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0")),
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => {
                buf = &buf[n as usize..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}
