//! The owner's browser login, for the admin dashboard: one-time links and owner sessions.
//!
//! `plait dashboard` ([`issue_link`]) makes a random secret and keeps only its SHA-256, as
//! a file of its own in `DATA_DIR/dashboard-links/` (0600) holding its expiry, so it
//! works whether or not the server runs (the embedded store takes one process, as tokens
//! do). The server redeems a secret once ([`OwnerLogins::redeem`]): removing that file is
//! the single use (the file system lets exactly one remover succeed), and an expired link
//! is removed and refused. A redeemed link becomes an *owner session*: a new secret for
//! the `plait_owner` cookie, stored like account sessions (`accounts`) under the SHA-256
//! of the secret in the master namespace (`owner-sessions/<hash>`), with a fixed expiry
//! (`access.owner_session_lifetime_secs`), so it survives a restart and is seen by every
//! process on one Postgres. A session cookie that does not check out is refused, never
//! taken as anonymous.
//!
//! Knows nothing of HTTP, cookies' syntax or the dashboard's pages.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use plait_bridge::Identity;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::{Engine, EngineError, Write, Writer};
use crate::model::{ResourceKey, ResourcePath};

/// The folder of pending one-time links in the data dir.
pub const LINKS_DIR: &str = "dashboard-links";

/// Why a login link or owner session was refused.
#[derive(Debug, thiserror::Error)]
pub enum OwnerLoginError {
    #[error("the login link is unknown, used already or expired")]
    Unknown,
    #[error("the owner session is unknown, ended or expired")]
    NoSession,
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the login links could not be read: {0}")]
    Io(#[from] std::io::Error),
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The SHA-256 of a secret, in hex; `None` for what cannot be a secret of ours.
fn hash(secret: &str) -> Option<String> {
    let ok = secret.len() >= 16
        && secret.len() <= 128
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then(|| data_encoding::HEXLOWER.encode(&Sha256::digest(secret.as_bytes())))
}

fn new_secret() -> String {
    data_encoding::BASE64URL_NOPAD.encode(&rand::random::<[u8; 32]>())
}

/// A pending link as stored.
#[derive(Debug, Serialize, Deserialize)]
struct Link {
    expires_secs: u64,
}

/// A stored owner session.
#[derive(Debug, Serialize, Deserialize)]
struct Session {
    owner: bool,
    expires_secs: u64,
}

/// Makes a one-time login link's secret for the owner of `data_dir`, valid for `ttl`.
/// Only its hash is written. Returns the secret (shown once).
pub fn issue_link(data_dir: &Path, ttl: Duration) -> anyhow::Result<String> {
    let dir = data_dir.join(LINKS_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    }
    // Links nobody used are tidied away here.
    prune(&dir);
    let secret = new_secret();
    let path = dir.join(hash(&secret).expect("our secrets hash"));
    let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
    serde_json::to_writer(
        &mut tmp,
        &Link {
            expires_secs: now_secs() + ttl.as_secs().max(1),
        },
    )?;
    tmp.as_file().sync_all()?;
    tmp.persist(&path)?;
    Ok(secret)
}

/// Removes expired links.
fn prune(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let expired = std::fs::read(e.path())
            .ok()
            .and_then(|b| serde_json::from_slice::<Link>(&b).ok())
            .is_some_and(|l| l.expires_secs <= now_secs());
        if expired {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Redeems links and checks owner sessions. Cheap to clone.
#[derive(Clone)]
pub struct OwnerLogins {
    links: PathBuf,
    engine: Engine,
    master: Identity,
    lifetime: Duration,
}

impl OwnerLogins {
    /// `master`: the namespace sessions are kept in; `lifetime`: how long a session lasts.
    pub fn new(data_dir: &Path, engine: Engine, master: Identity, lifetime: Duration) -> OwnerLogins {
        OwnerLogins {
            links: data_dir.join(LINKS_DIR),
            engine,
            master,
            lifetime: lifetime.max(Duration::from_secs(60)),
        }
    }

    /// How long an owner session lasts.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    fn session_key(&self, secret: &str) -> Option<ResourceKey> {
        let h = hash(secret)?;
        let path = ResourcePath::new(format!("owner-sessions/{h}")).ok()?;
        Some(ResourceKey::new(self.master, path))
    }

    /// Uses up a one-time link and begins an owner session: returns the session's secret.
    pub async fn redeem(&self, link_secret: &str) -> Result<String, OwnerLoginError> {
        let h = hash(link_secret).ok_or(OwnerLoginError::Unknown)?;
        let path = self.links.join(&h);
        let link = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice::<Link>(&b).ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(OwnerLoginError::Unknown),
            Err(e) => return Err(e.into()),
        };
        // The one remover that succeeds holds the link; everyone else finds it gone.
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(OwnerLoginError::Unknown),
            Err(e) => return Err(e.into()),
        }
        if link.is_none_or(|l| l.expires_secs <= now_secs()) {
            return Err(OwnerLoginError::Unknown);
        }
        let secret = new_secret();
        let key = self.session_key(&secret).expect("our secrets hash");
        let session = Session {
            owner: true,
            expires_secs: now_secs() + self.lifetime.as_secs(),
        };
        self.engine
            .write(
                &key,
                Write::internal_json(&serde_json::to_value(&session).expect("JSON")),
            )
            .await?;
        Ok(secret)
    }

    /// Checks an owner session's secret.
    pub async fn check(&self, secret: &str) -> Result<(), OwnerLoginError> {
        let key = self.session_key(secret).ok_or(OwnerLoginError::NoSession)?;
        let state = self.engine.read(&key).await?;
        let session = state
            .exists()
            .then(|| serde_json::from_slice::<Session>(&state.body).ok())
            .flatten();
        match session {
            Some(s) if s.owner && s.expires_secs > now_secs() => Ok(()),
            _ => Err(OwnerLoginError::NoSession),
        }
    }

    /// Ends an owner session (logging out).
    pub async fn end(&self, secret: &str) -> Result<(), OwnerLoginError> {
        if let Some(key) = self.session_key(secret) {
            self.engine.delete(&key, &Writer::Internal).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_stored_hashed_and_expired_ones_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let secret = issue_link(dir.path(), Duration::from_secs(600)).unwrap();
        let files: Vec<_> = std::fs::read_dir(dir.path().join(LINKS_DIR))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        assert_eq!(files, vec![hash(&secret).unwrap()]);
        assert!(!files[0].contains(&secret));
        std::fs::write(
            dir.path().join(LINKS_DIR).join("old"),
            serde_json::to_vec(&Link { expires_secs: 1 }).unwrap(),
        )
        .unwrap();
        issue_link(dir.path(), Duration::from_secs(600)).unwrap();
        assert!(!dir.path().join(LINKS_DIR).join("old").exists());
    }

    #[test]
    fn only_our_kind_of_secret_hashes() {
        assert!(hash("short").is_none());
        assert!(hash("../../../../etc/passwd-xxxxxxxx").is_none());
        assert!(hash(&new_secret()).is_some());
    }
}
