//! The owner side: seals this instance's changes into segments and pushes them to the
//! mirrors it chose.
//!
//! **Sealing.** Every `segment_max_delay_ms` the [`Owner`] looks for resources of its
//! namespace whose log grew past what it sealed (`through`, per path), and batches what is
//! new — a resource new to the chain whole (its document saved whole, as a checkpoint
//! holds it: a restoring device loads that in half the time it applies the changes that
//! made it), then automerge changes (or the snapshot that folded them away), a bytes
//! resource's latest value — into segments of at most `segment_max_bytes` of plaintext. Each is
//! sealed with age to the owner's [`SealKey`] and signed as the next link of its chain,
//! then stored in the owner's own store (`Storage::put_segment`, the outbox its pushers
//! read), and only then is `through` advanced (a setting). After a crash between the two,
//! start-up opens the segments the setting does not count yet and advances `through` from
//! their entries, so nothing is sealed twice and nothing is skipped.
//!
//! **Checkpoints.** After sealing, when the segments since the last checkpoint occupy
//! more than `checkpoint_ratio` × the namespace's stored size (and more than
//! `checkpoint_min_bytes`), the owner seals a snapshot — a batch holding every resource's
//! current state: an automerge document saved whole for text and JSON, the latest value
//! for bytes, each with the resource seq it stands at — and signs a checkpoint
//! superseding its chain up to the last segment sealed. It stores the checkpoint in its
//! own outbox (`Storage::put_checkpoint`, which drops the superseded segments there too)
//! and its pushers send it to each mirror before the segments after it. Sealing and
//! checkpointing hold the same lock, so the snapshot holds at least what the segments it
//! supersedes held; a change it holds that a later segment holds again restores the same
//! (automerge changes apply once; a bytes value is taken at the highest seq). A restore
//! reads the checkpoint's snapshot, then the segments after its `upto`.
//!
//! **Shares.** A resource under a prefix the owner shares ([`super::shares`]) is sealed
//! in segments of its own, to the owner's recipients plus that prefix's readers; the rest
//! as before. All stay on the one chain. A share new since the last seal first gets a
//! segment holding its part's current state (as a checkpoint's snapshot holds it, sealed
//! to the owner and that share's readers), and so does every share after a checkpoint
//! (whose snapshot only the owner opens), so a reader starting anywhere on the chain
//! finds its part whole.
//!
//! **Pushing.** For each mirror in `mirrors.json` (`plait mirror add`) a pusher asks where
//! the mirror's chain stands and pushes the segments after it, one request each, stopping
//! at the first refusal (logged with its reason) and trying again later. So a restarted
//! owner, or a mirror that was away, resumes from the mirror's acknowledged sequence.
//!
//! **As a device.** The same sealer and pushers run on a device for its writes to its
//! owner's namespace ([`Owner::start_device`]): they list the owner's namespace but seal
//! only the changes the device's own user made (not what it restored or replicated from
//! the owner), into the device's own chain — descriptors signed by the device's key,
//! sealed to the owner's seal key and the device's own — kept as the `mirror_device_sealed`
//! setting, pushed with the device's certificate (`DevicePush`) to the mirrors its link
//! named, and never checkpointed by the device. The owner merges that chain, and drops
//! what it merged of it with its own checkpoints (`device_writes`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use plait_bridge::mirror::wire::{Request, Response};
use plait_bridge::mirror::{
    ChainHead, Checkpoint, Descriptor, Refusal, SealKey, SealRecipient, SealedCheckpoint, SealedSegment,
};
use plait_bridge::node::Node;
use plait_bridge::{Identity, Keypair};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::MirrorSettings;
use super::batch::{self, Entry, What};
use super::shares::{self, Share};
use crate::model::{Kind, ResourceKey, Version};
use crate::storage::{Storage, Take};

/// File name of the owner's list of mirrors in the data dir.
pub const MIRRORS_FILE: &str = "mirrors.json";
/// The setting that keeps what has been sealed.
const SEALED_SETTING: &str = "mirror_sealed";
/// The setting that keeps what a device has sealed of its writes.
const DEVICE_SEALED_SETTING: &str = "mirror_device_sealed";
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
    Ok(crate::private_file::read_json::<MirrorsFile>(&data_dir.join(MIRRORS_FILE))?.mirrors)
}

/// Adds a mirror to this data dir's list (mode 0600, replaced whole by rename).
pub fn add_mirror(data_dir: &Path, id: Identity, dht: &str) -> anyhow::Result<()> {
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
    crate::private_file::write_json(&data_dir.join(MIRRORS_FILE), &MirrorsFile { mirrors: all })
}

/// What has been sealed: the chain's last seq, and per path the resource seq sealed
/// through.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Sealed {
    seq: u64,
    through: BTreeMap<String, i64>,
    /// The shares whose part's state has been sealed to them ([`share_key`]).
    #[serde(default)]
    shared: std::collections::BTreeSet<String>,
}

/// Entries waiting to be sealed to one set of readers.
struct Batch {
    entries: Vec<Entry>,
    /// Bytes the entries take encoded.
    len: usize,
    /// Who beyond the owner's recipients the segment is sealed to.
    readers: Vec<SealRecipient>,
}

/// How [`Sealed::shared`] names a share.
fn share_key(s: &Share) -> String {
    format!("{}\n{}\n{}", s.prefix, s.reader, s.recipient)
}

