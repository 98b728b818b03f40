//! A bounded pool of chunk buffers: the engine's whole in-flight memory. Buffers are private
//! mappings backed by huge pages where the kernel allows (`HugeBuf`: first touches are costly),
//! or slots of a shared mapping when the source fills them from another process (VDDK).

use crate::io::shm::SharedMem;
use crate::io::HugeBuf;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// One chunk buffer, owned by one thread at a time.
pub enum ChunkBuf {
    Heap(HugeBuf),
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

    /// `n` buffers (at most the pool's bound), allocated lazily up to the bound, else the next
    /// ones returned, taken all at once: readers that each held part of a batch while waiting
    /// for the rest could wait for each other forever. `None` if `abort` is raised meanwhile.
    pub fn get_many(&self, n: usize, abort: &AtomicBool) -> Option<Vec<ChunkBuf>> {
        let n = n.clamp(1, self.max.max(1));
        let mut st = self.state.lock().unwrap();
        loop {
            if st.0.len() + (self.max - st.1) >= n {
                let mut out = Vec::with_capacity(n);
                while out.len() < n {
                    let b = match st.0.pop() {
                        Some(b) => b,
                        None => {
                            let slot = st.1;
                            st.1 += 1;
                            self.allocate(slot)
                        }
                    };
                    out.push(b);
                }
                return Some(out);
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

    /// The most buffers one `get_many` hands out.
    pub fn capacity(&self) -> usize {
        self.max.max(1)
    }

    fn allocate(&self, slot: usize) -> ChunkBuf {
        match &self.shared {
            Some(mem) => ChunkBuf::Shared {
                mem: Arc::clone(mem),
                offset: slot * self.size,
                len: self.size,
            },
            None => ChunkBuf::Heap(HugeBuf::zeroed(self.size)),
        }
    }

    pub fn put(&self, buf: ChunkBuf) {
        self.state.lock().unwrap().0.push(buf);
        self.returned.notify_all();
    }
}
