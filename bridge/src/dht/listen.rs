//! Where a membership listens and what addresses it tells and dials: its listeners (an
//! address that cannot be used costs only that listener), the ports a further membership
//! keeps once the system chose them, and which addresses are worth telling others about or
//! dialling (no unspecified ones; loopback ones only where there is nothing else; none of
//! this node's own).
//!
//! It knows nothing of members or records: a change of the listen addresses is published
//! through the status and the record, which are theirs.

use libp2p::Multiaddr;
use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;

use super::Runner;
use super::relay::is_relayed;

impl Runner {
    /// Listens on `addrs`. An address that cannot be used (its port taken, say by another
    /// process on the same data dir) costs only that listener: the node still dials out and
    /// serves the peers that reach it elsewhere.
    pub(super) fn listen_on(&mut self, addrs: &[Multiaddr]) {
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

    /// What of a peer's addresses is worth dialling: [`worth_dialling`], less any address
    /// this node listens on itself (a private address two LANs share reaches this node).
    pub(super) fn peer_addrs(&self, addrs: impl IntoIterator<Item = Multiaddr>) -> Vec<Multiaddr> {
        let mut addrs = worth_dialling(addrs);
        addrs.retain(|a| {
            let bare: Multiaddr = a.iter().filter(|p| !matches!(p, Protocol::P2p(_))).collect();
            !self.listen.contains(&bare)
        });
        addrs
    }

    /// The swarm listens on a new address: published as this node's own.
    pub(super) fn new_listen_addr(&mut self, listener_id: ListenerId, address: Multiaddr) {
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

    pub(super) fn expired_listen_addr(&mut self, address: Multiaddr) {
        self.listen.retain(|a| a != &address);
        self.publish_status();
        self.publish_record();
    }

    pub(super) fn listener_closed(
        &mut self,
        listener_id: ListenerId,
        addresses: Vec<Multiaddr>,
        reason: Result<(), std::io::Error>,
    ) {
        self.relay_listener_closed(listener_id, &reason);
        self.listen.retain(|a| !addresses.contains(a));
        self.publish_status();
        self.publish_record();
    }
}

/// The addresses of a list worth telling others about, or dialling: never unspecified ones,
/// and loopback ones only where there is nothing else (every process on one machine: tests,
/// one-host set-ups). Another machine's loopback address reaches the dialler itself, and a
/// dial that reaches the wrong peer fails whole, even if a later address would have worked.
pub(super) fn worth_dialling(addrs: impl IntoIterator<Item = Multiaddr>) -> Vec<Multiaddr> {
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
}
