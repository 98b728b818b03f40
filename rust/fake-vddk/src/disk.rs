//! An open fake disk: a local raw file, read synchronously or by a background thread that
//! fires the completion callbacks (as VDDK does, from a thread of its own).

use crate::abi::*;
use crate::record::{faults, record};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

pub const SECTOR: u64 = 512;

/// One queued asynchronous read. Pointers travel as integers: the caller keeps the buffer and
/// callback data alive until `Wait` returns.
struct Job {
    start: u64,
    count: u64,
    buf: usize,
    cb: CompletionFn,
    data: usize,
}

pub struct Disk {
    pub file: Arc<File>,
    pub sectors: u64,
    pending: Arc<(Mutex<u64>, Condvar)>,
    queue: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Disk {
    pub fn new(file: File) -> std::io::Result<Disk> {
        let sectors = file.metadata()?.len().div_ceil(SECTOR);
        Ok(Disk {
            file: Arc::new(file),
            sectors,
            pending: Arc::new((Mutex::new(0), Condvar::new())),
            queue: None,
            thread: None,
        })
    }

    /// Reads `count` sectors at `start` into `buf`, applying the injected faults.
    pub fn read(file: &File, sectors: u64, start: u64, count: u64, buf: &mut [u8]) -> VixError {
        let f = faults();
        let hit = |s: Option<u64>| s.is_some_and(|s| start <= s && s < start + count);
        if hit(f.abort_at) {
            record(&format!("abort start={start} n={count}"));
            std::process::abort();
        }
        if hit(f.hang_at) {
            record(&format!("hang start={start} n={count}"));
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
        if hit(f.read_at) || count == 0 || start + count > sectors {
            return VIX_E_FILE_ERROR;
        }
        match file.read_at(buf, start * SECTOR) {
            Ok(n) => {
                // The last sector of a file whose size is not a sector multiple reads short.
                buf[n..].fill(0);
                VIX_OK
            }
            Err(_) => VIX_E_FILE_ERROR,
        }
    }

    pub fn queue(
        &mut self,
        start: u64,
        count: u64,
        buf: *mut u8,
        cb: CompletionFn,
        data: *mut std::ffi::c_void,
    ) {
        let tx = self.queue.get_or_insert_with(|| {
            let (tx, rx) = channel::<Job>();
            let (file, sectors, pending) = (self.file.clone(), self.sectors, self.pending.clone());
            self.thread = Some(std::thread::spawn(move || {
                for job in rx {
                    let len = (job.count * SECTOR) as usize;
                    // SAFETY: the caller of ReadAsync keeps `len` bytes at `buf` alive and
                    // untouched until Wait returns, which is after this callback.
                    let buf = unsafe { std::slice::from_raw_parts_mut(job.buf as *mut u8, len) };
                    let err = Disk::read(&file, sectors, job.start, job.count, buf);
                    // SAFETY: the callback and its data come from the ReadAsync caller.
                    unsafe { (job.cb)(job.data as *mut std::ffi::c_void, err) };
                    let (n, cv) = &*pending;
                    *n.lock().unwrap() -= 1;
                    cv.notify_all();
                }
            }));
            tx
        });
        *self.pending.0.lock().unwrap() += 1;
        let job = Job {
            start,
            count,
            buf: buf as usize,
            cb,
            data: data as usize,
        };
        tx.send(job).expect("fake VDDK async thread is alive");
    }

    /// Blocks until every queued read has fired its callback.
    pub fn wait(&self) {
        let (n, cv) = &*self.pending;
        let mut g = n.lock().unwrap();
        while *g > 0 {
            g = cv.wait(g).unwrap();
        }
    }

    /// Allocated ranges of `[start, start + count)` sectors, rounded out to `chunk` sectors.
    pub fn allocated(&self, start: u64, count: u64, chunk: u64) -> Vec<(u64, u64)> {
        let fd = self.file.as_raw_fd();
        let (end, mut pos) = ((start + count) * SECTOR, start * SECTOR);
        let mut out: Vec<(u64, u64)> = Vec::new();
        while pos < end {
            // SAFETY: lseek on an fd this disk owns; no memory is involved.
            let data = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
            if data < 0 || data as u64 >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let hole = if hole < 0 {
                end
            } else {
                (hole as u64).min(end)
            };
            let bytes = chunk * SECTOR;
            let (a, b) = ((data as u64) / bytes * chunk, hole.div_ceil(bytes) * chunk);
            match out.last_mut() {
                Some(last) if last.0 + last.1 >= a => last.1 = b.max(last.0 + last.1) - last.0,
                _ => out.push((a, b - a)),
            }
            pos = hole;
        }
        out
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.wait();
        self.queue = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
