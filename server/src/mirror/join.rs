//! The device's side: `plait device join` makes a new data dir a device of the owner
//! whose link it is given, and restores the owner's namespace into it from a mirror.
//!
//! In order: the link's expiry is checked before anything is done; the device's identity
//! (derived from the link's secret, so the device can join the mirror's network before
//! it holds its bundle) is written as the data dir's `identity.pem`; the store is opened
//! as `plait serve` opens it; the device joins the mirror's network with the invite the
//! link carries (unless it is a member already), takes its sealed bundle from the mirror
//! (given once) and opens it; its seal key (`seal-key.txt`), the owner's
//! (`owner-seal-key.txt`) and what it knows of its owner (`device.json`: owner,
//! certificate, mirrors) are written 0600. Then every segment the mirror holds for the
//! owner — the checkpoint's snapshot first, then the segments after it — is checked (the
//! owner's signature, the chain, length and BLAKE3), opened and applied through the
//! engine as federation applies its home's changes: automerge changes and snapshots are
//! imported into replicas of `/~<owner>/…`, a bytes value is written — a segment's
//! resources at once (each resource's entries in order), so that the store commits them
//! together rather than one commit each. `plait serve` on the data dir then serves them,
//! and follows the owner's chain from where the join stopped ([`super::reader`]).
//!
//! Knows nothing of HTTP; the mirror is reached through the node's mirror protocol.

use std::path::Path;

use anyhow::{Context, bail};
use plait_bridge::mirror::device::{DeviceLink, KeyBundle};
use plait_bridge::mirror::wire::{Request, Response};
use plait_bridge::mirror::{ChainHead, Checkpoint, SealKey};
use plait_bridge::node::Node;
use plait_bridge::{Identity, Keypair};

use super::batch::{self, What};
use crate::engine::Engine;
use crate::model::{ResourceKey, ResourcePath};
use crate::progress::Progress;

/// The owner's seal key, in a device's data dir.
pub const OWNER_SEAL_KEY_FILE: &str = "owner-seal-key.txt";
/// What a device knows of its owner (no secrets).
pub const DEVICE_FILE: &str = "device.json";

/// What a join did.
#[derive(Debug)]
pub struct Joined {
    pub owner: Identity,
    pub device: Identity,
    pub resources: usize,
    pub segments: u64,
}

/// Refuses an expired link before anything is written.
pub fn check_link(link: &DeviceLink, now_ms: u64) -> anyhow::Result<()> {
    if link.expires_ms <= now_ms {
        bail!(
            "this device link expired {} s ago: make a new one with `plait device link` on the owner",
            (now_ms - link.expires_ms) / 1000
        );
    }
    Ok(())
}

