//! Positional batch I/O on a file descriptor: io_uring where the kernel allows it, plain
//! `pread`/`pwrite` otherwise. All unsafe code of the data path lives in this module.

mod blocking;
pub mod direct;
mod huge;
pub mod shm;
mod uring;

use std::io;
use std::os::fd::RawFd;
use std::sync::OnceLock;

pub use blocking::{pread_exact, pwrite_all};
pub use huge::{return_large_frees, HugeBuf, OBJECT_ROOM};

/// Which I/O back end a plan asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IoMode {
    /// io_uring if the start-up probe succeeds, else pread/pwrite.
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// Always pread/pwrite (the forced fallback).
    Pread,
}

impl IoMode {
    pub fn parse(s: &str) -> Option<IoMode> {
        match s {
            "auto" => Some(IoMode::Auto),
            "uring" | "io_uring" => Some(IoMode::Uring),
            "pread" => Some(IoMode::Pread),
            _ => None,
        }
    }
}

/// Result of the one-time io_uring probe: `Ok` or why it is unusable here.
pub fn uring_probe() -> &'static Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(uring::probe)
}

/// One read or write of a batch: `buf.len()` bytes at `offset`.
pub struct ReadReq<'a> {
    pub offset: u64,
    pub buf: &'a mut [u8],
}

pub struct WriteReq<'a> {
    pub offset: u64,
    pub buf: &'a [u8],
}

/// A failed request of a batch: its offset and the OS error.
#[derive(Debug)]
pub struct BatchError {
    pub offset: u64,
    pub error: io::Error,
}

/// A per-thread I/O engine; each reader or writer thread owns one.
pub enum BatchIo {
    Uring(Box<uring::Ring>),
    Blocking,
}

impl BatchIo {
    /// Opens an engine of the requested mode with `depth` requests in flight. `Auto` with one
    /// request at a time is plain `pread`/`pwrite`: a ring gains nothing there, and io_uring
    /// hands a buffered write it cannot do at once (a block device's) to a kernel worker thread,
    /// which copies the data on another core.
    pub fn new(mode: IoMode, depth: u32) -> Result<BatchIo, String> {
        let want_uring = match mode {
            IoMode::Pread => false,
            IoMode::Auto => {
                depth > 1
                    && uring_probe().is_ok()
                    && std::env::var_os("HAMAL_FORCE_PREAD").is_none()
            }
            IoMode::Uring => {
                uring_probe()
                    .clone()
                    .map_err(|e| format!("io_uring requested but unusable: {e}"))?;
                true
            }
        };
        if want_uring {
            match uring::Ring::new(depth.max(1)) {
                Ok(r) => return Ok(BatchIo::Uring(Box::new(r))),
                Err(e) if mode == IoMode::Uring => {
                    return Err(format!("io_uring setup failed: {e}"))
                }
                Err(_) => {}
            }
        }
        Ok(BatchIo::Blocking)
    }

    pub fn name(&self) -> &'static str {
        match self {
            BatchIo::Uring(_) => "io_uring",
            BatchIo::Blocking => "pread",
        }
    }

    /// Fills every buffer completely from its offset; a read past the end is an error.
    pub fn read_batch(&mut self, fd: RawFd, reqs: &mut [ReadReq<'_>]) -> Result<(), BatchError> {
        match self {
            BatchIo::Uring(r) => r.read_batch(fd, reqs),
            BatchIo::Blocking => reqs.iter_mut().try_for_each(|r| {
                pread_exact(fd, r.buf, r.offset).map_err(|error| BatchError {
                    offset: r.offset,
                    error,
                })
            }),
        }
    }

    /// Writes every buffer completely at its offset.
    pub fn write_batch(&mut self, fd: RawFd, reqs: &[WriteReq<'_>]) -> Result<(), BatchError> {
        match self {
            BatchIo::Uring(r) => r.write_batch(fd, reqs),
            BatchIo::Blocking => reqs.iter().try_for_each(|r| {
                pwrite_all(fd, r.buf, r.offset).map_err(|error| BatchError {
                    offset: r.offset,
                    error,
                })
            }),
        }
    }
}

/// Drops the clean cached pages of `fd` in `offset..offset + len` (`len` 0: to the end). Freed
/// pages are reused warm by the next writes; fresh page-cache pages each cost a page fault,
/// which dominated the copy on the VMs measured (`tools/bench --only local|backup`).
pub fn drop_cached(fd: RawFd, offset: u64, len: u64) {
    // SAFETY: fadvise takes no pointers; on a descriptor the caller owns it only drops clean
    // pages from the page cache, never data.
    unsafe { libc::posix_fadvise(fd, offset as i64, len as i64, libc::POSIX_FADV_DONTNEED) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    fn roundtrip(mode: IoMode) {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let mut io = BatchIo::new(mode, 4).unwrap();
        let (mut a, mut b) = (vec![0u8; 5000], vec![0u8; 777]);
        let mut reqs = [
            ReadReq {
                offset: 10,
                buf: &mut a,
            },
            ReadReq {
                offset: 99_000,
                buf: &mut b,
            },
        ];
        io.read_batch(f.as_raw_fd(), &mut reqs).unwrap();
        assert_eq!(a, data[10..5010]);
        assert_eq!(b, data[99_000..99_777]);
        let patch = vec![0xAB; 300];
        io.write_batch(
            f.as_raw_fd(),
            &[WriteReq {
                offset: 50,
                buf: &patch,
            }],
        )
        .unwrap();
        let mut c = vec![0u8; 300];
        io.read_batch(
            f.as_raw_fd(),
            &mut [ReadReq {
                offset: 50,
                buf: &mut c,
            }],
        )
        .unwrap();
        assert_eq!(c, patch);
        let mut past = vec![0u8; 10];
        let err = io
            .read_batch(
                f.as_raw_fd(),
                &mut [ReadReq {
                    offset: 99_995,
                    buf: &mut past,
                }],
            )
            .unwrap_err();
        assert_eq!(err.offset, 99_995);
        assert_eq!(err.error.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn pread_fallback_roundtrip() {
        roundtrip(IoMode::Pread);
    }

    #[test]
    fn auto_roundtrip() {
        roundtrip(IoMode::Auto);
    }

    /// Under tools/test (`HAMAL_TEST_REQUIRE_ALL=1`, as in CI) io_uring must work; elsewhere
    /// its absence is said and the test passes on the pread path alone.
    #[test]
    fn uring_roundtrip_when_available() {
        match uring_probe() {
            Ok(()) => roundtrip(IoMode::Uring),
            Err(e) if std::env::var("HAMAL_TEST_REQUIRE_ALL").as_deref() == Ok("1") => {
                panic!("io_uring is unavailable and tools/test requires it: {e}")
            }
            Err(e) => eprintln!("io_uring unavailable here, uring-only test skipped: {e}"),
        }
    }
}
