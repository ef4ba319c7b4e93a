//! Statebus compatibility: the websocket protocol (v7 and v6 dialects), accounts and
//! `current_user`, permissions, and import of statebus stores.
//!
//! [`keys`] classifies Statebus keys; [`wire`] is the message codec (the only place that
//! knows Statebus frames); [`access`] decides where a key lives and who may read or write
//! it, for the websocket and for Braid-HTTP alike; [`session`] serves one websocket;
//! [`connections`] is the registry of live connections behind the v6 `connections` and
//! `connection` states; [`import`] loads a statebus server's store. State itself is the engine's: a Statebus key
//! is a JSON resource, so websocket and Braid-HTTP clients see each other's writes live.

pub mod access;
pub mod connections;
pub mod import;
pub mod keys;
pub mod session;
pub mod wire;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::access::Access;
use crate::config::Limits;
use crate::engine::Engine;
use plait_bridge::Identity;

/// What a Statebus connection needs from the rest of the server, and nothing more: it does
/// not know about the proxy, static files, the p2p node or how HTTP is routed.
#[derive(Clone)]
pub struct Services {
    pub engine: Engine,
    /// The instance's identity: whose namespace `/` is.
    pub identity: Identity,
    pub access: Access,
    pub limits: Arc<Limits>,
    /// Cancelled when the server shuts down; open connections close on it.
    pub shutdown: CancellationToken,
    /// Where each refusal told to a client is tallied.
    pub refusals: Arc<crate::refusals::Refusals>,
    /// How fast each client address's messages are read.
    pub messages: Arc<MessageRate>,
    /// Where subscriptions and deliveries are counted.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Every open Statebus connection (the v6 `connections` state).
    pub connections: Arc<connections::Registry>,
}

/// Paces the messages read from each client address over all its Statebus websockets
/// (`limits.statebus_messages_per_second_per_address`, a burst of two seconds' worth):
/// each `get` of a new key costs a subscription and a load, so a flood of them must not
/// take the server from everyone else. Past the rate the connection's next message is
/// read later, so TCP pushes back on the client; nothing is refused or lost.
pub struct MessageRate {
    rate: Option<governor::DefaultKeyedRateLimiter<std::net::IpAddr>>,
}

impl MessageRate {
    pub fn new(per_second: u32) -> MessageRate {
        let rate = std::num::NonZeroU32::new(per_second).map(|n| {
            let burst = std::num::NonZeroU32::new(per_second.saturating_mul(2)).unwrap_or(n);
            governor::RateLimiter::keyed(governor::Quota::per_second(n).allow_burst(burst))
        });
        MessageRate { rate }
    }

    /// Waits until `ip` may send its next message.
    pub async fn ready(&self, ip: std::net::IpAddr) {
        if let Some(rate) = &self.rate {
            rate.until_key_ready(&ip).await;
        }
    }

    /// Forgets addresses idle long enough that their buckets are full again.
    pub fn prune(&self) {
        if let Some(rate) = &self.rate {
            rate.retain_recent();
        }
    }
}
