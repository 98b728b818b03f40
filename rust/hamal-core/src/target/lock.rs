//! One writer per target: a run holds an exclusive `flock` for its whole life, so a second run
//! into the same target is refused before it writes anything, naming the holder. The kernel
//! drops the lock when its process dies, so a lock can never outlive its run.
//!
//! Files and block devices are locked on themselves (the holder is looked up in `/proc/locks`);
//! targets that are not local files (NBD exports) on a lock file named after their URI in the
//! lock folder (`hamal_lib_dir/locks`), which records the holder.

use crate::holder::Holder;
use crate::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Takes the lock on `file`; `false` when another open file holds it.
pub(crate) fn try_flock(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor we own, with plain integer arguments.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(e),
    }
}

/// Locks a target file or block device on itself for this process's run.
pub fn lock_target_file(file: &File, path: &Path) -> Result<()> {
    let locked = try_flock(file).map_err(|e| Error::target_io(path, "cannot lock", None, e))?;
    if locked {
        return Ok(());
    }
    let holder = file
        .metadata()
        .ok()
        .and_then(|m| flock_holder(m.dev(), m.ino()))
        .map_or_else(
            || "another process".to_owned(),
            |pid| Holder::local_pid(pid, "sync").describe(),
        );
    Err(Error::Busy(format!(
        "target {} is being written by {holder}; one run per target at a time, nothing was written",
        path.display()
    )))
}

/// The pid holding a `flock` on the file `dev`/`ino`, from `/proc/locks`.
fn flock_holder(dev: u64, ino: u64) -> Option<u32> {
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; waiters have a "->" field.
        (f.len() >= 6 && f[1] == "FLOCK" && f[5] == want)
            .then(|| f[4].parse().ok())
            .flatten()
    })
}

/// A held lock file; dropping it (or the process ending) releases the lock. The file stays, so
/// no two runs can ever lock two different files of one name.
pub struct LockFile {
    _file: File,
}

/// Locks `name` (e.g. an NBD URI) in `dir` for this run, or names who holds it.
pub fn lock_named(dir: &Path, name: &str, purpose: &str) -> Result<LockFile> {
    let path = dir.join(format!(
        "target-{}.lock",
        &blake3::hash(name.as_bytes()).to_hex()[..24]
    ));
    let io = |what, e| Error::target_io(&path, what, None, e);
    std::fs::create_dir_all(dir).map_err(|e| io("cannot create the lock folder of", e))?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io("cannot open lock", e))?;
    if !try_flock(&file).map_err(|e| io("cannot lock", e))? {
        let mut body = String::new();
        let _ = file.read_to_string(&mut body);
        let holder = serde_json::from_str::<Holder>(&body)
            .map_or_else(|_| "another process".to_owned(), |h| h.describe());
        return Err(Error::Busy(format!(
            "target {name} is being written by {holder}; one run per target at a time, nothing was written"
        )));
    }
    let me = serde_json::to_vec(&Holder::me("sync", purpose)).expect("serializable");
    file.set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| file.write_all(&me))
        .map_err(|e| io("cannot write lock", e))?;
    Ok(LockFile { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_named(dir.path(), "nbd://127.0.0.1/x", "sync of disk a").unwrap();
        let e = lock_named(dir.path(), "nbd://127.0.0.1/x", "sync of disk b")
            .err()
            .unwrap();
        let m = e.to_string();
        assert!(m.contains("being written by a sync of disk a (pid "), "{m}");
        lock_named(dir.path(), "nbd://127.0.0.1/y", "other").unwrap();
        drop(held);
        lock_named(dir.path(), "nbd://127.0.0.1/x", "sync of disk b").unwrap();

        let p = dir.path().join("t.raw");
        std::fs::write(&p, b"x").unwrap();
        let a = File::options().write(true).open(&p).unwrap();
        lock_target_file(&a, &p).unwrap();
        let b = File::options().write(true).open(&p).unwrap();
        let m = lock_target_file(&b, &p).unwrap_err().to_string();
        assert!(
            m.contains(&format!("(pid {} on host ", std::process::id())),
            "the holder is found in /proc/locks: {m}"
        );
    }
}
