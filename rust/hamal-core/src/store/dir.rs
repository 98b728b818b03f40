//! `dir:/path` backend: one file per object. A put writes a temporary file, fsyncs it and
//! renames it into place, so an object is either whole or absent; `sync` fsyncs the folders
//! whose entries changed. Chunk objects are written and read around the page cache
//! (`io::direct`) where the file system allows it.

use super::backend::{Backend, Listed, ObjectBuf, Peek};
use crate::io::{direct, HugeBuf};
use crate::{Error, Result};
use bytes::Bytes;
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

pub struct DirBackend {
    root: PathBuf,
    text: String,
    /// Folders with new or removed entries since the last `sync`.
    dirty: Mutex<HashSet<PathBuf>>,
}

const TMP_MARK: &str = ".tmp-";
/// Numbers temporary files process-wide: two backends of one store in one process (two disks
/// of a job) may write the same key at once, and must not share a temporary file.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl DirBackend {
    pub fn open(root: &Path, text: &str, create: bool) -> Result<DirBackend> {
        let err = |what: &str, e: std::io::Error| {
            Error::Store(format!("store {text}: {what} {}: {e}", root.display()))
        };
        match fs::metadata(root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::Store(format!(
                    "store {text}: {} is not a directory",
                    root.display()
                )))
            }
            // Created by the first write, so a run refused before it leaves nothing behind.
            Err(e) if e.kind() == ErrorKind::NotFound && create => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::Store(format!(
                    "store {text}: {} does not exist ({} yet)",
                    root.display(),
                    super::repo::NOT_A_STORE
                )))
            }
            Err(e) => return Err(err("cannot open", e)),
        }
        Ok(DirBackend {
            root: root.to_owned(),
            text: text.to_owned(),
            dirty: Mutex::new(HashSet::new()),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn err(&self, what: &str, key: &str, e: std::io::Error) -> Error {
        Error::Store(format!("store {}: {what} {key}: {e}", self.text))
    }

    fn mark_dirty(&self, dir: &Path) {
        self.dirty.lock().unwrap().insert(dir.to_owned());
    }

    /// Creates the folders of `dir` that are missing, remembering each new entry for `sync`.
    fn ensure_dir(&self, dir: &Path) -> std::io::Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        if let Some(parent) = dir.parent() {
            self.ensure_dir(parent)?;
            match fs::create_dir(dir) {
                Err(e) if e.kind() != ErrorKind::AlreadyExists => return Err(e),
                _ => self.mark_dirty(parent),
            }
        }
        Ok(())
    }

    /// Every file under `prefix`, temporary ones included.
    fn walk(&self, prefix: &str) -> Result<Vec<Listed>> {
        let mut out = Vec::new();
        let mut stack = vec![self.path(prefix)];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(self.err("cannot list", prefix, e)),
            };
            for entry in entries {
                // A file (a lock, a temporary) removed by another writer between the listing
                // and its stat is simply gone: not an error of the listing.
                let found = entry.and_then(|entry| Ok((entry.metadata()?, entry.path())));
                let (meta, path) = match found {
                    Ok(found) => found,
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(self.err("cannot list", prefix, e)),
                };
                if meta.is_dir() {
                    stack.push(path);
                } else {
                    let rel = path.strip_prefix(&self.root).expect("listed under root");
                    out.push(Listed {
                        key: rel.to_string_lossy().into_owned(),
                        modified: meta.modified().unwrap_or(std::time::UNIX_EPOCH),
                    });
                }
            }
        }
        Ok(out)
    }
}

