//! Whole files written and read around the page cache (`O_DIRECT`). Fresh page-cache pages
//! cost a page fault each on the VMs measured, and a chunk store's object is written once and
//! read back only by a restore: its 4 MiB went through the cache only to be flushed and
//! dropped, and a restore copied it from the cache into its own buffer.

use super::HugeBuf;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// The alignment asked of `O_DIRECT` buffers, offsets and lengths (a page: every common
/// logical block size divides it).
const BLOCK: usize = 4096;
/// Smaller files (index pages, records) are cheaper through the page cache.
const MIN_LEN: usize = 256 << 10;

/// Whether `data` can be written directly: large, and starting on a page boundary (object
/// buffers are `HugeBuf`s).
fn fits(data: &[u8]) -> bool {
    data.len() >= MIN_LEN && (data.as_ptr() as usize) % BLOCK == 0
}

/// Creates (or empties) `path` and writes `data` into it, not synced: with `O_DIRECT` where
/// `data` fits and the file system allows it (tmpfs before Linux 6.6 does not), else through
/// the page cache.
pub fn write_new(path: &Path, data: &[u8]) -> io::Result<File> {
    if fits(data) {
        match write_direct(path, data) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            written => return written,
        }
    }
    let mut f = File::create(path)?;
    f.write_all(data)?;
    Ok(f)
}

/// `write_new` with `O_DIRECT`: the whole blocks straight from `data`, the last partial one
/// from a zero-padded copy, then the file is cut to `data.len()`.
fn write_direct(path: &Path, data: &[u8]) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let whole = data.len() / BLOCK * BLOCK;
    f.write_all_at(&data[..whole], 0)?;
    let tail = &data[whole..];
    if !tail.is_empty() {
        let mut block = HugeBuf::zeroed(BLOCK);
        block[..tail.len()].copy_from_slice(tail);
        f.write_all_at(&block, whole as u64)?;
        f.set_len(data.len() as u64)?;
    }
    Ok(f)
}

/// The whole file `path`, read with `O_DIRECT` where the file system allows it (else through
/// the cache) into `spare`, or into a new buffer when that is missing or too small.
pub fn read_whole(path: &Path, spare: Option<HugeBuf>) -> io::Result<HugeBuf> {
    let direct = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path);
    let f = match direct {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => File::open(path)?,
        f => f?,
    };
    let len = f.metadata()?.len() as usize;
    // Whole blocks: a direct read fills them up to the end of the file.
    let room = len.div_ceil(BLOCK) * BLOCK;
    let mut buf = match spare {
        Some(b) if b.capacity() >= room => b,
        _ => HugeBuf::zeroed(room.max(super::OBJECT_ROOM)),
    };
    buf.set_len(room);
    let got = match fill(&f, &mut buf, len) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            fill(&File::open(path)?, &mut buf, len)?
        }
        got => got?,
    };
    if got != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{got} of {len} bytes (the file changed while it was read)"),
        ));
    }
    buf.set_len(len);
    Ok(buf)
}

/// Reads `f` from its start into `buf` until `len` bytes or its end; the bytes read.
fn fill(f: &File, buf: &mut [u8], len: usize) -> io::Result<usize> {
    let mut got = 0;
    while got < len {
        match f.read_at(&mut buf[got..], got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_written_directly_reads_back_whole() {
        let d = tempfile::tempdir().unwrap();
        for len in [MIN_LEN, MIN_LEN + 1, 4 << 20, (4 << 20) + 45] {
            let mut buf = HugeBuf::zeroed(len);
            buf.iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i * 7 % 251) as u8);
            assert!(fits(&buf));
            let p = d.path().join(format!("o{len}"));
            drop(write_new(&p, &buf).unwrap());
            assert_eq!(std::fs::read(&p).unwrap(), &buf[..], "{len} bytes");
            let small = HugeBuf::zeroed(BLOCK);
            assert_eq!(
                &read_whole(&p, Some(small)).unwrap()[..],
                &buf[..],
                "{len} bytes"
            );
        }
    }

    #[test]
    fn small_or_unaligned_data_is_not_taken() {
        let buf = HugeBuf::zeroed(MIN_LEN + BLOCK);
        assert!(!fits(&buf[..MIN_LEN - 1]));
        assert!(!fits(&buf[1..MIN_LEN + 1]));
    }
}