/// A mirror as a pusher last found it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PushStatus {
    /// The last seq the mirror acknowledged holding.
    pub acked: u64,
    /// The `upto` of the last checkpoint the mirror acknowledged (in this run).
    pub checkpoint: u64,
    /// The last refusal or error, if the last attempt failed.
    pub error: Option<String>,
    /// When an attempt last succeeded (ms since the Unix epoch).
    pub last_ok_ms: Option<u64>,
    /// How many of our revoked devices the mirror acknowledged being told of (in this
    /// run): it refuses their pushes.
    pub revoked_acked: u64,
}

/// What a device seals as: the certificate its pushes carry and the mirrors it pushes to.
#[derive(Clone)]
pub struct AsDevice {
    pub cert: plait_bridge::mirror::device::DeviceCert,
    pub mirrors: Vec<Identity>,
}

/// The owner side of one instance (or a device's writes to its owner's namespace).
pub struct Owner {
    storage: Arc<dyn Storage>,
    /// Signs the chain: the chain is `keys.identity()`'s.
    keys: Keypair,
    /// The namespace whose resources are sealed: the owner's (on a device too).
    namespace: Identity,
    /// Set on a device: only its user's writes are sealed, pushed with its certificate.
    device: Option<AsDevice>,
    /// The setting that keeps what has been sealed.
    setting: &'static str,
    /// The keys sealing and opening segments; replaced when a device is linked or revoked.
    seal: Mutex<Seal>,
    settings: MirrorSettings,
    sealed: tokio::sync::Mutex<Sealed>,
    /// The chain's last seq, for pushers to wait on.
    head: watch::Sender<u64>,
    /// Wakes the sealer and pushers at once (a mirror was added).
    wake: tokio::sync::Notify,
    status: Mutex<HashMap<Identity, PushStatus>>,
    /// The shares as the sealer last read them.
    shares: Mutex<Vec<Share>>,
}

use super::now_ms;

/// The keys an owner seals with and opens its own segments with.
#[derive(Clone)]
pub struct Seal {
    /// The owner's key: every segment is sealed to it.
    pub current: SealKey,
    /// Keys the owner sealed to before a rotation: they open its older segments.
    pub retired: Vec<SealKey>,
    /// Its devices' recipients (revoked ones left out): segments are sealed to them too.
    pub devices: Vec<SealRecipient>,
}

impl From<SealKey> for Seal {
    fn from(current: SealKey) -> Seal {
        Seal {
            current,
            retired: Vec::new(),
            devices: Vec::new(),
        }
    }
}

impl Seal {
    /// Who a segment sealed now is sealed to.
    pub fn recipients(&self) -> Vec<SealRecipient> {
        let mut all = vec![self.current.recipient()];
        all.extend(self.devices.iter().cloned());
        all
    }

    /// Opens one of the owner's own segments, whichever of its keys it was sealed to.
    pub fn open(&self, ciphertext: &[u8]) -> Result<Vec<u8>, plait_bridge::mirror::SealError> {
        let mut keys = vec![&self.current];
        keys.extend(self.retired.iter());
        plait_bridge::mirror::open_with(&keys, ciphertext)
    }
}

impl Owner {
    /// The key this owner seals to now (a device is handed it, sealed, to open what was
    /// sealed before it).
    pub fn seal_key(&self) -> SealKey {
        self.seal.lock().expect("seal keys").current.clone()
    }

    /// Seals to these keys from now on (a device was linked or revoked).
    pub fn set_seal(&self, seal: Seal) {
        *self.seal.lock().expect("seal keys") = seal;
    }

    fn recipients(&self) -> Vec<SealRecipient> {
        self.seal.lock().expect("seal keys").recipients()
    }

    /// The keys sealing and opening segments now (a reader opens with them).
    pub fn seal(&self) -> Seal {
        self.seal.lock().expect("seal keys").clone()
    }

    /// Seals to these shares from now on (read from the data dir's shares file).
    pub fn set_shares(&self, shares: Vec<Share>) {
        *self.shares.lock().expect("shares") = shares;
    }

    fn shares(&self) -> Vec<Share> {
        self.shares.lock().expect("shares").clone()
    }

    /// Loads what was sealed, catching up with segments stored after the setting was last
    /// saved (a crash between the two).
    pub async fn start(
        storage: Arc<dyn Storage>,
        keys: Keypair,
        seal: impl Into<Seal>,
        settings: MirrorSettings,
    ) -> anyhow::Result<Arc<Owner>> {
        let namespace = keys.identity();
        Owner::start_as(storage, keys, namespace, None, seal.into(), settings).await
    }

    /// A device's sealer: `keys` are the device's, `as_device.cert.owner` the namespace
    /// whose writes (by the device's user) are sealed; `seal` is the device's own key
    /// with the owner's recipient among its `devices`.
    pub async fn start_device(
        storage: Arc<dyn Storage>,
        keys: Keypair,
        as_device: AsDevice,
        seal: Seal,
        settings: MirrorSettings,
    ) -> anyhow::Result<Arc<Owner>> {
        let namespace = as_device.cert.owner;
        Owner::start_as(storage, keys, namespace, Some(as_device), seal, settings).await
    }

