//! One NBD connection: handshake, then pipelined transmission requests.

use super::proto::*;
use super::uri::{NbdAddress, NbdUri};
use crate::io::{ReadReq, WriteReq};
use std::io::{self, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Largest read or write request sent (the server's maximum block size may lower it).
const REQUEST_SIZE: usize = 1 << 20;

/// What the server told us about the export during `NBD_OPT_GO`.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub max_block: u32,
    pub structured: bool,
    /// Negotiated metadata contexts: (id, name).
    pub contexts: Vec<(u32, String)>,
}

impl ExportInfo {
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }
    pub fn can_flush(&self) -> bool {
        self.flags & TFLAG_SEND_FLUSH != 0
    }
    pub fn can_write_zeroes(&self) -> bool {
        self.flags & TFLAG_SEND_WRITE_ZEROES != 0
    }
    /// The server serves several connections to this export consistently (and takes them).
    pub fn can_multi_conn(&self) -> bool {
        self.flags & TFLAG_CAN_MULTI_CONN != 0
    }
    /// Whether `context` was negotiated (block status needs structured replies).
    pub fn has_context(&self, context: &str) -> bool {
        self.contexts.iter().any(|(_, n)| n == context)
    }
}

/// One extent of a block-status answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusExtent {
    pub offset: u64,
    pub len: u64,
    pub flags: u32,
}

/// An error of one request (its offset when known) or of the connection.
#[derive(Debug)]
pub struct NbdFail {
    pub offset: Option<u64>,
    pub error: io::Error,
}

impl From<io::Error> for NbdFail {
    fn from(error: io::Error) -> Self {
        let error = if error.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed by the server",
            )
        } else {
            error
        };
        NbdFail {
            offset: None,
            error,
        }
    }
}

fn protocol(msg: impl Into<String>) -> NbdFail {
    NbdFail {
        offset: None,
        error: io::Error::new(io::ErrorKind::InvalidData, msg.into()),
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, Stream>>),
    /// Only while the plain stream is being wrapped in TLS.
    Detached,
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection is being upgraded")
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
            Stream::Detached => Err(detached()),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
            Stream::Detached => Err(detached()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tls(s) => s.flush(),
            _ => Ok(()),
        }
    }
}

pub struct Connection {
    /// Replies are read through the buffer; requests are written to the stream underneath.
    io: BufReader<Stream>,
    info: ExportInfo,
    next_cookie: u64,
}

/// A request in flight: where its reply lands.
struct Pending {
    req: usize,
    /// Offset of this piece within the request's buffer, its disk offset and length.
    at: usize,
    offset: u64,
    len: usize,
    /// A read: a successful simple reply is followed by `len` bytes of data.
    reads: bool,
    done: bool,
    error: Option<io::Error>,
}

impl Pending {
    fn new(req: usize, at: usize, offset: u64, len: usize, reads: bool) -> Pending {
        Pending {
            req,
            at,
            offset,
            len,
            reads,
            done: false,
            error: None,
        }
    }
}

