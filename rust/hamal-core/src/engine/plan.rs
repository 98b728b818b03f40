//! What a job is asked to do, validated before any disk is touched.

use crate::checksum::ChecksumKind;
use crate::fc::FcOptions;
use crate::io::IoMode;
use crate::store::StoreOptions;
use crate::uri::DiskUri;
use crate::vddk::VddkOptions;
use crate::{Error, Result};
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

pub const MIB: u64 = 1024 * 1024;

/// Engine settings shared by the disks of a job. Defaults follow `hamal.conf`'s defaults.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// Grid the engine cuts extents along; one journal entry and one checksum per chunk.
    pub chunk_size: u64,
    /// Reader threads per disk (`[data_sync_v2] pre_disk_readers_count`).
    pub readers: u32,
    /// Writer threads per disk. One by default: on small hosts more threads take CPU from the
    /// kernel's write-back and make a full sync slower (measured with tools/bench).
    pub writers: u32,
    /// Requests each reader or writer keeps in flight (io_uring queue depth).
    pub queue_depth: u32,
    /// Disks synced at once (`[data_sync_v2] parallel_sync_disks_count`).
    pub parallel_disks: u32,
    /// Per-chunk checksum; `None` skips hashing (a file target does not need it).
    pub checksum: Option<ChecksumKind>,
    /// Milliseconds of sleep per MB read (`[period] *_release_cpu_time`).
    pub release_cpu_ms_per_mb: u32,
    /// Job-wide read cap in bytes per second.
    pub bwlimit_bps: Option<u64>,
    pub io_mode: IoMode,
    /// Upper bound for chunk buffers in flight over the whole job (192 MiB by default: with
    /// the process's own ~30 MiB and the per-disk state, a job of 8 disks stays under 256 MiB).
    pub memory_budget: u64,
    /// Target flush and journal cadence (`[data_sync_v2] fsync_period_frequency`).
    pub fsync_period: Duration,
    /// A flush slower than this is logged as a warning (`[data_sync_v2] fsync_timeout`; 0 = off).
    pub fsync_warn_after: Option<Duration>,
    /// How chunk stores are opened (compression, key, S3 connection, metadata copies).
    pub store: StoreOptions,
    /// Where VDDK is and how it reads (`[vmware]`).
    pub vddk: VddkOptions,
    /// FusionCompute data channel limits (`[fusion_compute]`).
    pub fc: FcOptions,
    /// Where locks of targets that are not local files live (NBD exports; `hamal_lib_dir/locks`).
    pub lock_dir: PathBuf,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            chunk_size: 4 * MIB,
            readers: 2,
            writers: 1,
            queue_depth: 4,
            parallel_disks: 4,
            checksum: None,
            release_cpu_ms_per_mb: 0,
            bwlimit_bps: None,
            io_mode: IoMode::Auto,
            memory_budget: 192 * MIB,
            fsync_period: Duration::from_secs(3),
            fsync_warn_after: None,
            store: StoreOptions::default(),
            vddk: VddkOptions::default(),
            fc: FcOptions {
                max_connections_per_host: 8,
                local_ip: None,
            },
            lock_dir: std::env::temp_dir().join("hamal-locks"),
        }
    }
}

/// The changed extents of an incremental sync, as handed over (validated against the disk
/// size once the source is open). `origin` names where they came from, for messages.
#[derive(Clone, Debug)]
pub struct ChangedList {
    pub pairs: Vec<(i128, i128)>,
    pub origin: String,
}

