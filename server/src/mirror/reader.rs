//! The reader's side: following another owner's chain on a mirror and applying the
//! segments sealed to this instance (`plait mirror follow`).
//!
//! An owner shares a part of its namespace with this instance's identity and age
//! recipient (`plait mirror share` there, [`super::shares`]); the segments holding that
//! part are sealed to this instance's seal key as well as the owner's. The follows are
//! `mirror-follows.json` in the data dir (mode 0600): per owner, the mirror to ask (the
//! inviter of the link `follow` joined with), or none (then the mirrors the owner's DHT
//! record names as holders). Every `mirror.follow_interval_ms` a running server asks the
//! mirror where the owner's chain stands and fetches what follows the position it keeps
//! (the `mirror_following` setting), through [`super::fetch::fetch_chain`], as a device
//! restores: every descriptor checked against the owner's signature and the chain, the
//! segments that open with this instance's keys applied to replicas of `/~<owner>/…`, the
//! others passed over. A reader that starts after a checkpoint begins at the segments
//! after it, where the owner sealed each share's part again. Nothing of the owner's other
//! parts is ever stored here: this instance cannot open them.
//!
//! A device follows its owner the same way (`plait device join` adds the follow, at the
//! position it restored to): what the owner seals while the device is linked is sealed
//! to the device's key, so it opens and is applied live; once the device is revoked,
//! nothing more opens.
//!
//! Knows nothing of HTTP; the mirror is reached through the node's mirror protocol.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use plait_bridge::Identity;
use plait_bridge::mirror::ChainHead;
use plait_bridge::node::Node;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::fetch::{Opening, fetch_chain};
use super::now_ms;
use super::owner::Owner;
use crate::engine::Engine;
use crate::storage::Storage;

/// File name of the reader's follows in the data dir.
pub const FOLLOWS_FILE: &str = "mirror-follows.json";
/// The setting keeping where each followed chain stands.
const POSITION_SETTING: &str = "mirror_following";

/// An owner this instance follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Follow {
    /// The mirror to ask; none: the holders the owner's DHT record names.
    pub mirror: Option<Identity>,
    pub added_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct FollowsFile {
    follows: BTreeMap<Identity, Follow>,
}

/// This data dir's follows.
pub fn follows(data_dir: &Path) -> anyhow::Result<BTreeMap<Identity, Follow>> {
    Ok(crate::private_file::read_json::<FollowsFile>(&data_dir.join(FOLLOWS_FILE))?.follows)
}

fn write_follows(data_dir: &Path, follows: BTreeMap<Identity, Follow>) -> anyhow::Result<()> {
    crate::private_file::write_json(&data_dir.join(FOLLOWS_FILE), &FollowsFile { follows })
}

/// Follows `owner` (on `mirror`, or on the holders its record names).
pub fn add_follow(data_dir: &Path, owner: Identity, mirror: Option<Identity>) -> anyhow::Result<()> {
    let mut all = follows(data_dir)?;
    all.insert(
        owner,
        Follow {
            mirror,
            added_ms: now_ms(),
        },
    );
    write_follows(data_dir, all)
}

/// Where each followed chain stands, as kept in `storage`.
async fn positions(storage: &dyn Storage) -> anyhow::Result<BTreeMap<Identity, Position>> {
    Ok(match storage.get_setting(POSITION_SETTING).await? {
        Some(s) => serde_json::from_str(&s).context("the mirror_following setting")?,
        None => BTreeMap::new(),
    })
}

/// Records that `owner`'s chain has been applied through `head` (a device's join, which
/// restored it so far), so that following it starts there.
pub async fn set_position(storage: &dyn Storage, owner: Identity, head: ChainHead) -> anyhow::Result<()> {
    let mut all = positions(storage).await?;
    all.insert(
        owner,
        Position {
            seq: head.seq,
            hash: head.hash,
        },
    );
    storage
        .put_setting(POSITION_SETTING, &serde_json::to_string(&all)?)
        .await?;
    Ok(())
}

/// Stops following `owner` (what was fetched stays); `false` if it was not followed.
pub fn remove_follow(data_dir: &Path, owner: &Identity) -> anyhow::Result<bool> {
    let mut all = follows(data_dir)?;
    if all.remove(owner).is_none() {
        return Ok(false);
    }
    write_follows(data_dir, all)?;
    Ok(true)
}

/// A followed chain as the reader last found it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FollowStatus {
    /// The mirror last asked.
    pub mirror: Option<Identity>,
    /// The owner's chain is fetched and checked through this seq.
    pub seq: u64,
    /// Segments (and snapshots) opened and applied in this run.
    pub opened: u64,
    /// Ciphertext bytes received in this run (heads, and what was fetched whole).
    pub fetched_bytes: u64,
    /// Why the last attempt failed, if it did.
    pub error: Option<String>,
    pub last_ok_ms: Option<u64>,
}

/// Where a followed chain stands, as kept in the store.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Position {
    seq: u64,
    #[serde(with = "hex_digest")]
    hash: [u8; 32],
}

mod hex_digest {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&data_encoding::HEXLOWER.encode(h))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        data_encoding::HEXLOWER
            .decode(text.as_bytes())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| serde::de::Error::custom("not a 32-byte hex digest"))
    }
}

/// The reader side of one instance.
pub struct Reader {
    storage: Arc<dyn Storage>,
    engine: Engine,
    node: Node,
    /// Its seal keys (the owner side holds them): what opens the segments shared with it.
    keys: Arc<Owner>,
    data_dir: PathBuf,
    interval: Duration,
    status: Mutex<BTreeMap<Identity, FollowStatus>>,
    /// Wakes the follower at once (a follow was added).
    wake: tokio::sync::Notify,
}

