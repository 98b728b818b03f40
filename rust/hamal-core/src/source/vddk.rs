//! A VMware disk at a snapshot, read through VDDK in worker processes (see `crate::vddk`).
//! Each engine reader gets a worker of its own (its own VDDK connection); the first one also
//! answers the size and allocation queries. The engine's chunk buffers live in shared memory
//! (`shared_buffers`), so workers read straight into them.

use super::{Source, SourceReader};
use crate::extent::ExtentMap;
use crate::io::shm::SharedMem;
use crate::io::ReadReq;
use crate::vddk::{VddkOptions, VddkUri, Worker};
use crate::{Error, Result};
use std::sync::{Arc, Mutex};
use vmware_vddk_sys::{MIN_CHUNK_SIZE, SECTOR_SIZE};

pub struct VddkSource {
    uri: VddkUri,
    opts: VddkOptions,
    size: u64,
    /// Ask VDDK for allocated blocks (a full sync); an incremental's changes come from CBT.
    query_allocation: bool,
    spare: Mutex<Option<Worker>>,
    arena: Mutex<Option<Arc<SharedMem>>>,
}

impl VddkSource {
    pub fn open(uri: &VddkUri, opts: &VddkOptions, query_allocation: bool) -> Result<VddkSource> {
        let (worker, opened) = Worker::start(uri, opts, None)?;
        Ok(VddkSource {
            uri: uri.clone(),
            opts: opts.clone(),
            size: opened.capacity_sectors * SECTOR_SIZE,
            query_allocation,
            spare: Mutex::new(Some(worker)),
            arena: Mutex::new(None),
        })
    }

    fn worker(&self) -> Result<Worker> {
        match self.spare.lock().unwrap().take() {
            Some(w) => Ok(w),
            None => {
                let arena = self.arena.lock().unwrap().clone();
                Worker::start(&self.uri, &self.opts, arena).map(|(w, _)| w)
            }
        }
    }
}

impl Source for VddkSource {
    fn describe(&self) -> String {
        self.uri.text.clone()
    }

    fn size(&self) -> u64 {
        self.size
    }

    /// QueryAllocatedBlocks where the library has it and it works; else the whole disk (its
    /// zeros are still detected and not written).
    fn allocated(&self) -> Result<ExtentMap> {
        let whole = ExtentMap::whole(self.size);
        if !self.query_allocation {
            return Ok(whole);
        }
        let mut w = self.worker()?;
        let map = w.allocated(MIN_CHUNK_SIZE)?;
        *self.spare.lock().unwrap() = Some(w);
        Ok(map.map_or(whole.clone(), |m| m.intersect(&whole)))
    }

    fn alignment(&self) -> u64 {
        SECTOR_SIZE
    }

    fn identity(&self) -> Option<String> {
        Some(self.uri.identity())
    }

    /// Readers made after this fill the engine's buffers in place; the spare worker, which
    /// has no access to them, is let go.
    fn shared_buffers(&self, bytes: usize) -> Result<Option<Arc<SharedMem>>> {
        let mem = SharedMem::create(bytes).map_err(|e| {
            Error::Vddk(format!(
                "{}: cannot create shared buffers: {e}",
                self.uri.text
            ))
        })?;
        let mem = Arc::new(mem);
        *self.arena.lock().unwrap() = Some(Arc::clone(&mem));
        self.spare.lock().unwrap().take();
        Ok(Some(mem))
    }

    fn reader(&self, _depth: u32) -> Result<Box<dyn SourceReader>> {
        Ok(Box::new(VddkReader {
            worker: self.worker()?,
        }))
    }
}

struct VddkReader {
    worker: Worker,
}

impl SourceReader for VddkReader {
    fn read_batch(&mut self, reqs: &mut [ReadReq<'_>]) -> Result<()> {
        self.worker.read(reqs)
    }

    fn backend(&self) -> &'static str {
        "vddk"
    }
}
