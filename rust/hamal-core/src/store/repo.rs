//! An open chunk store: its backend, codec and version records.

use super::backend::{Backend, Peek};
use super::codec::{self, hex, parse_digest, Codec, Keys};
use super::dir::DirBackend;
use super::heads::{local_folder, Heads};
use super::s3::S3Backend;
use super::tree::{self, PageIo};
use super::version::{check_disk_id, version_key, Authenticity, Version, FORMAT};
use super::{StoreLocation, StoreOptions, StoreUri};
use crate::checksum::Digest;
use crate::io::HugeBuf;
use crate::{Error, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

const CONFIG_KEY: &str = "hamal-store.json";
/// Part of the message for a location that holds no store.
pub const NOT_A_STORE: &str = "not a hamal chunk store";
/// Index pages kept in memory (32 KiB each at most).
const PAGE_CACHE: usize = 512;

#[derive(Serialize, Deserialize)]
struct StoreConfig {
    format: u32,
    hash: String,
    encryption: Option<EncryptionInfo>,
}

#[derive(Serialize, Deserialize)]
struct EncryptionInfo {
    cipher: String,
    key_check: String,
    /// Every version record carries a MAC (stores created since records had one): a record
    /// without one is refused, not read with a warning.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    authenticated_records: bool,
}

pub struct Store {
    pub uri: StoreUri,
    pub backend: Arc<dyn Backend>,
    pub codec: Codec,
    /// Where version records are written (the store itself and/or a local folder).
    record_places: Vec<Arc<dyn Backend>>,
    /// Every record must carry a MAC (see `EncryptionInfo`).
    records_authenticated: bool,
    /// The newest version of each disk this host committed.
    heads: Heads,
    pages: Mutex<HashMap<Digest, Arc<Vec<Digest>>>>,
    spares: Spares,
}

/// Buffers of chunk objects on their way to the backend, reused: each comes back when the
/// backend drops its bytes (a fresh buffer per chunk costs its first-touch page faults, see
/// `io::HugeBuf`). At most `MAX_SPARES` wait here: one per upload thread.
#[derive(Default)]
struct Spares(Arc<Mutex<Vec<HugeBuf>>>);

const MAX_SPARES: usize = 16;

impl Spares {
    /// A buffer of `len` bytes (any content).
    fn take(&self, len: usize) -> HugeBuf {
        match self.0.lock().unwrap().pop() {
            Some(mut b) if b.capacity() >= len => {
                b.set_len(len);
                b
            }
            _ => HugeBuf::zeroed(len),
        }
    }

    /// `buf` as bytes for the backend; the buffer returns here when they are dropped.
    fn lend(&self, buf: HugeBuf) -> Bytes {
        Bytes::from_owner(Lent {
            buf: Some(buf),
            home: Arc::clone(&self.0),
        })
    }
}

struct Lent {
    buf: Option<HugeBuf>,
    home: Arc<Mutex<Vec<HugeBuf>>>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_deref().unwrap_or_default()
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let mut home = self.home.lock().unwrap();
        if home.len() < MAX_SPARES {
            home.extend(self.buf.take());
        }
    }
}

/// Version records of a store: the good ones by disk, and the damaged ones with the problem.
pub struct Records {
    pub good: BTreeMap<String, Vec<Version>>,
    pub damaged: Vec<(String, String)>,
}

