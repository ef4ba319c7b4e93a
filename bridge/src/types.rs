//! The types the node and its memberships share: the node's settings, what it reports
//! (status, member listings), the grant an inviter hands an invitee, the node's errors, the
//! [`Serve`] trait the server answers members with, the limits of the fetch protocol, and
//! the mapping from identities to libp2p keys.
//!
//! Both [`crate::node`] (the handle the server holds) and the memberships it runs (one
//! swarm per DHT) use these; this module depends on neither, so neither depends on the
//! other through it. It knows nothing of swarms, of how state is kept, of HTTP or SQL.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libp2p::PeerId;
use libp2p::multiaddr::Protocol;
use serde::{Deserialize, Serialize};

pub use libp2p::Multiaddr;

use crate::identity::{Identity, Keypair};
use crate::invite::{Invite, InviteError, MemberCert, Removal};

/// Settings of the node (named, with defaults, published by the server).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSettings {
    /// Whether the node runs at all (`plait serve --no-p2p` turns it off).
    pub enabled: bool,
    /// Multiaddrs to listen on (`--p2p-listen`, repeatable).
    pub listen: Vec<String>,
    /// The DHT a node creates when it makes its first invite without having joined one.
    pub dht: String,
    /// Established connections in all.
    pub max_connections: u32,
    /// Established connections per peer.
    pub max_connections_per_peer: u32,
    /// How long a published address record lives.
    pub record_ttl_secs: u64,
    /// How often the node republishes its record.
    pub republish_secs: u64,
    /// Records this node holds for others, at most.
    pub max_records: usize,
    /// How long a lookup may take.
    pub query_timeout_secs: u64,
    /// Members to be reachable through, for a node that others cannot dial (behind NAT):
    /// multiaddrs ending in `/p2p/<peer id>` (`--p2p-relay`, repeatable). The node keeps a
    /// reservation on each, publishes the relayed addresses in its record, and upgrades
    /// relayed connections to direct ones by hole punching (DCUtR) where the NATs allow.
    pub relays: Vec<String>,
    /// Whether this node relays for members (only members can connect to it at all).
    pub relay_server: bool,
    /// Relayed connections this node carries at once.
    pub relay_max_circuits: usize,
    /// How long one relayed connection may last before the relay closes it (the ends
    /// then reconnect).
    pub relay_max_circuit_secs: u64,
    /// Bytes one relayed connection may carry before the relay closes it.
    pub relay_max_circuit_bytes: u64,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            enabled: true,
            listen: vec![
                "/ip4/0.0.0.0/tcp/7525".into(),
                "/ip4/0.0.0.0/udp/7525/quic-v1".into(),
            ],
            dht: "plait".into(),
            max_connections: 256,
            max_connections_per_peer: 4,
            record_ttl_secs: 24 * 3600,
            republish_secs: 3600,
            max_records: 4096,
            query_timeout_secs: 10,
            relays: Vec::new(),
            relay_server: true,
            relay_max_circuits: 64,
            relay_max_circuit_secs: 3600,
            relay_max_circuit_bytes: 1 << 30,
        }
    }
}

impl NodeSettings {
    /// Refuses settings the node could not use, saying which and why.
    pub fn check(&self) -> Result<(), String> {
        check_dht_name(&self.dht).map_err(|e| format!("p2p dht: {e}"))?;
        for a in &self.listen {
            a.parse::<Multiaddr>()
                .map_err(|e| format!("p2p listen address {a:?} is not a multiaddr: {e}"))?;
        }
        for r in &self.relays {
            let ends_in_peer = r
                .parse::<Multiaddr>()
                .is_ok_and(|a| matches!(a.iter().last(), Some(Protocol::P2p(_))));
            if !ends_in_peer {
                return Err(format!(
                    "p2p relay {r:?} must be a multiaddr ending in /p2p/<peer id>"
                ));
            }
        }
        Ok(())
    }
}

