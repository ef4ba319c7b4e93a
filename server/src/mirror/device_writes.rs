//! A device's writes to its owner's namespace, and the owner merging them.
//!
//! **On the device.** `plait serve` on a data dir holding `device.json` ([`load_device`])
//! lets the device's own user write under `/~<owner>/…` (`Access::set_device_of`) and runs
//! a sealer for those writes ([`super::owner::Owner::start_device`]): the device's user's
//! changes only, into the device's own chain — signed by the device's key, sealed to the
//! owner's seal key and the device's own — pushed with the device's certificate to the
//! mirrors its link named, which store it under the owner's grant.
//!
//! **On the owner.** [`Merger`] runs at start and then every
//! `mirror.device_merge_interval_ms`: for each device in `devices.json` it asks its
//! mirrors where the device's chain stands, fetches the segments after what it merged,
//! checks each (the device's signature, the chain from what it merged, length and
//! BLAKE3), opens it with the owner's keys and applies its entries to the owner's own
//! resources: automerge changes are imported (they merge), a snapshot's changes too, and
//! a bytes value is written when it is newer than the owner's latest. How far each
//! device's chain was merged is kept (the `mirror_device_merged` setting), so a restart
//! goes on from there. Of a revoked device, nothing sealed at or after its revocation
//! (by the segment's signed time) nor past where its chain stood when the owner first
//! looked after the revocation is merged; then its chain is closed. What is merged grows the owner's resources, so the owner's own sealer seals
//! it on the owner's chain as usual, and other devices get it from there.
//!
//! **Compacting what was merged.** A device's chain is never checkpointed by the device;
//! the owner does it. When the owner makes a checkpoint of its own chain, it first notes
//! where each device's chain was merged to ([`note_merged`], the
//! `mirror_device_checkpointed` setting): the snapshot, read after, holds all of that.
//! Once a mirror holds that checkpoint, the owner sends it a checkpoint of each device's
//! chain up to the noted segment ([`checkpoint_devices`]: signed by the owner, no
//! snapshot), and the mirror drops those segments. A closed chain (a revoked device's) is
//! dropped whole, up to where the mirror's chain of it stands. So the devices' chains,
//! like the owner's, take room in proportion to what was written since the last
//! checkpoint, and a revoked device's chain stops counting against the owner's quota.
//!
//! Knows nothing of HTTP; mirrors are reached through the node's mirror protocol.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use plait_bridge::mirror::device::DeviceCert;
use plait_bridge::mirror::wire::{Request, Response};
use plait_bridge::mirror::{ChainHead, Checkpoint, Refusal, SealKey, SealedCheckpoint};
use plait_bridge::node::Node;
use plait_bridge::{Identity, Keypair};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::batch::{self, Entry, What};
use super::join::{DEVICE_FILE, OWNER_SEAL_KEY_FILE};
use super::owner::{AsDevice, Owner, Seal};
use crate::engine::Engine;
use crate::model::{Kind, ResourceKey, ResourcePath};
use crate::storage::Storage;

/// The setting that keeps how far each device's chain was merged.
const MERGED_SETTING: &str = "mirror_device_merged";

/// `device.json` as `plait device join` writes it.
#[derive(Debug, Deserialize)]
struct DeviceFile {
    owner: Identity,
    certificate: String,
    mirrors: Vec<Identity>,
}

