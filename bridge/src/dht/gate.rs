//! The gate: who may connect to a membership, and how its member set changes and spreads.
//!
//! Only members of the DHT may connect (libp2p's allow list, checked when a connection is
//! established, in both directions). Invitees are admitted out of band (the server carries
//! the [`JoinRequest`] over HTTP to the inviter), then connect as members. When a node
//! admits someone it tells its connected peers, which check the cert chain and tell theirs
//! (`/plait/members/2.0.0`), so every member soon accepts every other. A removal travels the
//! same way; each node that takes it closes the removed member's connections and refuses it
//! from then on.
//!
//! This module holds the commands that change the member set (make a DHT and invite to it,
//! admit, join, remove) and the member-sync protocol. The cert chain's rules are
//! [`crate::invite`]'s; this module knows nothing of records, relays or fetches beyond
//! dropping a removed member's.

use libp2p::kad::store::RecordStore;
use libp2p::{Multiaddr, PeerId, kad, request_response};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::Runner;
use super::relay::is_relayed;
use crate::identity::Identity;
use crate::invite::{Invite, InviteError, JoinRequest, MemberCert, Membership, Merged, Removal};
use crate::record::AddressRecord;
use crate::types::{DhtMembers, JoinGrant, MemberInfo, NodeError, RemovedInfo, now_secs, peer_id_of};

/// What members tell each other of the member set: certs, and removals (with the certs
/// their removers gave the members the removed ones had admitted).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct MemberSync {
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
pub(super) enum Rpc {
    Members(MemberSync),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) enum RpcReply {
    Members(MemberSync),
}

impl Runner {
    pub(super) fn allow(&mut self, id: Identity) {
        if id == self.keys.identity() {
            return;
        }
        let pid = peer_id_of(&id);
        self.by_peer.insert(pid, id);
        self.swarm.behaviour_mut().gate.allow_peer(pid);
    }

    pub(super) fn our_sync(&self) -> MemberSync {
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
    pub(super) fn send_sync(&mut self, peer: PeerId, sync: MemberSync) {
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
    pub(super) fn roster(&self) -> Option<DhtMembers> {
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

    /// Makes an invite to this membership's DHT, creating DHT `dht` (with this node as its
    /// root) if it has joined none yet.
    pub(super) fn invite(
        &mut self,
        dht: String,
        join_url: String,
        ttl_secs: u64,
        uses: u32,
        reply: oneshot::Sender<Result<Invite, NodeError>>,
    ) {
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

    /// Inviter side: admits the sender of `req` if its invite is ours and valid; the grant
    /// is answered once the admission is stored.
    pub(super) fn admit(
        &mut self,
        req: Box<JoinRequest>,
        reply: oneshot::Sender<Result<JoinGrant, NodeError>>,
    ) {
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

    /// Invitee side: takes the grant (checked by the node already) and dials the inviter.
    pub(super) fn joined(&mut self, grant: JoinGrant, reply: oneshot::Sender<Result<(), NodeError>>) {
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

    /// Removes member `id`; answered with the DHT's name once the removal is stored.
    pub(super) fn remove(&mut self, id: Identity, reply: oneshot::Sender<Result<String, NodeError>>) {
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

    /// A member-sync request or answer from `peer`: its certs and removals are merged; a
    /// request is answered with ours. The first word from a peer dialled by hand also
    /// answers that dial ([`Runner::answer_dials`]).
    pub(super) fn rpc_event(&mut self, peer: PeerId, message: request_response::Message<Rpc, RpcReply>) {
        self.answer_dials(peer);
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
}
