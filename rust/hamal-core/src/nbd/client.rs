//! One NBD connection: handshake, then pipelined transmission requests.

use super::proto::*;
use super::stream::{Socket, Stream};
use super::uri::NbdUri;
use std::io::{self, BufReader, Read, Write};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest export hamal takes (1 PiB): a larger size is a server's mistake, and would cost
/// billions of block-status round trips.
pub const MAX_EXPORT_SIZE: u64 = 1 << 50;

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

pub(super) fn protocol(msg: impl Into<String>) -> NbdFail {
    NbdFail {
        offset: None,
        error: io::Error::new(io::ErrorKind::InvalidData, msg.into()),
    }
}

pub struct Connection {
    /// Replies are read through the buffer; requests are written to the stream underneath.
    pub(super) io: BufReader<Stream>,
    pub(super) info: ExportInfo,
    pub(super) next_cookie: u64,
    /// How long one request may wait for its answer.
    pub(super) limit: Duration,
    /// Why the connection cannot be used any more (a reply broke the protocol, the stream
    /// failed midway): later requests fail with it instead of reading a stream out of step.
    pub(super) broken: Option<String>,
    /// The handshake ended with the server in transmission (ends with `NBD_CMD_DISC`).
    pub(super) transmitting: bool,
}

impl Connection {
    /// Connects, negotiates structured replies and `contexts`, and enters transmission.
    pub fn connect(
        uri: &NbdUri,
        contexts: &[String],
        timeout: Duration,
    ) -> Result<Connection, NbdFail> {
        let socket = Socket::connect(&uri.address, timeout)?;
        let mut c = Connection {
            io: BufReader::with_capacity(256 * 1024, Stream::Plain(socket)),
            info: ExportInfo {
                size: 0,
                flags: 0,
                min_block: 1,
                max_block: DEFAULT_MAX_PAYLOAD,
                structured: false,
                contexts: vec![],
            },
            next_cookie: 1,
            limit: timeout,
            broken: None,
            transmitting: false,
        };
        if let Err(e) = c.handshake(uri, contexts) {
            c.abort();
            return Err(e);
        }
        Ok(c)
    }

    /// Ends a negotiation that failed with `NBD_OPT_ABORT`, as the protocol asks (best effort,
    /// within a second: the connection is dropped right after).
    fn abort(&mut self) {
        if self.transmitting {
            return; // dropping the connection sends NBD_CMD_DISC
        }
        if let Some(s) = self.io.get_mut().socket() {
            s.deadline = Instant::now() + Duration::from_secs(1);
            let _ = self.send_option(OPT_ABORT, &[]);
        }
    }

    /// How long each request may wait for its answer (a short limit while probing whether a
    /// server takes a second connection, the usual one after).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.limit = timeout;
        self.arm();
    }

    /// A flag that, once set, makes every wait on the server give up within a fraction of a
    /// second (the job's cancel).
    pub fn set_stop(&mut self, stop: Arc<AtomicBool>) {
        if let Some(s) = self.io.get_mut().socket() {
            s.stop = Some(stop);
        }
    }

    /// Starts the clock of the next wait: it must end within the limit.
    pub(super) fn arm(&mut self) {
        let deadline = Instant::now() + self.limit;
        if let Some(s) = self.io.get_mut().socket() {
            s.deadline = deadline;
        }
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    pub(super) fn u16(&mut self) -> io::Result<u16> {
        let mut b = [0; 2];
        self.io.read_exact(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }
    pub(super) fn u32(&mut self) -> io::Result<u32> {
        let mut b = [0; 4];
        self.io.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }
    pub(super) fn u64(&mut self) -> io::Result<u64> {
        let mut b = [0; 8];
        self.io.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
    pub(super) fn bytes(&mut self, n: usize) -> io::Result<Vec<u8>> {
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
        let mut export_info = false;
        loop {
            let (kind, data) = self.option_reply(OPT_GO)?;
            match kind {
                REP_INFO if data.len() >= 2 => {
                    let info = u16::from_be_bytes([data[0], data[1]]);
                    if info == INFO_EXPORT {
                        self.export_info(&data)?;
                        export_info = true;
                    } else if info == INFO_BLOCK_SIZE {
                        self.block_size_info(&data)?;
                    }
                }
                REP_INFO => return Err(protocol("an information reply without its type")),
                REP_ACK if !export_info => {
                    self.transmitting = true;
                    return Err(protocol(format!(
                        "export '{export}': the server did not say the export's size (no NBD_INFO_EXPORT)"
                    )));
                }
                REP_ACK => {
                    self.transmitting = true;
                    return Ok(());
                }
                _ => return Err(option_error(&format!("export '{export}'"), kind, &data)),
            }
        }
    }

    /// `NBD_INFO_EXPORT`: the size and transmission flags, exactly 12 bytes.
    fn export_info(&mut self, data: &[u8]) -> Result<(), NbdFail> {
        if data.len() != 12 {
            return Err(protocol(format!(
                "export information of {} bytes instead of 12",
                data.len()
            )));
        }
        let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
        if size > MAX_EXPORT_SIZE {
            return Err(protocol(format!(
                "the server says the export holds {size} bytes, more than the {MAX_EXPORT_SIZE} hamal takes"
            )));
        }
        self.info.size = size;
        self.info.flags = u16::from_be_bytes([data[10], data[11]]);
        Ok(())
    }

    /// `NBD_INFO_BLOCK_SIZE`: minimum (a power of two up to 64 KiB), preferred and maximum
    /// (at least the minimum) sizes, exactly 14 bytes.
    fn block_size_info(&mut self, data: &[u8]) -> Result<(), NbdFail> {
        let field = |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().unwrap());
        if data.len() != 14 {
            return Err(protocol(format!(
                "block size information of {} bytes instead of 14",
                data.len()
            )));
        }
        let (min, max) = (field(2), field(10));
        if !min.is_power_of_two() || min > 1 << 16 || max < min {
            return Err(protocol(format!(
                "impossible block sizes: minimum {min}, maximum {max}"
            )));
        }
        self.info.min_block = min;
        self.info.max_block = max;
        Ok(())
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
        let Stream::Plain(plain) = std::mem::replace(self.io.get_mut(), Stream::Detached) else {
            return Err(protocol("TLS was already started"));
        };
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
}

/// Text from a server made safe for one log line: control characters (CR, LF, ESC...) escaped.
pub(super) fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

pub(super) fn with_message(err: u32, msg: &str) -> io::Error {
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
    let msg = printable(&String::from_utf8_lossy(data));
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
