//! Store upkeep: list versions, verify them, prune old ones and collect unreferenced objects.

use super::codec::parse_digest;
use super::lock::{self, LockKind, STALE};
use super::repo::Store;
use super::tree;
use super::version::Version;
use super::{StoreOptions, StoreUri};
use crate::checksum::Digest;
use crate::holder::Holder;
use crate::{Error, Result};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// Versions of one disk or of all, oldest first, and the records that failed their check.
pub fn list_versions(
    uri: &StoreUri,
    o: &StoreOptions,
    disk: Option<&str>,
) -> Result<(Vec<Version>, Vec<String>)> {
    let store = Store::open(uri, o, false)?;
    let r = store.records(disk)?;
    let mut damaged: Vec<String> = r.damaged.iter().map(|(k, p)| format!("{k}: {p}")).collect();
    damaged.extend(store.behind_heads(&r, disk));
    Ok((r.good.into_values().flatten().collect(), damaged))
}

#[derive(Debug, Default, Serialize)]
pub struct StoreVerifyReport {
    pub versions: usize,
    pub chunks: u64,
    /// Bytes of chunk plaintext re-hashed (deep only).
    pub bytes_checked: u64,
    pub deep: bool,
    /// One line per problem: record, page or chunk with its disk offset.
    pub problems: Vec<String>,
    /// Damaged or missing chunks this verify marked in the quarantine (copies; nothing moved).
    pub quarantined: u64,
    /// Dead locks and temporary objects that `prune` removes (not damage).
    pub leftovers: Vec<String>,
}

const MAX_PROBLEMS: usize = 1000;

/// Which chunks a deep verify reads: all, or share `part` of `parts` (by name), so a schedule of
/// `parts` runs reads each chunk once.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub part: u32,
    pub parts: u32,
}

impl Sample {
    fn holds(&self, name: &Digest) -> bool {
        let n = u32::from_le_bytes(name[..4].try_into().expect("32-byte digest"));
        n % self.parts.max(1) == self.part % self.parts.max(1)
    }
}

/// Checks version records, index pages and chunks. Shallow: every referenced chunk exists.
/// Deep: every chunk (or the `sample`'s share) is read, decrypted, decompressed and re-hashed.
/// `cancel` stops it between batches of chunks (`Error::Cancelled`).
pub fn verify_store(
    uri: &StoreUri,
    o: &StoreOptions,
    disk: Option<&str>,
    version: Option<&str>,
    deep: bool,
    cancel: &AtomicBool,
) -> Result<StoreVerifyReport> {
    verify_sample(uri, o, disk, version, deep, None, cancel)
}

