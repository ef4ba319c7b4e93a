//! One DHT membership: a libp2p swarm that belongs to one named, invite-only DHT.
//!
//! The swarm is keyed by the instance identity (the same ed25519 key, so the `PeerId` is
//! derived from it): TCP with noise and yamux, and QUIC; identify and ping; Kademlia under a
//! protocol name that carries the DHT's name (`/plait/kad/<dht>/1.0.0`), with record
//! filtering on so only records that [`AddressRecord::check`] accepts are stored; a
//! request-response protocol over which members exchange member certs, one for fetches,
//! and the mirror protocol (`/plait/mirror/1.0.0`, see [`crate::mirror::wire`]);
//! relay (server, and client for `relays`) and DCUtR.
//!
//! **Gate.** Only members of this DHT may connect (libp2p's allow list, checked when a
//! connection is established, in both directions). Invitees are admitted out of band (the
//! server carries the [`JoinRequest`] over HTTP to the inviter), then connect as members.
//! When a node admits someone it tells its connected peers, which check the cert chain and
//! tell theirs, so every member soon accepts every other. A removal travels the same way;
//! each node that takes it closes the removed member's connections and refuses it from then
//! on.
//!
//! Each membership runs as one task with its own swarm and listeners, so the gate of one
//! network never lets a member of another in; [`crate::node::Node`] holds one per DHT and
//! knows which to ask. This module knows nothing of the other memberships, of HTTP, SQL or
//! documents.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig, RecordStore};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, allow_block_list, connection_limits, dcutr, identify, kad,
    noise, ping, relay, tcp, yamux,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::identity::{Identity, Keypair};
use crate::invite::{Invite, InviteError, JoinRequest, MemberCert, Membership, Merged, Removal};
use crate::mirror::wire;
use crate::node::{
    DhtMembers, DhtStatus, FETCH_TIMEOUT, JoinGrant, MAX_FETCH_BYTES, MemberInfo, NodeError, NodeSettings,
    RemovedInfo, SaveJob, Serve, libp2p_keypair, now_millis, now_secs, peer_id_of,
};
use crate::record::AddressRecord;

/// How often a node with peers refreshes its Kademlia routing table.
const BOOTSTRAP_EVERY: Duration = Duration::from_secs(300);

/// How often a node makes again the relay reservations it lost (a relay restarted, the
/// network went away).
const RELAY_RETRY: Duration = Duration::from_secs(10);