/// Longest DHT name.
pub const MAX_DHT_NAME: usize = 64;

/// A DHT name is part of a protocol name and of every record key: 1 to
/// [`MAX_DHT_NAME`] characters of lowercase ASCII letters, digits, `-` and `_`.
pub fn check_dht_name(name: &str) -> Result<(), String> {
    let ok = (1..=MAX_DHT_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a DHT name (1 to {MAX_DHT_NAME} of a-z, 0-9, - and _)"
        ))
    }
}

/// What the node reports about itself: each membership, and the sums over them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub peer_id: String,
    /// Addresses the node listens on (all memberships').
    pub listen: Vec<String>,
    /// The DHTs it belongs to (none until it makes an invite or joins).
    pub dhts: Vec<DhtStatus>,
    /// Over all its DHTs (a member of several counted once).
    #[serde(flatten)]
    pub peers: Peers,
}

/// One membership.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DhtStatus {
    /// The DHT's name (`None` for a swarm that has joined nothing yet).
    pub dht: Option<String>,
    /// Addresses this membership listens on.
    pub listen: Vec<String>,
    pub root: Option<Identity>,
    #[serde(flatten)]
    pub peers: Peers,
}

/// Members, connections and records: of one membership, or summed over a node's.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Peers {
    pub members: usize,
    /// Who they are.
    pub member_ids: Vec<Identity>,
    /// Members connected now.
    pub connected: Vec<Identity>,
    /// Of those, the ones with a direct connection (not only one through a relay).
    pub direct: Vec<Identity>,
    /// Connections to anyone (members, and peers dialled by hand that have not yet hung up).
    pub connected_peers: usize,
    /// Address records held for others.
    pub records_held: usize,
    /// Records offered to this node and refused (unsigned, forged, stale, oversize...).
    pub records_refused: u64,
}

impl Peers {
    /// The sums over several memberships; a member of several is counted once.
    pub(crate) fn sum<'a>(all: impl Iterator<Item = &'a Peers> + Clone) -> Peers {
        let union = |f: fn(&Peers) -> &Vec<Identity>| {
            let mut ids: Vec<Identity> = all.clone().flat_map(|p| f(p).iter().copied()).collect();
            ids.sort();
            ids.dedup();
            ids
        };
        let member_ids = union(|p| &p.member_ids);
        Peers {
            members: member_ids.len(),
            member_ids,
            connected: union(|p| &p.connected),
            direct: union(|p| &p.direct),
            connected_peers: all.clone().map(|p| p.connected_peers).sum(),
            records_held: all.clone().map(|p| p.records_held).sum(),
            records_refused: all.map(|p| p.records_refused).sum(),
        }
    }
}

/// What a node answers when a member fetches from it: the server implements this (the
/// bridge carries opaque bytes and knows nothing of documents). `path` names what is
/// asked for; `body` is the asker's request, the answer is the server's reply.
pub trait Serve: Send + Sync + 'static {
    fn fetch(
        &self,
        from: Identity,
        path: String,
        body: Vec<u8>,
    ) -> futures::future::BoxFuture<'static, Result<Vec<u8>, String>>;

    /// Answers a member's request to this node's mirror (`/plait/mirror/1.0.0`). A server
    /// that keeps no mirror refuses, which is the default.
    fn mirror(
        &self,
        from: Identity,
        req: crate::mirror::wire::Request,
    ) -> futures::future::BoxFuture<'static, crate::mirror::wire::Response> {
        let _ = (from, req);
        Box::pin(async {
            crate::mirror::wire::Response::Refused(crate::mirror::Refusal::Unavailable(
                "this node keeps no mirror".into(),
            ))
        })
    }
}

/// Largest fetch frame (base64 inside JSON): servers keep answers well below it.
pub const MAX_FETCH_BYTES: u64 = 64 << 20;