impl Connection {
    /// Connects, negotiates structured replies and `contexts`, and enters transmission.
    pub fn connect(
        uri: &NbdUri,
        contexts: &[String],
        timeout: Duration,
    ) -> Result<Connection, NbdFail> {
        let stream = match &uri.address {
            NbdAddress::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                Stream::Tcp(s)
            }
            NbdAddress::Unix(path) => {
                let s = UnixStream::connect(path)?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                Stream::Unix(s)
            }
        };
        let mut c = Connection {
            io: BufReader::with_capacity(256 * 1024, stream),
            info: ExportInfo {
                size: 0,
                flags: 0,
                min_block: 1,
                max_block: DEFAULT_MAX_PAYLOAD,
                structured: false,
                contexts: vec![],
            },
            next_cookie: 1,
        };
        if let Err(e) = c.handshake(uri, contexts) {
            c.abort();
            return Err(e);
        }
        Ok(c)
    }

    /// Ends a negotiation that failed with `NBD_OPT_ABORT`, as the protocol asks (best effort:
    /// the connection is dropped right after).
    fn abort(&mut self) {
        if !matches!(self.io.get_ref(), Stream::Detached) {
            let _ = self.send_option(OPT_ABORT, &[]);
        }
    }

    /// Sets the socket timeouts (a short one while probing whether a server takes a second
    /// connection, the usual one after).
    pub fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        fn set(s: &Stream, t: Duration) -> io::Result<()> {
            match s {
                Stream::Tcp(s) => s
                    .set_read_timeout(Some(t))
                    .and(s.set_write_timeout(Some(t))),
                Stream::Unix(s) => s
                    .set_read_timeout(Some(t))
                    .and(s.set_write_timeout(Some(t))),
                Stream::Tls(s) => set(&s.sock, t),
                Stream::Detached => Ok(()),
            }
        }
        set(self.io.get_ref(), timeout)
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    fn u16(&mut self) -> io::Result<u16> {
        let mut b = [0; 2];
        self.io.read_exact(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }
    fn u32(&mut self) -> io::Result<u32> {
        let mut b = [0; 4];
        self.io.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }
    fn u64(&mut self) -> io::Result<u64> {
        let mut b = [0; 8];
        self.io.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
    fn bytes(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0; n];
        self.io.read_exact(&mut v)?;
        Ok(v)
    }

    fn handshake(&mut self, uri: &NbdUri, contexts: &[String]) -> Result<(), NbdFail> {
        let export = uri.export.as_str();
        if self.u64()? != NBDMAGIC {
            return Err(protocol("not an NBD server (bad greeting)"));
        }
        if self.u64()? != IHAVEOPT {
            return Err(protocol(
                "server speaks the old-style handshake, which hamal does not support",
            ));
        }
        let hflags = self.u16()?;
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol(
                "server does not support the fixed newstyle handshake",
            ));
        }
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if hflags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        self.io.get_mut().write_all(&cflags.to_be_bytes())?;
        if uri.tls {
            self.start_tls(uri)?;
        }

        self.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let (kind, data) = self.option_reply(OPT_STRUCTURED_REPLY)?;
        self.info.structured = match kind {
            REP_ACK => true,
            REP_ERR_UNSUP => false,
            _ => return Err(option_error("structured replies", kind, &data)),
        };

        // Without structured replies there is no block status: the caller reads everything
        // (and refuses what needs a bitmap).
        if !contexts.is_empty() && self.info.structured {
            let mut d = Vec::new();
            d.extend_from_slice(&(export.len() as u32).to_be_bytes());
            d.extend_from_slice(export.as_bytes());
            d.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for q in contexts {
                d.extend_from_slice(&(q.len() as u32).to_be_bytes());
                d.extend_from_slice(q.as_bytes());
            }
            self.send_option(OPT_SET_META_CONTEXT, &d)?;
            loop {
                let (kind, data) = self.option_reply(OPT_SET_META_CONTEXT)?;
                match kind {
                    REP_META_CONTEXT if data.len() >= 4 => {
                        let id = u32::from_be_bytes(data[..4].try_into().unwrap());
                        self.info
                            .contexts
                            .push((id, String::from_utf8_lossy(&data[4..]).into_owned()));
                    }
                    REP_ACK => break,
                    _ => return Err(option_error("metadata contexts", kind, &data)),
                }
            }
            for q in contexts {
                if !self.info.contexts.iter().any(|(_, n)| n == q) {
                    let what = match q.strip_prefix("qemu:dirty-bitmap:") {
                        Some(b) => format!("dirty bitmap '{b}' is not exported"),
                        None => format!("metadata context '{q}' is not offered"),
                    };
                    return Err(NbdFail {
                        offset: None,
                        error: io::Error::new(io::ErrorKind::NotFound, what),
                    });
                }
            }
        }

        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(OPT_GO, &d)?;
        loop {
            let (kind, data) = self.option_reply(OPT_GO)?;
            match kind {
                REP_INFO if data.len() >= 2 => {
                    let info = u16::from_be_bytes([data[0], data[1]]);
                    if info == INFO_EXPORT && data.len() >= 12 {
                        self.info.size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                        self.info.flags = u16::from_be_bytes([data[10], data[11]]);
                    } else if info == INFO_BLOCK_SIZE && data.len() >= 14 {
                        self.info.min_block =
                            u32::from_be_bytes(data[2..6].try_into().unwrap()).max(1);
                        self.info.max_block =
                            u32::from_be_bytes(data[10..14].try_into().unwrap()).max(4096);
                    }
                }
                REP_INFO => {}
                REP_ACK => return Ok(()),
                _ => return Err(option_error(&format!("export '{export}'"), kind, &data)),
            }
        }
    }

    /// NBD_OPT_STARTTLS, then the TLS handshake; the rest of the session runs inside TLS.
    fn start_tls(&mut self, uri: &NbdUri) -> Result<(), NbdFail> {
        let tls = super::tls::client(uri)?;
        self.send_option(OPT_STARTTLS, &[])?;
        let (kind, data) = self.option_reply(OPT_STARTTLS)?;
        if kind != REP_ACK {
            return Err(option_error("TLS", kind, &data));
        }
        if !self.io.buffer().is_empty() {
            return Err(protocol("server sent data before the TLS handshake"));
        }
        let plain = std::mem::replace(self.io.get_mut(), Stream::Detached);
        let mut stream = rustls::StreamOwned::new(tls, plain);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock).map_err(|e| {
                let ca = uri
                    .tls_certificates
                    .as_ref()
                    .map(|d| d.join("ca-cert.pem").display().to_string())
                    .unwrap_or_default();
                let context = format!("trusted CA {ca}");
                let why = crate::tls_failure::explain(&e, &context)
                    .unwrap_or_else(|| format!("TLS handshake failed: {e}"));
                NbdFail {
                    offset: None,
                    error: io::Error::new(e.kind(), why),
                }
            })?;
        }
        *self.io.get_mut() = Stream::Tls(Box::new(stream));
        Ok(())
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.io.get_mut().write_all(&b)
    }

    fn option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), NbdFail> {
        if self.u64()? != OPT_REPLY_MAGIC {
            return Err(protocol("bad option reply magic"));
        }
        let (opt, kind, len) = (self.u32()?, self.u32()?, self.u32()?);
        if opt != option {
            return Err(protocol(format!(
                "reply to option {opt} while waiting for {option}"
            )));
        }
        if len > 1 << 20 {
            return Err(protocol(format!(
                "option reply of {len} bytes is too large"
            )));
        }
        Ok((kind, self.bytes(len as usize)?))
    }

    fn send_request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
    ) -> io::Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut h = [0u8; 28];
        h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
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

    /// Splits `[offset, offset+len)` into pieces the server accepts, at most `REQUEST_SIZE`
    /// each: servers such as qemu-nbd work on several requests at once, so more, smaller
    /// requests in flight move data faster than a few large ones.
    fn pieces(&self, offset: u64, len: usize) -> impl Iterator<Item = (usize, u64, usize)> {
        let max = (self.info.max_block as usize).min(REQUEST_SIZE);
        (0..len)
            .step_by(max.max(1))
            .map(move |at| (at, offset + at as u64, (len - at).min(max)))
    }

    /// Reads every request completely, all pieces in flight at once.
    pub fn read_batch(&mut self, reqs: &mut [ReadReq<'_>]) -> Result<(), NbdFail> {
        let first = self.next_cookie;
        let mut pending = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            for (at, offset, len) in self.pieces(r.offset, r.buf.len()).collect::<Vec<_>>() {
                self.send_request(CMD_READ, 0, offset, len as u32, None)?;
                pending.push(Pending::new(i, at, offset, len, true));
            }
        }
        self.collect(first, &mut pending, |p, data_at, src| {
            let dst = &mut reqs[p.req].buf[p.at + data_at..p.at + data_at + src.len()];
            dst.copy_from_slice(src);
        })
    }

    /// Writes every request, all pieces in flight at once.
    pub fn write_batch(&mut self, reqs: &[WriteReq<'_>]) -> Result<(), NbdFail> {
        let first = self.next_cookie;
        let mut pending = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            for (at, offset, len) in self.pieces(r.offset, r.buf.len()).collect::<Vec<_>>() {
                self.send_request(CMD_WRITE, 0, offset, len as u32, Some(&r.buf[at..at + len]))?;
                pending.push(Pending::new(i, at, offset, len, false));
            }
        }
        self.collect(first, &mut pending, |_, _, _| {})
    }

    /// Makes `[offset, offset+len)` read as zeros (WRITE_ZEROES, else written zeros).
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), NbdFail> {
        let first = self.next_cookie;
        let mut pending = Vec::new();
        if self.info.can_write_zeroes() {
            let step = 1u64 << 30;
            let mut pos = offset;
            while pos < offset + len {
                let n = (offset + len - pos).min(step);
                self.send_request(CMD_WRITE_ZEROES, 0, pos, n as u32, None)?;
                pending.push(Pending::new(0, 0, pos, 0, false));
                pos += n;
            }
            return self.collect(first, &mut pending, |_, _, _| {});
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
        if !self.info.can_flush() {
            return Ok(());
        }
        let first = self.next_cookie;
        self.send_request(CMD_FLUSH, 0, 0, 0, None)?;
        let mut pending = vec![Pending::new(0, 0, 0, 0, false)];
        self.collect(first, &mut pending, |_, _, _| {})
    }

    /// The extents of `context` over `[offset, offset+len)`, asking as often as needed.
    pub fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<StatusExtent>, NbdFail> {
        let id = self
            .info
            .contexts
            .iter()
            .find(|(_, n)| n == context)
            .map(|(id, _)| *id)
            .ok_or_else(|| protocol(format!("metadata context '{context}' was not negotiated")))?;
        let end = offset + len;
        let mut out: Vec<StatusExtent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let ask = (end - pos).min(1 << 31) as u32;
            let cookie = self.send_request(CMD_BLOCK_STATUS, 0, pos, ask, None)?;
            let mut got = Vec::new();
            loop {
                let (flags, kind, c, length) = self.structured_header()?;
                if c != cookie {
                    return Err(protocol(format!("unexpected reply cookie {c}")));
                }
                match kind {
                    REPLY_TYPE_BLOCK_STATUS if length >= 4 && (length - 4) % 8 == 0 => {
                        let ctx = self.u32()?;
                        let mut at = pos;
                        for _ in 0..(length - 4) / 8 {
                            let (l, f) = (self.u32()? as u64, self.u32()?);
                            if ctx == id && l > 0 {
                                got.push(StatusExtent {
                                    offset: at,
                                    len: l,
                                    flags: f,
                                });
                            }
                            at += l;
                        }
                    }
                    _ => self.other_chunk(kind, length, pos)?,
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    break;
                }
            }
            let covered: u64 = got.iter().map(|e| e.len).sum();
            if covered == 0 {
                return Err(protocol(format!("empty block status at offset {pos}")));
            }
            for mut e in got {
                e.len = e.len.min(end - e.offset);
                match out.last_mut() {
                    Some(l) if l.flags == e.flags && l.offset + l.len == e.offset => l.len += e.len,
                    _ => out.push(e),
                }
            }
            pos += covered.min(end - pos);
        }
        Ok(out)
    }

    /// Reads a structured reply header (the magic must be the structured one).
    fn structured_header(&mut self) -> Result<(u16, u16, u64, u32), NbdFail> {
        let magic = self.u32()?;
        if magic == SIMPLE_REPLY_MAGIC {
            let (err, _cookie) = (self.u32()?, self.u64()?);
            return Err(NbdFail {
                offset: None,
                error: io::Error::from_raw_os_error(err as i32),
            });
        }
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(protocol(format!("bad reply magic {magic:#x}")));
        }
        Ok((self.u16()?, self.u16()?, self.u64()?, self.u32()?))
    }

    /// Consumes a chunk we do not expect here; errors become failures.
    fn other_chunk(&mut self, kind: u16, length: u32, offset: u64) -> Result<(), NbdFail> {
        if kind == REPLY_TYPE_ERROR || kind == REPLY_TYPE_ERROR_OFFSET {
            let (err, msg) = self.error_chunk(length)?;
            return Err(NbdFail {
                offset: Some(offset),
                error: with_message(err, &msg),
            });
        }
        self.bytes(length as usize)?;
        Ok(())
    }

    fn error_chunk(&mut self, length: u32) -> Result<(u32, String), NbdFail> {
        if length < 6 {
            return Err(protocol("short error chunk"));
        }
        let err = self.u32()?;
        let mlen = self.u16()? as u32;
        let rest = self.bytes((length - 6) as usize)?;
        let msg = String::from_utf8_lossy(&rest[..(mlen as usize).min(rest.len())]).into_owned();
        Ok((err, msg))
    }

    /// Reads replies until every pending request is done; `land(piece, at, bytes)` stores
    /// read data `at` bytes into the piece.
    fn collect(
        &mut self,
        first: u64,
        pending: &mut [Pending],
        mut land: impl FnMut(&Pending, usize, &[u8]),
    ) -> Result<(), NbdFail> {
        let mut left = pending.len();
        let mut scratch = Vec::new();
        while left > 0 {
            let magic = self.u32()?;
            let (flags, kind, cookie, length) = match magic {
                SIMPLE_REPLY_MAGIC => {
                    let (err, cookie) = (self.u32()?, self.u64()?);
                    (
                        REPLY_FLAG_DONE,
                        if err == 0 { u16::MAX } else { REPLY_TYPE_ERROR },
                        cookie,
                        err,
                    )
                }
                STRUCTURED_REPLY_MAGIC => (self.u16()?, self.u16()?, self.u64()?, self.u32()?),
                m => return Err(protocol(format!("bad reply magic {m:#x}"))),
            };
            let idx = cookie
                .checked_sub(first)
                .map(|i| i as usize)
                .filter(|&i| i < pending.len());
            let Some(idx) = idx else {
                return Err(protocol(format!("reply for unknown cookie {cookie}")));
            };
            let p = &mut pending[idx];
            match (magic, kind) {
                // Simple reply: success; a read's data follows directly.
                (SIMPLE_REPLY_MAGIC, u16::MAX) if p.reads => {
                    scratch.resize(p.len, 0);
                    self.io.read_exact(&mut scratch)?;
                    land(p, 0, &scratch);
                }
                (SIMPLE_REPLY_MAGIC, u16::MAX) => {}
                (SIMPLE_REPLY_MAGIC, _) => {
                    p.error = Some(io::Error::from_raw_os_error(length as i32))
                }
                (_, REPLY_TYPE_OFFSET_DATA) if length >= 8 => {
                    let off = self.u64()?;
                    let n = (length - 8) as usize;
                    let at = off
                        .checked_sub(p.offset)
                        .map(|a| a as usize)
                        .filter(|&a| a + n <= p.len);
                    let Some(at) = at else {
                        return Err(protocol(format!("data chunk at {off} outside the request")));
                    };
                    scratch.resize(n, 0);
                    self.io.read_exact(&mut scratch)?;
                    land(p, at, &scratch);
                }
                (_, REPLY_TYPE_OFFSET_HOLE) if length == 12 => {
                    let (off, n) = (self.u64()?, self.u32()? as usize);
                    let at = off
                        .checked_sub(p.offset)
                        .map(|a| a as usize)
                        .filter(|&a| a + n <= p.len);
                    let Some(at) = at else {
                        return Err(protocol(format!("hole chunk at {off} outside the request")));
                    };
                    scratch.clear();
                    scratch.resize(n, 0);
                    land(p, at, &scratch);
                }
                (_, REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET) => {
                    let (err, msg) = self.error_chunk(length)?;
                    p.error = Some(with_message(err, &msg));
                }
                (_, REPLY_TYPE_NONE) => {}
                _ => {
                    self.bytes(length as usize)?;
                }
            }
            let p = &mut pending[idx];
            if flags & REPLY_FLAG_DONE != 0 && !p.done {
                p.done = true;
                left -= 1;
            }
        }
        match pending.iter_mut().find(|p| p.error.is_some()) {
            Some(p) => Err(NbdFail {
                offset: Some(p.offset),
                error: p.error.take().unwrap(),
            }),
            None => Ok(()),
        }
    }
}

fn with_message(err: u32, msg: &str) -> io::Error {
    let base = io::Error::from_raw_os_error(err as i32);
    if msg.is_empty() {
        base
    } else {
        io::Error::new(base.kind(), format!("{base}: {msg}"))
    }
}

fn option_error(what: &str, kind: u32, data: &[u8]) -> NbdFail {
    if kind == REP_ERR_TLS_REQD {
        let text = "the server requires TLS: use an nbds:// URI with ?tls-certificates=DIR";
        return NbdFail {
            offset: None,
            error: io::Error::new(io::ErrorKind::PermissionDenied, text),
        };
    }
    let msg = String::from_utf8_lossy(data);
    let name = rep_error_name(kind);
    let text = if msg.is_empty() {
        format!("{what}: {name}")
    } else {
        format!("{what}: {name}: {msg}")
    };
    let k = match kind {
        REP_ERR_UNKNOWN => io::ErrorKind::NotFound,
        REP_ERR_TLS_REQD | REP_ERR_POLICY => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::InvalidData,
    };
    NbdFail {
        offset: None,
        error: io::Error::new(k, text),
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Polite disconnect; the server may already be gone.
        let _ = self.send_request(CMD_DISC, 0, 0, 0, None);
    }
}