enum Cmd {
    Invite {
        dht: String,
        join_url: String,
        ttl_secs: u64,
        uses: u32,
        reply: oneshot::Sender<Result<Invite, NodeError>>,
    },
    Admit {
        req: Box<JoinRequest>,
        reply: oneshot::Sender<Result<JoinGrant, NodeError>>,
    },
    Joined {
        grant: Box<JoinGrant>,
        reply: oneshot::Sender<Result<(), NodeError>>,
    },
    Resolve {
        id: Identity,
        reply: oneshot::Sender<Result<AddressRecord, NodeError>>,
    },
    Connect {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<Identity, NodeError>>,
    },
    Held {
        id: Identity,
        reply: oneshot::Sender<Option<AddressRecord>>,
    },
    Fetch {
        id: Identity,
        path: String,
        body: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, NodeError>>,
    },
    /// A request to a member's mirror protocol.
    Mirror {
        id: Identity,
        req: Box<wire::Request>,
        reply: oneshot::Sender<Result<wire::Response, NodeError>>,
    },
    Offer {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// Removes a member; answered with the DHT's name.
    Remove {
        id: Identity,
        reply: oneshot::Sender<Result<String, NodeError>>,
    },
    Members {
        reply: oneshot::Sender<Option<DhtMembers>>,
    },
    /// Stops the swarm (closing its listeners) without saving; answered once it is gone.
    Stop {
        reply: oneshot::Sender<()>,
    },
}
/// The handle to one running membership (or to the node's one membership-to-be: a swarm
/// that has joined nothing yet, ready to make a DHT or join one).
#[derive(Clone)]
pub(crate) struct Dht {
    cmd: mpsc::Sender<Cmd>,
    status: Arc<Mutex<DhtStatus>>,
}

/// What a membership needs from the node that runs it.
pub(crate) struct Start {
    pub keys: Keypair,
    pub settings: NodeSettings,
    /// The DHT its Kademlia speaks (the membership's, once it has one).
    pub dht: String,
    /// Its place in the node's list (the saver keeps each membership's state under it).
    pub slot: usize,
    pub state: DhtState,
    pub saves: mpsc::UnboundedSender<SaveJob>,
    pub server: Option<Arc<dyn Serve>>,
}

impl Dht {
    /// Starts the swarm and its listeners: `state.listen` if the membership has its own
    /// (every DHT after the first), else `settings.listen`.
    pub fn start(s: Start) -> Result<Dht, NodeError> {
        let listen = s
            .state
            .listen
            .clone()
            .unwrap_or_else(|| s.settings.listen.clone())
            .iter()
            .map(|a| {
                a.parse::<Multiaddr>()
                    .map_err(|e| NodeError::Refused(format!("p2p listen address {a:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let status = Arc::new(Mutex::new(DhtStatus::default()));
        let (tx, rx) = mpsc::channel(64);
        let mut runner = Runner::new(s, status.clone())?;
        runner.listen_on(&listen);
        runner.publish_status();
        tokio::spawn(runner.run(rx));
        Ok(Dht { cmd: tx, status })
    }

    pub fn status(&self) -> DhtStatus {
        self.status.lock().expect("status").clone()
    }

    /// The DHT's name; `None` for a swarm that has joined nothing yet.
    pub fn name(&self) -> Option<String> {
        self.status.lock().expect("status").dht.clone()
    }

    pub fn is_member(&self, id: &Identity) -> bool {
        self.status.lock().expect("status").peers.member_ids.contains(id)
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.cmd.send(make(tx)).await.map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Makes an invite to this membership's DHT (creating DHT `dht`, with this node as
    /// root, if it has joined none yet).
    pub async fn invite(
        &self,
        dht: String,
        join_url: String,
        ttl_secs: u64,
        uses: u32,
    ) -> Result<Invite, NodeError> {
        self.ask(|reply| Cmd::Invite {
            dht,
            join_url,
            ttl_secs,
            uses,
            reply,
        })
        .await?
    }

    pub async fn admit(&self, req: JoinRequest) -> Result<JoinGrant, NodeError> {
        self.ask(|reply| Cmd::Admit {
            req: Box::new(req),
            reply,
        })
        .await?
    }

    pub async fn joined(&self, grant: JoinGrant) -> Result<(), NodeError> {
        self.ask(|reply| Cmd::Joined {
            grant: Box::new(grant),
            reply,
        })
        .await?
    }

    pub async fn resolve(&self, id: Identity) -> Result<AddressRecord, NodeError> {
        self.ask(|reply| Cmd::Resolve { id, reply }).await?
    }

    pub async fn connect(&self, addr: Multiaddr) -> Result<Identity, NodeError> {
        self.ask(|reply| Cmd::Connect { addr, reply }).await?
    }

    pub async fn fetch(&self, id: Identity, path: String, body: Vec<u8>) -> Result<Vec<u8>, NodeError> {
        self.ask(|reply| Cmd::Fetch {
            id,
            path,
            body,
            reply,
        })
        .await?
    }

    pub async fn mirror(&self, id: Identity, req: wire::Request) -> Result<wire::Response, NodeError> {
        self.ask(|reply| Cmd::Mirror {
            id,
            req: Box::new(req),
            reply,
        })
        .await?
    }

    pub async fn held_record(&self, id: Identity) -> Result<Option<AddressRecord>, NodeError> {
        self.ask(|reply| Cmd::Held { id, reply }).await
    }

    pub async fn remove(&self, id: Identity) -> Result<String, NodeError> {
        self.ask(|reply| Cmd::Remove { id, reply }).await?
    }

    /// The members (none for a swarm that has joined nothing).
    pub async fn members(&self) -> Result<Option<DhtMembers>, NodeError> {
        self.ask(|reply| Cmd::Members { reply }).await
    }

    pub async fn offer_raw_record(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), NodeError> {
        self.cmd
            .send(Cmd::Offer { key, value })
            .await
            .map_err(|_| NodeError::Stopped)
    }

    /// Stops a swarm that has joined nothing (to make way for one that speaks another
    /// DHT); returns once its listeners are closed.
    pub async fn stop(&self) {
        let _ = self.ask(|reply| Cmd::Stop { reply }).await;
    }
}

/// A fetch between members; bodies are base64 in the JSON frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FetchRequest {
    path: String,
    body: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum FetchReply {
    Ok(String),
    Refused(String),
}

fn b64(b: &[u8]) -> String {
    data_encoding::BASE64_NOPAD.encode(b)
}

fn unb64(s: &str) -> Result<Vec<u8>, NodeError> {
    data_encoding::BASE64_NOPAD
        .decode(s.as_bytes())
        .map_err(|e| NodeError::Refused(format!("bad fetch frame: {e}")))
}

/// What members tell each other of the member set: certs, and removals (with the certs
/// their removers gave the members the removed ones had admitted).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct MemberSync {
    certs: Vec<MemberCert>,
    #[serde(default)]
    removed: Vec<Removal>,
}

impl MemberSync {
    fn is_empty(&self) -> bool {
        self.certs.is_empty() && self.removed.is_empty()
    }
}

/// Members exchange certs and removals over this protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Rpc {
    Members(MemberSync),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum RpcReply {
    Members(MemberSync),
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    gate: allow_block_list::Behaviour<allow_block_list::AllowedPeers>,
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    rpc: request_response::json::Behaviour<Rpc, RpcReply>,
    fetch: request_response::json::Behaviour<FetchRequest, FetchReply>,
    mirror: request_response::Behaviour<wire::Codec>,
    relay: Toggle<relay::Behaviour>,
    relay_client: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
}
/// What is kept on disk of one membership.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct DhtState {
    pub membership: Option<Membership>,
    /// Last known addresses of members.
    #[serde(default)]
    pub peers: HashMap<Identity, Vec<String>>,
    /// Records held for others (checked again when loaded).
    #[serde(default)]
    pub records: Vec<AddressRecord>,
    /// The addresses this membership listens on, when not `settings.listen` (every DHT
    /// after the first has its own ports: chosen by the system once, then kept, so members
    /// find it where they last saw it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<Vec<String>>,
}

/// A DHT lookup in flight: whom for, who waits, the best record so far.
type Lookup = (
    Identity,
    Vec<oneshot::Sender<Result<AddressRecord, NodeError>>>,
    Option<AddressRecord>,
);

/// An answer to a member's fetch or mirror request, on its way back to the event loop
/// (which checks that the asker is still a member: a fetch may wait for news while it is
/// removed).
enum Answer {
    Fetch(PeerId, request_response::ResponseChannel<FetchReply>, FetchReply),
    Mirror(request_response::ResponseChannel<wire::Response>, wire::Response),
}

/// A request to a member, waiting for its peer to be found.
enum Outgoing {
    Fetch {
        path: String,
        body: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, NodeError>>,
    },
    Mirror {
        req: Box<wire::Request>,
        reply: oneshot::Sender<Result<wire::Response, NodeError>>,
    },
}

impl Outgoing {
    fn fail(self, e: NodeError) {
        match self {
            Outgoing::Fetch { reply, .. } => drop(reply.send(Err(e))),
            Outgoing::Mirror { reply, .. } => drop(reply.send(Err(e))),
        }
    }
}

struct Runner {
    keys: Keypair,
    settings: NodeSettings,
    slot: usize,
    saves: mpsc::UnboundedSender<SaveJob>,
    state: DhtState,
    status: Arc<Mutex<DhtStatus>>,
    swarm: Swarm<Behaviour>,
    /// The DHT the swarm's Kademlia speaks.
    swarm_dht: String,
    /// Members by PeerId.
    by_peer: HashMap<PeerId, Identity>,
    /// Lookups in flight: the identity, who waits, the best record so far.
    lookups: HashMap<kad::QueryId, Lookup>,
    /// Hand-made dials in flight, by connection.
    dials: HashMap<ConnectionId, oneshot::Sender<Result<Identity, NodeError>>>,
    /// Hand-made dials that connected: answered when the peer speaks to us (it admitted
    /// us) or hangs up (it did not).
    admitted_wait: HashMap<PeerId, Vec<oneshot::Sender<Result<Identity, NodeError>>>>,
    /// Connected peers: each connection and its remote address.
    connected: HashMap<PeerId, HashMap<ConnectionId, Multiaddr>>,
    listen: Vec<Multiaddr>,
    /// Our listeners, by their index in the addresses we were asked to listen on.
    listeners: HashMap<ListenerId, usize>,
    /// The relays of `settings.relays`: each one's peer and relayed address.
    relays: Vec<(PeerId, Multiaddr)>,
    /// Reservations asked of relays, by relayed address.
    relay_listeners: HashMap<Multiaddr, ListenerId>,
    records_refused: u64,
    published_seq: u64,
    /// Answers fetches from members.
    server: Option<Arc<dyn Serve>>,
    /// Our fetches in flight.
    outbound: HashMap<request_response::OutboundRequestId, oneshot::Sender<Result<Vec<u8>, NodeError>>>,
    /// Our mirror requests in flight.
    mirror_out:
        HashMap<request_response::OutboundRequestId, oneshot::Sender<Result<wire::Response, NodeError>>>,
    /// Requests waiting for a lookup of their peer.
    queued: HashMap<Identity, Vec<Outgoing>>,
    /// Answers to members' fetches, computed off the event loop.
    answers: (
        mpsc::UnboundedSender<Answer>,
        Option<mpsc::UnboundedReceiver<Answer>>,
    ),
}

impl Runner {
    fn new(s: Start, status: Arc<Mutex<DhtStatus>>) -> Result<Runner, NodeError> {
        let Start {
            keys,
            settings,
            dht,
            slot,
            state,
            saves,
            server,
        } = s;
        let dht = state.membership.as_ref().map_or(dht, |m| m.dht.clone());
        let swarm = build_swarm(&keys, &settings, &dht)?;
        let relays = settings
            .relays
            .iter()
            .filter_map(|r| {
                let a = r.parse::<Multiaddr>().ok()?;
                let Some(Protocol::P2p(peer)) = a.iter().last() else {
                    return None;
                };
                Some((peer, a.with(Protocol::P2pCircuit)))
            })
            .collect();
        let mut r = Runner {
            keys,
            settings,
            slot,
            saves,
            state,
            status,
            swarm,
            swarm_dht: dht,
            by_peer: HashMap::new(),
            lookups: HashMap::new(),
            dials: HashMap::new(),
            admitted_wait: HashMap::new(),
            connected: HashMap::new(),
            listen: Vec::new(),
            listeners: HashMap::new(),
            relays,
            relay_listeners: HashMap::new(),
            records_refused: 0,
            published_seq: 0,
            server,
            outbound: HashMap::new(),
            mirror_out: HashMap::new(),
            queued: HashMap::new(),
            answers: {
                let (tx, rx) = mpsc::unbounded_channel();
                (tx, Some(rx))
            },
        };
        r.restore();
        Ok(r)
    }

    /// Listens on `addrs`. An address that cannot be used (its port taken, say by another
    /// process on the same data dir) costs only that listener: the node still dials out and
    /// serves the peers that reach it elsewhere.
    fn listen_on(&mut self, addrs: &[Multiaddr]) {
        for (i, a) in addrs.iter().enumerate() {
            match self.swarm.listen_on(a.clone()) {
                Ok(id) => {
                    self.listeners.insert(id, i);
                }
                Err(e) => tracing::warn!(address = %a, error = %e, "p2p cannot listen on {a}"),
            }
        }
    }

    /// A membership with ports of its own keeps the ones the system chose for it the first
    /// time, so members find it where they last saw it after a restart.
    fn pin_port(&mut self, listener: ListenerId, bound: &Multiaddr) {
        let (Some(&i), Some(own)) = (self.listeners.get(&listener), self.state.listen.as_mut()) else {
            return;
        };
        let Some(Ok(configured)) = own.get(i).map(|a| a.parse::<Multiaddr>()) else {
            return;
        };
        let port_of = |a: &Multiaddr| {
            a.iter().find_map(|p| match p {
                Protocol::Tcp(n) | Protocol::Udp(n) => Some(n),
                _ => None,
            })
        };
        let (Some(0), Some(port)) = (port_of(&configured), port_of(bound)) else {
            return;
        };
        let pinned: Multiaddr = configured
            .iter()
            .map(|p| match p {
                Protocol::Tcp(_) => Protocol::Tcp(port),
                Protocol::Udp(_) => Protocol::Udp(port),
                other => other,
            })
            .collect();
        own[i] = pinned.to_string();
        self.save();
    }

    fn dht(&self) -> Option<&str> {
        self.state.membership.as_ref().map(|m| m.dht.as_str())
    }

    /// Puts the persisted members, addresses and records back into the swarm.
    fn restore(&mut self) {
        let Some(m) = self.state.membership.clone() else {
            return;
        };
        for id in m.members() {
            self.allow(id);
        }
        let now = now_secs();
        let records = std::mem::take(&mut self.state.records);
        for r in records {
            let key = AddressRecord::key_for(&m.dht, &r.id);
            if AddressRecord::check(&r.encode(), &key, &m.dht, now, None).is_ok() {
                self.store_record(&r);
            }
        }
        let peers: Vec<(Identity, Vec<String>)> =
            self.state.peers.iter().map(|(k, v)| (*k, v.clone())).collect();
        for (id, addrs) in peers {
            if id == self.keys.identity() || !m.is_member(&id) {
                continue;
            }
            let pid = peer_id_of(&id);
            for a in self.peer_addrs(addrs.iter().filter_map(|a| a.parse().ok())) {
                self.swarm.behaviour_mut().kad.add_address(&pid, a);
            }
            let _ = self.swarm.dial(pid);
        }
    }

    fn allow(&mut self, id: Identity) {
        if id == self.keys.identity() {
            return;
        }
        let pid = peer_id_of(&id);
        self.by_peer.insert(pid, id);
        self.swarm.behaviour_mut().gate.allow_peer(pid);
    }

    /// Queues a save of the state.
    fn save(&mut self) {
        self.save_then(None);
    }

    /// Queues a save; `ack` runs once it is stored.
    fn save_then(&mut self, ack: Option<Box<dyn FnOnce() + Send>>) {
        self.state.records = self
            .swarm
            .behaviour_mut()
            .kad
            .store_mut()
            .records()
            .filter_map(|r| serde_json::from_slice::<AddressRecord>(&r.value).ok())
            .filter(|r| r.id != self.keys.identity())
            .collect();
        let state = serde_json::to_value(&self.state).expect("state serializes");
        let _ = self.saves.send(SaveJob {
            slot: self.slot,
            state,
            ack,
        });
    }

    fn publish_status(&mut self) {
        let mut s = self.status.lock().expect("status");
        s.listen = self.listen.iter().map(|a| a.to_string()).collect();
        s.dht = self.dht().map(str::to_string);
        s.root = self.state.membership.as_ref().map(|m| m.root);
        s.peers.member_ids = self
            .state
            .membership
            .as_ref()
            .map(|m| m.members())
            .unwrap_or_default();
        s.peers.members = s.peers.member_ids.len();
        let members = |direct_only: bool| {
            let mut ids: Vec<Identity> = self
                .connected
                .iter()
                .filter(|(_, conns)| !direct_only || conns.values().any(|a| !is_relayed(a)))
                .filter_map(|(p, _)| self.by_peer.get(p).copied())
                .collect();
            ids.sort();
            ids
        };
        s.peers.connected = members(false);
        s.peers.direct = members(true);
        s.peers.connected_peers = self.connected.len();
        s.peers.records_held = self.swarm.behaviour_mut().kad.store_mut().records().count();
        s.peers.records_refused = self.records_refused;
    }

    fn store_record(&mut self, r: &AddressRecord) {
        let Some(dht) = self.dht().map(str::to_string) else {
            return;
        };
        let mut rec = kad::Record::new(
            kad::RecordKey::new(&AddressRecord::key_for(&dht, &r.id)),
            r.encode(),
        );
        rec.expires =
            Some(std::time::Instant::now() + Duration::from_secs(r.expires_at.saturating_sub(now_secs())));
        if let Err(e) = self.swarm.behaviour_mut().kad.store_mut().put(rec) {
            tracing::debug!(error = %e, "record not stored");
        }
    }

    /// The sequence number of the record held for the identity under `key`, if any.
    fn held_seq(&mut self, key: &kad::RecordKey) -> Option<u64> {
        let held = self.swarm.behaviour_mut().kad.store_mut().get(key)?;
        serde_json::from_slice::<AddressRecord>(&held.value)
            .ok()
            .map(|r| r.seq)
    }

    /// What of a peer's addresses is worth dialling: [`worth_dialling`], less any address
    /// this node listens on itself (a private address two LANs share reaches this node).
    fn peer_addrs(&self, addrs: impl IntoIterator<Item = Multiaddr>) -> Vec<Multiaddr> {
        let mut addrs = worth_dialling(addrs);
        addrs.retain(|a| {
            let bare: Multiaddr = a.iter().filter(|p| !matches!(p, Protocol::P2p(_))).collect();
            !self.listen.contains(&bare)
        });
        addrs
    }

    /// Dials relay `relay` once more over each transport this node listens on that no
    /// connection to it uses yet. Hole punching needs this node's public address on a
    /// transport both ends listen on, and a NAT reveals that address only to a peer reached
    /// over that transport (identify's observed address): with one connection to its relay, a
    /// home would know its public TCP address and another home only its QUIC one.
    fn cover_transports(&mut self, relay: PeerId, relay_addrs: &[Multiaddr]) {
        let used: Vec<Transport> = self
            .connected
            .get(&relay)
            .map(|c| c.values().filter_map(transport_of).collect())
            .unwrap_or_default();
        for t in [Transport::Tcp, Transport::Quic] {
            if used.contains(&t) || !self.listen.iter().any(|a| transport_of(a) == Some(t)) {
                continue;
            }
            let Some(a) = relay_addrs.iter().find(|a| transport_of(a) == Some(t)) else {
                continue;
            };
            let opts = DialOpts::peer_id(relay)
                .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
                .addresses(vec![a.clone()])
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(relay = %relay, error = %e, "could not dial the relay over {a}");
            }
        }
    }

    fn is_relay(&self, peer: &PeerId) -> bool {
        self.relays.iter().any(|(p, _)| p == peer)
    }

    /// Asks each configured relay that holds no reservation for us for one (only members
    /// are let in, so not before this node has joined).
    fn reserve_relays(&mut self) {
        if self.state.membership.is_none() {
            return;
        }
        for (relay, circuit) in self.relays.clone() {
            // A relay of another of this node's networks would refuse us at its gate.
            if self.relay_listeners.contains_key(&circuit) || !self.by_peer.contains_key(&relay) {
                continue;
            }
            match self.swarm.listen_on(circuit.clone()) {
                Ok(id) => {
                    self.relay_listeners.insert(circuit, id);
                }
                Err(e) => {
                    tracing::warn!(relay = %circuit, error = %e, "cannot ask {circuit} to relay for this node")
                }
            }
        }
    }

    /// Signs and publishes this node's addresses.
    fn publish_record(&mut self) {
        let Some(dht) = self.dht().map(str::to_string) else {
            return;
        };
        let addrs: Vec<String> = worth_dialling(self.listen.iter().cloned())
            .iter()
            .map(|a| a.to_string())
            .collect();
        if addrs.is_empty() {
            return;
        }
        // Milliseconds since the epoch: increasing across restarts.
        self.published_seq = now_millis().max(self.published_seq + 1);
        let r = AddressRecord::new(
            &self.keys,
            &dht,
            self.published_seq,
            addrs,
            now_secs(),
            self.settings.record_ttl_secs,
        );
        let mut rec = kad::Record::new(
            kad::RecordKey::new(&AddressRecord::key_for(&dht, &r.id)),
            r.encode(),
        );
        rec.expires = Some(std::time::Instant::now() + Duration::from_secs(self.settings.record_ttl_secs));
        if let Err(e) = self.swarm.behaviour_mut().kad.put_record(rec, kad::Quorum::One) {
            tracing::debug!(error = %e, "could not publish the address record");
        }
    }

    /// Starts a DHT lookup of `id` (one at a time per identity).
    fn lookup(&mut self, id: Identity, reply: Option<oneshot::Sender<Result<AddressRecord, NodeError>>>) {
        if let Some((_, l)) = self.lookups.iter_mut().find(|(_, l)| l.0 == id) {
            l.1.extend(reply);
            return;
        }
        let Some(dht) = self.dht().map(str::to_string) else {
            if let Some(r) = reply {
                let _ = r.send(Err(NodeError::Refused("this node has joined no DHT".into())));
            }
            return;
        };
        let key = kad::RecordKey::new(&AddressRecord::key_for(&dht, &id));
        let q = self.swarm.behaviour_mut().kad.get_record(key);
        self.lookups.insert(q, (id, reply.into_iter().collect(), None));
    }

    fn send(&mut self, pid: PeerId, out: Outgoing) {
        match out {
            Outgoing::Fetch { path, body, reply } => {
                let req = FetchRequest {
                    path,
                    body: b64(&body),
                };
                let rid = self.swarm.behaviour_mut().fetch.send_request(&pid, req);
                self.outbound.insert(rid, reply);
            }
            Outgoing::Mirror { req, reply } => {
                let rid = self.swarm.behaviour_mut().mirror.send_request(&pid, *req);
                self.mirror_out.insert(rid, reply);
            }
        }
    }

    /// Sends a request to member `id`, looking it up first when its addresses are unknown.
    fn send_to_member(&mut self, id: Identity, out: Outgoing) {
        if id == self.keys.identity() {
            out.fail(NodeError::Refused("a node does not ask itself".into()));
            return;
        }
        if !self.state.membership.as_ref().is_some_and(|m| m.is_member(&id)) {
            out.fail(NodeError::Refused(format!(
                "{id} is not a member of this node's network"
            )));
            return;
        }
        let pid = peer_id_of(&id);
        let known =
            self.connected.contains_key(&pid) || self.state.peers.get(&id).is_some_and(|a| !a.is_empty());
        if known {
            self.send(pid, out);
        } else {
            self.queued.entry(id).or_default().push(out);
            self.lookup(id, None);
        }
    }

    /// Every member cert and removal this node holds (none before it belongs to the DHT).
    fn our_sync(&self) -> MemberSync {
        self.state
            .membership
            .as_ref()
            .map(|m| MemberSync {
                certs: m.certs(),
                removed: m.removals(),
            })
            .unwrap_or_default()
    }

    /// Sends certs and removals to a connected member.
    fn send_sync(&mut self, peer: PeerId, sync: MemberSync) {
        if !sync.is_empty() {
            self.swarm
                .behaviour_mut()
                .rpc
                .send_request(&peer, Rpc::Members(sync));
        }
    }

    /// Takes certs and removals from a peer; acts on what changed and passes what is new
    /// on to the other connected members.
    fn merge_sync(&mut self, from: Option<PeerId>, sync: MemberSync) {
        let Some(m) = self.state.membership.as_mut() else {
            return;
        };
        let merged = m.merge(sync.certs, sync.removed);
        if merged.is_empty() {
            return;
        }
        self.took(from, merged);
    }

    /// Acts on a change of the member set: lets the new members in, shuts the removed ones
    /// out (their connections close at once), tells the other connected members, saves.
    fn took(&mut self, from: Option<PeerId>, merged: Merged) {
        if !merged.added.is_empty() {
            tracing::info!(new = merged.added.len(), "learned new members");
        }
        for id in &merged.added {
            self.allow(*id);
        }
        for id in &merged.gone {
            tracing::info!(member = %id, dht = %self.swarm_dht, "{id} is no longer a member");
            self.shut_out(*id);
        }
        let sync = MemberSync {
            certs: merged.certs,
            removed: merged.removals,
        };
        let peers: Vec<PeerId> = self
            .connected
            .keys()
            .copied()
            .filter(|p| Some(*p) != from && self.by_peer.contains_key(p))
            .collect();
        for p in peers {
            self.send_sync(p, sync.clone());
        }
        self.save();
        self.publish_status();
    }

    /// Forgets a member that is one no more and closes its connections (the gate's
    /// `disallow_peer` does both: nothing it sends afterwards, fetches included, arrives).
    fn shut_out(&mut self, id: Identity) {
        if id == self.keys.identity() {
            return;
        }
        let pid = peer_id_of(&id);
        self.by_peer.remove(&pid);
        self.swarm.behaviour_mut().gate.disallow_peer(pid);
        // Closing: not counted as connected from now on (the close events find it gone).
        self.connected.remove(&pid);
        self.swarm.behaviour_mut().kad.remove_peer(&pid);
        self.state.peers.remove(&id);
        if let Some(dht) = self.dht().map(str::to_string) {
            let key = kad::RecordKey::new(&AddressRecord::key_for(&dht, &id));
            self.swarm.behaviour_mut().kad.store_mut().remove(&key);
        }
        for out in self.queued.remove(&id).unwrap_or_default() {
            out.fail(NodeError::NotMember(id.to_string()));
        }
    }

    /// The member set as `plait members` shows it.
    fn roster(&self) -> Option<DhtMembers> {
        let m = self.state.membership.as_ref()?;
        let me = self.keys.identity();
        let members = m
            .members()
            .into_iter()
            .map(|id| {
                let conns = self.connected.get(&peer_id_of(&id));
                let cert = m.cert(&id);
                MemberInfo {
                    id,
                    admitted_by: cert.map(|c| c.by),
                    admitted_at: cert.map(|c| c.at),
                    this_node: id == me,
                    connected: conns.is_some_and(|c| !c.is_empty()),
                    direct: conns.is_some_and(|c| c.values().any(|a| !is_relayed(a))),
                }
            })
            .collect();
        let removed = m
            .removals()
            .into_iter()
            .map(|r| RemovedInfo {
                id: r.member,
                removed_by: r.by,
                at: r.at,
            })
            .collect();
        Some(DhtMembers {
            dht: m.dht.clone(),
            root: m.root,
            members,
            removed,
        })
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut republish = tokio::time::interval(Duration::from_secs(self.settings.republish_secs.max(1)));
        republish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut answers = self.answers.1.take().expect("taken once");
        let mut bootstrap = tokio::time::interval(BOOTSTRAP_EVERY);
        bootstrap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut relays = tokio::time::interval(RELAY_RETRY);
        relays.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stopped = loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Cmd::Stop { reply }) => break Some(reply),
                    Some(c) => self.command(c),
                    None => break None,
                },
                ev = self.swarm.select_next_some() => self.event(ev),
                Some(answer) = answers.recv() => match answer {
                    Answer::Fetch(peer, channel, reply) => {
                        let reply = if self.by_peer.contains_key(&peer) {
                            reply
                        } else {
                            FetchReply::Refused("not a member".into())
                        };
                        let _ = self.swarm.behaviour_mut().fetch.send_response(channel, reply);
                    }
                    // A mirror answer is not withheld: a push was checked and stored (or
                    // refused) already, and a removed member is disconnected anyway.
                    Answer::Mirror(channel, reply) => {
                        let _ = self.swarm.behaviour_mut().mirror.send_response(channel, reply);
                    }
                },
                _ = republish.tick() => self.publish_record(),
                _ = bootstrap.tick() => {
                    if !self.connected.is_empty() {
                        let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    }
                }
                _ = relays.tick() => self.reserve_relays(),
            }
        };
        match stopped {
            Some(reply) => {
                drop(self);
                let _ = reply.send(());
            }
            None => self.save(),
        }
    }

