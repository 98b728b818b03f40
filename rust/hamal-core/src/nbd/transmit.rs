//! Transmission: reads, writes, zeroes and flush over a negotiated connection (block status:
//! `status.rs`).
//!
//! Nothing a server says is used before it is checked against the request: a reply must name a
//! request in flight, its chunks must have a valid type and length for that request, a read's
//! data and hole chunks must cover it exactly once, and every request ends with `DONE`. A reply
//! that breaks these fails the request and leaves the connection unusable (its stream may be out
//! of step). Requests are sent in a window (count and bytes) so a server that answers slowly or
//! takes small requests cannot deadlock a batch, and each completed request restarts the
//! deadline, so a server that trickles bytes fails the request instead of holding it.

use super::client::{printable, protocol, with_message, Connection, NbdFail};
use super::coverage::Coverage;
use super::proto::*;
use crate::io::{ReadReq, WriteReq};
use std::io::{self, Read, Write};

/// Largest read or write request sent (the server's maximum block size may lower it): servers
/// such as qemu-nbd work on several requests at once, so more, smaller requests in flight move
/// data faster than a few large ones.
const REQUEST_SIZE: usize = 1 << 20;
/// Requests in flight at once, and the bytes they carry or will bring back.
const WINDOW_REQUESTS: usize = 64;
const WINDOW_BYTES: usize = 16 << 20;
/// An error chunk holds at most a 4 KiB message, its header and an offset.
const MAX_ERROR_CHUNK: u32 = 6 + 4096 + 8;

/// One request of a batch: a piece of a caller's request the server accepts in one go.
struct Piece {
    /// Index of the caller's request and this piece's place in its buffer.
    req: usize,
    at: usize,
    offset: u64,
    len: usize,
}

/// What is known of a piece's answer so far.
struct Answer {
    sent: bool,
    done: bool,
    error: Option<io::Error>,
    /// Reads only: which bytes the chunks have covered.
    coverage: Option<Coverage>,
    /// A simple reply answered it (no further chunks may come).
    simple: bool,
}

impl Connection {
    pub(super) fn usable(&self) -> Result<(), NbdFail> {
        match &self.broken {
            Some(why) => Err(protocol(format!("connection unusable: {why}"))),
            None => Ok(()),
        }
    }

    /// Marks the connection unusable when `r` is an error that may have left the stream out of
    /// step (anything but a request the server answered with an error).
    pub(super) fn keep_in_step<T>(
        &mut self,
        r: Result<T, NbdFail>,
        answered: bool,
    ) -> Result<T, NbdFail> {
        if let Err(e) = &r {
            if !answered && self.broken.is_none() {
                self.broken = Some(e.error.to_string());
            }
        }
        r
    }

