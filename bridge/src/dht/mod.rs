//! One DHT membership: a libp2p swarm that belongs to one named, invite-only DHT, run as
//! one task with its own swarm and listeners, so the gate of one network never lets a
//! member of another in. [`crate::node::Node`] holds one [`Dht`] handle per DHT and knows
//! which to ask.
//!
//! The swarm is keyed by the instance identity (the same ed25519 key, so the `PeerId` is
//! derived from it). This module holds the handle, the commands it sends, and the task's
//! state and event loop, which hands each command and event to the part whose job it is:
//!
//! * [`swarm`]: the transports and protocols a membership speaks (building only).
//! * [`gate`]: who may connect; making, joining, admitting to and removing from the DHT;
//!   the member-sync protocol.
//! * [`records`]: address records — this node's own, those held for others, lookups.
//! * [`fetch`]: fetches and mirror requests between members, both ways.
//! * [`connections`]: connected peers, identify, dials made by hand.
//! * [`listen`]: listeners, pinned ports, which addresses are worth telling and dialling.
//! * [`relay`]: relay reservations and hole punching.
//!
//! The types shared with the node (settings, status, errors, the join grant, [`Serve`])
//! are [`crate::types`]'; state is saved through [`crate::state`]. This module knows nothing
//! of the node's other memberships, of HTTP, SQL or documents.

mod connections;
mod fetch;
mod gate;
mod listen;
mod records;
mod relay;
mod swarm;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::kad::store::RecordStore;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, kad, request_response};
use tokio::sync::{mpsc, oneshot};

use crate::identity::{Identity, Keypair};
use crate::invite::{Invite, JoinRequest};
use crate::mirror::wire;
use crate::record::AddressRecord;
use crate::state::{DhtState, SaveJob};
use crate::types::{DhtMembers, DhtStatus, JoinGrant, NodeError, NodeSettings, Serve, now_secs, peer_id_of};
use fetch::{Answer, Outgoing};
use records::Lookup;
use relay::{RELAY_RETRY, is_relayed, relays_of};
use swarm::{Behaviour, BehaviourEvent, build_swarm};

/// How often a node with peers refreshes its Kademlia routing table.
const BOOTSTRAP_EVERY: Duration = Duration::from_secs(300);

/// What the handle asks of the task.
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
    /// The mirrors this node's record names from now on (republished when they change).
    Holders {
        holders: Vec<Identity>,
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

    /// Names `holders` in this node's record from now on (republished if they changed).
    pub async fn set_holders(&self, holders: Vec<Identity>) -> Result<(), NodeError> {
        self.cmd
            .send(Cmd::Holders { holders })
            .await
            .map_err(|_| NodeError::Stopped)
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

/// The task of one membership: the swarm and what each job keeps beside it (the fields
/// are read and changed by the modules named in the module doc).
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
    /// Members by PeerId (the gate's).
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
    /// Records offered or found that did not check (records').
    records_refused: u64,
    /// The sequence number of this node's last published record (records').
    published_seq: u64,
    /// The mirrors this node's record names (records').
    holders: Vec<Identity>,
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
        let relays = relays_of(&settings);
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
            holders: Vec::new(),
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
                Some(answer) = answers.recv() => self.answer(answer),
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

    /// Hands a command from the handle to the part whose job it is.
    fn command(&mut self, c: Cmd) {
        match c {
            Cmd::Invite {
                dht,
                join_url,
                ttl_secs,
                uses,
                reply,
            } => self.invite(dht, join_url, ttl_secs, uses, reply),
            Cmd::Admit { req, reply } => self.admit(req, reply),
            Cmd::Joined { grant, reply } => self.joined(*grant, reply),
            Cmd::Remove { id, reply } => self.remove(id, reply),
            Cmd::Members { reply } => {
                let _ = reply.send(self.roster());
            }
            Cmd::Resolve { id, reply } => self.lookup(id, Some(reply)),
            Cmd::Held { id, reply } => {
                let _ = reply.send(self.held(id));
            }
            Cmd::Offer { key, value } => self.offer(key, value),
            Cmd::Holders { holders } => self.set_holders(holders),
            Cmd::Connect { addr, reply } => self.connect(addr, reply),
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
        }
    }

    /// Hands a swarm event to the part whose job it is.
    fn event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr {
                listener_id, address, ..
            } => self.new_listen_addr(listener_id, address),
            SwarmEvent::ExpiredListenAddr { address, .. } => self.expired_listen_addr(address),
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => self.listener_closed(listener_id, addresses, reason),
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(ev)) => self.relay_client_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(ev)) => self.dcutr_event(ev),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => self.connection_established(peer_id, connection_id, endpoint, num_established),
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => self.connection_closed(peer_id, connection_id, num_established),
            SwarmEvent::OutgoingConnectionError {
                connection_id, error, ..
            } => self.dial_failed(connection_id, error),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => self.identified(peer_id, info),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(ev)) => self.kad_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Fetch(ev)) => self.fetch_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Mirror(ev)) => self.mirror_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Rpc(request_response::Event::Message {
                peer,
                message,
                ..
            })) => self.rpc_event(peer, message),
            _ => {}
        }
    }
}
