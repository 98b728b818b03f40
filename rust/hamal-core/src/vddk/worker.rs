//! The VDDK worker: the process that hosts VixDiskLib for one disk and serves the engine's
//! reads over its stdin/stdout (see `protocol`). It is started by `client::Worker` with
//! `LD_LIBRARY_PATH=<libdir>/lib64`, so VDDK's bundled libraries are the ones it loads, and it
//! calls InitEx only here, after the exec.

use super::protocol::*;
use super::session::Session;
use super::window::{Window, WINDOW_FD};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::fd::FromRawFd;

/// Runs the worker on fds 0 and 1 until the engine says QUIT or goes away; returns the exit
/// code. Anything else that writes to stdout (VDDK itself) is sent to stderr instead.
pub fn main() -> i32 {
    // First, while WINDOW_FD cannot have been reused by this process.
    let window = match Window::inherited() {
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
            eprintln!(
                "error cannot set up the worker's pipes: {}",
                std::io::Error::last_os_error()
            );
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

pub fn serve(input: &mut impl Read, output: &mut impl Write, mut window: Window) -> i32 {
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
                let reqs = decode_reads(&payload);
                match session.read(&reqs, window.bytes_mut()) {
                    Ok(()) => write_data(output, reqs.iter().map(|r| r.1).sum()),
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