impl Backend for DirBackend {
    fn describe(&self) -> String {
        self.text.clone()
    }

    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path(key);
        let dir = path.parent().expect("keys have a folder").to_owned();
        self.ensure_dir(&dir)
            .map_err(|e| self.err("cannot create the folder of", key, e))?;
        let seq = TMP_SEQ.fetch_add(1, Relaxed);
        let tmp = dir.join(format!(
            "{}{TMP_MARK}{}-{seq}",
            path.file_name().unwrap().to_string_lossy(),
            std::process::id()
        ));
        let write = || -> std::io::Result<()> {
            let f = direct::write_new(&tmp, &data)?;
            f.sync_data()?;
            // Written through the cache: clean now, so the next objects reuse its pages warm.
            crate::io::drop_cached(f.as_raw_fd(), 0, 0);
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            self.err("cannot write", key, e)
        })?;
        self.mark_dirty(&dir);
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match fs::read(self.path(key)) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err("cannot read", key, e)),
        }
    }

    fn get_many_reusing(
        &self,
        keys: &[String],
        spares: &mut Vec<HugeBuf>,
    ) -> Vec<Result<Option<ObjectBuf>>> {
        let read = |key: &String| match direct::read_whole(&self.path(key), spares.pop()) {
            Ok(buf) => Ok(Some(ObjectBuf::Huge(buf))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err("cannot read", key, e)),
        };
        keys.iter().map(read).collect()
    }

    fn exists(&self, key: &str) -> Result<bool> {
        match fs::metadata(self.path(key)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.err("cannot stat", key, e)),
        }
    }

    fn sizes(&self, keys: &[String]) -> Vec<Result<Option<u64>>> {
        let size = |key: &String| match fs::metadata(self.path(key)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err("cannot stat", key, e)),
        };
        keys.iter().map(size).collect()
    }

    fn peek(&self, key: &str, n: usize) -> Result<Peek> {
        let mut f = match File::open(self.path(key)) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Peek::Missing),
            Err(e) => return Err(self.err("cannot open", key, e)),
        };
        let size = f
            .metadata()
            .map_err(|e| self.err("cannot stat", key, e))?
            .len();
        let mut head = Vec::with_capacity(n);
        (&mut f)
            .take(n as u64)
            .read_to_end(&mut head)
            .map_err(|e| self.err("cannot read", key, e))?;
        Ok(Peek::Head { head, size })
    }

    fn list_temporaries(&self) -> Result<Vec<Listed>> {
        Ok(self
            .walk("")?
            .into_iter()
            .filter(|l| l.key.contains(TMP_MARK))
            .collect())
    }

    fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        Ok(self
            .walk(prefix)?
            .into_iter()
            .filter(|l| !l.key.contains(TMP_MARK))
            .collect())
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        match fs::remove_file(&path) {
            Ok(()) => {
                self.mark_dirty(path.parent().unwrap());
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err("cannot remove", key, e)),
        }
    }

    fn sync(&self) -> Result<()> {
        let dirs: Vec<PathBuf> = self.dirty.lock().unwrap().drain().collect();
        for d in dirs {
            File::open(&d).and_then(|f| f.sync_all()).map_err(|e| {
                Error::Store(format!(
                    "store {}: cannot fsync {}: {e}",
                    self.text,
                    d.display()
                ))
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_backends_of_one_store_write_one_key_at_once() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("store");
        let a = DirBackend::open(&root, "a", true).unwrap();
        let b = DirBackend::open(&root, "b", true).unwrap();
        assert!(!root.exists(), "nothing is created before the first write");
        std::thread::scope(|s| {
            for be in [&a, &b] {
                s.spawn(move || {
                    for i in 0..200u32 {
                        be.put("hamal-store.json", i.to_le_bytes().to_vec().into())
                            .unwrap();
                    }
                });
            }
        });
        assert_eq!(a.get("hamal-store.json").unwrap().unwrap().len(), 4);
        assert!(a.list_temporaries().unwrap().is_empty());
    }

    #[test]
    fn an_object_reads_back_whole_written_directly_or_through_the_cache() {
        let d = tempfile::tempdir().unwrap();
        let be = DirBackend::open(&d.path().join("store"), "s", true).unwrap();
        let len = (4 << 20) + 45; // an encrypted chunk's object: a partial last block
        let mut obj = HugeBuf::zeroed(len);
        obj.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 253) as u8);
        let want = obj.to_vec();
        // An aligned buffer is written directly, a vector through the cache.
        for (direct, data) in [(true, Bytes::from_owner(obj)), (false, want.clone().into())] {
            let key = format!("chunks/ab/direct-{direct}");
            be.put(&key, data).unwrap();
            assert!(be.get(&key).unwrap().unwrap() == want, "direct: {direct}");
        }
    }

    #[test]
    fn a_listing_survives_files_removed_while_it_runs() {
        // Two disks of one VM share a store: one lists locks/ while the other drops its lock.
        let d = tempfile::tempdir().unwrap();
        let be = DirBackend::open(&d.path().join("store"), "s", true).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..3000u32 {
                    let key = format!("locks/disk-{}.lock", i % 7);
                    be.put(&key, vec![1].into()).unwrap();
                    be.delete(&key).unwrap();
                }
                done.store(true, std::sync::atomic::Ordering::Relaxed);
            });
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                be.list("locks/").unwrap();
            }
        });
    }
}
