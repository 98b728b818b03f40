//! The newest version this host committed of each disk of a store, kept on this host
//! (`snapshot_metadata/<store>/heads/<disk>` under `hamal_lib_dir`). A store whose listing
//! shows an older newest version has lost or hides one: an incremental must not build on the
//! older one in silence (its changes are relative to the newer), nor a restore return it.

use std::io::Write;
use std::path::{Path, PathBuf};

/// This host's folder for store `store` under `local_metadata` (local version records, heads).
pub fn local_folder(local_metadata: &Path, store: &str) -> PathBuf {
    local_metadata.join(super::codec::hex(
        &blake3::hash(store.as_bytes()).as_bytes()[..8],
    ))
}

pub struct Heads {
    /// `None`: no local folder configured (a library caller); nothing is kept or checked.
    folder: Option<PathBuf>,
}

impl Heads {
    pub fn new(local_metadata: Option<&Path>, store: &str) -> Heads {
        Heads {
            folder: local_metadata.map(|l| local_folder(l, store).join("heads")),
        }
    }

    /// The newest version of `disk` this host committed, if it knows one.
    pub fn get(&self, disk: &str) -> Option<String> {
        super::version::check_disk_id(disk).ok()?;
        let text = std::fs::read_to_string(self.folder.as_ref()?.join(disk)).ok()?;
        Some(text.trim().to_owned()).filter(|t| !t.is_empty())
    }

    /// The version of `disk` this host committed last, when the store's `newest` is older (or
    /// missing); a newer one (another host's) is fine.
    pub fn ahead_of(&self, disk: &str, newest: Option<&str>) -> Option<String> {
        self.get(disk)
            .filter(|head| newest.is_none_or(|n| n < head.as_str()))
    }

    /// Every disk this host committed to, with its newest version.
    pub fn all(&self) -> Vec<(String, String)> {
        let Some(entries) = self.folder.as_ref().and_then(|f| std::fs::read_dir(f).ok()) else {
            return Vec::new();
        };
        let names = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok());
        let disks: Vec<String> = names.filter(|n| !n.starts_with('.')).collect();
        disks
            .into_iter()
            .filter_map(|d| self.get(&d).map(|v| (d, v)))
            .collect()
    }

    /// Records `version` as the newest of `disk` (a temporary file renamed over the old one).
    pub fn set(&self, disk: &str, version: &str) -> std::io::Result<()> {
        let Some(folder) = &self.folder else {
            return Ok(());
        };
        super::version::check_disk_id(disk).map_err(std::io::Error::other)?;
        std::fs::create_dir_all(folder)?;
        let tmp = folder.join(format!(".{disk}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(version.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, folder.join(disk))
    }
}
