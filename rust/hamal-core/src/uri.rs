//! Source and target URIs: `file:PATH` or a plain path, and the NBD forms (`nbd://`,
//! `nbd+unix://`, `nbds://`), Ceph RBD snapshots (`rbd:`, sources only) and chunk stores (`dir:`,
//! `s3://`). VMware disks through VDDK (`vddk://`) and FusionCompute volumes (`fc://`), sources
//! only.

use crate::ceph::RbdUri;
use crate::fc::FcUri;
use crate::nbd::NbdUri;
use crate::store::StoreUri;
use crate::vddk::VddkUri;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskUri {
    /// A raw image file or a block device.
    File(PathBuf),
    /// An NBD export.
    Nbd(NbdUri),
    /// A chunk store (`dir:` or `s3://`).
    Store(StoreUri),
    /// A Ceph RBD image (a source, read at a snapshot).
    Rbd(RbdUri),
    /// A VMware disk at a snapshot, read through VDDK (a source).
    Vddk(VddkUri),
    /// A FusionCompute volume at a snapshot, over the CNA backup data channel (a source).
    Fc(FcUri),
}

impl DiskUri {
    pub fn parse(s: &str) -> Result<DiskUri> {
        if s.is_empty() {
            return Err(Error::Plan("empty disk URI".into()));
        }
        if let Some(rest) = s.strip_prefix("file://") {
            return Self::file(rest, s);
        }
        if let Some(rest) = s.strip_prefix("file:") {
            return Self::file(rest, s);
        }
        if let Some(rbd) = RbdUri::parse(s) {
            return Ok(DiskUri::Rbd(rbd?));
        }
        if let Some(vddk) = VddkUri::parse(s) {
            return Ok(DiskUri::Vddk(vddk?));
        }
        if let Some(fc) = FcUri::parse(s) {
            return Ok(DiskUri::Fc(fc?));
        }
        if let Some(store) = StoreUri::parse(s) {
            return Ok(DiskUri::Store(store?));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            if scheme.starts_with("nbd") {
                return Ok(DiskUri::Nbd(NbdUri::parse(s)?));
            }
            return Err(Error::Plan(format!(
                "unsupported URI scheme '{scheme}' in '{s}': use file:PATH, nbd://, nbd+unix://, nbds://, rbd:POOL/IMAGE@SNAP, vddk://, fc://, dir:PATH, s3://BUCKET/PREFIX or a plain path"
            )));
        }
        Self::file(s, s)
    }

    fn file(path: &str, whole: &str) -> Result<DiskUri> {
        if path.is_empty() {
            return Err(Error::Plan(format!("no path in URI '{whole}'")));
        }
        Ok(DiskUri::File(PathBuf::from(path)))
    }

    /// The local path, for file URIs.
    pub fn file_path(&self) -> Option<&Path> {
        match self {
            DiskUri::File(p) => Some(p),
            DiskUri::Nbd(_)
            | DiskUri::Store(_)
            | DiskUri::Rbd(_)
            | DiskUri::Vddk(_)
            | DiskUri::Fc(_) => None,
        }
    }
}

impl std::fmt::Display for DiskUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskUri::File(p) => write!(f, "{}", p.display()),
            DiskUri::Nbd(u) => f.write_str(&u.text),
            DiskUri::Store(u) => f.write_str(&u.text),
            DiskUri::Rbd(u) => f.write_str(&u.text),
            DiskUri::Vddk(u) => f.write_str(&u.text),
            DiskUri::Fc(u) => f.write_str(&u.text),
        }
    }
}

/// A URI's `timeout=SECONDS` (a number in (0, 86400]).
pub(crate) fn timeout_option(v: &str) -> std::result::Result<std::time::Duration, String> {
    v.parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0 && *s <= 86400.0)
        .map(std::time::Duration::from_secs_f64)
        .ok_or_else(|| "timeout must be a number of seconds in (0, 86400]".to_owned())
}

/// Decodes `%XX` escapes; `None` for a bad escape or non-UTF-8 result.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_file_forms_and_rejects_unknown_schemes() {
        assert_eq!(
            DiskUri::parse("/a/b").unwrap(),
            DiskUri::File("/a/b".into())
        );
        assert_eq!(
            DiskUri::parse("file:/a/b").unwrap(),
            DiskUri::File("/a/b".into())
        );
        assert_eq!(
            DiskUri::parse("file:///a/b").unwrap(),
            DiskUri::File("/a/b".into())
        );
        assert!(matches!(
            DiskUri::parse("nbd://127.0.0.1/x").unwrap(),
            DiskUri::Nbd(_)
        ));
        let e = DiskUri::parse("gs://bucket/x").unwrap_err().to_string();
        assert!(e.contains("'gs'"), "{e}");
        assert!(matches!(
            DiskUri::parse("s3://bucket/x").unwrap(),
            DiskUri::Store(_)
        ));
        assert!(matches!(
            DiskUri::parse("dir:/x").unwrap(),
            DiskUri::Store(_)
        ));
        assert!(DiskUri::parse("s3://B/x").is_err());
        assert!(matches!(
            DiskUri::parse("rbd:pool/img@s1").unwrap(),
            DiskUri::Rbd(_)
        ));
        assert!(DiskUri::parse("file:").is_err());
    }
}
