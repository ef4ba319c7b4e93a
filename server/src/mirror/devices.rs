//! The owner's side of devices: `plait device link` makes a device's keys, certifies
//! them, seals them into a bundle to a one-time link secret and leaves the bundle with
//! its mirrors, so that the link works after the owner went away (the design is
//! `plait_bridge::mirror::device`'s).
//!
//! The owner keeps its devices in `devices.json` (0600): each one's recipient (what is
//! sealed from its link on is sealed to it too) and the owner seal key it was handed.
//! `plait device revoke` marks one revoked — later segments are not sealed to it — and,
//! when it holds the owner's current seal key, retires that key (kept as
//! `seal-key-retired-<ms>.txt`, to open older segments) and makes a new one; the owner
//! then tells its mirrors the list of its revoked devices ([`tell_revoked`]), which
//! refuse their pushes from then on.
//!
//! Knows nothing of the admin socket or of how a device uses its keys; the bundle is
//! handed to mirrors through the node's mirror protocol.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use plait_bridge::mirror::device::{DeviceCert, DeviceLink, KeyBundle, LinkSecret};
use plait_bridge::mirror::wire::{Request, Response};
use plait_bridge::mirror::{SealKey, SealRecipient};
use serde::{Deserialize, Serialize};

use super::owner::Seal;
use plait_bridge::node::Node;
use plait_bridge::{Identity, Keypair};

/// A link made, and where its bundle waits.
#[derive(Debug)]
pub struct Linked {
    pub link: DeviceLink,
    /// The new device's identity.
    pub device: Identity,
    /// What the owner records of it (`register`).
    pub entry: DeviceEntry,
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
        entry: DeviceEntry {
            recipient: device_seal.recipient().to_string(),
            owner_key: owner_seal.recipient().to_string(),
            issued_ms: now_ms,
            revoked_ms: None,
        },
        kept_by,
        refused,
    })
}

/// The owner's devices, in its data dir.
pub const DEVICES_FILE: &str = "devices.json";
/// Retired seal keys are kept as `seal-key-retired-<ms>.txt` (they open older segments).
const RETIRED_PREFIX: &str = "seal-key-retired-";

/// Whether `name` is a retired seal key's file name (`seal-key-retired-<ms>.txt`, nothing
/// else: a backup's entries are checked with it).
pub fn is_retired_key_file(name: &str) -> bool {
    name.strip_prefix(RETIRED_PREFIX)
        .and_then(|n| n.strip_suffix(".txt"))
        .is_some_and(|ms| !ms.is_empty() && ms.bytes().all(|b| b.is_ascii_digit()))
}

/// One device of this owner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// The device's own seal key's public half: segments are sealed to it.
    pub recipient: String,
    /// The owner's seal key handed to it (public half): revoking it rotates that key if
    /// it is still the current one.
    pub owner_key: String,
    pub issued_ms: u64,
    #[serde(default)]
    pub revoked_ms: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct DevicesFile {
    devices: BTreeMap<Identity, DeviceEntry>,
}

/// This owner's devices (revoked ones too).
pub fn devices(data_dir: &Path) -> anyhow::Result<BTreeMap<Identity, DeviceEntry>> {
    Ok(crate::private_file::read_json::<DevicesFile>(&data_dir.join(DEVICES_FILE))?.devices)
}

fn save_devices(data_dir: &Path, devices: BTreeMap<Identity, DeviceEntry>) -> anyhow::Result<()> {
    crate::private_file::write_json(&data_dir.join(DEVICES_FILE), &DevicesFile { devices })
}

/// Records a linked device, so that what is sealed from now on is sealed to it too.
pub fn register(data_dir: &Path, device: Identity, entry: DeviceEntry) -> anyhow::Result<()> {
    let mut all = devices(data_dir)?;
    all.insert(device, entry);
    save_devices(data_dir, all)
}

/// The owner's keys as its data dir holds them: `seal-key.txt` (made if missing), the
/// retired keys, and the recipients of the devices not revoked.
pub fn load_seal(data_dir: &Path) -> anyhow::Result<Seal> {
    let current = SealKey::load_or_create(&data_dir.join(plait_bridge::mirror::SEAL_KEY_FILE))?;
    let mut retired = Vec::new();
    for e in std::fs::read_dir(data_dir).with_context(|| format!("reading {}", data_dir.display()))? {
        let path = e?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(is_retired_key_file)
        {
            retired.push(SealKey::load_or_create(&path)?);
        }
    }
    let mut recipients = Vec::new();
    for (id, d) in devices(data_dir)? {
        if d.revoked_ms.is_none() {
            recipients.push(
                d.recipient
                    .parse::<SealRecipient>()
                    .map_err(|e| anyhow::anyhow!("device {id}'s recipient in {DEVICES_FILE}: {e}"))?,
            );
        }
    }
    Ok(Seal {
        current,
        retired,
        devices: recipients,
    })
}