    fn command(&mut self, c: Cmd) {
        match c {
            Cmd::Invite {
                dht,
                join_url,
                ttl_secs,
                uses,
                reply,
            } => {
                if self.state.membership.is_none() {
                    if dht != self.swarm_dht {
                        let _ = reply.send(Err(NodeError::Refused(format!(
                            "this swarm speaks DHT {:?}, not {dht:?}",
                            self.swarm_dht
                        ))));
                        return;
                    }
                    self.state.membership = Some(Membership::new(&dht, self.keys.identity()));
                    tracing::info!(dht = %dht, "created DHT {dht} with this node as its root");
                    self.save();
                    self.publish_record();
                }
                let m = self.state.membership.as_ref().expect("made above");
                let addrs = self.listen.iter().map(|a| a.to_string()).collect();
                let inv = Invite::new(
                    &self.keys,
                    &m.dht,
                    m.root,
                    addrs,
                    join_url,
                    now_secs() + ttl_secs,
                    uses,
                );
                self.publish_status();
                let _ = reply.send(Ok(inv));
            }
            Cmd::Admit { req, reply } => {
                let Some(m) = self.state.membership.as_mut() else {
                    let _ = reply.send(Err(NodeError::Invite(InviteError::NotMine)));
                    return;
                };
                match m.admit(&self.keys, &req, now_secs()) {
                    Ok(cert) => {
                        let grant = JoinGrant {
                            dht: m.dht.clone(),
                            root: m.root,
                            certs: m.certs(),
                            inviter: self.keys.identity(),
                            inviter_addrs: self.listen.iter().map(|a| a.to_string()).collect(),
                            removed: m.removals(),
                        };
                        tracing::info!(member = %req.member, "admitted a new member");
                        self.allow(req.member);
                        let pid = peer_id_of(&req.member);
                        for a in req.addrs.iter().filter_map(|a| a.parse::<Multiaddr>().ok()) {
                            self.swarm.behaviour_mut().kad.add_address(&pid, a);
                        }
                        let peers: Vec<PeerId> = self.connected.keys().copied().collect();
                        for p in peers {
                            let sync = MemberSync {
                                certs: vec![cert.clone()],
                                removed: Vec::new(),
                            };
                            self.send_sync(p, sync);
                        }
                        self.publish_status();
                        // The grant goes out once the admission (and the invite's use) is stored.
                        self.save_then(Some(Box::new(move || {
                            let _ = reply.send(Ok(grant));
                        })));
                    }
                    Err(e) => {
                        tracing::info!(member = %req.member, error = %e, "refused a join request");
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Cmd::Joined { grant, reply } => {
                if let Some(m) = &self.state.membership
                    && (m.dht != grant.dht || m.root != grant.root)
                {
                    let _ = reply.send(Err(NodeError::Refused(format!(
                        "this node already belongs to a DHT named {:?} with another root",
                        m.dht
                    ))));
                    return;
                }
                if grant.dht != self.swarm_dht {
                    let _ = reply.send(Err(NodeError::Refused(format!(
                        "this swarm speaks DHT {:?}, not {:?}",
                        self.swarm_dht, grant.dht
                    ))));
                    return;
                }
                let mut m = self
                    .state
                    .membership
                    .clone()
                    .unwrap_or_else(|| Membership::new(&grant.dht, grant.root));
                m.merge(grant.certs.clone(), grant.removed.clone());
                if !m.is_member(&self.keys.identity()) {
                    let _ = reply.send(Err(NodeError::Refused(
                        "the grant does not admit this node".into(),
                    )));
                    return;
                }
                let members = m.members();
                self.state.membership = Some(m);
                for id in members {
                    self.allow(id);
                }
                let pid = peer_id_of(&grant.inviter);
                for a in grant
                    .inviter_addrs
                    .iter()
                    .filter_map(|a| a.parse::<Multiaddr>().ok())
                {
                    self.swarm.behaviour_mut().kad.add_address(&pid, a);
                }
                self.state
                    .peers
                    .insert(grant.inviter, grant.inviter_addrs.clone());
                let _ = self.swarm.dial(pid);
                self.publish_status();
                tracing::info!(dht = %grant.dht, inviter = %grant.inviter, "joined");
                self.save_then(Some(Box::new(move || {
                    let _ = reply.send(Ok(()));
                })));
            }
            Cmd::Resolve { id, reply } => self.lookup(id, Some(reply)),
            Cmd::Connect { addr, reply } => {
                // Dialling a named peer by hand is the operator's choice: our side allows
                // it; the other side's gate decides.
                if let Some(Protocol::P2p(pid)) = addr.iter().last() {
                    self.swarm.behaviour_mut().gate.allow_peer(pid);
                }
                let opts = DialOpts::unknown_peer_id().address(addr.clone()).build();
                let conn = opts.connection_id();
                if let Err(e) = self.swarm.dial(opts) {
                    let _ = reply.send(Err(NodeError::Refused(format!("cannot dial {addr}: {e}"))));
                    return;
                }
                self.dials.insert(conn, reply);
            }
            Cmd::Offer { key, value } => {
                let peers: Vec<PeerId> = self.connected.keys().copied().collect();
                let rec = kad::Record::new(kad::RecordKey::new(&key), value);
                self.swarm
                    .behaviour_mut()
                    .kad
                    .put_record_to(rec, peers.into_iter(), kad::Quorum::One);
            }
            Cmd::Fetch {
                id,
                path,
                body,
                reply,
            } => self.send_to_member(id, Outgoing::Fetch { path, body, reply }),
            Cmd::Mirror { id, req, reply } => self.send_to_member(id, Outgoing::Mirror { req, reply }),
            // Handled by the event loop, which ends.
            Cmd::Stop { reply } => {
                let _ = reply.send(());
            }
            Cmd::Remove { id, reply } => {
                let Some(m) = self.state.membership.as_mut() else {
                    let _ = reply.send(Err(NodeError::NotMember(id.to_string())));
                    return;
                };
                match m.remove(&self.keys, id, now_secs()) {
                    Ok(merged) => {
                        let dht = m.dht.clone();
                        tracing::info!(member = %id, dht = %dht, "removed {id} from {dht}");
                        self.took(None, merged);
                        // Answered once the removal is stored.
                        self.save_then(Some(Box::new(move || {
                            let _ = reply.send(Ok(dht));
                        })));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Cmd::Members { reply } => {
                let _ = reply.send(self.roster());
            }
            Cmd::Held { id, reply } => {
                let held = self.dht().map(str::to_string).and_then(|dht| {
                    let key = kad::RecordKey::new(&AddressRecord::key_for(&dht, &id));
                    let r = self.swarm.behaviour_mut().kad.store_mut().get(&key)?;
                    serde_json::from_slice(&r.value).ok()
                });
                let _ = reply.send(held);
            }
        }
    }

    fn event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr {
                listener_id, address, ..
            } => {
                tracing::info!(%address, dht = %self.swarm_dht, "p2p listening on {address}");
                self.pin_port(listener_id, &address);
                // The addresses this node listens on are the ones it publishes as its own;
                // a relay offers reservations only once it has such an external address.
                if self.settings.relay_server && !address.iter().any(|p| p == Protocol::P2pCircuit) {
                    self.swarm.add_external_address(address.clone());
                }
                if !self.listen.contains(&address) {
                    self.listen.push(address);
                }
                self.publish_status();
                self.publish_record();
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen.retain(|a| a != &address);
                self.publish_status();
                self.publish_record();
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => {
                let before = self.relay_listeners.len();
                self.relay_listeners.retain(|_, id| *id != listener_id);
                if self.relay_listeners.len() < before {
                    tracing::info!(reason = ?reason, "a relay reservation ended; asking again in {}s", RELAY_RETRY.as_secs());
                }
                self.listen.retain(|a| !addresses.contains(a));
                self.publish_status();
                self.publish_record();
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(
                relay::client::Event::ReservationReqAccepted {
                    relay_peer_id,
                    renewal: false,
                    ..
                },
            )) => {
                tracing::info!(relay = %relay_peer_id, "reachable through relay {relay_peer_id}");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(_) => {
                    tracing::info!(peer = %remote_peer_id, "direct connection to {remote_peer_id} by hole punching")
                }
                Err(e) => {
                    tracing::debug!(peer = %remote_peer_id, error = %e, "hole punching failed; staying relayed")
                }
            },
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let addr = endpoint.get_remote_address().clone();
                if let Some(waiting) = self.dials.remove(&connection_id) {
                    self.admitted_wait.entry(peer_id).or_default().push(waiting);
                    // A peer with nothing to say to a non-member still answers a request.
                    self.swarm
                        .behaviour_mut()
                        .rpc
                        .send_request(&peer_id, Rpc::Members(MemberSync::default()));
                }
                self.connected
                    .entry(peer_id)
                    .or_default()
                    .insert(connection_id, addr.clone());
                if num_established.get() == 1 {
                    // Connected to a relay of ours (after a join, say): reserve over this
                    // connection rather than wait for the next retry.
                    if self.is_relay(&peer_id) {
                        self.reserve_relays();
                    }
                    if endpoint.is_dialer() {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                    self.send_sync(peer_id, self.our_sync());
                    // The first peer after being alone (start-up, a join, a network outage):
                    // the record could not reach anyone before, so publish it now.
                    if self.connected.len() == 1 {
                        self.publish_record();
                    }
                }
                self.publish_status();
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                if let Some(conns) = self.connected.get_mut(&peer_id) {
                    conns.remove(&connection_id);
                }
                if num_established > 0 {
                    self.publish_status();
                    return;
                }
                self.connected.remove(&peer_id);
                self.publish_status();
                if let Some(waiting) = self.admitted_wait.remove(&peer_id) {
                    for w in waiting {
                        let _ = w.send(Err(NodeError::Refused(format!(
                            "{peer_id} hung up: this node is not admitted there"
                        ))));
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id, error, ..
            } => {
                if let Some(w) = self.dials.remove(&connection_id) {
                    let _ = w.send(Err(NodeError::Refused(format!("dial failed: {error}"))));
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                if let Some(id) = self.by_peer.get(&peer_id).copied() {
                    let addrs = self.peer_addrs(info.listen_addrs);
                    if self.is_relay(&peer_id) {
                        self.cover_transports(peer_id, &addrs);
                    }
                    for a in &addrs {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, a.clone());
                    }
                    self.state
                        .peers
                        .insert(id, addrs.iter().map(|a| a.to_string()).collect());
                    self.save();
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(ev)) => self.kad_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Fetch(ev)) => self.fetch_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Mirror(ev)) => self.mirror_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Rpc(request_response::Event::Message {
                peer,
                message,
                ..
            })) => {
                if let Some(waiting) = self.admitted_wait.remove(&peer) {
                    let id = self.by_peer.get(&peer).copied();
                    for w in waiting {
                        let _ = w.send(id.ok_or_else(|| {
                            NodeError::Refused(format!("{peer} is not a member of this node's DHT"))
                        }));
                    }
                }
                match message {
                    request_response::Message::Request {
                        request: Rpc::Members(sync),
                        channel,
                        ..
                    } => {
                        self.merge_sync(Some(peer), sync);
                        let ours = self.our_sync();
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .rpc
                            .send_response(channel, RpcReply::Members(ours));
                    }
                    request_response::Message::Response {
                        response: RpcReply::Members(sync),
                        ..
                    } => {
                        self.merge_sync(Some(peer), sync);
                    }
                }
            }
            _ => {}
        }
    }

    fn fetch_event(&mut self, ev: request_response::Event<FetchRequest, FetchReply>) {
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    let tx = self.answers.0.clone();
                    let (Some(from), Some(server)) = (self.by_peer.get(&peer).copied(), self.server.clone())
                    else {
                        let why = if self.server.is_none() {
                            "this node serves nothing"
                        } else {
                            "not a member"
                        };
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .fetch
                            .send_response(channel, FetchReply::Refused(why.into()));
                        return;
                    };
                    tokio::spawn(async move {
                        let reply = match unb64(&request.body) {
                            Ok(body) => match server.fetch(from, request.path, body).await {
                                Ok(b) => FetchReply::Ok(b64(&b)),
                                Err(e) => FetchReply::Refused(e),
                            },
                            Err(e) => FetchReply::Refused(e.to_string()),
                        };
                        let _ = tx.send(Answer::Fetch(peer, channel, reply));
                    });
                }
                request_response::Message::Response { request_id, response } => {
                    if let Some(reply) = self.outbound.remove(&request_id) {
                        let _ = reply.send(match response {
                            FetchReply::Ok(b) => unb64(&b),
                            FetchReply::Refused(why) => Err(NodeError::Refused(why)),
                        });
                    }
                }
            },
            request_response::Event::OutboundFailure {
                request_id,
                error,
                peer,
                ..
            } => {
                if matches!(error, request_response::OutboundFailure::DialFailure)
                    && let Some(id) = self.by_peer.get(&peer).copied()
                {
                    // Its addresses are stale (it moved, or restarted on another port):
                    // the next fetch looks it up in the DHT again.
                    self.state.peers.remove(&id);
                }
                if let Some(reply) = self.outbound.remove(&request_id) {
                    let _ = reply.send(Err(NodeError::Unreachable(format!("{peer}: {error}"))));
                }
            }
            _ => {}
        }
    }

    /// The mirror protocol: members' requests go to the server's [`Serve::mirror`] (off the
    /// event loop); answers to ours go to whoever waits.
    fn mirror_event(&mut self, ev: request_response::Event<wire::Request, wire::Response>) {
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    let (Some(from), Some(server)) = (self.by_peer.get(&peer).copied(), self.server.clone())
                    else {
                        let why = crate::mirror::Refusal::Unavailable("this node keeps no mirror".into());
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .mirror
                            .send_response(channel, wire::Response::Refused(why));
                        return;
                    };
                    let tx = self.answers.0.clone();
                    tokio::spawn(async move {
                        let reply = server.mirror(from, request).await;
                        let _ = tx.send(Answer::Mirror(channel, reply));
                    });
                }
                request_response::Message::Response { request_id, response } => {
                    if let Some(reply) = self.mirror_out.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                request_id,
                error,
                peer,
                ..
            } => {
                if let Some(reply) = self.mirror_out.remove(&request_id) {
                    let _ = reply.send(Err(NodeError::Unreachable(format!("{peer}: {error}"))));
                }
            }
            _ => {}
        }
    }

