//! The chunk store as a sync target: chunks are uploaded as they come, the version (index pages,
//! then the record) is written at commit.

use super::lock::{self, Lock, LockKind};
use super::repo::{Store, NOT_A_STORE};
use super::tree::{self, PageIo, ZERO};
use super::version::{check_disk_id, new_version_id, Version, VersionStats, FORMAT};
use super::{StoreOptions, StoreUri};
use crate::checksum::{ChunkHasher, Digest};
use crate::holder::Holder;
use crate::target::{ChunkSink, CommitInfo, Done, Prepared, Target, TargetWriter};
use crate::{Error, Result};
use bytes::Bytes;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

pub struct StoreTarget {
    store: Arc<Store>,
    disk: String,
    size: u64,
    chunk_size: u64,
    /// The version an incremental builds on; `None` for a full sync.
    parent: Option<Version>,
    /// Why an incremental was turned into a full sync (`full_on_mismatch`).
    full_reason: Option<String>,
    /// Chunks of the parent whose objects are quarantined: read again from the source.
    repairs: Vec<u64>,
    /// Quarantined chunks: uploaded again whenever this sync has their content.
    suspects: HashSet<Digest>,
    /// Quarantined chunks this sync uploaded anew: their entries go once the version is committed.
    healed: Mutex<Vec<Digest>>,
    /// Chunks this run uploaded and their object sizes: checked against the store before the
    /// version is committed.
    uploaded: Mutex<Vec<(Digest, u64)>>,
    /// The fetch of the parent's root page, while it runs.
    prefetch: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Chunk index -> new name (`ZERO` for an all-zero chunk), since the parent.
    changes: Mutex<BTreeMap<u64, Digest>>,
    chunks_new: AtomicU64,
    bytes_stored: AtomicU64,
    upload_threads: u32,
    _lock: Lock,
}

/// What a sync into a store is asked to do.
pub struct StoreSync<'a> {
    pub disk: &'a str,
    pub size: u64,
    pub chunk_size: u64,
    /// Every chunk (a full sync) rather than changes to a parent.
    pub full: bool,
    /// The version the changes are relative to (`None`: the disk's newest, said in the log).
    pub parent: Option<&'a str>,
    /// Sync in full, saying why, instead of refusing when the parent cannot be used.
    pub full_on_mismatch: bool,
}

impl StoreTarget {
    /// Opens `spec.disk` in the store. A full sync starts from an empty chunk list (and may
    /// create the store); an incremental builds on its parent, and is refused (or, with
    /// `full_on_mismatch`, made full) when that parent is missing or does not fit. Nothing is
    /// written to the store before these checks pass, apart from the lock.
    pub fn open(uri: &StoreUri, o: &StoreOptions, spec: &StoreSync) -> Result<StoreTarget> {
        let disk = spec.disk;
        check_disk_id(disk).map_err(Error::Plan)?;
        let may_create = spec.full || spec.full_on_mismatch;
        let store = match Store::open(uri, o, may_create) {
            Err(Error::Store(m)) if !may_create && m.contains(NOT_A_STORE) => {
                return Err(Error::Plan(format!(
                    "store {}: disk '{disk}' has no version yet (there is no store), so there is nothing to apply changes to; nothing was written (run a full sync)",
                    uri.text
                )))
            }
            opened => Arc::new(opened?),
        };
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
            Holder::me("sync", &format!("sync of disk {disk}")),
            Some(disk),
        )?;
        // The quarantine is listed while an incremental chooses its parent: each is a round
        // trip to the store.
        let (choice, quarantined) = std::thread::scope(|s| {
            let quarantined = s.spawn(|| store.unhealed_chunks());
            let choice = match spec.full {
                true => Ok(Ok(None)),
                false => choose_parent(&store, spec).map(|c| c.map(Some)),
            };
            let quarantined = quarantined.join().expect("listing the quarantine panicked");
            (choice, quarantined)
        });
        let suspects = quarantined?;
        let (parent, full_reason) = match choice? {
            Ok(p) => (p, None),
            Err(why) if spec.full_on_mismatch => {
                tracing::warn!(disk, "full sync: {why}");
                (None, Some(why))
            }
            Err(why) => {
                return Err(Error::Plan(format!(
                    "store {}: {why}; nothing was written (run a full sync, or allow one with --full-on-mismatch)",
                    uri.text
                )))
            }
        };
        let repairs = match &parent {
            Some(p) => chunks_to_repair(&store, p, &suspects)?,
            None => Vec::new(),
        };
        let root = parent.as_ref().and_then(|p| p.root_digest());
        // The commit starts from the parent's root index page: fetch it while chunks go up. The
        // fetch is joined before the commit and on drop: a thread left running on the store's
        // runtime while the process exits crashed it.
        let prefetch = root.filter(|r| *r != ZERO).map(|root| {
            let store = store.clone();
            std::thread::spawn(move || {
                let _ = store.load_page(&root);
            })
        });
        Ok(StoreTarget {
            store,
            disk: disk.to_owned(),
            size: spec.size,
            chunk_size: spec.chunk_size,
            parent,
            full_reason,
            repairs,
            suspects,
            healed: Mutex::new(Vec::new()),
            uploaded: Mutex::new(Vec::new()),
            prefetch: Mutex::new(prefetch),
            changes: Mutex::new(BTreeMap::new()),
            chunks_new: AtomicU64::new(0),
            bytes_stored: AtomicU64::new(0),
            upload_threads: o.upload_threads.max(1),
            _lock: lock,
        })
    }

    /// A store error with the disk and offset of the chunk it happened to.
    fn at_chunk(&self, index: u64, e: Error) -> Error {
        match e {
            Error::Store(m) => Error::Store(format!(
                "{m} (disk '{}' offset {})",
                self.disk,
                index * self.chunk_size
            )),
            e => e,
        }
    }

    fn chunk_range(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        offset / self.chunk_size..(offset + len).div_ceil(self.chunk_size)
    }
}

