//! `vddk://[USER@]HOST[:PORT]/DISK?vm=MOREF&snapshot=MOREF&thumbprint=SHA1[&...]`
//!
//! `DISK` is the disk path from the snapshot's configuration (`[datastore1] vm/vm.vmdk`, spaces
//! and brackets as they are or %-escaped). Credentials never appear in the URI: `password_file=`
//! names a file holding the password, `cookie_file=` one holding a vSphere session cookie.

use crate::uri::{percent_decode, timeout_option};
use crate::{Error, Result};
use std::path::PathBuf;
use std::time::Duration;

const FORM: &str = "vddk://USER@HOST[:PORT]/[DATASTORE] DIR/DISK.vmdk?vm=vm-N&snapshot=snapshot-N&thumbprint=AA:BB:..[&password_file=PATH|cookie_file=PATH&transports=nbdssl:nbd&libdir=DIR&config=PATH&nfc_host_port=N&timeout=SECONDS]";

/// How long VDDK may take to answer one request (connect and open, or a read batch).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VddkUri {
    /// The URI as given (holds no secret).
    pub text: String,
    pub server: String,
    pub port: Option<u16>,
    pub user: Option<String>,
    /// Disk path as VDDK's Open takes it.
    pub disk: String,
    /// VM managed object reference (`vm-123`).
    pub vm: String,
    /// Snapshot managed object reference; the disk is read as it was at this snapshot.
    pub snapshot: String,
    /// SHA-1 of the server certificate, colon-separated hex, upper case.
    pub thumbprint: String,
    pub password_file: Option<PathBuf>,
    pub cookie_file: Option<PathBuf>,
    /// VDDK transport modes, e.g. `nbdssl:nbd`; `None`: `[vmware] transport_modes`.
    pub transports: Option<String>,
    /// Where VDDK was unpacked (holds `lib64/`); `None`: `[vmware] vddk_libdir`.
    pub libdir: Option<PathBuf>,
    /// VDDK's own configuration file.
    pub config: Option<PathBuf>,
    pub nfc_host_port: Option<u32>,
    /// A worker that does not answer within this is stopped and the disk's sync fails.
    pub timeout: Duration,
}

impl VddkUri {
    /// `None` when `s` is not a `vddk://` URI.
    pub fn parse(s: &str) -> Option<Result<VddkUri>> {
        let rest = s.strip_prefix("vddk://")?;
        Some(Self::parse_rest(s, rest))
    }

    fn parse_rest(text: &str, rest: &str) -> Result<VddkUri> {
        let bad = |why: &str| Error::Plan(format!("bad VDDK URI '{text}': {why}; use {FORM}"));
        let decode = |v: &str| percent_decode(v).ok_or_else(|| bad("bad %-escape"));
        let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, disk) = main.split_once('/').ok_or_else(|| bad("no disk path"))?;
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, _)) if u.contains(':') => {
                return Err(bad(
                    "a password does not go in the URI: use password_file=PATH",
                ))
            }
            Some((u, h)) => (Some(decode(u)?), h),
            None => (None, authority),
        };
        let (server, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => {
                (h, Some(p.parse::<u16>().map_err(|_| bad("bad port"))?))
            }
            _ => (hostport, None),
        };
        let server = server.trim_start_matches('[').trim_end_matches(']');
        if server.is_empty() {
            return Err(bad("no server"));
        }
        let disk = decode(disk)?;
        if disk.is_empty() {
            return Err(bad("no disk path"));
        }
        let mut u = VddkUri {
            text: text.to_owned(),
            server: server.to_owned(),
            port,
            user: user.filter(|u| !u.is_empty()),
            disk,
            vm: String::new(),
            snapshot: String::new(),
            thumbprint: String::new(),
            password_file: None,
            cookie_file: None,
            transports: None,
            libdir: None,
            config: None,
            nfc_host_port: None,
            timeout: DEFAULT_TIMEOUT,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v)?;
            if v.is_empty() {
                return Err(bad(&format!("empty value for '{k}'")));
            }
            match k {
                "vm" => u.vm = v.strip_prefix("moref=").unwrap_or(&v).to_owned(),
                "snapshot" => u.snapshot = v,
                "thumbprint" => {
                    u.thumbprint = thumbprint(&v).ok_or_else(|| {
                        bad("the thumbprint is not 20 colon-separated hex bytes (SHA-1)")
                    })?
                }
                "password_file" => u.password_file = Some(v.into()),
                "cookie_file" => u.cookie_file = Some(v.into()),
                "transports" => u.transports = Some(v),
                "libdir" => u.libdir = Some(v.into()),
                "config" => u.config = Some(v.into()),
                "timeout" => u.timeout = timeout_option(&v).map_err(|e| bad(&e))?,
                "nfc_host_port" => {
                    u.nfc_host_port = Some(v.parse().map_err(|_| bad("bad nfc_host_port"))?)
                }
                other => return Err(bad(&format!("unknown option '{other}'"))),
            }
        }
        for (name, value) in [
            ("vm", &u.vm),
            ("snapshot", &u.snapshot),
            ("thumbprint", &u.thumbprint),
        ] {
            if value.is_empty() {
                return Err(bad(&format!("'{name}=' is required")));
            }
        }
        match (&u.user, &u.password_file, &u.cookie_file) {
            (_, Some(_), Some(_)) => {
                return Err(bad("give password_file or cookie_file, not both"))
            }
            (None, Some(_), None) => return Err(bad("password_file needs a user (USER@HOST)")),
            (_, None, None) => {
                return Err(bad(
                    "no credentials: add password_file=PATH or cookie_file=PATH",
                ))
            }
            _ => {}
        }
        Ok(u)
    }

    /// What identifies the content read: the same server, VM, snapshot and disk always read
    /// the same bytes (snapshot morefs are not reused by a vCenter).
    pub fn identity(&self) -> String {
        format!(
            "vddk:{}/{}/{}/{}",
            self.server, self.vm, self.snapshot, self.disk
        )
    }
}

