//! Source and target URIs. Today: `file:PATH` or a plain path; later issues add `nbd://`,
//! `rbd:`, `vddk://`, `dir:` and `s3://` as new variants.

use crate::{Error, Result};
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskUri {
    /// A raw image file or a block device.
    File(PathBuf),
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
            return Err(Error::Plan(format!(
                "unsupported URI scheme '{scheme}' in '{s}': this build reads and writes file: paths only"
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

    pub fn path(&self) -> &std::path::Path {
        match self {
            DiskUri::File(p) => p,
        }
    }
}

impl std::fmt::Display for DiskUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskUri::File(p) => write!(f, "{}", p.display()),
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
        let e = DiskUri::parse("nbd://127.0.0.1/x").unwrap_err().to_string();
        assert!(e.contains("'nbd'"), "{e}");
        assert!(DiskUri::parse("file:").is_err());
    }
}
