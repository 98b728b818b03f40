//! Store locks, so garbage collection never runs under a sync or a restore: those hold a shared lock,
//! `prune`'s collection an exclusive one. Each side writes its lock object first and then lists
//! the others, so of two that start together at least one sees the other and backs off. A lock
//! not refreshed for [`STALE`] belongs to a dead process and is ignored.

use super::backend::Backend;
use crate::{Error, Result};
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

#[derive(Clone, Copy, PartialEq, Eq)]
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

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Takes a lock of `kind`. Fails with the holders' names when a conflicting live lock exists
/// (any other lock for an exclusive one; an exclusive one for a shared one).
pub fn acquire(backend: &Arc<dyn Backend>, kind: LockKind, purpose: &str) -> Result<Lock> {
    let mut nonce = [0u8; 6];
    getrandom::getrandom(&mut nonce).expect("the OS random source");
    let key = format!("locks/{}-{}.json", kind.name(), super::codec::hex(&nonce));
    let body = serde_json::to_vec(&serde_json::json!({
        "kind": kind.name(), "host": host(), "pid": std::process::id(), "purpose": purpose,
        "created": chrono::Utc::now().to_rfc3339(),
    }))
    .expect("serializable");
    backend.put(&key, body.clone())?;
    let lock = Lock {
        backend: backend.clone(),
        key,
        body,
        refreshed: Mutex::new(Instant::now()),
    };
    let now = SystemTime::now();
    let mut holders = Vec::new();
    for other in backend.list("locks/")? {
        let live = now.duration_since(other.modified).unwrap_or_default() < STALE;
        let conflicts = match kind {
            LockKind::Exclusive => true,
            LockKind::Shared => other.key.starts_with("locks/exclusive-"),
        };
        if other.key != lock.key && live && conflicts {
            let who = backend.get(&other.key).ok().flatten().unwrap_or_default();
            holders.push(String::from_utf8_lossy(&who).into_owned());
        }
    }
    if !holders.is_empty() {
        drop(lock);
        return Err(Error::Store(format!(
            "store {} is busy ({} lock held by {}); try again when it ends",
            backend.describe(),
            if kind == LockKind::Shared {
                "a prune"
            } else {
                "a sync"
            },
            holders.join(", ")
        )));
    }
    Ok(lock)
}

impl Lock {
    /// Rewrites the lock object when it is getting old, so others see it is alive.
    pub fn refresh(&self) -> Result<()> {
        let mut at = self.refreshed.lock().unwrap();
        if at.elapsed() >= REFRESH {
            self.backend.put(&self.key, self.body.clone())?;
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