/// Takes the bundle from the link's mirror, opens it and writes the device's keys into
/// `data_dir`. `node` runs as the device (`link.secret.device_key()`) and is a member of
/// the mirror's network.
pub async fn take_keys(
    node: &Node,
    link: &DeviceLink,
    data_dir: &Path,
    now_ms: u64,
) -> anyhow::Result<KeyBundle> {
    let answer = node
        .mirror(
            link.mirror,
            Request::TakeBundle {
                address: link.secret.address(),
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("asking the mirror {} for the device's keys: {e}", link.mirror))?;
    let sealed = match answer {
        Response::Bundle(b) => b,
        Response::Refused(r) => bail!("the mirror refused the link ({}): {r}", r.reason()),
        other => bail!("the mirror answered {other:?}"),
    };
    let bundle = KeyBundle::open(&link.secret, &sealed, now_ms)?;
    if bundle.device_key()?.identity() != link.secret.device_key().identity() {
        bail!("the bundle is for another device than the link's");
    }
    bundle
        .device_seal_key()?
        .save(&data_dir.join(plait_bridge::mirror::SEAL_KEY_FILE))?;
    bundle
        .owner_seal_key()?
        .save(&data_dir.join(OWNER_SEAL_KEY_FILE))?;
    let cert = bundle.cert()?;
    crate::private_file::write_json(
        &data_dir.join(DEVICE_FILE),
        &serde_json::json!({
            "owner": bundle.owner,
            "device": cert.device,
            "certificate": data_encoding::BASE64URL_NOPAD.encode(&cert.to_bytes()),
            "mirrors": bundle.mirrors,
        }),
    )?;
    Ok(bundle)
}

async fn ask(node: &Node, mirror: Identity, req: Request) -> anyhow::Result<Response> {
    let r = node
        .mirror(mirror, req)
        .await
        .map_err(|e| anyhow::anyhow!("asking the mirror {mirror}: {e}"))?;
    if let Response::Refused(r) = &r {
        bail!("the mirror refused ({}): {r}", r.reason());
    }
    Ok(r)
}

/// Restores every resource of `owner`'s namespace that `mirror` holds, sealed to `key`,
/// into `engine`, with progress.
pub async fn restore(
    node: &Node,
    mirror: Identity,
    owner: Identity,
    keys: &[&SealKey],
    engine: &Engine,
) -> anyhow::Result<(usize, ChainHead)> {
    let f = fetch_chain(
        node,
        mirror,
        owner,
        keys,
        engine,
        ChainHead::default(),
        Opening::Every,
    )
    .await?;
    Ok((f.resources, f.head))
}

/// Which of a chain's segments must open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// Every one (a device holds the owner's keys), with progress shown.
    Every,
    /// Those sealed to the keys given; the others are checked and passed over (a reader
    /// of a shared part), quietly.
    Ours,
}

/// What [`fetch_chain`] did.
#[derive(Debug, Clone, Copy)]
pub struct Fetched {
    /// Resources written.
    pub resources: usize,
    /// Where the chain stands now.
    pub head: ChainHead,
    /// Segments (and snapshots) opened.
    pub opened: u64,
}

/// Fetches `owner`'s chain from `mirror` after `from` — its checkpoint's snapshot first
/// when the checkpoint is past `from` (the segments before it are gone) — checks each
/// segment against the owner's signature and chain, opens it with `keys` and applies it
/// to replicas of `/~<owner>/…` in `engine`.
pub async fn fetch_chain(
    node: &Node,
    mirror: Identity,
    owner: Identity,
    keys: &[&SealKey],
    engine: &Engine,
    from: ChainHead,
    opening: Opening,
) -> anyhow::Result<Fetched> {
    let head = match ask(node, mirror, Request::Head { namespace: owner }).await? {
        Response::Head(h) => h,
        other => bail!("the mirror answered {other:?}"),
    };
    let mut done = Fetched {
        resources: 0,
        head: from,
        opened: 0,
    };
    if head.seq <= from.seq {
        return Ok(done);
    }
    let mut progress = (opening == Opening::Every)
        .then(|| Progress::counting("restoring from the mirror", "segments", head.seq));
    let mut touched = std::collections::BTreeSet::new();
    let mut chain = from;
    if let Response::Checkpoint(Some(c)) =
        ask(node, mirror, Request::GetCheckpoint { namespace: owner }).await?
        && c.checkpoint.upto > from.seq
    {
        let ck = &c.checkpoint;
        if ck.namespace != owner
            || !ck.verify_signature()
            || ck.len != c.snapshot.len() as u64
            || &ck.hash != blake3::hash(&c.snapshot).as_bytes()
        {
            bail!("the mirror's checkpoint is not the owner's");
        }
        if apply(engine, owner, &c.snapshot, keys, opening, &mut touched).await? {
            done.opened += 1;
        }
        chain = Checkpoint::chain_head(ck);
        if let Some(p) = progress.as_mut() {
            p.update(ck.upto, c.snapshot.len() as u64);
        }
    }
    let range = |from: u64| async move {
        match ask(
            node,
            mirror,
            Request::Range {
                namespace: owner,
                from,
                to: head.seq,
            },
        )
        .await?
        {
            Response::Segments(l) if l.is_empty() => bail!(
                "the mirror holds no segment {from} though its chain ends at {}",
                head.seq
            ),
            Response::Segments(l) => Ok(l),
            other => bail!("the mirror answered {other:?}"),
        }
    };
    let mut bytes = 0u64;
    let mut list = if chain.seq < head.seq {
        range(chain.seq + 1).await?
    } else {
        Vec::new()
    };
    while !list.is_empty() {
        // The next range is fetched while this one is applied (it is checked only once
        // this one is in: it must follow it).
        let last = list.last().map_or(0, |s| s.descriptor.seq);
        let next = async {
            if last < head.seq {
                range(last + 1).await
            } else {
                Ok(Vec::new())
            }
        };
        let applying = async {
            for s in list {
                let d = &s.descriptor;
                if !s.follows(owner, chain) {
                    bail!(
                        "segment {} from the mirror does not follow the owner's chain",
                        d.seq
                    );
                }
                if apply(engine, owner, &s.ciphertext, keys, opening, &mut touched).await? {
                    done.opened += 1;
                }
                // Only once applied: a failure is fetched again from here.
                chain = ChainHead::of(d);
                done.head = chain;
                bytes += s.ciphertext.len() as u64;
                if let Some(p) = progress.as_mut() {
                    p.update(chain.seq, bytes);
                }
            }
            Ok(())
        };
        let (applied, next) = tokio::join!(applying, next);
        applied?;
        list = next?;
    }
    if let Some(p) = progress {
        p.finish();
    }
    done.head = chain;
    done.resources = touched.len();
    Ok(done)
}

