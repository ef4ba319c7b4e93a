//! Braid multiplexing against the real `plait` binary, over raw HTTP/1.1: the multiplexer
//! stream's framing, `293`, cancellation, duplicate ids (409), a missing multiplexer
//! (424), the end of a multiplexer ending its requests, the limits, ownership by client
//! address, and refusals that read the same through a multiplexer as plain.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use plait_tests::plait::{Plait, Store};
use plait_tests::wire::{self, Subscription};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(10);
const V: (&str, &str) = ("Multiplex-Version", "1.0");

/// A multiplexer's stream, read as braid-http reads it.
struct Mux {
    id: String,
    stream: Subscription,
}

/// What the stream said about one request.
#[derive(Default, Debug)]
struct Seen {
    started: bool,
    bytes: Vec<u8>,
    closed: bool,
}

impl Seen {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

impl Mux {
    async fn open(p: &Plait, id: &str) -> Mux {
        let stream = wire::open(p.addr, "POST", &format!("/.well-known/multiplexer/{id}"), &[V]).await;
        assert_eq!(stream.status, 200);
        assert_eq!(stream.header("multiplex-version"), Some("1.0"));
        assert_eq!(stream.header("incremental"), Some("?1"));
        Mux {
            id: id.to_string(),
            stream,
        }
    }

    fn through(&self, request: &str) -> String {
        format!("/.well-known/multiplexer/{}/{request}", self.id)
    }

    /// Sends `method path` through this multiplexer as request `request`; asserts the
    /// request itself is answered 293.
    async fn send(
        &self,
        addr: SocketAddr,
        request: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) {
        let through = self.through(request);
        let mut h = vec![("Multiplex-Through", through.as_str()), V];
        h.extend_from_slice(headers);
        let r = wire::send(addr, method, path, &h, body.as_bytes()).await;
        assert_eq!(r.status, 293, "{method} {path}: {}", r.text());
        assert_eq!(r.header("multiplex-version"), Some("1.0"));
        assert_eq!(r.header("multiplex-through"), Some(through.as_str()));
        assert_eq!(r.text(), "Ok.");
    }

    /// Reads the stream until `done` holds for what it said so far, or `T` passes.
    async fn until(&mut self, done: impl Fn(&HashMap<String, Seen>) -> bool) -> HashMap<String, Seen> {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let raw = self.stream.raw_for(Duration::from_millis(50)).await;
            let seen = parse(&raw);
            if done(&seen) || tokio::time::Instant::now() > deadline {
                return seen;
            }
        }
    }
}

/// Parses a multiplexer stream: `start response ID`, `N bytes for response ID` + N bytes,
/// `close response ID`, with blank lines between.
fn parse(mut buf: &[u8]) -> HashMap<String, Seen> {
    let mut seen: HashMap<String, Seen> = HashMap::new();
    loop {
        while buf.first().is_some_and(|b| *b == b'\r' || *b == b'\n') {
            buf = &buf[1..];
        }
        let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
            return seen;
        };
        let line = std::str::from_utf8(&buf[..eol]).expect("a frame line is text");
        let rest = &buf[eol + 2..];
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["start", "response", id] => seen.entry(id.to_string()).or_default().started = true,
            ["close", "response", id] => seen.entry(id.to_string()).or_default().closed = true,
            [n, "bytes", "for", "response", id] => {
                let n: usize = n.parse().expect("a length");
                if rest.len() < n {
                    return seen;
                }
                seen.entry(id.to_string())
                    .or_default()
                    .bytes
                    .extend_from_slice(&rest[..n]);
                buf = &rest[n..];
                continue;
            }
            _ => panic!("not a multiplexer frame: {line:?}"),
        }
        buf = rest;
    }
}

fn has(seen: &HashMap<String, Seen>, id: &str, text: &str) -> bool {
    seen.get(id).is_some_and(|s| s.text().contains(text))
}

async fn status(p: &Plait) -> serde_json::Value {
    let (k, v) = p.owner_auth();
    let r = wire::send(p.addr, "GET", "/.well-known/plait", &[(k, v.as_str())], b"").await;
    serde_json::from_slice(&r.body).expect("JSON")
}

async fn subscriptions(p: &Plait) -> u64 {
    status(p).await["subscriptions"].as_u64().expect("a count")
}

