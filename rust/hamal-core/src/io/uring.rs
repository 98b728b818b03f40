//! io_uring back end: a batch of positional reads or writes submitted together and reaped
//! before the call returns, so no buffer outlives the kernel's use of it.

use super::{blocking, BatchError, ReadReq, WriteReq};
use io_uring::{opcode, squeue, types, IoUring, Probe};
use std::io;
use std::os::fd::RawFd;

/// Checks that a ring can be created here and that it supports READ and WRITE.
pub fn probe() -> Result<(), String> {
    let ring = IoUring::new(2).map_err(|e| format!("io_uring_setup: {e}"))?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring probe: {e}"))?;
    for (code, name) in [(opcode::Read::CODE, "READ"), (opcode::Write::CODE, "WRITE")] {
        if !probe.is_supported(code) {
            return Err(format!("io_uring lacks {name}"));
        }
    }
    Ok(())
}

pub struct Ring {
    ring: IoUring,
    depth: usize,
}

/// One request in a form both directions share: raw buffer, its length, the file offset.
struct Op {
    ptr: *mut u8,
    len: usize,
    offset: u64,
}

impl Ring {
    pub fn new(depth: u32) -> io::Result<Ring> {
        Ok(Ring {
            ring: IoUring::new(depth.next_power_of_two())?,
            depth: depth as usize,
        })
    }

    pub fn read_batch(&mut self, fd: RawFd, reqs: &mut [ReadReq<'_>]) -> Result<(), BatchError> {
        let ops: Vec<Op> = reqs
            .iter_mut()
            .map(|r| Op {
                ptr: r.buf.as_mut_ptr(),
                len: r.buf.len(),
                offset: r.offset,
            })
            .collect();
        self.run(
            &ops,
            |op| {
                opcode::Read::new(types::Fd(fd), op.ptr, op.len as u32)
                    .offset(op.offset)
                    .build()
            },
            |op, done| {
                // SAFETY: `op.ptr` points into a `&mut [u8]` of `op.len` bytes borrowed by `reqs` for
                // this whole call, and the kernel has completed (no longer touches) this request.
                let rest =
                    unsafe { std::slice::from_raw_parts_mut(op.ptr.add(done), op.len - done) };
                blocking::pread_exact(fd, rest, op.offset + done as u64)
            },
        )
    }

    pub fn write_batch(&mut self, fd: RawFd, reqs: &[WriteReq<'_>]) -> Result<(), BatchError> {
        let ops: Vec<Op> = reqs
            .iter()
            .map(|r| Op {
                ptr: r.buf.as_ptr() as *mut u8,
                len: r.buf.len(),
                offset: r.offset,
            })
            .collect();
        self.run(
            &ops,
            |op| {
                opcode::Write::new(types::Fd(fd), op.ptr as *const u8, op.len as u32)
                    .offset(op.offset)
                    .build()
            },
            |op, done| {
                // SAFETY: `op.ptr` points into a `&[u8]` of `op.len` bytes borrowed by `reqs` for this
                // whole call; we only read through it.
                let rest = unsafe { std::slice::from_raw_parts(op.ptr.add(done), op.len - done) };
                blocking::pwrite_all(fd, rest, op.offset + done as u64)
            },
        )
    }

    /// Submits `ops` in windows of the ring depth. Short transfers are finished with blocking I/O.
    fn run(
        &mut self,
        ops: &[Op],
        entry: impl Fn(&Op) -> squeue::Entry,
        finish: impl Fn(&Op, usize) -> io::Result<()>,
    ) -> Result<(), BatchError> {
        let mut first_err: Option<BatchError> = None;
        for (w, window) in ops.chunks(self.depth).enumerate() {
            for (i, op) in window.iter().enumerate() {
                let sqe = entry(op).user_data((w * self.depth + i) as u64);
                // SAFETY: the buffer behind `sqe` is borrowed by the caller until `run` returns,
                // and `run` does not return before every pushed entry has completed (below).
                unsafe { self.ring.submission().push(&sqe) }.expect("ring sized to the window");
            }
            let mut reaped = 0;
            while reaped < window.len() {
                match self.ring.submit_and_wait(window.len() - reaped) {
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                        ) => {}
                    // Returning now would free buffers the kernel may still write into.
                    Err(e) => panic!("io_uring_enter failed with requests in flight: {e}"),
                }
                for cqe in self.ring.completion() {
                    reaped += 1;
                    let op = &ops[cqe.user_data() as usize];
                    let res = cqe.result();
                    let outcome = if res < 0 {
                        Err(io::Error::from_raw_os_error(-res))
                    } else if (res as usize) < op.len {
                        finish(op, res as usize)
                    } else {
                        Ok(())
                    };
                    if let (Err(error), None) = (outcome, &first_err) {
                        first_err = Some(BatchError {
                            offset: op.offset,
                            error,
                        });
                    }
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
        }
        Ok(())
    }
}
