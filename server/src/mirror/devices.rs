//! The owner's side of devices: `plait device link` makes a device's keys, certifies
//! them, seals them into a bundle to a one-time link secret and leaves the bundle with
//! its mirrors, so that the link works after the owner went away (the design is
//! `plait_bridge::mirror::device`'s).
//!
//! Knows nothing of the admin socket or of how a device uses its keys; the bundle is
//! handed to mirrors through the node's mirror protocol.

use plait_bridge::mirror::SealKey;
use plait_bridge::mirror::device::{DeviceCert, DeviceLink, KeyBundle, LinkSecret};
use plait_bridge::mirror::wire::{Request, Response};
use plait_bridge::node::Node;
use plait_bridge::{Identity, Keypair};

/// A link made, and where its bundle waits.
#[derive(Debug)]
pub struct Linked {
    pub link: DeviceLink,
    /// The new device's identity.
    pub device: Identity,
    /// The mirrors holding the bundle.
    pub kept_by: Vec<Identity>,
    /// Mirrors that refused it, with why.
    pub refused: Vec<(Identity, String)>,
}

/// Makes a device of `owner` and leaves its sealed bundle with each of `mirrors` (at
/// least one must keep it) until it is taken or `ttl_secs` pass. `invite` is a mirror's
/// invite link for a device not yet in the mirror's network (without one, the mirror
/// keeping the bundle is asked for one); it travels in the link.
pub async fn link(
    node: &Node,
    owner: &Keypair,
    owner_seal: &SealKey,
    mirrors: Vec<Identity>,
    ttl_secs: u64,
    invite: Option<String>,
    now_ms: u64,
) -> Result<Linked, String> {
    if mirrors.is_empty() {
        return Err("this server has no mirror to leave the device's keys with (`plait mirror add`)".into());
    }
    if ttl_secs == 0 {
        return Err("a link must live at least a second".into());
    }
    let secret = LinkSecret::generate();
    let device = secret.device_key();
    let device_seal = SealKey::generate();
    let cert = DeviceCert::sign(owner, device.identity(), now_ms, 0);
    let bundle = KeyBundle::new(&cert, &device, &device_seal, owner_seal, mirrors.clone());
    let sealed = bundle.seal(&secret).map_err(|e| e.to_string())?;
    let expires_ms = now_ms.saturating_add(ttl_secs.saturating_mul(1000));
    let (mut kept_by, mut refused) = (Vec::new(), Vec::new());
    for m in mirrors {
        let req = Request::PutBundle {
            address: secret.address(),
            expires_ms,
            sealed: sealed.clone(),
        };
        match node.mirror(m, req).await {
            Ok(Response::Stored { .. }) => kept_by.push(m),
            Ok(Response::Refused(r)) => refused.push((m, format!("{}: {r}", r.reason()))),
            Ok(other) => refused.push((m, format!("unexpected answer {other:?}"))),
            Err(e) => refused.push((m, e.to_string())),
        }
    }
    let Some(&mirror) = kept_by.first() else {
        let why: Vec<String> = refused.iter().map(|(m, r)| format!("{m}: {r}")).collect();
        return Err(format!("no mirror kept the device's keys: {}", why.join("; ")));
    };
    // Without an invite given, the mirror keeping the bundle makes one (it does for the
    // owners it granted storage).
    let invite = match invite {
        Some(i) => i,
        None => match node.mirror(mirror, Request::Invite { ttl_secs }).await {
            Ok(Response::Invite(link)) => link,
            Ok(Response::Refused(r)) => {
                return Err(format!(
                    "the mirror {mirror} made no invite for the device ({}: {r}); give one with --invite",
                    r.reason()
                ));
            }
            Ok(other) => return Err(format!("the mirror {mirror} answered {other:?}")),
            Err(e) => return Err(format!("asking the mirror {mirror} for an invite: {e}")),
        },
    };
    Ok(Linked {
        link: DeviceLink {
            mirror,
            secret,
            expires_ms,
            invite,
        },
        device: device.identity(),
        kept_by,
        refused,
    })
}