/// [`verify_store`], deep over `sample`'s share of the chunks only when one is given.
pub fn verify_sample(
    uri: &StoreUri,
    o: &StoreOptions,
    disk: Option<&str>,
    version: Option<&str>,
    deep: bool,
    sample: Option<Sample>,
    cancel: &AtomicBool,
) -> Result<StoreVerifyReport> {
    let store = Store::open(uri, o, false)?;
    let records = store.records(disk)?;
    let mut report = StoreVerifyReport {
        deep,
        ..Default::default()
    };
    report
        .problems
        .extend(records.damaged.iter().map(|(k, p)| format!("{k}: {p}")));
    report.problems.extend(store.behind_heads(&records, disk));
    let mut versions: Vec<Version> = records.good.into_values().flatten().collect();
    if let Some(id) = version {
        versions.retain(|v| v.version == id);
        if versions.is_empty() {
            return Err(Error::Plan(format!(
                "store {}: no version '{id}'{}",
                uri.text,
                disk.map(|d| format!(" of disk '{d}'")).unwrap_or_default()
            )));
        }
    }
    // First place each chunk is used: (record, offset, plaintext length).
    let mut first_use: HashMap<Digest, (String, u64, usize)> = HashMap::new();
    for v in &versions {
        report.versions += 1;
        let root = v.root_digest().expect("checked when parsed");
        let walked = tree::walk(&store, root, v.depth, &mut |_| {}, &mut |i, name| {
            let off = i * v.chunk_size;
            let len = v.chunk_size.min(v.size - off) as usize;
            first_use
                .entry(*name)
                .or_insert_with(|| (format!("disk '{}' version {}", v.disk, v.version), off, len));
            Ok(())
        });
        if let Err(e) = walked {
            report
                .problems
                .push(format!("disk '{}' version {}: {e}", v.disk, v.version));
        }
    }
    let uses: Vec<(Digest, (String, u64, usize))> = first_use
        .into_iter()
        .filter(|(name, _)| sample.is_none_or(|s| s.holds(name)))
        .collect();
    // Shallow: one listing of the chunks instead of a request per chunk.
    let present: HashSet<Digest> = if deep {
        HashSet::new()
    } else {
        store
            .backend
            .list("chunks/")?
            .iter()
            .filter_map(|o| o.key.rsplit('/').next().and_then(parse_digest))
            .collect()
    };
    let mut damaged: HashMap<Digest, String> = HashMap::new();
    let mut last_note = std::time::Instant::now();
    for (done, batch) in uses.chunks(8).enumerate() {
        if cancel.load(Relaxed) {
            return Err(Error::Cancelled);
        }
        if last_note.elapsed().as_secs() >= 10 {
            tracing::info!("verify: {} of {} chunks checked", done * 8, uses.len());
            last_note = std::time::Instant::now();
        }
        if report.problems.len() >= MAX_PROBLEMS {
            report.problems.push("too many problems; stopped".into());
            break;
        }
        let keys: Vec<String> = batch.iter().map(|(n, _)| Store::chunk_key(n)).collect();
        let results: Vec<Result<std::result::Result<usize, String>>> = if deep {
            store
                .backend
                .get_many(&keys)
                .into_iter()
                .zip(batch)
                .map(|(obj, (name, (_, _, len)))| {
                    Ok(store.decode_chunk(name, obj?, *len).map(|p| p.len()))
                })
                .collect()
        } else {
            batch
                .iter()
                .map(|(name, _)| {
                    Ok(if present.contains(name) {
                        Ok(0)
                    } else {
                        Err("missing".into())
                    })
                })
                .collect()
        };
        for ((name, (whom, off, len)), r) in batch.iter().zip(results) {
            report.chunks += 1;
            // A damaged read is read again before the chunk is called damaged: the answer may
            // have been garbled on its way.
            let r = match r? {
                Err(p) if p.starts_with("damaged") => reread(&store, name, *len).map_err(|_| p),
                r => r,
            };
            match r {
                Ok(n) => report.bytes_checked += n as u64,
                Err(p) => {
                    if p.starts_with("damaged") || p == "missing" {
                        damaged.insert(*name, p.clone());
                    }
                    report.problems.push(format!(
                        "{whom}: chunk at disk offset {off} ({}) is {p}",
                        Store::chunk_key(name)
                    ))
                }
            }
        }
    }
    if !damaged.is_empty() {
        quarantine(&store, &versions, &damaged, &mut report)?;
    }
    report.leftovers = leftovers(&store)?
        .into_iter()
        .map(|l| format!("{}: {}", l.key, l.why))
        .collect();
    Ok(report)
}

/// A chunk whose first read was damaged, read and decoded again: its length, or what is wrong.
fn reread(store: &Store, name: &Digest, len: usize) -> std::result::Result<usize, String> {
    let key = Store::chunk_key(name);
    let obj = store.backend.get(&key).map_err(|e| e.to_string())?;
    let plain = store.decode_chunk(name, obj, len)?;
    tracing::warn!(store = %store.uri.text, "chunk {key} read damaged once and whole the second time: an answer was garbled on its way");
    Ok(plain.len())
}