/// Waits (bounded) until the server counts `n` open subscriptions.
async fn wait_for_subscriptions(p: &Plait, n: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let now = subscriptions(p).await;
        if now == n || tokio::time::Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn subscriptions_and_writes_share_one_multiplexer() {
    let p = Plait::start(Store::Embedded);
    wire::send(
        p.addr,
        "PUT",
        "/j",
        &[("Content-Type", "application/json")],
        br#"{"n":1}"#,
    )
    .await;
    wire::send(p.addr, "PUT", "/t", &[], b"hello").await;
    let mut mux = Mux::open(&p, "m1").await;
    mux.send(
        p.addr,
        "r1",
        "GET",
        "/j",
        &[("Subscribe", "true"), ("Accept", "application/json")],
        "",
    )
    .await;
    mux.send(
        p.addr,
        "r2",
        "GET",
        "/t",
        &[("Subscribe", "?1"), ("Peer", "\"pg\"")],
        "",
    )
    .await;
    let seen = mux
        .until(|s| has(s, "r1", r#"{"n":1}"#) && has(s, "r2", "hello"))
        .await;
    for id in ["r1", "r2"] {
        let s = &seen[id];
        assert!(s.started, "{id}: {seen:?}");
        assert!(
            s.text().starts_with("HTTP/1.1 209 Multiresponse\r\n"),
            "{id}: {}",
            s.text()
        );
        assert!(s.text().contains("\r\nsubscribe: "), "{}", s.text());
        assert!(!s.closed);
    }
    assert!(seen["r1"].text().contains("content-type: application/json"));
    // A write through the multiplexer: its whole response, then `close`.
    mux.send(
        p.addr,
        "w1",
        "PUT",
        "/t",
        &[("Content-Type", "text/plain")],
        "hello world",
    )
    .await;
    let seen = mux
        .until(|s| s.get("w1").is_some_and(|w| w.closed) && has(s, "r2", " world"))
        .await;
    assert!(
        seen["w1"].text().starts_with("HTTP/1.1 200 OK\r\n"),
        "{}",
        seen["w1"].text()
    );
    assert!(seen["w1"].closed);
    assert!(
        has(&seen, "r2", "Content-Range: text [5:5]\r\n\r\n world"),
        "{}",
        seen["r2"].text()
    );
    // A plain write reaches the multiplexed subscriber.
    wire::send(
        p.addr,
        "PUT",
        "/j",
        &[("Content-Type", "application/json")],
        br#"{"n":2}"#,
    )
    .await;
    let seen = mux.until(|s| has(s, "r1", r#"{"n":2}"#)).await;
    assert!(has(&seen, "r1", r#"{"n":2}"#), "{seen:?}");
    assert_eq!(subscriptions(&p).await, 2);
}

#[tokio::test]
async fn a_cancelled_request_ends_and_is_gone() {
    let p = Plait::start(Store::Embedded);
    let mut mux = Mux::open(&p, "m1").await;
    mux.send(p.addr, "r1", "GET", "/a", &[("Subscribe", "true")], "")
        .await;
    mux.until(|s| has(s, "r1", "209")).await;
    assert_eq!(wait_for_subscriptions(&p, 1).await, 1);
    let del = wire::send(p.addr, "DELETE", "/.well-known/multiplexer/m1/r1", &[V], b"").await;
    assert_eq!(del.status, 200, "{}", del.text());
    assert_eq!(del.header("multiplex-version"), Some("1.0"));
    // The subscription ends; no `close` is written for a cancelled request.
    assert_eq!(wait_for_subscriptions(&p, 0).await, 0);
    wire::send(p.addr, "PUT", "/a", &[], b"after").await;
    let seen = mux.until(|s| has(s, "r1", "after")).await;
    assert!(!has(&seen, "r1", "after"), "{seen:?}");
    assert!(!seen["r1"].closed);
    // Cancelling it again, or in a multiplexer that does not exist: 404, named.
    let again = wire::send(p.addr, "DELETE", "/.well-known/multiplexer/m1/r1", &[V], b"").await;
    assert_eq!(again.status, 404);
    assert_eq!(again.header("bad-request"), Some("r1"));
    let nomux = wire::send(p.addr, "DELETE", "/.well-known/multiplexer/nope/r1", &[V], b"").await;
    assert_eq!(nomux.status, 404);
    assert_eq!(nomux.header("bad-multiplexer"), Some("nope"));
    // The id is free again.
    mux.send(p.addr, "r1", "GET", "/a", &[("Subscribe", "true")], "")
        .await;
}

#[tokio::test]
async fn duplicates_missing_multiplexers_and_versions() {
    let p = Plait::start(Store::Embedded);
    let mux = Mux::open(&p, "m1").await;
    let dup = wire::send(p.addr, "POST", "/.well-known/multiplexer/m1", &[V], b"").await;
    assert_eq!(dup.status, 409);
    let body: serde_json::Value = serde_json::from_slice(&dup.body).expect("JSON");
    assert_eq!(body["error"], "Multiplexer already exists");
    mux.send(p.addr, "r1", "GET", "/a", &[("Subscribe", "true")], "")
        .await;
    let through = mux.through("r1");
    let again = wire::send(
        p.addr,
        "GET",
        "/a",
        &[("Multiplex-Through", through.as_str()), V, ("Subscribe", "true")],
        b"",
    )
    .await;
    assert_eq!(again.status, 409);
    let body: serde_json::Value = serde_json::from_slice(&again.body).expect("JSON");
    assert_eq!(body["error"], "Request already multiplexed");
    // No such multiplexer: 424, named, so the client makes one.
    let missing = wire::send(
        p.addr,
        "GET",
        "/a",
        &[("Multiplex-Through", "/.well-known/multiplexer/nope/r1"), V],
        b"",
    )
    .await;
    assert_eq!(missing.status, 424);
    assert_eq!(missing.header("bad-multiplexer"), Some("nope"));
    // Another version: the multiplexer is not opened; a request is served plainly.
    let old = wire::send(
        p.addr,
        "POST",
        "/.well-known/multiplexer/m2",
        &[("Multiplex-Version", "0.9")],
        b"",
    )
    .await;
    assert_eq!(old.status, 400);
    let plain = wire::send(
        p.addr,
        "GET",
        "/a",
        &[
            ("Multiplex-Through", "/.well-known/multiplexer/m1/r9"),
            ("Multiplex-Version", "2.0"),
        ],
        b"",
    )
    .await;
    assert_eq!(plain.status, 200);
    assert!(plain.header("multiplex-version").is_none());
    // A page on another origin: the preflight, and what it may read of the answers.
    let pre = wire::send(
        p.addr,
        "OPTIONS",
        "/.well-known/multiplexer/m4",
        &[
            ("Origin", "http://app.example"),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "multiplex-version"),
        ],
        b"",
    )
    .await;
    assert_eq!(pre.status, 200);
    assert!(
        pre.header("access-control-allow-methods")
            .unwrap()
            .contains("POST")
    );
    assert_eq!(
        pre.header("access-control-allow-headers"),
        Some("multiplex-version")
    );
    let cross = wire::send(
        p.addr,
        "GET",
        "/a",
        &[
            ("Multiplex-Through", mux.through("r5").as_str()),
            V,
            ("Origin", "http://app.example"),
        ],
        b"",
    )
    .await;
    assert_eq!(cross.status, 293);
    assert_eq!(cross.header("access-control-allow-origin"), Some("*"));
    assert!(
        cross
            .header("access-control-expose-headers")
            .unwrap()
            .contains("Multiplex-Version")
    );
    // braid-http 1.3's way to open one.
    let by_method = wire::open(p.addr, "MULTIPLEX", "/m3", &[V]).await;
    assert_eq!(by_method.status, 200);
    assert_eq!(by_method.header("multiplex-version"), Some("1.0"));
}

#[tokio::test]
async fn the_end_of_a_multiplexer_ends_its_requests() {
    let mut p = Plait::start(Store::Embedded);
    let mut mux = Mux::open(&p, "m1").await;
    for r in ["r1", "r2", "r3"] {
        mux.send(p.addr, r, "GET", &format!("/{r}"), &[("Subscribe", "true")], "")
            .await;
    }
    mux.until(|s| ["r1", "r2", "r3"].iter().all(|r| has(s, r, "209")))
        .await;
    assert_eq!(wait_for_subscriptions(&p, 3).await, 3);
    assert_eq!(status(&p).await["multiplexers"], 1);
    drop(mux);
    assert_eq!(wait_for_subscriptions(&p, 0).await, 0);
    assert_eq!(status(&p).await["multiplexers"], 0);
    let gone = wire::send(
        p.addr,
        "GET",
        "/r1",
        &[("Multiplex-Through", "/.well-known/multiplexer/m1/r4"), V],
        b"",
    )
    .await;
    assert_eq!(gone.status, 424);
    // After a restart no multiplexer is known: the client is told to make a new one.
    let mut mux = Mux::open(&p, "m2").await;
    mux.send(p.addr, "r1", "GET", "/r1", &[("Subscribe", "true")], "")
        .await;
    mux.until(|s| has(s, "r1", "209")).await;
    p.restart();
    assert!(mux.stream.ended_within(T).await);
    let after = wire::send(
        p.addr,
        "GET",
        "/r1",
        &[("Multiplex-Through", "/.well-known/multiplexer/m2/r2"), V],
        b"",
    )
    .await;
    assert_eq!(after.status, 424);
    let mut mux = Mux::open(&p, "m2").await;
    mux.send(p.addr, "r2", "GET", "/r1", &[("Subscribe", "true")], "")
        .await;
    assert!(has(&mux.until(|s| has(s, "r2", "209")).await, "r2", "209"));
}

#[tokio::test]
async fn refusals_read_the_same_through_a_multiplexer() {
    // Only the owner writes here.
    let p = Plait::start_with_env(Store::Embedded, &[], &[("PLAIT_ACCESS__PUBLIC_WRITES", "false")]);
    let plain = wire::send(p.addr, "PUT", "/x", &[], b"nope").await;
    assert_eq!(plain.status, 401);
    let mut mux = Mux::open(&p, "m1").await;
    mux.send(p.addr, "w1", "PUT", "/x", &[], "nope").await;
    let seen = mux.until(|s| s.get("w1").is_some_and(|w| w.closed)).await;
    let w1 = seen["w1"].text();
    assert!(w1.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{w1}");
    assert!(
        w1.contains(&format!("plait-error: {}", plain.header("plait-error").unwrap())),
        "{w1}"
    );
    // Each request is authenticated by its own credential: the owner's token works.
    let (k, v) = p.owner_auth();
    mux.send(p.addr, "w2", "PUT", "/x", &[(k, v.as_str())], "yes")
        .await;
    let seen = mux.until(|s| s.get("w2").is_some_and(|w| w.closed)).await;
    assert!(
        seen["w2"].text().starts_with("HTTP/1.1 200 OK\r\n"),
        "{}",
        seen["w2"].text()
    );
    assert_eq!(wire::send(p.addr, "GET", "/x", &[], b"").await.text(), "yes");
}

#[tokio::test]
async fn multiplexers_and_their_requests_are_bounded() {
    let p = Plait::start_with_env(
        Store::Embedded,
        &[],
        &[
            ("PLAIT_LIMITS__MAX_REQUESTS_PER_MULTIPLEXER", "2"),
            ("PLAIT_LIMITS__MAX_MULTIPLEXERS_PER_ADDRESS", "1"),
        ],
    );
    let mut mux = Mux::open(&p, "m1").await;
    let second = wire::send(p.addr, "POST", "/.well-known/multiplexer/m2", &[V], b"").await;
    assert_eq!(second.status, 429);
    assert_eq!(second.header("plait-error"), Some("too-many-multiplexers"));
    for r in ["r1", "r2", "r3"] {
        mux.send(p.addr, r, "GET", "/a", &[("Subscribe", "true")], "")
            .await;
    }
    let seen = mux.until(|s| s.get("r3").is_some_and(|r| r.closed)).await;
    let r3 = seen["r3"].text();
    assert!(r3.starts_with("HTTP/1.1 429 "), "{r3}");
    assert!(r3.contains("plait-error: multiplexer-full"), "{r3}");
    assert!(r3.contains("retry-after: "), "{r3}");
    assert!(has(&seen, "r1", "209") && has(&seen, "r2", "209"), "{seen:?}");
    assert_eq!(wait_for_subscriptions(&p, 2).await, 2);
}

/// Sends a request from another loopback address (127.0.0.2) and returns its status.
async fn status_from_other_address(addr: SocketAddr, raw: String) -> u16 {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind("127.0.0.2:0".parse().expect("addr"))
        .expect("bind 127.0.0.2");
    let mut s = sock.connect(addr).await.expect("connect");
    s.write_all(raw.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut buf))
        .await
        .expect("an answer")
        .expect("read");
    let head = String::from_utf8_lossy(&buf);
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line")
}

#[tokio::test]
async fn a_multiplexer_is_its_opener_s_alone() {
    let p = Plait::start(Store::Embedded);
    let mut mux = Mux::open(&p, "m1").await;
    mux.send(p.addr, "r1", "GET", "/a", &[("Subscribe", "true")], "")
        .await;
    mux.until(|s| has(s, "r1", "209")).await;
    let addr = p.addr;
    let write = format!(
        "PUT /a HTTP/1.1\r\nHost: {addr}\r\nMultiplex-Through: /.well-known/multiplexer/m1/x1\r\n\
         Multiplex-Version: 1.0\r\nContent-Length: 4\r\nConnection: close\r\n\r\nevil"
    );
    assert_eq!(status_from_other_address(addr, write).await, 424);
    let cancel = format!(
        "DELETE /.well-known/multiplexer/m1/r1 HTTP/1.1\r\nHost: {addr}\r\nMultiplex-Version: 1.0\r\n\
         Connection: close\r\n\r\n"
    );
    assert_eq!(status_from_other_address(addr, cancel).await, 404);
    // Nothing was written into it, and its request is still open.
    let seen = mux.until(|s| s.contains_key("x1")).await;
    assert!(!seen.contains_key("x1"), "{seen:?}");
    assert_eq!(subscriptions(&p).await, 1);
}

/// A web dir with the many-subscriptions page (`tests/clients/mux_page`) at `/mux.html`
/// and the real braid-http client beside it.
fn mux_page() -> tempfile::TempDir {
    let web = tempfile::tempdir().unwrap();
    let clients = plait_tests::node::clients_dir();
    std::fs::create_dir(web.path().join("js")).unwrap();
    std::fs::copy(clients.join("mux_page/index.html"), web.path().join("mux.html")).unwrap();
    std::fs::copy(clients.join("mux_page/app.js"), web.path().join("js/app.js")).unwrap();
    std::fs::copy(
        clients.join("node_modules/braid-http/braid-http-client.js"),
        web.path().join("js/braid-http-client.js"),
    )
    .unwrap();
    web
}

/// Runs `browser_mux.js` (Chromium) against `base`; returns its report.
async fn browser(base: String, mode: &'static str, env: Vec<(String, String)>) -> serde_json::Value {
    let out = tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        plait_tests::node::run_with_env("browser_mux.js", &[&base, "50", mode], &env)
    })
    .await
    .unwrap();
    eprintln!("{out}");
    let report = out
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("{out}"));
    let report: serde_json::Value = serde_json::from_str(report).unwrap();
    assert_eq!(report["ok"], true, "{out}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_page_follows_50_resources_over_http1() {
    let web = mux_page();
    let p = Plait::start_with(Store::Embedded, &["--web-dir", web.path().to_str().unwrap()]);
    let report = browser(format!("http://{}", p.addr), "mux", vec![]).await;
    // The client multiplexes from its second subscription on, over HTTP/1.1.
    assert_eq!(report["protocols"], serde_json::json!(["http/1.1"]), "{report}");
    assert_eq!(report["multiplexed"], 49, "{report}");
    assert_eq!(report["responses_293"], 49, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_page_comes_back_through_a_new_multiplexer_after_a_restart() {
    let web = mux_page();
    let mut p = Plait::start_with(Store::Embedded, &["--web-dir", web.path().to_str().unwrap()]);
    let flags = tempfile::tempdir().unwrap();
    let env = vec![("MUX_RESTART_DIR".to_string(), flags.path().display().to_string())];
    let run = tokio::spawn(browser(format!("http://{}", p.addr), "mux", env));
    let ready = flags.path().join("ready");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !ready.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page never got its updates"
        );
        assert!(!run.is_finished(), "the browser run ended early: {:?}", run.await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.restart();
    std::fs::write(flags.path().join("restarted"), "").unwrap();
    let report = run.await.unwrap();
    // Counted over the page's life: 49 before the restart, and every subscription again
    // after it, through the new multiplexer.
    assert!(report["responses_293"].as_u64().unwrap() >= 98, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_page_follows_50_resources_over_http2() {
    let dir = tempfile::tempdir().unwrap();
    let ca = plait_tests::pki::Ca::new("Plait test CA");
    let issued = ca.issue(&["localhost"], None);
    let (cert, key, ca_file) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("ca.pem"),
    );
    std::fs::write(&cert, issued.cert_pem()).unwrap();
    std::fs::write(&key, issued.key_pem()).unwrap();
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let web = mux_page();
    let p = Plait::start_with(
        Store::Embedded,
        &[
            "--web-dir",
            web.path().to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let base = format!("https://localhost:{}", p.addr.port());
    let env = vec![("NODE_EXTRA_CA_CERTS".to_string(), ca_file.display().to_string())];
    // The client's default: multiplexed, over HTTP/2.
    let report = browser(base.clone(), "mux", env.clone()).await;
    assert_eq!(report["protocols"], serde_json::json!(["h2"]), "{report}");
    assert_eq!(report["multiplexed"], 49, "{report}");
    // Multiplexing off: 50 requests at once on the one HTTP/2 connection.
    let report = browser(base, "plain", env).await;
    assert_eq!(report["protocols"], serde_json::json!(["h2"]), "{report}");
    assert_eq!(report["multiplexed"], 0, "{report}");
    assert_eq!(report["responses_293"], 0, "{report}");
}
