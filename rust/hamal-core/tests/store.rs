//! Chunk store over a local directory: versions, restore, dedup, damage, encryption, prune.

use hamal_core::engine::{ChangedList, DiskPlan, Job, JobPlan, Tuning, MIB};
use hamal_core::store::{self, StoreOptions, StoreUri};
use hamal_core::uri::DiskUri;
use hamal_core::Error;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

type R<T> = Result<T, Arc<Error>>;

/// A cancel flag that is never raised.
static NEVER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn fill(path: &Path, size: u64, blocks: &[(u64, u8)]) {
    let f = File::options()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .unwrap();
    f.set_len(size).unwrap();
    for &(mib, v) in blocks {
        let data: Vec<u8> = (0..MIB).map(|j| (j % 251) as u8 ^ v).collect();
        f.write_all_at(&data, mib * MIB).unwrap();
    }
}

struct Env {
    _dir: tempfile::TempDir,
    root: PathBuf,
    store: String,
}

impl Env {
    fn new() -> Env {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().to_owned();
        let store = format!("dir:{}", root.join("store").display());
        Env {
            _dir: d,
            root,
            store,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn tuning(&self, o: &StoreOptions) -> Tuning {
        Tuning {
            chunk_size: MIB,
            store: o.clone(),
            ..Default::default()
        }
    }

    fn run(
        &self,
        source: DiskUri,
        target: DiskUri,
        changed: Option<Vec<(i128, i128)>>,
        version: Option<&str>,
        o: &StoreOptions,
    ) -> R<hamal_core::engine::DiskSummary> {
        let plan = JobPlan {
            disks: vec![DiskPlan {
                disk_id: "vm1-disk0".into(),
                source,
                target,
                changed: changed.map(|pairs| ChangedList {
                    pairs,
                    origin: "test".into(),
                }),
                journal: Some(self.path("journal")),
                bitmap: None,
                source_id: Some("snap".into()),
                version: version.map(str::to_owned),
                parent: None,
                full_on_mismatch: false,
                snapshot_time: None,
            }],
            tuning: self.tuning(o),
        };
        Job::run(plan).unwrap().pop().unwrap()
    }

    fn sync(&self, src: &Path, changed: Option<Vec<(i128, i128)>>, o: &StoreOptions) -> R<String> {
        let store = DiskUri::parse(&self.store).unwrap();
        Ok(self
            .run(DiskUri::File(src.into()), store, changed, None, o)?
            .version
            .unwrap())
    }

    fn restore(&self, version: &str, out: &Path, o: &StoreOptions) -> R<()> {
        let store = DiskUri::parse(&self.store).unwrap();
        self.run(store, DiskUri::File(out.into()), None, Some(version), o)
            .map(|_| ())
    }

    fn uri(&self) -> StoreUri {
        StoreUri::parse(&self.store).unwrap().unwrap()
    }

    fn objects(&self, folder: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.join("store").join(folder)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p)
                } else {
                    out.push(p)
                }
            }
        }
        out
    }
}