/// Resources of one segment restored at once. The store commits what is waiting
/// together, so a segment of many small resources costs a few commits, not one each.
const RESTORE_CONCURRENCY: usize = 64;

/// Opens one sealed batch and applies its entries to replicas of the owner's resources;
/// `false` if it is not sealed to `keys` and need not be ([`Opening::Ours`]). Each
/// resource's entries are applied in their order; different resources at once (up to
/// [`RESTORE_CONCURRENCY`]). It returns once all of them are applied (or one failed).
async fn apply(
    engine: &Engine,
    owner: Identity,
    ciphertext: &[u8],
    keys: &[&SealKey],
    opening: Opening,
    touched: &mut std::collections::BTreeSet<String>,
) -> anyhow::Result<bool> {
    use futures::{StreamExt, TryStreamExt};
    let plain = match plait_bridge::mirror::open_with(keys, ciphertext) {
        Ok(p) => p,
        Err(plait_bridge::mirror::SealError::NotSealedToUs) if opening == Opening::Ours => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let entries = batch::decode(&plain).map_err(|e| anyhow::anyhow!("a sealed batch: {e}"))?;
    // Each resource's entries, in the batch's order.
    let mut per_resource: Vec<(ResourcePath, Vec<batch::Entry>)> = Vec::new();
    let mut at = std::collections::HashMap::new();
    for e in entries {
        let i = *at.entry(e.path.clone()).or_insert_with(|| {
            per_resource.push((e.path.clone(), Vec::new()));
            per_resource.len() - 1
        });
        per_resource[i].1.push(e);
    }
    for (path, _) in &per_resource {
        touched.insert(path.as_str().to_string());
    }
    // Owned futures (an engine handle and the entries each), so the stream is `Send`.
    let restores = per_resource.into_iter().map(|(path, entries)| {
        let engine = engine.clone();
        async move {
            apply_resource(&engine, ResourceKey::new(owner, path.clone()), &entries)
                .await
                .with_context(|| format!("restoring {}", path.as_str()))
        }
    });
    futures::stream::iter(restores)
        .buffer_unordered(RESTORE_CONCURRENCY)
        .try_collect::<()>()
        .await?;
    Ok(true)
}

/// Applies one resource's entries of a batch, in order: consecutive changes are imported
/// together, a snapshot starts an empty replica (or adds what it lacks), a bytes value
/// is written.
async fn apply_resource(engine: &Engine, rkey: ResourceKey, entries: &[batch::Entry]) -> anyhow::Result<()> {
    let mut i = 0;
    while i < entries.len() {
        let e = &entries[i];
        match e.what {
            What::Change => {
                let mut changes = Vec::new();
                while i < entries.len() && entries[i].what == What::Change {
                    changes.push(entries[i].data.clone());
                    i += 1;
                }
                engine
                    .import(&rkey, e.kind, e.media_type.clone(), changes)
                    .await?;
                continue;
            }
            What::Snapshot => {
                let started = engine
                    .import_snapshot(&rkey, e.kind, e.media_type.clone(), e.data.clone())
                    .await?;
                if !started {
                    // The replica exists: what the snapshot holds that it lacks goes in
                    // as changes (those it holds apply once).
                    let changes = crate::doc::Document::load_automerge(
                        e.kind,
                        Some(e.data.as_ref()),
                        std::iter::empty::<&[u8]>(),
                    )?
                    .export(&[])
                    .into_iter()
                    .map(|c| bytes::Bytes::from(c.bytes))
                    .collect();
                    engine
                        .import(&rkey, e.kind, e.media_type.clone(), changes)
                        .await?;
                }
            }
            What::Value => {
                engine
                    .write(
                        &rkey,
                        crate::engine::Write::internal_value(e.media_type.clone(), e.data.clone()),
                    )
                    .await?;
            }
        }
        i += 1;
    }
    Ok(())
}

/// `plait device join`: see the module doc. `cfg` names the new data dir (and store).
pub async fn join(cfg: &crate::config::Config, link: &str) -> anyhow::Result<Joined> {
    let link: DeviceLink = link.parse()?;
    let now = super::now_ms();
    check_link(&link, now)?;
    let dir = cfg.data_dir();
    let id_file = dir.join(crate::serve::IDENTITY_FILE);
    if id_file.exists() {
        bail!(
            "{} holds an identity already: a device joins into a new data dir",
            dir.display()
        );
    }
    let device = link.secret.device_key();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    device.save(&id_file)?;
    let instance = crate::serve::open_instance(cfg).await?;
    let storage = instance.storage.clone();
    let mut settings = cfg.p2p.clone();
    settings.listen = vec!["/ip4/0.0.0.0/tcp/0".into()];
    let keys = std::sync::Arc::new(Keypair::from_secret_bytes(&device.secret_bytes()));
    let node = Node::start(
        Keypair::from_secret_bytes(&device.secret_bytes()),
        std::sync::Arc::new(crate::p2p::StoredState(storage.clone())),
        settings,
        None,
    )
    .await
    .map_err(|e| anyhow::anyhow!("starting the p2p node: {e}"))?;
    if !node.is_member(&link.mirror) {
        if link.invite.is_empty() {
            bail!("this device is not in the mirror's network and the link carries no invite");
        }
        let p2p = crate::p2p::P2p::new(node.clone(), keys, "http://127.0.0.1:0");
        p2p.join_link(&link.invite)
            .await
            .map_err(|e| anyhow::anyhow!("joining the mirror's network: {e}"))?;
    }
    let bundle = take_keys(&node, &link, &dir, now).await?;
    let engine = Engine::new(
        storage.clone(),
        crate::engine::EngineConfig {
            owner: Some(device.identity()),
            ..cfg.engine_config()
        },
    );
    // What was sealed before the link opens with the owner's key, what was sealed after
    // it with the device's own too.
    let (owner_key, own_key) = (bundle.owner_seal_key()?, bundle.device_seal_key()?);
    let (resources, head) =
        restore(&node, link.mirror, bundle.owner, &[&own_key, &owner_key], &engine).await?;
    // From here on the device follows its owner live, as a reader does.
    super::reader::set_position(storage.as_ref(), bundle.owner, head).await?;
    super::reader::add_follow(&dir, bundle.owner, Some(link.mirror))?;
    Ok(Joined {
        owner: bundle.owner,
        device: device.identity(),
        resources,
        segments: head.seq,
    })
}