impl Store {
    /// Opens the store at `uri`; `create` makes a new one (a sync) where there is none.
    pub fn open(uri: &StoreUri, o: &StoreOptions, create: bool) -> Result<Store> {
        let text = &uri.text;
        let backend: Arc<dyn Backend> = match &uri.location {
            StoreLocation::Dir(p) => Arc::new(DirBackend::open(p, text, create)?),
            StoreLocation::S3 { bucket, prefix } => {
                Arc::new(S3Backend::open(bucket, prefix, text, &o.s3)?)
            }
        };
        let keys = match &o.key_file {
            Some(k) => Some(Keys::load(k).map_err(Error::Store)?),
            None => None,
        };
        let bad = |m: String| Error::Store(format!("store {text}: {m}"));
        // The first request: a store that exists answers it, so it is also the check of the
        // location and the credentials (one round trip less than asking for the bucket first).
        let config = backend.get(CONFIG_KEY)?;
        if config.is_none() {
            backend.check_location()?;
        }
        let config = match config {
            Some(bytes) => serde_json::from_slice::<StoreConfig>(&bytes)
                .map_err(|e| bad(format!("{CONFIG_KEY} is damaged: {e}")))?,
            None if create => {
                let c = StoreConfig {
                    format: FORMAT,
                    hash: if keys.is_some() {
                        "blake3-keyed"
                    } else {
                        "blake3"
                    }
                    .into(),
                    encryption: keys.as_ref().map(|k| EncryptionInfo {
                        cipher: "aes-256-gcm".into(),
                        key_check: k.check.clone(),
                        authenticated_records: true,
                    }),
                };
                backend.put(
                    CONFIG_KEY,
                    serde_json::to_vec_pretty(&c).expect("serializable").into(),
                )?;
                backend.sync()?;
                c
            }
            None => {
                return Err(bad(format!(
                    "no {CONFIG_KEY}: {NOT_A_STORE} (nothing synced to it yet?)"
                )))
            }
        };
        if config.format != FORMAT {
            return Err(bad(format!(
                "store format {} is not supported (this hamal reads {FORMAT})",
                config.format
            )));
        }
        match (&config.encryption, &keys, &o.key_file) {
            (Some(_), None, _) => return Err(bad("the store is encrypted: give its key file (--key-file or [store] encryption_key_file)".into())),
            (None, Some(_), Some(k)) => return Err(bad(format!("the store is not encrypted but key file {} was given", k.display()))),
            (Some(e), Some(k), Some(path)) if e.key_check != k.check => {
                return Err(bad(format!("encryption key file {} is not this store's key", path.display())))
            }
            _ => {}
        }
        let mut record_places = Vec::new();
        let in_store = matches!(uri.location, StoreLocation::Dir(_)) || o.upload_metadata;
        if in_store {
            record_places.push(backend.clone());
        }
        if let Some(local) = o
            .local_metadata
            .as_ref()
            .filter(|_| o.save_local || !in_store)
        {
            let folder = local_folder(local, text);
            let dir = DirBackend::open(
                &folder,
                &format!("{} (local metadata of {text})", folder.display()),
                true,
            )?;
            record_places.push(Arc::new(dir));
        }
        if record_places.is_empty() {
            return Err(bad("version records would be kept nowhere: upload_metadata_to_oss is off and no local metadata folder is set".into()));
        }
        Ok(Store {
            uri: uri.clone(),
            backend,
            codec: Codec {
                level: o.compression_level,
                keys,
            },
            record_places,
            heads: Heads::new(o.local_metadata.as_deref(), text),
            records_authenticated: config
                .encryption
                .as_ref()
                .is_some_and(|e| e.authenticated_records),
            pages: Mutex::new(HashMap::new()),
            spares: Spares::default(),
        })
    }

    /// Whether version records are written to the store itself (else only locally).
    pub fn records_in_store(&self) -> bool {
        self.record_places
            .iter()
            .any(|p| Arc::ptr_eq(p, &self.backend))
    }

    pub fn chunk_key(a: &Digest) -> String {
        let h = hex(a);
        format!("chunks/{}/{h}", &h[..2])
    }

    pub fn page_key(a: &Digest) -> String {
        let h = hex(a);
        format!("index/{}/{h}", &h[..2])
    }

    /// Where a damaged chunk is moved aside (`verify --deep`, or a truncated one found by a sync).
    pub fn quarantine_key(a: &Digest) -> String {
        let h = hex(a);
        format!("quarantine/{}/{h}", &h[..2])
    }

