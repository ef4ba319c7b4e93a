//! The owner side: seals this instance's changes into segments and pushes them to the
//! mirrors it chose.
//!
//! **Sealing.** Every `segment_max_delay_ms` the [`Owner`] looks for resources of its
//! namespace whose log grew past what it sealed (`through`, per path), and batches what is
//! new — automerge changes (or the snapshot that folded them away), a bytes resource's
//! latest value — into segments of at most `segment_max_bytes` of plaintext. Each is
//! sealed with age to the owner's [`SealKey`] and signed as the next link of its chain,
//! then stored in the owner's own store (`Storage::put_segment`, the outbox its pushers
//! read), and only then is `through` advanced (a setting). After a crash between the two,
//! start-up opens the segments the setting does not count yet and advances `through` from
//! their entries, so nothing is sealed twice and nothing is skipped.
//!
//! **Pushing.** For each mirror in `mirrors.json` (`plait mirror add`) a pusher asks where
//! the mirror's chain stands and pushes the segments after it, one request each, stopping
//! at the first refusal (logged with its reason) and trying again later. So a restarted
//! owner, or a mirror that was away, resumes from the mirror's acknowledged sequence.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use plait_bridge::mirror::wire::{Request, Response};
use plait_bridge::mirror::{ChainHead, Descriptor, Refusal, SealKey, SealedSegment};
use plait_bridge::node::Node;
use plait_bridge::{Identity, Keypair};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::MirrorSettings;
use super::batch::{self, Entry, What};
use crate::model::{Kind, ResourceKey};
use crate::storage::{Storage, StorageError};

/// File name of the owner's list of mirrors in the data dir.
pub const MIRRORS_FILE: &str = "mirrors.json";
/// The setting that keeps what has been sealed.
const SEALED_SETTING: &str = "mirror_sealed";
/// How often a pusher tries again when nothing new was sealed (a mirror came back, a
/// grant was given).
const PUSH_RETRY: Duration = Duration::from_secs(5);

/// A mirror this owner pushes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorEntry {
    /// The network (DHT) the mirror and this server share.
    pub dht: String,
    pub added_secs: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct MirrorsFile {
    mirrors: BTreeMap<Identity, MirrorEntry>,
}