    pub(super) fn send_request(
        &mut self,
        cmd: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
    ) -> io::Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut h = [0u8; 28];
        h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[6..8].copy_from_slice(&cmd.to_be_bytes());
        h[8..16].copy_from_slice(&cookie.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..28].copy_from_slice(&len.to_be_bytes());
        self.io.get_mut().write_all(&h)?;
        if let Some(d) = data {
            self.io.get_mut().write_all(d)?;
        }
        Ok(cookie)
    }

    /// Checks `[offset, offset+len)` lies inside the export.
    pub(super) fn in_export(&self, offset: u64, len: u64) -> Result<(), NbdFail> {
        match offset.checked_add(len) {
            Some(end) if end <= self.info.size => Ok(()),
            _ => Err(NbdFail {
                offset: Some(offset),
                error: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{len} bytes at offset {offset} reach past the export's end ({} bytes)",
                        self.info.size
                    ),
                ),
            }),
        }
    }

    /// Cuts requests into pieces the server accepts: at most its maximum block size (in whole
    /// minimum blocks) and `REQUEST_SIZE`.
    fn pieces(&self, reqs: impl Iterator<Item = (u64, usize)>) -> Result<Vec<Piece>, NbdFail> {
        let min = self.info.min_block as usize;
        let max = (self.info.max_block as usize).min(REQUEST_SIZE);
        let max = (max - max % min).max(min);
        let mut out = Vec::new();
        for (req, (offset, len)) in reqs.enumerate() {
            self.in_export(offset, len as u64)?;
            for at in (0..len).step_by(max) {
                out.push(Piece {
                    req,
                    at,
                    offset: offset + at as u64,
                    len: (len - at).min(max),
                });
            }
        }
        Ok(out)
    }

    /// Reads every request completely.
    pub fn read_batch(&mut self, reqs: &mut [ReadReq<'_>]) -> Result<(), NbdFail> {
        self.usable()?;
        let pieces = self.pieces(reqs.iter().map(|r| (r.offset, r.buf.len())))?;
        self.exchange(CMD_READ, &pieces, |_| None, Some(reqs))
    }

    /// Writes every request.
    pub fn write_batch(&mut self, reqs: &[WriteReq<'_>]) -> Result<(), NbdFail> {
        self.usable()?;
        let pieces = self.pieces(reqs.iter().map(|r| (r.offset, r.buf.len())))?;
        self.exchange(
            CMD_WRITE,
            &pieces,
            |p| Some(&reqs[p.req].buf[p.at..p.at + p.len]),
            None,
        )
    }

    /// Makes `[offset, offset+len)` read as zeros (WRITE_ZEROES, else written zeros).
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), NbdFail> {
        self.usable()?;
        self.in_export(offset, len)?;
        if self.info.can_write_zeroes() {
            let step = 1u64 << 30;
            let pieces: Vec<Piece> = (0..len.div_ceil(step))
                .map(|i| Piece {
                    req: 0,
                    at: 0,
                    offset: offset + i * step,
                    len: (len - i * step).min(step) as usize,
                })
                .collect();
            return self.exchange(CMD_WRITE_ZEROES, &pieces, |_| None, None);
        }
        let zeros = vec![0u8; self.info.max_block.min(4 << 20) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64) as usize;
            self.write_batch(&[WriteReq {
                offset: pos,
                buf: &zeros[..n],
            }])?;
            pos += n as u64;
        }
        Ok(())
    }

    /// FLUSH: everything this connection wrote is durable (a no-op if the server has no cache).
    pub fn flush(&mut self) -> Result<(), NbdFail> {
        self.usable()?;
        if !self.info.can_flush() {
            return Ok(());
        }
        let piece = Piece {
            req: 0,
            at: 0,
            offset: 0,
            len: 0,
        };
        self.exchange(CMD_FLUSH, &[piece], |_| None, None)
    }

    /// Sends `pieces` as `cmd` requests in a window and reads their replies; read data lands in
    /// `reads`. Every piece is answered or the batch fails.
    fn exchange<'d>(
        &mut self,
        cmd: u16,
        pieces: &[Piece],
        payload: impl Fn(&Piece) -> Option<&'d [u8]>,
        mut reads: Option<&mut [ReadReq<'_>]>,
    ) -> Result<(), NbdFail> {
        let first = self.next_cookie;
        let mut answers: Vec<Answer> = pieces
            .iter()
            .map(|p| Answer {
                sent: false,
                done: false,
                error: None,
                coverage: reads.is_some().then(|| Coverage::new(p.len as u64)),
                simple: false,
            })
            .collect();
        let (mut next, mut left) = (0, pieces.len());
        let (mut in_flight, mut in_flight_bytes) = (0, 0);
        self.arm();
        while left > 0 {
            while next < pieces.len()
                && in_flight < WINDOW_REQUESTS
                && (in_flight == 0 || in_flight_bytes + pieces[next].len <= WINDOW_BYTES)
            {
                let p = &pieces[next];
                let data = payload(p);
                let r = self.send_request(cmd, p.offset, p.len as u32, data);
                self.keep_in_step(r.map_err(NbdFail::from), false)?;
                answers[next].sent = true;
                in_flight += 1;
                in_flight_bytes += bytes_carried(cmd, p);
                next += 1;
            }
            let r = self.next_chunk(first, pieces, &mut answers, reads.as_deref_mut());
            if let Some(i) = self.keep_in_step(r, false)? {
                in_flight -= 1;
                in_flight_bytes -= bytes_carried(cmd, &pieces[i]);
                left -= 1;
                self.arm();
            }
        }
        match answers
            .iter_mut()
            .zip(pieces)
            .find(|(a, _)| a.error.is_some())
        {
            Some((a, p)) => Err(NbdFail {
                offset: Some(p.offset),
                error: a.error.take().unwrap(),
            }),
            None => Ok(()),
        }
    }

    /// Reads one reply chunk and applies it; the index of the piece it finished, if any.
    fn next_chunk(
        &mut self,
        first: u64,
        pieces: &[Piece],
        answers: &mut [Answer],
        reads: Option<&mut [ReadReq<'_>]>,
    ) -> Result<Option<usize>, NbdFail> {
        let magic = self.u32()?;
        let (flags, kind, cookie, length) = match magic {
            SIMPLE_REPLY_MAGIC => {
                let (err, cookie) = (self.u32()?, self.u64()?);
                (REPLY_FLAG_DONE, u16::MAX, cookie, err)
            }
            STRUCTURED_REPLY_MAGIC => (self.u16()?, self.u16()?, self.u64()?, self.u32()?),
            m => return Err(protocol(format!("bad reply magic {m:#x}"))),
        };
        let i = cookie
            .checked_sub(first)
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| i < pieces.len() && answers[i].sent && !answers[i].done);
        let Some(i) = i else {
            return Err(protocol(format!(
                "reply for cookie {cookie}, which names no request in flight"
            )));
        };
        let (p, a) = (&pieces[i], &mut answers[i]);
        let at = |what: &str| protocol(format!("{what} (request at offset {})", p.offset));
        if magic == SIMPLE_REPLY_MAGIC {
            if a.simple || a.coverage.as_ref().is_some_and(|c| c.covered() > 0) {
                return Err(at("a simple reply after chunks of the same request"));
            }
            a.simple = true;
            if length != 0 {
                a.error = Some(io::Error::from_raw_os_error(length as i32));
            } else if let Some(reads) = reads {
                if self.info.structured {
                    return Err(at(
                        "a simple reply to a read after structured replies were agreed",
                    ));
                }
                let buf = &mut reads[p.req].buf[p.at..p.at + p.len];
                self.io.read_exact(buf)?;
                a.coverage
                    .as_mut()
                    .unwrap()
                    .add(0, p.len as u64)
                    .map_err(|e| at(&e))?;
            }
        } else {
            if !self.info.structured {
                return Err(at("a structured reply, which was not agreed"));
            }
            match kind {
                REPLY_TYPE_NONE if length == 0 && flags & REPLY_FLAG_DONE != 0 => {}
                REPLY_TYPE_NONE => return Err(at("an empty chunk that does not end the reply")),
                REPLY_TYPE_OFFSET_DATA if a.coverage.is_some() && length > 8 => {
                    let off = self.u64()?;
                    let n = (length - 8) as u64;
                    let rel = off.wrapping_sub(p.offset);
                    let c = a.coverage.as_mut().unwrap();
                    c.add(rel, n)
                        .map_err(|e| at(&format!("data chunk at offset {off}: {e}")))?;
                    let start = p.at + rel as usize;
                    let buf = &mut reads.unwrap()[p.req].buf[start..start + n as usize];
                    self.io.read_exact(buf)?;
                }
                REPLY_TYPE_OFFSET_HOLE if a.coverage.is_some() && length == 12 => {
                    let (off, n) = (self.u64()?, self.u32()? as u64);
                    let rel = off.wrapping_sub(p.offset);
                    let c = a.coverage.as_mut().unwrap();
                    c.add(rel, n)
                        .map_err(|e| at(&format!("hole chunk at offset {off}: {e}")))?;
                    let start = p.at + rel as usize;
                    reads.unwrap()[p.req].buf[start..start + n as usize].fill(0);
                }
                REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                    let (err, msg) = self.error_chunk(length)?;
                    a.error = Some(with_message(err, &msg));
                }
                _ => {
                    return Err(at(&format!(
                        "a chunk of type {kind} and {length} bytes that does not fit the request"
                    )))
                }
            }
        }
        if flags & REPLY_FLAG_DONE == 0 {
            return Ok(None);
        }
        a.done = true;
        if let (None, Some(c)) = (&a.error, &a.coverage) {
            if !c.complete() {
                return Err(at(&format!(
                    "the server answered {} of the {} bytes asked for",
                    c.covered(),
                    p.len
                )));
            }
        }
        Ok(Some(i))
    }

    /// Reads an error chunk of `length` bytes: its error (never 0) and message.
    pub(super) fn error_chunk(&mut self, length: u32) -> Result<(u32, String), NbdFail> {
        if !(6..=MAX_ERROR_CHUNK).contains(&length) {
            return Err(protocol(format!("error chunk of {length} bytes")));
        }
        let err = self.u32()?;
        let mlen = self.u16()? as u32;
        let rest = self.bytes((length - 6) as usize)?;
        if err == 0 || mlen > length - 6 || length - 6 - mlen > 8 {
            return Err(protocol(format!(
                "malformed error chunk (error {err}, message of {mlen} in {length} bytes)"
            )));
        }
        let msg = String::from_utf8_lossy(&rest[..mlen as usize]);
        Ok((err, printable(&msg)))
    }
}

/// Bytes a request holds in the window: its payload, or the data its answer brings.
fn bytes_carried(cmd: u16, p: &Piece) -> usize {
    match cmd {
        CMD_READ | CMD_WRITE => p.len,
        _ => 0,
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Polite disconnect within a second; the server may already be gone.
        if !self.transmitting {
            return;
        }
        if let Some(s) = self.io.get_mut().socket() {
            s.deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            s.stop = None;
        }
        let _ = self.send_request(CMD_DISC, 0, 0, None);
    }
}
