//! A FusionCompute volume at a snapshot, read over the CNA backup data channel (`fc://`). Each
//! engine reader thread has its own socket (one `max_socket_connections_per_host` slot) with
//! its batch of reads pipelined. A socket that breaks, a frame that fails its CRC or a host
//! with no socket to spare is retried on a new socket (`retries=`, waits 1, 2, 4 s ...); an
//! error the CNA answers with fails the disk's sync at once, naming the offset.

use super::{Source, SourceReader};
use crate::engine::changed::{parse_changed_json, validate_changed};
use crate::extent::ExtentMap;
use crate::fc::slots::{self, Slot};
use crate::fc::wire::{self, Header, Kind, HEADER_LEN};
use crate::fc::{FcOptions, FcUri};
use crate::io::ReadReq;
use crate::{Error, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// Why a request failed: worth a new socket, or final.
enum Failure {
    Retry(String),
    Fatal(String),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Retry(e.to_string())
    }
}

struct Conn {
    stream: Box<dyn Stream>,
    seq: u32,
    _slot: Slot,
}

/// What every reader of one source shares.
struct Channel {
    uri: FcUri,
    opts: FcOptions,
    lock_dir: PathBuf,
    token: String,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Channel {
    fn connect(&self) -> Result<Conn, Failure> {
        let u = &self.uri;
        let slot = slots::acquire(&self.lock_dir, &u.host, self.opts.max_connections_per_host)
            .map_err(|e| {
                Failure::Fatal(format!(
                    "connection slot in {}: {e}",
                    self.lock_dir.display()
                ))
            })?;
        let addr: SocketAddr = (u.host.as_str(), u.port)
            .to_socket_addrs()
            .map_err(|e| Failure::Fatal(format!("cannot resolve {}: {e}", u.host)))?
            .next()
            .ok_or_else(|| Failure::Fatal(format!("{} has no address", u.host)))?;
        let tcp = self.tcp(addr)?;
        let mut stream: Box<dyn Stream> = match &self.tls {
            None => Box::new(tcp),
            Some(config) => {
                let name = ServerName::try_from(u.host.clone())
                    .map_err(|_| Failure::Fatal(format!("bad TLS host name '{}'", u.host)))?;
                let conn = rustls::ClientConnection::new(config.clone(), name)
                    .map_err(|e| Failure::Fatal(e.to_string()))?;
                Box::new(rustls::StreamOwned::new(conn, tcp))
            }
        };
        let hello = wire::hello_payload(&u.resource, &self.token);
        let mut h = Header::new(Kind::Hello, 0, 0, hello.len() as u32);
        h.crc32 = wire::crc32(&hello);
        stream
            .write_all(&h.encode())
            .and_then(|_| stream.write_all(&hello))
            .map_err(|e| tls_or_retry(e, u))?;
        stream.flush()?;
        let reply = read_header(&mut stream).map_err(|f| match f {
            Failure::Retry(m) if m.contains("certificate") => Failure::Fatal(m),
            f => f,
        })?;
        match reply.kind {
            Kind::Welcome => Ok(Conn {
                stream,
                seq: 1,
                _slot: slot,
            }),
            Kind::Error => Err(refusal(&mut stream, &reply, "refused the channel")),
            k => Err(Failure::Retry(format!("answered hello with a {k:?} frame"))),
        }
    }

    fn tcp(&self, addr: SocketAddr) -> Result<TcpStream, Failure> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        if let Some(ip) = self.opts.local_ip {
            socket
                .bind(&SocketAddr::new(ip, 0).into())
                .map_err(|e| Failure::Fatal(format!("cannot bind to local_host_ip {ip}: {e}")))?;
        }
        socket.connect_timeout(&addr.into(), self.uri.timeout)?;
        let tcp: TcpStream = socket.into();
        tcp.set_read_timeout(Some(self.uri.timeout))?;
        tcp.set_write_timeout(Some(self.uri.timeout))?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }
}