    pub fn has_chunk(&self, a: &Digest) -> Result<bool> {
        self.backend.exists(&Self::chunk_key(a))
    }

    /// A chunk's object, ready to upload, and whether it replaces a damaged copy; `None` when
    /// the store has a whole copy. A `suspect` chunk (quarantined by a verify) is always
    /// uploaded again. Where the backend shows an object's size (`dir:`), a truncated copy is
    /// quarantined and replaced.
    pub fn encode_chunk(
        &self,
        a: &Digest,
        plain: &[u8],
        suspect: bool,
    ) -> Result<Option<(Bytes, bool)>> {
        let key = Self::chunk_key(a);
        let mut heals = suspect;
        if !suspect {
            match self.backend.peek(&key, codec::HEAD)? {
                Peek::Missing => {}
                Peek::Present => return Ok(None),
                Peek::Head { head, size } => match codec::declared_len(&head) {
                    Some(want) if want != size => {
                        self.quarantine_chunk(a, &format!("truncated: {size} of {want} bytes"))?;
                        heals = true;
                    }
                    _ => return Ok(None),
                },
            }
        }
        let mut obj = self.spares.take(self.codec.max_len(plain.len()));
        let n = self.codec.encode_into(plain, &mut obj);
        obj.set_len(n);
        Ok(Some((self.spares.lend(obj), heals)))
    }

    /// Uploads the object `encode_chunk` made for chunk `a`; returns its size.
    pub fn upload_chunk(&self, a: &Digest, obj: Bytes) -> Result<u64> {
        let n = obj.len() as u64;
        self.backend.put(&Self::chunk_key(a), obj)?;
        Ok(n)
    }

    /// Copies a chunk object found damaged (or an empty object for one found missing) to the
    /// quarantine, leaving it in place: the entry marks it suspect (the next sync that produces
    /// its content uploads it anew, whatever the store says it has, and drops the mark) and
    /// keeps what was read, as found, for a restore's last try. Nothing is deleted on a
    /// judgement that may be wrong.
    pub fn quarantine_chunk(&self, a: &Digest, why: &str) -> Result<()> {
        let key = Self::chunk_key(a);
        tracing::warn!(store = %self.uri.text, "chunk {key} ({why}) is marked in the quarantine, with a copy of what was read, until a sync uploads its content again");
        let copy = self.backend.get(&key)?.unwrap_or_default();
        self.backend.put(&Self::quarantine_key(a), copy.into())?;
        self.backend.sync()
    }

    /// Quarantined chunks that no sync has uploaded again yet: every quarantine entry (a sync
    /// that uploads the content drops the entry once its version is committed).
    pub fn unhealed_chunks(&self) -> Result<HashSet<Digest>> {
        let mut bad = HashSet::new();
        for item in self.backend.list("quarantine/")? {
            if let Some(name) = item.key.rsplit('/').next().and_then(parse_digest) {
                bad.insert(name);
            }
        }
        Ok(bad)
    }

    /// Drops the quarantine entry of a chunk whose content a committed version uploaded again.
    pub fn healed(&self, a: &Digest) -> Result<()> {
        self.backend.delete(&Self::quarantine_key(a))
    }

