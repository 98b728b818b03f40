//! A version in the chunk store as a sync source: what `hamal restore` reads.

use super::backend::ObjectBuf;
use super::lock::{self, Lock, LockKind};
use super::repo::Store;
use super::tree::{self, ZERO};
use super::version::Version;
use super::{StoreOptions, StoreUri};
use crate::checksum::Digest;
use crate::extent::{Extent, ExtentMap};
use crate::holder::Holder;
use crate::io::{HugeBuf, ReadReq};
use crate::source::{Source, SourceReader};
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub struct StoreSource {
    store: Arc<Store>,
    version: Version,
    root: Digest,
    /// Keeps garbage collection away while the version is read (none with read-only access).
    lock: Option<Arc<Lock>>,
    spares: Spares,
}

/// Buffers of objects already decoded, read into again (see `Backend::get_many_reusing`).
/// Shared by the readers: a buffer is taken for a read and given back once it is decoded, so
/// there are never more than the objects in flight at once, which the memory budget counts.
type Spares = Arc<Mutex<Vec<HugeBuf>>>;

impl StoreSource {
    /// Opens version `version` (default: the newest) of `disk`.
    pub fn open(
        uri: &StoreUri,
        o: &StoreOptions,
        disk: &str,
        version: Option<&str>,
    ) -> Result<StoreSource> {
        let store = Arc::new(Store::open(uri, o, false)?);
        let purpose = format!("restore of disk {disk}");
        let lock = match lock::acquire(
            &store.backend,
            LockKind::Shared,
            Holder::me("restore", &purpose),
            None,
        ) {
            Ok(l) => Some(Arc::new(l)),
            Err(e) => {
                tracing::warn!("reading without a store lock (a prune may collect meanwhile): {e}");
                None
            }
        };
        let version = store.find_version(disk, version)?;
        let root = version.root_digest().expect("checked when parsed");
        Ok(StoreSource {
            store,
            version,
            root,
            lock,
            spares: Spares::default(),
        })
    }

    pub fn version(&self) -> &Version {
        &self.version
    }
}

impl Source for StoreSource {
    /// The object fetched (the chunk is decoded into the engine's buffer).
    fn buffers_per_read(&self) -> u64 {
        1
    }

    fn describe(&self) -> String {
        format!(
            "{} disk {} version {}",
            self.store.uri.text, self.version.disk, self.version.version
        )
    }

    fn size(&self) -> u64 {
        self.version.size
    }

    fn allocated(&self) -> Result<ExtentMap> {
        let (cs, size) = (self.version.chunk_size, self.version.size);
        let mut map = ExtentMap::new();
        tree::walk(
            &*self.store,
            self.root,
            self.version.depth,
            &mut |_| {},
            &mut |i, _| {
                let start = i * cs;
                map.push(Extent::new(start, cs.min(size - start)));
                Ok(())
            },
        )?;
        Ok(map)
    }

    fn identity(&self) -> Option<String> {
        Some(format!(
            "{}@{}:{}",
            self.version.disk, self.version.version, self.version.root
        ))
    }

    fn reader(&self, _depth: u32) -> Result<Box<dyn SourceReader>> {
        Ok(Box::new(StoreReader {
            store: self.store.clone(),
            version: self.version.clone(),
            root: self.root,
            lock: self.lock.clone(),
            spares: self.spares.clone(),
        }))
    }
}

struct StoreReader {
    store: Arc<Store>,
    version: Version,
    root: Digest,
    lock: Option<Arc<Lock>>,
    spares: Spares,
}

/// A chunk's name and its object as fetched (`None`: missing).
type Fetched = (Digest, Option<ObjectBuf>);