    fn kad_event(&mut self, ev: kad::Event) {
        match ev {
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::PutRecord {
                        source,
                        record: Some(rec),
                        ..
                    },
            } => {
                let Some(dht) = self.dht().map(str::to_string) else {
                    return;
                };
                let held = self.held_seq(&rec.key);
                match AddressRecord::check(&rec.value, rec.key.as_ref(), &dht, now_secs(), held) {
                    Ok(r) => {
                        self.store_record(&r);
                        self.save();
                        self.publish_status();
                    }
                    Err(e) => {
                        self.records_refused += 1;
                        tracing::warn!(from = %source, error = %e, "refused a DHT record");
                        self.publish_status();
                    }
                }
            }
            kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetRecord(res),
                step,
                ..
            } => {
                let Some(dht) = self.dht().map(str::to_string) else {
                    return;
                };
                let mut done = step.last;
                match res {
                    Ok(kad::GetRecordOk::FoundRecord(found)) => {
                        if let Some((_, _, best)) = self.lookups.get_mut(&id) {
                            let held = best.as_ref().map(|b| b.seq);
                            match AddressRecord::check(
                                &found.record.value,
                                found.record.key.as_ref(),
                                &dht,
                                now_secs(),
                                held,
                            ) {
                                Ok(r) => *best = Some(r),
                                Err(e) => {
                                    self.records_refused += 1;
                                    tracing::warn!(error = %e, "ignored a bad record in a lookup");
                                }
                            }
                        }
                    }
                    Ok(kad::GetRecordOk::FinishedWithNoAdditionalRecord { .. }) => done = true,
                    Err(_) => done = true,
                }
                // Every record found is checked and the newest kept, so a stale copy (ours,
                // or a peer's) never wins over a fresher one found later in the query.
                if done && let Some((who, waiting, best)) = self.lookups.remove(&id) {
                    if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                        q.finish();
                    }
                    let answer = match best {
                        Some(r) => {
                            let pid = peer_id_of(&who);
                            let addrs = self.peer_addrs(r.addrs.iter().filter_map(|a| a.parse().ok()));
                            for a in addrs {
                                self.swarm.behaviour_mut().kad.add_address(&pid, a);
                            }
                            self.state.peers.insert(who, r.addrs.clone());
                            self.store_record(&r);
                            if !self.connected.contains_key(&pid) {
                                let _ = self.swarm.dial(pid);
                            }
                            Ok(r)
                        }
                        None => Err(NodeError::NotFound(who.to_string())),
                    };
                    for w in waiting {
                        let _ = w.send(match &answer {
                            Ok(r) => Ok(r.clone()),
                            Err(_) => Err(NodeError::NotFound(who.to_string())),
                        });
                    }
                    for out in self.queued.remove(&who).unwrap_or_default() {
                        if answer.is_ok() {
                            self.send(peer_id_of(&who), out);
                        } else {
                            out.fail(NodeError::NotFound(who.to_string()));
                        }
                    }
                    self.publish_status();
                }
            }
            _ => {}
        }
    }
}

