//! `rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][?from_snap=S&conf=PATH&id=NAME&keyring=PATH&whole_object=1&timeout=SECONDS]`

use crate::{Error, Result};
use std::path::PathBuf;
use std::time::Duration;

/// How long connecting and each cluster operation may take before failing.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RbdUri {
    /// The URI as given (has no secrets: a keyring is named by path).
    pub text: String,
    pub pool: String,
    pub namespace: Option<String>,
    pub image: String,
    pub snap: Option<String>,
    /// Incremental base: what changed since this snapshot.
    pub from_snap: Option<String>,
    /// `ceph.conf`; else `CEPH_CONF` and librados' default search.
    pub conf: Option<PathBuf>,
    /// Client name without `client.` (librados default: `admin`).
    pub id: Option<String>,
    pub keyring: Option<PathBuf>,
    /// Diff whole RADOS objects (fast with fast-diff, coarse, off by default).
    pub whole_object: bool,
    pub timeout: Duration,
}

const FORM: &str = "rbd:POOL/IMAGE@SNAP[?from_snap=S&conf=PATH&id=NAME&keyring=PATH&whole_object=1&timeout=SECONDS]";

impl RbdUri {
    /// `None` when `s` is not an `rbd:` URI.
    pub fn parse(s: &str) -> Option<Result<RbdUri>> {
        let rest = s.strip_prefix("rbd:")?;
        Some(Self::parse_rest(s, rest.strip_prefix("//").unwrap_or(rest)))
    }

    fn parse_rest(text: &str, rest: &str) -> Result<RbdUri> {
        let bad = |why: String| Error::Plan(format!("bad RBD URI '{text}': {why}; use {FORM}"));
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (spec, snap) = match path.split_once('@') {
            Some((_, "")) => return Err(bad("empty snapshot name".into())),
            Some((spec, snap)) => (spec, Some(snap.to_owned())),
            None => (path, None),
        };
        let parts: Vec<&str> = spec.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) || !(2..=3).contains(&parts.len()) {
            return Err(bad("expected POOL/IMAGE or POOL/NAMESPACE/IMAGE".into()));
        }
        let mut uri = RbdUri {
            text: text.to_owned(),
            pool: parts[0].to_owned(),
            namespace: (parts.len() == 3).then(|| parts[1].to_owned()),
            image: parts[parts.len() - 1].to_owned(),
            snap,
            from_snap: None,
            conf: None,
            id: None,
            keyring: None,
            whole_object: false,
            timeout: DEFAULT_TIMEOUT,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if value.is_empty() {
                return Err(bad(format!("option '{key}' has no value")));
            }
            match key {
                "from_snap" => uri.from_snap = Some(value.to_owned()),
                "conf" => uri.conf = Some(value.into()),
                "id" => uri.id = Some(value.strip_prefix("client.").unwrap_or(value).to_owned()),
                "keyring" => uri.keyring = Some(value.into()),
                "whole_object" => {
                    uri.whole_object = match value {
                        "1" | "true" => true,
                        "0" | "false" => false,
                        _ => return Err(bad(format!("whole_object={value}: expected 0 or 1"))),
                    }
                }
                "timeout" => {
                    uri.timeout = match value.parse::<u64>() {
                        Ok(s) if s > 0 => Duration::from_secs(s),
                        _ => {
                            return Err(bad(format!("timeout={value}: expected whole seconds > 0")))
                        }
                    }
                }
                _ => return Err(bad(format!("unknown option '{key}'"))),
            }
        }
        if uri.from_snap.is_some() && uri.snap.is_none() {
            return Err(bad("from_snap needs a snapshot to diff to (@SNAP)".into()));
        }
        Ok(uri)
    }

    /// `pool[/namespace]/image`, for messages.
    pub fn image_spec(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}/{ns}/{}", self.pool, self.image),
            None => format!("{}/{}", self.pool, self.image),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<RbdUri> {
        RbdUri::parse(s).expect("an rbd URI")
    }

    #[test]
    fn parses_every_option() {
        let u = parse("rbd:vols/ns1/volume-1@s2?from_snap=s1&conf=/c&id=client.x&keyring=/k&whole_object=1&timeout=5").unwrap();
        assert_eq!((u.pool.as_str(), u.image.as_str()), ("vols", "volume-1"));
        assert_eq!(u.namespace.as_deref(), Some("ns1"));
        assert_eq!(u.snap.as_deref(), Some("s2"));
        assert_eq!(u.from_snap.as_deref(), Some("s1"));
        assert_eq!(u.id.as_deref(), Some("x"));
        assert_eq!(u.conf, Some("/c".into()));
        assert!(u.whole_object);
        assert_eq!(u.timeout, Duration::from_secs(5));
        let plain = parse("rbd:rbd/img").unwrap();
        assert_eq!(
            (plain.snap, plain.namespace, plain.timeout),
            (None, None, DEFAULT_TIMEOUT)
        );
        assert!(RbdUri::parse("/dev/rbd0").is_none());
    }

    #[test]
    fn rejects_bad_forms_naming_the_fault() {
        for (s, why) in [
            ("rbd:img", "POOL/IMAGE"),
            ("rbd:p/img@", "empty snapshot"),
            ("rbd:p//img", "POOL/IMAGE"),
            ("rbd:p/img@s?colour=red", "'colour'"),
            ("rbd:p/img@s?timeout=0", "timeout=0"),
            ("rbd:p/img@s?whole_object=yes", "whole_object=yes"),
            ("rbd:p/img?from_snap=a", "@SNAP"),
            ("rbd:p/img@s?conf=", "'conf' has no value"),
        ] {
            let e = parse(s).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(s), "{s}: {e}");
        }
    }
}
