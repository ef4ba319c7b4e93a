//! The reverse proxy's header handling: hop-by-hop removal (`forward::end_to_end`), the
//! forwarding headers it sets (`forward::add_forwarding`), who the client is
//! (`http::forwarded::client_addr`, `Forwarded` / `X-Forwarded-For`), `trusted_proxies`
//! settings, dot segments and the upstream URL built from a request's path. Input: a
//! request line's target on the first line, then header lines; the first byte also picks
//! the peer address and whether it is trusted.
//!
//! Beyond not panicking: no hop-by-hop header (nor one `Connection` names) survives
//! `end_to_end`; from an untrusted peer, the forwarding headers sent upstream name only
//! that peer, whatever the client claimed; an untrusted peer is its own client address; a
//! path with dot segments is refused, and the upstream URL keeps the route's origin.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::Uri;
use libfuzzer_sys::fuzz_target;
use plait_server::http::forwarded::{Remote, TrustedProxies, client_addr};
use plait_server::proxy::forward::{add_forwarding, end_to_end};
use plait_server::proxy::{Route, has_dot_segments, upstream_url};

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let (target, head) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let headers = plait_fuzz::header_map(head);
    let peer_ip = if pick & 1 == 0 {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, pick))
    } else {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(pick)))
    };
    let peer = SocketAddr::new(peer_ip, 40000);
    let trusted = TrustedProxies::parse(&["10.0.0.0/24".into(), "2001:db8::/120".into(), "::1".into()])
        .expect("valid settings");
    let trusted = if pick & 2 == 0 {
        trusted
    } else {
        TrustedProxies::default()
    };

    // Who the client is.
    let client = client_addr(peer, &headers, &trusted);
    if !trusted.contains(peer.ip()) {
        assert_eq!(client, peer);
    }

    // What goes upstream.
    let upgrade = pick & 4 != 0;
    let mut out = end_to_end(&headers, upgrade);
    let named: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    for name in out.keys() {
        let n = name.as_str();
        let kept_for_upgrade = upgrade && (n == "connection" || n == "upgrade");
        assert!(
            kept_for_upgrade || !(HOP_BY_HOP.contains(&n) || named.iter().any(|x| x == n)),
            "{n} went upstream"
        );
    }
    let from = Remote {
        addr: peer,
        trusted: trusted.contains(peer.ip()),
        https: false,
    };
    let host = headers.get(http::header::HOST).cloned();
    add_forwarding(&mut out, from, host.as_ref());
    if !from.trusted {
        let xff: Vec<_> = out.get_all("x-forwarded-for").iter().collect();
        assert_eq!(xff.len(), 1);
        assert_eq!(xff[0].to_str().ok(), Some(peer.ip().to_string().as_str()));
        assert_eq!(out.get_all("forwarded").iter().count(), 1);
        assert!(out.get("x-real-ip").is_none());
        // The chain Plait sent names this peer and no one else.
        let mut upstream_view = out.clone();
        upstream_view.remove("x-forwarded-for");
        let seen = client_addr(
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 1),
            &upstream_view,
            &TrustedProxies::parse(&["::1".into()]).expect("valid"),
        );
        assert_eq!(seen.ip(), peer.ip(), "{:?}", out.get("forwarded"));
    }

    // Paths and the upstream URL.
    let Ok(target) = std::str::from_utf8(target) else {
        return;
    };
    if let Ok(uri) = target.parse::<Uri>() {
        if has_dot_segments(uri.path()) {
            return;
        }
        let route = Route {
            prefix: "/api".into(),
            upstream: Uri::from_static("http://127.0.0.1:3000"),
            live: None,
        };
        let url = upstream_url(&route, &uri);
        assert_eq!(url.authority().map(|a| a.as_str()), Some("127.0.0.1:3000"));
        assert_eq!(url.scheme_str(), Some("http"));
    }
    let _ = TrustedProxies::parse(&target.split(',').map(str::to_string).collect::<Vec<_>>());
});