/// Quarantines damaged chunks (a copy: the next sync of their content uploads them again) and
/// reports every version and disk offset that uses each.
fn quarantine(
    store: &Store,
    versions: &[Version],
    damaged: &HashMap<Digest, String>,
    report: &mut StoreVerifyReport,
) -> Result<()> {
    for (name, why) in damaged {
        store.quarantine_chunk(name, why)?;
        report.quarantined += 1;
    }
    for v in versions {
        let root = v.root_digest().expect("checked when parsed");
        let mut uses = Vec::new();
        // A walk that fails was reported above.
        let _ = tree::walk(store, root, v.depth, &mut |_| {}, &mut |i, name| {
            if damaged.contains_key(name) {
                uses.push(i * v.chunk_size);
            }
            Ok(())
        });
        if !uses.is_empty() {
            let shown: Vec<String> = uses.iter().take(20).map(u64::to_string).collect();
            report.problems.push(format!(
                "disk '{}' version {} uses {} quarantined chunk(s), at disk offset {}{}: a sync of the same data heals them",
                v.disk,
                v.version,
                uses.len(),
                shown.join(", "),
                if uses.len() > 20 { ", ..." } else { "" }
            ));
        }
    }
    Ok(())
}

/// Something a killed run left behind.
struct Leftover {
    key: String,
    why: String,
    temporary: bool,
}

/// Dead locks, and temporary objects older than [`STALE`] (no write takes that long).
fn leftovers(store: &Store) -> Result<Vec<Leftover>> {
    let mut out: Vec<Leftover> = lock::survey(&store.backend, None)?
        .into_iter()
        .filter_map(|l| {
            l.dead.map(|why| Leftover {
                why: format!("dead lock of {} ({why})", l.body.holder.describe()),
                key: l.key,
                temporary: false,
            })
        })
        .collect();
    let now = std::time::SystemTime::now();
    for t in store.backend.list_temporaries()? {
        let age = now.duration_since(t.modified).unwrap_or_default();
        if age >= STALE {
            out.push(Leftover {
                key: t.key,
                why: format!(
                    "temporary object of an interrupted write, {} minutes old",
                    age.as_secs() / 60
                ),
                temporary: true,
            });
        }
    }
    Ok(out)
}

#[derive(Debug, Default, Serialize)]
pub struct PruneReport {
    /// `disk/version` of each removed version.
    pub removed_versions: Vec<String>,
    pub kept_versions: usize,
    /// Why garbage collection did not run (a sync holds the store, a damaged record...).
    pub gc_skipped: Option<String>,
    pub removed_chunks: u64,
    pub removed_pages: u64,
    /// Dead locks removed.
    pub removed_locks: u64,
    /// Temporary objects of interrupted writes removed.
    pub removed_temporaries: u64,
    /// Quarantined chunks removed (uploaded again since, or no longer used).
    pub removed_quarantined: u64,
}

/// Keeps the newest `keep` versions of each disk (or of `disk`), then (with `collect`) removes
/// chunks and pages no remaining version references. Collection runs under the exclusive lock
/// and is skipped while a sync runs; removing version records is always safe.
pub fn prune(
    uri: &StoreUri,
    o: &StoreOptions,
    keep: usize,
    disk: Option<&str>,
    collect: bool,
) -> Result<PruneReport> {
    prune_then(uri, o, keep, disk, &mut || {}, collect)
}