/// This data dir's mirrors.
pub fn mirrors(data_dir: &Path) -> anyhow::Result<BTreeMap<Identity, MirrorEntry>> {
    let path = data_dir.join(MIRRORS_FILE);
    match std::fs::read(&path) {
        Ok(b) => Ok(serde_json::from_slice::<MirrorsFile>(&b)
            .with_context(|| format!("reading {}", path.display()))?
            .mirrors),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Adds a mirror to this data dir's list (mode 0600, replaced whole by rename).
pub fn add_mirror(data_dir: &Path, id: Identity, dht: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut all = mirrors(data_dir)?;
    let added_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    all.insert(
        id,
        MirrorEntry {
            dht: dht.to_string(),
            added_secs,
        },
    );
    let path: PathBuf = data_dir.join(MIRRORS_FILE);
    let tmp = path.with_extension("tmp");
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    out.write_all(&serde_json::to_vec_pretty(&MirrorsFile { mirrors: all })?)?;
    out.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// What has been sealed: the chain's last seq, and per path the resource seq sealed
/// through.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Sealed {
    seq: u64,
    through: BTreeMap<String, i64>,
}

/// A mirror as a pusher last found it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PushStatus {
    /// The last seq the mirror acknowledged holding.
    pub acked: u64,
    /// The last refusal or error, if the last attempt failed.
    pub error: Option<String>,
}

/// The owner side of one instance.
pub struct Owner {
    storage: Arc<dyn Storage>,
    keys: Keypair,
    seal_key: SealKey,
    settings: MirrorSettings,
    sealed: tokio::sync::Mutex<Sealed>,
    /// The chain's last seq, for pushers to wait on.
    head: watch::Sender<u64>,
    /// Wakes the sealer and pushers at once (a mirror was added).
    wake: tokio::sync::Notify,
    status: Mutex<HashMap<Identity, PushStatus>>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Owner {
    /// Loads what was sealed, catching up with segments stored after the setting was last
    /// saved (a crash between the two).
    pub async fn start(
        storage: Arc<dyn Storage>,
        keys: Keypair,
        seal_key: SealKey,
        settings: MirrorSettings,
    ) -> anyhow::Result<Arc<Owner>> {
        let mut sealed: Sealed = match storage.get_setting(SEALED_SETTING).await? {
            Some(s) => serde_json::from_str(&s).context("the mirror_sealed setting")?,
            None => Sealed::default(),
        };
        let ns = keys.identity();
        let last = storage.last_segment(&ns).await?.map_or(0, |s| s.seq as u64);
        while sealed.seq < last {
            let rows = storage
                .segments(&ns, sealed.seq as i64 + 1, last as i64, 64 << 20)
                .await?;
            for r in rows {
                let plain = plait_bridge::mirror::open(&seal_key, &r.ciphertext)
                    .with_context(|| format!("opening our own segment {}", r.seq))?;
                for e in batch::decode(&plain)? {
                    let t = sealed.through.entry(e.path.as_str().to_string()).or_default();
                    *t = (*t).max(e.seq);
                }
                sealed.seq = r.seq as u64;
            }
        }
        let (head, _) = watch::channel(sealed.seq);
        Ok(Arc::new(Owner {
            storage,
            keys,
            seal_key,
            settings,
            sealed: tokio::sync::Mutex::new(sealed),
            head,
            wake: tokio::sync::Notify::new(),
            status: Mutex::new(HashMap::new()),
        }))
    }

    pub fn namespace(&self) -> Identity {
        self.keys.identity()
    }

    /// Seals and pushes now rather than at the next tick (a mirror was added).
    pub fn wake(&self) {
        self.wake.notify_waiters();
    }

    /// The last seq sealed.
    pub fn sealed_seq(&self) -> u64 {
        *self.head.borrow()
    }

    /// Each mirror as its pusher last found it.
    pub fn push_status(&self) -> HashMap<Identity, PushStatus> {
        self.status.lock().expect("push status").clone()
    }

    /// What of one resource is not sealed yet.
    async fn pending(
        &self,
        key: &ResourceKey,
        kind: Kind,
        media_type: &str,
        through: i64,
    ) -> Result<Vec<Entry>, StorageError> {
        let Some(l) = self.storage.load(key).await? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        if kind == Kind::Bytes {
            // Last writer wins: the latest value is what a restore needs.
            if let (Some(c), Some(blob)) = (l.changes.last(), l.blob)
                && c.seq > through
            {
                out.push(Entry {
                    what: What::Value,
                    kind,
                    path: key.path.clone(),
                    media_type: c.meta.clone().unwrap_or_else(|| media_type.to_string()),
                    seq: l.row.head_seq,
                    version: c.version.clone(),
                    parents: c.parents.clone(),
                    at_ms: c.at_ms,
                    data: blob,
                });
            }
            return Ok(out);
        }
        if let Some((upto, snap)) = l.snapshot
            && upto > through
        {
            // The changes up to `upto` were folded away before they were sealed.
            out.push(Entry {
                what: What::Snapshot,
                kind,
                path: key.path.clone(),
                media_type: media_type.to_string(),
                seq: upto,
                version: String::new(),
                parents: String::new(),
                at_ms: 0,
                data: snap,
            });
        }
        for c in l.changes.into_iter().filter(|c| c.seq > through) {
            out.push(Entry {
                what: What::Change,
                kind,
                path: key.path.clone(),
                media_type: media_type.to_string(),
                seq: c.seq,
                version: c.version,
                parents: c.parents,
                at_ms: c.at_ms,
                data: c.data,
            });
        }
        Ok(out)
    }

    /// Seals everything not sealed yet; answers with the number of segments made.
    pub async fn seal_pending(&self) -> anyhow::Result<usize> {
        let mut sealed = self.sealed.lock().await;
        let ns = self.namespace();
        let max = self.settings.segment_max_bytes.max(1) as usize;
        let mut batch: Vec<Entry> = Vec::new();
        let mut batch_len = batch::BATCH_HEADER_LEN;
        let mut made = 0;
        let mut after: Option<String> = None;
        loop {
            let page = self.storage.list(&ns, "", after.as_deref(), 500).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.path.as_str().to_string());
            for r in page {
                let mut through = sealed.through.get(r.path.as_str()).copied().unwrap_or(0);
                if r.head_seq < through {
                    // Deleted and made again: its log started over.
                    through = 0;
                }
                if r.head_seq <= through {
                    continue;
                }
                let key = ResourceKey::new(ns, r.path.clone());
                for e in self.pending(&key, r.kind, &r.media_type, through).await? {
                    if !batch.is_empty() && batch_len + e.encoded_len() > max {
                        self.seal_one(&mut sealed, std::mem::take(&mut batch)).await?;
                        batch_len = batch::BATCH_HEADER_LEN;
                        made += 1;
                    }
                    batch_len += e.encoded_len();
                    batch.push(e);
                }
            }
        }
        if !batch.is_empty() {
            self.seal_one(&mut sealed, batch).await?;
            made += 1;
        }
        Ok(made)
    }

    /// Seals one batch as the next segment, stores it, then counts its entries as sealed.
    async fn seal_one(&self, sealed: &mut Sealed, entries: Vec<Entry>) -> anyhow::Result<()> {
        let ns = self.namespace();
        let prev = match self.storage.last_segment(&ns).await? {
            None => ChainHead::default(),
            Some(s) => ChainHead::of(&Descriptor::from_bytes(&s.descriptor)?),
        };
        let plain = batch::encode(&entries);
        let seg =
            plait_bridge::mirror::seal(&self.keys, &[self.seal_key.recipient()], prev, &plain, now_ms())?;
        let seq = seg.descriptor.seq;
        self.storage
            .put_segment(
                &ns,
                seq as i64,
                Bytes::copy_from_slice(&seg.descriptor.to_bytes()),
                Bytes::from(seg.ciphertext),
            )
            .await?;
        for e in &entries {
            sealed.through.insert(e.path.as_str().to_string(), e.seq);
        }
        sealed.seq = seq;
        self.storage
            .put_setting(SEALED_SETTING, &serde_json::to_string(&*sealed)?)
            .await?;
        tracing::debug!(
            seq,
            entries = entries.len(),
            bytes = plain.len(),
            "sealed a segment"
        );
        self.head.send_replace(seq);
        Ok(())
    }

    /// Seals every `segment_max_delay_ms` until `shutdown`, while `data_dir` lists a
    /// mirror (an owner without mirrors seals nothing).
    pub fn run_sealer(self: Arc<Self>, data_dir: PathBuf, shutdown: CancellationToken) {
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_millis(self.settings.segment_max_delay_ms.max(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                    _ = self.wake.notified() => {}
                }
                if !mirrors(&data_dir).is_ok_and(|m| !m.is_empty()) {
                    continue;
                }
                if let Err(e) = self.seal_pending().await {
                    tracing::warn!(error = %format!("{e:#}"), "sealing changes for the mirrors failed");
                }
            }
        });
    }

    /// Pushes to every mirror in `data_dir`'s list whenever something new is sealed (and
    /// every few seconds), until `shutdown`.
    pub fn run_pusher(self: Arc<Self>, node: Node, data_dir: PathBuf, shutdown: CancellationToken) {
        tokio::spawn(async move {
            let mut sealed = self.head.subscribe();
            loop {
                match mirrors(&data_dir) {
                    Ok(list) => {
                        for id in list.keys() {
                            let status = match self.push_to(&node, *id).await {
                                Ok(acked) => PushStatus { acked, error: None },
                                Err((acked, e)) => PushStatus {
                                    acked,
                                    error: Some(e),
                                },
                            };
                            let mut all = self.status.lock().expect("push status");
                            // Logged when it changes, not at every retry.
                            if let Some(e) = &status.error
                                && all.get(id).and_then(|s| s.error.as_ref()) != Some(e)
                            {
                                tracing::info!(mirror = %id, acked = status.acked, error = %e, "pushing to a mirror stopped");
                            }
                            all.insert(*id, status);
                        }
                    }
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "the mirror list"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = sealed.changed() => {}
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(PUSH_RETRY) => {}
                }
            }
        });
    }

    /// Brings one mirror up to our chain's head; answers with the seq it acknowledged, or
    /// that and why it stopped.
    pub async fn push_to(&self, node: &Node, mirror: Identity) -> Result<u64, (u64, String)> {
        let ns = self.namespace();
        let head = match node.mirror(mirror, Request::Head { namespace: ns }).await {
            Ok(Response::Head(h)) => h,
            Ok(Response::Refused(r)) => return Err((0, format!("{}: {r}", r.reason()))),
            Ok(other) => return Err((0, format!("unexpected answer {other:?}"))),
            Err(e) => return Err((0, e.to_string())),
        };
        let mut acked = head.seq;
        let ours = self.sealed_seq();
        if head.seq > ours {
            return Err((
                acked,
                format!("the mirror holds {} segments, we made {ours}", head.seq),
            ));
        }
        if head.seq > 0 {
            let mine = self
                .storage
                .segments(&ns, head.seq as i64, head.seq as i64, 0)
                .await
                .map_err(|e| (acked, e.to_string()))?;
            let same = mine
                .first()
                .and_then(|s| Descriptor::from_bytes(&s.descriptor).ok())
                .is_some_and(|d| d.digest() == head.hash);
            if !same {
                return Err((acked, format!("the mirror's segment {} is not ours", head.seq)));
            }
        }
        while acked < ours {
            let rows = self
                .storage
                .segments(
                    &ns,
                    acked as i64 + 1,
                    ours as i64,
                    plait_bridge::mirror::wire::MAX_RANGE_BYTES,
                )
                .await
                .map_err(|e| (acked, e.to_string()))?;
            if rows.is_empty() {
                break;
            }
            for r in rows {
                let descriptor = Descriptor::from_bytes(&r.descriptor).map_err(|e| (acked, e.to_string()))?;
                let seg = SealedSegment {
                    descriptor,
                    ciphertext: r.ciphertext.to_vec(),
                };
                match node.mirror(mirror, Request::Push(seg)).await {
                    Ok(Response::Stored { seq }) => acked = seq,
                    Ok(Response::Refused(r)) => return Err((acked, refusal_text(&r))),
                    Ok(other) => return Err((acked, format!("unexpected answer {other:?}"))),
                    Err(e) => return Err((acked, e.to_string())),
                }
            }
        }
        Ok(acked)
    }
}

