//! Store locks. Syncs and restores hold a shared lock, so garbage collection (`prune`, under an
//! exclusive one) never runs under them; a sync's shared lock also names its disk, and two syncs
//! of one disk exclude each other (one writer per disk). Each side writes its lock object first
//! and then lists the others, so of two that start together at least one sees the other and
//! backs off.
//!
//! A lock records its holder (`crate::holder`): on the same host a lock whose process is gone
//! is dead at once and removed by whoever finds it; another host's lock not refreshed for
//! [`STALE`] is dead too (its host may be down), ignored, and removed by `prune`.

use super::backend::Backend;
use crate::holder::{Holder, Liveness};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

pub const STALE: Duration = Duration::from_secs(15 * 60);
const REFRESH: Duration = Duration::from_secs(60);

pub struct Lock {
    backend: Arc<dyn Backend>,
    key: String,
    body: Vec<u8>,
    refreshed: Mutex<Instant>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LockKind {
    Shared,
    Exclusive,
}

impl LockKind {
    fn name(self) -> &'static str {
        match self {
            LockKind::Shared => "shared",
            LockKind::Exclusive => "exclusive",
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LockBody {
    #[serde(flatten)]
    pub holder: Holder,
    /// The disk a sync writes (one writer per disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
}

/// A lock object found in the store.
pub struct FoundLock {
    pub key: String,
    pub body: LockBody,
    /// Why it is dead (`None`: live).
    pub dead: Option<String>,
}

impl FoundLock {
    fn exclusive(&self) -> bool {
        self.key.starts_with("locks/exclusive-")
    }
}

/// Every lock object of the store but `except` (the caller's own), with its holder and whether
/// it is dead.
pub fn survey(backend: &Arc<dyn Backend>, except: Option<&str>) -> Result<Vec<FoundLock>> {
    let now = SystemTime::now();
    let mut out = Vec::new();
    let mut items = backend.list("locks/")?;
    items.retain(|i| Some(i.key.as_str()) != except);
    let keys: Vec<String> = items.iter().map(|i| i.key.clone()).collect();
    // At once: each read is a round trip to an object store.
    for (item, bytes) in items.into_iter().zip(backend.get_many(&keys)) {
        let Some(bytes) = bytes? else {
            continue; // removed meanwhile
        };
        let body: LockBody = serde_json::from_slice(&bytes).unwrap_or_default();
        let age = now.duration_since(item.modified).unwrap_or_default();
        let dead = match body.holder.liveness() {
            Liveness::Alive => None,
            Liveness::Dead => Some(format!("its process {} is gone", body.holder.pid)),
            Liveness::Unknown if age >= STALE => {
                Some(format!("not refreshed for {} minutes", age.as_secs() / 60))
            }
            Liveness::Unknown => None,
        };
        out.push(FoundLock {
            key: item.key,
            body,
            dead,
        });
    }
    Ok(out)
}

/// How long a sync or restore waits for a running garbage collection before it gives up.
const WAIT_FOR_COLLECTION: Duration = Duration::from_secs(300);

/// Takes a lock of `kind` for `holder`; `disk` names the disk a sync writes. Fails with the
/// holder named when a conflicting live lock exists: any other for an exclusive lock, and a
/// sync of the same disk for a shared one. A shared lock waits (up to 5 minutes) for a garbage
/// collection to end. Locks of processes that are gone from this host are removed on the way.
pub fn acquire(
    backend: &Arc<dyn Backend>,
    kind: LockKind,
    holder: Holder,
    disk: Option<&str>,
) -> Result<Lock> {
    let started = Instant::now();
    loop {
        match try_acquire(backend, kind, holder.clone(), disk)? {
            Ok(lock) => return Ok(lock),
            Err((only_collection, message)) => {
                if !(kind == LockKind::Shared && only_collection)
                    || started.elapsed() >= WAIT_FOR_COLLECTION
                {
                    return Err(Error::Busy(message));
                }
                if started.elapsed() < Duration::from_secs(1) {
                    tracing::info!("waiting for a garbage collection to end: {message}");
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// One attempt: the lock, or whether only a garbage collection stood in the way and why.
fn try_acquire(
    backend: &Arc<dyn Backend>,
    kind: LockKind,
    holder: Holder,
    disk: Option<&str>,
) -> Result<std::result::Result<Lock, (bool, String)>> {
    let mut nonce = [0u8; 6];
    getrandom::getrandom(&mut nonce).expect("the OS random source");
    let key = format!("locks/{}-{}.json", kind.name(), super::codec::hex(&nonce));
    let body = LockBody {
        holder,
        disk: disk.map(str::to_owned),
    };
    let body = serde_json::to_vec(&body).expect("serializable");
    backend.put(&key, body.clone().into())?;
    let lock = Lock {
        backend: backend.clone(),
        key,
        body,
        refreshed: Mutex::new(Instant::now()),
    };
    let mut conflicts = Vec::new();
    for other in survey(backend, Some(&lock.key))? {
        if let Some(why) = &other.dead {
            if other.body.holder.liveness() == Liveness::Dead {
                tracing::info!("removing the dead lock {} ({why})", other.key);
                backend.delete(&other.key)?;
            }
            continue;
        }
        let same_disk = disk.is_some() && other.body.disk.as_deref() == disk;
        let conflict = match kind {
            LockKind::Exclusive => true,
            LockKind::Shared => other.exclusive() || same_disk,
        };
        if conflict {
            conflicts.push((same_disk, other.exclusive(), other.body.holder.describe()));
        }
    }
    if conflicts.is_empty() {
        return Ok(Ok(lock));
    }
    drop(lock);
    let store = backend.describe();
    let holders: Vec<String> = conflicts.iter().map(|(_, _, h)| h.clone()).collect();
    let only_collection = conflicts.iter().all(|(_, exclusive, _)| *exclusive);
    let message = match (disk, conflicts.iter().any(|(d, _, _)| *d)) {
        (Some(d), true) => format!(
            "store {store}: disk '{d}' is being written by {}; one sync per disk at a time",
            holders.join(", ")
        ),
        _ => format!(
            "store {store} is busy: held by {}; try again when it ends",
            holders.join(", ")
        ),
    };
    Ok(Err((only_collection, message)))
}

impl Lock {
    /// Rewrites the lock object when it is getting old, so other hosts see it is alive.
    pub fn refresh(&self) -> Result<()> {
        let mut at = self.refreshed.lock().unwrap();
        if at.elapsed() >= REFRESH {
            self.backend.put(&self.key, self.body.clone().into())?;
            *at = Instant::now();
        }
        Ok(())
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if let Err(e) = self.backend.delete(&self.key) {
            tracing::warn!("cannot remove lock {}: {e}", self.key);
        }
    }
}
