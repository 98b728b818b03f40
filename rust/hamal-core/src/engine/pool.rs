//! A bounded pool of chunk buffers: the engine's whole in-flight memory. Buffers come from the
//! heap, or from a shared mapping when the source fills them from another process (VDDK).

use crate::io::shm::SharedMem;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// One chunk buffer, owned by one thread at a time.
pub enum ChunkBuf {
    Heap(Vec<u8>),
    /// Slot `offset..offset + len` of a shared mapping; the pool hands each slot out once.
    Shared {
        mem: Arc<SharedMem>,
        offset: usize,
        len: usize,
    },
}

impl Deref for ChunkBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ChunkBuf::Heap(v) => v,
            ChunkBuf::Shared { mem, offset, len } => mem.slice(*offset, *len),
        }
    }
}

impl DerefMut for ChunkBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            ChunkBuf::Heap(v) => v,
            // SAFETY: this buffer is the slot's only owner (the pool hands each slot out once)
            // and `&mut self` makes this the only view of it.
            ChunkBuf::Shared { mem, offset, len } => unsafe { mem.slice_mut(*offset, *len) },
        }
    }
}

pub struct BufferPool {
    size: usize,
    max: usize,
    shared: Option<Arc<SharedMem>>,
    state: Mutex<(Vec<ChunkBuf>, usize)>, // free buffers, buffers allocated so far
    returned: Condvar,
}

impl BufferPool {
    pub fn new(size: usize, max: usize) -> BufferPool {
        BufferPool {
            size,
            max,
            shared: None,
            state: Mutex::new((Vec::new(), 0)),
            returned: Condvar::new(),
        }
    }

    /// A pool whose buffers are the `size`-byte slots of `mem` (at most `mem.len() / size`).
    pub fn shared(size: usize, max: usize, mem: Arc<SharedMem>) -> BufferPool {
        let max = max.min(mem.len() / size.max(1));
        BufferPool {
            shared: Some(mem),
            ..BufferPool::new(size, max)
        }
    }

    /// A buffer, allocated lazily up to the bound, else the next one returned. `None` if
    /// `abort` is raised while waiting.
    pub fn get(&self, abort: &AtomicBool) -> Option<ChunkBuf> {
        let mut st = self.state.lock().unwrap();
        loop {
            if let Some(b) = st.0.pop() {
                return Some(b);
            }
            if st.1 < self.max {
                let slot = st.1;
                st.1 += 1;
                return Some(match &self.shared {
                    Some(mem) => ChunkBuf::Shared {
                        mem: Arc::clone(mem),
                        offset: slot * self.size,
                        len: self.size,
                    },
                    None => ChunkBuf::Heap(vec![0u8; self.size]),
                });
            }
            if abort.load(Relaxed) {
                return None;
            }
            st = self
                .returned
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap()
                .0;
        }
    }

    pub fn put(&self, buf: ChunkBuf) {
        self.state.lock().unwrap().0.push(buf);
        self.returned.notify_one();
    }
}
