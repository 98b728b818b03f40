//! Where a chunk store keeps its objects: a blocking key/value interface over a local directory
//! or an S3 bucket. Keys are `/`-separated relative names such as `chunks/ab/abcd...`.

use crate::io::HugeBuf;
use crate::Result;
use bytes::Bytes;
use std::ops::{Deref, DerefMut};
use std::time::SystemTime;

/// One listed object.
#[derive(Clone, Debug)]
pub struct Listed {
    pub key: String,
    pub modified: SystemTime,
}

/// What [`Backend::peek`] finds.
pub enum Peek {
    Missing,
    /// It exists; this backend cannot cheaply say more (S3 objects are written whole).
    Present,
    /// It exists with this size and these first bytes.
    Head {
        head: Vec<u8>,
        size: u64,
    },
}

/// An object as read: in a buffer of its own, or in a reusable aligned one.
pub enum ObjectBuf {
    Vec(Vec<u8>),
    Huge(HugeBuf),
}

impl Deref for ObjectBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ObjectBuf::Vec(v) => v,
            ObjectBuf::Huge(b) => b,
        }
    }
}

impl DerefMut for ObjectBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            ObjectBuf::Vec(v) => v,
            ObjectBuf::Huge(b) => b,
        }
    }
}

pub trait Backend: Send + Sync {
    /// The store URI, for messages.
    fn describe(&self) -> String;
    /// Whether the place the store lives in exists (S3: its bucket), asked when the store's own
    /// objects are missing; an error that says so if not.
    fn check_location(&self) -> Result<()> {
        Ok(())
    }
    /// Writes a whole object; when this returns, a reader sees all of it or (before) nothing.
    fn put(&self, key: &str, data: Bytes) -> Result<()>;
    /// Writes several whole objects (concurrently where the backend can); stops at a failure.
    fn put_many(&self, objects: Vec<(String, Bytes)>) -> Result<()> {
        objects
            .into_iter()
            .try_for_each(|(k, data)| self.put(&k, data))
    }
    /// Reads a whole object; `None` when it does not exist.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Reads several objects at once (concurrently where the backend can).
    fn get_many(&self, keys: &[String]) -> Vec<Result<Option<Vec<u8>>>> {
        keys.iter().map(|k| self.get(k)).collect()
    }
    /// As `get_many`, reading into `spares` (buffers of earlier objects) where the backend can:
    /// a fresh 4 MiB buffer per chunk costs its first-touch page faults. Objects read into a
    /// `HugeBuf` (`dir:` reads them there with `O_DIRECT`, S3 streams bodies into them) are
    /// worth keeping as spares.
    fn get_many_reusing(
        &self,
        keys: &[String],
        _spares: &mut Vec<HugeBuf>,
    ) -> Vec<Result<Option<ObjectBuf>>> {
        let objects = self.get_many(keys).into_iter();
        objects.map(|o| o.map(|o| o.map(ObjectBuf::Vec))).collect()
    }
    fn exists(&self, key: &str) -> Result<bool>;
    /// The stored size of each object (`None`: missing), asked concurrently where the backend
    /// can: what the server says it stored, checked against what was sent.
    fn sizes(&self, keys: &[String]) -> Vec<Result<Option<u64>>>;
    /// Whether `key` exists, with its size and first `n` bytes where that is cheap.
    fn peek(&self, key: &str, _n: usize) -> Result<Peek> {
        Ok(if self.exists(key)? {
            Peek::Present
        } else {
            Peek::Missing
        })
    }
    /// Temporary objects left by interrupted writes (none where writes are atomic).
    fn list_temporaries(&self) -> Result<Vec<Listed>> {
        Ok(Vec::new())
    }
    /// Every object whose key starts with `prefix` (a folder such as `chunks/`).
    fn list(&self, prefix: &str) -> Result<Vec<Listed>>;
    /// Removes an object; a missing one is not an error.
    fn delete(&self, key: &str) -> Result<()>;
    /// Makes every completed `put` durable (directory entries included).
    fn sync(&self) -> Result<()> {
        Ok(())
    }
}