impl StoreReader {
    /// Fetches the objects of chunks `indexes` at once: by index, with the chunk's name (a
    /// chunk of zeros has no object and is not there).
    fn fetch(&self, indexes: &[u64]) -> Result<HashMap<u64, Fetched>> {
        let v = &self.version;
        if let Some(lock) = &self.lock {
            lock.refresh()?;
        }
        let mut wanted = Vec::new();
        for &i in indexes {
            let name = tree::lookup(&*self.store, self.root, v.depth, i)?;
            if name != ZERO {
                wanted.push((i, name));
            }
        }
        let keys: Vec<String> = wanted.iter().map(|(_, n)| Store::chunk_key(n)).collect();
        let mut spares = {
            let mut all = self.spares.lock().unwrap();
            let n = all.len().saturating_sub(keys.len());
            all.split_off(n)
        };
        let objects = self.store.backend.get_many_reusing(&keys, &mut spares);
        let mut out = HashMap::new();
        for ((i, name), obj) in wanted.into_iter().zip(objects) {
            out.insert(i, (name, obj?));
        }
        Ok(out)
    }

    fn chunk_len(&self, i: u64) -> usize {
        let v = &self.version;
        v.chunk_size.min(v.size - i * v.chunk_size) as usize
    }

    /// Decodes chunk `i` into `out` (its whole length), naming the disk offset on failure; the
    /// object's buffer is kept for the next read where the backend reads into it. A chunk that
    /// is missing or fails to decode gets a second chance (`Store::recover_chunk`).
    fn decode(&self, i: u64, (name, mut obj): Fetched, out: &mut [u8]) -> Result<()> {
        let v = &self.version;
        let decoded = self.store.decode_chunk_into(&name, obj.as_deref_mut(), out);
        if let Some(ObjectBuf::Huge(buf)) = obj {
            self.spares.lock().unwrap().push(buf);
        }
        let decoded = decoded.or_else(|problem| {
            let whence = self.store.recover_chunk(&name, out).map_err(|_| problem.clone())?;
            tracing::warn!(store = %self.store.uri.text, disk = %v.disk, version = %v.version, offset = i * v.chunk_size, "chunk {} was {problem}; read whole from {whence}", Store::chunk_key(&name));
            Ok::<(), String>(())
        });
        decoded.map_err(|problem| {
            Error::Mismatch(format!(
                "store {} disk '{}' version {}: chunk at disk offset {} ({}) is {problem}",
                self.store.uri.text,
                v.disk,
                v.version,
                i * v.chunk_size,
                Store::chunk_key(&name)
            ))
        })
    }
}

impl SourceReader for StoreReader {
    /// A request's whole chunk is decoded straight into its buffer; a chunk that requests share
    /// (not aligned to chunks) is decoded once into a buffer of its own and copied from there.
    fn read_batch(&mut self, reqs: &mut [ReadReq<'_>]) -> Result<()> {
        let cs = self.version.chunk_size;
        let mut indexes: Vec<u64> = reqs
            .iter()
            .flat_map(|r| r.offset / cs..(r.offset + r.buf.len() as u64).div_ceil(cs))
            .collect();
        indexes.dedup();
        let mut objects = self.fetch(&indexes)?;
        let mut shared: HashMap<u64, Vec<u8>> = HashMap::new();
        for r in reqs.iter_mut() {
            let mut pos = 0usize;
            while pos < r.buf.len() {
                let off = r.offset + pos as u64;
                let (i, within) = (off / cs, (off % cs) as usize);
                let len = self.chunk_len(i);
                let n = (r.buf.len() - pos).min(len - within);
                let piece = &mut r.buf[pos..pos + n];
                if let Some(plain) = shared.get(&i) {
                    piece.copy_from_slice(&plain[within..within + n]);
                } else if let Some(obj) = objects.remove(&i) {
                    if n == len {
                        self.decode(i, obj, piece)?;
                    } else {
                        let mut plain = vec![0u8; len];
                        self.decode(i, obj, &mut plain)?;
                        piece.copy_from_slice(&plain[within..within + n]);
                        shared.insert(i, plain);
                    }
                } else {
                    piece.fill(0);
                }
                pos += n;
            }
        }
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "chunk store"
    }
}
