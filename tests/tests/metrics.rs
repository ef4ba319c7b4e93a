//! Metrics against the real `plait` binary, on both stores: `/metrics` on the public
//! listener is the owner's only (401 for the anonymous, 403 for a limited token), the
//! separate `[metrics] listen` listener serves the same text to anyone, the figures move
//! with writes, subscriptions (Braid and Statebus), deliveries and refusals, and the text
//! passes `promtool check metrics` (Debian's `prometheus` package).

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use plait_tests::on_both_stores;
use plait_tests::plait::{Plait, Store};
use plait_tests::wire;
use tokio_tungstenite::tungstenite::Message;

on_both_stores!(metrics_move_and_pass_promtool);

/// The address of the metrics listener, from the server's log line.
fn metrics_addr(p: &Plait) -> SocketAddr {
    let log = p.log();
    let line = log
        .lines()
        .find_map(|l| l.split("metrics on http://").nth(1))
        .unwrap_or_else(|| panic!("no metrics listener in the log:\n{log}"));
    line.split('/').next().unwrap().parse().unwrap()
}

/// The value of the sample named exactly `series` (name and labels), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

fn at_least(text: &str, series: &str, min: f64) {
    let v = sample(text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"));
    assert!(v >= min, "{series} is {v}, expected at least {min}:\n{text}");
}

/// `promtool check metrics` on `text`: its complaints, or `Ok`.
fn promtool(text: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (Debian: apt-get install prometheus)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

async fn metrics_move_and_pass_promtool(store: Store) {
    let postgres = matches!(store, Store::Postgres(_));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("plait.toml");
    // Refusals at debug: each one logged (at info only the first of a code in a minute).
    std::fs::write(
        &config,
        "log_level = \"info,plait_server::refusals=debug\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    // With a p2p node, so its figures are there too.
    let p = Plait::start_with(
        store,
        &[
            "--config",
            config.to_str().unwrap(),
            "--p2p-listen",
            "/ip4/127.0.0.1/tcp/0",
        ],
    );
    let (k, v) = p.owner_auth();
    let owner = [(k, v.as_str())];

    // The public listener: the owner's only.
    let r = wire::send(p.addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.header("www-authenticate").is_some());
    let reader = p.token(&["--read", "/"]);
    let limited = format!("Bearer {reader}");
    let r = wire::send(p.addr, "GET", "/metrics", &[("Authorization", &limited)], b"").await;
    assert_eq!(r.status, 403, "{}", r.text());

    // A Braid subscription, a Statebus one, writes of two kinds, and a refusal.
    let as_text = [owner[0], ("Content-Type", "text/plain")];
    let r = wire::send(p.addr, "PUT", "/notes", &as_text, b"hello").await;
    assert!(r.status < 300, "{}", r.text());
    let mut sub = wire::subscribe(p.addr, "/notes", &[owner[0], ("Subscribe", "true")]).await;
    assert_eq!(sub.status, 209);
    sub.next_block(Duration::from_secs(5))
        .await
        .expect("the first block");
    let url = format!("ws://{}/_connect_to_statebus_/websocket", p.addr);
    let mut ws = tokio_tungstenite::connect_async(url).await.expect("websocket").0;
    ws.send(Message::text(r#"{"get":"k"}"#)).await.unwrap();
    next_frame(&mut ws).await;
    for i in 0..3 {
        let body = format!("hello {i}");
        let r = wire::send(p.addr, "PUT", "/notes", &as_text, body.as_bytes()).await;
        assert!(r.status < 300, "{}", r.text());
        sub.next_block(Duration::from_secs(5)).await.expect("an update");
    }
    // Written over another connection: a connection is not sent its own writes back.
    let url = format!("ws://{}/_connect_to_statebus_/websocket", p.addr);
    let mut writer = tokio_tungstenite::connect_async(url).await.expect("websocket").0;
    writer
        .send(Message::text(r#"{"set":{"key":"k","val":{"a":1}}}"#))
        .await
        .unwrap();
    let m = next_frame(&mut ws).await;
    assert_eq!(m["set"]["val"]["a"], 1, "{m}");
    let wrong = [
        ("Authorization", "Bearer not-a-token"),
        ("Content-Type", "text/plain"),
    ];
    let r = wire::send(p.addr, "PUT", "/refused", &wrong, b"x").await;
    assert_eq!(r.status, 401, "{}", r.text());
    let code = r.header("plait-error").expect("a refusal's code").to_string();

    // The owner reads the figures.
    let r = wire::send(p.addr, "GET", "/metrics", &owner, b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = r.text();
    at_least(&text, "plait_writes_total{kind=\"text\"}", 4.0);
    at_least(&text, "plait_writes_total{kind=\"json\"}", 1.0);
    at_least(&text, "plait_subscriptions_open{protocol=\"braid\"}", 1.0);
    at_least(&text, "plait_subscriptions_open{protocol=\"statebus\"}", 1.0);
    at_least(&text, "plait_deliveries_total{protocol=\"braid\"}", 4.0);
    at_least(&text, "plait_deliveries_total{protocol=\"statebus\"}", 1.0);
    at_least(
        &text,
        "plait_delivery_latency_seconds_count{protocol=\"braid\"}",
        3.0,
    );
    at_least(
        &text,
        "plait_delivery_latency_seconds_bucket{protocol=\"braid\",le=\"+Inf\"}",
        3.0,
    );
    at_least(&text, "plait_connections_open", 2.0);
    at_least(&text, "plait_refusals_total{code=\"unauthenticated\"}", 1.0);
    at_least(&text, &format!("plait_refusals_total{{code=\"{code}\"}}"), 1.0);
    at_least(&text, "plait_refusals_total{code=\"forbidden\"}", 1.0);
    at_least(&text, "plait_stored_bytes", 1.0);
    at_least(&text, "plait_uptime_seconds", 0.0);
    at_least(&text, "plait_p2p_members", 0.0);
    at_least(&text, "plait_p2p_peers_connected", 0.0);
    if postgres {
        at_least(&text, "plait_postgres_pool_max_connections", 1.0);
        at_least(&text, "plait_postgres_pool_connections", 1.0);
    } else {
        assert!(
            sample(&text, "plait_postgres_pool_connections").is_none(),
            "{text}"
        );
    }
    // The tally the status resource publishes is the same one.
    let r = wire::send(p.addr, "GET", "/.well-known/plait", &owner, b"").await;
    let status: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let told = status["refusals"]["unauthenticated"].as_f64().unwrap();
    let shown = sample(&text, "plait_refusals_total{code=\"unauthenticated\"}").unwrap();
    assert!(told >= shown, "status {told}, metrics {shown}");
    // The checker is real: it refuses a counter without help text.
    assert!(promtool("# TYPE x_total counter\nx_total 1\n").is_err());
    if let Err(complaints) = promtool(&text) {
        panic!("promtool check metrics refused the text:\n{complaints}\n{text}");
    }

    // The separate listener: open to anyone, the same figures.
    let r = wire::send(metrics_addr(&p), "GET", "/metrics", &[], b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let open = r.text();
    at_least(&open, "plait_writes_total{kind=\"text\"}", 3.0);
    promtool(&open).unwrap_or_else(|c| panic!("promtool on the open listener:\n{c}"));
    let r = wire::send(metrics_addr(&p), "GET", "/notes", &[], b"").await;
    assert_eq!(r.status, 404, "the metrics listener serves nothing else");

    // Closed subscriptions are no longer counted.
    drop(sub);
    drop(ws);
    drop(writer);
    let mut gone = false;
    for _ in 0..50 {
        let t = wire::send(p.addr, "GET", "/metrics", &owner, b"").await.text();
        let braid = sample(&t, "plait_subscriptions_open{protocol=\"braid\"}");
        let statebus = sample(&t, "plait_subscriptions_open{protocol=\"statebus\"}");
        if braid == Some(0.0) && statebus == Some(0.0) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "subscriptions still counted after they closed");

    // Every refusal is logged with its reason: each at debug, the first of a code in a
    // minute at info too.
    let log = p.log();
    let lines = |level: &str, what: &str| {
        log.lines()
            .filter(|l| l.contains(level) && l.contains(what))
            .count()
    };
    assert_eq!(lines("INFO", "refused GET /metrics (401)"), 1, "{log}");
    assert_eq!(lines("DEBUG", "refused GET /metrics (401)"), 1, "{log}");
    assert_eq!(lines("INFO", "refused PUT /refused (401)"), 0, "{log}");
    assert_eq!(lines("DEBUG", "refused PUT /refused (401)"), 1, "{log}");
    assert!(log.contains("reason=\"metrics are the owner's only\""), "{log}");
}

async fn next_frame<S>(ws: &mut S) -> serde_json::Value
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame within 5 s")
            .expect("the connection is open")
            .unwrap();
        if let Message::Text(t) = m {
            return serde_json::from_str(&t).unwrap();
        }
    }
}
