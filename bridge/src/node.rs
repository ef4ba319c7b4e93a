//! The libp2p node: this instance on the peer-to-peer network.
//!
//! One swarm keyed by the instance identity (the same ed25519 key, so the `PeerId` is
//! derived from it): TCP with noise and yamux, and QUIC; identify and ping; Kademlia under a protocol
//! name that carries the DHT's name (`/plait/kad/<dht>/1.0.0`), with record filtering on so
//! only records that [`AddressRecord::check`] accepts are stored; a request-response
//! protocol over which members exchange member certs.
//!
//! **Gate.** Only members of the node's DHT may connect (libp2p's allow list, checked when a
//! connection is established, in both directions). Invitees are admitted out of band (the
//! server carries the [`JoinRequest`] over HTTP to the inviter), then connect as members.
//! When a node admits someone it tells its connected peers, which check the cert chain and
//! tell theirs, so every member soon accepts every other.
//!
//! **State** (members, held records, known peer addresses) is kept in JSON files in the
//! directory the server gives, so a restarted node rejoins at once.
//!
//! The node runs as one task; [`Node`] is the handle the server holds. It knows nothing of
//! HTTP, SQL or documents.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use futures::future::BoxFuture;
use libp2p::core::transport::ListenerId;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig, RecordStore};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    PeerId, StreamProtocol, Swarm, allow_block_list, connection_limits, dcutr, identify, kad, noise, ping,
    relay, tcp, yamux,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

pub use libp2p::Multiaddr;

use crate::identity::{Identity, Keypair};
use crate::invite::{Invite, InviteError, JoinRequest, MemberCert, Membership};
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

/// What the node reports about itself.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub peer_id: String,
    /// Addresses the node listens on.
    pub listen: Vec<String>,
    /// The DHT it belongs to (`None` until it makes an invite or joins).
    pub dht: Option<String>,
    pub root: Option<Identity>,
    pub members: usize,
    /// Who they are.
    pub member_ids: Vec<Identity>,
    /// Members connected now.
    pub connected: Vec<Identity>,
    /// Connections to anyone (members, and peers dialled by hand that have not yet hung up).
    pub connected_peers: usize,
    /// Address records held for others.
    pub records_held: usize,
    /// Records offered to this node and refused (unsigned, forged, stale, oversize...).
    pub records_refused: u64,
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
}

/// How often a node with peers refreshes its Kademlia routing table.
const BOOTSTRAP_EVERY: Duration = Duration::from_secs(300);

/// How often a node makes again the relay reservations it lost (a relay restarted, the
/// network went away).
const RELAY_RETRY: Duration = Duration::from_secs(10);

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
    #[error("{0}")]
    Io(String),
}

