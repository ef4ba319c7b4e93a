//! The mirror operator's consent: which namespaces this server keeps sealed segments for,
//! and how many bytes each may use (`plait mirror grant|revoke|list`).
//!
//! Grants live in `mirror-grants.json` in the data dir (mode 0600), replaced whole by
//! rename, so the commands work whether or not the server runs, and a running server sees
//! a change at the next push (it reads the file again when its inode or mtime changed).
//! Knows nothing of segments or the network.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use plait_bridge::Identity;
use serde::{Deserialize, Serialize};

/// File name of the grant list in the data dir.
pub const GRANTS_FILE: &str = "mirror-grants.json";

/// One namespace's grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Bytes its segments (descriptors and ciphertexts) may occupy.
    pub quota: u64,
    pub granted_secs: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct GrantFile {
    grants: BTreeMap<Identity, Grant>,
}

/// The grant file of one data dir, cached until it changes.
pub struct Grants {
    path: PathBuf,
    cache: Mutex<Option<(Stamp, BTreeMap<Identity, Grant>)>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    modified: Option<SystemTime>,
    len: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        inode: std::os::unix::fs::MetadataExt::ino(&m),
        modified: m.modified().ok(),
        len: m.len(),
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses a size such as `500MB`, `10 GiB` or `1048576`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{s:?} is not a size (e.g. 500MB, 10GiB): {e}"))
}

impl Grants {
    pub fn new(data_dir: &Path) -> Grants {
        Grants {
            path: data_dir.join(GRANTS_FILE),
            cache: Mutex::new(None),
        }
    }

    fn read_file(&self) -> anyhow::Result<GrantFile> {
        crate::private_file::read_json(&self.path)
    }

    fn write_file(&self, f: &GrantFile) -> anyhow::Result<()> {
        crate::private_file::write_json(&self.path, f)
    }

    /// Grants `id` storage up to `quota` bytes (replacing an earlier grant's quota).
    pub fn grant(&self, id: Identity, quota: u64) -> anyhow::Result<Grant> {
        let mut f = self.read_file()?;
        let g = Grant {
            quota,
            granted_secs: now_secs(),
        };
        f.grants.insert(id, g);
        self.write_file(&f)?;
        Ok(g)
    }

    /// Ends `id`'s grant: nothing more is stored for it (what is stored stays, and is
    /// served). `false` if it had none.
    pub fn revoke(&self, id: &Identity) -> anyhow::Result<bool> {
        let mut f = self.read_file()?;
        let had = f.grants.remove(id).is_some();
        if had {
            self.write_file(&f)?;
        }
        Ok(had)
    }

    pub fn list(&self) -> anyhow::Result<BTreeMap<Identity, Grant>> {
        Ok(self.read_file()?.grants)
    }

    /// `id`'s grant as the file says now (re-read when it changed).
    pub fn of(&self, id: &Identity) -> anyhow::Result<Option<Grant>> {
        let now = stamp(&self.path);
        let mut cache = self.cache.lock().expect("grant cache");
        if let Some((s, grants)) = cache.as_ref()
            && Some(*s) == now
        {
            return Ok(grants.get(id).copied());
        }
        let grants = self.read_file()?.grants;
        let found = grants.get(id).copied();
        *cache = now.map(|s| (s, grants));
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plait_bridge::Keypair;

    #[test]
    fn grant_revoke_list_and_a_running_reader_sees_changes() {
        let dir = tempfile::tempdir().unwrap();
        let a = Keypair::generate().identity();
        let b = Keypair::generate().identity();
        let running = Grants::new(dir.path());
        assert_eq!(running.of(&a).unwrap(), None);
        let cli = Grants::new(dir.path());
        cli.grant(a, 1000).unwrap();
        assert_eq!(running.of(&a).unwrap().map(|g| g.quota), Some(1000));
        cli.grant(b, 5).unwrap();
        cli.grant(a, 2000).unwrap();
        assert_eq!(running.of(&a).unwrap().map(|g| g.quota), Some(2000));
        assert_eq!(cli.list().unwrap().len(), 2);
        assert!(cli.revoke(&a).unwrap());
        assert!(!cli.revoke(&a).unwrap());
        assert_eq!(running.of(&a).unwrap(), None);
        assert_eq!(running.of(&b).unwrap().map(|g| g.quota), Some(5));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(GRANTS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("10 MiB").unwrap(), 10 << 20);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert!(parse_size("lots").is_err());
    }
}
