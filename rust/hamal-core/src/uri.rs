//! Source and target URIs: `file:PATH` or a plain path, and the NBD forms (`nbd://`,
//! `nbd+unix://`, `nbds://`). Later issues add `rbd:`, `vddk://`, `dir:` and `s3://`.

use crate::nbd::NbdUri;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskUri {
    /// A raw image file or a block device.
    File(PathBuf),
    /// An NBD export.
    Nbd(NbdUri),
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
        if let Some((scheme, _)) = s.split_once("://") {
            if scheme.starts_with("nbd") {
                return Ok(DiskUri::Nbd(NbdUri::parse(s)?));
            }
            return Err(Error::Plan(format!(
                "unsupported URI scheme '{scheme}' in '{s}': use file:PATH, nbd://, nbd+unix:// or a plain path"
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
            DiskUri::Nbd(_) => None,
        }
    }
}

impl std::fmt::Display for DiskUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskUri::File(p) => write!(f, "{}", p.display()),
            DiskUri::Nbd(u) => f.write_str(&u.text),
        }
    }
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
        let e = DiskUri::parse("s3://bucket/x").unwrap_err().to_string();
        assert!(e.contains("'s3'"), "{e}");
        assert!(DiskUri::parse("file:").is_err());
    }
}