enum Cmd {
    Invite {
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
    Offer {
        key: Vec<u8>,
        value: Vec<u8>,
    },
}

/// The handle to a running node.
#[derive(Clone)]
pub struct Node {
    cmd: mpsc::Sender<Cmd>,
    status: Arc<Mutex<Status>>,
    identity: Identity,
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

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Node {
    /// Starts a node listening on `settings.listen`, keeping its state in `store`.
    /// `server` answers other members' fetches (none: this node only asks).
    pub async fn start(
        keys: Keypair,
        store: Arc<dyn StateStore>,
        settings: NodeSettings,
        server: Option<Arc<dyn Serve>>,
    ) -> Result<Node, NodeError> {
        settings.check().map_err(NodeError::Refused)?;
        let listen = settings
            .listen
            .iter()
            .map(|a| {
                a.parse::<Multiaddr>()
                    .map_err(|e| NodeError::Refused(format!("p2p listen address {a:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let identity = keys.identity();
        let status = Arc::new(Mutex::new(Status {
            peer_id: peer_id_of(&identity).to_string(),
            ..Status::default()
        }));
        let (tx, rx) = mpsc::channel(64);
        let state = Persisted::from_bytes(store.load().await.map_err(NodeError::Io)?);
        let (save_tx, save_rx) = mpsc::unbounded_channel();
        tokio::spawn(saver(store, save_rx));
        let mut runner = Runner::new(keys, settings, save_tx, state, status.clone(), server)?;
        for a in &listen {
            // An address that cannot be used (its port taken, say by another process on the
            // same data dir) costs only that listener: the node still dials out and serves
            // the peers that reach it elsewhere.
            if let Err(e) = runner.swarm.listen_on(a.clone()) {
                tracing::warn!(address = %a, error = %e, "p2p cannot listen on {a}");
            }
        }
        tokio::spawn(runner.run(rx));
        Ok(Node {
            cmd: tx,
            status,
            identity,
        })
    }

    pub fn identity(&self) -> Identity {
        self.identity
    }

    pub fn status(&self) -> Status {
        self.status.lock().expect("status").clone()
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.cmd.send(make(tx)).await.map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Makes an invite to this node's DHT (creating one, with this node as root, if it has
    /// none yet). Invitees present it at `join_url`.
    pub async fn invite(&self, join_url: String, ttl_secs: u64, uses: u32) -> Result<Invite, NodeError> {
        self.ask(|reply| Cmd::Invite {
            join_url,
            ttl_secs,
            uses,
            reply,
        })
        .await?
    }

    /// Inviter side: admits the sender of `req` if its invite is one of ours and valid.
    pub async fn admit(&self, req: JoinRequest) -> Result<JoinGrant, NodeError> {
        self.ask(|reply| Cmd::Admit {
            req: Box::new(req),
            reply,
        })
        .await?
    }

    /// Invitee side: takes the grant (members, bootstrap peer) and connects.
    pub async fn joined(&self, grant: JoinGrant) -> Result<(), NodeError> {
        self.ask(|reply| Cmd::Joined {
            grant: Box::new(grant),
            reply,
        })
        .await?
    }

    /// Looks `id` up in the DHT (checking the record) and dials it.
    pub async fn resolve(&self, id: Identity) -> Result<AddressRecord, NodeError> {
        self.ask(|reply| Cmd::Resolve { id, reply }).await?
    }

    /// Dials an address; answers with the identity that answered.
    pub async fn connect(&self, addr: Multiaddr) -> Result<Identity, NodeError> {
        self.ask(|reply| Cmd::Connect { addr, reply }).await?
    }

    /// Asks the member `id` for `path` (finding it through the DHT if need be) and waits
    /// for its answer.
    pub async fn fetch(&self, id: Identity, path: String, body: Vec<u8>) -> Result<Vec<u8>, NodeError> {
        self.ask(|reply| Cmd::Fetch {
            id,
            path,
            body,
            reply,
        })
        .await?
    }

    /// Whether `id` is a member of this node's DHT.
    pub fn is_member(&self, id: &Identity) -> bool {
        self.status.lock().expect("status").member_ids.contains(id)
    }

    /// The record this node holds for `id`, if any.
    pub async fn held_record(&self, id: Identity) -> Result<Option<AddressRecord>, NodeError> {
        self.ask(|reply| Cmd::Held { id, reply }).await
    }

    /// Sends an arbitrary record to the DHT's closest peers, unchecked — what a misbehaving
    /// member could do. For tests that check that peers refuse forged and stale records.
    #[doc(hidden)]
    pub async fn offer_raw_record(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), NodeError> {
        self.cmd
            .send(Cmd::Offer { key, value })
            .await
            .map_err(|_| NodeError::Stopped)
    }

    /// A join request for `invite` signed with `keys`, carrying this node's addresses.
    pub fn join_request(&self, keys: &Keypair, invite: Invite) -> JoinRequest {
        JoinRequest::new(invite, keys, self.status().listen)
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

/// Members exchange certs over this protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Rpc {
    Members(Vec<MemberCert>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum RpcReply {
    Members(Vec<MemberCert>),
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
    relay: Toggle<relay::Behaviour>,
    relay_client: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
}

/// What is kept on disk.
#[derive(Default, Serialize, Deserialize)]
struct Persisted {
    membership: Option<Membership>,
    /// Last known addresses of members.
    #[serde(default)]
    peers: HashMap<Identity, Vec<String>>,
    /// Records held for others (checked again when loaded).
    #[serde(default)]
    records: Vec<AddressRecord>,
}

impl Persisted {
    fn from_bytes(bytes: Option<Vec<u8>>) -> Persisted {
        match bytes {
            Some(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "p2p state unreadable; starting afresh");
                Persisted::default()
            }),
            None => Persisted::default(),
        }
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

/// A save of the node's state; `ack` is told once it (or a later one) is stored.
struct SaveJob {
    bytes: Vec<u8>,
    ack: Option<Box<dyn FnOnce() + Send>>,
}

/// Writes the node's state in order, coalescing saves that queue up behind a slow one.
async fn saver(store: Arc<dyn StateStore>, mut rx: mpsc::UnboundedReceiver<SaveJob>) {
    while let Some(first) = rx.recv().await {
        let mut last = first.bytes;
        let mut acks: Vec<Box<dyn FnOnce() + Send>> = first.ack.into_iter().collect();
        while let Ok(more) = rx.try_recv() {
            last = more.bytes;
            acks.extend(more.ack);
        }
        if let Err(e) = store.save(last).await {
            tracing::warn!(error = %e, "could not save the p2p state");
        }
        for a in acks {
            a();
        }
    }
}

/// A DHT lookup in flight: whom for, who waits, the best record so far.
type Lookup = (
    Identity,
    Vec<oneshot::Sender<Result<AddressRecord, NodeError>>>,
    Option<AddressRecord>,
);

/// An answer to a member's fetch, on its way back to the event loop.
type Answer = (request_response::ResponseChannel<FetchReply>, FetchReply);

/// A fetch waiting for its peer to be found.
type QueuedFetch = (String, Vec<u8>, oneshot::Sender<Result<Vec<u8>, NodeError>>);

struct Runner {
    keys: Keypair,
    settings: NodeSettings,
    saves: mpsc::UnboundedSender<SaveJob>,
    state: Persisted,
    status: Arc<Mutex<Status>>,
    swarm: Swarm<Behaviour>,
    /// Members by PeerId.
    by_peer: HashMap<PeerId, Identity>,
    /// Lookups in flight: the identity, who waits, the best record so far.
    lookups: HashMap<kad::QueryId, Lookup>,
    /// Hand-made dials in flight, by connection.
    dials: HashMap<ConnectionId, oneshot::Sender<Result<Identity, NodeError>>>,
    /// Hand-made dials that connected: answered when the peer speaks to us (it admitted
    /// us) or hangs up (it did not).
    admitted_wait: HashMap<PeerId, Vec<oneshot::Sender<Result<Identity, NodeError>>>>,
    connected: HashSet<PeerId>,
    listen: Vec<Multiaddr>,
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
    /// Fetches waiting for a lookup of their peer.
    queued: HashMap<Identity, Vec<QueuedFetch>>,
    /// Answers to members' fetches, computed off the event loop.
    answers: (
        mpsc::UnboundedSender<Answer>,
        Option<mpsc::UnboundedReceiver<Answer>>,
    ),
}

impl Runner {
    fn new(
        keys: Keypair,
        settings: NodeSettings,
        saves: mpsc::UnboundedSender<SaveJob>,
        state: Persisted,
        status: Arc<Mutex<Status>>,
        server: Option<Arc<dyn Serve>>,
    ) -> Result<Runner, NodeError> {
        let dht = state
            .membership
            .as_ref()
            .map_or(settings.dht.clone(), |m| m.dht.clone());
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
            saves,
            state,
            status,
            swarm,
            by_peer: HashMap::new(),
            lookups: HashMap::new(),
            dials: HashMap::new(),
            admitted_wait: HashMap::new(),
            connected: HashSet::new(),
            listen: Vec::new(),
            relays,
            relay_listeners: HashMap::new(),
            records_refused: 0,
            published_seq: 0,
            server,
            outbound: HashMap::new(),
            queued: HashMap::new(),
            answers: {
                let (tx, rx) = mpsc::unbounded_channel();
                (tx, Some(rx))
            },
        };
        r.restore();
        Ok(r)
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
            for a in addrs.iter().filter_map(|a| a.parse::<Multiaddr>().ok()) {
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
        let bytes = serde_json::to_vec_pretty(&self.state).expect("state serializes");
        let _ = self.saves.send(SaveJob { bytes, ack });
    }

    fn publish_status(&mut self) {
        let mut s = self.status.lock().expect("status");
        s.listen = self.listen.iter().map(|a| a.to_string()).collect();
        s.dht = self.dht().map(str::to_string);
        s.root = self.state.membership.as_ref().map(|m| m.root);
        s.members = self.state.membership.as_ref().map_or(0, |m| m.members().len());
        s.member_ids = self
            .state
            .membership
            .as_ref()
            .map(|m| m.members())
            .unwrap_or_default();
        s.connected = self
            .connected
            .iter()
            .filter_map(|p| self.by_peer.get(p).copied())
            .collect();
        s.connected.sort();
        s.connected_peers = self.connected.len();
        s.records_held = self.swarm.behaviour_mut().kad.store_mut().records().count();
        s.records_refused = self.records_refused;
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

    fn is_relay(&self, peer: &PeerId) -> bool {
        self.relays.iter().any(|(p, _)| p == peer)
    }

    /// Asks each configured relay that holds no reservation for us for one (only members
    /// are let in, so not before this node has joined).
    fn reserve_relays(&mut self) {
        if self.state.membership.is_none() {
            return;
        }
        for (_, circuit) in self.relays.clone() {
            if self.relay_listeners.contains_key(&circuit) {
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
        let addrs: Vec<String> = self.listen.iter().map(|a| a.to_string()).collect();
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

    fn send_fetch(
        &mut self,
        pid: PeerId,
        path: String,
        body: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, NodeError>>,
    ) {
        let req = FetchRequest {
            path,
            body: b64(&body),
        };
        let rid = self.swarm.behaviour_mut().fetch.send_request(&pid, req);
        self.outbound.insert(rid, reply);
    }

    /// Sends our certs to a connected member.
    fn send_certs(&mut self, peer: PeerId, certs: Vec<MemberCert>) {
        if !certs.is_empty() {
            self.swarm
                .behaviour_mut()
                .rpc
                .send_request(&peer, Rpc::Members(certs));
        }
    }

    /// Takes certs from a peer; passes what is new on to the other connected peers.
    fn merge_certs(&mut self, from: Option<PeerId>, certs: Vec<MemberCert>) {
        let Some(m) = self.state.membership.as_mut() else {
            return;
        };
        let added = m.merge(certs.clone());
        if added.is_empty() {
            return;
        }
        tracing::info!(new = added.len(), "learned new members");
        for id in &added {
            self.allow(*id);
        }
        let new: Vec<MemberCert> = certs.into_iter().filter(|c| added.contains(&c.member)).collect();
        let peers: Vec<PeerId> = self
            .connected
            .iter()
            .copied()
            .filter(|p| Some(*p) != from)
            .collect();
        for p in peers {
            self.send_certs(p, new.clone());
        }
        self.save();
        self.publish_status();
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut republish = tokio::time::interval(Duration::from_secs(self.settings.republish_secs.max(1)));
        republish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut answers = self.answers.1.take().expect("taken once");
        let mut bootstrap = tokio::time::interval(BOOTSTRAP_EVERY);
        bootstrap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut relays = tokio::time::interval(RELAY_RETRY);
        relays.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(c) => self.command(c),
                    None => break,
                },
                ev = self.swarm.select_next_some() => self.event(ev),
                Some((channel, reply)) = answers.recv() => {
                    let _ = self.swarm.behaviour_mut().fetch.send_response(channel, reply);
                }
                _ = republish.tick() => self.publish_record(),
                _ = bootstrap.tick() => {
                    if !self.connected.is_empty() {
                        let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    }
                }
                _ = relays.tick() => self.reserve_relays(),
            }
        }
        self.save();
    }

    fn command(&mut self, c: Cmd) {
        match c {
            Cmd::Invite {
                join_url,
                ttl_secs,
                uses,
                reply,
            } => {
                if self.state.membership.is_none() {
                    let dht = self.settings.dht.clone();
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
                        };
                        tracing::info!(member = %req.member, "admitted a new member");
                        self.allow(req.member);
                        let pid = peer_id_of(&req.member);
                        for a in req.addrs.iter().filter_map(|a| a.parse::<Multiaddr>().ok()) {
                            self.swarm.behaviour_mut().kad.add_address(&pid, a);
                        }
                        let peers: Vec<PeerId> = self.connected.iter().copied().collect();
                        for p in peers {
                            self.send_certs(p, vec![cert.clone()]);
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
                        "this node already belongs to DHT {:?}; one DHT per node for now",
                        m.dht
                    ))));
                    return;
                }
                if grant.dht != self.settings.dht && self.state.membership.is_none() {
                    // The Kademlia protocol carries the DHT's name: rebuild for this one.
                    match build_swarm(&self.keys, &self.settings, &grant.dht) {
                        Ok(s) => {
                            let old = std::mem::replace(&mut self.swarm, s);
                            let listen: Vec<Multiaddr> = old.listeners().cloned().collect();
                            drop(old);
                            self.listen.clear();
                            self.relay_listeners.clear();
                            for a in listen {
                                let _ = self.swarm.listen_on(a);
                            }
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            return;
                        }
                    }
                }
                let mut m = self
                    .state
                    .membership
                    .take()
                    .unwrap_or_else(|| Membership::new(&grant.dht, grant.root));
                m.merge(grant.certs.clone());
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
                let peers: Vec<PeerId> = self.connected.iter().copied().collect();
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
            } => {
                if id == self.keys.identity() {
                    let _ = reply.send(Err(NodeError::Refused(
                        "a node does not fetch from itself".into(),
                    )));
                    return;
                }
                if !self.state.membership.as_ref().is_some_and(|m| m.is_member(&id)) {
                    let _ = reply.send(Err(NodeError::Refused(format!(
                        "{id} is not a member of this node's network"
                    ))));
                    return;
                }
                let pid = peer_id_of(&id);
                let known =
                    self.connected.contains(&pid) || self.state.peers.get(&id).is_some_and(|a| !a.is_empty());
                if known {
                    self.send_fetch(pid, path, body, reply);
                } else {
                    self.queued.entry(id).or_default().push((path, body, reply));
                    self.lookup(id, None);
                }
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
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "p2p listening on {address}");
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
                        .send_request(&peer_id, Rpc::Members(Vec::new()));
                }
                if num_established.get() == 1 {
                    self.connected.insert(peer_id);
                    // Connected to a relay of ours (after a join, say): reserve over this
                    // connection rather than wait for the next retry.
                    if self.is_relay(&peer_id) {
                        self.reserve_relays();
                    }
                    if endpoint.is_dialer() {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                    let certs = self
                        .state
                        .membership
                        .as_ref()
                        .map(|m| m.certs())
                        .unwrap_or_default();
                    self.send_certs(peer_id, certs);
                    // The first peer after being alone (start-up, a join, a network outage):
                    // the record could not reach anyone before, so publish it now.
                    if self.connected.len() == 1 {
                        self.publish_record();
                    }
                    self.publish_status();
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
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
                    let addrs: Vec<Multiaddr> = info.listen_addrs.into_iter().filter(is_dialable).collect();
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
                        request: Rpc::Members(certs),
                        channel,
                        ..
                    } => {
                        self.merge_certs(Some(peer), certs);
                        let ours = self
                            .state
                            .membership
                            .as_ref()
                            .map(|m| m.certs())
                            .unwrap_or_default();
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .rpc
                            .send_response(channel, RpcReply::Members(ours));
                    }
                    request_response::Message::Response {
                        response: RpcReply::Members(certs),
                        ..
                    } => {
                        self.merge_certs(Some(peer), certs);
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
                        let _ = tx.send((channel, reply));
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
                            for a in r.addrs.iter().filter_map(|a| a.parse::<Multiaddr>().ok()) {
                                self.swarm.behaviour_mut().kad.add_address(&pid, a);
                            }
                            self.state.peers.insert(who, r.addrs.clone());
                            self.store_record(&r);
                            if !self.connected.contains(&pid) {
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
                    for (path, body, reply) in self.queued.remove(&who).unwrap_or_default() {
                        if answer.is_ok() {
                            self.send_fetch(peer_id_of(&who), path, body, reply);
                        } else {
                            let _ = reply.send(Err(NodeError::NotFound(who.to_string())));
                        }
                    }
                    self.publish_status();
                }
            }
            _ => {}
        }
    }
}

/// Loopback and unspecified addresses are not worth telling others about, except on a
/// machine where everything is loopback (tests, one-host set-ups).
fn is_dialable(a: &Multiaddr) -> bool {
    !a.iter().any(|p| {
        matches!(p, Protocol::Ip4(ip) if ip.is_unspecified())
            || matches!(p, Protocol::Ip6(ip) if ip.is_unspecified())
    })
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
                    [(StreamProtocol::new("/plait/members/1.0.0"), ProtocolSupport::Full)],
                    request_response::Config::default(),
                ),
                fetch: request_response::Behaviour::with_codec(
                    request_response::json::codec::Codec::default()
                        .set_request_size_maximum(MAX_FETCH_BYTES)
                        .set_response_size_maximum(MAX_FETCH_BYTES),
                    [(StreamProtocol::new("/plait/fetch/1.0.0"), ProtocolSupport::Full)],
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
