//! The swarm one membership runs: its transports (TCP with noise and yamux, and QUIC; the
//! relay client's circuits) and its protocols — the members-only gate, connection limits,
//! identify, ping, Kademlia under a protocol name that carries the DHT's name
//! (`/plait/kad/<dht>/1.0.0`) with record filtering on, the member-sync, fetch and mirror
//! request-response protocols, relay (server, when the settings say so) and DCUtR.
//!
//! It only builds: it knows nothing of what the membership does with the events, of its
//! members or its state.

use std::time::Duration;

use libp2p::kad::store::{MemoryStore, MemoryStoreConfig};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, Swarm, allow_block_list, connection_limits, dcutr, identify, kad, noise, ping, relay,
    tcp, yamux,
};

use super::fetch::{FetchReply, FetchRequest};
use super::gate::{Rpc, RpcReply};
use crate::identity::Keypair;
use crate::mirror::wire;
use crate::types::{FETCH_TIMEOUT, MAX_FETCH_BYTES, NodeError, NodeSettings, libp2p_keypair};

/// Every protocol a membership speaks, in one libp2p behaviour.
#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub(super) gate: allow_block_list::Behaviour<allow_block_list::AllowedPeers>,
    pub(super) limits: connection_limits::Behaviour,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) kad: kad::Behaviour<MemoryStore>,
    pub(super) rpc: request_response::json::Behaviour<Rpc, RpcReply>,
    pub(super) fetch: request_response::json::Behaviour<FetchRequest, FetchReply>,
    pub(super) mirror: request_response::Behaviour<wire::Codec>,
    pub(super) relay: Toggle<relay::Behaviour>,
    pub(super) relay_client: relay::client::Behaviour,
    pub(super) dcutr: dcutr::Behaviour,
}

/// Builds the swarm of a membership of DHT `dht`, keyed by the instance key.
pub(super) fn build_swarm(
    keys: &Keypair,
    settings: &NodeSettings,
    dht: &str,
) -> Result<Swarm<Behaviour>, NodeError> {
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
