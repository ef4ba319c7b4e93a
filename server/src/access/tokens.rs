//! Bearer tokens the owner issues (`plait token`): full owner tokens, or tokens limited to
//! path prefixes for reading and writing, with an optional expiry and a label.
//!
//! A token is `plait_<id>_<secret>`. Only the SHA-256 of the secret is kept, in
//! `tokens.json` in the data dir (mode 0600), so the file works whether or not the server
//! runs and survives restarts; a running server notices changes (a new or revoked token)
//! because every change renames a new file into place. Knows nothing of HTTP or rules beyond [`Prefix`].

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::rules::Prefix;

/// File name of the token list in the data dir.
pub const TOKENS_FILE: &str = "tokens.json";

/// What a token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub id: String,
    pub label: Option<String>,
    /// A full owner token.
    pub owner: bool,
    pub read: Vec<Prefix>,
    /// Writing implies reading and deleting under these prefixes.
    pub write: Vec<Prefix>,
}

/// One issued token as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    /// Hex SHA-256 of the secret part.
    pub hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default)]
    pub read: Vec<String>,
    #[serde(default)]
    pub write: Vec<String>,
    pub created_secs: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_secs: Option<u64>,
}

impl TokenRecord {
    pub fn is_owner(&self) -> bool {
        self.read.is_empty() && self.write.is_empty()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    tokens: Vec<TokenRecord>,
}

/// Why a bearer token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the bearer token is not a Plait token")]
    Malformed,
    #[error("the bearer token is unknown or revoked")]
    Unknown,
    #[error("the bearer token expired")]
    Expired,
}

/// What identifies one version of the token file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        let m = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let inode = 0;
        Some(FileStamp {
            modified: m.modified().ok(),
            len: m.len(),
            inode,
        })
    }
}

/// The tokens of one data dir.
pub struct Tokens {
    path: PathBuf,
    /// The file as last read, with what tells a newer file apart (every change is a new
    /// file renamed into place, so a new inode).
    cache: Mutex<(Option<FileStamp>, Vec<TokenRecord>)>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hash(secret: &str) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(secret.as_bytes()))
}

impl Tokens {
    pub fn new(data_dir: &Path) -> Tokens {
        Tokens {
            path: data_dir.join(TOKENS_FILE),
            cache: Mutex::new((None, Vec::new())),
        }
    }

    fn read_file(&self) -> anyhow::Result<TokenFile> {
        crate::private_file::read_json(&self.path)
    }

    /// Writes the file whole, atomically, mode 0600.
    fn write_file(&self, f: &TokenFile) -> anyhow::Result<()> {
        crate::private_file::write_json(&self.path, f)
    }

