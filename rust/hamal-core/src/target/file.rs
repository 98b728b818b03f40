//! Raw image file or block device as a target. A missing file is created at the source size;
//! a smaller existing target is refused before anything is written. Zero ranges become holes
//! (`FALLOC_FL_PUNCH_HOLE`), zeroed ranges where holes are unsupported, written zeros last.
//! A block device is written with `O_DIRECT` where a write is aligned to its logical blocks,
//! a regular file where a write is also whole chunks (a network source's, not the local copy's
//! pieces): no copy into the host's page cache and no write-back to wait for.

use super::{Target, TargetWriter};
use crate::io::{pwrite_all, BatchIo, IoMode, WriteReq};
use crate::source::file::device_size;
use crate::{Error, Result};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct FileTarget {
    path: PathBuf,
    file: Arc<File>,
    fresh: bool,
    io_mode: IoMode,
    direct: Option<Direct>,
}

/// The target's second descriptor, opened with `O_DIRECT`.
#[derive(Clone)]
struct Direct {
    file: Arc<File>,
    /// The device's logical block size: direct writes start, end and sit in memory on it.
    align: u64,
    /// Shorter writes go through the page cache.
    min_len: usize,
}

/// Writes to a regular file this long or longer go around the page cache: whole chunks from
/// a network source (a restore from a chunk store, a full copy from NBD). Copying each into
/// fresh page-cache pages and writing them back cost a third of the CPU of an 8-disk restore
/// (`copy_folio_from_iter_atomic` in io_uring's workers), CPU the source's server wanted too.
/// The local copy's pieces and small changed ranges still go through the cache.
const FILE_DIRECT_MIN: usize = 1 << 20;

impl Direct {
    /// `None` when the device or file system refuses `O_DIRECT`: writes then go through the
    /// page cache.
    fn open(path: &Path, min_len: usize) -> Option<Direct> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()?;
        let mut size: libc::c_int = 0;
        // SAFETY: BLKSSZGET stores one int through the pointer, which points at `size`.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) };
        let align = if r == 0 { (size as u64).max(512) } else { 4096 };
        Some(Direct {
            file: Arc::new(file),
            align,
            min_len,
        })
    }

    fn fits(&self, r: &WriteReq<'_>) -> bool {
        let a = self.align;
        r.buf.len() >= self.min_len
            && r.offset % a == 0
            && r.buf.len() as u64 % a == 0
            && r.buf.as_ptr() as u64 % a == 0
    }
}

