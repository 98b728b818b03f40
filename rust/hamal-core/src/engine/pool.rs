//! A bounded pool of chunk buffers: the engine's whole in-flight memory.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

pub struct BufferPool {
    size: usize,
    max: usize,
    state: Mutex<(Vec<Vec<u8>>, usize)>, // free buffers, buffers allocated so far
    returned: Condvar,
}

impl BufferPool {
    pub fn new(size: usize, max: usize) -> BufferPool {
        BufferPool {
            size,
            max,
            state: Mutex::new((Vec::new(), 0)),
            returned: Condvar::new(),
        }
    }

    /// A buffer, allocated lazily up to the bound, else the next one returned. `None` if
    /// `abort` is raised while waiting.
    pub fn get(&self, abort: &AtomicBool) -> Option<Vec<u8>> {
        let mut st = self.state.lock().unwrap();
        loop {
            if let Some(b) = st.0.pop() {
                return Some(b);
            }
            if st.1 < self.max {
                st.1 += 1;
                return Some(vec![0u8; self.size]);
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

    pub fn put(&self, buf: Vec<u8>) {
        self.state.lock().unwrap().0.push(buf);
        self.returned.notify_one();
    }
}
