//! An NBD export as a target: WRITE for data, WRITE_ZEROES for zero chunks, FLUSH on every
//! connection at each flush. Writers get connections of their own only where the server
//! advertises multi-conn (it then takes them, and keeps them consistent); otherwise every
//! writer shares the target's one connection, each batch pipelined on it.

use super::{Target, TargetWriter};
use crate::io::WriteReq;
use crate::nbd::{Connection, NbdUri};
use crate::source::nbd::NBD_TIMEOUT;
use crate::{Error, Result};
use std::path::Path;
use std::sync::{Arc, Mutex};

pub struct NbdTarget {
    uri: NbdUri,
    control: Arc<Mutex<Connection>>,
    writers: Mutex<Vec<Arc<Mutex<Connection>>>>,
    _lock: super::lock::LockFile,
}

impl NbdTarget {
    /// Opens the export for a sync, holding its lock in `lock_dir` for the run.
    pub fn open(
        uri: &NbdUri,
        source_size: u64,
        lock_dir: &Path,
        purpose: &str,
    ) -> Result<NbdTarget> {
        let lock = super::lock::lock_named(lock_dir, &uri.text, purpose)?;
        let control = connect(uri)?;
        let info = control.info().clone();
        if info.read_only() {
            return Err(Error::Plan(format!(
                "target {} is a read-only NBD export",
                uri.text
            )));
        }
        if info.size < source_size {
            return Err(Error::Plan(format!(
                "target {} is smaller than the source: {} < {source_size} bytes; nothing was written",
                uri.text, info.size
            )));
        }
        Ok(NbdTarget {
            uri: uri.clone(),
            control: Arc::new(Mutex::new(control)),
            writers: Mutex::new(Vec::new()),
            _lock: lock,
        })
    }

    fn fail(&self, what: &'static str, e: crate::nbd::NbdFail) -> Error {
        Error::target_io(&self.uri.text, what, e.offset, e.error)
    }
}

fn connect(uri: &NbdUri) -> Result<Connection> {
    Connection::connect(uri, &[], NBD_TIMEOUT)
        .map_err(|e| Error::target_io(&uri.text, "cannot open NBD export", e.offset, e.error))
}

impl Target for NbdTarget {
    fn describe(&self) -> String {
        self.uri.text.clone()
    }

    fn is_fresh(&self) -> bool {
        false
    }

    fn alignment(&self) -> u64 {
        u64::from(self.control.lock().unwrap().info().min_block)
    }

    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        self.control
            .lock()
            .unwrap()
            .write_zeroes(offset, len)
            .map_err(|e| self.fail("cannot zero range", e))
    }

    fn flush(&self) -> Result<()> {
        self.control
            .lock()
            .unwrap()
            .flush()
            .map_err(|e| self.fail("flush failed", e))?;
        for w in self.writers.lock().unwrap().iter() {
            w.lock()
                .unwrap()
                .flush()
                .map_err(|e| self.fail("flush failed", e))?;
        }
        Ok(())
    }

    fn writer(&self, _depth: u32) -> Result<Box<dyn TargetWriter>> {
        if !self.control.lock().unwrap().info().can_multi_conn() {
            return Ok(Box::new(NbdWriter {
                conn: Arc::clone(&self.control),
                uri: self.uri.text.clone(),
            }));
        }
        let conn = Arc::new(Mutex::new(connect(&self.uri)?));
        self.writers.lock().unwrap().push(Arc::clone(&conn));
        Ok(Box::new(NbdWriter {
            conn,
            uri: self.uri.text.clone(),
        }))
    }
}

struct NbdWriter {
    conn: Arc<Mutex<Connection>>,
    uri: String,
}

impl TargetWriter for NbdWriter {
    fn write_batch(&mut self, reqs: &[WriteReq<'_>]) -> Result<()> {
        self.conn
            .lock()
            .unwrap()
            .write_batch(reqs)
            .map_err(|e| Error::target_io(&self.uri, "NBD write failed", e.offset, e.error))
    }
}
