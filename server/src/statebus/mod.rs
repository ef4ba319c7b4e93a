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

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::access::Access;
use crate::address::AddressKey;
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
///
/// Each message reserves the next slot of its address's schedule (a GCRA: the address's
/// theoretical arrival time moves on by one interval per message, and a message may go
/// once that time is within the burst of now), and its reader sleeps until that slot.
/// Readers of one address so wake one at a time, in the order they asked. (A rate
/// limiter that is only asked "may I now?" wakes every waiting reader of a flooding
/// address at each free slot, all but one to wait again: with 256 connections from one
/// address that took the server from everyone else, 14× the normal clients' p99.)
pub struct MessageRate {
    /// One message's share of a second; `None`: no pacing.
    interval: Option<Duration>,
    /// How far ahead of now an address's schedule may run before it waits.
    burst: Duration,
    /// Each address's theoretical arrival time.
    next: crate::schedule::Schedule<AddressKey>,
}

impl MessageRate {
    pub fn new(per_second: u32) -> MessageRate {
        let interval = (per_second > 0).then(|| Duration::from_secs(1) / per_second);
        MessageRate {
            interval,
            // Two seconds' worth.
            burst: Duration::from_secs(2),
            next: crate::schedule::Schedule::default(),
        }
    }

    /// Waits until `ip` may send its next message.
    pub async fn ready(&self, ip: IpAddr) {
        let Some(at) = self.reserve(ip, Instant::now()) else {
            return;
        };
        tokio::time::sleep_until(at.into()).await;
    }

    /// Takes `ip`'s next slot at `now`: when its message may be read, or `None` for now.
    fn reserve(&self, ip: IpAddr, now: Instant) -> Option<Instant> {
        let tat = self.next.push(AddressKey::of(ip), now, self.interval?);
        // A burst's worth of slots may be taken ahead of now.
        tat.checked_sub(self.burst).filter(|&at| at > now)
    }

    /// Forgets addresses whose schedules have fallen behind `now` (a full burst again).
    pub fn prune(&self, now: Instant) {
        self.next.prune(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_paced_per_address_in_order() {
        let rate = MessageRate::new(1_000);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let now = Instant::now();
        // Two seconds' worth at once, then one slot a millisecond, each later than the last.
        for _ in 0..2_000 {
            assert_eq!(rate.reserve(a, now), None);
        }
        let slots: Vec<Instant> = (0..5)
            .map(|_| rate.reserve(a, now).expect("past the burst"))
            .collect();
        for (k, w) in slots.windows(2).enumerate() {
            assert_eq!(w[1] - w[0], Duration::from_millis(1), "slot {k}");
        }
        assert!(slots[0] > now && slots[0] <= now + Duration::from_millis(1));
        // Another address has its own schedule; none at all with pacing off.
        assert_eq!(rate.reserve(b, now), None);
        let off = MessageRate::new(0);
        for _ in 0..10_000 {
            assert_eq!(off.reserve(a, now), None);
        }
        // Once its schedule is behind, an address is forgotten: b's, a millisecond ahead,
        // a moment later; a's still runs seconds ahead.
        rate.prune(now);
        assert_eq!(rate.next.len(), 2);
        rate.prune(now + Duration::from_millis(2));
        assert_eq!(rate.next.len(), 1);
    }
}
