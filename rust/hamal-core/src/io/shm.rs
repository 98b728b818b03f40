//! Memory shared with a child process: a memfd both map. The VDDK worker reads into it, so data
//! crosses the process boundary without a pipe's copies: into the engine's own chunk buffers
//! when they live in shared memory (the buffer pool's arena), else into a small window the
//! engine copies out of. A request/reply pipe orders access: the worker writes only between a
//! READ and its reply; the engine touches that memory only before the request and after the
//! reply.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub struct SharedMem {
    ptr: *mut u8,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is plain memory owned by this value. Shared access to disjoint parts
// goes through `slice_mut`, whose callers guarantee exclusivity (the buffer pool hands each
// slot to one buffer at a time).
unsafe impl Send for SharedMem {}
// SAFETY: as above.
unsafe impl Sync for SharedMem {}

impl SharedMem {
    /// A new shared mapping of `len` bytes (the fd is close-on-exec).
    pub fn create(len: usize) -> io::Result<SharedMem> {
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

    /// The mapping whose memfd this process inherited as `fd`.
    ///
    /// # Safety
    /// `fd` must be a memfd this process owns and nothing else uses.
    pub unsafe fn inherited(fd: RawFd) -> io::Result<SharedMem> {
        // SAFETY: per this function's contract.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat fills `st` on success.
        if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstat succeeded.
        let len = unsafe { st.assume_init() }.st_size as usize;
        Self::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> io::Result<SharedMem> {
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
        Ok(SharedMem {
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

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where `buf` starts in this mapping, if it lies wholly inside it.
    pub fn offset_of(&self, buf: &[u8]) -> Option<u64> {
        let (start, base) = (buf.as_ptr() as usize, self.ptr as usize);
        (start >= base && start + buf.len() <= base + self.len).then(|| (start - base) as u64)
    }

    /// `len` bytes at `offset`.
    pub fn slice(&self, offset: usize, len: usize) -> &[u8] {
        &self.bytes()[offset..offset + len]
    }

    /// `len` bytes at `offset`, writable through a shared reference.
    ///
    /// # Safety
    /// No other live slice may overlap this one (in this process).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset + len <= self.len, "slice outside the shared mapping");
        // SAFETY: inside the mapping (checked); exclusive per this function's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) }
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

impl Drop for SharedMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no slices outlive `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