/// How long a fetch may take (a server may hold a fetch open until it has news).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// What an inviter hands an admitted invitee.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinGrant {
    pub dht: String,
    pub root: Identity,
    /// Every member cert the inviter holds (the invitee's among them).
    pub certs: Vec<MemberCert>,
    /// Bootstrap peer: the inviter and its addresses.
    pub inviter: Identity,
    pub inviter_addrs: Vec<String>,
    /// The members removed from the DHT (so the invitee never takes them for members).
    #[serde(default)]
    pub removed: Vec<Removal>,
}

impl JoinGrant {
    /// Checks, on the invitee's side, that this grant answers `invite` and admits `me`:
    /// same DHT and root, the inviter the link names, and among the certs one for `me`
    /// signed by that inviter. The grant travels over plain HTTP: this is what makes it
    /// the inviter's word (the link's signature was checked when it was read).
    pub fn check(&self, invite: &Invite, me: &Identity) -> Result<(), GrantError> {
        if self.dht != invite.dht {
            return Err(GrantError::OtherDht {
                invite: invite.dht.clone(),
                grant: self.dht.clone(),
            });
        }
        if self.root != invite.root {
            return Err(GrantError::OtherRoot(self.root.to_string()));
        }
        if self.inviter != invite.inviter {
            return Err(GrantError::OtherInviter {
                invite: invite.inviter.to_string(),
                grant: self.inviter.to_string(),
            });
        }
        let signed = self.certs.iter().any(|c| {
            c.member == *me && c.by == invite.inviter && c.dht == invite.dht && c.check_signature().is_ok()
        });
        if !signed {
            return Err(GrantError::NotSigned(invite.inviter.to_string()));
        }
        Ok(())
    }
}

/// Why an invitee does not take a grant (identities in their text form).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrantError {
    #[error("the grant is for DHT {grant:?}, the invite for {invite:?}")]
    OtherDht { invite: String, grant: String },
    #[error("the grant names another root ({0}) than the invite")]
    OtherRoot(String),
    #[error("the grant comes from {grant}, not from the inviter the link names ({invite})")]
    OtherInviter { invite: String, grant: String },
    #[error("the grant holds no cert for this node signed by the inviter the link names ({0})")]
    NotSigned(String),
}

/// One DHT's members as `plait members` shows them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DhtMembers {
    pub dht: String,
    pub root: Identity,
    pub members: Vec<MemberInfo>,
    /// Members removed from it, for good.
    pub removed: Vec<RemovedInfo>,
}

/// One member of a DHT.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: Identity,
    /// Who admitted it (`None` for the root).
    pub admitted_by: Option<Identity>,
    pub admitted_at: Option<u64>,
    /// This node itself.
    pub this_node: bool,
    pub connected: bool,
    /// Over at least one direct connection (not only through a relay).
    pub direct: bool,
}