/// A direct connection's transport, as far as hole punching is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tcp,
    Quic,
}

fn transport_of(a: &Multiaddr) -> Option<Transport> {
    if is_relayed(a) {
        return None;
    }
    a.iter().find_map(|p| match p {
        Protocol::QuicV1 => Some(Transport::Quic),
        Protocol::Tcp(_) => Some(Transport::Tcp),
        _ => None,
    })
}

fn is_relayed(a: &Multiaddr) -> bool {
    a.iter().any(|p| p == Protocol::P2pCircuit)
}

/// The addresses of a list worth telling others about, or dialling: never unspecified ones,
/// and loopback ones only where there is nothing else (every process on one machine: tests,
/// one-host set-ups). Another machine's loopback address reaches the dialler itself, and a
/// dial that reaches the wrong peer fails whole, even if a later address would have worked.
fn worth_dialling(addrs: impl IntoIterator<Item = Multiaddr>) -> Vec<Multiaddr> {
    let ip_is = |a: &Multiaddr, f: fn(&std::net::IpAddr) -> bool| {
        matches!(a.iter().next(), Some(Protocol::Ip4(ip)) if f(&ip.into()))
            || matches!(a.iter().next(), Some(Protocol::Ip6(ip)) if f(&ip.into()))
    };
    let addrs: Vec<Multiaddr> = addrs
        .into_iter()
        .filter(|a| !ip_is(a, std::net::IpAddr::is_unspecified))
        .collect();
    let local = |a: &Multiaddr| !is_relayed(a) && ip_is(a, std::net::IpAddr::is_loopback);
    if addrs.iter().all(local) {
        return addrs;
    }
    addrs.into_iter().filter(|a| !local(a)).collect()
}