fn same(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[test]
fn versions_restore_identical_and_dedup() {
    let env = Env::new();
    let o = StoreOptions::default();
    let src = env.path("src.raw");
    fill(&src, 16 * MIB + 4096, &[(0, 1), (3, 2), (4, 2), (9, 3)]);
    let v1 = env.sync(&src, None, &o).unwrap();
    std::fs::copy(&src, env.path("v1.raw")).unwrap();
    let chunks_after_v1 = env.objects("chunks").len();
    assert_eq!(
        chunks_after_v1, 3,
        "blocks 3 and 4 hold equal data: stored once"
    );

    // Change block 9 to zeros (a hole), block 5 gets data, a 4 KiB write at the odd tail.
    fill(&src, 16 * MIB + 4096, &[(5, 7)]);
    File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .write_all_at(&[0u8; MIB as usize], 9 * MIB)
        .unwrap();
    File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .write_all_at(&[5u8; 4096], 16 * MIB)
        .unwrap();
    let changed = vec![
        (5 * MIB as i128, MIB as i128),
        (9 * MIB as i128, MIB as i128),
        (16 * MIB as i128, 4096),
    ];
    let v2 = env.sync(&src, Some(changed), &o).unwrap();
    assert!(v2 > v1);

    // An unchanged disk with an empty change list stores nothing but the record.
    let before = env.objects("chunks").len() + env.objects("index").len();
    let v3 = env.sync(&src, Some(vec![]), &o).unwrap();
    assert_eq!(
        env.objects("chunks").len() + env.objects("index").len(),
        before
    );

    for (v, want) in [
        (&v1, env.path("v1.raw")),
        (&v2, src.clone()),
        (&v3, src.clone()),
    ] {
        let out = env.path(&format!("restore-{v}.raw"));
        env.restore(v, &out, &o).unwrap();
        assert!(same(&out, &want), "version {v} restores identical");
    }
    let (versions, damaged) = store::list_versions(&env.uri(), &o, Some("vm1-disk0")).unwrap();
    assert!(damaged.is_empty());
    assert_eq!(
        versions
            .iter()
            .map(|v| v.version.clone())
            .collect::<Vec<_>>(),
        vec![v1.clone(), v2.clone(), v3.clone()]
    );
    assert_eq!(versions[1].parent.as_deref(), Some(v1.as_str()));
    assert_eq!(versions[1].stats.chunks_changed, 3);

    // Prune to the newest one; the older restore is gone, the kept one is identical.
    let r = store::prune(&env.uri(), &o, 1, None, true).unwrap();
    assert_eq!(r.removed_versions.len(), 2);
    assert!(r.gc_skipped.is_none(), "{:?}", r.gc_skipped);
    assert!(
        r.removed_chunks >= 1,
        "block 9's old data is no longer referenced"
    );
    let out = env.path("after-prune.raw");
    env.restore(&v3, &out, &o).unwrap();
    assert!(same(&out, &src));
    assert!(
        store::verify_store(&env.uri(), &o, None, None, true, &NEVER)
            .unwrap()
            .problems
            .is_empty()
    );
}

#[test]
fn damaged_and_missing_chunks_are_reported_with_their_offset() {
    let env = Env::new();
    let o = StoreOptions::default();
    let src = env.path("src.raw");
    fill(&src, 8 * MIB, &[(2, 1), (6, 2)]);
    let v = env.sync(&src, None, &o).unwrap();
    let mut chunks = env.objects("chunks");
    chunks.sort();
    // Flip one byte in one chunk and remove the other.
    let mut bytes = std::fs::read(&chunks[0]).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(&chunks[0], bytes).unwrap();
    std::fs::remove_file(&chunks[1]).unwrap();

    let shallow = store::verify_store(&env.uri(), &o, None, None, false, &NEVER).unwrap();
    assert_eq!(shallow.problems.len(), 2, "{:?}", shallow.problems);
    assert!(
        shallow.problems[0].contains("is missing"),
        "{:?}",
        shallow.problems
    );
    // The missing chunk is marked suspect: the next sync with its content uploads it, whatever
    // the store says it has.
    assert_eq!(shallow.quarantined, 1);
    let deep = store::verify_store(&env.uri(), &o, None, None, true, &NEVER).unwrap();
    assert_eq!(deep.problems.len(), 3, "{:?}", deep.problems);
    assert!(deep.problems.iter().any(|p| p.contains("damaged")));
    for p in &deep.problems {
        assert!(
            p.contains("disk offset 2097152") || p.contains("disk offset 6291456"),
            "{p}"
        );
    }
    // The damaged chunk was copied to the quarantine (nothing is deleted on a verify's word),
    // and the problem names the version and offsets using them.
    assert_eq!(deep.quarantined, 2);
    assert!(chunks[0].exists());
    assert!(
        deep.problems[2].contains("uses 2 quarantined chunk(s), at disk offset 2097152, 6291456"),
        "{:?}",
        deep.problems
    );
    assert_eq!(env.objects("quarantine").len(), 2);
    let e = env.restore(&v, &env.path("out.raw"), &o).unwrap_err();
    assert!(matches!(*e, Error::Mismatch(_)), "{e}");
    assert!(e.to_string().contains("disk offset"), "{e}");

    // A full sync of the same data uploads both chunks again (the quarantined one although an
    // object is there): every version restores, and the healed chunk's quarantine entry goes.
    env.sync(&src, None, &o).unwrap();
    let again = store::verify_store(&env.uri(), &o, None, None, true, &NEVER).unwrap();
    assert!(again.problems.is_empty(), "{:?}", again.problems);
    let out = env.path("healed.raw");
    env.restore(&v, &out, &o).unwrap();
    assert!(same(&out, &src));
    assert!(env.objects("quarantine").is_empty());
}

#[test]
fn a_good_chunk_an_older_verify_moved_to_the_quarantine_still_restores() {
    let env = Env::new();
    let o = StoreOptions::default();
    let src = env.path("src.raw");
    fill(&src, 8 * MIB, &[(2, 1), (6, 2)]);
    let v = env.sync(&src, None, &o).unwrap();
    // What an older release's verify did after one garbled read: the whole object moved.
    let chunk = env.objects("chunks").pop().unwrap();
    let name = chunk.file_name().unwrap().to_owned();
    let aside = env
        .path("store/quarantine")
        .join(&name.to_str().unwrap()[..2]);
    std::fs::create_dir_all(&aside).unwrap();
    std::fs::rename(&chunk, aside.join(&name)).unwrap();
    let out = env.path("out.raw");
    env.restore(&v, &out, &o).unwrap();
    assert!(same(&out, &src));
    // A sync with the content uploads it to its place again and drops the entry.
    env.sync(&src, None, &o).unwrap();
    assert!(chunk.exists());
    assert!(env.objects("quarantine").is_empty());
}

#[test]
fn an_incremental_rereads_chunks_its_parent_has_in_quarantine() {
    let env = Env::new();
    let o = StoreOptions::default();
    let src = env.path("src.raw");
    fill(&src, 8 * MIB, &[(2, 1), (6, 2)]);
    let v1 = env.sync(&src, None, &o).unwrap();
    let mut chunks = env.objects("chunks");
    chunks.sort();
    let mut bytes = std::fs::read(&chunks[0]).unwrap();
    bytes[20] ^= 0xff;
    std::fs::write(&chunks[0], bytes).unwrap();
    assert_eq!(
        store::verify_store(&env.uri(), &o, None, None, true, &NEVER)
            .unwrap()
            .quarantined,
        1
    );
    // Nothing changed: the incremental still reads the quarantined chunk and heals the store.
    let v2 = env.sync(&src, Some(vec![]), &o).unwrap();
    for v in [&v1, &v2] {
        let out = env.path(&format!("{v}.raw"));
        env.restore(v, &out, &o).unwrap();
        assert!(same(&out, &src), "version {v}");
    }
    assert!(
        env.objects("quarantine").is_empty(),
        "healed: no entry left"
    );
}

#[test]
fn encrypted_store_needs_its_key() {
    let env = Env::new();
    let key = env.path("key");
    std::fs::write(&key, "11".repeat(32)).unwrap();
    let o = StoreOptions {
        key_file: Some(key.clone()),
        ..Default::default()
    };
    let src = env.path("src.raw");
    fill(&src, 4 * MIB, &[(1, 9)]);
    let v = env.sync(&src, None, &o).unwrap();
    let out = env.path("out.raw");
    env.restore(&v, &out, &o).unwrap();
    assert!(same(&out, &src));
    // The plaintext's BLAKE3 does not appear as an object name.
    let data = std::fs::read(&src).unwrap();
    let plain_name = hamal_core::store::codec::hex(
        blake3::hash(&data[MIB as usize..2 * MIB as usize]).as_bytes(),
    );
    assert!(env
        .objects("chunks")
        .iter()
        .all(|p| !p.ends_with(&plain_name)));

    let wrong = env.path("wrong");
    std::fs::write(&wrong, "22".repeat(32)).unwrap();
    let bad = StoreOptions {
        key_file: Some(wrong),
        ..Default::default()
    };
    let e = env.restore(&v, &out, &bad).unwrap_err().to_string();
    assert!(e.contains("is not this store's key"), "{e}");
    let e = env
        .restore(&v, &out, &StoreOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("the store is encrypted"), "{e}");
}

/// Rewrites the record of `version` as someone with write access to the store but without its
/// key can: any field (the MAC too), and a checksum that matches.
fn forge_record(env: &Env, version: &str, change: impl FnOnce(&mut store::Version)) {
    let path = env.path(&format!("store/versions/vm1-disk0/{version}.json"));
    let mut v: store::Version = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    change(&mut v);
    v.checksum.clear();
    v.checksum = store::codec::hex(blake3::hash(&serde_json::to_vec(&v).unwrap()).as_bytes());
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// An encrypted store's options, and a 4 MiB disk with data in its second MiB.
fn encrypted_store_and_disk() -> (Env, StoreOptions, PathBuf) {
    let env = Env::new();
    let key = env.path("key");
    std::fs::write(&key, "11".repeat(32)).unwrap();
    let o = StoreOptions {
        key_file: Some(key),
        ..Default::default()
    };
    let src = env.path("src.raw");
    fill(&src, 4 * MIB, &[(1, 9)]);
    (env, o, src)
}

#[test]
fn version_records_of_an_encrypted_store_cannot_be_forged_without_the_key() {
    let (env, o, src) = encrypted_store_and_disk();
    let v1 = env.sync(&src, None, &o).unwrap();
    fill(&src, 4 * MIB, &[(1, 7), (2, 7)]);
    let v2 = env.sync(&src, None, &o).unwrap();
    let records = env.path("store/versions/vm1-disk0");
    let read = |id: &str| -> store::Version {
        serde_json::from_slice(&std::fs::read(records.join(format!("{id}.json"))).unwrap()).unwrap()
    };
    assert!(read(&v2).mac.is_some());
    // The newest record pointed at the older version's content: refused, not restored.
    let old_root = read(&v1).root;
    forge_record(&env, &v2, |v| {
        v.root = old_root;
        v.mac = None;
    });
    let out = env.path("out.raw");
    let e = env.restore(&v2, &out, &o).unwrap_err().to_string();
    assert!(e.contains("no MAC"), "{e}");
    let report = store::verify_store(&env.uri(), &o, None, None, true, &NEVER).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains(&v2) && p.contains("MAC")),
        "{:?}",
        report.problems
    );
    // A MAC kept but the content changed: refused too.
    let mac = read(&v1).mac;
    forge_record(&env, &v2, |v| {
        v.mac = mac;
        v.stats.bytes_read += 1;
    });
    let e = env.restore(&v2, &out, &o).unwrap_err().to_string();
    assert!(e.contains("not authentic"), "{e}");
}

