//! The VDDK worker: the process that hosts VixDiskLib for one disk and serves the engine's
//! reads over its stdin/stdout (see `protocol`). It is started by `client::Worker` with
//! `LD_LIBRARY_PATH=<libdir>/lib64`, so VDDK's bundled libraries are the ones it loads, and it
//! calls InitEx only here, after the exec.

use super::protocol::*;
use super::session::Session;
use crate::io::shm::SharedMem;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::fd::FromRawFd;

/// Runs the worker on fds 0 and 1 until the engine says QUIT or goes away; returns the exit
/// code. Anything else that writes to stdout (VDDK itself) is sent to stderr instead.
pub fn main() -> i32 {
    // First, while WINDOW_FD cannot have been reused by this process.
    // SAFETY: the engine starts every worker with the window's memfd at WINDOW_FD.
    let window = match unsafe { SharedMem::inherited(WINDOW_FD) } {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error cannot map the read window (fd {WINDOW_FD}): {e}");
            return 2;
        }
    };
    // SAFETY: dup/dup2 on the standard descriptors this process was started with.
    let proto = unsafe {
        let fd = libc::dup(1);
        if fd < 0 || libc::dup2(2, 1) < 0 {
            let e = std::io::Error::last_os_error();
            eprintln!("error cannot set up the worker's pipes: {e}");
            return 2;
        }
        File::from_raw_fd(fd)
    };
    // SAFETY: fd 0 is the engine's request pipe, owned by this process from now on.
    let input = unsafe { File::from_raw_fd(0) };
    serve(
        &mut BufReader::new(input),
        &mut BufWriter::new(proto),
        window,
    )
}

fn serve(input: &mut impl Read, output: &mut impl Write, mut window: SharedMem) -> i32 {
    let req = match read_request(input) {
        Ok(Some((OP_OPEN, payload))) => serde_json::from_slice::<OpenRequest>(&payload),
        _ => {
            eprintln!("error the engine did not send OPEN first");
            return 2;
        }
    };
    let req = match req {
        Ok(r) => r,
        Err(e) => {
            let _ = write_reply(output, ST_ERR, format!("bad OPEN request: {e}").as_bytes());
            return 2;
        }
    };
    let arena = if req.arena {
        // SAFETY: the engine said it passed its buffer arena's memfd at ARENA_FD.
        match unsafe { SharedMem::inherited(ARENA_FD) } {
            Ok(a) => Some(a),
            Err(e) => {
                let msg = format!("cannot map the buffer arena: {e}");
                let _ = write_reply(output, ST_ERR, msg.as_bytes());
                return 2;
            }
        }
    } else {
        None
    };
    let (mut session, opened) = match Session::open(&req) {
        Ok(s) => s,
        Err(e) => {
            let _ = write_reply(output, ST_ERR, e.as_bytes());
            return 1;
        }
    };
    drop(req); // the password is not needed any more
    if write_reply(output, ST_OK, &serde_json::to_vec(&opened).unwrap()).is_err() {
        return 1;
    }
    // A broken pipe or EOF means the engine is gone: fall through to the cleanup in Drop.
    while let Ok(Some((op, payload))) = read_request(input) {
        let sent = match op {
            OP_READ => {
                let reads = decode_reads(&payload);
                let result = destinations(&reads, &mut window, arena.as_ref())
                    .and_then(|mut dests| session.read(&mut dests));
                match result {
                    Ok(()) => write_data(output, reads.iter().map(|r| r.1).sum()),
                    Err(e) => write_reply(output, ST_ERR, e.as_bytes()),
                }
            }
            OP_ALLOCATED => {
                let chunk = payload
                    .get(..8)
                    .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
                let a = session.allocated(chunk);
                write_reply(output, ST_OK, &serde_json::to_vec(&a).unwrap())
            }
            OP_QUIT => break,
            other => write_reply(
                output,
                ST_ERR,
                format!("unknown request {other}").as_bytes(),
            ),
        };
        if sent.is_err() {
            break;
        }
    }
    drop(session);
    0
}

/// The buffer each read goes to: packed in the window, or its place in the arena. Arena
/// places must lie inside it and not overlap (each becomes an exclusive slice).
fn destinations<'a>(
    reads: &[(u64, u64, u64)],
    window: &'a mut SharedMem,
    arena: Option<&'a SharedMem>,
) -> Result<Vec<(u64, &'a mut [u8])>, String> {
    let mut placed: Vec<(u64, u64)> = reads
        .iter()
        .filter(|r| r.2 != TO_WINDOW)
        .map(|r| (r.2, r.1))
        .collect();
    placed.sort_unstable();
    let arena_len = arena.map_or(0, |a| a.len() as u64);
    let overlap = placed.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0);
    if overlap || placed.last().is_some_and(|&(at, len)| at + len > arena_len) {
        return Err("READ destinations overlap or lie outside the buffer arena".into());
    }
    let mut rest = window.bytes_mut();
    let mut out = Vec::with_capacity(reads.len());
    for &(offset, len, dest) in reads {
        if dest == TO_WINDOW {
            if len > rest.len() as u64 {
                return Err(format!("READ of {len} bytes overflows the read window"));
            }
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(len as usize);
            out.push((offset, head));
            rest = tail;
        } else if let Some(a) = arena {
            // SAFETY: checked above: inside the arena and disjoint from every other read.
            out.push((offset, unsafe { a.slice_mut(dest as usize, len as usize) }));
        }
    }
    Ok(out)
}
