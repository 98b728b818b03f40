//! Raw image file or block device as a source. Allocation comes from SEEK_DATA/SEEK_HOLE
//! (the whole range where the file system or device does not support it).

use super::{Source, SourceReader};
use crate::extent::{Extent, ExtentMap};
use crate::io::{BatchIo, IoMode, ReadReq};
use crate::{Error, Result};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct FileSource {
    path: PathBuf,
    file: Arc<File>,
    size: u64,
    is_block: bool,
    identity: String,
    io_mode: IoMode,
}

impl FileSource {
    pub fn open(path: &Path, io_mode: IoMode) -> Result<FileSource> {
        let err = |what, e| Error::source_io(path, what, None, e);
        // Look before opening: opening a FIFO would wait for a writer forever.
        let kind = std::fs::metadata(path).map_err(|e| err("cannot open", e))?;
        if let Some(what) = not_a_disk(kind.file_type()) {
            return Err(Error::Plan(format!(
                "source {} is {what}, not a disk: give a regular file or a block device",
                path.display()
            )));
        }
        let file = File::open(path).map_err(|e| err("cannot open", e))?;
        let meta = file.metadata().map_err(|e| err("cannot stat", e))?;
        let is_block = meta.file_type().is_block_device();
        if !is_block && !meta.is_file() {
            return Err(err(
                "not a regular file or block device",
                io::Error::from(io::ErrorKind::InvalidInput),
            ));
        }
        let size = if is_block {
            device_size(&file).map_err(|e| err("cannot get device size", e))?
        } else {
            meta.len()
        };
        let identity = if is_block {
            format!("blockdev:{}:{}:{}", path.display(), meta.rdev(), size)
        } else {
            format!(
                "file:{}:{}:{}:{}.{}",
                path.display(),
                meta.ino(),
                size,
                meta.mtime(),
                meta.mtime_nsec()
            )
        };
        Ok(FileSource {
            path: path.to_owned(),
            file: Arc::new(file),
            size,
            is_block,
            identity,
            io_mode,
        })
    }
}

/// What a file that cannot be a disk is ("a FIFO"), or `None` for a regular file or block device.
pub(crate) fn not_a_disk(ft: std::fs::FileType) -> Option<&'static str> {
    if ft.is_file() || ft.is_block_device() {
        None
    } else if ft.is_dir() {
        Some("a directory")
    } else if ft.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if ft.is_socket() {
        Some("a socket")
    } else if ft.is_char_device() {
        Some("a character device")
    } else {
        Some("not a regular file or block device")
    }
}

/// Size of a block device (or any seekable file) by seeking to its end.
pub(crate) fn device_size(file: &File) -> io::Result<u64> {
    // SAFETY: lseek on a descriptor we own; it only moves this descriptor's file offset, which
    // nothing else in the data path uses (all I/O is positional).
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(end as u64)
}

/// Data extents by SEEK_DATA/SEEK_HOLE; `None` when the file system does not support them.
fn seek_data_extents(fd: RawFd, size: u64) -> io::Result<Option<ExtentMap>> {
    let seek = |off: u64, whence| {
        // SAFETY: lseek on a valid descriptor; only the descriptor's offset changes (unused).
        let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    };
    let mut map = ExtentMap::new();
    let mut pos = 0;
    while pos < size {
        let data = match seek(pos, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break, // no data after pos
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && pos == 0 => return Ok(None),
            Err(e) => return Err(e),
        };
        if data >= size {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.min(size);
        map.push(Extent::new(data, hole - data));
        pos = hole;
    }
    Ok(Some(map))
}

impl Source for FileSource {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn allocated(&self) -> Result<ExtentMap> {
        if self.is_block {
            return Ok(ExtentMap::whole(self.size));
        }
        let found = seek_data_extents(self.file.as_raw_fd(), self.size)
            .map_err(|e| Error::source_io(&self.path, "cannot map allocated extents", None, e))?;
        Ok(found.unwrap_or_else(|| ExtentMap::whole(self.size)))
    }

    fn identity(&self) -> Option<String> {
        Some(self.identity.clone())
    }

    fn local_io(&self) -> bool {
        true
    }

    fn reader(&self, depth: u32) -> Result<Box<dyn SourceReader>> {
        let io = BatchIo::new(self.io_mode, depth).map_err(Error::Plan)?;
        Ok(Box::new(FileReader {
            file: Arc::clone(&self.file),
            path: self.path.clone(),
            io,
        }))
    }
}

struct FileReader {
    file: Arc<File>,
    path: PathBuf,
    io: BatchIo,
}

impl SourceReader for FileReader {
    fn read_batch(&mut self, reqs: &mut [ReadReq<'_>]) -> Result<()> {
        self.io
            .read_batch(self.file.as_raw_fd(), reqs)
            .map_err(|e| Error::source_io(&self.path, "read failed", Some(e.offset), e.error))
    }

    fn backend(&self) -> &'static str {
        self.io.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn sparse_file_reports_data_extents_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.raw");
        let f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1u8; 1 << 20], 8 << 20).unwrap();
        f.write_all_at(&[2u8; 1 << 20], 40 << 20).unwrap();
        drop(f);
        let src = FileSource::open(&p, IoMode::Auto).unwrap();
        assert_eq!(src.size(), 64 << 20);
        let alloc = src.allocated().unwrap();
        // File systems may round extents up to their block size, never down.
        let want = ExtentMap::from_extents([
            Extent::new(8 << 20, 1 << 20),
            Extent::new(40 << 20, 1 << 20),
        ]);
        assert_eq!(want.subtract(&alloc), ExtentMap::new());
        assert!(
            alloc.total_len() < 8 << 20,
            "holes were reported as data: {alloc:?}"
        );
    }

    #[test]
    fn missing_source_names_the_path() {
        let err = FileSource::open(Path::new("/nonexistent/disk.raw"), IoMode::Auto)
            .err()
            .unwrap();
        let msg = err.to_string();
        assert!(
            msg.contains("/nonexistent/disk.raw") && msg.contains("cannot open"),
            "{msg}"
        );
    }
}