impl Reader {
    pub fn new(
        storage: Arc<dyn Storage>,
        engine: Engine,
        node: Node,
        keys: Arc<Owner>,
        data_dir: PathBuf,
        settings: super::MirrorSettings,
    ) -> Arc<Reader> {
        Arc::new(Reader {
            storage,
            engine,
            node,
            keys,
            data_dir,
            interval: Duration::from_millis(settings.follow_interval_ms.max(1)),
            status: Mutex::new(BTreeMap::new()),
            wake: tokio::sync::Notify::new(),
        })
    }

    /// Fetches now rather than at the next tick.
    pub fn wake(&self) {
        self.wake.notify_waiters();
    }

    /// Each followed chain as the reader last found it.
    pub fn status(&self) -> BTreeMap<Identity, FollowStatus> {
        self.status.lock().expect("follow status").clone()
    }

    async fn positions(&self) -> anyhow::Result<BTreeMap<Identity, Position>> {
        positions(self.storage.as_ref()).await
    }

    /// The mirrors to ask for `owner`'s chain.
    async fn mirrors_of(&self, owner: Identity, follow: &Follow) -> anyhow::Result<Vec<Identity>> {
        if let Some(m) = follow.mirror {
            return Ok(vec![m]);
        }
        let record = self
            .node
            .resolve(owner)
            .await
            .map_err(|e| anyhow::anyhow!("looking {owner} up: {e}"))?;
        if record.holders.is_empty() {
            anyhow::bail!("{owner}'s record names no mirror holding its segments");
        }
        Ok(record.holders)
    }

    /// Brings every followed chain up to its mirror's head once.
    pub async fn follow_once(&self) -> anyhow::Result<()> {
        let all = follows(&self.data_dir)?;
        // An owner no longer followed leaves the status.
        self.status
            .lock()
            .expect("follow status")
            .retain(|owner, _| all.contains_key(owner));
        let mut positions = self.positions().await?;
        let seal = self.keys.seal();
        let mut keys = vec![&seal.current];
        keys.extend(seal.retired.iter());
        for (owner, follow) in all {
            let from = positions.get(&owner).map_or(ChainHead::default(), |p| ChainHead {
                seq: p.seq,
                hash: p.hash,
            });
            let mut last = FollowStatus {
                seq: from.seq,
                ..self.status().get(&owner).cloned().unwrap_or_default()
            };
            let mirrors = match self.mirrors_of(owner, &follow).await {
                Ok(m) => m,
                Err(e) => {
                    last.error = Some(format!("{e:#}"));
                    self.set_status(owner, last);
                    continue;
                }
            };
            for mirror in mirrors {
                last.mirror = Some(mirror);
                match fetch_chain(
                    &self.node,
                    mirror,
                    owner,
                    &keys,
                    &self.engine,
                    from,
                    Opening::Ours,
                )
                .await
                {
                    Ok(f) => {
                        if f.head != from {
                            positions.insert(
                                owner,
                                Position {
                                    seq: f.head.seq,
                                    hash: f.head.hash,
                                },
                            );
                            self.storage
                                .put_setting(POSITION_SETTING, &serde_json::to_string(&positions)?)
                                .await?;
                            tracing::debug!(%owner, seq = f.head.seq, opened = f.opened, "followed a shared chain");
                        }
                        last.seq = f.head.seq;
                        last.opened += f.opened;
                        last.fetched_bytes += f.bytes;
                        last.error = None;
                        last.last_ok_ms = Some(now_ms());
                        break;
                    }
                    Err(e) => {
                        let e = format!("{e:#}");
                        if last.error.as_ref() != Some(&e) {
                            tracing::info!(%owner, %mirror, error = %e, "following a shared chain stopped");
                        }
                        last.error = Some(e);
                    }
                }
            }
            self.set_status(owner, last);
        }
        Ok(())
    }

    fn set_status(&self, owner: Identity, s: FollowStatus) {
        self.status.lock().expect("follow status").insert(owner, s);
    }

    /// Follows every `mirror.follow_interval_ms` until `shutdown`.
    pub fn run(self: Arc<Self>, shutdown: CancellationToken) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                    _ = self.wake.notified() => {}
                }
                if let Err(e) = self.follow_once().await {
                    tracing::warn!(error = %format!("{e:#}"), "following shared chains failed");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_round_trip_and_positions_keep_their_digest() {
        let dir = tempfile::tempdir().unwrap();
        let owner = plait_bridge::Keypair::generate().identity();
        let mirror = plait_bridge::Keypair::generate().identity();
        assert!(follows(dir.path()).unwrap().is_empty());
        add_follow(dir.path(), owner, Some(mirror)).unwrap();
        assert_eq!(follows(dir.path()).unwrap()[&owner].mirror, Some(mirror));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(FOLLOWS_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(remove_follow(dir.path(), &owner).unwrap());
        assert!(!remove_follow(dir.path(), &owner).unwrap());

        let p = Position {
            seq: 7,
            hash: [0xab; 32],
        };
        let text = serde_json::to_string(&p).unwrap();
        assert!(text.contains(&"ab".repeat(32)), "{text}");
        let back: Position = serde_json::from_str(&text).unwrap();
        assert_eq!((back.seq, back.hash), (7, [0xab; 32]));
        assert!(serde_json::from_str::<Position>(r#"{"seq":1,"hash":"zz"}"#).is_err());
    }
}