    /// A second chance for a chunk whose object failed to decode into `out`: the object read
    /// again (an answer garbled on its way), then its quarantined copy (a store whose verify
    /// moved a good chunk aside). Where the good copy came from, or why there is none.
    pub fn recover_chunk(&self, a: &Digest, out: &mut [u8]) -> Result<&'static str, String> {
        let tries = [
            (Self::chunk_key(a), "a second read"),
            (Self::quarantine_key(a), "its quarantined copy"),
        ];
        let mut last = "missing".to_owned();
        for (key, whence) in tries {
            match self.backend.get(&key) {
                Ok(mut obj) => match self.decode_chunk_into(a, obj.as_deref_mut(), out) {
                    Ok(()) => return Ok(whence),
                    Err(e) if key.starts_with("chunks/") || obj.is_some_and(|o| !o.is_empty()) => {
                        last = e
                    }
                    Err(_) => {} // no quarantined copy, or only the mark of a missing chunk
                },
                Err(e) => last = format!("unreadable: {e}"),
            }
        }
        Err(last)
    }

    /// A chunk's plaintext from its object (`None`: missing), or what is wrong with it.
    pub fn decode_chunk(
        &self,
        a: &Digest,
        obj: Option<Vec<u8>>,
        max_len: usize,
    ) -> Result<Vec<u8>, String> {
        let obj = obj.ok_or("missing")?;
        self.codec
            .decode(a, obj, max_len)
            .map_err(|e| format!("damaged: {e}"))
    }

    /// Decodes a chunk's object straight into `out`, the chunk's length, or what is wrong.
    pub fn decode_chunk_into(
        &self,
        a: &Digest,
        obj: Option<&mut [u8]>,
        out: &mut [u8],
    ) -> Result<(), String> {
        let obj = obj.ok_or("missing")?;
        self.codec
            .decode_into(a, obj, out)
            .map_err(|e| format!("damaged: {e}"))
    }

    /// Every version record, checked.
    pub fn records(&self, disk: Option<&str>) -> Result<Records> {
        let prefix = match disk {
            Some(d) => format!("versions/{d}/"),
            None => "versions/".into(),
        };
        let mut seen = BTreeMap::new();
        for place in &self.record_places {
            let keys: Vec<String> = place
                .list(&prefix)?
                .into_iter()
                .map(|item| item.key)
                .filter(|key| key.ends_with(".json") && !seen.contains_key(key))
                .collect();
            // At once: each read is a round trip to an object store.
            for (key, bytes) in keys.iter().zip(place.get_many(&keys)) {
                seen.insert(key.clone(), (place.describe(), bytes?));
            }
        }
        let mut out = Records {
            good: BTreeMap::new(),
            damaged: Vec::new(),
        };
        for (key, (place, bytes)) in seen {
            let Some(bytes) = bytes else { continue };
            match self.parse_record(&key, &bytes) {
                Ok(v) => out.good.entry(v.disk.clone()).or_default().push(v),
                Err(e) => out.damaged.push((format!("{place}: {key}"), e)),
            }
        }
        for list in out.good.values_mut() {
            list.sort_by(|a, b| a.version.cmp(&b.version));
        }
        Ok(out)
    }

    /// A record checked, its MAC too where the store is encrypted; one without a MAC (written
    /// before records had one) is read with a warning, unless the store's records all have one.
    fn parse_record(&self, key: &str, bytes: &[u8]) -> std::result::Result<Version, String> {
        let auth = self.codec.keys.as_ref().map(|k| &k.records);
        let (v, how) = Version::parse_checked(key, bytes, auth, self.records_authenticated)?;
        if how == Authenticity::Unauthenticated {
            tracing::warn!(store = %self.uri.text, "{key}: a version record without a MAC (written before records were authenticated): it is read, but anyone with write access to the store could have altered it");
        }
        Ok(v)
    }

    /// Version ids of `disk`, oldest first, from listings alone: no record is read.
    pub fn version_ids(&self, disk: &str) -> Result<Vec<String>> {
        let prefix = format!("versions/{disk}/");
        let mut ids = BTreeSet::new();
        for place in &self.record_places {
            for item in place.list(&prefix)? {
                let name = item.key.strip_prefix(&prefix).unwrap_or_default();
                ids.extend(name.strip_suffix(".json").map(str::to_owned));
            }
        }
        Ok(ids.into_iter().collect())
    }

    /// The record of version `id` of `disk` from the first place that holds one (`None`: no
    /// place does, or `id` could not name one); a damaged record is an error that names it.
    pub fn read_record(&self, disk: &str, id: &str) -> Result<Option<Version>> {
        // Ids and disks name folders and files: a `..` or `/` must not reach outside `versions/`.
        if check_disk_id(disk).is_err() || check_disk_id(id).is_err() {
            return Ok(None);
        }
        let key = version_key(disk, id);
        for place in &self.record_places {
            let Some(bytes) = place.get(&key)? else {
                continue;
            };
            return self
                .parse_record(&key, &bytes)
                .map(Some)
                .map_err(|e| Error::Mismatch(format!("{}: {key}: {e}", place.describe())));
        }
        Ok(None)
    }

    /// The newest version of `disk`, its record read alone: a disk with a thousand versions
    /// costs a listing and one read, not a thousand reads. A damaged newest record is an error
    /// (an incremental on an older parent would be wrong); older ones are `verify`'s to report.
    pub fn latest(&self, disk: &str) -> Result<Option<Version>> {
        let mut newest = None;
        for id in self.version_ids(disk)?.iter().rev() {
            // Gone since the listing (a prune): the next newest.
            if let Some(v) = self.read_record(disk, id)? {
                newest = Some(v);
                break;
            }
        }
        self.check_head(disk, newest.as_ref().map(|v| v.version.as_str()))?;
        Ok(newest)
    }

    /// Disks (all, or `disk`) whose newest version in `records` is older than the one this
    /// host committed: one line each, naming both.
    pub fn behind_heads(&self, records: &Records, disk: Option<&str>) -> Vec<String> {
        let mut out = Vec::new();
        for (d, _) in self.heads.all() {
            if disk.is_some_and(|want| want != d) {
                continue;
            }
            let newest = records
                .good
                .get(&d)
                .and_then(|v| v.last())
                .map(|v| v.version.as_str());
            if let Some(head) = self.heads.ahead_of(&d, newest) {
                out.push(format!(
                    "{}: committed by this host, but not in the store's listing (the newest listed: {})",
                    version_key(&d, &head),
                    newest.unwrap_or("none")
                ));
            }
        }
        out
    }

    /// Fails when this host committed a version of `disk` newer than the store's `newest`.
    fn check_head(&self, disk: &str, newest: Option<&str>) -> Result<()> {
        let Some(head) = self.heads.ahead_of(disk, newest) else {
            return Ok(());
        };
        let shown = newest.map_or("none".to_owned(), |n| format!("version {n}"));
        let what = match self.read_record(disk, &head)? {
            Some(_) => format!("its listing hides version {head} of disk '{disk}', which this host committed (the listing's newest: {shown})"),
            None => format!("version {head} of disk '{disk}', which this host committed, is gone (the newest left: {shown})"),
        };
        Err(Error::Mismatch(format!(
            "store {}: {what}; nothing was done: name the version (--parent, --version) or run a full sync",
            self.uri.text
        )))
    }

    /// Version `id` of `disk`, or its newest.
    pub fn find_version(&self, disk: &str, id: Option<&str>) -> Result<Version> {
        let found = match id {
            Some(id) => self.read_record(disk, id)?,
            None => self.latest(disk)?,
        };
        found.ok_or_else(|| {
            let what = id.map_or("no version".into(), |id| format!("no version '{id}'"));
            Error::Plan(format!("store {}: disk '{disk}' has {what}", self.uri.text))
        })
    }

    /// Writes a version record everywhere records are kept; the write to the store is the
    /// commit point, so the local copy goes first.
    pub fn write_version(&self, v: &mut Version) -> Result<()> {
        let bytes = v.seal(self.codec.keys.as_ref().map(|k| &k.records));
        for place in self.record_places.iter().rev() {
            if !Arc::ptr_eq(place, &self.backend) {
                // A local copy says which store it belongs to.
                place.put("store-uri.txt", self.uri.text.clone().into_bytes().into())?;
            }
            place.put(&v.key(), bytes.clone().into())?;
            place.sync()?;
        }
        if let Err(e) = self.heads.set(&v.disk, &v.version) {
            tracing::warn!(store = %self.uri.text, disk = %v.disk, "version {} is committed, but this host could not note it as the newest: {e}", v.version);
        }
        Ok(())
    }

    pub fn delete_version(&self, v: &Version) -> Result<()> {
        for place in &self.record_places {
            place.delete(&v.key())?;
            place.sync()?;
        }
        Ok(())
    }
}

