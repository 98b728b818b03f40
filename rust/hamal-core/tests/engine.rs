//! Engine integration tests over real sparse files.

use hamal_core::checksum::ChecksumKind;
use hamal_core::engine::{verify, ChangedList, DiskPlan, Job, JobPlan, Tuning, MIB};
use hamal_core::io::IoMode;
use hamal_core::uri::DiskUri;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// A sparse disk with data in about half of its MiB blocks; returns the bytes of data.
fn make_disk(path: &Path, size: u64, seed: u64) -> u64 {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut data = 0;
    let mut x = seed;
    for i in 0..size / MIB {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        if x >> 62 == 0 || x >> 62 == 1 {
            let block: Vec<u8> = (0..MIB)
                .map(|j| ((j * 31 + i * 7 + seed) % 251) as u8)
                .collect();
            f.write_all_at(&block, i * MIB).unwrap();
            data += MIB;
        }
    }
    data
}

fn plan(src: &Path, dst: &Path, changed: Option<Vec<(i128, i128)>>, tuning: Tuning) -> JobPlan {
    JobPlan {
        disks: vec![DiskPlan {
            disk_id: "d0".into(),
            source: DiskUri::File(src.into()),
            target: DiskUri::File(dst.into()),
            changed: changed.map(|pairs| ChangedList {
                pairs,
                origin: "test".into(),
            }),
            journal: None,
            bitmap: None,
            source_id: None,
            version: None,
            parent: None,
            full_on_mismatch: false,
            snapshot_time: None,
        }],
        tuning,
    }
}

fn same(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

fn tmp() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let (s, t) = (d.path().join("src.raw"), d.path().join("dst.raw"));
    (d, s, t)
}

#[test]
fn full_then_incremental_is_identical_and_sparse() {
    for io_mode in [IoMode::Auto, IoMode::Pread] {
        let (_d, src, dst) = tmp();
        let data = make_disk(&src, 64 * MIB, 1);
        let tuning = Tuning {
            chunk_size: MIB,
            io_mode,
            checksum: Some(ChecksumKind::Blake3),
            ..Default::default()
        };
        let out = Job::run(plan(&src, &dst, None, tuning.clone())).unwrap();
        let s = out[0].as_ref().unwrap();
        assert!(same(&src, &dst));
        // Exactly the data (st_blocks would also count ext4's extent tree blocks).
        assert_eq!(s.bytes_written, data);
        let (bd, bs) = (
            std::fs::metadata(&dst).unwrap().blocks(),
            std::fs::metadata(&src).unwrap().blocks(),
        );
        // File-system metadata (extent tree blocks) may add a few blocks.
        assert!(
            bd <= bs + bs / 100 + 64,
            "target allocates {bd} blocks, source {bs}"
        );
        // The sync's content digest equals verify's over the same extents.
        let rep = verify(
            &DiskUri::File(src.clone()),
            &DiskUri::File(dst.clone()),
            None,
            &tuning,
            &std::sync::atomic::AtomicBool::new(false),
        )
        .unwrap();
        assert_eq!(rep.mismatched_chunks, 0);
        assert_eq!(Some(rep.content_digest), s.content_digest);

        // Change two ranges, one of them to zeros, then sync only those.
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.write_all_at(&[0xEE; 10_000], 5 * MIB + 100).unwrap();
        f.write_all_at(&vec![0u8; MIB as usize], 20 * MIB).unwrap();
        let changed = vec![
            (5 * MIB as i128 + 100, 10_000),
            (20 * MIB as i128, MIB as i128),
        ];
        let out = Job::run(plan(&src, &dst, Some(changed), tuning.clone())).unwrap();
        let s = out[0].as_ref().unwrap();
        assert_eq!(s.bytes_total, 10_000 + MIB);
        assert_eq!(s.bytes_zero, MIB);
        assert!(same(&src, &dst));
    }
}

