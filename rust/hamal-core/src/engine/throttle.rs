//! Load limits on production: the `[period] *_release_cpu_time` yield (milliseconds of sleep per
//! MB moved) and an optional job-wide bandwidth cap.

use std::sync::Mutex;
use std::time::{Duration, Instant};

const MB: f64 = 1024.0 * 1024.0;

/// Sleeps `ms_per_mb` milliseconds for every MB of `bytes` (fractions included), in slices
/// that end early once `stop` says so.
pub fn release_cpu(ms_per_mb: u32, bytes: u64, stop: &dyn Fn() -> bool) {
    if ms_per_mb == 0 || bytes == 0 {
        return;
    }
    let end =
        Instant::now() + Duration::from_secs_f64(ms_per_mb as f64 / 1000.0 * bytes as f64 / MB);
    while !stop() {
        let wait = end.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return;
        }
        std::thread::sleep(wait.min(Duration::from_millis(50)));
    }
}

/// A pacer shared by every reader of a job: each transfer reserves its slot on a timeline
/// running at the cap and waits until its slot *ends* before it reads, so the bytes read by any
/// moment never exceed the cap times the time elapsed (no free burst at the start).
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

    /// Waits until `bytes` may be read; returns false (at once, at most 50 ms later) when
    /// `stop` says the job is cancelled or failed.
    pub fn pace(&self, bytes: u64, stop: &dyn Fn() -> bool) -> bool {
        let Some(rate) = self.bytes_per_sec else {
            return true;
        };
        let cost = Duration::from_secs_f64(bytes as f64 / rate as f64);
        let end = {
            let mut next = self.next_free.lock().unwrap();
            let now = Instant::now();
            let end = next.map_or(now, |n| n.max(now)) + cost;
            *next = Some(end);
            end
        };
        loop {
            if stop() {
                return false;
            }
            let wait = end.saturating_duration_since(Instant::now());
            if wait.is_zero() {
                return true;
            }
            std::thread::sleep(wait.min(Duration::from_millis(50)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_holds_the_rate_from_the_start() {
        let p = Pacer::new(Some(10 * 1024 * 1024));
        let t = Instant::now();
        for _ in 0..5 {
            assert!(p.pace(1024 * 1024, &|| false)); // 5 MiB at 10 MiB/s: not before 0.5 s
        }
        let e = t.elapsed().as_secs_f64();
        assert!(e >= 0.49, "paced too fast: {e}");
    }

    #[test]
    fn a_paced_wait_ends_when_stopped() {
        let p = Pacer::new(Some(1024)); // 1 KiB/s: a 4 MiB read would wait over an hour
        let t = Instant::now();
        let stop = || t.elapsed() > Duration::from_millis(100);
        assert!(!p.pace(4 << 20, &stop));
        assert!(t.elapsed() < Duration::from_millis(300));
    }

    #[test]
    fn release_cpu_sleeps_in_proportion() {
        let t = Instant::now();
        release_cpu(100, 2 * 1024 * 1024, &|| false);
        assert!(t.elapsed() >= Duration::from_millis(195));
    }
}