#[derive(Clone, Debug)]
pub struct DiskPlan {
    pub disk_id: String,
    pub source: DiskUri,
    pub target: DiskUri,
    /// `None`: full sync of every allocated extent, holes made zero on the target.
    pub changed: Option<ChangedList>,
    /// Resume journal; `None` puts it beside a file target (`TARGET.hamal-journal`).
    pub journal: Option<PathBuf>,
    /// Dirty bitmap of an NBD source whose extents are the changes to sync.
    pub bitmap: Option<String>,
    /// Names the snapshot being read (for example a platform's snapshot id). A journal is
    /// trusted only for the same source identity: the file's mtime, or this id.
    pub source_id: Option<String>,
    /// For a chunk-store source: the version to read (`None`: the disk's newest).
    pub version: Option<String>,
    /// For a chunk-store target: the version the changes are relative to (`None`: the newest).
    pub parent: Option<String>,
    /// For a chunk-store target: sync in full, saying why, when the parent cannot be used.
    pub full_on_mismatch: bool,
    /// When the source's content was taken (RFC 3339), recorded as the version's time.
    pub snapshot_time: Option<String>,
}

impl DiskPlan {
    pub fn journal_path(&self) -> Result<PathBuf> {
        if let Some(j) = &self.journal {
            return Ok(j.clone());
        }
        let target = self.target.file_path().ok_or_else(|| {
            Error::Plan(format!(
                "disk '{}': target {} needs an explicit journal path",
                self.disk_id, self.target
            ))
        })?;
        let mut p = target.as_os_str().to_owned();
        p.push(".hamal-journal");
        Ok(PathBuf::from(p))
    }
}

#[derive(Clone, Debug)]
pub struct JobPlan {
    pub disks: Vec<DiskPlan>,
    pub tuning: Tuning,
}

fn check_range(name: &str, v: u64, lo: u64, hi: u64) -> Result<()> {
    if v < lo || v > hi {
        return Err(Error::Plan(format!(
            "{name} = {v} is out of range: use {lo} to {hi}"
        )));
    }
    Ok(())
}

/// Chunk sizes the engine accepts: 4 KiB to 256 MiB, in whole 4 KiB pages.
pub fn check_chunk_size(chunk_size: u64) -> Result<()> {
    check_range("chunk size", chunk_size, 4096, 256 * MIB)?;
    if chunk_size % 4096 != 0 {
        return Err(Error::Plan(format!(
            "chunk size = {chunk_size} is not a multiple of 4096"
        )));
    }
    Ok(())
}

impl JobPlan {
    pub fn validate(&self) -> Result<()> {
        let t = &self.tuning;
        check_range("chunk size", t.chunk_size, 4096, 256 * MIB)?;
        if t.chunk_size % 4096 != 0 {
            return Err(Error::Plan(format!(
                "chunk size = {} is not a multiple of 4096",
                t.chunk_size
            )));
        }
        check_range("readers", t.readers.into(), 1, 64)?;
        check_range("writers", t.writers.into(), 1, 64)?;
        check_range("queue depth", t.queue_depth.into(), 1, 256)?;
        check_range("parallel disks", t.parallel_disks.into(), 1, 256)?;
        let per_disk =
            t.memory_budget / u64::from(t.parallel_disks.min(self.disks.len().max(1) as u32));
        if per_disk < 2 * t.chunk_size {
            return Err(Error::Plan(format!(
                "memory budget {} bytes is too small: each of the disks synced at once needs two chunks of {} bytes",
                t.memory_budget, t.chunk_size
            )));
        }
        if self.disks.is_empty() {
            return Err(Error::Plan("the plan has no disks".into()));
        }
        let (mut ids, mut targets) = (HashSet::new(), HashSet::new());
        for d in &self.disks {
            if d.bitmap.is_some() && !matches!(d.source, DiskUri::Nbd(_)) {
                return Err(Error::Plan(format!(
                    "disk '{}': a dirty bitmap needs an NBD source",
                    d.disk_id
                )));
            }
            if let DiskUri::Rbd(_) | DiskUri::Vddk(_) | DiskUri::Fc(_) = &d.target {
                return Err(Error::Plan(format!(
                    "disk '{}': target {}: {}",
                    d.disk_id,
                    d.target,
                    super::disk::SOURCE_ONLY
                )));
            }
            if let (DiskUri::Rbd(u), Some(_)) = (&d.source, &d.changed) {
                if u.from_snap.is_some() {
                    return Err(Error::Plan(format!(
                        "disk '{}': give a changed list or from_snap in {}, not both",
                        d.disk_id, u.text
                    )));
                }
            }
            if d.bitmap.is_some() && d.changed.is_some() {
                return Err(Error::Plan(format!(
                    "disk '{}': give a changed list or a bitmap, not both",
                    d.disk_id
                )));
            }
            if d.version.is_some() && !matches!(d.source, DiskUri::Store(_)) {
                return Err(Error::Plan(format!(
                    "disk '{}': a version is only chosen when reading from a chunk store",
                    d.disk_id
                )));
            }
            if matches!(d.target, DiskUri::Store(_)) {
                crate::store::version::check_disk_id(&d.disk_id).map_err(Error::Plan)?;
            } else if d.parent.is_some() || d.full_on_mismatch {
                return Err(Error::Plan(format!(
                    "disk '{}': a parent version is only named when syncing into a chunk store",
                    d.disk_id
                )));
            }
            if let Some(t) = &d.snapshot_time {
                chrono::DateTime::parse_from_rfc3339(t).map_err(|e| {
                    Error::Plan(format!(
                        "disk '{}': snapshot time '{t}' is not an RFC 3339 time: {e}",
                        d.disk_id
                    ))
                })?;
            }
            d.journal_path()?;
            if !ids.insert(&d.disk_id) {
                return Err(Error::Plan(format!(
                    "disk id '{}' appears twice in the plan",
                    d.disk_id
                )));
            }
            let target_key = match &d.target {
                DiskUri::Store(u) => format!("{} disk {}", u.text, d.disk_id),
                t => t.to_string(),
            };
            if !targets.insert(target_key) {
                return Err(Error::Plan(format!(
                    "target {} appears twice in the plan",
                    d.target
                )));
            }
            if d.source.to_string() == d.target.to_string()
                || matches!((d.source.file_path(), d.target.file_path()), (Some(a), Some(b)) if same_file(a, b))
            {
                return Err(Error::Plan(format!(
                    "disk '{}': source and target are the same file {}",
                    d.disk_id, d.source
                )));
            }
        }
        Ok(())
    }
}

fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

impl Tuning {
    /// The engine settings `hamal.conf` holds, before a caller's overrides: readers, disks at
    /// once, flush cadence, stores, VDDK, the lock folder.
    pub fn from_config(c: &crate::config::Config) -> Tuning {
        let d = &c.data_sync_v2;
        let lib = std::path::Path::new(&c.default.hamal_lib_dir);
        Tuning {
            readers: d.pre_disk_readers_count as u32,
            parallel_disks: d.parallel_sync_disks_count as u32,
            fsync_period: Duration::from_secs(d.fsync_period_frequency),
            fsync_warn_after: (d.fsync_timeout > 0).then(|| Duration::from_secs(d.fsync_timeout)),
            store: StoreOptions::from_config(c),
            vddk: VddkOptions {
                libdir: c.vmware.vddk_libdir.clone().into(),
                transports: c.vmware.transport_modes.clone(),
                max_read_blocks: c.vmware.max_read_blocks as u32,
            },
            fc: FcOptions {
                max_connections_per_host: c.fusion_compute.max_socket_connections_per_host as u32,
                local_ip: c.fusion_compute.local_host_ip.parse().ok(),
            },
            lock_dir: lib.join("locks"),
            ..Tuning::default()
        }
    }

    /// Checks a caller's readers and disks-at-once against the config's maxima.
    pub fn check_limits(&self, c: &crate::config::Config) -> Result<()> {
        let d = &c.data_sync_v2;
        for (name, v, key, max) in [
            (
                "readers",
                self.readers,
                "max_pre_disk_readers_count",
                d.max_pre_disk_readers_count,
            ),
            (
                "parallel disks",
                self.parallel_disks,
                "max_parallel_sync_disks_count",
                d.max_parallel_sync_disks_count,
            ),
        ] {
            if u64::from(v) > max {
                return Err(Error::Plan(format!(
                    "{name} = {v} exceeds [data_sync_v2] {key} = {max}"
                )));
            }
        }
        Ok(())
    }
}