impl Store {
    /// A page's entries from its object, kept in the page cache.
    fn page_from(&self, addr: &Digest, obj: Option<Vec<u8>>) -> Result<Vec<Digest>> {
        let entries = self
            .decode_chunk(addr, obj, (tree::FANOUT * 32) as usize)
            .and_then(|b| tree::page_entries(&b).ok_or_else(|| "damaged: not an index page".into()))
            .map_err(|e| {
                Error::Mismatch(format!(
                    "store {}: index page {} is {e}",
                    self.uri.text,
                    Self::page_key(addr)
                ))
            })?;
        let mut cache = self.pages.lock().unwrap();
        if cache.len() >= PAGE_CACHE {
            cache.clear();
        }
        cache.insert(*addr, Arc::new(entries.clone()));
        Ok(entries)
    }
}

impl PageIo for Store {
    fn load_page(&self, addr: &Digest) -> Result<Vec<Digest>> {
        let mut pages = self.load_pages(std::slice::from_ref(addr))?;
        Ok(pages.pop().expect("one page asked for"))
    }

    fn load_pages(&self, addrs: &[Digest]) -> Result<Vec<Vec<Digest>>> {
        let cached: Vec<Option<Vec<Digest>>> = {
            let cache = self.pages.lock().unwrap();
            addrs
                .iter()
                .map(|a| cache.get(a).map(|p| p.as_ref().clone()))
                .collect()
        };
        let missing: Vec<&Digest> = addrs
            .iter()
            .zip(&cached)
            .filter(|(_, c)| c.is_none())
            .map(|(a, _)| a)
            .collect();
        let keys: Vec<String> = missing.iter().map(|a| Self::page_key(a)).collect();
        let mut fetched = missing.into_iter().zip(self.backend.get_many(&keys));
        cached
            .into_iter()
            .map(|c| match c {
                Some(entries) => Ok(entries),
                None => {
                    let (addr, obj) = fetched.next().expect("one answer per missing page");
                    self.page_from(addr, obj?)
                }
            })
            .collect()
    }

