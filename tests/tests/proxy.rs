//! Plait in front of other servers: plain forwarding (headers, streaming, limits, 502/504,
//! no open proxy), websocket pass-through, the Braid-aware caching proxy against a second
//! `plait` as upstream (one upstream subscription for 100 local ones, across an upstream
//! restart), live legacy routes, and static files with an app on the same origin.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use plait_tests::plait::{Plait, Store};
use plait_tests::upstream::{self, Origin};
use plait_tests::wire::{self, Block, Subscription};

const T: Duration = Duration::from_secs(10);

/// A plait with a config file (routes, limits) and optional extra arguments.
fn plait_with(config: &str, extra: &[&str]) -> (Plait, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plait.toml");
    std::fs::write(&path, config).unwrap();
    let mut args = vec!["--config", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    (Plait::start_with(Store::Embedded, &args), dir)
}

fn json(r: &wire::Response) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_streaming_limits_and_refusals() {
    let origin = Origin::start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap(); // closed on drop
    let cfg = format!(
        "[[proxy]]\nprefix = \"/p\"\nupstream = \"{}\"\n[[proxy]]\nprefix = \"/dead\"\nupstream = \"http://{dead}\"\n\
         [limits]\nproxy_response_timeout_ms = 1000\nmax_proxy_body_bytes = 1048576\n",
        origin.url()
    );
    let (p, _dir) = plait_with(&cfg, &[]);
    // Headers: hop-by-hop dropped both ways, forwarding headers added.
    let r = wire::send(
        p.addr,
        "GET",
        "/p/echo?q=1",
        &[
            ("Connection", "keep-alive, X-Private"),
            ("X-Private", "secret"),
            ("Keep-Alive", "timeout=9"),
            ("TE", "trailers"),
            ("X-App", "kept"),
        ],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = json(&r);
    assert_eq!(seen["path"], "/p/echo?q=1");
    let h = &seen["headers"];
    assert_eq!(h["x-app"], "kept");
    for gone in ["x-private", "keep-alive", "te"] {
        assert!(h.get(gone).is_none(), "{gone} reached the upstream: {h}");
    }
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], p.addr.to_string());
    assert!(
        h["forwarded"]
            .as_str()
            .unwrap()
            .starts_with("for=127.0.0.1;proto=http")
    );
    assert_eq!(r.header("x-origin"), Some("yes"));
    assert!(r.header("keep-alive").is_none());
    // Streaming down: the first part arrives before the upstream has sent the second.
    let mut s = wire::subscribe(p.addr, "/p/stream", &[]).await;
    let t0 = Instant::now();
    let first = s.raw_for(Duration::from_millis(300)).await;
    assert_eq!(first, b"first", "after {:?}", t0.elapsed());
    // Streaming up: 5 MB as chunks reach the upstream whole (limit raised for this route
    // below 1 MiB? no: this is over the limit, so it must be refused).
    let big = vec![b'x'; 2 << 20];
    let r = wire::send(p.addr, "PUT", "/p/upload", &[], &big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.header("plait-error"), Some("body-too-large"));
    let mut raw =
        b"PUT /p/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            .to_vec();
    for _ in 0..4 {
        raw.extend_from_slice(format!("{:x}\r\n", 200_000).as_bytes());
        raw.extend(std::iter::repeat_n(b'y', 200_000));
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let r = wire::send_raw(p.addr, &raw).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.text(),
        "800000",
        "a streamed upload under the limit arrives whole"
    );
    // A slow upstream is a 504, an unreachable one a 502, each with a reason.
    let t0 = Instant::now();
    let r = wire::send(p.addr, "GET", "/p/slow", &[], b"").await;
    assert_eq!(r.status, 504);
    assert_eq!(r.header("plait-error"), Some("upstream-timeout"));
    assert!(t0.elapsed() < Duration::from_millis(2500));
    let r = wire::send(p.addr, "GET", "/dead/x", &[], b"").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("plait-error"), Some("upstream-unreachable"));
    assert!(!r.text().trim().contains('\n'));
    // Not an open proxy: absolute-form requests and CONNECT are refused, never forwarded.
    let before = origin.state.requests.load(Ordering::SeqCst);
    let abs = format!(
        "GET {}/echo HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        origin.url(),
        origin.addr
    );
    assert_eq!(wire::send_raw(p.addr, abs.as_bytes()).await.status, 400);
    let connect = format!(
        "CONNECT {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        origin.addr, origin.addr
    );
    let r = wire::send_raw(p.addr, connect.as_bytes()).await;
    assert!(
        r.status == 405 || r.status == 400,
        "CONNECT answered {}",
        r.status
    );
    assert_eq!(
        origin.state.requests.load(Ordering::SeqCst),
        before,
        "the upstream was contacted"
    );
    // Paths outside every route are Plait's own state.
    wire::send(p.addr, "PUT", "/mine", &[], b"state").await;
    assert_eq!(wire::send(p.addr, "GET", "/mine", &[], b"").await.text(), "state");
    assert_eq!(origin.state.requests.load(Ordering::SeqCst), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_pass_through() {
    let echo = upstream::websocket_echo().await;
    let (p, _dir) = plait_with(
        &format!("[[proxy]]\nprefix = \"/ws\"\nupstream = \"http://{echo}\"\n"),
        &[],
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws/echo", p.addr))
        .await
        .expect("upgrade through plait");
    for msg in ["hello", "world"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(msg))
            .await
            .unwrap();
        let back = tokio::time::timeout(T, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), msg);
    }
}

