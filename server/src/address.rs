//! Client addresses as per-address limits count them.
//!
//! Every limit kept per client address (connections, multiplexers, Statebus messages,
//! anonymous writes, logins, account creation, the hold on bad requests) is keyed by an
//! [`AddressKey`]: an IPv4 address, or an IPv6 address's /64. An IPv6 subscriber is given
//! at least a /64 (RFC 6177), and picks addresses inside it at will: keyed by the whole
//! address, one machine could take 2^64 shares of every per-address limit. An IPv4 client
//! on a dual-stack listener (an IPv4-mapped IPv6 address) counts as its IPv4 address.
//!
//! Knows nothing of the limits themselves, nor of where the address came from (the
//! connection, or a trusted proxy's `Forwarded`).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// The share of per-address limits a client address draws on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddressKey(IpAddr);

impl AddressKey {
    pub fn of(ip: IpAddr) -> AddressKey {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let net = u128::from(v6) & !(u128::from(u64::MAX));
                AddressKey(IpAddr::V6(Ipv6Addr::from(net)))
            }
            v4 => AddressKey(v4),
        }
    }
}

impl fmt::Display for AddressKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> AddressKey {
        AddressKey::of(s.parse().unwrap())
    }

    #[test]
    fn an_ipv6_64_is_one_client_and_ipv4_is_per_address() {
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("2001:db8:1:2:aaaa::7").to_string(), "2001:db8:1:2::/64");
        assert_ne!(key("10.0.0.1"), key("10.0.0.2"));
        assert_eq!(key("::ffff:10.0.0.1"), key("10.0.0.1"), "IPv4-mapped is IPv4");
        assert_eq!(key("10.0.0.1").to_string(), "10.0.0.1");
    }
}
