//! The chunk store as a sync target: chunks are uploaded as they come, the version (index pages,
//! then the record) is written at commit.

use super::lock::{self, Lock, LockKind};
use super::repo::Store;
use super::tree::{self, ZERO};
use super::version::{check_disk_id, new_version_id, Version, VersionStats, FORMAT};
use super::{StoreOptions, StoreUri};
use crate::checksum::{ChunkHasher, Digest};
use crate::target::{ChunkSink, CommitInfo, Target, TargetWriter};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

pub struct StoreTarget {
    store: Arc<Store>,
    disk: String,
    size: u64,
    chunk_size: u64,
    /// The version an incremental builds on; `None` for a full sync.
    parent: Option<Version>,
    /// Chunk index -> new name (`ZERO` for an all-zero chunk), since the parent.
    changes: Mutex<BTreeMap<u64, Digest>>,
    chunks_new: AtomicU64,
    bytes_stored: AtomicU64,
    upload_threads: u32,
    _lock: Lock,
}

impl StoreTarget {
    /// Opens `disk` in the store for a sync of a `size`-byte disk. A full sync starts from an
    /// empty chunk list; an incremental builds on the disk's newest version.
    pub fn open(
        uri: &StoreUri,
        o: &StoreOptions,
        disk: &str,
        size: u64,
        chunk_size: u64,
        full: bool,
    ) -> Result<StoreTarget> {
        check_disk_id(disk).map_err(Error::Plan)?;
        let store = Arc::new(Store::open(uri, o, true)?);
        if !store.records_in_store() {
            tracing::warn!(
                "version records of {} are kept only in {} ([sync] upload_metadata_to_oss = False): the bucket alone cannot be restored",
                uri.text,
                o.local_metadata.as_ref().map_or("?".into(), |p| p.display().to_string())
            );
        }
        let lock = lock::acquire(
            &store.backend,
            LockKind::Shared,
            &format!("sync of disk {disk}"),
        )?;
        let parent = if full {
            None
        } else {
            let p = store.latest(disk)?.ok_or_else(|| {
                Error::Plan(format!(
                    "store {}: disk '{disk}' has no version yet, so there is nothing to apply changes to: run a full sync first",
                    uri.text
                ))
            })?;
            if p.size != size || p.chunk_size != chunk_size {
                return Err(Error::Plan(format!(
                    "store {}: disk '{disk}' version {} has size {} and chunk size {}, this sync has size {size} and chunk size {chunk_size}: run a full sync",
                    uri.text, p.version, p.size, p.chunk_size
                )));
            }
            Some(p)
        };
        Ok(StoreTarget {
            store,
            disk: disk.to_owned(),
            size,
            chunk_size,
            parent,
            changes: Mutex::new(BTreeMap::new()),
            chunks_new: AtomicU64::new(0),
            bytes_stored: AtomicU64::new(0),
            upload_threads: o.upload_threads.max(1),
            _lock: lock,
        })
    }

    fn chunk_range(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        offset / self.chunk_size..(offset + len).div_ceil(self.chunk_size)
    }
}

impl Target for StoreTarget {
    fn describe(&self) -> String {
        format!("{} disk {}", self.store.uri.text, self.disk)
    }

    fn alignment(&self) -> u64 {
        self.chunk_size
    }

    /// A full sync builds its chunk list from nothing.
    fn is_fresh(&self) -> bool {
        true
    }

    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        let mut changes = self.changes.lock().unwrap();
        for i in self.chunk_range(offset, len) {
            changes.insert(i, ZERO);
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.store.backend.sync()?;
        self._lock.refresh()
    }

    fn writer(&self, _depth: u32) -> Result<Box<dyn TargetWriter>> {
        Err(Error::Internal(
            "a chunk store takes whole chunks, not positional writes".into(),
        ))
    }

    fn as_chunk_sink(&self) -> Option<&dyn ChunkSink> {
        Some(self)
    }
}

impl ChunkSink for StoreTarget {
    fn hasher(&self) -> ChunkHasher {
        self.store.codec.hasher()
    }

    fn writers(&self) -> u32 {
        self.upload_threads
    }

    fn put(&self, index: u64, data: &[u8], name: &Digest) -> Result<()> {
        let stored = self.store.put_chunk(name, data).map_err(|e| match e {
            Error::Store(m) => Error::Store(format!(
                "{m} (disk '{}' offset {})",
                self.disk,
                index * self.chunk_size
            )),
            e => e,
        })?;
        if stored > 0 {
            self.chunks_new.fetch_add(1, Relaxed);
            self.bytes_stored.fetch_add(stored, Relaxed);
        }
        self.changes.lock().unwrap().insert(index, *name);
        Ok(())
    }

    fn resume(&self, done: &[(u64, Digest)]) -> Result<bool> {
        let mut changes = self.changes.lock().unwrap();
        for (index, name) in done {
            if *name != ZERO && !self.store.has_chunk(name)? {
                tracing::warn!(disk = %self.disk, offset = index * self.chunk_size, "a journaled chunk is gone from the store; starting over");
                changes.clear();
                return Ok(false);
            }
            changes.insert(*index, *name);
        }
        Ok(true)
    }

    fn base(&self) -> String {
        self.parent
            .as_ref()
            .map_or("full".into(), |p| format!("{}:{}", p.version, p.root))
    }

    fn commit(&self, info: &CommitInfo) -> Result<String> {
        let changes: Vec<(u64, Digest)> = std::mem::take(&mut *self.changes.lock().unwrap())
            .into_iter()
            .collect();
        let chunks = self.size.div_ceil(self.chunk_size);
        let depth = tree::depth_for(chunks);
        let base = match &self.parent {
            Some(p) => p.root_digest().expect("checked when parsed"),
            None => ZERO,
        };
        let root = tree::update(&*self.store, base, depth, &changes)?;
        self.store.backend.sync()?;
        let mut v = Version {
            format: FORMAT,
            disk: self.disk.clone(),
            version: new_version_id(self.parent.as_ref().map(|p| p.version.as_str())),
            parent: self.parent.as_ref().map(|p| p.version.clone()),
            size: self.size,
            chunk_size: self.chunk_size,
            root: super::codec::hex(&root),
            depth,
            source: info.source.clone(),
            cursor: info.cursor.clone(),
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            stats: VersionStats {
                mode: if info.full { "full" } else { "incremental" }.into(),
                chunks_changed: info.chunks_changed,
                chunks_zero: info.chunks_zero,
                chunks_new: self.chunks_new.load(Relaxed),
                bytes_read: info.bytes_read,
                bytes_stored: self.bytes_stored.load(Relaxed),
                millis: info.millis,
            },
            checksum: String::new(),
        };
        self.store.write_version(&mut v)?;
        tracing::info!(disk = %self.disk, version = %v.version, changed = changes.len(), "version committed");
        Ok(v.version)
    }
}