fn refusal_text(r: &Refusal) -> String {
    format!("refused, {}: {r}", r.reason())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ResourcePath;
    use crate::storage::sqlite::SqliteStorage;
    use crate::storage::{CommitLimits, NewChange, Target};

    fn change(v: &str, data: &[u8]) -> NewChange {
        NewChange {
            version: v.to_string(),
            parents: String::new(),
            author: None,
            at_ms: 1,
            data: Bytes::copy_from_slice(data),
            meta: None,
            blob: None,
        }
    }

    async fn write(s: &Arc<dyn Storage>, ns: Identity, path: &str, changes: Vec<NewChange>) {
        let key = ResourceKey::new(ns, ResourcePath::new(path).unwrap());
        let target = match s.load(&key).await.unwrap() {
            Some(l) => Target::Existing {
                id: l.row.id,
                after: l.row.head_seq,
            },
            None => Target::Create {
                key,
                kind: Kind::Text,
                media_type: "text/plain".into(),
            },
        };
        s.append(target, changes).await.unwrap();
    }

    /// Every entry of the owner's own chain, opened.
    async fn opened(s: &Arc<dyn Storage>, ns: Identity, key: &SealKey) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut head = ChainHead::default();
        for r in s.segments(&ns, 1, i64::MAX, u64::MAX).await.unwrap() {
            let d = Descriptor::from_bytes(&r.descriptor).unwrap();
            plait_bridge::mirror::check(
                &d,
                &r.ciphertext,
                head,
                Some(plait_bridge::mirror::Allowance {
                    quota: u64::MAX,
                    used: 0,
                }),
            )
            .unwrap();
            head = ChainHead::of(&d);
            out.extend(batch::decode(&plait_bridge::mirror::open(key, &r.ciphertext).unwrap()).unwrap());
        }
        out
    }

    #[tokio::test]
    async fn seals_what_is_new_batched_by_size_and_recovers_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let s: Arc<dyn Storage> =
            Arc::new(SqliteStorage::open(&dir.path().join("s.db"), CommitLimits::default()).unwrap());
        let keys = Keypair::generate();
        let ns = keys.identity();
        let key_path = dir.path().join("seal-key.txt");
        let settings = MirrorSettings {
            segment_max_bytes: 4096,
            segment_max_delay_ms: 10,
        };
        let start = || async {
            Owner::start(
                s.clone(),
                Keypair::from_secret_bytes(&keys.secret_bytes()),
                SealKey::load_or_create(&key_path).unwrap(),
                settings,
            )
            .await
            .unwrap()
        };
        let owner = start().await;
        assert_eq!(owner.seal_pending().await.unwrap(), 0);

        // Ten 1000-byte changes: about four to a 4 KiB segment.
        for i in 0..10u8 {
            write(
                &s,
                ns,
                &format!("doc{}", i % 3),
                vec![change(&format!("a-{i}"), &[i; 1000])],
            )
            .await;
        }
        let made = owner.seal_pending().await.unwrap();
        assert!((3..=4).contains(&made), "{made}");
        assert_eq!(owner.sealed_seq(), made as u64);
        assert_eq!(owner.seal_pending().await.unwrap(), 0, "nothing new");
        let key = SealKey::load_or_create(&key_path).unwrap();
        let e = opened(&s, ns, &key).await;
        assert_eq!(e.len(), 10);
        assert!(e.iter().all(|e| e.what == What::Change && e.data.len() == 1000));

        // More, then a crash after the segment is stored but before the setting is: the
        // next start reads the segment and does not seal it again.
        write(&s, ns, "doc0", vec![change("b-0", b"more")]).await;
        let saved = s.get_setting(SEALED_SETTING).await.unwrap().unwrap();
        assert_eq!(owner.seal_pending().await.unwrap(), 1);
        s.put_setting(SEALED_SETTING, &saved).await.unwrap();
        drop(owner);
        let owner = start().await;
        assert_eq!(owner.sealed_seq(), made as u64 + 1);
        assert_eq!(owner.seal_pending().await.unwrap(), 0);
        write(&s, ns, "doc1", vec![change("c-0", b"after")]).await;
        assert_eq!(owner.seal_pending().await.unwrap(), 1);
        let e = opened(&s, ns, &key).await;
        assert_eq!(e.len(), 12);
        let mut seen = std::collections::HashSet::new();
        assert!(
            e.iter().all(|e| seen.insert((e.path.clone(), e.seq))),
            "nothing sealed twice"
        );

        // Compacted before it was sealed: the snapshot stands for the folded changes.
        write(&s, ns, "doc2", vec![change("d-0", b"x"), change("d-1", b"y")]).await;
        let l = s
            .load(&ResourceKey::new(ns, ResourcePath::new("doc2").unwrap()))
            .await
            .unwrap()
            .unwrap();
        s.save_snapshot(l.row.id, l.row.head_seq, Bytes::from_static(b"SNAPSHOT"))
            .await
            .unwrap();
        assert_eq!(owner.seal_pending().await.unwrap(), 1);
        let e = opened(&s, ns, &key).await;
        let last = e.last().unwrap();
        assert_eq!(
            (last.what, last.data.as_ref()),
            (What::Snapshot, &b"SNAPSHOT"[..])
        );
        assert_eq!(last.seq, l.row.head_seq);
    }
}
