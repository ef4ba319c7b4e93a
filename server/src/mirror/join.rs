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
//! owner — the checkpoint's snapshot first, then the segments after it — is fetched,
//! checked and applied ([`super::fetch`], every segment opening). `plait serve` on the
//! data dir then serves them, and follows the owner's chain from where the join stopped
//! ([`super::reader`]).
//!
//! Knows nothing of HTTP; the mirror is reached through the node's mirror protocol.

use std::path::Path;

use anyhow::{Context, bail};
use plait_bridge::mirror::device::{DeviceLink, KeyBundle};
use plait_bridge::mirror::wire::{Request, Response};
use plait_bridge::mirror::{ChainHead, SealKey};
use plait_bridge::node::Node;
use plait_bridge::{Identity, Keypair};

use super::fetch::{Opening, fetch_chain};
use crate::engine::Engine;

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
