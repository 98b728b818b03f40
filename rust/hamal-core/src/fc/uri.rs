//! `fc://HOST:PORT/RESOURCE?token_file=PATH&snapshot=ID&size=BYTES[&...]`
//!
//! `HOST:PORT` is the CNA data socket `backupresources` named, `RESOURCE` its resource id. The
//! token never appears in the URI: `token_file=` names a file holding it. `mode=lanssl` wraps
//! the socket in TLS verified by `ca_file=`; `allocated=` names a JSON list of `[offset,
//! length]` pairs (the allocated extents of a full sync; without it the whole volume is read).

use crate::uri::{percent_decode, timeout_option};
use crate::{Error, Result};
use std::path::PathBuf;
use std::time::Duration;

const FORM: &str = "fc://HOST:PORT/RESOURCE?token_file=PATH&snapshot=ID&size=BYTES[&mode=lan|lanssl&ca_file=PATH&allocated=PATH&timeout=SECONDS&retries=N]";

/// How long one request may take (connect, handshake, a read batch).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Reconnects for one read batch after the socket broke (the original's default: 3 tries).
pub const DEFAULT_RETRIES: u32 = 3;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FcUri {
    /// The URI as given (holds no secret).
    pub text: String,
    pub host: String,
    pub port: u16,
    pub resource: String,
    pub token_file: PathBuf,
    /// The snapshot read (its `snapUuid`): names the content for the resume journal.
    pub snapshot: String,
    /// Volume size in bytes (the channel does not say).
    pub size: u64,
    /// `lanssl`: TLS over the socket.
    pub tls: bool,
    pub ca_file: Option<PathBuf>,
    pub allocated: Option<PathBuf>,
    pub timeout: Duration,
    pub retries: u32,
}

impl FcUri {
    /// `None` when `s` is not an `fc://` URI.
    pub fn parse(s: &str) -> Option<Result<FcUri>> {
        let rest = s.strip_prefix("fc://")?;
        Some(Self::parse_rest(s, rest))
    }

    fn parse_rest(text: &str, rest: &str) -> Result<FcUri> {
        let bad =
            |why: &str| Error::Plan(format!("bad FusionCompute URI '{text}': {why}; use {FORM}"));
        let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (hostport, resource) = main.split_once('/').ok_or_else(|| bad("no resource id"))?;
        let (host, port) = hostport.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad("bad port"))?;
        let resource = percent_decode(resource).ok_or_else(|| bad("bad %-escape"))?;
        if resource.is_empty() {
            return Err(bad("no resource id"));
        }
        let mut u = FcUri {
            text: text.to_owned(),
            host: host.to_owned(),
            port,
            resource,
            token_file: PathBuf::new(),
            snapshot: String::new(),
            size: 0,
            tls: false,
            ca_file: None,
            allocated: None,
            timeout: DEFAULT_TIMEOUT,
            retries: DEFAULT_RETRIES,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v).ok_or_else(|| bad("bad %-escape"))?;
            if v.is_empty() {
                return Err(bad(&format!("empty value for '{k}'")));
            }
            match k {
                "token_file" => u.token_file = v.into(),
                "snapshot" => u.snapshot = v,
                "size" => {
                    u.size = v
                        .parse()
                        .ok()
                        .filter(|s| *s > 0)
                        .ok_or_else(|| bad("size must be a positive number of bytes"))?
                }
                "mode" => {
                    u.tls = match v.as_str() {
                        "lan" => false,
                        "lanssl" => true,
                        _ => return Err(bad("mode must be lan or lanssl")),
                    }
                }
                "ca_file" => u.ca_file = Some(v.into()),
                "allocated" => u.allocated = Some(v.into()),
                "timeout" => u.timeout = timeout_option(&v).map_err(|e| bad(&e))?,
                "retries" => {
                    u.retries = v
                        .parse()
                        .ok()
                        .filter(|r| *r <= 100)
                        .ok_or_else(|| bad("retries must be 0..100"))?
                }
                "token" => {
                    return Err(bad("the token does not go in the URI: use token_file=PATH"))
                }
                other => return Err(bad(&format!("unknown option '{other}'"))),
            }
        }
        if u.token_file.as_os_str().is_empty() {
            return Err(bad("'token_file=' is required"));
        }
        if u.snapshot.is_empty() {
            return Err(bad("'snapshot=' is required"));
        }
        if u.size == 0 {
            return Err(bad("'size=' is required"));
        }
        if u.tls && u.ca_file.is_none() {
            return Err(bad(
                "mode=lanssl needs ca_file=PATH (the CA backupresources gave)",
            ));
        }
        Ok(u)
    }

    /// What identifies the content read: one resource of one snapshot always reads the same.
    pub fn identity(&self) -> String {
        format!(
            "fc:{}:{}/{}@{}",
            self.host, self.port, self.resource, self.snapshot
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<FcUri> {
        FcUri::parse(s).unwrap()
    }

    #[test]
    fn parses_a_full_uri() {
        let u = parse("fc://10.0.0.5:35001/res%2F1?token_file=/t&snapshot=s-1&size=1048576&mode=lanssl&ca_file=/ca.pem&allocated=/a.json&timeout=5&retries=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.resource.as_str()),
            ("10.0.0.5", 35001, "res/1")
        );
        assert_eq!((u.size, u.tls, u.retries), (1048576, true, 1));
        assert_eq!(u.timeout, Duration::from_secs(5));
        assert_eq!(u.identity(), "fc:10.0.0.5:35001/res/1@s-1");
        assert!(FcUri::parse("rbd:p/i").is_none());
    }

    #[test]
    fn rejects_what_it_cannot_use() {
        let ok = "token_file=/t&snapshot=s&size=512";
        for (uri, why) in [
            (format!("fc://h/r?{ok}"), "no port"),
            (format!("fc://h:0/r?{ok}"), "bad port"),
            (format!("fc://h:1/?{ok}"), "no resource id"),
            (
                "fc://h:1/r?snapshot=s&size=512".into(),
                "'token_file=' is required",
            ),
            (
                format!("fc://h:1/r?{ok}&token=abc"),
                "does not go in the URI",
            ),
            (format!("fc://h:1/r?{ok}&mode=lanssl"), "needs ca_file"),
            (format!("fc://h:1/r?{ok}&mode=udp"), "lan or lanssl"),
            (
                format!("fc://h:1/r?{ok}&colour=red"),
                "unknown option 'colour'",
            ),
            (
                "fc://h:1/r?token_file=/t&snapshot=s&size=0".into(),
                "positive",
            ),
        ] {
            let e = parse(&uri).unwrap_err().to_string();
            assert!(e.contains(why), "{uri}: {e}");
        }
    }
}
