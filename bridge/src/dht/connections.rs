//! Connections to peers: who is connected and over which addresses (direct or relayed),
//! what a new connection sets going (member sync, a relay reservation, the first record),
//! peers' listen addresses as identify tells them, and dials made by hand (`plait connect`),
//! answered when the peer speaks to this node (it admitted us) or hangs up (it did not).
//!
//! It knows nothing of who may connect (the gate decides) nor of what members ask.

use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, DialError};
use libp2p::{Multiaddr, PeerId, identify};
use std::num::NonZeroU32;
use tokio::sync::oneshot;

use super::Runner;
use super::gate::{MemberSync, Rpc};
use crate::identity::Identity;
use crate::types::NodeError;

impl Runner {
    /// Dials `addr` by hand; answered with the identity that answered.
    pub(super) fn connect(&mut self, addr: Multiaddr, reply: oneshot::Sender<Result<Identity, NodeError>>) {
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

    /// The first word from a peer dialled by hand answers the dial: a member's if the gate
    /// knows it, else a refusal.
    pub(super) fn answer_dials(&mut self, peer: PeerId) {
        if let Some(waiting) = self.admitted_wait.remove(&peer) {
            let id = self.by_peer.get(&peer).copied();
            for w in waiting {
                let _ =
                    w.send(id.ok_or_else(|| {
                        NodeError::Refused(format!("{peer} is not a member of this node's DHT"))
                    }));
            }
        }
    }

    pub(super) fn connection_established(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        endpoint: ConnectedPoint,
        num_established: NonZeroU32,
    ) {
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

    pub(super) fn connection_closed(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        num_established: u32,
    ) {
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

    pub(super) fn dial_failed(&mut self, connection_id: ConnectionId, error: DialError) {
        if let Some(w) = self.dials.remove(&connection_id) {
            let _ = w.send(Err(NodeError::Refused(format!("dial failed: {error}"))));
        }
    }

    /// A member's listen addresses, as identify tells them: kept (for Kademlia and for the
    /// next start), and used to cover a relay's transports.
    pub(super) fn identified(&mut self, peer_id: PeerId, info: identify::Info) {
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
}