    async fn start_as(
        storage: Arc<dyn Storage>,
        keys: Keypair,
        namespace: Identity,
        device: Option<AsDevice>,
        seal: Seal,
        settings: MirrorSettings,
    ) -> anyhow::Result<Arc<Owner>> {
        let setting = if device.is_some() {
            DEVICE_SEALED_SETTING
        } else {
            SEALED_SETTING
        };
        let mut sealed: Sealed = match storage.get_setting(setting).await? {
            Some(s) => serde_json::from_str(&s).with_context(|| format!("the {setting} setting"))?,
            None => Sealed::default(),
        };
        let ns = keys.identity();
        let last = super::chain_head(storage.as_ref(), &ns).await?.seq;
        while sealed.seq < last {
            let rows = storage
                .segments(&ns, sealed.seq as i64 + 1, last as i64, 64 << 20)
                .await?;
            if rows.is_empty() {
                anyhow::bail!("our own segments after {} are missing", sealed.seq);
            }
            for r in rows {
                let plain = seal
                    .open(&r.ciphertext)
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
            namespace,
            device,
            setting,
            seal: Mutex::new(seal),
            settings,
            sealed: tokio::sync::Mutex::new(sealed),
            head,
            wake: tokio::sync::Notify::new(),
            status: Mutex::new(HashMap::new()),
            shares: Mutex::new(Vec::new()),
        }))
    }

    /// The namespace whose resources are sealed.
    pub fn namespace(&self) -> Identity {
        self.namespace
    }

    /// The chain the segments make: the signer's (the owner's, or a device's).
    pub fn chain(&self) -> Identity {
        self.keys.identity()
    }

    /// Opens a segment sealed to one of this sealer's keys (the owner opens its devices'
    /// chains with it).
    pub fn open(&self, ciphertext: &[u8]) -> Result<Vec<u8>, plait_bridge::mirror::SealError> {
        self.seal.lock().expect("seal keys").open(ciphertext)
    }

    /// The mirrors this sealer pushes to: `mirrors.json`'s, or a device's link's.
    fn mirror_ids(&self, data_dir: &Path) -> anyhow::Result<Vec<Identity>> {
        match &self.device {
            Some(d) => Ok(d.mirrors.clone()),
            None => Ok(mirrors(data_dir)?.into_keys().collect()),
        }
    }

    /// Whether a stored change is to be sealed: all of them on the owner, only its own
    /// user's on a device (what it restored or replicated is the owner's already).
    fn sealable(&self, author: Option<Identity>) -> bool {
        self.device.is_none() || author == Some(self.keys.identity())
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

    /// What of one resource is not sealed yet. On the owner, a resource new to the chain
    /// (`through` 0) goes whole ([`Self::whole`]); a device seals only its user's changes.
    async fn pending(
        &self,
        key: &ResourceKey,
        kind: Kind,
        media_type: &str,
        through: i64,
    ) -> anyhow::Result<Vec<Entry>> {
        if through == 0 && self.device.is_none() {
            match self.whole(key, kind, media_type).await {
                Ok(whole) => return Ok(whole),
                // One document that does not load must not stop the chain: its changes
                // go as they are stored, as before it was new.
                Err(e) if kind != Kind::Bytes => tracing::warn!(
                    path = key.path.as_str(),
                    error = %format!("{e:#}"),
                    "sealing a new resource's changes: its document does not load"
                ),
                Err(e) => return Err(e),
            }
        }
        let Some(l) = self.storage.load(key).await? else {
            return Ok(Vec::new());
        };
        if kind == Kind::Bytes {
            return Ok(latest_value(key, media_type, l, through, |a| self.sealable(a))
                .into_iter()
                .collect());
        }
        let mut out = Vec::new();
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
                version: None,
                parents: Version::root(),
                at_ms: 0,
                data: snap,
            });
        }
        for c in l
            .changes
            .into_iter()
            .filter(|c| c.seq > through && self.sealable(c.author))
        {
            out.push(Entry {
                what: What::Change,
                kind,
                path: key.path.clone(),
                media_type: media_type.to_string(),
                seq: c.seq,
                version: Some(c.version),
                parents: c.parents,
                at_ms: c.at_ms,
                data: c.data,
            });
        }
        Ok(out)
    }

    /// One resource's current state as a snapshot holds it: a bytes resource's latest
    /// value, or a text or JSON document saved whole, standing at the log's head. A
    /// device restoring a document loads it saved whole in about half the time it
    /// applies the changes that made it, from fewer bytes (BENCHMARKS.md, "A resource new
    /// to the device"); so the owner seals a resource new to its chain this way, as it
    /// does every resource in a checkpoint.
    async fn whole(&self, key: &ResourceKey, kind: Kind, media_type: &str) -> anyhow::Result<Vec<Entry>> {
        let Some(l) = self.storage.load(key).await? else {
            return Ok(Vec::new());
        };
        if kind == Kind::Bytes {
            return Ok(latest_value(key, media_type, l, 0, |_| true)
                .into_iter()
                .collect());
        }
        let seq = l.row.head_seq;
        let bytes = l.snapshot.as_ref().map_or(0, |(_, b)| b.len())
            + l.changes.iter().map(|c| c.data.len()).sum::<usize>();
        let heavy = bytes as u64 > crate::cpu::HEAVY_DOCUMENT_BYTES;
        let saved = crate::cpu::document_work(heavy, || {
            crate::doc::Document::load_automerge(
                kind,
                l.snapshot.as_ref().map(|(_, b)| b.as_ref()),
                l.changes.iter().map(|c| c.data.as_ref()),
            )
            .map(|mut doc| doc.save().unwrap_or_default())
        })
        .with_context(|| format!("loading {}", key.path.as_str()))?;
        Ok(vec![Entry {
            what: What::Snapshot,
            kind,
            path: key.path.clone(),
            media_type: media_type.to_string(),
            seq,
            version: None,
            parents: Version::root(),
            at_ms: 0,
            data: Bytes::from(saved),
        }])
    }

    /// Seals everything not sealed yet; answers with the number of segments made.
    pub async fn seal_pending(&self) -> anyhow::Result<usize> {
        let mut sealed = self.sealed.lock().await;
        let ns = self.namespace();
        let max = self.settings.segment_max_bytes.max(1) as usize;
        // A device's chain holds only its own writes, sealed to its owner: no shares.
        let shares = if self.device.is_some() {
            Vec::new()
        } else {
            self.shares()
        };
        let mut made = 0;
        // A new share first gets its part's current state.
        let keys: std::collections::BTreeSet<String> = shares.iter().map(share_key).collect();
        let dropped = sealed.shared.len();
        sealed.shared.retain(|k| keys.contains(k));
        let mut changed = sealed.shared.len() != dropped;
        for s in &shares {
            if !sealed.shared.contains(&share_key(s)) {
                made += self
                    .seal_part(&mut sealed, &s.prefix, std::slice::from_ref(s))
                    .await?;
                sealed.shared.insert(share_key(s));
                changed = true;
            }
        }
        // One batch per set of readers, so each segment holds only what all its
        // recipients may open.
        let mut batches: BTreeMap<Vec<String>, Batch> = BTreeMap::new();
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
                let readers = shares::readers_of(&shares, r.path.as_str());
                let b = batches
                    .entry(readers.keys().cloned().collect())
                    .or_insert_with(|| Batch {
                        entries: Vec::new(),
                        len: batch::BATCH_HEADER_LEN,
                        readers: readers.into_values().collect(),
                    });
                let key = ResourceKey::new(ns, r.path.clone());
                let pending = self.pending(&key, r.kind, &r.media_type, through).await?;
                if pending.is_empty() && self.device.is_some() {
                    // Nothing of the device's own: not looked at again until it grows.
                    sealed.through.insert(r.path.as_str().to_string(), r.head_seq);
                    changed = true;
                }
                for e in pending {
                    if !b.entries.is_empty() && b.len + e.encoded_len() > max {
                        self.seal_one(&mut sealed, std::mem::take(&mut b.entries), &b.readers)
                            .await?;
                        b.len = batch::BATCH_HEADER_LEN;
                        made += 1;
                        changed = false;
                    }
                    b.len += e.encoded_len();
                    b.entries.push(e);
                }
            }
        }
        for b in batches.into_values() {
            if !b.entries.is_empty() {
                self.seal_one(&mut sealed, b.entries, &b.readers).await?;
                made += 1;
                changed = false;
            }
        }
        if changed {
            self.storage
                .put_setting(self.setting, &serde_json::to_string(&*sealed)?)
                .await?;
        }
        Ok(made)
    }

    /// Seals the current state of the resources under `prefix` to the owner's recipients
    /// and those of `to`, in as many segments as `segment_max_bytes` asks; answers with
    /// how many.
    async fn seal_part(&self, sealed: &mut Sealed, prefix: &str, to: &[Share]) -> anyhow::Result<usize> {
        let extra: Vec<SealRecipient> = to.iter().filter_map(|s| s.seal_recipient().ok()).collect();
        let max = self.settings.segment_max_bytes.max(1) as usize;
        let mut made = 0;
        let mut batch = Vec::new();
        let mut batch_len = batch::BATCH_HEADER_LEN;
        for e in self.current_state(prefix).await? {
            if !batch.is_empty() && batch_len + e.encoded_len() > max {
                self.seal_one(sealed, std::mem::take(&mut batch), &extra).await?;
                batch_len = batch::BATCH_HEADER_LEN;
                made += 1;
            }
            batch_len += e.encoded_len();
            batch.push(e);
        }
        if !batch.is_empty() {
            self.seal_one(sealed, batch, &extra).await?;
            made += 1;
        }
        tracing::info!(prefix, segments = made, "sealed a shared part's state");
        Ok(made)
    }

    /// Seals one batch as the next segment, to the owner's recipients and `extra`, stores
    /// it, then counts its entries as sealed.
    async fn seal_one(
        &self,
        sealed: &mut Sealed,
        entries: Vec<Entry>,
        extra: &[SealRecipient],
    ) -> anyhow::Result<()> {
        let ns = self.chain();
        let prev = super::chain_head(self.storage.as_ref(), &ns).await?;
        let plain = batch::encode(&entries);
        let mut to = self.recipients();
        to.extend(extra.iter().cloned());
        let seg = plait_bridge::mirror::seal(&self.keys, &to, prev, &plain, now_ms())?;
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
            .put_setting(self.setting, &serde_json::to_string(&*sealed)?)
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

    /// Makes a checkpoint if the segments since the last one outgrew the namespace (see
    /// the module doc); answers with its `upto` if one was made.
    pub async fn maybe_checkpoint(&self) -> anyhow::Result<Option<u64>> {
        if self.device.is_some() {
            // A device's chain holds only its writes; the owner's checkpoints stand for
            // the namespace.
            return Ok(None);
        }
        let mut sealed = self.sealed.lock().await;
        let ns = self.chain();
        let head = super::chain_head(self.storage.as_ref(), &ns).await?;
        let held = self
            .storage
            .checkpoint(&ns, Take::NOTHING)
            .await?
            .map_or(0, |c| c.upto as u64);
        if head.seq <= held {
            return Ok(None);
        }
        let since = self.storage.segment_bytes_after(&ns, held as i64).await?;
        let size = self.storage.namespace_bytes(&ns).await?;
        if since < self.settings.checkpoint_min_bytes
            || since <= self.settings.checkpoint_ratio.saturating_mul(size)
        {
            return Ok(None);
        }
        let upto = self.checkpoint_at(head).await?;
        // Only the owner opens the snapshot: each share gets its part again after it.
        let shares = self.shares();
        let mut prefixes: BTreeMap<&str, Vec<Share>> = BTreeMap::new();
        for s in &shares {
            prefixes.entry(&s.prefix).or_default().push(s.clone());
        }
        for (prefix, to) in prefixes {
            self.seal_part(&mut sealed, prefix, &to).await?;
        }
        Ok(Some(upto))
    }

    /// The current state of every resource under `prefix` (empty: all), as the entries of
    /// a snapshot.
    async fn current_state(&self, prefix: &str) -> anyhow::Result<Vec<Entry>> {
        let ns = self.namespace();
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.storage.list(&ns, prefix, after.as_deref(), 500).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.path.as_str().to_string());
            for r in page {
                if !shares::covers(prefix, r.path.as_str()) {
                    continue;
                }
                let key = ResourceKey::new(ns, r.path.clone());
                out.extend(self.whole(&key, r.kind, &r.media_type).await?);
            }
        }
        Ok(out)
    }

    /// Seals a snapshot superseding the chain up to `head`, stores the checkpoint in the
    /// outbox (dropping the segments it supersedes there) and wakes the pushers. The
    /// caller holds the sealing lock.
    async fn checkpoint_at(&self, head: ChainHead) -> anyhow::Result<u64> {
        let ns = self.chain();
        // Before the snapshot is read, so that it holds what the devices' chains held up to
        // there.
        super::device_writes::note_merged(self.storage.as_ref(), head.seq).await?;
        let plain = batch::encode(&self.current_state("").await?);
        let sealed =
            plait_bridge::mirror::seal_checkpoint(&self.keys, &self.recipients(), head, &plain, now_ms())?;
        let max = plait_bridge::mirror::wire::MAX_SNAPSHOT_BYTES;
        if sealed.snapshot.len() as u64 > max {
            anyhow::bail!(
                "the snapshot is {} bytes, more than the {max} a checkpoint carries",
                sealed.snapshot.len()
            );
        }
        self.storage
            .put_checkpoint(
                &ns,
                head.seq as i64,
                Bytes::copy_from_slice(&sealed.checkpoint.to_bytes()),
                Bytes::from(sealed.snapshot),
            )
            .await?;
        tracing::info!(upto = head.seq, bytes = plain.len(), "made a mirror checkpoint");
        self.wake.notify_waiters();
        Ok(head.seq)
    }

    /// Seals every `segment_max_delay_ms` until `shutdown`, while `data_dir` lists a
    /// mirror (an owner without mirrors seals nothing).
    pub fn run_sealer(self: Arc<Self>, data_dir: PathBuf, shutdown: CancellationToken) {
        let shares = shares::Shares::new(&data_dir);
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
                if !self.mirror_ids(&data_dir).is_ok_and(|m| !m.is_empty()) {
                    continue;
                }
                match shares.list() {
                    Ok(list) => self.set_shares(list),
                    // Sealing to stale shares could seal to a reader unshared since.
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "the mirror shares: sealing waits");
                        continue;
                    }
                }
                match self.seal_pending().await {
                    Ok(0) => {}
                    Ok(_) => {
                        if let Err(e) = self.maybe_checkpoint().await {
                            tracing::warn!(error = %format!("{e:#}"), "making a mirror checkpoint failed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "sealing changes for the mirrors failed")
                    }
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
                match self.mirror_ids(&data_dir) {
                    Ok(list) => {
                        // Read once a round, for every mirror (a device has no list).
                        let devices = match &self.device {
                            None => super::devices::devices(&data_dir).map_err(|e| format!("{e:#}")),
                            Some(_) => Ok(BTreeMap::new()),
                        };
                        for id in &list {
                            let (checkpoint, last_ok_ms, revoked_before) = self
                                .status
                                .lock()
                                .expect("push status")
                                .get(id)
                                .map_or((0, None, 0), |s| (s.checkpoint, s.last_ok_ms, s.revoked_acked));
                            let told = match &devices {
                                Ok(d) => self.tell_revoked(&node, d, *id, false).await,
                                Err(e) => Err(e.clone()),
                            };
                            let revoked_acked = *told.as_ref().unwrap_or(&revoked_before);
                            let (acked, checkpoint, error) =
                                match (self.push_to(&node, *id, checkpoint).await, told) {
                                    (Ok((acked, checkpoint)), told) => (acked, checkpoint, told.err()),
                                    (Err((acked, e)), _) => (acked, checkpoint, Some(e)),
                                };
                            let status = PushStatus {
                                acked,
                                checkpoint,
                                last_ok_ms: if error.is_none() {
                                    Some(now_ms())
                                } else {
                                    last_ok_ms
                                },
                                error,
                                revoked_acked,
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

    /// Tells `mirror` our revoked devices (`devices`: this owner's, as `devices.json`
    /// lists them) unless it acknowledged as many already in this run (or `always`);
    /// answers how many it acknowledged. A device tells nothing.
    pub async fn tell_revoked(
        &self,
        node: &Node,
        devices: &BTreeMap<Identity, super::devices::DeviceEntry>,
        mirror: Identity,
        always: bool,
    ) -> Result<u64, String> {
        if self.device.is_some() {
            return Ok(0);
        }
        // Revocations are never undone, so their number says whether there is news (the
        // list sent is capped, the number is not).
        let revoked = devices.values().filter(|d| d.revoked_ms.is_some()).count() as u64;
        let acked = self
            .status
            .lock()
            .expect("push status")
            .get(&mirror)
            .map_or(0, |s| s.revoked_acked);
        if !always && acked == revoked {
            return Ok(acked);
        }
        super::devices::tell_revoked(node, mirror, super::devices::revoked(devices))
            .await
            .map_err(|e| format!("telling it our revoked devices: {e}"))?;
        if let Some(s) = self.status.lock().expect("push status").get_mut(&mirror) {
            s.revoked_acked = revoked;
        }
        Ok(revoked)
    }

    /// Sends our checkpoint to a mirror unless it acknowledged it already
    /// (`acked_checkpoint`); answers with the checkpoint it now holds.
    async fn push_checkpoint(
        &self,
        node: &Node,
        mirror: Identity,
        acked_checkpoint: u64,
    ) -> Result<u64, String> {
        let ns = self.chain();
        let Some(c) = self
            .storage
            .checkpoint(&ns, Take::ALL)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(acked_checkpoint);
        };
        if c.upto as u64 <= acked_checkpoint {
            return Ok(acked_checkpoint);
        }
        let sealed = SealedCheckpoint {
            checkpoint: Checkpoint::from_bytes(&c.checkpoint).map_err(|e| e.to_string())?,
            snapshot: c.snapshot.to_vec(),
        };
        let held = match node.mirror(mirror, Request::Checkpoint(sealed)).await {
            Ok(Response::Stored { seq }) => seq,
            // It holds this one (or a later one) already.
            Ok(Response::Refused(Refusal::StaleCheckpoint { held, .. })) if held >= c.upto as u64 => held,
            Ok(Response::Refused(r)) => return Err(refusal_text(&r)),
            Ok(other) => return Err(format!("unexpected answer {other:?}")),
            Err(e) => return Err(e.to_string()),
        };
        // The mirror holds the snapshot: what the devices' chains held up to it goes there.
        match super::device_writes::checkpoint_devices(
            self.storage.as_ref(),
            node,
            &self.keys,
            mirror,
            c.upto as u64,
        )
        .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(%mirror, devices = n, "compacted devices' merged chains on a mirror"),
            // Tried again with the next checkpoint (or the next run).
            Err(e) => {
                tracing::info!(%mirror, error = %format!("{e:#}"), "compacting devices' chains on a mirror")
            }
        }
        Ok(held)
    }

    /// Brings one mirror up to our chain's head, our checkpoint first; answers with the
    /// seq and the checkpoint it acknowledged, or the seq and why it stopped.
    pub async fn push_to(
        &self,
        node: &Node,
        mirror: Identity,
        acked_checkpoint: u64,
    ) -> Result<(u64, u64), (u64, String)> {
        let ns = self.chain();
        let checkpoint = self
            .push_checkpoint(node, mirror, acked_checkpoint)
            .await
            .map_err(|e| (0, e))?;
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
            let ours_at = match mine.first() {
                Some(s) => Descriptor::from_bytes(&s.descriptor).ok().map(|d| d.digest()),
                // Superseded here: our checkpoint names its digest if it is the last.
                None => self
                    .storage
                    .checkpoint(&ns, Take::NOTHING)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|c| Checkpoint::from_bytes(&c.checkpoint).ok())
                    .filter(|c| c.upto == head.seq)
                    .map(|c| c.head),
            };
            let same = ours_at == Some(head.hash);
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
                let req = match &self.device {
                    Some(d) => Request::DevicePush {
                        cert: Box::new(d.cert.clone()),
                        segment: seg,
                    },
                    None => Request::Push(seg),
                };
                match node.mirror(mirror, req).await {
                    Ok(Response::Stored { seq }) => acked = seq,
                    Ok(Response::Refused(r)) => return Err((acked, refusal_text(&r))),
                    Ok(other) => return Err((acked, format!("unexpected answer {other:?}"))),
                    Err(e) => return Err((acked, e.to_string())),
                }
            }
        }
        Ok((acked, checkpoint))
    }
}

/// A bytes resource's latest value as an entry, if it is newer than `through` and
/// `sealable` takes its author (last writer wins: the latest value is what a restore
/// needs).
fn latest_value(
    key: &ResourceKey,
    media_type: &str,
    l: crate::storage::LoadedResource,
    through: i64,
    sealable: impl Fn(Option<Identity>) -> bool,
) -> Option<Entry> {
    let (c, blob) = (l.changes.last()?, l.blob?);
    (c.seq > through && sealable(c.author)).then(|| Entry {
        what: What::Value,
        kind: Kind::Bytes,
        path: key.path.clone(),
        media_type: c.meta.clone().unwrap_or_else(|| media_type.to_string()),
        seq: l.row.head_seq,
        version: Some(c.version.clone()),
        parents: c.parents.clone(),
        at_ms: c.at_ms,
        data: blob,
    })
}

/// How a mirror's refusal is shown (in `plait mirror list`, errors and logs).
pub(super) fn refusal_text(r: &Refusal) -> String {
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
            version: crate::model::VersionId::parse(v).unwrap(),
            parents: crate::model::Version::root(),
            author: None,
            at_ms: 1,
            data: Bytes::copy_from_slice(data),
            meta: None,
            blob: None,
        }
    }

    /// Documents as the test writes them.
    #[derive(Default)]
    struct Texts {
        docs: HashMap<String, crate::doc::TextDoc>,
    }

    impl Texts {
        /// `n` random letters (incompressible but for their alphabet).
        fn letters(&mut self, n: usize) -> String {
            rand::Rng::sample_iter(
                rand::thread_rng(),
                rand::distributions::Uniform::new_inclusive(b'a', b'z'),
            )
            .take(n)
            .map(char::from)
            .collect()
        }

        /// The automerge change that makes `path`'s text `text`, as version `v`.
        fn put(&mut self, path: &str, v: &str, text: &str) -> NewChange {
            let body = crate::update::WriteBody::Full {
                media_type: None,
                body: Bytes::copy_from_slice(text.as_bytes()),
            };
            let version = crate::model::VersionId::parse(v).unwrap();
            let w = crate::doc::DocWrite {
                body: &body,
                version: Some(&version),
                parents: None,
                agent_hint: None,
                force: true,
                digest: None,
                max_json_depth: crate::doc::json::MAX_JSON_DEPTH,
            };
            let doc = self.docs.entry(path.to_string()).or_default();
            let crate::doc::Outcome::Applied(a) = doc.apply(&w, 1).unwrap() else {
                panic!("{v} changes {path}");
            };
            assert!(a.earlier.is_empty(), "one change");
            NewChange {
                version,
                parents: a.parents,
                author: None,
                at_ms: 1,
                data: Bytes::from(a.change),
                meta: None,
                blob: None,
            }
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

    async fn write_value(s: &Arc<dyn Storage>, ns: Identity, path: &str, v: &str, value: &[u8]) {
        let key = ResourceKey::new(ns, ResourcePath::new(path).unwrap());
        let target = match s.load(&key).await.unwrap() {
            Some(l) => Target::Existing {
                id: l.row.id,
                after: l.row.head_seq,
            },
            None => Target::Create {
                key,
                kind: Kind::Bytes,
                media_type: "application/octet-stream".into(),
            },
        };
        let mut c = change(v, blake3::hash(value).as_bytes());
        c.meta = Some("application/octet-stream".into());
        c.blob = Some(Bytes::copy_from_slice(value));
        s.append(target, vec![c]).await.unwrap();
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
            ..Default::default()
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

        // Three documents new to the chain: each goes whole, as its document saved.
        let mut t = Texts::default();
        let mut first = Vec::new();
        for i in 0..3 {
            let (path, text) = (format!("doc{i}"), t.letters(1000));
            write(&s, ns, &path, vec![t.put(&path, &format!("a-{i}"), &text)]).await;
            first.push(text);
        }
        assert_eq!(owner.seal_pending().await.unwrap(), 1);
        let key = SealKey::load_or_create(&key_path).unwrap();
        let e = opened(&s, ns, &key).await;
        assert_eq!(e.len(), 3);
        for (e, text) in e.iter().zip(&first) {
            assert_eq!((e.what, e.seq), (What::Snapshot, 1));
            let mut doc =
                crate::doc::Document::load_automerge(Kind::Text, Some(&e.data), std::iter::empty::<&[u8]>())
                    .unwrap();
            assert_eq!(doc.render(), text.as_bytes());
        }

        // Ten changes of 1000 letters to them: about three to a 4 KiB segment.
        for i in 0..10 {
            let (path, text) = (format!("doc{}", i % 3), t.letters(1000));
            let c = t.put(&path, &format!("b-{i}"), &text);
            assert!(c.data.len() > 1000);
            write(&s, ns, &path, vec![c]).await;
        }
        let made = owner.seal_pending().await.unwrap();
        assert!((4..=5).contains(&made), "{made}");
        assert_eq!(owner.sealed_seq(), 1 + made as u64);
        assert_eq!(owner.seal_pending().await.unwrap(), 0, "nothing new");
        let e = opened(&s, ns, &key).await;
        assert_eq!(e.len(), 13);
        assert!(e[3..].iter().all(|e| e.what == What::Change && e.seq > 1));

        // More, then a crash after the segment is stored but before the setting is: the
        // next start reads the segment and does not seal it again.
        write(&s, ns, "doc0", vec![t.put("doc0", "c-0", "more")]).await;
        let saved = s.get_setting(SEALED_SETTING).await.unwrap().unwrap();
        assert_eq!(owner.seal_pending().await.unwrap(), 1);
        s.put_setting(SEALED_SETTING, &saved).await.unwrap();
        drop(owner);
        let owner = start().await;
        assert_eq!(owner.sealed_seq(), 1 + made as u64 + 1);
        assert_eq!(owner.seal_pending().await.unwrap(), 0);
        write(&s, ns, "doc1", vec![t.put("doc1", "d-0", "after")]).await;
        assert_eq!(owner.seal_pending().await.unwrap(), 1);
        let e = opened(&s, ns, &key).await;
        assert_eq!(e.len(), 15);
        let mut seen = std::collections::HashSet::new();
        assert!(
            e.iter().all(|e| seen.insert((e.path.clone(), e.seq))),
            "nothing sealed twice"
        );

        // Compacted before it was sealed: the snapshot stands for the folded changes.
        write(
            &s,
            ns,
            "doc2",
            vec![t.put("doc2", "e-0", "x"), t.put("doc2", "e-1", "y")],
        )
        .await;
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

        // A new document that does not load (these bytes are not automerge's) goes as its
        // stored changes, and sealing goes on.
        write(&s, ns, "broken", vec![change("f-0", b"not automerge")]).await;
        assert_eq!(owner.seal_pending().await.unwrap(), 1);
        let e = opened(&s, ns, &key).await;
        let last = e.last().unwrap();
        assert_eq!(
            (last.what, last.path.as_str(), last.data.as_ref()),
            (What::Change, "broken", &b"not automerge"[..])
        );
    }

    #[tokio::test]
    async fn a_shared_prefix_is_sealed_to_its_reader_and_nothing_else_is() {
        let dir = tempfile::tempdir().unwrap();
        let s: Arc<dyn Storage> =
            Arc::new(SqliteStorage::open(&dir.path().join("s.db"), CommitLimits::default()).unwrap());
        let keys = Keypair::generate();
        let ns = keys.identity();
        let own = SealKey::load_or_create(&dir.path().join("seal-key.txt")).unwrap();
        let settings = MirrorSettings {
            checkpoint_ratio: 0,
            checkpoint_min_bytes: 0,
            ..Default::default()
        };
        let owner = Owner::start(s.clone(), keys, own.clone(), settings)
            .await
            .unwrap();
        let reader = SealKey::generate();
        let share = Share {
            prefix: "shared".into(),
            reader: Keypair::generate().identity(),
            recipient: reader.recipient().to_string(),
            added_ms: 1,
        };
        write_value(&s, ns, "shared/a", "a-0", b"one").await;
        write_value(&s, ns, "sharedx", "x-0", b"two").await;
        assert_eq!(owner.seal_pending().await.unwrap(), 1, "nothing shared yet");

        // Shared: the part's state first (standing for its pending changes), then its
        // changes in segments of their own. (Bytes resources: their state is their value,
        // and these test changes are not automerge's.)
        owner.set_shares(vec![share.clone()]);
        write_value(&s, ns, "shared/a", "a-1", b"three").await;
        write_value(&s, ns, "sharedx", "x-1", b"four").await;
        assert_eq!(owner.seal_pending().await.unwrap(), 2);
        assert_eq!(owner.seal_pending().await.unwrap(), 0, "the share's state once");
        write_value(&s, ns, "shared/a", "a-2", b"five").await;
        write_value(&s, ns, "sharedx", "x-2", b"six").await;
        assert_eq!(owner.seal_pending().await.unwrap(), 2);
        let readable = |from: i64| {
            let (s, reader) = (s.clone(), reader.clone());
            async move {
                let mut paths = Vec::new();
                for r in s.segments(&ns, from, i64::MAX, u64::MAX).await.unwrap() {
                    match plait_bridge::mirror::open(&reader, &r.ciphertext) {
                        Ok(plain) => paths.extend(
                            batch::decode(&plain)
                                .unwrap()
                                .into_iter()
                                .map(|e| (e.what, e.path.as_str().to_string())),
                        ),
                        Err(plait_bridge::mirror::SealError::NotSealedToUs) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                paths
            }
        };
        assert_eq!(
            readable(2).await,
            vec![
                (What::Value, "shared/a".to_string()),
                (What::Value, "shared/a".to_string())
            ]
        );
        assert_eq!(
            opened(&s, ns, &own).await.len(),
            2 + 1 + 1 + 1 + 1,
            "the owner opens all"
        );

        // A checkpoint only the owner opens, then the part again for its reader.
        assert_eq!(owner.maybe_checkpoint().await.unwrap(), Some(5));
        assert_eq!(readable(1).await, vec![(What::Value, "shared/a".to_string())]);

        // Unshared: what is sealed from now on is not sealed to the reader.
        owner.set_shares(Vec::new());
        write_value(&s, ns, "shared/a", "a-3", b"seven").await;
        assert_eq!(owner.seal_pending().await.unwrap(), 1);
        assert!(readable(7).await.is_empty());
        assert_eq!(s.segments(&ns, 7, 7, u64::MAX).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_checkpoint_snapshots_the_current_state_and_the_chain_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let s: Arc<dyn Storage> =
            Arc::new(SqliteStorage::open(&dir.path().join("s.db"), CommitLimits::default()).unwrap());
        let keys = Keypair::generate();
        let ns = keys.identity();
        let key_path = dir.path().join("seal-key.txt");
        let start = |ratio| {
            let s = s.clone();
            let keys = Keypair::from_secret_bytes(&keys.secret_bytes());
            let key_path = key_path.clone();
            async move {
                let settings = MirrorSettings {
                    checkpoint_ratio: ratio,
                    checkpoint_min_bytes: 0,
                    ..Default::default()
                };
                Owner::start(s, keys, SealKey::load_or_create(&key_path).unwrap(), settings)
                    .await
                    .unwrap()
            }
        };
        let owner = start(1000).await;
        write_value(&s, ns, "img", "a-0", b"x").await;
        assert_eq!(owner.seal_pending().await.unwrap(), 1);
        assert_eq!(owner.maybe_checkpoint().await.unwrap(), None, "under the ratio");

        let owner = start(0).await;
        write_value(&s, ns, "img", "a-1", b"y").await;
        assert_eq!(owner.seal_pending().await.unwrap(), 1);
        assert_eq!(owner.maybe_checkpoint().await.unwrap(), Some(2));
        assert_eq!(owner.maybe_checkpoint().await.unwrap(), None, "nothing new");
        assert!(
            s.segments(&ns, 1, 9, u64::MAX).await.unwrap().is_empty(),
            "outbox compacted"
        );
        let c = s.checkpoint(&ns, Take::ALL).await.unwrap().unwrap();
        let ck = Checkpoint::from_bytes(&c.checkpoint).unwrap();
        assert!(ck.verify_signature());
        assert_eq!(ck.upto, 2);
        let key = SealKey::load_or_create(&key_path).unwrap();
        let snap = batch::decode(&plait_bridge::mirror::open(&key, &c.snapshot).unwrap()).unwrap();
        assert_eq!(snap.len(), 1);
        assert_eq!(
            (snap[0].what, snap[0].seq, snap[0].data.as_ref()),
            (What::Value, 2, &b"y"[..])
        );

        // The chain goes on after the checkpoint, and a restart finds where it stands.
        drop(owner);
        let owner = start(1000).await;
        assert_eq!(owner.sealed_seq(), 2);
        write_value(&s, ns, "img", "a-2", b"z").await;
        assert_eq!(owner.seal_pending().await.unwrap(), 1);
        let next = s.segments(&ns, 1, 9, u64::MAX).await.unwrap();
        let d = Descriptor::from_bytes(&next[0].descriptor).unwrap();
        assert_eq!((d.seq, d.prev), (3, ck.head));
    }
}