/// `aa:BB:..` (20 bytes) in upper case, or `None`.
fn thumbprint(v: &str) -> Option<String> {
    let parts: Vec<&str> = v.split(':').collect();
    let ok = parts.len() == 20
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then(|| v.to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "aa:bb:cc:dd:ee:ff:00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd";

    fn parse(s: &str) -> Result<VddkUri> {
        VddkUri::parse(s).unwrap()
    }

    #[test]
    fn parses_a_full_uri() {
        let u = parse(&format!(
            "vddk://admin%40vsphere.local@vc.example:8443/[ds 1] web/web.vmdk?vm=moref=vm-12&snapshot=snapshot-3&thumbprint={TP}&password_file=/etc/pw&transports=nbd&nfc_host_port=902"
        ))
        .unwrap();
        assert_eq!(u.user.as_deref(), Some("admin@vsphere.local"));
        assert_eq!((u.server.as_str(), u.port), ("vc.example", Some(8443)));
        assert_eq!(u.disk, "[ds 1] web/web.vmdk");
        assert_eq!(
            (u.vm.as_str(), u.snapshot.as_str()),
            ("vm-12", "snapshot-3")
        );
        assert_eq!(u.thumbprint, TP.to_ascii_uppercase());
        assert_eq!(u.transports.as_deref(), Some("nbd"));
        assert_eq!(u.nfc_host_port, Some(902));
        assert_eq!(u.timeout, DEFAULT_TIMEOUT);
        let esc = parse(&format!(
            "vddk://r@h/%5Bds%5D%20a.vmdk?vm=vm-1&snapshot=s&thumbprint={TP}&cookie_file=/c"
        ))
        .unwrap();
        assert_eq!((esc.disk.as_str(), esc.port), ("[ds] a.vmdk", None));
    }

    #[test]
    fn rejects_what_it_cannot_use() {
        let ok = format!("vm=vm-1&snapshot=s&thumbprint={TP}");
        for (uri, why) in [
            (
                format!("vddk://r:pw@h/d?{ok}&password_file=/p"),
                "password does not go",
            ),
            (format!("vddk://r@h/d?{ok}"), "no credentials"),
            (format!("vddk://h/d?{ok}&password_file=/p"), "needs a user"),
            (
                "vddk://r@h/d?vm=vm-1&snapshot=s&password_file=/p".into(),
                "'thumbprint=' is required",
            ),
            (
                format!("vddk://r@h/d?vm=vm-1&thumbprint={TP}&password_file=/p"),
                "'snapshot=' is required",
            ),
            (
                format!("vddk://r@h/d?{ok}&password_file=/p&colour=red"),
                "unknown option 'colour'",
            ),
            (
                "vddk://r@h/d?vm=vm-1&snapshot=s&thumbprint=12:34&password_file=/p".into(),
                "SHA-1",
            ),
            (format!("vddk://r@h?{ok}"), "no disk path"),
            (
                format!("vddk://r@h:99999/d?{ok}&password_file=/p"),
                "bad port",
            ),
            (
                format!("vddk://r@h/d?{ok}&password_file=/p&timeout=0"),
                "timeout must be",
            ),
        ] {
            let e = parse(&uri).unwrap_err().to_string();
            assert!(e.contains(why), "{uri}: {e}");
        }
        assert!(VddkUri::parse("nbd://h/x").is_none());
    }
}
