//! Resume journal: which chunks of a running sync are durable on the target.
//!
//! Format: an 8-byte magic, the 32-byte plan fingerprint, when the first attempt started (Unix
//! milliseconds, `u64` LE), then batches appended after each target flush: `count: u32 LE`,
//! `count` records of `chunk index: u64 LE` + `digest: [u8; 32]` + `bytes stored: u64 LE`, and
//! the first 8 bytes of BLAKE3 over the batch so far. A torn last batch (crash during the
//! append) fails its check and is cut off on load. A journal whose fingerprint differs belongs
//! to another plan (other source content, target, chunk size or extents) and is started over.
//! It is removed when the sync commits.

use crate::checksum::{ContentDigest, Digest};
use crate::target::Done;
use crate::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"HAMALJ02";
const HEADER: usize = 8 + 32 + 8;
const RECORD: usize = 8 + 32 + 8;

/// A bitmap over chunk indexes.
#[derive(Clone)]
pub struct DoneSet(Vec<u64>);

impl DoneSet {
    pub fn contains(&self, index: u64) -> bool {
        self.0
            .get((index / 64) as usize)
            .is_some_and(|w| w & (1 << (index % 64)) != 0)
    }
}

pub struct Journal {
    path: PathBuf,
    file: File,
    done: DoneSet,
    /// Number of chunks found done when the journal was opened.
    pub resumed_chunks: u64,
    /// Content digest of the chunks found done (for the run's order-independent digest).
    pub resumed_digest: ContentDigest,
    /// The chunks found done with their digests, when asked for (a chunk store needs the names).
    pub resumed: Vec<Done>,
    /// When the first attempt of this plan started (Unix milliseconds).
    pub started_ms: u64,
    keep_entries: bool,
    fingerprint: Digest,
}

impl Journal {
    /// Opens the journal at `path` for a plan with `fingerprint` and `chunk_count` chunk slots.
    pub fn open(
        path: &Path,
        fingerprint: &Digest,
        chunk_slots: u64,
        keep_entries: bool,
    ) -> Result<Journal> {
        let err = |what, e| Error::journal_io(path, what, e);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| err("cannot open", e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| err("cannot read", e))?;
        let mut j = Journal {
            path: path.to_owned(),
            file,
            done: DoneSet(vec![0; chunk_slots.div_ceil(64) as usize]),
            resumed_chunks: 0,
            resumed_digest: ContentDigest::default(),
            resumed: Vec::new(),
            started_ms: now_ms(),
            keep_entries,
            fingerprint: *fingerprint,
        };
        let header_ok =
            bytes.len() >= HEADER && &bytes[..8] == MAGIC && &bytes[8..40] == fingerprint;
        if header_ok {
            j.started_ms = u64::from_le_bytes(bytes[40..HEADER].try_into().unwrap());
        }
        let good_len = if header_ok {
            j.load_batches(&bytes, chunk_slots)
        } else {
            0
        };
        if !header_ok {
            if !bytes.is_empty() {
                tracing::warn!(journal = %path.display(), "journal belongs to another plan or is damaged; starting over");
            }
            j.write_header()?;
        } else if good_len < bytes.len() {
            tracing::warn!(journal = %path.display(), "cut a torn tail of {} bytes", bytes.len() - good_len);
            j.file
                .set_len(good_len as u64)
                .map_err(|e| err("cannot cut torn tail", e))?;
        }
        j.file
            .seek(SeekFrom::End(0))
            .map_err(|e| err("cannot seek", e))?;
        Ok(j)
    }

    fn write_header(&mut self) -> Result<()> {
        let err = |what, e| Error::journal_io(&self.path, what, e);
        self.file.set_len(0).map_err(|e| err("cannot reset", e))?;
        self.file
            .seek(SeekFrom::Start(0))
            .and_then(|_| self.file.write_all(MAGIC))
            .and_then(|_| self.file.write_all(&self.fingerprint))
            .and_then(|_| self.file.write_all(&self.started_ms.to_le_bytes()))
            .map_err(|e| err("cannot write header", e))?;
        self.file.sync_data().map_err(|e| err("cannot fsync", e))
    }

    /// Forgets every journaled chunk (their data is no longer on the target).
    pub fn restart(&mut self) -> Result<()> {
        self.started_ms = now_ms();
        self.write_header()?;
        self.done.0.fill(0);
        self.resumed_chunks = 0;
        self.resumed_digest = ContentDigest::default();
        self.resumed.clear();
        Ok(())
    }

