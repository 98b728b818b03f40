//! `max_socket_connections_per_host`: sockets to one CNA host are counted over every process
//! of this proxy (each VM syncs in its own worker) with `flock`ed slot files in the lock folder,
//! `fc-HOST-N.slot` for N below the limit. The kernel drops a dead process's locks, so a slot
//! never leaks. A reader waits for a free slot; it is said once a minute while it waits.

use crate::target::lock::try_flock;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

/// One socket's right to exist; dropping it frees the slot.
pub(crate) struct Slot {
    _file: File,
}

pub(crate) fn acquire(dir: &Path, host: &str, max: u32) -> io::Result<Slot> {
    std::fs::create_dir_all(dir)?;
    let name: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let started = Instant::now();
    let mut said = Instant::now();
    loop {
        for n in 0..max.max(1) {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("fc-{name}-{n}.slot")))?;
            if try_flock(&file)? {
                return Ok(Slot { _file: file });
            }
        }
        if said.elapsed() >= Duration::from_secs(60) {
            tracing::info!(
                "waiting {:.0} s for a socket to FusionCompute host {host}: all {max} (max_socket_connections_per_host) are in use",
                started.elapsed().as_secs_f64()
            );
            said = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_host_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let a = acquire(dir.path(), "10.0.0.1", 2).unwrap();
        let _b = acquire(dir.path(), "10.0.0.1", 2).unwrap();
        let _other_host = acquire(dir.path(), "10.0.0.2", 1).unwrap();
        let waiter = std::thread::spawn({
            let dir = dir.path().to_owned();
            move || acquire(&dir, "10.0.0.1", 2).map(|_| Instant::now())
        });
        std::thread::sleep(Duration::from_millis(300));
        let freed = Instant::now();
        drop(a);
        assert!(
            waiter.join().unwrap().unwrap() >= freed,
            "the third waited for a free slot"
        );
    }
}
