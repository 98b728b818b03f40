//! Lock-free progress counters of one disk, and the snapshot Python polls.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskState {
    Pending,
    Running,
    Done,
    Failed,
    Cancelled,
}

const STATES: [DiskState; 5] = [
    DiskState::Pending,
    DiskState::Running,
    DiskState::Done,
    DiskState::Failed,
    DiskState::Cancelled,
];

#[derive(Default)]
pub struct DiskProgress {
    state: AtomicU8,
    /// Bytes of data extents this run is responsible for (changed or allocated).
    pub bytes_total: AtomicU64,
    /// Bytes finished in this run (written or zeroed), not counting resumed ones.
    pub bytes_done: AtomicU64,
    /// Of `bytes_done`, bytes that were all zero and became holes instead of writes.
    pub bytes_zero: AtomicU64,
    /// Bytes skipped because the journal says an earlier run finished them.
    pub bytes_resumed: AtomicU64,
    pub chunks_total: AtomicU64,
    pub chunks_done: AtomicU64,
    started: Mutex<Option<Instant>>,
    finished: Mutex<Option<Instant>>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ProgressSnapshot {
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub bytes_zero: u64,
    pub bytes_resumed: u64,
    pub chunks_total: u64,
    pub chunks_done: u64,
    pub elapsed_s: f64,
    /// Bytes per second over this run (done, not resumed).
    pub rate_bps: f64,
    /// Seconds left at the current rate; `None` before the rate is known.
    pub eta_s: Option<f64>,
}

impl DiskProgress {
    pub fn set_state(&self, s: DiskState) {
        let now = Some(Instant::now());
        match s {
            DiskState::Running => *self.started.lock().unwrap() = now,
            DiskState::Done | DiskState::Failed | DiskState::Cancelled => {
                *self.finished.lock().unwrap() = now
            }
            DiskState::Pending => {}
        }
        self.state.store(s as u8, Relaxed);
    }

    pub fn state(&self) -> DiskState {
        STATES[self.state.load(Relaxed) as usize]
    }

    pub fn elapsed_s(&self) -> f64 {
        let start = *self.started.lock().unwrap();
        let end = self.finished.lock().unwrap().unwrap_or_else(Instant::now);
        start.map_or(0.0, |s| end.duration_since(s).as_secs_f64())
    }

    pub fn snapshot(&self) -> ProgressSnapshot {
        let mut s = ProgressSnapshot {
            bytes_total: self.bytes_total.load(Relaxed),
            bytes_done: self.bytes_done.load(Relaxed),
            bytes_zero: self.bytes_zero.load(Relaxed),
            bytes_resumed: self.bytes_resumed.load(Relaxed),
            chunks_total: self.chunks_total.load(Relaxed),
            chunks_done: self.chunks_done.load(Relaxed),
            elapsed_s: self.elapsed_s(),
            ..Default::default()
        };
        s.finish_rates();
        s
    }
}

impl ProgressSnapshot {
    /// Adds another disk's counters (for a job-wide total); rates are recomputed by the caller.
    pub fn add(&mut self, o: &ProgressSnapshot) {
        self.bytes_total += o.bytes_total;
        self.bytes_done += o.bytes_done;
        self.bytes_zero += o.bytes_zero;
        self.bytes_resumed += o.bytes_resumed;
        self.chunks_total += o.chunks_total;
        self.chunks_done += o.chunks_done;
        self.elapsed_s = self.elapsed_s.max(o.elapsed_s);
    }

    pub fn finish_rates(&mut self) {
        self.rate_bps = if self.elapsed_s > 0.0 {
            self.bytes_done as f64 / self.elapsed_s
        } else {
            0.0
        };
        let left = self
            .bytes_total
            .saturating_sub(self.bytes_done + self.bytes_resumed);
        self.eta_s = (self.rate_bps > 0.0).then(|| left as f64 / self.rate_bps);
    }
}
