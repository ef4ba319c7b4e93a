//! The device bundles a mirror keeps for the owners it granted storage: each a sealed key
//! bundle (`plait_bridge::mirror::device`) it cannot open, waiting at the address a link
//! names until a device takes it (once) or it expires, so that a link works after its
//! owner went away.
//!
//! All of them are one setting in the store (`mirror-device-bundles`: address → owner,
//! expiry, sealed bytes), read, changed and written back under one lock; a bundle is a
//! few hundred bytes and each owner's count against its quota, beside its segments.
//! Expired bundles are dropped whenever the setting is written. How many one owner may
//! keep waiting and for how long are the mirror's settings
//! (`mirror.device_bundles_per_owner`, `mirror.device_link_max_ttl_ms`). Knows nothing of
//! what a bundle holds or of the protocol.

use std::collections::BTreeMap;
use std::sync::Arc;

use plait_bridge::Identity;
use plait_bridge::mirror::Refusal;
use serde::{Deserialize, Serialize};

use crate::storage::{Storage, StorageError};

/// The setting holding every bundle.
const SETTING: &str = "mirror-device-bundles";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Kept {
    owner: Identity,
    expires_ms: u64,
    /// The sealed bundle's length in bytes (what counts against the quota).
    len: u64,
    /// The sealed bundle, base64url.
    sealed: String,
}

/// The bundles of one store.
pub struct Bundles {
    storage: Arc<dyn Storage>,
    /// Bundles one owner may keep waiting, at most.
    per_owner: u64,
    /// How long a bundle may be kept, at most.
    max_ttl_ms: u64,
    /// Held from reading the setting to writing it back.
    lock: tokio::sync::Mutex<()>,
}

fn unavailable(e: StorageError) -> Refusal {
    Refusal::Unavailable(e.to_string())
}