/// `prune`, running `before_collection` just before the collection takes its lock (where a
/// sync of another disk may commit; the tests put one there).
fn prune_then(
    uri: &StoreUri,
    o: &StoreOptions,
    keep: usize,
    disk: Option<&str>,
    before_collection: &mut dyn FnMut(),
    collect: bool,
) -> Result<PruneReport> {
    if !(1..=129).contains(&keep) {
        return Err(Error::Plan(format!(
            "--keep {keep} is out of range: use 1 to 129"
        )));
    }
    let store = Store::open(uri, o, false)?;
    let records = store.records(None)?;
    let mut report = PruneReport::default();
    for (d, list) in records.good {
        let cut = if disk.is_none_or(|want| want == d) {
            list.len().saturating_sub(keep)
        } else {
            0
        };
        for v in &list[..cut] {
            store.delete_version(v)?;
            report
                .removed_versions
                .push(format!("{}/{}", v.disk, v.version));
        }
        report.kept_versions += list.len() - cut;
    }
    for l in leftovers(&store)? {
        store.backend.delete(&l.key)?;
        if l.temporary {
            report.removed_temporaries += 1;
        } else {
            report.removed_locks += 1;
        }
    }
    if !collect {
        report.gc_skipped = Some("collection was not asked for".into());
        return Ok(report);
    }
    before_collection();
    let _lock = match lock::acquire(
        &store.backend,
        LockKind::Exclusive,
        Holder::me("prune", "prune"),
        None,
    ) {
        Ok(l) => l,
        Err(e) => {
            report.gc_skipped = Some(e.to_string());
            return Ok(report);
        }
    };
    // What to keep is read under the lock: a sync that committed after the listing above (and
    // released its lock before this one was taken) must not lose its chunks.
    let records = store.records(None)?;
    if let Some((key, problem)) = records.damaged.first() {
        report.gc_skipped = Some(format!(
            "damaged version record {key} ({problem}): its chunks cannot be told apart"
        ));
        return Ok(report);
    }
    let kept: Vec<Version> = records.good.into_values().flatten().collect();
    let (mut pages, mut chunks) = (HashSet::new(), HashSet::new());
    for v in &kept {
        let root = v.root_digest().expect("checked when parsed");
        let walked = tree::walk(
            &store,
            root,
            v.depth,
            &mut |p| {
                pages.insert(*p);
            },
            &mut |_, c| {
                chunks.insert(*c);
                Ok(())
            },
        );
        if let Err(e) = walked {
            report.gc_skipped = Some(format!("disk '{}' version {}: {e}", v.disk, v.version));
            return Ok(report);
        }
    }
    for (prefix, live, count) in [
        ("chunks/", &chunks, &mut report.removed_chunks),
        ("index/", &pages, &mut report.removed_pages),
    ] {
        for item in store.backend.list(prefix)? {
            let name = item.key.rsplit('/').next().and_then(parse_digest);
            if name.is_some_and(|n| !live.contains(&n)) {
                store.backend.delete(&item.key)?;
                *count += 1;
            }
        }
    }
    // The quarantine keeps a damaged copy while a version needs that chunk (a sync that
    // uploads the chunk again drops the entry itself).
    for item in store.backend.list("quarantine/")? {
        let name = item.key.rsplit('/').next().and_then(parse_digest);
        if let Some(n) = name {
            if !chunks.contains(&n) {
                store.backend.delete(&item.key)?;
                report.removed_quarantined += 1;
            }
        }
    }
    store.backend.sync()?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{DiskPlan, Job, JobPlan, Tuning, MIB};
    use crate::uri::DiskUri;
    use std::path::Path;

    fn sync(store: &str, src: &Path, disk: &str, o: &StoreOptions) -> String {
        let plan = JobPlan {
            disks: vec![DiskPlan {
                disk_id: disk.into(),
                source: DiskUri::File(src.into()),
                target: DiskUri::parse(store).unwrap(),
                changed: None,
                journal: Some(src.with_extension("journal")),
                bitmap: None,
                source_id: None,
                version: None,
                parent: None,
                full_on_mismatch: false,
                snapshot_time: None,
            }],
            tuning: Tuning {
                chunk_size: MIB,
                store: o.clone(),
                ..Default::default()
            },
        };
        let summary = Job::run(plan).unwrap().pop().unwrap().unwrap();
        summary.version.unwrap()
    }

    #[test]
    fn a_version_committed_while_a_prune_starts_keeps_its_chunks() {
        let d = tempfile::tempdir().unwrap();
        let store = format!("dir:{}", d.path().join("store").display());
        let uri = StoreUri::parse(&store).unwrap().unwrap();
        let o = StoreOptions::default();
        let (a, b) = (d.path().join("a.raw"), d.path().join("b.raw"));
        std::fs::write(&a, vec![7u8; 2 * MIB as usize]).unwrap();
        let data: Vec<u8> = (0..2 * MIB as u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&b, data).unwrap();
        sync(&store, &a, "a", &o);
        // Disk b commits its first version after the prune of disk a listed the versions.
        let report = prune_then(
            &uri,
            &o,
            1,
            Some("a"),
            &mut || {
                sync(&store, &b, "b", &o);
            },
            true,
        )
        .unwrap();
        assert!(report.gc_skipped.is_none());
        let never = AtomicBool::new(false);
        let check = verify_store(&uri, &o, None, None, true, &never).unwrap();
        assert!(check.problems.is_empty(), "{:?}", check.problems);
        assert_eq!(check.versions, 2);
    }
}