#[test]
fn records_written_before_macs_are_read_with_a_warning() {
    let (env, o, src) = encrypted_store_and_disk();
    let v = env.sync(&src, None, &o).unwrap();
    // What a store of an older release holds: no MACs, and no word of them in its config.
    forge_record(&env, &v, |v| v.mac = None);
    let config = env.path("store/hamal-store.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let old = text.replace(",\n    \"authenticated_records\": true", "");
    assert_ne!(old, text, "{text}");
    std::fs::write(&config, old).unwrap();
    let out = env.path("out.raw");
    env.restore(&v, &out, &o).unwrap();
    assert!(same(&out, &src));
    // New records of that store carry a MAC.
    let v2 = env.sync(&src, None, &o).unwrap();
    let path = env.path(&format!("store/versions/vm1-disk0/{v2}.json"));
    let rec: store::Version = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    assert!(rec.mac.is_some());
}

#[test]
fn a_store_that_lost_the_newest_version_this_host_committed_is_not_built_on() {
    let env = Env::new();
    let o = StoreOptions {
        local_metadata: Some(env.path("lib/snapshot_metadata")),
        ..Default::default()
    };
    let src = env.path("src.raw");
    fill(&src, 4 * MIB, &[(1, 9)]);
    let v1 = env.sync(&src, None, &o).unwrap();
    fill(&src, 4 * MIB, &[(2, 5)]);
    let v2 = env
        .sync(&src, Some(vec![(2 * MIB as i128, MIB as i128)]), &o)
        .unwrap();
    assert!(v2 > v1);
    // Someone deletes the newest record: the older one must not become the parent in silence.
    std::fs::remove_file(env.path(&format!("store/versions/vm1-disk0/{v2}.json"))).unwrap();
    let e = env.sync(&src, Some(vec![]), &o).unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "version {v2} of disk 'vm1-disk0', which this host committed, is gone"
        )),
        "{e}"
    );
    let store = DiskUri::parse(&env.store).unwrap();
    let out = env.path("out.raw");
    let e = env
        .run(store, DiskUri::File(out), None, None, &o)
        .unwrap_err();
    assert!(e.to_string().contains("is gone"), "{e}");
    // A full sync is always possible, and it becomes the newest again.
    env.sync(&src, None, &o).unwrap();
    env.sync(&src, Some(vec![]), &o).unwrap();
}