    /// Replays valid batches into the bitmap; returns the length of the valid prefix.
    fn load_batches(&mut self, bytes: &[u8], chunk_slots: u64) -> usize {
        let mut pos = HEADER;
        while pos + 4 <= bytes.len() {
            let count = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
            let end = pos + 4 + count * RECORD;
            if end + 8 > bytes.len()
                || bytes[end..end + 8] != blake3::hash(&bytes[pos..end]).as_bytes()[..8]
            {
                break;
            }
            for rec in bytes[pos + 4..end].chunks_exact(RECORD) {
                let index = u64::from_le_bytes(rec[..8].try_into().unwrap());
                if index < chunk_slots && !self.is_done(index) {
                    self.mark(index);
                    self.resumed_chunks += 1;
                    let name: Digest = rec[8..40].try_into().unwrap();
                    self.resumed_digest.add(index, &name);
                    if self.keep_entries {
                        let stored = u64::from_le_bytes(rec[40..].try_into().unwrap());
                        self.resumed.push(Done {
                            index,
                            name,
                            stored,
                        });
                    }
                }
            }
            pos = end + 8;
        }
        pos
    }

    fn mark(&mut self, index: u64) {
        self.done.0[(index / 64) as usize] |= 1 << (index % 64);
    }

    pub fn is_done(&self, index: u64) -> bool {
        self.done.contains(index)
    }

    /// A copy of the done set, for readers to skip finished chunks without locking.
    pub fn done_set(&self) -> DoneSet {
        self.done.clone()
    }

    /// Appends chunks that are durable on the target (call only after the target flush) and
    /// fsyncs the journal.
    pub fn append(&mut self, chunks: &[Done]) -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let mut batch = Vec::with_capacity(4 + chunks.len() * RECORD + 8);
        batch.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
        for d in chunks {
            batch.extend_from_slice(&d.index.to_le_bytes());
            batch.extend_from_slice(&d.name);
            batch.extend_from_slice(&d.stored.to_le_bytes());
        }
        let check = blake3::hash(&batch);
        batch.extend_from_slice(&check.as_bytes()[..8]);
        let err = |what, e| Error::journal_io(&self.path, what, e);
        self.file
            .write_all(&batch)
            .map_err(|e| err("cannot append", e))?;
        self.file.sync_data().map_err(|e| err("cannot fsync", e))?;
        for d in chunks {
            self.mark(d.index);
        }
        Ok(())
    }

    /// Removes the journal at `path` when it holds no chunk (a run that failed before any
    /// chunk was durable leaves nothing behind).
    pub fn remove_if_empty(path: &Path) {
        if std::fs::metadata(path).is_ok_and(|m| m.len() <= HEADER as u64) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Removes the journal: the sync is committed.
    pub fn remove(self) -> Result<()> {
        std::fs::remove_file(&self.path)
            .map_err(|e| Error::journal_io(&self.path, "cannot remove", e))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the removal durable too; a failure here only means a later rerun redoes work.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(index: u64, byte: u8) -> Done {
        Done {
            index,
            name: [byte; 32],
            stored: u64::from(byte) * 10,
        }
    }

    #[test]
    fn survives_reopen_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let fp = [7u8; 32];
        let mut j = Journal::open(&p, &fp, 100, true).unwrap();
        let started = j.started_ms;
        j.append(&[done(3, 1), done(5, 2)]).unwrap();
        j.append(&[done(9, 3)]).unwrap();
        drop(j);
        // A torn batch: its length field and half a record, no check.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&1u32.to_le_bytes()).unwrap();
        f.write_all(&[0u8; 20]).unwrap();
        drop(f);
        let j = Journal::open(&p, &fp, 100, true).unwrap();
        assert_eq!(j.resumed_chunks, 3);
        assert_eq!(j.started_ms, started, "the first attempt's start is kept");
        assert_eq!(j.resumed, vec![done(3, 1), done(5, 2), done(9, 3)]);
        assert!(j.is_done(3) && j.is_done(5) && j.is_done(9) && !j.is_done(4));
        let mut want = ContentDigest::default();
        want.add(3, &[1; 32]);
        want.add(5, &[2; 32]);
        want.add(9, &[3; 32]);
        assert_eq!(j.resumed_digest, want);
        drop(j);
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            48 + (4 + 2 * 48 + 8) + (4 + 48 + 8)
        );
    }

    #[test]
    fn other_fingerprint_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut j = Journal::open(&p, &[1; 32], 10, false).unwrap();
        j.append(&[done(1, 0)]).unwrap();
        drop(j);
        let j = Journal::open(&p, &[2; 32], 10, false).unwrap();
        assert_eq!(j.resumed_chunks, 0);
        assert!(!j.is_done(1));
        j.remove().unwrap();
        assert!(!p.exists());
    }
}
