//! The engine's side of a VDDK worker process: start it, open the disk, ask for allocation
//! and reads, and turn a crash of VDDK into an error for that disk only.

use super::protocol::*;
use super::{worker_command, VddkOptions, VddkUri};
use crate::extent::{Extent, ExtentMap};
use crate::io::shm::SharedMem;
use crate::io::ReadReq;
use crate::{Error, Result};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Lines of the worker's stderr kept for the message when it dies.
const TAIL_LINES: usize = 8;

pub struct Worker {
    child: Child,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
    tail: Arc<Mutex<VecDeque<String>>>,
    stderr: Option<JoinHandle<()>>,
    window: SharedMem,
    timeout: Duration,
    /// The engine's chunk buffers, when they are shared with this worker.
    arena: Option<Arc<SharedMem>>,
    name: String,
}

impl Worker {
    /// Starts a worker and opens the disk of `uri` in it; with `arena`, the worker reads
    /// straight into the engine's buffers there.
    pub fn start(
        uri: &VddkUri,
        opts: &VddkOptions,
        arena: Option<Arc<SharedMem>>,
    ) -> Result<(Worker, Opened)> {
        Self::spawn(uri, opts, arena, None)
    }

    /// `PrepareForAccess` (`begin`) or `EndAccess` for the VM of `uri` (any of its disks), in
    /// a worker of its own: vCenter keeps the VM from moving while hamal reads its disks.
    pub fn access(uri: &VddkUri, opts: &VddkOptions, begin: bool) -> Result<()> {
        let what = if begin { ACCESS_PREPARE } else { ACCESS_END };
        Self::spawn(uri, opts, None, Some(what)).map(drop)
    }