/// One removed member.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemovedInfo {
    pub id: Identity,
    pub removed_by: Identity,
    pub at: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Invite(#[from] InviteError),
    #[error("{0}")]
    Refused(String),
    #[error("{0} was not found in the DHT")]
    NotFound(String),
    #[error("the node has stopped")]
    Stopped,
    #[error("cannot reach {0}")]
    Unreachable(String),
    #[error("the inviter's answer does not hold: {0}")]
    Grant(#[from] GrantError),
    #[error("this node is not a member of DHT {0:?}")]
    NotInDht(String),
    #[error("{0} is not a member of any of this node's networks")]
    NotMember(String),
    #[error("{0}")]
    Io(String),
}
/// The libp2p key of an instance key.
pub fn libp2p_keypair(keys: &Keypair) -> libp2p::identity::Keypair {
    libp2p::identity::Keypair::ed25519_from_bytes(keys.secret_bytes()).expect("an ed25519 secret is 32 bytes")
}

/// The `PeerId` of an identity.
pub fn peer_id_of(id: &Identity) -> PeerId {
    let pk = libp2p::identity::ed25519::PublicKey::try_from_bytes(id.as_bytes())
        .expect("identities are ed25519 keys");
    libp2p::identity::PublicKey::from(pk).to_peer_id()
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invite::Membership;

    #[test]
    fn a_grant_is_taken_only_from_the_inviter_the_link_names() {
        use crate::invite::{Invite, InviteError, JoinRequest};
        let (a, b, x) = (Keypair::generate(), Keypair::generate(), Keypair::generate());
        let make = |k: &Keypair, root: Identity| {
            Invite::new(
                k,
                "plait",
                root,
                vec![],
                "http://a.example/join".into(),
                u64::MAX,
                1,
            )
        };
        let inv = make(&a, a.identity());
        let mut m = Membership::new("plait", a.identity());
        m.admit(&a, &JoinRequest::new(inv.clone(), &b, vec![]), 1)
            .unwrap();
        let grant = JoinGrant {
            dht: "plait".into(),
            root: a.identity(),
            certs: m.certs(),
            inviter: a.identity(),
            inviter_addrs: vec![],
            removed: vec![],
        };
        assert_eq!(grant.check(&inv, &b.identity()), Ok(()));

        // A link re-signed by another key, or naming another inviter, is refused when read.
        let mut resigned = make(&x, a.identity());
        resigned.inviter = a.identity();
        assert_eq!(
            Invite::from_link(&resigned.to_link()),
            Err(InviteError::BadInvite(a.identity().to_string()))
        );
        let mut swapped = inv.clone();
        swapped.inviter = x.identity();
        assert_eq!(
            Invite::from_link(&swapped.to_link()),
            Err(InviteError::BadInvite(x.identity().to_string()))
        );

        // A grant from another network of the same name, or naming another inviter.
        let mut theirs = Membership::new("plait", x.identity());
        theirs
            .admit(&x, &JoinRequest::new(make(&x, x.identity()), &b, vec![]), 1)
            .unwrap();
        let other = JoinGrant {
            root: x.identity(),
            certs: theirs.certs(),
            inviter: x.identity(),
            ..grant.clone()
        };
        assert_eq!(
            other.check(&inv, &b.identity()),
            Err(GrantError::OtherRoot(x.identity().to_string()))
        );
        let named = JoinGrant {
            inviter: x.identity(),
            ..grant.clone()
        };
        assert!(matches!(
            named.check(&inv, &b.identity()),
            Err(GrantError::OtherInviter { .. })
        ));
        // The right names, but the cert is signed by another key (or claims A's name).
        let mut forged = crate::invite::MemberCert::new(&x, "plait", b.identity(), 1);
        let by_x = JoinGrant {
            certs: vec![forged.clone()],
            ..grant.clone()
        };
        assert_eq!(
            by_x.check(&inv, &b.identity()),
            Err(GrantError::NotSigned(a.identity().to_string()))
        );
        forged.by = a.identity();
        let claimed = JoinGrant {
            certs: vec![forged],
            ..grant.clone()
        };
        assert_eq!(
            claimed.check(&inv, &b.identity()),
            Err(GrantError::NotSigned(a.identity().to_string()))
        );
        // A true grant, but for another node.
        assert_eq!(
            grant.check(&inv, &x.identity()),
            Err(GrantError::NotSigned(a.identity().to_string()))
        );
    }

    #[test]
    fn dht_names_are_checked() {
        for good in ["plait", "friends-2", "a_b", &"x".repeat(MAX_DHT_NAME)] {
            assert!(check_dht_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Plait",
            "a/b",
            "a b",
            "../x",
            "ü",
            &"x".repeat(MAX_DHT_NAME + 1),
        ] {
            assert!(check_dht_name(bad).is_err(), "{bad}");
        }
        let settings = NodeSettings {
            dht: "no/slash".into(),
            ..NodeSettings::default()
        };
        assert!(settings.check().unwrap_err().contains("not a DHT name"));
    }
}
