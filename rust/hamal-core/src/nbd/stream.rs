//! The byte stream under an NBD connection: a TCP or unix socket, maybe inside TLS.
//!
//! Every wait on the server is bounded. The socket wakes every [`POLL`] to look at the caller's
//! stop flag (so a cancel takes effect within that, even while a server says nothing) and at
//! the deadline the connection set for what it waits on (so a server that trickles a byte now
//! and then cannot hold a request forever).

use super::uri::NbdAddress;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a blocked read or write looks at the stop flag and the deadline.
const POLL: Duration = Duration::from_millis(250);

/// A plain socket whose reads and writes give up at `deadline` or when `stop` is set.
pub(super) struct Socket {
    sock: Sock,
    pub deadline: Instant,
    pub stop: Option<Arc<AtomicBool>>,
}

enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// The error a read or write gives when the stop flag was set.
pub const CANCELLED: &str = "cancelled";

impl Socket {
    /// Connects within `timeout`.
    pub fn connect(address: &NbdAddress, timeout: Duration) -> io::Result<Socket> {
        let sock = match address {
            NbdAddress::Tcp { host, port } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                let mut found = None;
                for a in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = found.ok_or(last)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(POLL))?;
                s.set_write_timeout(Some(POLL))?;
                Sock::Tcp(s)
            }
            NbdAddress::Unix(path) => {
                let s = UnixStream::connect(path)?;
                s.set_read_timeout(Some(POLL))?;
                s.set_write_timeout(Some(POLL))?;
                Sock::Unix(s)
            }
        };
        Ok(Socket {
            sock,
            deadline: Instant::now() + timeout,
            stop: None,
        })
    }

    /// Before each read or write: go on, or say why not.
    fn may_wait(&self) -> io::Result<()> {
        if self.stop.as_ref().is_some_and(|s| s.load(Relaxed)) {
            return Err(io::Error::other(CANCELLED));
        }
        if Instant::now() >= self.deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the server did not answer in time",
            ));
        }
        Ok(())
    }
}

impl Socket {
    /// Runs one read or write of the socket, again while it only timed out and the caller may
    /// still wait.
    fn bounded<T>(&mut self, mut op: impl FnMut(&mut Sock) -> io::Result<T>) -> io::Result<T> {
        loop {
            self.may_wait()?; // also between bytes that keep coming, but too slowly
            match op(&mut self.sock) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                r => return r,
            }
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.bounded(|sock| match sock {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        })
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bounded(|sock| match sock {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        })
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub(super) enum Stream {
    Plain(Socket),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, Socket>>),
    /// Only while the plain stream is being wrapped in TLS.
    Detached,
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection is being upgraded")
}

impl Stream {
    /// The socket underneath (`None` only while TLS is being set up).
    pub fn socket(&mut self) -> Option<&mut Socket> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Tls(s) => Some(&mut s.sock),
            Stream::Detached => None,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
            Stream::Detached => Err(detached()),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
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
