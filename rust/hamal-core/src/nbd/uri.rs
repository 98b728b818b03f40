//! NBD URIs as in the NBD URI specification: `nbd://HOST[:PORT]/EXPORT`,
//! `nbd+unix:///EXPORT?socket=PATH`; `nbds://` and `nbds+unix://` ask for TLS.

use crate::uri::percent_decode;
use crate::{Error, Result};
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddress {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub address: NbdAddress,
    pub export: String,
    pub tls: bool,
    /// `?tls-certificates=DIR`: `ca-cert.pem`, and `client-cert.pem` + `client-key.pem` for
    /// client authentication, as qemu and libnbd lay them out.
    pub tls_certificates: Option<PathBuf>,
    /// `?tls-hostname=NAME`: the name the server certificate must carry (default: the host, or
    /// `localhost` for a unix socket).
    pub tls_hostname: Option<String>,
    /// The text given, for messages.
    pub text: String,
}

impl NbdUri {
    pub fn parse(text: &str) -> Result<NbdUri> {
        let bad = |why: &str| Error::Plan(format!("bad NBD URI '{text}': {why}"));
        let (scheme, rest) = text.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let (tls, unix) = match scheme {
            "nbd" | "nbd+tcp" => (false, false),
            "nbds" | "nbds+tcp" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            other => return Err(bad(&format!("unknown scheme '{other}'"))),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path).ok_or_else(|| bad("bad %-escape in the export name"))?;
        let (mut socket, mut tls_certificates, mut tls_hostname) = (None, None, None);
        for pair in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
        {
            let value = |v: &str| percent_decode(v).ok_or_else(|| bad("bad %-escape in the query"));
            match pair.split_once('=') {
                Some(("socket", v)) => socket = Some(value(v)?),
                Some(("tls-certificates", v)) if tls => {
                    tls_certificates = Some(PathBuf::from(value(v)?))
                }
                Some(("tls-hostname", v)) if tls => tls_hostname = Some(value(v)?),
                _ => return Err(bad(&format!("unsupported query parameter '{pair}'"))),
            }
        }
        let address = if unix {
            if !authority.is_empty() {
                return Err(bad("a unix-socket URI has no host"));
            }
            NbdAddress::Unix(socket.ok_or_else(|| bad("missing ?socket=PATH"))?.into())
        } else {
            if socket.is_some() {
                return Err(bad("?socket= needs the nbd+unix scheme"));
            }
            let (host, port) = split_host_port(authority).ok_or_else(|| bad("bad host or port"))?;
            NbdAddress::Tcp { host, port }
        };
        Ok(NbdUri {
            address,
            export,
            tls,
            tls_certificates,
            tls_hostname,
            text: text.to_owned(),
        })
    }
}

fn split_host_port(authority: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let host = if host.is_empty() { "localhost" } else { host };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => 10809,
    };
    Some((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_specified_forms() {
        let u = NbdUri::parse("nbd://127.0.0.1:10810/disk%20a").unwrap();
        assert_eq!(
            u.address,
            NbdAddress::Tcp {
                host: "127.0.0.1".into(),
                port: 10810
            }
        );
        assert_eq!(u.export, "disk a");
        let u = NbdUri::parse("nbd://[::1]/").unwrap();
        assert_eq!(
            u.address,
            NbdAddress::Tcp {
                host: "::1".into(),
                port: 10809
            }
        );
        let u = NbdUri::parse("nbd+unix:///exp?socket=/tmp/s.sock").unwrap();
        assert_eq!(u.address, NbdAddress::Unix("/tmp/s.sock".into()));
        assert_eq!(u.export, "exp");
        let u = NbdUri::parse("nbds://h/x?tls-certificates=/etc/pki/nbd&tls-hostname=nbd.example")
            .unwrap();
        assert!(u.tls);
        assert_eq!(
            u.tls_certificates.as_deref(),
            Some(std::path::Path::new("/etc/pki/nbd"))
        );
        assert_eq!(u.tls_hostname.as_deref(), Some("nbd.example"));
        // TLS parameters mean nothing without TLS.
        assert!(NbdUri::parse("nbd://h/x?tls-certificates=/d").is_err());
    }

    #[test]
    fn rejects_bad_forms_with_the_reason() {
        for (uri, why) in [
            ("nbd+unix:///x", "missing ?socket"),
            ("nbd://h:notaport/x", "bad host or port"),
            ("nbd://h/x?socket=/s", "needs the nbd+unix"),
            ("nbd+unix://host/x?socket=/s", "has no host"),
            ("nbd://h/x?tls=on", "unsupported query parameter"),
            ("nbdx://h/x", "unknown scheme"),
        ] {
            let e = NbdUri::parse(uri).unwrap_err().to_string();
            assert!(e.contains(uri) && e.contains(why), "{uri}: {e}");
        }
    }
}