fn build_swarm(keys: &Keypair, settings: &NodeSettings, dht: &str) -> Result<Swarm<Behaviour>, NodeError> {
    let kad_protocol = StreamProtocol::try_from_owned(format!("/plait/kad/{dht}/1.0.0"))
        .map_err(|e| NodeError::Refused(format!("bad DHT name {dht:?}: {e}")))?;
    let max_records = settings.max_records;
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(settings.max_connections))
        .with_max_established_per_peer(Some(settings.max_connections_per_peer));
    let query_timeout = Duration::from_secs(settings.query_timeout_secs);
    // Only members connect to this node at all (the gate), so it relays for members only;
    // their relayed connections carry federation, so the limits are generous.
    let relay_config = settings.relay_server.then(|| relay::Config {
        max_circuits: settings.relay_max_circuits,
        max_circuits_per_peer: settings.relay_max_circuits,
        max_circuit_duration: Duration::from_secs(settings.relay_max_circuit_secs),
        max_circuit_bytes: settings.relay_max_circuit_bytes,
        ..relay::Config::default()
    });
    let swarm = libp2p::SwarmBuilder::with_existing_identity(libp2p_keypair(keys))
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| NodeError::Io(e.to_string()))?
        // QUIC learns that a peer vanished (a crash sends nothing) only when the connection
        // idles out; keep that short, so a restarted peer is reconnected to promptly.
        .with_quic_config(|mut c| {
            c.max_idle_timeout = 4_000;
            c.keep_alive_interval = Duration::from_millis(1_500);
            c
        })
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| NodeError::Io(e.to_string()))?
        .with_behaviour(|key, relay_client| {
            let peer = key.public().to_peer_id();
            let mut cfg = kad::Config::new(kad_protocol);
            cfg.set_record_filtering(kad::StoreInserts::FilterBoth);
            cfg.set_kbucket_inserts(kad::BucketInserts::OnConnected);
            cfg.set_publication_interval(None);
            // Kademlia's own periodic bootstrap warns every 5 minutes on a node that has no
            // peers yet (every fresh install); the node bootstraps itself when it has some.
            cfg.set_periodic_bootstrap_interval(None);
            cfg.set_query_timeout(query_timeout);
            cfg.set_max_packet_size(16 * 1024);
            let store = MemoryStore::with_config(
                peer,
                MemoryStoreConfig {
                    max_records,
                    max_value_bytes: crate::record::MAX_RECORD_BYTES,
                    ..Default::default()
                },
            );
            let mut kad = kad::Behaviour::with_config(peer, store, cfg);
            kad.set_mode(Some(kad::Mode::Server));
            Behaviour {
                gate: allow_block_list::Behaviour::default(),
                limits: connection_limits::Behaviour::new(limits),
                identify: identify::Behaviour::new(identify::Config::new(
                    "/plait/id/1.0.0".into(),
                    key.public(),
                )),
                ping: ping::Behaviour::default(),
                kad,
                rpc: request_response::json::Behaviour::new(
                    [(StreamProtocol::new("/plait/members/2.0.0"), ProtocolSupport::Full)],
                    request_response::Config::default(),
                ),
                fetch: request_response::Behaviour::with_codec(
                    request_response::json::codec::Codec::default()
                        .set_request_size_maximum(MAX_FETCH_BYTES)
                        .set_response_size_maximum(MAX_FETCH_BYTES),
                    [(StreamProtocol::new("/plait/fetch/1.0.0"), ProtocolSupport::Full)],
                    request_response::Config::default().with_request_timeout(FETCH_TIMEOUT),
                ),
                mirror: request_response::Behaviour::with_codec(
                    wire::Codec,
                    [(StreamProtocol::new(wire::PROTOCOL), ProtocolSupport::Full)],
                    request_response::Config::default().with_request_timeout(FETCH_TIMEOUT),
                ),
                relay: Toggle::from(relay_config.map(|c| relay::Behaviour::new(peer, c))),
                relay_client,
                dcutr: dcutr::Behaviour::new(peer),
            }
        })
        .map_err(|e| NodeError::Io(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    Ok(swarm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<Multiaddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn loopback_addresses_are_told_only_where_there_is_nothing_else() {
        let one_host = addrs(&[
            "/ip4/127.0.0.1/tcp/1",
            "/ip4/0.0.0.0/tcp/2",
            "/ip6/::1/udp/3/quic-v1",
        ]);
        assert_eq!(
            worth_dialling(one_host),
            addrs(&["/ip4/127.0.0.1/tcp/1", "/ip6/::1/udp/3/quic-v1"])
        );
        let relay =
            "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWPMVTc3a6WGAetxFrRA4AAWzcNU2ugzdwhh6EFgUcg5U4/p2p-circuit";
        let home = addrs(&["/ip4/127.0.0.1/tcp/4001", "/ip4/10.0.0.2/tcp/4001", relay]);
        assert_eq!(worth_dialling(home), addrs(&["/ip4/10.0.0.2/tcp/4001", relay]));
        // A relayed address is not a local one, even through a relay on loopback.
        let relayed_only = addrs(&["/ip4/127.0.0.1/tcp/4001", relay]);
        assert_eq!(worth_dialling(relayed_only), addrs(&[relay]));
    }

    #[test]
    fn transports_are_told_apart_and_relayed_connections_have_none() {
        let [tcp, quic, relayed] = [
            "/ip4/10.0.0.2/tcp/4001",
            "/ip4/10.0.0.2/udp/4001/quic-v1",
            "/ip4/10.0.0.1/udp/9/quic-v1/p2p/12D3KooWPMVTc3a6WGAetxFrRA4AAWzcNU2ugzdwhh6EFgUcg5U4/p2p-circuit",
        ]
        .map(|a| a.parse::<Multiaddr>().unwrap());
        assert_eq!(transport_of(&tcp), Some(Transport::Tcp));
        assert_eq!(transport_of(&quic), Some(Transport::Quic));
        assert_eq!(transport_of(&relayed), None);
    }
}