    fn spawn(
        uri: &VddkUri,
        opts: &VddkOptions,
        arena: Option<Arc<SharedMem>>,
        access: Option<&str>,
    ) -> Result<(Worker, Opened)> {
        let name = match access {
            None => format!("VDDK disk '{}' of {} on {}", uri.disk, uri.vm, uri.server),
            Some(_) => format!("VDDK access to {} on {}", uri.vm, uri.server),
        };
        let fail = |what: String| Error::Vddk(format!("{name}: {what}"));
        let secret = |path: &std::path::Path, what: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim_end_matches(['\r', '\n']).to_owned())
                .map_err(|e| {
                    fail(format!(
                        "cannot read the {what} file {}: {e}",
                        path.display()
                    ))
                })
        };
        let libdir = uri.libdir.clone().unwrap_or_else(|| opts.libdir.clone());
        let req = OpenRequest {
            libdir: libdir.display().to_string(),
            config: uri.config.as_ref().map(|c| c.display().to_string()),
            server: uri.server.clone(),
            port: uri.port,
            nfc_host_port: uri.nfc_host_port,
            user: uri.user.clone(),
            password: uri
                .password_file
                .as_deref()
                .map(|p| secret(p, "password"))
                .transpose()?,
            cookie: uri
                .cookie_file
                .as_deref()
                .map(|p| secret(p, "cookie"))
                .transpose()?,
            thumbprint: uri.thumbprint.clone(),
            vm: uri.vm.clone(),
            snapshot: uri.snapshot.clone(),
            disk: uri.disk.clone(),
            transports: uri
                .transports
                .clone()
                .unwrap_or_else(|| opts.transports.clone()),
            max_read_blocks: u64::from(opts.max_read_blocks),
            arena: arena.is_some(),
            access: access.map(str::to_owned),
        };
        let cmd = worker_command().map_err(&fail)?;
        let lib64 = libdir.join("lib64");
        let mut path = lib64.into_os_string();
        if let Some(old) = std::env::var_os("LD_LIBRARY_PATH").filter(|o| !o.is_empty()) {
            path.push(":");
            path.push(old);
        }
        let window = SharedMem::create(WINDOW_BYTES)
            .map_err(|e| fail(format!("cannot create the read window: {e}")))?;
        let fds = [window.fd(), arena.as_ref().map_or(-1, |a| a.fd())];
        let mut command = Command::new(&cmd[0]);
        command
            .args(&cmd[1..])
            .env("LD_LIBRARY_PATH", path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: between fork and exec only fcntl and dup2 run, which are async-signal-safe.
        // The memfds are first copied above fd 10 (so placing one cannot clobber the other),
        // then onto WINDOW_FD and ARENA_FD, where they are not close-on-exec.
        unsafe {
            command.pre_exec(move || {
                let mut high = [-1; 2];
                for (h, fd) in high.iter_mut().zip(fds) {
                    if fd >= 0 {
                        *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                        if *h < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                }
                for (h, at) in high.into_iter().zip([WINDOW_FD, ARENA_FD]) {
                    if h >= 0 && libc::dup2(h, at) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| fail(format!("cannot start the VDDK worker {}: {e}", cmd[0])))?;
        let (to, from, err) = (
            child.stdin.take().unwrap(),
            child.stdout.take().unwrap(),
            child.stderr.take().unwrap(),
        );
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr = Some(forward_stderr(err, tail.clone(), name.clone()));
        let mut w = Worker {
            child,
            to,
            from: BufReader::new(from),
            tail,
            stderr,
            window,
            timeout: uri.timeout,
            arena,
            name,
        };
        let opened: Opened = w.call(OP_OPEN, &serde_json::to_vec(&req).unwrap())?;
        drop(req);
        if let Some(what) = access {
            tracing::info!(vm = %uri.vm, server = %uri.server, "VDDK {what} access done");
            return Ok((w, opened));
        }
        let sector_sizes = opened
            .sector_sizes
            .map_or("not reported".into(), |(l, p)| format!("{l}/{p}"));
        tracing::info!(disk = %w.name, library = %opened.library, transport = %opened.transport,
            sectors = opened.capacity_sectors, sector_sizes = %sector_sizes,
            reads_in_place = w.arena.is_some(), "VDDK disk open");
        Ok((w, opened))
    }

    /// Sends one request and decodes a JSON reply.
    fn call<T: serde::de::DeserializeOwned>(&mut self, op: u8, payload: &[u8]) -> Result<T> {
        self.send(op, payload)?;
        let len = self.expect(ST_OK)?;
        let body = read_payload(&mut self.from, len).map_err(|_| self.died())?;
        serde_json::from_slice(&body)
            .map_err(|e| Error::Vddk(format!("{}: bad reply from the worker: {e}", self.name)))
    }

    fn send(&mut self, op: u8, payload: &[u8]) -> Result<()> {
        write_request(&mut self.to, op, payload).map_err(|_| self.died())
    }

    /// Reads a reply header; an error reply becomes the disk's error.
    fn expect(&mut self, status: u8) -> Result<u64> {
        self.wait_for_reply()?;
        let (st, len) = read_reply_header(&mut self.from).map_err(|_| self.died())?;
        if st == ST_ERR {
            let msg = read_payload(&mut self.from, len).map_err(|_| self.died())?;
            return Err(Error::Vddk(format!(
                "{}: {}",
                self.name,
                String::from_utf8_lossy(&msg)
            )));
        }
        if st != status {
            return Err(Error::Vddk(format!(
                "{}: unexpected reply {st} from the worker",
                self.name
            )));
        }
        Ok(len)
    }

    /// Allocated extents, or `None` when VDDK cannot tell (then the whole disk is read and
    /// its zeros detected, as for a library without QueryAllocatedBlocks).
    pub fn allocated(&mut self, chunk_sectors: u64) -> Result<Option<ExtentMap>> {
        let a: Allocated = self.call(OP_ALLOCATED, &chunk_sectors.to_le_bytes())?;
        if let Some(why) = &a.reason {
            tracing::debug!(disk = %self.name, "no allocation map, reading the whole disk: {why}");
        }
        Ok(a.ranges
            .map(|r| ExtentMap::from_extents(r.into_iter().map(|(o, l)| Extent::new(o, l)))))
    }

    /// Fills every request: in place when all buffers are in the shared arena (the engine's
    /// own), else through the window, a window's worth per round trip.
    pub fn read(&mut self, reqs: &mut [ReadReq<'_>]) -> Result<()> {
        let places: Option<Vec<u64>> = match &self.arena {
            Some(a) => reqs.iter().map(|r| a.offset_of(r.buf)).collect(),
            None => None,
        };
        if let Some(places) = places {
            let reads = reqs
                .iter()
                .zip(places)
                .map(|(r, at)| (r.offset, r.buf.len() as u64, at));
            // The worker writes into the buffers; nothing here touches them until it replies.
            return self.round_trip(
                &encode_reads(reads),
                reqs.iter().map(|r| r.buf.len() as u64).sum(),
            );
        }
        let cap = self.window.len() as u64;
        // Pieces (request index, offset in its buffer, disk offset, length) of one round trip.
        let mut round: Vec<(usize, usize, u64, u64)> = Vec::new();
        let mut used = 0u64;
        for i in 0..reqs.len() {
            let (offset, len) = (reqs[i].offset, reqs[i].buf.len() as u64);
            let mut done = 0u64;
            while done < len {
                if used == cap {
                    self.window_round(&round, reqs)?;
                    (round, used) = (Vec::new(), 0);
                }
                let n = (len - done).min(cap - used);
                round.push((i, done as usize, offset + done, n));
                (done, used) = (done + n, used + n);
            }
        }
        if !round.is_empty() {
            self.window_round(&round, reqs)?;
        }
        Ok(())
    }

    fn window_round(
        &mut self,
        round: &[(usize, usize, u64, u64)],
        reqs: &mut [ReadReq<'_>],
    ) -> Result<()> {
        let reads = encode_reads(round.iter().map(|p| (p.2, p.3, TO_WINDOW)));
        self.round_trip(&reads, round.iter().map(|p| p.3).sum())?;
        let mut at = 0usize;
        let window = self.window.bytes();
        for &(i, into, _, n) in round {
            let n = n as usize;
            reqs[i].buf[into..into + n].copy_from_slice(&window[at..at + n]);
            at += n;
        }
        Ok(())
    }

    fn round_trip(&mut self, reads: &[u8], want: u64) -> Result<()> {
        self.send(OP_READ, reads)?;
        let len = self.expect(ST_DATA)?;
        if len != want {
            return Err(Error::Vddk(format!(
                "{}: worker read {len} bytes of {want}",
                self.name
            )));
        }
        Ok(())
    }

    /// Waits until the worker answers; past the timeout it is killed (a hung VDDK call never
    /// returns) and the disk fails.
    fn wait_for_reply(&mut self) -> Result<()> {
        use std::os::fd::AsRawFd;
        if !self.from.buffer().is_empty() {
            return Ok(());
        }
        let mut pfd = libc::pollfd {
            fd: self.from.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: poll on one pollfd this function owns, for at most `ms`.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n > 0 {
                return Ok(()); // data, or EOF / an error that the read then reports
            }
            let interrupted =
                n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted;
            if !interrupted {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(Error::Vddk(format!(
                    "{}: VDDK did not answer within {} s; its worker was stopped",
                    self.name,
                    self.timeout.as_secs_f64()
                )));
            }
        }
    }

    /// The error for a worker that stopped answering: how it ended and its last words.
    fn died(&mut self) -> Error {
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => break None,
            }
        };
        if let Some(t) = self.stderr.take() {
            let _ = t.join();
        }
        let how = match status {
            Some(s) => match s.signal() {
                Some(sig) => format!("was killed by signal {sig} ({})", signal_name(sig)),
                None => format!("exited with code {}", s.code().unwrap_or(-1)),
            },
            None => "stopped answering".to_owned(),
        };
        let tail: Vec<String> = self.tail.lock().unwrap().iter().cloned().collect();
        let last = if tail.is_empty() {
            String::new()
        } else {
            format!("; its last messages: {}", tail.join(" | "))
        };
        Error::Vddk(format!(
            "{}: the VDDK worker process {how}{last}",
            self.name
        ))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // QUIT lets the worker Close, Disconnect and Exit; a hung library is killed.
        let _ = write_request(&mut self.to, OP_QUIT, &[]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.child.try_wait() {
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    tracing::warn!(disk = %self.name, "VDDK worker did not exit; killing it");
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                _ => break,
            }
        }
        if let Some(t) = self.stderr.take() {
            let _ = t.join();
        }
    }
}

/// Moves the worker's stderr into the log (`LEVEL text` lines), keeping the last few lines.
fn forward_stderr(
    err: std::process::ChildStderr,
    tail: Arc<Mutex<VecDeque<String>>>,
    name: String,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
            let (level, text) = line.split_once(' ').unwrap_or(("info", line.as_str()));
            match level {
                "debug" => tracing::debug!(disk = %name, "{text}"),
                "warn" => tracing::warn!(disk = %name, "{text}"),
                "error" => tracing::error!(disk = %name, "{text}"),
                _ => tracing::info!(disk = %name, "{line}"),
            }
            let mut t = tail.lock().unwrap();
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(text.to_owned());
        }
    })
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGABRT => "SIGABRT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        _ => "signal",
    }
}
