//! The libp2p node: this instance on the peer-to-peer network, a member of any number of
//! named, invite-only DHTs at once.
//!
//! Each membership is its own swarm ([`crate::dht`]), keyed by the same instance key (so
//! the node has one `PeerId` everywhere) and gated to that DHT's members, so a member of one
//! network never reaches another through this node. The first membership listens on
//! `settings.listen`; each further one on the same addresses with ports of its own, chosen
//! once and kept. [`Node`] is the handle the server holds: it sends each request to the
//! membership it concerns (an invite to the DHT it names, a join to the DHT of its invite, a
//! fetch to a DHT the target belongs to) and sums up their status.
//!
//! **State** (each membership's members, held records, known peer addresses and ports) is
//! kept through a [`StateStore`] the server gives, so a restarted node rejoins at once.
//!
//! It knows nothing of HTTP, SQL or documents.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use libp2p::PeerId;
use libp2p::multiaddr::Protocol;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use libp2p::Multiaddr;

use crate::dht::{Dht, DhtState, Start};
use crate::identity::{Identity, Keypair};
use crate::invite::{Invite, InviteError, JoinRequest, MemberCert, Removal};
use crate::record::AddressRecord;

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
    fn sum<'a>(all: impl Iterator<Item = &'a Peers> + Clone) -> Peers {
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
/// The handle to a running node: its memberships, and what starting another needs.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

struct Inner {
    keys: Keypair,
    settings: NodeSettings,
    server: Option<Arc<dyn Serve>>,
    saves: mpsc::UnboundedSender<SaveJob>,
    /// Memberships by slot; at most one of them has joined nothing yet.
    slots: tokio::sync::Mutex<Vec<Slot>>,
    /// A copy for the synchronous readers (`status`, `is_member`).
    seen: Mutex<Vec<Dht>>,
}

struct Slot {
    dht: Dht,
    /// The DHT a swarm that has joined nothing speaks (and is set aside for, while a join
    /// or the invite that makes it is under way).
    speaks: String,
}

impl Node {
    /// Starts the node: one membership per DHT in `store` (or, on a fresh node, a swarm
    /// ready to make or join one, listening on `settings.listen`). `server` answers other
    /// members' fetches (none: this node only asks).
    pub async fn start(
        keys: Keypair,
        store: Arc<dyn StateStore>,
        settings: NodeSettings,
        server: Option<Arc<dyn Serve>>,
    ) -> Result<Node, NodeError> {
        settings.check().map_err(NodeError::Refused)?;
        let mut persisted = Persisted::from_bytes(store.load().await.map_err(NodeError::Io)?);
        if persisted.dhts.is_empty() {
            persisted.dhts.push(DhtState::default());
        }
        let (saves, save_rx) = mpsc::unbounded_channel();
        let initial = persisted
            .dhts
            .iter()
            .map(|d| serde_json::to_value(d).expect("serializes"))
            .collect();
        tokio::spawn(saver(store, initial, save_rx));
        let node = Node {
            inner: Arc::new(Inner {
                keys,
                settings,
                server,
                saves,
                slots: tokio::sync::Mutex::new(Vec::new()),
                seen: Mutex::new(Vec::new()),
            }),
        };
        {
            let mut slots = node.inner.slots.lock().await;
            for state in persisted.dhts {
                let speaks = state
                    .membership
                    .as_ref()
                    .map_or(node.inner.settings.dht.clone(), |m| m.dht.clone());
                let slot = node.start_slot(slots.len(), speaks, state)?;
                slots.push(slot);
            }
            node.publish(&slots);
        }
        Ok(node)
    }

    fn start_slot(&self, slot: usize, speaks: String, state: DhtState) -> Result<Slot, NodeError> {
        let i = &self.inner;
        let dht = Dht::start(Start {
            keys: Keypair::from_secret_bytes(&i.keys.secret_bytes()),
            settings: i.settings.clone(),
            dht: speaks.clone(),
            slot,
            state,
            saves: i.saves.clone(),
            server: i.server.clone(),
        })?;
        Ok(Slot { dht, speaks })
    }

    fn publish(&self, slots: &[Slot]) {
        *self.inner.seen.lock().expect("seen") = slots.iter().map(|s| s.dht.clone()).collect();
    }

    fn memberships(&self) -> Vec<Dht> {
        self.inner.seen.lock().expect("seen").clone()
    }

    /// The membership of DHT `name`: the one that has it, else the swarm that has joined
    /// nothing (restarted to speak `name` if it speaks another), else a new swarm on ports
    /// of its own. `create: false` only looks.
    async fn membership(&self, name: &str, create: bool) -> Result<Dht, NodeError> {
        let mut slots = self.inner.slots.lock().await;
        if let Some(s) = slots.iter().find(|s| s.dht.name().as_deref() == Some(name)) {
            return Ok(s.dht.clone());
        }
        if !create {
            return Err(NodeError::NotInDht(name.to_string()));
        }
        check_dht_name(name).map_err(NodeError::Refused)?;
        let fresh = slots.iter().position(|s| s.dht.name().is_none());
        let dht = match fresh {
            Some(n) if slots[n].speaks == name => slots[n].dht.clone(),
            Some(n) => {
                // Kademlia's protocol name carries the DHT's name: a swarm for this one.
                slots[n].dht.stop().await;
                let state = DhtState {
                    listen: (n > 0).then(|| self.own_ports()),
                    ..DhtState::default()
                };
                slots[n] = self.start_slot(n, name.to_string(), state)?;
                slots[n].dht.clone()
            }
            None => {
                let state = DhtState {
                    listen: Some(self.own_ports()),
                    ..DhtState::default()
                };
                let slot = self.start_slot(slots.len(), name.to_string(), state)?;
                let dht = slot.dht.clone();
                slots.push(slot);
                dht
            }
        };
        self.publish(&slots);
        drop(slots);
        // Invites and join requests carry its addresses.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while dht.status().listen.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(dht)
    }

    /// `settings.listen` with the ports left to the system (a further membership's).
    fn own_ports(&self) -> Vec<String> {
        self.inner
            .settings
            .listen
            .iter()
            .filter_map(|a| a.parse::<Multiaddr>().ok())
            .map(|a| {
                a.iter()
                    .map(|p| match p {
                        Protocol::Tcp(_) => Protocol::Tcp(0),
                        Protocol::Udp(_) => Protocol::Udp(0),
                        other => other,
                    })
                    .collect::<Multiaddr>()
                    .to_string()
            })
            .collect()
    }

    pub fn identity(&self) -> Identity {
        self.inner.keys.identity()
    }

    pub fn status(&self) -> Status {
        let all: Vec<DhtStatus> = self.memberships().iter().map(Dht::status).collect();
        Status {
            peer_id: peer_id_of(&self.identity()).to_string(),
            listen: all.iter().flat_map(|d| d.listen.iter().cloned()).collect(),
            peers: Peers::sum(all.iter().map(|d| &d.peers)),
            dhts: all.into_iter().filter(|d| d.dht.is_some()).collect(),
        }
    }

    /// Makes an invite to DHT `dht`, or (`None`) to the one DHT this node belongs to, or to
    /// `settings.dht` when it belongs to none or several. A DHT this node is not a member
    /// of is created, with this node as its root. Invitees present it at `join_url`.
    pub async fn invite(
        &self,
        dht: Option<String>,
        join_url: String,
        ttl_secs: u64,
        uses: u32,
    ) -> Result<Invite, NodeError> {
        let joined: Vec<String> = self.memberships().iter().filter_map(Dht::name).collect();
        let name = match (dht, joined.as_slice()) {
            (Some(d), _) => d,
            (None, [only]) => only.clone(),
            (None, _) => self.inner.settings.dht.clone(),
        };
        self.membership(&name, true)
            .await?
            .invite(name, join_url, ttl_secs, uses)
            .await
    }

    /// Inviter side: admits the sender of `req` if its invite is one of ours and valid.
    pub async fn admit(&self, req: JoinRequest) -> Result<JoinGrant, NodeError> {
        match self.membership(&req.invite.dht, false).await {
            Ok(m) => m.admit(req).await,
            Err(_) => Err(NodeError::Invite(InviteError::NotMine)),
        }
    }

    /// Invitee side, before presenting `invite`: a join request signed with `keys`,
    /// carrying the addresses of the membership that will join (started now if need be).
    pub async fn join_request(&self, keys: &Keypair, invite: Invite) -> Result<JoinRequest, NodeError> {
        let m = self.membership(&invite.dht, true).await?;
        Ok(JoinRequest::new(invite, keys, m.status().listen))
    }

    /// Invitee side: takes the grant (members, bootstrap peer) that answers `invite`, once
    /// it checks ([`JoinGrant::check`]: nothing is stored or dialled otherwise), and
    /// connects to the inviter the link names.
    pub async fn joined(&self, invite: &Invite, grant: JoinGrant) -> Result<(), NodeError> {
        invite.check_signature()?;
        grant.check(invite, &self.identity())?;
        self.membership(&grant.dht, true).await?.joined(grant).await?;
        let slots = self.inner.slots.lock().await;
        self.publish(&slots);
        Ok(())
    }

    /// Every DHT's members, who admitted them and how they are connected.
    pub async fn members(&self) -> Result<Vec<DhtMembers>, NodeError> {
        let mut all = Vec::new();
        for d in self.memberships() {
            if d.name().is_some()
                && let Some(m) = d.members().await?
            {
                all.push(m);
            }
        }
        Ok(all)
    }

    /// Removes `id` from DHT `dht`, or (`None`) from every DHT of this node it belongs to:
    /// its connections here close at once, the gate refuses it from then on, and the
    /// removal, signed by this node, goes to the other members. Answers the DHTs it was
    /// removed from.
    pub async fn remove(&self, id: Identity, dht: Option<String>) -> Result<Vec<String>, NodeError> {
        let targets: Vec<Dht> = match &dht {
            Some(name) => vec![self.membership(name, false).await?],
            None => self
                .memberships()
                .into_iter()
                .filter(|d| d.name().is_some() && d.is_member(&id))
                .collect(),
        };
        if targets.is_empty() {
            // Say why: removed already somewhere, or a member nowhere.
            for d in self.memberships().into_iter().filter(|d| d.name().is_some()) {
                if let Err(e @ NodeError::Invite(InviteError::Removed(_))) = d.remove(id).await {
                    return Err(e);
                }
            }
            return Err(NodeError::NotMember(id.to_string()));
        }
        let mut from = Vec::new();
        for d in targets {
            from.push(d.remove(id).await?);
        }
        Ok(from)
    }

    /// The memberships `id` belongs to first (connected ones before the others), then the
    /// rest of this node's DHTs.
    fn ask_order(&self, id: &Identity) -> Vec<Dht> {
        let mut all: Vec<(u8, Dht)> = self
            .memberships()
            .into_iter()
            .filter(|d| d.name().is_some())
            .map(|d| {
                let s = d.status();
                let rank = if s.peers.connected.contains(id) {
                    0
                } else if s.peers.member_ids.contains(id) {
                    1
                } else {
                    2
                };
                (rank, d)
            })
            .collect();
        all.sort_by_key(|(rank, _)| *rank);
        all.into_iter().map(|(_, d)| d).collect()
    }

    /// Looks `id` up (in the DHTs it belongs to first, checking the record) and dials it.
    pub async fn resolve(&self, id: Identity) -> Result<AddressRecord, NodeError> {
        let mut last = NodeError::Refused("this node has joined no DHT".into());
        for d in self.ask_order(&id) {
            match d.resolve(id).await {
                Ok(r) => return Ok(r),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Dials an address (through the membership its peer belongs to, if the address names
    /// one); answers with the identity that answered.
    pub async fn connect(&self, addr: Multiaddr) -> Result<Identity, NodeError> {
        let named = match addr.iter().last() {
            Some(Protocol::P2p(pid)) => self
                .memberships()
                .into_iter()
                .find(|d| d.status().peers.member_ids.iter().any(|m| peer_id_of(m) == pid)),
            _ => None,
        };
        let d = match named {
            Some(d) => d,
            None => self.memberships().into_iter().next().ok_or(NodeError::Stopped)?,
        };
        d.connect(addr).await
    }

    /// Asks the member `id` for `path` (through a DHT it belongs to, finding it there if
    /// need be) and waits for its answer.
    pub async fn fetch(&self, id: Identity, path: String, body: Vec<u8>) -> Result<Vec<u8>, NodeError> {
        let Some(d) = self.ask_order(&id).into_iter().find(|d| d.is_member(&id)) else {
            return Err(NodeError::NotMember(id.to_string()));
        };
        d.fetch(id, path, body).await
    }

    /// Sends a request to the mirror protocol of member `id` (through a DHT it belongs
    /// to, finding it there if need be) and waits for its answer.
    pub async fn mirror(
        &self,
        id: Identity,
        req: crate::mirror::wire::Request,
    ) -> Result<crate::mirror::wire::Response, NodeError> {
        let Some(d) = self.ask_order(&id).into_iter().find(|d| d.is_member(&id)) else {
            return Err(NodeError::NotMember(id.to_string()));
        };
        d.mirror(id, req).await
    }

    /// Whether `id` is a member of one of this node's DHTs.
    pub fn is_member(&self, id: &Identity) -> bool {
        self.memberships().iter().any(|d| d.is_member(id))
    }

    /// The record this node holds for `id` (in any of its DHTs), if any.
    pub async fn held_record(&self, id: Identity) -> Result<Option<AddressRecord>, NodeError> {
        for d in self.memberships() {
            if let Some(r) = d.held_record(id).await? {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// Sends an arbitrary record to each DHT's closest peers, unchecked — what a
    /// misbehaving member could do. For tests that check that peers refuse forged and
    /// stale records.
    #[doc(hidden)]
    pub async fn offer_raw_record(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), NodeError> {
        for d in self.memberships() {
            d.offer_raw_record(key.clone(), value.clone()).await?;
        }
        Ok(())
    }
}

/// Where a node keeps its state (members, peers' addresses, records held). The server
/// implements it over its storage; [`FileStore`] keeps it in a file.
pub trait StateStore: Send + Sync + 'static {
    fn load(&self) -> BoxFuture<'static, Result<Option<Vec<u8>>, String>>;
    fn save(&self, bytes: Vec<u8>) -> BoxFuture<'static, Result<(), String>>;
}

/// A [`StateStore`] in one file, replaced atomically.
pub struct FileStore(pub PathBuf);

impl StateStore for FileStore {
    fn load(&self) -> BoxFuture<'static, Result<Option<Vec<u8>>, String>> {
        let path = self.0.clone();
        Box::pin(async move {
            match tokio::fs::read(&path).await {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("{}: {e}", path.display())),
            }
        })
    }

    fn save(&self, bytes: Vec<u8>) -> BoxFuture<'static, Result<(), String>> {
        let path = self.0.clone();
        Box::pin(async move {
            let tmp = path.with_extension("tmp");
            let shown = path.display().to_string();
            let write = move || -> std::io::Result<()> {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)
            };
            tokio::task::spawn_blocking(write)
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("{shown}: {e}"))
        })
    }
}

/// A save of one membership's state (by its slot); `ack` is told once it (or a later
/// one) is stored.
pub(crate) struct SaveJob {
    pub slot: usize,
    pub state: serde_json::Value,
    pub ack: Option<Box<dyn FnOnce() + Send>>,
}

/// What is kept: each membership's state, the first one's listening on `settings.listen`.
#[derive(Default, Serialize, Deserialize)]
struct Persisted {
    dhts: Vec<DhtState>,
}

impl Persisted {
    fn from_bytes(bytes: Option<Vec<u8>>) -> Persisted {
        let Some(b) = bytes else {
            return Persisted::default();
        };
        let parsed = serde_json::from_slice::<serde_json::Value>(&b).and_then(|v| {
            if v.get("dhts").is_some() {
                serde_json::from_value::<Persisted>(v)
            } else {
                // Before several DHTs: one membership's state at the top.
                serde_json::from_value::<DhtState>(v).map(|d| Persisted { dhts: vec![d] })
            }
        });
        match parsed {
            Ok(mut p) => {
                p.dhts.retain(|d| d.membership.is_some());
                p
            }
            Err(e) => {
                tracing::warn!(error = %e, "p2p state unreadable; starting afresh");
                Persisted::default()
            }
        }
    }
}

/// Writes the node's state in order, coalescing saves that queue up behind a slow one.
async fn saver(
    store: Arc<dyn StateStore>,
    mut slots: Vec<serde_json::Value>,
    mut rx: mpsc::UnboundedReceiver<SaveJob>,
) {
    while let Some(first) = rx.recv().await {
        let mut acks: Vec<Box<dyn FnOnce() + Send>> = Vec::new();
        let mut job = Some(first);
        while let Some(j) = job {
            if slots.len() <= j.slot {
                slots.resize(j.slot + 1, serde_json::Value::Null);
            }
            slots[j.slot] = j.state;
            acks.extend(j.ack);
            job = rx.try_recv().ok();
        }
        // A membership-to-be (a swarm that has joined nothing) has nothing worth keeping.
        let dhts: Vec<&serde_json::Value> = slots
            .iter()
            .filter(|v| v.get("membership").is_some_and(|m| !m.is_null()))
            .collect();
        let bytes = serde_json::to_vec_pretty(&serde_json::json!({ "dhts": dhts })).expect("serializes");
        if let Err(e) = store.save(bytes).await {
            tracing::warn!(error = %e, "could not save the p2p state");
        }
        for a in acks {
            a();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invite::Membership;

    fn state(dht: &str) -> DhtState {
        DhtState {
            membership: Some(Membership::new(dht, Keypair::generate().identity())),
            ..DhtState::default()
        }
    }

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

    #[test]
    fn saved_state_of_one_dht_or_several_loads() {
        // A node from before several DHTs kept one membership's state at the top.
        let old = serde_json::to_vec(&state("plait")).unwrap();
        let p = Persisted::from_bytes(Some(old));
        assert_eq!(p.dhts.len(), 1);
        assert_eq!(p.dhts[0].membership.as_ref().unwrap().dht, "plait");

        let both = Persisted {
            dhts: vec![state("plait"), state("friends"), DhtState::default()],
        };
        let p = Persisted::from_bytes(Some(serde_json::to_vec(&both).unwrap()));
        let names: Vec<&str> = p
            .dhts
            .iter()
            .map(|d| d.membership.as_ref().unwrap().dht.as_str())
            .collect();
        assert_eq!(
            names,
            ["plait", "friends"],
            "a swarm that joined nothing is not kept"
        );

        assert!(Persisted::from_bytes(Some(b"not json".to_vec())).dhts.is_empty());
        assert!(Persisted::from_bytes(None).dhts.is_empty());
    }
}