#[test]
fn cancel_then_rerun_resumes_from_the_journal() {
    let (_d, src, dst) = tmp();
    make_disk(&src, 128 * MIB, 2);
    let slow = Tuning {
        chunk_size: MIB,
        bwlimit_bps: Some(64 * MIB),
        fsync_period: std::time::Duration::from_millis(100),
        ..Default::default()
    };
    let job = Job::start(plan(&src, &dst, None, slow)).unwrap();
    while job.progress().total.bytes_done < 24 * MIB {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    job.cancel();
    assert!(job.wait(Some(std::time::Duration::from_secs(10))));
    let err = job.outcomes()[0].clone().unwrap().unwrap_err();
    assert!(matches!(*err, hamal_core::Error::Cancelled), "{err}");
    assert!(dst.with_extension("raw.hamal-journal").exists());
    let out = Job::run(plan(
        &src,
        &dst,
        None,
        Tuning {
            chunk_size: MIB,
            ..Default::default()
        },
    ))
    .unwrap();
    let s = out[0].as_ref().unwrap();
    assert!(
        s.bytes_resumed >= 20 * MIB,
        "resumed only {}",
        s.bytes_resumed
    );
    assert_eq!(
        s.bytes_resumed + s.bytes_written + s.bytes_zero,
        s.bytes_total
    );
    assert!(same(&src, &dst));
    assert!(
        !dst.with_extension("raw.hamal-journal").exists(),
        "journal removed at commit"
    );
}

#[test]
fn smaller_target_is_refused_untouched() {
    let (_d, src, dst) = tmp();
    make_disk(&src, 8 * MIB, 3);
    std::fs::write(&dst, vec![7u8; MIB as usize]).unwrap();
    let out = Job::run(plan(&src, &dst, None, Tuning::default())).unwrap();
    let e = out[0].as_ref().unwrap_err().to_string();
    assert!(e.contains("smaller than the source"), "{e}");
    assert_eq!(std::fs::read(&dst).unwrap(), vec![7u8; MIB as usize]);
}

#[test]
fn full_sync_over_a_stale_target_zeroes_source_holes() {
    let (_d, src, dst) = tmp();
    make_disk(&src, 16 * MIB, 4);
    std::fs::write(&dst, vec![0x55u8; 16 * MIB as usize]).unwrap();
    Job::run(plan(&src, &dst, None, Tuning::default())).unwrap()[0]
        .as_ref()
        .unwrap();
    assert!(same(&src, &dst));
}

#[test]
fn several_disks_in_parallel() {
    let d = tempfile::tempdir().unwrap();
    let mut disks = Vec::new();
    for i in 0..3 {
        let (s, t) = (
            d.path().join(format!("s{i}")),
            d.path().join(format!("t{i}")),
        );
        make_disk(&s, 8 * MIB, 10 + i);
        disks.push(DiskPlan {
            disk_id: format!("d{i}"),
            source: DiskUri::File(s),
            target: DiskUri::File(t),
            changed: None,
            journal: None,
            bitmap: None,
            source_id: None,
            version: None,
            parent: None,
            full_on_mismatch: false,
            snapshot_time: None,
        });
    }
    let tuning = Tuning {
        parallel_disks: 2,
        ..Default::default()
    };
    let out = Job::run(JobPlan { disks, tuning }).unwrap();
    assert!(out.iter().all(|o| o.is_ok()));
    for i in 0..3 {
        assert!(same(
            &d.path().join(format!("s{i}")),
            &d.path().join(format!("t{i}"))
        ));
    }
}

#[test]
fn fewer_buffers_than_reads_in_flight_do_not_deadlock() {
    // 6 buffers for 4 readers of 4 reads each: readers that took buffers one at a time, each
    // holding part of a batch, used to wait for each other forever (8 disks at once did this).
    // A chunk store target runs the reader/writer pipeline; a file target, 4 copy threads.
    let (d, src, dst) = tmp();
    make_disk(&src, 64 * MIB, 5);
    let tuning = Tuning {
        chunk_size: MIB,
        readers: 4,
        writers: 4,
        queue_depth: 4,
        memory_budget: 6 * MIB,
        ..Default::default()
    };
    let store = format!("dir:{}", d.path().join("store").display());
    for target in [DiskUri::parse(&store).unwrap(), DiskUri::File(dst.clone())] {
        let mut job = plan(&src, &dst, None, tuning.clone());
        job.disks[0].target = target;
        job.disks[0].source_id = Some("snap".into());
        job.disks[0].journal = Some(d.path().join("journal"));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(Job::run(job).map(|o| o[0].is_ok())));
        let ok = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the sync did not finish within 60 s: readers deadlocked on buffers");
        assert!(ok.unwrap());
    }
    assert!(same(&src, &dst));
}

#[test]
fn zero_pieces_inside_data_chunks_stay_holes_or_are_zeroed() {
    // Written zeros in the middle of data (allocated, so they are read): the local copy skips
    // them on a fresh target (holes) and must zero them over a stale one.
    let (_d, src, dst) = tmp();
    let f = File::create(&src).unwrap();
    f.set_len(16 * MIB).unwrap();
    f.write_all_at(&vec![0xA5u8; 16 * MIB as usize], 0).unwrap();
    f.write_all_at(&vec![0u8; 3 * MIB as usize], 5 * MIB + 4096)
        .unwrap();
    f.sync_all().unwrap();
    let out = Job::run(plan(&src, &dst, None, Tuning::default())).unwrap();
    let s = out[0].as_ref().unwrap();
    assert!(same(&src, &dst));
    assert_eq!(s.bytes_total, 16 * MIB);
    let allocated = std::fs::metadata(&dst).unwrap().blocks() * 512;
    assert!(
        allocated < 14 * MIB,
        "the zero pieces were written: {allocated} bytes allocated"
    );
    std::fs::write(&dst, vec![0x55u8; 16 * MIB as usize]).unwrap();
    Job::run(plan(&src, &dst, None, Tuning::default())).unwrap()[0]
        .as_ref()
        .unwrap();
    assert!(same(&src, &dst), "zeros over a stale target");
}