    fn page_address(&self, bytes: &[u8]) -> Digest {
        self.codec.address(bytes)
    }

    /// Written without asking first whether each exists: a rewritten page is new nearly
    /// always, and writing one that exists puts the same bytes there.
    fn store_pages(&self, pages: Vec<(Digest, Vec<u8>)>) -> Result<()> {
        let objects = pages
            .into_iter()
            .map(|(a, bytes)| (Self::page_key(&a), Bytes::from(self.codec.encode(&bytes))))
            .collect();
        self.backend.put_many(objects)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_buffers_come_back_when_their_bytes_are_dropped() {
        let spares = Spares::default();
        let mut b = spares.take(1 << 20);
        b[0] = 9;
        let at = b.as_ptr();
        let bytes = spares.lend(b);
        let copy = bytes.clone();
        drop(bytes);
        // Still lent while a clone lives: a new take must not hand out the same memory.
        assert_ne!(spares.take(1 << 20).as_ptr(), at);
        drop(copy);
        let again = spares.take(1 << 19);
        assert_eq!((again.as_ptr(), again.len()), (at, 1 << 19));
        // Too small a spare is replaced, not used past its capacity.
        drop(spares.lend(again));
        let bigger = spares.take(2 << 20);
        assert_eq!(bigger.len(), 2 << 20);
        assert!(bigger.capacity() >= 2 << 20);
    }
}