/// A TLS verification failure will not heal on a new socket.
fn tls_or_retry(e: io::Error, u: &FcUri) -> Failure {
    let text = e.to_string();
    if text.contains("certificate") || text.contains("UnknownIssuer") {
        let ca = u.ca_file.as_deref().unwrap_or(std::path::Path::new("-"));
        Failure::Fatal(format!(
            "TLS to {}:{} (ca_file {}): {text}",
            u.host,
            u.port,
            ca.display()
        ))
    } else {
        Failure::Retry(text)
    }
}

fn read_header(s: &mut Box<dyn Stream>) -> Result<Header, Failure> {
    let mut b = [0u8; HEADER_LEN];
    s.read_exact(&mut b)?;
    Header::decode(&b).map_err(Failure::Retry)
}

/// The `error` frame's message; a busy host is retried, anything else is final.
fn refusal(s: &mut Box<dyn Stream>, h: &Header, what: &str) -> Failure {
    let mut msg = vec![0u8; (h.length as usize).min(4096)];
    let text = match s.read_exact(&mut msg) {
        Ok(()) => String::from_utf8_lossy(&msg).into_owned(),
        Err(e) => format!("(message lost: {e})"),
    };
    let line = format!("the CNA {what}: error {}: {text}", h.status);
    if wire::BUSY_CODES.contains(&h.status) {
        Failure::Retry(line)
    } else {
        Failure::Fatal(line)
    }
}

impl Conn {
    fn read_batch(&mut self, reqs: &mut [ReadReq<'_>]) -> Result<(), (Failure, Option<u64>)> {
        let mut out = Vec::with_capacity(reqs.len() * HEADER_LEN);
        let first = self.seq;
        for r in reqs.iter() {
            out.extend_from_slice(
                &Header::new(Kind::Read, self.seq, r.offset, r.buf.len() as u32).encode(),
            );
            self.seq = self.seq.wrapping_add(1);
        }
        let at = reqs.first().map(|r| r.offset);
        self.stream
            .write_all(&out)
            .and_then(|_| self.stream.flush())
            .map_err(|e| (e.into(), at))?;
        for (i, r) in reqs.iter_mut().enumerate() {
            let at = Some(r.offset);
            let h = read_header(&mut self.stream).map_err(|f| (f, at))?;
            let seq = first.wrapping_add(i as u32);
            if h.kind == Kind::Error {
                return Err((refusal(&mut self.stream, &h, "refused a read"), at));
            }
            if h.kind != Kind::Data
                || h.seq != seq
                || h.offset != r.offset
                || h.length as usize != r.buf.len()
            {
                let got = format!(
                    "{:?} seq {} offset {} length {}",
                    h.kind, h.seq, h.offset, h.length
                );
                return Err((Failure::Retry(format!("answer out of step: {got}")), at));
            }
            self.stream.read_exact(r.buf).map_err(|e| (e.into(), at))?;
            if wire::crc32(r.buf) != h.crc32 {
                return Err((Failure::Retry("data failed its CRC-32".into()), at));
            }
        }
        Ok(())
    }
}

pub struct FcSource {
    channel: Arc<Channel>,
    /// The socket `open` made to check the channel, handed to the first reader.
    first: Mutex<Option<Conn>>,
}

impl FcSource {
    pub fn open(uri: &FcUri, opts: &FcOptions, lock_dir: &std::path::Path) -> Result<FcSource> {
        let err = |what, e| Error::source_io(uri.text.as_str(), what, None, e);
        let token = std::fs::read_to_string(&uri.token_file)
            .map_err(|e| {
                err(
                    "cannot read token_file",
                    io::Error::new(e.kind(), format!("{}: {e}", uri.token_file.display())),
                )
            })?
            .trim()
            .to_owned();
        let tls = match (&uri.tls, &uri.ca_file) {
            (true, Some(ca)) => Some(tls_config(ca).map_err(|e| err("bad ca_file", e))?),
            _ => None,
        };
        let channel = Arc::new(Channel {
            uri: uri.clone(),
            opts: opts.clone(),
            lock_dir: lock_dir.to_owned(),
            token,
            tls,
        });
        let first = connect_with_retries(&channel)
            .map_err(|m| err("cannot open the CNA data channel", io::Error::other(m)))?;
        Ok(FcSource {
            channel,
            first: Mutex::new(Some(first)),
        })
    }
}

fn tls_config(ca: &std::path::Path) -> io::Result<Arc<rustls::ClientConfig>> {
    let bad = |e: String| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: {e}", ca.display()),
        )
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| bad(e.to_string()))? {
        roots
            .add(cert.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Waits before retry `n` (0-based): 1, 2, 4 ... s, at most 30 s.
fn backoff(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.min(5)).min(Duration::from_secs(30))
}

fn connect_with_retries(ch: &Channel) -> Result<Conn, String> {
    let mut n = 0;
    loop {
        match ch.connect() {
            Ok(c) => return Ok(c),
            Err(Failure::Fatal(m)) => return Err(m),
            Err(Failure::Retry(m)) if n >= ch.uri.retries => {
                return Err(format!("{m} (after {n} retries)"))
            }
            Err(Failure::Retry(m)) => {
                tracing::warn!(
                    "{}: {m}; connecting again in {} s",
                    ch.uri.text,
                    backoff(n).as_secs()
                );
                std::thread::sleep(backoff(n));
                n += 1;
            }
        }
    }
}

impl Source for FcSource {
    fn describe(&self) -> String {
        self.channel.uri.text.clone()
    }

    fn size(&self) -> u64 {
        self.channel.uri.size
    }

    fn allocated(&self) -> Result<ExtentMap> {
        let u = &self.channel.uri;
        let Some(path) = &u.allocated else {
            return Ok(ExtentMap::whole(u.size));
        };
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Plan(format!("allocated extents {origin}: {e}")))?;
        validate_changed(&parse_changed_json(&text, &origin)?, u.size, &origin)
    }

    fn identity(&self) -> Option<String> {
        Some(self.channel.uri.identity())
    }

    fn reader(&self, _depth: u32) -> Result<Box<dyn SourceReader>> {
        Ok(Box::new(FcReader {
            channel: self.channel.clone(),
            conn: self.first.lock().unwrap().take(),
        }))
    }
}

