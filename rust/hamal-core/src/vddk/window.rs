//! The read window the engine and a worker share: a memfd both map. The worker's VDDK reads
//! land in it and the engine copies them out, one copy where a pipe would take two. The pipe
//! orders access: the worker writes only between a READ and its reply, the engine reads only
//! after the reply and before its next request.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Where the worker finds the window's memfd.
pub const WINDOW_FD: RawFd = 3;

pub struct Window {
    ptr: *mut u8,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is plain memory owned by this value; access goes through `&self` /
// `&mut self`, so moving it to another thread is sound.
unsafe impl Send for Window {}

impl Window {
    /// A new window of `len` bytes (engine side; the fd is close-on-exec).
    pub fn create(len: usize) -> io::Result<Window> {
        // SAFETY: memfd_create with a static NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"hamal-vddk-window".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor this function owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Self::map(fd, len)
    }

    /// The window passed as `WINDOW_FD` (worker side).
    pub fn inherited() -> io::Result<Window> {
        // SAFETY: the engine started this process with the window's memfd as WINDOW_FD.
        let fd = unsafe { OwnedFd::from_raw_fd(WINDOW_FD) };
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat fills `st` on success.
        if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstat succeeded.
        let len = unsafe { st.assume_init() }.st_size as usize;
        Self::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> io::Result<Window> {
        // SAFETY: a shared read-write mapping of the whole memfd; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Window {
            ptr: ptr.cast(),
            len,
            fd,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` bytes for as long as `self` lives; the protocol keeps the
        // other process from writing while the engine reads.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` makes this the only view in this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no slices outlive `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
