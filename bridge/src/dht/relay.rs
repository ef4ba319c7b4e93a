//! Relays and hole punching: a membership behind NAT keeps a reservation on each relay of
//! `settings.relays` (asking again when one is lost), dials each relay over every transport
//! it listens on so a NAT reveals its public address on each, and upgrades relayed
//! connections to direct ones by DCUtR where the NATs allow. (Relaying for others is the
//! swarm's relay server, on when the settings say so; its gate lets only members in.)
//!
//! It knows nothing of records or fetches: relayed addresses reach the record through the
//! listeners a reservation makes.

use std::time::Duration;

use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{Multiaddr, PeerId, dcutr, relay};

use super::Runner;
use crate::types::NodeSettings;

/// How often a node makes again the relay reservations it lost (a relay restarted, the
/// network went away).
pub(super) const RELAY_RETRY: Duration = Duration::from_secs(10);

/// The relays of `settings.relays`: each one's peer and relayed address.
pub(super) fn relays_of(settings: &NodeSettings) -> Vec<(PeerId, Multiaddr)> {
    settings
        .relays
        .iter()
        .filter_map(|r| {
            let a = r.parse::<Multiaddr>().ok()?;
            let Some(Protocol::P2p(peer)) = a.iter().last() else {
                return None;
            };
            Some((peer, a.with(Protocol::P2pCircuit)))
        })
        .collect()
}

impl Runner {
    /// Dials relay `relay` once more over each transport this node listens on that no
    /// connection to it uses yet. Hole punching needs this node's public address on a
    /// transport both ends listen on, and a NAT reveals that address only to a peer reached
    /// over that transport (identify's observed address): with one connection to its relay, a
    /// home would know its public TCP address and another home only its QUIC one.
    pub(super) fn cover_transports(&mut self, relay: PeerId, relay_addrs: &[Multiaddr]) {
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

    pub(super) fn is_relay(&self, peer: &PeerId) -> bool {
        self.relays.iter().any(|(p, _)| p == peer)
    }

    /// Asks each configured relay that holds no reservation for us for one (only members
    /// are let in, so not before this node has joined).
    pub(super) fn reserve_relays(&mut self) {
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

    /// A listener closed: if it was a relay reservation, the next retry asks again.
    pub(super) fn relay_listener_closed(
        &mut self,
        listener_id: ListenerId,
        reason: &Result<(), std::io::Error>,
    ) {
        let before = self.relay_listeners.len();
        self.relay_listeners.retain(|_, id| *id != listener_id);
        if self.relay_listeners.len() < before {
            tracing::info!(reason = ?reason, "a relay reservation ended; asking again in {}s", RELAY_RETRY.as_secs());
        }
    }

    pub(super) fn relay_client_event(&mut self, ev: relay::client::Event) {
        if let relay::client::Event::ReservationReqAccepted {
            relay_peer_id,
            renewal: false,
            ..
        } = ev
        {
            tracing::info!(relay = %relay_peer_id, "reachable through relay {relay_peer_id}");
        }
    }

    pub(super) fn dcutr_event(&mut self, ev: dcutr::Event) {
        let dcutr::Event {
            remote_peer_id,
            result,
        } = ev;
        match result {
            Ok(_) => {
                tracing::info!(peer = %remote_peer_id, "direct connection to {remote_peer_id} by hole punching")
            }
            Err(e) => {
                tracing::debug!(peer = %remote_peer_id, error = %e, "hole punching failed; staying relayed")
            }
        }
    }
}

/// A direct connection's transport, as far as hole punching is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Transport {
    Tcp,
    Quic,
}

pub(super) fn transport_of(a: &Multiaddr) -> Option<Transport> {
    if is_relayed(a) {
        return None;
    }
    a.iter().find_map(|p| match p {
        Protocol::QuicV1 => Some(Transport::Quic),
        Protocol::Tcp(_) => Some(Transport::Tcp),
        _ => None,
    })
}

pub(super) fn is_relayed(a: &Multiaddr) -> bool {
    a.iter().any(|p| p == Protocol::P2pCircuit)
}

#[cfg(test)]
mod tests {
    use super::*;

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
