//! Plain forwarding to an upstream: bodies stream both ways (nothing is buffered whole),
//! hop-by-hop headers are dropped, `Forwarded` and `X-Forwarded-*` are added, connections
//! are pooled, websocket upgrades become a tunnel. An upstream that cannot be reached is a
//! 502, one that does not answer in time a 504, each with a one-line reason.

use std::sync::Arc;

use axum::body::Body;
use base64::Engine as _;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::{Proxy, Route, upstream_url};
use crate::http::error::ApiError;
use crate::http::forwarded::Remote;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
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

/// A copy of `headers` without hop-by-hop headers (also those the `Connection` header
/// names). With `upgrade`, the websocket handshake's `Connection`/`Upgrade` are kept.
pub fn end_to_end(headers: &HeaderMap, upgrade: bool) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (k, v) in headers {
        let name = k.as_str();
        let keep_for_upgrade = upgrade && (name == "connection" || name == "upgrade");
        if !keep_for_upgrade && (HOP_BY_HOP.contains(&name) || named.iter().any(|n| n == name)) {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    out
}

fn is_websocket_upgrade(h: &HeaderMap) -> bool {
    h.get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Whether `req` opens a websocket over HTTP/2 (RFC 8441: extended CONNECT with
/// `:protocol websocket`).
pub fn is_h2_websocket<B>(req: &Request<B>) -> bool {
    req.method() == http::Method::CONNECT
        && req.version() == http::Version::HTTP_2
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// Sets `Forwarded` and `X-Forwarded-For/Proto/Host` for a request that came from
/// `from`. From a trusted proxy the chain it sent is extended (and the original protocol
/// and host it names are kept); from anyone else whatever forwarding headers the client
/// sent are dropped and a new chain starts. The host is passed on only when it is a
/// well-formed `host[:port]` of name, address and port characters: an authority may also
/// hold `,` `;` `=` (sub-delims), which a reader of `Forwarded` that does not honour the
/// quotes would take for another hop.
pub fn add_forwarding(h: &mut HeaderMap, from: Remote, host: Option<&HeaderValue>) {
    if !from.trusted {
        let claimed: Vec<HeaderName> = h
            .keys()
            .filter(|k| {
                let k = k.as_str();
                k == "forwarded" || k.starts_with("x-forwarded-") || k == "x-real-ip"
            })
            .cloned()
            .collect();
        for k in claimed {
            h.remove(k);
        }
    }
    let ip = from.addr.ip();
    let for_ = if ip.is_ipv6() {
        format!("\"[{ip}]\"")
    } else {
        ip.to_string()
    };
    let host = host.filter(|v| {
        v.to_str()
            .ok()
            .and_then(|s| s.parse::<http::uri::Authority>().ok())
            .is_some_and(|a| {
                a.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b))
            })
    });
    let proto = if from.https { "https" } else { "http" };
    let mut fwd = format!("for={for_};proto={proto}");
    if let Some(host) = host.and_then(|v| v.to_str().ok()) {
        fwd.push_str(&format!(";host=\"{host}\""));
    }
    let append = |h: &mut HeaderMap, name: &'static str, value: String, sep: &str| {
        let v = match h.get(name).and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}{sep}{value}"),
            None => value,
        };
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(HeaderName::from_static(name), v);
        }
    };
    append(h, "forwarded", fwd, ", ");
    append(h, "x-forwarded-for", ip.to_string(), ", ");
    if !h.contains_key("x-forwarded-proto") {
        h.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    }
    if let Some(host) = host
        && !h.contains_key("x-forwarded-host")
    {
        h.insert("x-forwarded-host", host.clone());
    }
}

/// Why forwarding failed, as an answer.
pub fn upstream_error(route: &Route, e: &hyper_util::client::legacy::Error) -> ApiError {
    let authority = route
        .upstream
        .authority()
        .map_or(String::new(), |a| a.to_string());
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
            return ApiError::new(
                413,
                "body-too-large",
                "the request body is over limits.max_proxy_body_bytes",
            );
        }
        source = s.source();
    }
    if e.is_connect() {
        ApiError::new(
            502,
            "upstream-unreachable",
            format!("upstream {authority} cannot be reached"),
        )
    } else {
        ApiError::new(
            502,
            "upstream-failed",
            format!("upstream {authority} failed: {e}"),
        )
    }
}

pub fn timeout_error(route: &Route, after: std::time::Duration) -> ApiError {
    let authority = route
        .upstream
        .authority()
        .map_or(String::new(), |a| a.to_string());
    ApiError::new(
        504,
        "upstream-timeout",
        format!(
            "upstream {authority} did not answer within {} ms",
            after.as_millis()
        ),
    )
}