/// A chunk's object on its way into the store.
struct Upload<'a> {
    target: &'a StoreTarget,
    index: u64,
    name: Digest,
    obj: Bytes,
    /// It replaces a quarantined copy.
    heals: bool,
}

impl Prepared for Upload<'_> {
    fn send(self: Box<Self>) -> Result<u64> {
        let t = self.target;
        let stored = t
            .store
            .upload_chunk(&self.name, self.obj)
            .map_err(|e| t.at_chunk(self.index, e))?;
        t.chunks_new.fetch_add(1, Relaxed);
        t.bytes_stored.fetch_add(stored, Relaxed);
        t.changes.lock().unwrap().insert(self.index, self.name);
        t.uploaded.lock().unwrap().push((self.name, stored));
        if self.heals {
            t.healed.lock().unwrap().push(self.name);
        }
        Ok(stored)
    }
}

impl Drop for StoreTarget {
    fn drop(&mut self) {
        self.join_prefetch();
    }
}

impl StoreTarget {
    fn join_prefetch(&self) {
        if let Some(fetch) = self.prefetch.lock().unwrap().take() {
            let _ = fetch.join();
        }
    }

    /// Asks the store for the size of every chunk this run uploaded: a server that answered a
    /// PUT with success but kept nothing, or less, fails the sync before its version exists.
    fn check_uploads(&self) -> Result<()> {
        let uploaded = std::mem::take(&mut *self.uploaded.lock().unwrap());
        let keys: Vec<String> = uploaded.iter().map(|(n, _)| Store::chunk_key(n)).collect();
        for ((key, (_, sent)), size) in keys
            .iter()
            .zip(&uploaded)
            .zip(self.store.backend.sizes(&keys))
        {
            match size? {
                Some(n) if n == *sent => {}
                found => {
                    let found = found.map_or("nothing".into(), |n| format!("{n} bytes"));
                    return Err(Error::Store(format!(
                        "store {}: {key} was uploaded with {sent} bytes, but the store holds {found}: nothing was committed (the server did not keep what it acknowledged)",
                        self.store.uri.text
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The version an incremental applies its changes to, or why none fits.
fn choose_parent(store: &Store, spec: &StoreSync) -> Result<std::result::Result<Version, String>> {
    let disk = spec.disk;
    let found = match spec.parent {
        Some(id) => store.read_record(disk, id)?,
        None => store.latest(disk)?,
    };
    let Some(p) = found else {
        let newest = match spec.parent {
            Some(_) => store.version_ids(disk)?.pop(),
            None => None,
        };
        return Ok(Err(match (spec.parent, newest) {
            (_, None) => format!("disk '{disk}' has no version yet, so there is nothing to apply changes to"),
            (Some(id), Some(n)) => format!(
                "the changes are relative to version {id} of disk '{disk}', which is not in the store (its newest is {n})"
            ),
            (None, Some(_)) => unreachable!("asked only for a named parent"),
        }));
    };
    if p.size != spec.size || p.chunk_size != spec.chunk_size {
        return Ok(Err(format!(
            "disk '{disk}' version {} has size {} and chunk size {}, this sync has size {} and chunk size {}",
            p.version, p.size, p.chunk_size, spec.size, spec.chunk_size
        )));
    }
    if spec.parent.is_none() {
        tracing::info!(disk, parent = %p.version, "incremental on the newest version");
    }
    Ok(Ok(p))
}

/// Chunk indexes of `parent` whose objects are quarantined (`bad`) and not yet uploaded again:
/// an incremental reads them from the source anew instead of building on damage.
fn chunks_to_repair(store: &Store, parent: &Version, bad: &HashSet<Digest>) -> Result<Vec<u64>> {
    if bad.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let root = parent.root_digest().expect("checked when parsed");
    tree::walk(store, root, parent.depth, &mut |_| {}, &mut |i, name| {
        if bad.contains(name) {
            out.push(i);
        }
        Ok(())
    })?;
    if !out.is_empty() {
        tracing::warn!(disk = %parent.disk, parent = %parent.version, chunks = out.len(), "the parent holds quarantined chunks; reading them from the source again");
    }
    Ok(out)
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

    fn prepare(
        &self,
        index: u64,
        data: &[u8],
        name: &Digest,
    ) -> Result<Option<Box<dyn Prepared + '_>>> {
        match self
            .store
            .encode_chunk(name, data, self.suspects.contains(name))
        {
            Err(e) => Err(self.at_chunk(index, e)),
            Ok(None) => {
                self.changes.lock().unwrap().insert(index, *name);
                Ok(None)
            }
            Ok(Some((obj, heals))) => Ok(Some(Box::new(Upload {
                target: self,
                index,
                name: *name,
                obj,
                heals,
            }))),
        }
    }

    fn resume(&self, done: &[Done]) -> Result<bool> {
        let mut changes = self.changes.lock().unwrap();
        for d in done {
            if d.name != ZERO && !self.store.has_chunk(&d.name)? {
                tracing::warn!(disk = %self.disk, offset = d.index * self.chunk_size, "a journaled chunk is gone from the store; starting over");
                changes.clear();
                self.chunks_new.store(0, Relaxed);
                self.bytes_stored.store(0, Relaxed);
                return Ok(false);
            }
            changes.insert(d.index, d.name);
            // The version's totals count what earlier attempts stored too.
            if d.stored > 0 {
                self.chunks_new.fetch_add(1, Relaxed);
                self.bytes_stored.fetch_add(d.stored, Relaxed);
            }
        }
        Ok(true)
    }

    fn full_reason(&self) -> Option<String> {
        self.full_reason.clone()
    }

    fn repairs(&self) -> Vec<u64> {
        self.repairs.clone()
    }

    fn parent(&self) -> Option<String> {
        self.parent.as_ref().map(|p| p.version.clone())
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
        self.check_uploads()?;
        self.join_prefetch();
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
            created: info.snapshot_time.clone(),
            committed: Some(
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            ),
            stats: VersionStats {
                mode: if info.full { "full" } else { "incremental" }.into(),
                chunks_changed: info.chunks_changed,
                chunks_zero: info.chunks_zero,
                chunks_new: self.chunks_new.load(Relaxed),
                bytes_read: info.bytes_read,
                bytes_stored: self.bytes_stored.load(Relaxed),
                millis: info.millis,
            },
            mac: None,
            checksum: String::new(),
        };
        self.store.write_version(&mut v)?;
        tracing::info!(disk = %self.disk, version = %v.version, changed = changes.len(), "version committed");
        for name in std::mem::take(&mut *self.healed.lock().unwrap()) {
            match self.store.healed(&name) {
                Ok(()) => {
                    tracing::info!(disk = %self.disk, "chunk {} uploaded again: healed", Store::chunk_key(&name))
                }
                Err(e) => {
                    tracing::warn!(disk = %self.disk, "chunk {} uploaded again, but its quarantine entry stays: {e}", Store::chunk_key(&name))
                }
            }
        }
        Ok(v.version)
    }
}
