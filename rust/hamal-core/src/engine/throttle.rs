//! Load limits on production: the `[period] *_release_cpu_time` yield (milliseconds of sleep per
//! MB moved) and an optional job-wide bandwidth cap.

use std::sync::Mutex;
use std::time::{Duration, Instant};

const MB: f64 = 1024.0 * 1024.0;

/// Sleeps `ms_per_mb` milliseconds for every MB of `bytes` (fractions included).
pub fn release_cpu(ms_per_mb: u32, bytes: u64) {
    if ms_per_mb > 0 && bytes > 0 {
        std::thread::sleep(Duration::from_secs_f64(
            ms_per_mb as f64 / 1000.0 * bytes as f64 / MB,
        ));
    }
}

/// A pacer shared by every reader of a job: each transfer reserves its slot on a timeline
/// running at the cap, and waits until its slot starts.
pub struct Pacer {
    bytes_per_sec: Option<u64>,
    next_free: Mutex<Option<Instant>>,
}

impl Pacer {
    pub fn new(bytes_per_sec: Option<u64>) -> Pacer {
        Pacer {
            bytes_per_sec: bytes_per_sec.filter(|&b| b > 0),
            next_free: Mutex::new(None),
        }
    }

    pub fn pace(&self, bytes: u64) {
        let Some(rate) = self.bytes_per_sec else {
            return;
        };
        let cost = Duration::from_secs_f64(bytes as f64 / rate as f64);
        let start = {
            let mut next = self.next_free.lock().unwrap();
            let now = Instant::now();
            let start = next.map_or(now, |n| n.max(now));
            *next = Some(start + cost);
            start
        };
        let wait = start.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_holds_the_rate() {
        let p = Pacer::new(Some(10 * 1024 * 1024));
        let t = Instant::now();
        for _ in 0..6 {
            p.pace(1024 * 1024); // 6 MiB at 10 MiB/s: the sixth starts after 0.5 s
        }
        let e = t.elapsed().as_secs_f64();
        assert!(e >= 0.45, "paced too fast: {e}");
    }

    #[test]
    fn release_cpu_sleeps_in_proportion() {
        let t = Instant::now();
        release_cpu(100, 2 * 1024 * 1024);
        assert!(t.elapsed() >= Duration::from_millis(195));
    }
}