/// A device's data dir: what it seals its writes as, and with which keys. `None` when
/// `data_dir` is not a device's.
pub fn load_device(data_dir: &Path) -> anyhow::Result<Option<(AsDevice, Seal)>> {
    let path = data_dir.join(DEVICE_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let f: DeviceFile =
        serde_json::from_slice(&text).with_context(|| format!("reading {}", path.display()))?;
    let bytes = data_encoding::BASE64URL_NOPAD
        .decode(f.certificate.as_bytes())
        .with_context(|| format!("the certificate in {}", path.display()))?;
    let cert =
        DeviceCert::from_bytes(&bytes).with_context(|| format!("the certificate in {}", path.display()))?;
    if cert.owner != f.owner {
        bail!("{}: the certificate is for another owner", path.display());
    }
    let own = SealKey::load_or_create(&data_dir.join(plait_bridge::mirror::SEAL_KEY_FILE))?;
    let owner_key = SealKey::load_or_create(&data_dir.join(OWNER_SEAL_KEY_FILE))?;
    let seal = Seal {
        current: own,
        retired: Vec::new(),
        devices: vec![owner_key.recipient()],
    };
    Ok(Some((
        AsDevice {
            cert,
            mirrors: f.mirrors,
        },
        seal,
    )))
}

/// Starts a device's sealer and pushers for its writes to its owner's namespace.
pub async fn start_device(
    storage: Arc<dyn Storage>,
    keys: &Keypair,
    (as_device, seal): (AsDevice, Seal),
    settings: super::MirrorSettings,
    node: Node,
    data_dir: &Path,
    shutdown: CancellationToken,
) -> anyhow::Result<Arc<Owner>> {
    let sealer = Owner::start_device(
        storage,
        Keypair::from_secret_bytes(&keys.secret_bytes()),
        as_device,
        seal,
        settings,
    )
    .await
    .context("loading what this device sealed of its writes")?;
    sealer
        .clone()
        .run_sealer(data_dir.to_path_buf(), shutdown.clone());
    sealer.clone().run_pusher(node, data_dir.to_path_buf(), shutdown);
    Ok(sealer)
}

/// The setting noting, for the owner's last checkpoint, where each device's chain was
/// merged to just before its snapshot was read.
const CHECKPOINTED_SETTING: &str = "mirror_device_checkpointed";

/// What [`CHECKPOINTED_SETTING`] holds.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Noted {
    /// The owner's checkpoint's `upto`.
    upto: u64,
    devices: BTreeMap<Identity, Merged>,
}

/// Notes where each device's chain was merged to, for the owner's checkpoint superseding
/// its chain up to `upto`; called before that checkpoint's snapshot is read, so the
/// snapshot holds everything merged by then.
pub async fn note_merged(storage: &dyn Storage, upto: u64) -> anyhow::Result<()> {
    let devices = merged(storage).await?;
    let noted = Noted { upto, devices };
    storage
        .put_setting(CHECKPOINTED_SETTING, &serde_json::to_string(&noted)?)
        .await?;
    Ok(())
}

/// Once `mirror` holds the owner's checkpoint `upto`, drops there what the devices'
/// chains held that the checkpoint's snapshot holds too (see the module doc). Answers how
/// many device chains the mirror compacted; a device whose chain could not be compacted
/// is logged and passed over (tried again with the next checkpoint).
pub async fn checkpoint_devices(
    storage: &dyn Storage,
    node: &Node,
    owner: &Keypair,
    mirror: Identity,
    upto: u64,
) -> anyhow::Result<usize> {
    let noted: Noted = match storage.get_setting(CHECKPOINTED_SETTING).await? {
        Some(s) => serde_json::from_str(&s).with_context(|| format!("the {CHECKPOINTED_SETTING} setting"))?,
        None => return Ok(0),
    };
    if noted.upto != upto {
        // Noted for a checkpoint that was not made, or not this one.
        return Ok(0);
    }
    let mut n = 0;
    for (device, m) in noted.devices {
        // One device's chain failing leaves the others to go on.
        match checkpoint_device(node, owner, mirror, device, m).await {
            Ok(true) => n += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::info!(%mirror, %device, error = %format!("{e:#}"), "compacting a device's chain on a mirror")
            }
        }
    }
    Ok(n)
}

/// Has `mirror` drop `device`'s chain up to where it was merged (`m`; all of it when
/// closed); answers whether it dropped anything.
async fn checkpoint_device(
    node: &Node,
    owner: &Keypair,
    mirror: Identity,
    device: Identity,
    m: Merged,
) -> anyhow::Result<bool> {
    let held = chain_head(node, mirror, device).await?;
    // A mirror the device never pushed to holds nothing of it.
    if held.seq == 0 {
        return Ok(false);
    }
    // Nothing more of a closed chain is merged: all the mirror holds goes.
    let head = if m.closed {
        held
    } else {
        ChainHead {
            seq: m.seq,
            hash: m.hash,
        }
    };
    if head.seq == 0 {
        return Ok(false);
    }
    let sealed = SealedCheckpoint {
        checkpoint: Checkpoint::sign_merged(owner, device, head, super::now_ms()),
        snapshot: Vec::new(),
    };
    match node.mirror(mirror, Request::Checkpoint(sealed)).await {
        Ok(Response::Stored { .. }) => Ok(true),
        // Compacted there already, as far or further.
        Ok(Response::Refused(Refusal::StaleCheckpoint { held, .. })) if held >= head.seq => Ok(false),
        Ok(Response::Refused(r)) => bail!(super::owner::refusal_text(&r)),
        Ok(other) => bail!("answered {other:?}"),
        Err(e) => bail!("{e}"),
    }
}