/// Revokes `device`: nothing sealed from now on is sealed to it and, if it holds the
/// owner's current seal key, that key is retired (kept, to open older segments) and a
/// new one made. `true` if the key was rotated.
pub fn revoke(data_dir: &Path, device: Identity, now_ms: u64) -> anyhow::Result<bool> {
    let mut all = devices(data_dir)?;
    let entry = all
        .get_mut(&device)
        .ok_or_else(|| anyhow::anyhow!("{device} is not a device of this owner"))?;
    entry.revoked_ms.get_or_insert(now_ms);
    let given = entry.owner_key.clone();
    save_devices(data_dir, all)?;
    let key_file = data_dir.join(plait_bridge::mirror::SEAL_KEY_FILE);
    let current = SealKey::load_or_create(&key_file)?;
    if current.recipient().to_string() != given {
        return Ok(false);
    }
    let retired = data_dir.join(format!("{RETIRED_PREFIX}{now_ms}.txt"));
    std::fs::rename(&key_file, &retired).with_context(|| format!("retiring {}", key_file.display()))?;
    SealKey::load_or_create(&key_file)?;
    Ok(true)
}

/// The devices an owner tells its mirrors it revoked: every revoked one, the latest
/// revoked first when there are more than the protocol carries.
pub fn revoked(devices: &BTreeMap<Identity, DeviceEntry>) -> Vec<Identity> {
    let mut list: Vec<(u64, Identity)> = devices
        .iter()
        .filter_map(|(id, d)| d.revoked_ms.map(|ms| (ms, *id)))
        .collect();
    list.sort_by(|a, b| b.cmp(a));
    list.into_iter()
        .take(plait_bridge::mirror::wire::MAX_REVOKED_DEVICES)
        .map(|(_, id)| id)
        .collect()
}

/// Tells `mirror` which of this owner's devices are revoked (the whole list, which
/// replaces the one it held), so that it refuses their pushes; answers how many it keeps.
pub async fn tell_revoked(node: &Node, mirror: Identity, revoked: Vec<Identity>) -> Result<u64, String> {
    match node.mirror(mirror, Request::RevokedDevices(revoked)).await {
        Ok(Response::Stored { seq }) => Ok(seq),
        Ok(Response::Refused(r)) => Err(super::owner::refusal_text(&r)),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_revoked_list_is_every_revoked_device_latest_first() {
        let entry = |revoked_ms| DeviceEntry {
            recipient: String::new(),
            owner_key: String::new(),
            issued_ms: 1,
            revoked_ms,
        };
        let ids: Vec<Identity> = (0..4).map(|_| Keypair::generate().identity()).collect();
        let all: BTreeMap<Identity, DeviceEntry> = [
            (ids[0], entry(Some(5))),
            (ids[1], entry(None)),
            (ids[2], entry(Some(9))),
            (ids[3], entry(Some(7))),
        ]
        .into();
        assert_eq!(revoked(&all), vec![ids[2], ids[3], ids[0]]);

        let many: BTreeMap<Identity, DeviceEntry> =
            (0..plait_bridge::mirror::wire::MAX_REVOKED_DEVICES as u64 + 2)
                .map(|ms| (Keypair::generate().identity(), entry(Some(ms))))
                .collect();
        let told = revoked(&many);
        assert_eq!(told.len(), plait_bridge::mirror::wire::MAX_REVOKED_DEVICES);
        assert!(
            told.iter().all(|id| many[id].revoked_ms >= Some(2)),
            "the oldest two left out"
        );
    }

    #[test]
    fn a_retired_key_file_is_named_by_its_time_and_nothing_else() {
        assert!(is_retired_key_file("seal-key-retired-1733300000000.txt"));
        for odd in [
            "seal-key-retired-.txt",
            "seal-key-retired-12.txt.tmp",
            "seal-key-retired-../../etc/x.txt",
            "seal-key-retired-1/2.txt",
            "seal-key.txt",
            "identity.pem",
        ] {
            assert!(!is_retired_key_file(odd), "{odd}");
        }
    }
}
