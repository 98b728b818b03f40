//! Chunk store: point-in-time versions of disks on a local directory or an S3 bucket.
//!
//! Layout of a store (keys under `dir:/path` or `s3://bucket/prefix`):
//!
//! ```text
//! hamal-store.json              format, hash, and (when encrypted) a key check
//! chunks/ab/<64 hex>            one object per distinct chunk content
//! index/ab/<64 hex>             index pages (see `tree`): a version's chunk list
//! versions/<disk>/<id>.json     one record per committed version (the commit point)
//! locks/<kind>-<nonce>.json     live syncs (shared) and garbage collection (exclusive)
//! ```
//!
//! A disk is cut into fixed chunks of the sync's chunk size at disk offsets. A chunk's name is
//! the BLAKE3 of its bytes (keyed BLAKE3 in an encrypted store), so each content is stored once
//! per store, across versions and disks; all-zero chunks are not stored. Objects are zstd
//! compressed and optionally AES-256-GCM encrypted (`codec`), and every read re-hashes the
//! plaintext. A sync uploads the changed chunks, flushes, then writes the index pages on the
//! path to each change and finally the version record. Nothing refers to an object before it
//! is durable, so a crash leaves at worst unreferenced objects for `prune` to collect.

mod backend;
pub mod codec;
mod dir;
mod heads;
mod lock;
mod maint;
mod repo;
mod s3;
mod sink;
mod source;
pub mod tree;
pub mod version;

pub use maint::{
    list_versions, prune, verify_sample, verify_store, PruneReport, Sample, StoreVerifyReport,
};
pub use repo::Store;
pub use s3::S3Options;
pub use sink::{StoreSync, StoreTarget};
pub use source::StoreSource;
pub use version::{Version, VersionStats};

use crate::{Error, Result};
use std::path::PathBuf;

/// Where a store lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    Dir(PathBuf),
    S3 { bucket: String, prefix: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreUri {
    pub location: StoreLocation,
    pub text: String,
}

impl StoreUri {
    /// `dir:/path`, `dir:///path` or `s3://bucket[/prefix]`; `None` for other schemes.
    pub fn parse(s: &str) -> Option<Result<StoreUri>> {
        let bad = |m: &str| Some(Err(Error::Plan(format!("bad store URI '{s}': {m}"))));
        let location = if let Some(rest) = s.strip_prefix("dir:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return bad("no folder after dir:");
            }
            StoreLocation::Dir(PathBuf::from(path))
        } else if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let valid = (3..=63).contains(&bucket.len())
                && bucket
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-".contains(c));
            if !valid {
                return bad(
                    "the bucket name must be 3 to 63 lower-case letters, digits, '.' or '-'",
                );
            }
            if prefix.contains("//") || prefix.contains("..") {
                return bad("the prefix must not contain '//' or '..'");
            }
            StoreLocation::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.trim_end_matches('/').to_owned(),
            }
        } else {
            return None;
        };
        Some(Ok(StoreUri {
            location,
            text: s.to_owned(),
        }))
    }
}

/// How stores are opened, for one job (from `hamal.conf` and the command line).
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// zstd level for new objects; 0 stores them uncompressed.
    pub compression_level: i32,
    /// 32-byte key (raw or hex) that encrypts a new store and opens an encrypted one.
    pub key_file: Option<PathBuf>,
    pub s3: S3Options,
    /// Upload threads per disk.
    pub upload_threads: u32,
    /// Folder for local copies of version records (under `hamal_lib_dir`).
    pub local_metadata: Option<PathBuf>,
    /// Keep a local copy of every version record (`[sync] save_local_snapshot_metadata`).
    pub save_local: bool,
    /// Whether version records go to an S3 bucket (`[sync] upload_metadata_to_oss`); when off
    /// the local copy is the only one. A `dir:` store always holds its own.
    pub upload_metadata: bool,
}

impl StoreOptions {
    /// `[store]`, `[s3]` and `[sync]` of `hamal.conf`; version records' local copies under
    /// `hamal_lib_dir/snapshot_metadata`. Empty S3 settings are left to the `AWS_*` environment.
    pub fn from_config(c: &crate::config::Config) -> StoreOptions {
        let text = |s: &str| Some(s.to_owned()).filter(|s| !s.is_empty());
        StoreOptions {
            compression_level: c.store.compression_level as i32,
            key_file: text(&c.store.encryption_key_file).map(Into::into),
            s3: S3Options {
                endpoint: text(&c.s3.endpoint),
                region: text(&c.s3.region),
                access_key_id: text(&c.s3.access_key_id),
                secret_access_key: text(&c.s3.secret_access_key.0),
                virtual_hosted: c.s3.addressing_style == "virtual",
                ca_file: text(&c.s3.ca_file).map(Into::into),
                timeout: std::time::Duration::from_secs(c.s3.request_timeout),
                max_retries: c.s3.max_retries as usize,
            },
            upload_threads: c.store.upload_threads as u32,
            local_metadata: Some(
                std::path::Path::new(&c.default.hamal_lib_dir).join("snapshot_metadata"),
            ),
            save_local: c.sync.save_local_snapshot_metadata,
            upload_metadata: c.sync.upload_metadata_to_oss,
        }
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            compression_level: 3,
            key_file: None,
            s3: S3Options {
                max_retries: 5,
                ..S3Options::default()
            },
            upload_threads: 8,
            local_metadata: None,
            save_local: false,
            upload_metadata: true,
        }
    }
}