impl Bundles {
    pub fn new(storage: Arc<dyn Storage>, settings: &super::MirrorSettings) -> Bundles {
        Bundles {
            storage,
            per_owner: settings.device_bundles_per_owner,
            max_ttl_ms: settings.device_link_max_ttl_ms,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    async fn read(&self) -> Result<BTreeMap<String, Kept>, Refusal> {
        match self.storage.get_setting(SETTING).await.map_err(unavailable)? {
            None => Ok(BTreeMap::new()),
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| Refusal::Unavailable(format!("the stored device bundles: {e}"))),
        }
    }

    async fn write(&self, all: &BTreeMap<String, Kept>) -> Result<(), Refusal> {
        let text = serde_json::to_string(all).map_err(|e| Refusal::Unavailable(e.to_string()))?;
        self.storage
            .put_setting(SETTING, &text)
            .await
            .map_err(unavailable)
    }

    /// Bytes `owner`'s live bundles occupy.
    pub async fn used(&self, owner: &Identity, now_ms: u64) -> Result<u64, Refusal> {
        Ok(occupied(&self.read().await?, owner, now_ms))
    }

    /// Keeps `sealed` for `owner` at `address` until `expires_ms`. `allowance` is the
    /// owner's quota and what its segments use (`None`: no grant).
    pub async fn put(
        &self,
        owner: Identity,
        address: [u8; 32],
        expires_ms: u64,
        sealed: Vec<u8>,
        allowance: Option<(u64, u64)>,
        now_ms: u64,
    ) -> Result<(), Refusal> {
        let (quota, segments) = allowance.ok_or(Refusal::NoGrant)?;
        let ttl_ms = expires_ms.saturating_sub(now_ms);
        if ttl_ms > self.max_ttl_ms {
            return Err(Refusal::LinkTooLong {
                ttl_ms,
                max_ms: self.max_ttl_ms,
            });
        }
        let _held = self.lock.lock().await;
        let mut all = self.read().await?;
        all.retain(|_, k| k.expires_ms > now_ms);
        let held = all.values().filter(|k| k.owner == owner).count() as u64;
        if held >= self.per_owner && !all.contains_key(&hex(&address)) {
            return Err(Refusal::TooManyBundles {
                held,
                max: self.per_owner,
            });
        }
        let used = segments + occupied(&all, &owner, now_ms);
        let len = sealed.len() as u64;
        if used + len > quota {
            return Err(Refusal::OverQuota { quota, used, len });
        }
        all.insert(
            hex(&address),
            Kept {
                owner,
                expires_ms,
                len,
                sealed: data_encoding::BASE64URL_NOPAD.encode(&sealed),
            },
        );
        self.write(&all).await
    }

    /// Gives the bundle at `address` and forgets it; `NoBundle` when there is none (never
    /// kept, taken already, expired).
    pub async fn take(&self, address: [u8; 32], now_ms: u64) -> Result<Vec<u8>, Refusal> {
        let _held = self.lock.lock().await;
        let mut all = self.read().await?;
        let before = all.len();
        all.retain(|_, k| k.expires_ms > now_ms);
        let found = all.remove(&hex(&address));
        if found.is_some() || all.len() != before {
            self.write(&all).await?;
        }
        let kept = found.ok_or(Refusal::NoBundle)?;
        data_encoding::BASE64URL_NOPAD
            .decode(kept.sealed.as_bytes())
            .map_err(|e| Refusal::Unavailable(format!("a stored device bundle: {e}")))
    }
}

fn occupied(all: &BTreeMap<String, Kept>, owner: &Identity, now_ms: u64) -> u64 {
    all.values()
        .filter(|k| &k.owner == owner && k.expires_ms > now_ms)
        .map(|k| k.len)
        .sum()
}

fn hex(b: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::CommitLimits;
    use crate::storage::sqlite::SqliteStorage;
    use plait_bridge::Keypair;

    #[tokio::test]
    async fn kept_until_taken_once_or_expired() {
        let dir = tempfile::tempdir().unwrap();
        let s: Arc<dyn Storage> =
            Arc::new(SqliteStorage::open(&dir.path().join("m.db"), CommitLimits::default()).unwrap());
        let b = Bundles::new(s.clone(), &Default::default());
        let owner = Keypair::generate().identity();
        let sealed = vec![7u8; 300];

        assert_eq!(
            b.put(owner, [1; 32], 1000, sealed.clone(), None, 0).await,
            Err(Refusal::NoGrant)
        );
        assert!(matches!(
            b.put(owner, [1; 32], 1000, sealed.clone(), Some((500, 300)), 0)
                .await,
            Err(Refusal::OverQuota {
                quota: 500,
                used: 300,
                len: 300
            })
        ));
        b.put(owner, [1; 32], 1000, sealed.clone(), Some((1000, 0)), 0)
            .await
            .unwrap();
        b.put(owner, [2; 32], 10, sealed.clone(), Some((1000, 0)), 0)
            .await
            .unwrap();
        assert_eq!(b.used(&owner, 5).await.unwrap(), 600);
        // Counted against the quota beside the segments.
        assert!(matches!(
            b.put(owner, [3; 32], 1000, sealed.clone(), Some((1000, 200)), 5)
                .await,
            Err(Refusal::OverQuota { used: 800, .. })
        ));

        // Kept through a restart (it is in the store), given once.
        let b = Bundles::new(s, &Default::default());
        assert_eq!(b.take([1; 32], 5).await.unwrap(), sealed);
        assert_eq!(b.take([1; 32], 5).await, Err(Refusal::NoBundle));
        // Expired: gone.
        assert_eq!(b.take([2; 32], 10).await, Err(Refusal::NoBundle));
        assert_eq!(b.used(&owner, 0).await.unwrap(), 0);
        assert_eq!(b.take([9; 32], 0).await, Err(Refusal::NoBundle));
    }

    #[tokio::test]
    async fn an_owner_keeps_a_bounded_number_of_bundles_for_a_bounded_time() {
        let dir = tempfile::tempdir().unwrap();
        let s: Arc<dyn Storage> =
            Arc::new(SqliteStorage::open(&dir.path().join("m.db"), CommitLimits::default()).unwrap());
        let settings = crate::mirror::MirrorSettings {
            device_bundles_per_owner: 2,
            device_link_max_ttl_ms: 1000,
            ..Default::default()
        };
        let b = Bundles::new(s, &settings);
        let (owner, other) = (Keypair::generate().identity(), Keypair::generate().identity());
        let room = Some((1 << 20, 0));
        let sealed = vec![7u8; 100];
        // Longer than the mirror keeps one: refused, nothing kept.
        assert_eq!(
            b.put(owner, [1; 32], 5001, sealed.clone(), room, 4000).await,
            Err(Refusal::LinkTooLong {
                ttl_ms: 1001,
                max_ms: 1000
            })
        );
        assert_eq!(b.used(&owner, 4000).await.unwrap(), 0);
        b.put(owner, [1; 32], 5000, sealed.clone(), room, 4000)
            .await
            .unwrap();
        b.put(owner, [2; 32], 4500, sealed.clone(), room, 4000)
            .await
            .unwrap();
        // A third waiting one is refused; another owner's count is its own; the same
        // address again replaces its bundle.
        assert_eq!(
            b.put(owner, [3; 32], 5000, sealed.clone(), room, 4000).await,
            Err(Refusal::TooManyBundles { held: 2, max: 2 })
        );
        b.put(other, [3; 32], 5000, sealed.clone(), room, 4000)
            .await
            .unwrap();
        b.put(owner, [2; 32], 4900, sealed.clone(), room, 4000)
            .await
            .unwrap();
        // Taken or expired, a place is free again.
        b.take([1; 32], 4100).await.unwrap();
        b.put(owner, [4; 32], 5000, sealed.clone(), room, 4100)
            .await
            .unwrap();
        b.put(owner, [5; 32], 5800, sealed.clone(), room, 4950)
            .await
            .unwrap();
    }
}
