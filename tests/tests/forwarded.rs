//! Forwarding headers are believed only from `trusted_proxies`, against the real `plait`
//! binary and a real origin: the reverse proxy drops what an untrusted client claims and
//! sets its own, extends a trusted proxy's chain, and per-client limits key on the client
//! a trusted proxy names.

use plait_tests::plait::{Plait, Store};
use plait_tests::upstream::Origin;
use plait_tests::wire;

fn plait_with(config: &str, env: &[(&str, &str)]) -> (Plait, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plait.toml");
    std::fs::write(&path, config).unwrap();
    let p = Plait::start_with_env(Store::Embedded, &["--config", path.to_str().unwrap()], env);
    (p, dir)
}

const CLAIMS: &[(&str, &str)] = &[
    ("X-Forwarded-For", "6.6.6.6"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Proto", "https"),
    ("Forwarded", "for=6.6.6.6;host=evil.example"),
    ("X-Real-IP", "6.6.6.6"),
];

async fn seen_by_origin(p: &Plait) -> serde_json::Value {
    let r = wire::send(p.addr, "GET", "/p/echo", CLAIMS, b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["headers"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_clients_forwarding_headers_are_replaced() {
    let origin = Origin::start().await;
    let (p, _dir) = plait_with(
        &format!("[[proxy]]\nprefix = \"/p\"\nupstream = \"{}\"\n", origin.url()),
        &[],
    );
    let h = seen_by_origin(&p).await;
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{h}");
    assert_eq!(h["x-forwarded-host"], p.addr.to_string(), "{h}");
    assert_eq!(h["x-forwarded-proto"], "http", "{h}");
    assert_eq!(
        h["forwarded"],
        format!("for=127.0.0.1;proto=http;host=\"{}\"", p.addr),
        "{h}"
    );
    assert!(h.get("x-real-ip").is_none(), "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxys_chain_is_extended() {
    let origin = Origin::start().await;
    let (p, _dir) = plait_with(
        &format!(
            "trusted_proxies = [\"127.0.0.0/8\"]\n[[proxy]]\nprefix = \"/p\"\nupstream = \"{}\"\n",
            origin.url()
        ),
        &[],
    );
    let h = seen_by_origin(&p).await;
    assert_eq!(h["x-forwarded-for"], "6.6.6.6, 127.0.0.1", "{h}");
    assert_eq!(h["x-forwarded-host"], "evil.example", "{h}");
    assert_eq!(h["x-forwarded-proto"], "https", "{h}");
    assert_eq!(
        h["forwarded"],
        format!(
            "for=6.6.6.6;host=evil.example, for=127.0.0.1;proto=http;host=\"{}\"",
            p.addr
        ),
        "{h}"
    );
}

/// With a write rate of one per second, two clients behind a trusted proxy each get their
/// own allowance; the same claims from an untrusted client are one client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_limits_use_the_client_a_trusted_proxy_names() {
    let json = |ip: &'static str| [("Content-Type", "application/json"), ("X-Forwarded-For", ip)];
    let rate = [
        ("PLAIT_LIMITS__WRITES_PER_SECOND", "1"),
        ("PLAIT_LIMITS__WRITE_BURST", "1"),
        // 429s answered at once: one held a second would outlast the one-second budget
        // these assertions rely on.
        ("PLAIT_LIMITS__RATE_LIMITED_DELAY_MS", "0"),
    ];
    let (trusting, _d1) = plait_with("trusted_proxies = [\"127.0.0.1\"]\n", &rate);
    let (wary, _d2) = plait_with("", &rate);
    let put = |p: &Plait, ip: &'static str, body: &'static [u8]| {
        let addr = p.addr;
        async move { wire::send(addr, "PUT", "/r", &json(ip), body).await }
    };
    assert_eq!(put(&trusting, "10.0.0.1", b"1").await.status, 200);
    let r = put(&trusting, "10.0.0.2", b"2").await;
    assert_eq!(r.status, 200, "another client behind the proxy: {}", r.text());
    let r = put(&trusting, "10.0.0.1", b"3").await;
    assert_eq!(
        r.status,
        429,
        "the first client's allowance is spent: {}",
        r.text()
    );
    assert_eq!(put(&wary, "10.0.0.1", b"1").await.status, 200);
    let r = put(&wary, "10.0.0.2", b"2").await;
    assert_eq!(
        r.status,
        429,
        "an untrusted claim is the same client: {}",
        r.text()
    );
}