/// Forwards one request and streams back the answer.
pub async fn forward(
    proxy: &Arc<Proxy>,
    route: &Route,
    mut req: Request<Body>,
    from: Remote,
) -> Response<Body> {
    let settings = proxy.settings;
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > settings.max_body_bytes) {
        return ApiError::new(
            413,
            "body-too-large",
            format!(
                "the body is {} bytes; limits.max_proxy_body_bytes is {}",
                declared.unwrap_or(0),
                settings.max_body_bytes
            ),
        )
        .into_response();
    }
    // A websocket over HTTP/2 (RFC 8441) goes upstream as an HTTP/1.1 upgrade.
    let h2_websocket = is_h2_websocket(&req);
    let upgrade = h2_websocket || is_websocket_upgrade(req.headers());
    let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let mut headers = end_to_end(&parts.headers, upgrade);
    let host = headers.remove(http::header::HOST).or_else(|| {
        // HTTP/2 names the host in `:authority`.
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    add_forwarding(&mut headers, from, host.as_ref());
    // An HTTP/2 websocket is a stream of a connection that must not be closed as idle
    // while the tunnel is open.
    let in_flight = h2_websocket
        .then(|| {
            parts
                .extensions
                .get::<crate::http::conn::Activity>()
                .map(|a| a.begin())
        })
        .flatten();
    if h2_websocket {
        parts.method = http::Method::GET;
        headers.insert(http::header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
        let key: [u8; 16] = rand::random();
        let key = base64::engine::general_purpose::STANDARD.encode(key);
        if let Ok(key) = HeaderValue::from_str(&key) {
            headers.insert(http::header::SEC_WEBSOCKET_KEY, key);
        }
    }
    let body = if upgrade {
        Body::empty()
    } else {
        Body::new(http_body_util::Limited::new(
            body,
            settings.max_body_bytes as usize,
        ))
    };
    let mut up = Request::new(body);
    *up.method_mut() = parts.method;
    *up.uri_mut() = upstream_url(route, &parts.uri);
    *up.headers_mut() = headers;
    let resp = match tokio::time::timeout(settings.response_timeout, proxy.client.request(up)).await {
        Err(_) => return timeout_error(route, settings.response_timeout).into_response(),
        Ok(Err(e)) => return upstream_error(route, &e).into_response(),
        Ok(Ok(r)) => r,
    };
    if let Some(client_side) = client_side
        && resp.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        let mut resp = resp;
        let upstream_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let (Ok(client), Ok(upstream)) = tokio::join!(client_side, upstream_side) else {
                return;
            };
            let _ =
                tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(upstream)).await;
        });
        let mut out = Response::new(Body::empty());
        if h2_websocket {
            // RFC 8441: a 200 opens the tunnel; no upgrade headers, no accept key.
            let mut h = end_to_end(resp.headers(), false);
            h.remove(http::header::SEC_WEBSOCKET_ACCEPT);
            *out.headers_mut() = h;
        } else {
            *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            *out.headers_mut() = end_to_end(resp.headers(), true);
        }
        return out;
    }
    let (parts, body) = resp.into_parts();
    let mut out = Response::new(Body::new(body));
    *out.status_mut() = parts.status;
    *out.headers_mut() = end_to_end(&parts.headers, false);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        let out = end_to_end(&h, false);
        assert_eq!(out.len(), 1);
        assert!(out.contains_key("content-type"));
        let out = end_to_end(&h, true);
        assert!(out.contains_key("upgrade") && out.contains_key("connection"));
    }

    #[test]
    fn forwarding_headers_are_replaced_unless_from_a_trusted_proxy() {
        let claims = || {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
            h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
            h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
            h.insert("forwarded", HeaderValue::from_static("for=10.0.0.1"));
            h.insert("x-real-ip", HeaderValue::from_static("10.0.0.1"));
            h
        };
        let stranger = Remote {
            addr: "192.0.2.7:5555".parse().unwrap(),
            trusted: false,
            https: false,
        };
        let mut h = claims();
        add_forwarding(&mut h, stranger, Some(&HeaderValue::from_static("app.example")));
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app.example");
        assert_eq!(h["forwarded"], "for=192.0.2.7;proto=http;host=\"app.example\"");
        assert!(!h.contains_key("x-real-ip"));
        let proxy = Remote {
            addr: "192.0.2.7:5555".parse().unwrap(),
            trusted: true,
            https: false,
        };
        let mut h = claims();
        add_forwarding(&mut h, proxy, Some(&HeaderValue::from_static("app.example")));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "evil.example");
        assert_eq!(
            h["forwarded"],
            "for=10.0.0.1, for=192.0.2.7;proto=http;host=\"app.example\""
        );
        let mut h = HeaderMap::new();
        let v6 = Remote {
            addr: "[2001:db8::1]:80".parse().unwrap(),
            trusted: false,
            https: false,
        };
        add_forwarding(&mut h, v6, Some(&HeaderValue::from_static("bad host\"x")));
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\";proto=http");
        assert!(!h.contains_key("x-forwarded-host"));
        // Over HTTPS, upstreams are told so.
        let mut h = HeaderMap::new();
        let tls = Remote {
            addr: "192.0.2.7:5555".parse().unwrap(),
            trusted: false,
            https: true,
        };
        add_forwarding(&mut h, tls, None);
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["forwarded"], "for=192.0.2.7;proto=https");
        // An authority with sub-delims is not passed on (found by the proxy_headers fuzz
        // target: `Host: a,for=6.6.6.6` named a hop to readers that split on commas).
        for host in [
            "app.example,for=6.6.6.6",
            "app.:zfo,=umxlpen",
            "a;for=6.6.6.6:80",
            "user@app.example",
        ] {
            let mut h = HeaderMap::new();
            add_forwarding(&mut h, stranger, Some(&HeaderValue::from_static(host)));
            assert_eq!(h["forwarded"], "for=192.0.2.7;proto=http", "{host}");
            assert!(!h.contains_key("x-forwarded-host"), "{host}");
        }
        let mut h = HeaderMap::new();
        add_forwarding(&mut h, stranger, Some(&HeaderValue::from_static("[::1]:7524")));
        assert_eq!(h["x-forwarded-host"], "[::1]:7524");
    }
}
