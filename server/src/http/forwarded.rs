//! Who the client is when Plait sits behind a reverse proxy.
//!
//! `Forwarded` (RFC 7239) and `X-Forwarded-For` are claims any client can make, so they are
//! believed only from the addresses in `trusted_proxies`. [`client_addr`] is the one place
//! that decides a request's client address: the connection's peer, or — when that peer is
//! a trusted proxy — the nearest address in the forwarding chain that is not one. Every
//! per-address limit uses it (through the `Peer` request extension); the reverse proxy uses
//! [`TrustedProxies::contains`] to decide whether to extend the chain it received or to
//! start a new one.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

/// The other end of a request's connection, whether it is a trusted proxy, and whether
/// it came over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remote {
    pub addr: SocketAddr,
    pub trusted: bool,
    /// The connection is HTTPS (`[tls]`): the proxy tells upstreams `proto=https`.
    pub https: bool,
}

/// The addresses whose forwarding headers are believed (`trusted_proxies`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    /// From settings: IP addresses (`10.0.0.1`, `::1`) or networks (`10.0.0.0/8`).
    pub fn parse(list: &[String]) -> Result<TrustedProxies, String> {
        let nets = list
            .iter()
            .map(|s| {
                let s = s.trim();
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("trusted_proxies: {s:?} is not an IP address or a CIDR network"))
            })
            .collect::<Result<_, _>>()?;
        Ok(TrustedProxies { nets })
    }

    /// Whether `ip` is a trusted proxy (an IPv4-mapped IPv6 address counts as its IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|n| n.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }
}

/// The client's address for a request that arrived from `peer`: `peer` itself, unless it
/// is a trusted proxy; then the forwarding chain (`Forwarded`, else `X-Forwarded-For`) is
/// read from the nearest hop back, skipping trusted proxies, and the first other address
/// is the client. A chain that names no usable address leaves `peer`.
pub fn client_addr(peer: SocketAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> SocketAddr {
    if !trusted.contains(peer.ip()) {
        return peer;
    }
    let chain = if headers.contains_key(http::header::FORWARDED) {
        forwarded_for(headers)
    } else {
        x_forwarded_for(headers)
    };
    let mut client = peer;
    for hop in chain.into_iter().rev() {
        let Some(ip) = hop else {
            // An obfuscated or unknown hop: nothing further back can be checked.
            break;
        };
        client = SocketAddr::new(ip, 0);
        if !trusted.contains(ip) {
            break;
        }
    }
    client
}

/// The `for=` addresses of all `Forwarded` headers, nearest hop last; `None` for a hop
/// that names no IP address (`unknown`, an obfuscated name).
fn forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all(http::header::FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| split_unquoted(v, ','))
        .map(|element| {
            split_unquoted(element, ';')
                .into_iter()
                .filter_map(|pair| pair.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("for"))
                .and_then(|(_, v)| parse_node(v.trim().trim_matches('"')))
        })
        .collect()
}

/// `s` cut at each `sep` that is not inside a quoted string: a `Forwarded` value may be
/// quoted (RFC 7239 §4), and a quoted `host` may hold `,`, `;` and `=`, which must not
/// start another element (a client's `Host: x,for=6.6.6.6` would otherwise name a hop).
fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// The addresses of all `X-Forwarded-For` headers, nearest hop last.
fn x_forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| parse_node(s.trim()))
        .collect()
}

/// An address as forwarding headers write it: `192.0.2.1`, `192.0.2.1:80`, `[2001:db8::1]`,
/// `[2001:db8::1]:80`, `2001:db8::1`.
fn parse_node(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    let inner = s.strip_prefix('[')?.split(']').next()?;
    inner.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn forwarding_headers_count_only_from_trusted_proxies() {
        let trusted = TrustedProxies::parse(&["10.0.0.0/8".into(), "::1".into()]).unwrap();
        let proxy: SocketAddr = "10.1.2.3:4000".parse().unwrap();
        let stranger: SocketAddr = "192.0.2.9:4000".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "198.51.100.7, 10.0.0.5")]);
        assert_eq!(client_addr(stranger, &h, &trusted), stranger);
        assert_eq!(client_addr(proxy, &h, &trusted).ip().to_string(), "198.51.100.7");
        // A client's own claim further back is not reached past an untrusted hop.
        let h = headers(&[("x-forwarded-for", "1.1.1.1, 198.51.100.7")]);
        assert_eq!(client_addr(proxy, &h, &trusted).ip().to_string(), "198.51.100.7");
        let h = headers(&[
            ("forwarded", "for=1.1.1.1"),
            ("forwarded", "for=\"[2001:db8::7]:80\";proto=https, for=10.0.0.5"),
            ("x-forwarded-for", "3.3.3.3"),
        ]);
        assert_eq!(client_addr(proxy, &h, &trusted).ip().to_string(), "2001:db8::7");
        let h = headers(&[("forwarded", "for=unknown")]);
        assert_eq!(client_addr(proxy, &h, &trusted), proxy);
        // A quoted value's commas and semicolons do not make hops (found by the
        // proxy_headers fuzz target: a client's Host spoofed the nearest hop).
        let h = headers(&[("forwarded", "for=198.51.100.7;host=\"a,for=6.6.6.6\"")]);
        assert_eq!(client_addr(proxy, &h, &trusted).ip().to_string(), "198.51.100.7");
        let h = headers(&[("forwarded", "host=\"x\\\";for=6.6.6.6\";for=198.51.100.8")]);
        assert_eq!(client_addr(proxy, &h, &trusted).ip().to_string(), "198.51.100.8");
        let v6: SocketAddr = "[::ffff:10.0.0.1]:1".parse().unwrap();
        assert!(trusted.contains(v6.ip()));
        assert!(TrustedProxies::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(TrustedProxies::default().is_empty());
    }
}