/// Asks `mirror`; a refusal is an error naming its reason.
async fn ask(node: &Node, mirror: Identity, req: Request) -> anyhow::Result<Response> {
    match node.mirror(mirror, req).await {
        Ok(Response::Refused(r)) => bail!(super::owner::refusal_text(&r)),
        Ok(r) => Ok(r),
        Err(e) => bail!("{e}"),
    }
}

/// Where `mirror`'s chain of `device` stands.
async fn chain_head(node: &Node, mirror: Identity, device: Identity) -> anyhow::Result<ChainHead> {
    match ask(node, mirror, Request::Head { namespace: device }).await? {
        Response::Head(h) => Ok(h),
        other => bail!("the head of {device}'s chain: answered {other:?}"),
    }
}

async fn merged(storage: &dyn Storage) -> anyhow::Result<BTreeMap<Identity, Merged>> {
    Ok(match storage.get_setting(MERGED_SETTING).await? {
        Some(s) => serde_json::from_str(&s).with_context(|| format!("the {MERGED_SETTING} setting"))?,
        None => BTreeMap::new(),
    })
}

/// Where a device's chain was merged to.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Merged {
    seq: u64,
    hash: [u8; 32],
    /// The device was revoked and its chain reached past its revocation: nothing more of
    /// it is merged, nor fetched.
    #[serde(default)]
    closed: bool,
    /// For a revoked device: where its chain stood on a mirror when the owner first
    /// looked after the revocation. Nothing past it is merged, whatever time a segment
    /// claims (a revoked device could date its segments back).
    #[serde(default)]
    cap: Option<u64>,
}

/// The owner merging its devices' writes (see the module doc).
pub struct Merger {
    pub node: Node,
    pub engine: Engine,
    pub storage: Arc<dyn Storage>,
    /// The owner's sealer: its keys open the devices' segments.
    pub owner: Arc<Owner>,
    pub data_dir: std::path::PathBuf,
}

impl Merger {
    /// Merges at once, then every `every`, until `shutdown`.
    pub fn run(self, every: Duration, shutdown: CancellationToken) {
        tokio::spawn(async move {
            loop {
                match self.merge_all().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(segments = n, "merged devices' writes"),
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "merging devices' writes failed"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
            }
        });
    }

    /// Merges what every device pushed since the last time; answers with the number of
    /// segments merged.
    pub async fn merge_all(&self) -> anyhow::Result<usize> {
        let devices = super::devices::devices(&self.data_dir)?;
        if devices.is_empty() {
            return Ok(0);
        }
        let mirrors: Vec<Identity> = super::owner::mirrors(&self.data_dir)?.into_keys().collect();
        let mut merged = merged(self.storage.as_ref()).await?;
        let mut n = 0;
        for (device, entry) in devices {
            if merged.get(&device).is_some_and(|m| m.closed) {
                continue;
            }
            for &mirror in &mirrors {
                match self
                    .merge_from(mirror, device, entry.revoked_ms, &mut merged)
                    .await
                {
                    Ok(k) => {
                        n += k;
                        break;
                    }
                    Err(e) => {
                        tracing::info!(%device, %mirror, error = %format!("{e:#}"), "merging a device's writes from a mirror")
                    }
                }
            }
        }
        Ok(n)
    }