#[test]
fn incremental_needs_a_parent_and_bad_ids_are_refused() {
    let env = Env::new();
    let o = StoreOptions::default();
    let src = env.path("src.raw");
    fill(&src, 4 * MIB, &[(1, 9)]);
    let e = env
        .sync(&src, Some(vec![(0, 4096)]), &o)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("has no version yet") && e.contains("run a full sync"),
        "{e}"
    );
    assert!(
        !env.path("store").exists(),
        "a refused run creates no store"
    );
    let e = env
        .restore("nope", &env.path("o.raw"), &o)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not a hamal chunk store") || e.contains("does not exist"),
        "{e}"
    );
    assert!(StoreUri::parse("s3://AB").unwrap().is_err());
}

#[test]
fn garbage_collection_waits_for_readers() {
    let env = Env::new();
    let o = StoreOptions::default();
    let src = env.path("src.raw");
    fill(&src, 4 * MIB, &[(1, 9)]);
    env.sync(&src, None, &o).unwrap();
    let reading = store::StoreSource::open(&env.uri(), &o, "vm1-disk0", None).unwrap();
    let r = store::prune(&env.uri(), &o, 1, None, true).unwrap();
    let why = r
        .gc_skipped
        .expect("collection skipped while a restore reads");
    assert!(
        why.contains("busy") && why.contains("restore of disk vm1-disk0"),
        "{why}"
    );
    drop(reading);
    assert!(store::prune(&env.uri(), &o, 1, None, true)
        .unwrap()
        .gc_skipped
        .is_none());
}
