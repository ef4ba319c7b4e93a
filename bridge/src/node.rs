//! The libp2p node: this instance on the peer-to-peer network, a member of any number of
//! named, invite-only DHTs at once.
//!
//! Each membership is its own swarm (`dht`), keyed by the same instance key (so
//! the node has one `PeerId` everywhere) and gated to that DHT's members, so a member of one
//! network never reaches another through this node. The first membership listens on
//! `settings.listen`; each further one on the same addresses with ports of its own, chosen
//! once and kept. [`Node`] is the handle the server holds: it sends each request to the
//! membership it concerns (an invite to the DHT it names, a join to the DHT of its invite, a
//! fetch to a DHT the target belongs to) and sums up their status.
//!
//! **State** (each membership's members, held records, known peer addresses and ports) is
//! kept through a [`StateStore`] the server gives ([`crate::state`]), so a restarted node
//! rejoins at once. The types the node shares with its memberships (settings, status,
//! errors, the join grant, [`Serve`]) live in [`crate::types`].
//!
//! It knows nothing of how a membership runs its swarm (gate, records, relays, fetches:
//! `dht`), nor of HTTP, SQL or documents.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use tokio::sync::mpsc;

use crate::dht::{Dht, Start};
use crate::identity::{Identity, Keypair};
use crate::invite::{Invite, InviteError, JoinRequest};
use crate::record::AddressRecord;
use crate::state::{DhtState, Persisted, SaveJob, StateStore, saver};
use crate::types::{
    DhtMembers, DhtStatus, JoinGrant, NodeError, NodeSettings, Peers, Serve, Status, check_dht_name,
    peer_id_of,
};

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

    /// The name of a DHT `id` is a member of (connected ones first), if any.
    pub fn dht_of(&self, id: &Identity) -> Option<String> {
        self.ask_order(id)
            .into_iter()
            .find(|d| d.is_member(id))
            .and_then(|d| d.name())
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

    /// Names `holders` (the mirrors keeping this node's sealed segments) in its record in
    /// DHT `dht`, so that a member looking it up while it is offline finds them.
    pub async fn set_holders(&self, dht: &str, holders: Vec<Identity>) -> Result<(), NodeError> {
        let d = self.membership(dht, false).await?;
        d.set_holders(holders).await
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