    /// Merges `device`'s chain as `mirror` holds it past what was merged.
    async fn merge_from(
        &self,
        mirror: Identity,
        device: Identity,
        revoked_ms: Option<u64>,
        merged: &mut BTreeMap<Identity, Merged>,
    ) -> anyhow::Result<usize> {
        let head = chain_head(&self.node, mirror, device).await?;
        let mut at = merged.get(&device).copied().unwrap_or_default();
        let mut end = head.seq;
        if revoked_ms.is_some() {
            if at.cap.is_none() {
                at.cap = Some(head.seq);
                merged.insert(device, at);
                self.storage
                    .put_setting(MERGED_SETTING, &serde_json::to_string(&merged)?)
                    .await?;
            }
            end = end.min(at.cap.unwrap_or(0));
        }
        let mut chain = ChainHead {
            seq: at.seq,
            hash: at.hash,
        };
        let mut n = 0;
        while chain.seq < end {
            let list = match ask(
                &self.node,
                mirror,
                Request::Range {
                    namespace: device,
                    from: chain.seq + 1,
                    to: end,
                },
            )
            .await?
            {
                Response::Segments(l) => l,
                other => bail!("answered {other:?}"),
            };
            if list.is_empty() {
                bail!(
                    "holds no segment {} though the chain ends at {}",
                    chain.seq + 1,
                    head.seq
                );
            }
            for s in list.into_iter().filter(|s| s.descriptor.seq <= end) {
                let d = &s.descriptor;
                if !s.follows(device, chain) {
                    bail!("segment {} does not follow the device's chain", d.seq);
                }
                if revoked_ms.is_some_and(|r| d.at_ms >= r) {
                    return self.close(device, merged, d.seq).await.map(|()| n);
                }
                let plain = self
                    .owner
                    .open(&s.ciphertext)
                    .with_context(|| format!("opening the device's segment {}", d.seq))?;
                let entries = batch::decode(&plain).map_err(|e| anyhow::anyhow!("a sealed batch: {e}"))?;
                self.apply(&entries)
                    .await
                    .with_context(|| format!("merging the device's segment {}", d.seq))?;
                chain = ChainHead::of(d);
                merged.insert(
                    device,
                    Merged {
                        seq: chain.seq,
                        hash: chain.hash,
                        closed: false,
                        cap: at.cap,
                    },
                );
                self.storage
                    .put_setting(MERGED_SETTING, &serde_json::to_string(&merged)?)
                    .await?;
                n += 1;
            }
        }
        if revoked_ms.is_some() && head.seq > end {
            self.close(device, merged, end + 1).await?;
        }
        Ok(n)
    }

    /// Merges nothing more of a revoked device, from segment `seq` on.
    async fn close(
        &self,
        device: Identity,
        merged: &mut BTreeMap<Identity, Merged>,
        seq: u64,
    ) -> anyhow::Result<()> {
        tracing::info!(%device, seq, "not merging what a revoked device sealed after its revocation");
        merged.entry(device).or_default().closed = true;
        self.storage
            .put_setting(MERGED_SETTING, &serde_json::to_string(&merged)?)
            .await?;
        Ok(())
    }

