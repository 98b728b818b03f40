//! Version records: `versions/<disk>/<version>.json`, one per committed sync, written last.

use super::codec::{hex, parse_digest};
use crate::checksum::Digest;
use serde::{Deserialize, Serialize};

pub const FORMAT: u32 = 1;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionStats {
    /// "full" or "incremental".
    pub mode: String,
    pub chunks_changed: u64,
    pub chunks_zero: u64,
    /// Chunks uploaded by this sync (the rest were already in the store).
    pub chunks_new: u64,
    pub bytes_read: u64,
    /// Bytes sent to the store (after compression and encryption).
    pub bytes_stored: u64,
    pub millis: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Version {
    pub format: u32,
    pub disk: String,
    pub version: String,
    pub parent: Option<String>,
    pub size: u64,
    pub chunk_size: u64,
    /// Root index page (hex; all zeros for an all-zero disk) and the tree's depth.
    pub root: String,
    pub depth: u32,
    pub source: String,
    /// The change cursor this version brings the disk to (snapshot id, bitmap, changeId).
    pub cursor: Option<String>,
    /// When the source's content was taken (the snapshot's time, else when the first attempt
    /// of this version started), RFC 3339.
    pub created: String,
    /// When the version was committed (absent in records written before this field existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed: Option<String>,
    pub stats: VersionStats,
    /// Encrypted stores: keyed BLAKE3 (a key derived from the store key) of this record
    /// serialized without `mac` and with an empty checksum. Absent in records written before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// BLAKE3 of this record serialized with an empty checksum.
    pub checksum: String,
}

/// How a parsed record stands against the store key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Authenticity {
    /// Its MAC matches the key.
    Authentic,
    /// The store is not encrypted: there is no key to check against.
    Unkeyed,
    /// An encrypted store's record without a MAC (written before records had one).
    Unauthenticated,
}

impl Version {
    pub fn key(&self) -> String {
        version_key(&self.disk, &self.version)
    }

    fn own_checksum(&self) -> String {
        let mut v = self.clone();
        v.checksum.clear();
        hex(blake3::hash(&serde_json::to_vec(&v).expect("serializable")).as_bytes())
    }

    fn own_mac(&self, key: &[u8; 32]) -> String {
        let mut v = self.clone();
        v.checksum.clear();
        v.mac = None;
        hex(blake3::keyed_hash(key, &serde_json::to_vec(&v).expect("serializable")).as_bytes())
    }

    /// Fills in the MAC (with the store's record key, if encrypted) and the checksum, and
    /// returns the record's bytes.
    pub fn seal(&mut self, key: Option<&[u8; 32]>) -> Vec<u8> {
        self.mac = key.map(|k| self.own_mac(k));
        self.checksum = self.own_checksum();
        serde_json::to_vec_pretty(self).expect("serializable")
    }

    /// Parses and checks the record stored under `key`; with an encrypted store's record key,
    /// its MAC too (a record whose MAC does not match is refused; one without a MAC, written
    /// before records had one, is `Unauthenticated` unless `required`).
    pub fn parse_checked(
        key: &str,
        bytes: &[u8],
        auth: Option<&[u8; 32]>,
        required: bool,
    ) -> Result<(Version, Authenticity), String> {
        let v = Version::parse(key, bytes)?;
        let Some(k) = auth else {
            return Ok((v, Authenticity::Unkeyed));
        };
        match &v.mac {
            Some(mac) if *mac == v.own_mac(k) => Ok((v, Authenticity::Authentic)),
            Some(_) => Err("version record is not authentic: its MAC does not match the store key (altered or forged)".into()),
            None if required => Err("version record has no MAC, which this store's records all have (altered or forged)".into()),
            None => Ok((v, Authenticity::Unauthenticated)),
        }
    }

    /// Parses and checks the record stored under `key` (not its MAC); the error says what is
    /// wrong.
    pub fn parse(key: &str, bytes: &[u8]) -> Result<Version, String> {
        let v: Version =
            serde_json::from_slice(bytes).map_err(|e| format!("not a version record: {e}"))?;
        if v.format != FORMAT {
            return Err(format!(
                "version record format {} is not supported (this hamal reads {FORMAT})",
                v.format
            ));
        }
        if v.own_checksum() != v.checksum {
            return Err("version record checksum does not match (damaged)".into());
        }
        if v.root_digest().is_none() {
            return Err("version record has a bad root".into());
        }
        if v.key() != key {
            return Err("record names another disk or version".into());
        }
        Ok(v)
    }

    pub fn root_digest(&self) -> Option<Digest> {
        parse_digest(&self.root)
    }
}

pub fn version_key(disk: &str, version: &str) -> String {
    format!("versions/{disk}/{version}.json")
}

/// A new version id: UTC time to the millisecond, so ids sort by age; always after `parent`.
pub fn new_version_id(parent: Option<&str>) -> String {
    let id = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ").to_string();
    match parent {
        Some(p) if p >= id.as_str() => format!("{p}-1"),
        _ => id,
    }
}

/// Disk ids name folders in the store: letters, digits, `.`, `_`, `-`, at most 128.
pub fn check_disk_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "disk id '{id}' cannot name a store folder: use 1 to 128 letters, digits, '.', '_' or '-', not starting with '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Version {
        Version {
            format: FORMAT,
            disk: "vm1-disk0".into(),
            version: "20261207T000000.000Z".into(),
            parent: None,
            size: 1 << 30,
            chunk_size: 4 << 20,
            root: "ab".repeat(32),
            depth: 2,
            source: "disk.raw".into(),
            cursor: Some("snap-1".into()),
            created: "2026-12-07T00:00:00.000Z".into(),
            committed: None,
            stats: VersionStats::default(),
            mac: None,
            checksum: String::new(),
        }
    }

    proptest! {
        /// A record with any one byte changed, or cut anywhere, is refused or reads as the
        /// record that was written (a change in JSON white space); arbitrary bytes never panic.
        #[test]
        fn a_changed_record_is_refused(at in 0usize..2000, to in any::<u8>(), cut in any::<bool>(), junk in prop::collection::vec(any::<u8>(), 0..300)) {
            let key = [7u8; 32];
            let mut v = sample();
            let bytes = v.seal(Some(&key));
            let at = at % bytes.len();
            let mut changed = bytes.clone();
            if cut {
                changed.truncate(at);
            } else {
                changed[at] = to;
            }
            match Version::parse_checked(&v.key(), &changed, Some(&key), true) {
                Ok((got, how)) => {
                    prop_assert_eq!(&got, &v);
                    prop_assert_eq!(how, Authenticity::Authentic);
                }
                Err(e) => prop_assert!(!e.is_empty()),
            }
            let _ = Version::parse_checked(&v.key(), &junk, Some(&key), false);
        }
    }

    #[test]
    fn the_key_decides_authenticity() {
        let mut v = sample();
        let bytes = v.seal(Some(&[1; 32]));
        let (_, how) = Version::parse_checked(&v.key(), &bytes, Some(&[1; 32]), true).unwrap();
        assert_eq!(how, Authenticity::Authentic);
        let e = Version::parse_checked(&v.key(), &bytes, Some(&[2; 32]), true).unwrap_err();
        assert!(e.contains("not authentic"), "{e}");
        let (_, how) = Version::parse_checked(&v.key(), &bytes, None, false).unwrap();
        assert_eq!(how, Authenticity::Unkeyed);
    }
}