/// Applies a text update to `text` (patches absolute against it; a body replaces it).
fn apply(text: &str, b: &Block) -> String {
    if let Some(body) = &b.body {
        return String::from_utf8(body.clone()).unwrap();
    }
    let mut chars: Vec<char> = text.chars().collect();
    let mut off: isize = 0;
    for (range, content) in &b.patches {
        let (x, y) = range
            .trim_start_matches("text [")
            .trim_end_matches(']')
            .split_once(':')
            .unwrap();
        let (x, y): (isize, isize) = (x.parse().unwrap(), y.parse().unwrap());
        let content = String::from_utf8(content.clone()).unwrap();
        chars.splice((x + off) as usize..(y + off) as usize, content.chars());
        off += content.chars().count() as isize - (y - x);
    }
    chars.into_iter().collect()
}

async fn upstream_subscriptions(u: &Plait) -> u64 {
    json(&wire::send(u.addr, "GET", "/.well-known/plait", &[], b"").await)["subscriptions"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn braid_caching_proxy_shares_one_upstream_subscription_across_restarts() {
    let mut u = Plait::start(Store::Embedded);
    let (p, _dir) = plait_with(
        &format!(
            "[[proxy]]\nprefix = \"/u\"\nupstream = \"http://{}\"\n[limits]\nproxy_subscription_grace_ms = 300\n",
            u.addr
        ),
        &[],
    );
    wire::send(u.addr, "PUT", "/u/doc", &[], b"hello").await;
    let mut subs: Vec<(Subscription, String)> = Vec::new();
    for _ in 0..100 {
        let mut s = wire::subscribe(p.addr, "/u/doc", &[("Subscribe", "true")]).await;
        assert_eq!(s.status, 209);
        let b = s.next_block(T).await.expect("the cached state at once");
        let text = apply("", &b);
        assert_eq!(text, "hello");
        subs.push((s, text));
    }
    assert_eq!(
        upstream_subscriptions(&u).await,
        1,
        "100 local subscribers, one upstream subscription"
    );
    // Writes at the upstream, and one through the proxy, reach all 100.
    let mut want = "hello".to_string();
    for (i, w) in [" one", " two", " three"].iter().enumerate() {
        let range = format!("text [{}:{}]", want.chars().count(), want.chars().count());
        let target = if i == 1 { p.addr } else { u.addr };
        assert_eq!(
            wire::send(
                target,
                "PUT",
                "/u/doc",
                &[("Content-Range", &range)],
                w.as_bytes()
            )
            .await
            .status,
            200
        );
        want.push_str(w);
    }
    for (s, text) in &mut subs {
        while *text != want {
            let b = s
                .next_block(T)
                .await
                .unwrap_or_else(|| panic!("stuck at {text:?}"));
            *text = apply(text, &b);
        }
    }
    // The upstream restarts; Plait resumes with Parents and nobody misses anything.
    u.restart();
    for w in [" four", " five"] {
        let range = format!("text [{}:{}]", want.chars().count(), want.chars().count());
        let mut tries = 0;
        while wire::send(
            u.addr,
            "PUT",
            "/u/doc",
            &[("Content-Range", &range)],
            w.as_bytes(),
        )
        .await
        .status
            != 200
        {
            tries += 1;
            assert!(tries < 50);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        want.push_str(w);
    }
    for (s, text) in &mut subs {
        while *text != want {
            let b = s
                .next_block(T)
                .await
                .unwrap_or_else(|| panic!("stuck at {text:?} after the restart"));
            *text = apply(text, &b);
        }
    }
    let deadline = Instant::now() + T;
    while upstream_subscriptions(&u).await != 1 {
        assert!(Instant::now() < deadline, "resumed as one upstream subscription");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // When the last local subscriber leaves, the upstream subscription closes (after grace).
    drop(subs);
    let deadline = Instant::now() + T;
    while upstream_subscriptions(&u).await != 0 {
        assert!(
            Instant::now() < deadline,
            "the upstream subscription was not closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_legacy_routes_are_polled_once_for_all_subscribers() {
    let origin = Origin::start().await;
    *origin.state.etag_body.lock().unwrap() = "v1".into();
    let (p, _dir) = plait_with(
        &format!(
            "[[proxy]]\nprefix = \"/live\"\nupstream = \"{}\"\nlive = true\npoll_interval_ms = 100\n[limits]\nproxy_subscription_grace_ms = 200\n",
            origin.url()
        ),
        &[],
    );
    let mut subs = Vec::new();
    for _ in 0..3 {
        let mut s = wire::subscribe(p.addr, "/live/etag", &[("Subscribe", "true")]).await;
        assert_eq!(s.status, 209);
        assert_eq!(s.header("content-type"), Some("text/plain"));
        assert_eq!(s.next_block(T).await.unwrap().body_text(), "v1");
        subs.push(s);
    }
    let before = origin.state.requests.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let polls = origin.state.requests.load(Ordering::SeqCst) - before;
    assert!(
        (5..=15).contains(&polls),
        "{polls} polls in 1 s at 100 ms for 3 subscribers: one poller"
    );
    assert!(
        origin.state.not_modified.load(Ordering::SeqCst) >= polls - 1,
        "polls are conditional"
    );
    // Each change reaches every subscriber as an update chained to the one before.
    for v in ["v2", "v3"] {
        *origin.state.etag_body.lock().unwrap() = v.into();
        for s in &mut subs {
            let b = s.next_block(T).await.unwrap();
            assert_eq!(b.body_text(), v);
            assert!(b.header("version").unwrap().contains("poll"));
            assert_ne!(b.header("parents"), Some(""));
        }
    }
    drop(subs);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let after = origin.state.requests.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        origin.state.requests.load(Ordering::SeqCst),
        after,
        "polling stops when nobody subscribes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_files_and_an_app_on_the_same_origin() {
    let origin = Origin::start().await;
    let web = tempfile::tempdir().unwrap();
    std::fs::write(
        web.path().join("index.html"),
        "<!doctype html><script src=app.js></script>",
    )
    .unwrap();
    std::fs::write(web.path().join("app.js"), "fetch('/api/todos')").unwrap();
    std::fs::create_dir(web.path().join("img")).unwrap();
    std::fs::write(web.path().join("img/logo.svg"), "<svg/>").unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "no").unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), web.path().join("leak")).unwrap();
    let (p, _dir) = plait_with(
        &format!("[[proxy]]\nprefix = \"/api\"\nupstream = \"{}\"\n", origin.url()),
        &["--web-dir", web.path().to_str().unwrap()],
    );
    // The page and its assets, with types and validators.
    let r = wire::send(p.addr, "GET", "/", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let etag = r.header("etag").unwrap().to_string();
    let r = wire::send(p.addr, "GET", "/", &[("If-None-Match", &etag)], b"").await;
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    assert!(
        wire::send(p.addr, "GET", "/app.js", &[], b"")
            .await
            .header("content-type")
            .unwrap()
            .contains("javascript")
    );
    assert_eq!(
        wire::send(p.addr, "GET", "/img/logo.svg", &[], b"")
            .await
            .header("content-type"),
        Some("image/svg+xml")
    );
    // Nothing outside the directory.
    for raw in [
        "GET /../secret HTTP/1.1\r\n",
        "GET /%2e%2e/secret HTTP/1.1\r\n",
        "GET /img/%2E%2E/%2E%2E/secret HTTP/1.1\r\n",
    ] {
        let req = format!("{raw}Host: x\r\nConnection: close\r\n\r\n");
        let r = wire::send_raw(p.addr, req.as_bytes()).await;
        assert!(r.status == 400 || r.status == 404, "{raw}: {}", r.status);
        assert_ne!(r.text(), "no");
    }
    assert_eq!(wire::send(p.addr, "GET", "/leak", &[], b"").await.status, 403);
    // The app's API is proxied; its state is Plait's, live, on the same origin.
    let r = wire::send(p.addr, "GET", "/api/todos", &[], b"").await;
    assert_eq!(json(&r)["from"], "origin");
    let mut s = wire::subscribe(
        p.addr,
        "/todos",
        &[("Subscribe", "true"), ("Accept", "application/json")],
    )
    .await;
    assert_eq!(s.next_block(T).await.unwrap().status, Some(404));
    let r = wire::send(
        p.addr,
        "PUT",
        "/todos",
        &[("Content-Type", "application/json")],
        br#"[{"t":"milk"}]"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(s.next_block(T).await.unwrap().body_text(), r#"[{"t":"milk"}]"#);
    // A Braid request for a path that is also a file is for the state.
    let mut s = wire::subscribe(p.addr, "/app.js", &[("Subscribe", "true")]).await;
    assert_eq!(s.status, 209);
    assert_eq!(s.next_block(T).await.unwrap().body_text(), "");
}

/// The page and app of the browser test: it shows the proxied API's answer and the live
/// state of `/todos`, and writes to `/todos` itself, with the real braid-http client.
const INDEX_HTML: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>todos</title>
<script src="/js/braid-http-client.js"></script>
<script src="/js/app.js" defer></script></head>
<body><p id="api"></p><pre id="todos"></pre></body></html>
"#;

const APP_JS: &str = r#"
const show = (id, text) => { document.getElementById(id).textContent = text }
fetch('/api/todos').then(r => r.json()).then(j => show('api', j.from))
braid_fetch('/todos', { subscribe: true, headers: { Accept: 'application/json' } })
    .then(res => res.subscribe(u => show('todos', u.body_text), e => console.error('subscription: ' + e)))
braid_fetch('/todos', { method: 'PUT', headers: { 'Content-Type': 'application/json' },
                        body: JSON.stringify([{ t: 'milk' }]) })
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_runs_an_app_through_the_proxy_and_web_dir() {
    let origin = Origin::start().await;
    let web = tempfile::tempdir().unwrap();
    std::fs::write(web.path().join("index.html"), INDEX_HTML).unwrap();
    std::fs::create_dir(web.path().join("js")).unwrap();
    std::fs::write(web.path().join("js/app.js"), APP_JS).unwrap();
    std::fs::copy(
        plait_tests::node::clients_dir().join("node_modules/braid-http/braid-http-client.js"),
        web.path().join("js/braid-http-client.js"),
    )
    .unwrap();
    let (p, _dir) = plait_with(
        &format!("[[proxy]]\nprefix = \"/api\"\nupstream = \"{}\"\n", origin.url()),
        &["--web-dir", web.path().to_str().unwrap()],
    );
    let r = wire::send(
        p.addr,
        "PUT",
        "/todos",
        &[("Content-Type", "application/json")],
        b"[]",
    )
    .await;
    assert_eq!(r.status, 200);
    let base = format!("http://{}", p.addr);
    let out = tokio::task::spawn_blocking(move || plait_tests::node::run("browser_app.js", &[&base]))
        .await
        .unwrap();
    assert!(out.contains("browser app ok"), "{out}");
    assert!(
        origin.state.requests.load(Ordering::SeqCst) >= 1,
        "the API call reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn braid_cache_resumes_from_parents_and_sends_the_clients_heartbeats() {
    let u = Plait::start(Store::Embedded);
    let (p, _dir) = plait_with(
        &format!("[[proxy]]\nprefix = \"/doc\"\nupstream = \"http://{}\"\n", u.addr),
        &[],
    );
    let put = |body: &'static str, version: &'static str, parents: Option<&'static str>| {
        let addr = u.addr;
        async move {
            let mut h = vec![("Version", version)];
            if let Some(pa) = parents {
                h.push(("Parents", pa));
            }
            assert_eq!(
                wire::send(addr, "PUT", "/doc", &h, body.as_bytes()).await.status,
                200
            );
        }
    };
    put("hello", "\"bob-4\"", None).await;
    // A first local subscriber opens the shared upstream subscription.
    let mut first = wire::subscribe(p.addr, "/doc", &[("Subscribe", "true")]).await;
    assert_eq!(first.next_block(T).await.unwrap().body_text(), "hello");
    // A client at the cached version gets nothing until something changes, then the change.
    let mut at_head =
        wire::subscribe(p.addr, "/doc", &[("Subscribe", "true"), ("Parents", "\"bob-4\"")]).await;
    assert_eq!(at_head.status, 209);
    let extra = at_head.next_block(Duration::from_millis(300)).await;
    assert!(extra.is_none(), "{extra:?}");
    put("hello world", "\"bob-10\"", Some("\"bob-4\"")).await;
    let b = at_head.next_block(T).await.unwrap();
    assert_eq!(b.header("version"), Some("\"bob-10\""));
    assert_eq!(apply("hello", &b), "hello world");
    // A client at a version the cache no longer starts from is answered by the upstream
    // with only what it lacks: patches, not a snapshot.
    let mut old = wire::subscribe(p.addr, "/doc", &[("Subscribe", "true"), ("Parents", "\"bob-4\"")]).await;
    let b = old.next_block(T).await.unwrap();
    assert!(b.body.is_none(), "a snapshot instead of what was missing: {b:?}");
    assert_eq!(apply("hello", &b), "hello world");
    // Heartbeats at the client's rate, whatever the upstream subscription uses.
    let mut beats = wire::subscribe(p.addr, "/doc", &[("Subscribe", "true"), ("Heartbeats", "0.5")]).await;
    assert_eq!(beats.header("heartbeats"), Some("0.5s"));
    // A newcomer gets the cached state: the upstream's snapshot and the update after it.
    assert_eq!(beats.next_block(T).await.unwrap().body_text(), "hello");
    assert_eq!(apply("hello", &beats.next_block(T).await.unwrap()), "hello world");
    let seen = beats.raw_for(Duration::from_millis(100)).await.len();
    let raw = beats.raw_for(Duration::from_millis(1300)).await;
    let after = String::from_utf8_lossy(&raw[seen..]).to_string();
    assert!(after.matches("\r\n").count() >= 2, "no heartbeats: {after:?}");
}