impl FileTarget {
    /// Opens (or creates) the target for a source of `source_size` bytes.
    pub fn open(path: &Path, source_size: u64, io_mode: IoMode) -> Result<FileTarget> {
        let err = |what, e| Error::target_io(path, what, None, e);
        let existing = match std::fs::metadata(path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(err("cannot stat", e)),
        };
        let Some(meta) = existing else {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| err("cannot create", e))?;
            super::lock::lock_target_file(&file, path)?;
            file.set_len(source_size)
                .map_err(|e| err("cannot size new file", e))?;
            return Ok(FileTarget {
                path: path.to_owned(),
                file: Arc::new(file),
                fresh: true,
                io_mode,
                direct: Direct::open(path, FILE_DIRECT_MIN),
            });
        };
        let is_block = meta.file_type().is_block_device();
        if let Some(what) = crate::source::file::not_a_disk(meta.file_type()) {
            return Err(Error::Plan(format!(
                "target {} is {what}, not a disk: give a regular file, a block device or a new file name",
                path.display()
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| err("cannot open for writing", e))?;
        super::lock::lock_target_file(&file, path)?;
        let size = if is_block {
            device_size(&file).map_err(|e| err("cannot get device size", e))?
        } else {
            meta.len()
        };
        if size < source_size {
            return Err(Error::Plan(format!(
                "target {} is smaller than the source: {size} < {source_size} bytes; nothing was written",
                path.display()
            )));
        }
        if size > source_size {
            tracing::warn!(target_path = %path.display(), size, source_size, "target is larger than the source; the tail is left as it is");
        }
        Ok(FileTarget {
            path: path.to_owned(),
            file: Arc::new(file),
            fresh: false,
            io_mode,
            direct: Direct::open(path, if is_block { 0 } else { FILE_DIRECT_MIN }),
        })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on a descriptor we own, with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Target for FileTarget {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn is_fresh(&self) -> bool {
        self.fresh
    }

    fn abandon(&self) {
        if self.fresh {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        let unsupported = |e: &io::Error| {
            matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENODEV)
            )
        };
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let result = match self.fallocate(punch, offset, len) {
            Err(e) if unsupported(&e) => match self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Err(e) if unsupported(&e) => write_zeros(&self.file, offset, len),
                other => other,
            },
            other => other,
        };
        result.map_err(|e| Error::target_io(&self.path, "cannot zero range", Some(offset), e))
    }

    fn flush(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::target_io(&self.path, "fsync failed", None, e))
    }

    fn local_io(&self) -> bool {
        true
    }

    fn joins_writes(&self) -> bool {
        self.direct.as_ref().is_some_and(|d| d.min_len == 0)
    }

    fn writer(&self, depth: u32) -> Result<Box<dyn TargetWriter>> {
        let io = BatchIo::new(self.io_mode, depth).map_err(Error::Plan)?;
        Ok(Box::new(FileWriter {
            file: Arc::clone(&self.file),
            path: self.path.clone(),
            direct: self.direct.clone(),
            io,
            write_behind: true,
            unstarted: None,
            behind: VecDeque::new(),
            behind_bytes: 0,
        }))
    }
}

fn write_zeros(file: &File, mut offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let end = offset + len;
    while offset < end {
        let n = (end - offset).min(zeros.len() as u64) as usize;
        pwrite_all(file.as_raw_fd(), &zeros[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

/// Bytes a writer leaves in write-back before it waits for the oldest of them.
const WRITE_BEHIND_BYTES: u64 = 64 << 20;
/// Contiguous bytes written before their write-back starts: small writes (the local copy's
/// pieces) start it in large runs, as one request to the disk.
const WRITE_BEHIND_STEP: u64 = 4 << 20;

struct FileWriter {
    file: Arc<File>,
    path: PathBuf,
    direct: Option<Direct>,
    io: BatchIo,
    /// Off where the file system has no `sync_file_range`.
    write_behind: bool,
    /// Written, write-back not started yet: contiguous writes join it up to `WRITE_BEHIND_STEP`.
    unstarted: Option<(u64, u64)>,
    /// Ranges written whose write-back has started, oldest first.
    behind: VecDeque<(u64, u64)>,
    behind_bytes: u64,
}

impl FileWriter {
    /// Bounded write-behind: every written range starts its write-back at once, and past
    /// `WRITE_BEHIND_BYTES` the oldest ranges are waited for and dropped from the page cache.
    /// The disk works during the copy, dirty pages stay few (no write throttling, no cache
    /// pollution on the host), and the commit's fdatasync has little left to do.
    ///
    /// A write-back error must fail the sync here: the kernel reports it to this wait and not
    /// again to a later fdatasync on the same file. Where the file system cannot do
    /// `sync_file_range`, write-behind turns itself off.
    /// Errors come with the offset of the range whose write-back failed.
    fn write_behind(&mut self, reqs: &[WriteReq<'_>]) -> Result<(), (u64, io::Error)> {
        if !self.write_behind {
            return Ok(());
        }
        for r in reqs {
            let len = r.buf.len() as u64;
            let run = match self.unstarted.take() {
                Some((at, n)) if at + n == r.offset => (at, n + len),
                Some(other) => {
                    self.start_write_back(other)?;
                    (r.offset, len)
                }
                None => (r.offset, len),
            };
            match run.1 >= WRITE_BEHIND_STEP {
                true => self.start_write_back(run)?,
                false => self.unstarted = Some(run),
            }
        }
        while self.write_behind && self.behind_bytes > WRITE_BEHIND_BYTES {
            let Some((offset, len)) = self.behind.pop_front() else {
                break;
            };
            self.behind_bytes -= len;
            let wait = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            self.sync_range(offset, len, wait)
                .map_err(|e| (offset, e))?;
            crate::io::drop_cached(self.file.as_raw_fd(), offset, len);
        }
        Ok(())
    }

    fn start_write_back(&mut self, (offset, len): (u64, u64)) -> Result<(), (u64, io::Error)> {
        self.sync_range(offset, len, libc::SYNC_FILE_RANGE_WRITE)
            .map_err(|e| (offset, e))?;
        self.behind.push_back((offset, len));
        self.behind_bytes += len;
        Ok(())
    }

    fn sync_range(&mut self, offset: u64, len: u64, flags: libc::c_uint) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        // SAFETY: sync_file_range on a descriptor we own, with plain integer arguments.
        if unsafe { libc::sync_file_range(fd, offset as i64, len as i64, flags) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if matches!(
            e.raw_os_error(),
            Some(libc::ENOSYS | libc::EINVAL | libc::ESPIPE | libc::EOPNOTSUPP)
        ) {
            self.write_behind = false;
            return Ok(());
        }
        Err(e)
    }
}

impl TargetWriter for FileWriter {
    /// A batch of aligned writes goes to the device directly; any other batch through the page
    /// cache, with write-behind (the kernel writes back and drops cached pages a direct write
    /// overlaps, so the two stay coherent, and the commit's fsync flushes both).
    fn write_batch(&mut self, reqs: &[WriteReq<'_>]) -> Result<()> {
        if let Some(d) = self
            .direct
            .as_ref()
            .filter(|d| reqs.iter().all(|r| d.fits(r)))
        {
            match self.io.write_batch(d.file.as_raw_fd(), reqs) {
                Ok(()) => return Ok(()),
                // A device that takes the descriptor but not the writes: page cache from now on
                // (rewriting the batch is harmless, the bytes are the same).
                Err(e) if e.error.raw_os_error() == Some(libc::EINVAL) => self.direct = None,
                Err(e) => {
                    return Err(Error::target_io(
                        &self.path,
                        "write failed",
                        Some(e.offset),
                        e.error,
                    ))
                }
            }
        }
        self.io
            .write_batch(self.file.as_raw_fd(), reqs)
            .map_err(|e| Error::target_io(&self.path, "write failed", Some(e.offset), e.error))?;
        self.write_behind(reqs)
            .map_err(|(at, e)| Error::target_io(&self.path, "write-back failed", Some(at), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::HugeBuf;

    /// Which 4 KiB pages of `file`'s first `len` bytes are in the page cache.
    fn cached_pages(file: &File, len: usize) -> Vec<bool> {
        let fd = file.as_raw_fd();
        // SAFETY: a fresh shared read-only mapping of `len` bytes of an open file; nothing
        // reads through it, and it is unmapped below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        let mut vec = vec![0u8; len.div_ceil(4096)];
        // SAFETY: `map` is a mapping of `len` bytes and `vec` has a byte per page of it.
        let r = unsafe { libc::mincore(map, len, vec.as_mut_ptr()) };
        // SAFETY: unmaps the mapping made above, which nothing uses any more.
        unsafe { libc::munmap(map, len) };
        assert_eq!(r, 0);
        vec.iter().map(|b| b & 1 == 1).collect()
    }

    fn pattern(len: usize, seed: u8) -> HugeBuf {
        let mut b = HugeBuf::zeroed(len);
        b.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = (i % 251) as u8 ^ seed);
        b
    }

    /// A file system with `O_DIRECT` (the crate's directory, not a tmpfs `/tmp`).
    fn scratch() -> tempfile::TempDir {
        tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap()
    }

    #[test]
    fn whole_chunks_go_around_the_page_cache_and_pieces_through_it() {
        const MIB: usize = 1 << 20;
        let dir = scratch();
        let path = dir.path().join("t.raw");
        let target = FileTarget::open(&path, 16 * MIB as u64, IoMode::Auto).unwrap();
        assert!(
            target.direct.is_some(),
            "the test's file system takes O_DIRECT"
        );
        assert!(!target.joins_writes(), "the local copy keeps its pieces");
        let (chunk, piece) = (pattern(4 * MIB, 1), pattern(256 << 10, 2));
        let mut w = target.writer(4).unwrap();
        w.write_batch(&[
            WriteReq {
                offset: 4 * MIB as u64,
                buf: &chunk,
            },
            WriteReq {
                offset: 8 * MIB as u64,
                buf: &chunk[..MIB],
            },
        ])
        .unwrap();
        w.write_batch(&[WriteReq {
            offset: 0,
            buf: &piece,
        }])
        .unwrap();
        target.flush().unwrap();
        let cached = cached_pages(&target.file, 16 * MIB);
        let pages = |from: usize, len: usize| &cached[from / 4096..(from + len) / 4096];
        assert!(pages(0, 256 << 10).iter().all(|&c| c), "a piece is cached");
        assert!(
            !pages(4 * MIB, 5 * MIB).iter().any(|&c| c),
            "chunks are not"
        );
        let back = std::fs::read(&path).unwrap();
        assert_eq!(&back[..256 << 10], &piece[..]);
        assert_eq!(&back[4 * MIB..8 * MIB], &chunk[..]);
        assert_eq!(&back[8 * MIB..9 * MIB], &chunk[..MIB]);
        assert!(back[9 * MIB..].iter().all(|&b| b == 0));
    }

    #[test]
    fn direct_and_cached_writes_of_the_same_bytes_read_back_in_order() {
        const MIB: usize = 1 << 20;
        let dir = scratch();
        let path = dir.path().join("t.raw");
        std::fs::write(&path, vec![7u8; 4 * MIB]).unwrap();
        let target = FileTarget::open(&path, 4 * MIB as u64, IoMode::Auto).unwrap();
        let mut w = target.writer(2).unwrap();
        let (old, new, patch) = (pattern(MIB, 3), pattern(2 * MIB, 4), pattern(4096, 5));
        // Through the cache, then over it directly, then a small patch through the cache.
        let writes: [(u64, &[u8]); 3] = [(0, &old[..MIB / 2]), (0, &new), (MIB as u64, &patch)];
        for (offset, buf) in writes {
            w.write_batch(&[WriteReq { offset, buf }]).unwrap();
        }
        target.flush().unwrap();
        let mut expect = vec![7u8; 4 * MIB];
        for (offset, buf) in writes {
            expect[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        }
        assert_eq!(std::fs::read(&path).unwrap(), expect);
    }
}