    /// Applies a device's entries to the owner's resources.
    async fn apply(&self, entries: &[Entry]) -> anyhow::Result<()> {
        let ns = self.owner.namespace();
        let mut i = 0;
        while i < entries.len() {
            let e = &entries[i];
            let path =
                ResourcePath::new(e.path.as_str()).map_err(|e| anyhow::anyhow!("a sealed path: {e}"))?;
            let key = ResourceKey::new(ns, path);
            match e.what {
                What::Change => {
                    // Consecutive changes to one resource are imported together.
                    let mut changes = Vec::new();
                    let mut j = i;
                    while j < entries.len() && entries[j].what == What::Change && entries[j].path == e.path {
                        changes.push(entries[j].data.clone());
                        j += 1;
                    }
                    self.engine
                        .import(&key, e.kind, e.media_type.clone(), changes)
                        .await
                        .with_context(|| format!("merging {}", e.path.as_str()))?;
                    i = j;
                    continue;
                }
                What::Snapshot => {
                    // A whole document: its changes merge like any others.
                    let mut doc = crate::doc::Document::load_automerge(
                        e.kind,
                        Some(e.data.as_ref()),
                        std::iter::empty::<&[u8]>(),
                    )
                    .with_context(|| format!("a snapshot of {}", e.path.as_str()))?;
                    let changes = doc
                        .export(&[])
                        .into_iter()
                        .map(|c| bytes::Bytes::from(c.bytes))
                        .collect();
                    self.engine
                        .import(&key, e.kind, e.media_type.clone(), changes)
                        .await
                        .with_context(|| format!("merging {}", e.path.as_str()))?;
                }
                What::Value => {
                    // The newer write wins.
                    let ours = self
                        .storage
                        .load(&key)
                        .await?
                        .and_then(|l| l.changes.last().map(|c| c.at_ms));
                    if e.kind == Kind::Bytes && ours.is_none_or(|at| e.at_ms > at) {
                        let write =
                            crate::engine::Write::internal_value(e.media_type.clone(), e.data.clone());
                        self.engine
                            .write(&key, write)
                            .await
                            .with_context(|| format!("merging {}", e.path.as_str()))?;
                    }
                }
            }
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::sqlite::SqliteStorage;
    use crate::storage::{CommitLimits, NewChange, Target};
    use bytes::Bytes;
    use plait_bridge::mirror::Descriptor;

    fn change(v: &str, author: Option<Identity>) -> NewChange {
        NewChange {
            version: crate::model::VersionId::parse(v).unwrap(),
            parents: crate::model::Version::root(),
            author,
            at_ms: 1,
            data: Bytes::copy_from_slice(v.as_bytes()),
            meta: None,
            blob: None,
        }
    }

    #[tokio::test]
    async fn a_device_seals_only_its_users_writes_on_its_own_chain() {
        let dir = tempfile::tempdir().unwrap();
        let s: Arc<dyn Storage> =
            Arc::new(SqliteStorage::open(&dir.path().join("s.db"), CommitLimits::default()).unwrap());
        let owner = Keypair::generate();
        let device = Keypair::generate();
        let (owner_key, own) = (SealKey::generate(), SealKey::generate());
        let start = || {
            let as_device = AsDevice {
                cert: DeviceCert::sign(&owner, device.identity(), 1, 0),
                mirrors: Vec::new(),
            };
            let seal = Seal {
                current: own.clone(),
                retired: Vec::new(),
                devices: vec![owner_key.recipient()],
            };
            Owner::start_device(
                s.clone(),
                Keypair::from_secret_bytes(&device.secret_bytes()),
                as_device,
                seal,
                Default::default(),
            )
        };
        // Restored from the owner: no author.
        let key = ResourceKey::new(owner.identity(), ResourcePath::new("notes").unwrap());
        let target = Target::Create {
            key: key.clone(),
            kind: Kind::Text,
            media_type: "text/plain".into(),
        };
        s.append(target, vec![change("o-1", None)]).await.unwrap();
        let sealer = start().await.unwrap();
        assert_eq!(sealer.seal_pending().await.unwrap(), 0, "nothing of its own");

        // The device's user writes; the owner's next change arrives too.
        let l = s.load(&key).await.unwrap().unwrap();
        let target = Target::Existing {
            id: l.row.id,
            after: l.row.head_seq,
        };
        s.append(
            target,
            vec![change("d-1", Some(device.identity())), change("o-2", None)],
        )
        .await
        .unwrap();
        assert_eq!(sealer.seal_pending().await.unwrap(), 1);
        assert!(
            s.segments(&owner.identity(), 1, 9, u64::MAX)
                .await
                .unwrap()
                .is_empty()
        );
        let rows = s.segments(&device.identity(), 1, 9, u64::MAX).await.unwrap();
        assert_eq!(rows.len(), 1);
        let d = Descriptor::from_bytes(&rows[0].descriptor).unwrap();
        assert_eq!(d.namespace, device.identity(), "the device's own chain");
        assert!(d.verify_signature());
        // Sealed to the owner and to the device itself.
        for k in [&owner_key, &own] {
            let plain = plait_bridge::mirror::open(k, &rows[0].ciphertext).unwrap();
            let e = batch::decode(&plain).unwrap();
            assert_eq!(e.len(), 1);
            assert_eq!((e[0].path.as_str(), e[0].data.as_ref()), ("notes", &b"d-1"[..]));
        }

        // A restart goes on from there.
        drop(sealer);
        let again = start().await.unwrap();
        assert_eq!(again.sealed_seq(), 1);
        assert_eq!(again.seal_pending().await.unwrap(), 0);
    }
}