    /// Changes the file under an exclusive lock (several `plait token` may run at once).
    fn change<T>(&self, f: impl FnOnce(&mut TokenFile) -> T) -> anyhow::Result<T> {
        use fs4::fs_std::FileExt;
        let lock_path = self.path.with_extension("lock");
        let mut options = std::fs::OpenOptions::new();
        options.create(true).truncate(false).write(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let lock = options
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        lock.lock_exclusive()?;
        let mut file = self.read_file()?;
        let out = f(&mut file);
        self.write_file(&file)?;
        Ok(out)
    }

    /// Issues a token; returns its record and the token itself (shown once, never stored).
    pub fn issue(
        &self,
        read: &[String],
        write: &[String],
        ttl: Option<std::time::Duration>,
        label: Option<String>,
    ) -> anyhow::Result<(TokenRecord, String)> {
        for p in read.iter().chain(write) {
            Prefix::parse(p).map_err(anyhow::Error::msg)?;
        }
        let id = data_encoding::HEXLOWER.encode(&rand::random::<[u8; 8]>());
        let secret = data_encoding::BASE32_NOPAD
            .encode(&rand::random::<[u8; 32]>())
            .to_lowercase();
        let now = now_secs();
        let record = TokenRecord {
            id: id.clone(),
            hash: hash(&secret),
            label,
            read: read.to_vec(),
            write: write.to_vec(),
            created_secs: now,
            expires_secs: ttl.map(|t| now.saturating_add(t.as_secs())),
        };
        let r = record.clone();
        self.change(move |f| f.tokens.push(r))?;
        Ok((record, format!("plait_{id}_{secret}")))
    }

    /// The issued tokens (hashes only).
    pub fn list(&self) -> anyhow::Result<Vec<TokenRecord>> {
        Ok(self.read_file()?.tokens)
    }

    /// Revokes a token by id; whether there was one.
    pub fn revoke(&self, id: &str) -> anyhow::Result<bool> {
        self.change(|f| {
            let before = f.tokens.len();
            f.tokens.retain(|t| t.id != id);
            f.tokens.len() != before
        })
    }

    /// Checks a bearer token against the file (re-read when it changed).
    pub fn verify(&self, token: &str) -> Result<Grant, TokenError> {
        let (id, secret) = token
            .strip_prefix("plait_")
            .and_then(|t| t.split_once('_'))
            .ok_or(TokenError::Malformed)?;
        let stamp = FileStamp::of(&self.path);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.0 != stamp || stamp.is_none() {
            let tokens = self.read_file().map(|f| f.tokens).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the token file cannot be read; no token is accepted");
                Vec::new()
            });
            *cache = (stamp, tokens);
        }
        let record = cache.1.iter().find(|t| t.id == id).ok_or(TokenError::Unknown)?;
        let given = hash(secret);
        // Compared in constant time: the hash is of a secret.
        let same = given.len() == record.hash.len()
            && given
                .bytes()
                .zip(record.hash.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !same {
            return Err(TokenError::Unknown);
        }
        if record.expires_secs.is_some_and(|e| e <= now_secs()) {
            return Err(TokenError::Expired);
        }
        let parse = |l: &[String]| l.iter().filter_map(|p| Prefix::parse(p).ok()).collect();
        Ok(Grant {
            id: record.id.clone(),
            label: record.label.clone(),
            owner: record.is_owner(),
            read: parse(&record.read),
            write: parse(&record.write),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_verify_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tokens::new(dir.path());
        let (owner, tok) = t.issue(&[], &[], None, Some("laptop".into())).unwrap();
        assert!(owner.is_owner());
        let g = t.verify(&tok).unwrap();
        assert!(g.owner);
        // The secret is not in the file.
        let file = std::fs::read_to_string(dir.path().join(TOKENS_FILE)).unwrap();
        let secret = tok.rsplit('_').next().unwrap();
        assert!(!file.contains(secret));
        let (_, limited) = t
            .issue(
                &["/a".into()],
                &["/a/b".into()],
                Some(std::time::Duration::from_secs(60)),
                None,
            )
            .unwrap();
        let g = t.verify(&limited).unwrap();
        assert!(!g.owner);
        assert_eq!(g.write[0].path, "a/b");
        assert_eq!(t.verify("plait_nope_nope"), Err(TokenError::Unknown));
        assert_eq!(t.verify("Bearer x"), Err(TokenError::Malformed));
        let wrong = format!("{}x", &tok[..tok.len() - 1]);
        assert_eq!(t.verify(&wrong), Err(TokenError::Unknown));
        assert!(t.revoke(&owner.id).unwrap());
        assert_eq!(t.verify(&tok), Err(TokenError::Unknown));
        assert!(!t.revoke(&owner.id).unwrap());
        assert!(t.issue(&["nope".into()], &[], None, None).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(TOKENS_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn an_expired_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tokens::new(dir.path());
        let (_, tok) = t.issue(&[], &[], Some(std::time::Duration::ZERO), None).unwrap();
        assert_eq!(t.verify(&tok), Err(TokenError::Expired));
    }
}