struct FcReader {
    channel: Arc<Channel>,
    conn: Option<Conn>,
}

impl SourceReader for FcReader {
    fn read_batch(&mut self, reqs: &mut [ReadReq<'_>]) -> Result<()> {
        let u = &self.channel.uri;
        let fail = |m: String, at: Option<u64>| {
            Error::source_io(
                u.text.as_str(),
                "FusionCompute read failed",
                at,
                io::Error::other(m),
            )
        };
        let mut n = 0;
        loop {
            let conn = match self.conn.as_mut() {
                Some(c) => c,
                None => {
                    let c = connect_with_retries(&self.channel)
                        .map_err(|m| fail(m, reqs.first().map(|r| r.offset)))?;
                    self.conn.insert(c)
                }
            };
            match conn.read_batch(reqs) {
                Ok(()) => return Ok(()),
                Err((Failure::Fatal(m), at)) => return Err(fail(m, at)),
                Err((Failure::Retry(m), at)) => {
                    self.conn = None;
                    if n >= u.retries {
                        return Err(fail(format!("{m} (after {n} retries)"), at));
                    }
                    tracing::warn!(
                        "{}: {m} at offset {}; reading again on a new socket in {} s",
                        u.text,
                        at.unwrap_or(0),
                        backoff(n).as_secs()
                    );
                    std::thread::sleep(backoff(n));
                    n += 1;
                }
            }
        }
    }

    fn backend(&self) -> &'static str {
        if self.channel.tls.is_some() {
            "fc-lanssl"
        } else {
            "fc-lan"
        }
    }
}
