//! Connections a hostile client cannot hoard, against the real `plait` binary: idle
//! sockets (nothing sent, a bare HTTP/2 preface, an idle keep-alive connection) are closed,
//! a body that never ends is cut, the caps (global and per address) answer 503 at once
//! (in HTTP/2 to an HTTP/2 client),
//! websockets count toward them and are closed when they answer no pings.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use plait_tests::plait::{Plait, Store};
use plait_tests::wire;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection; what it sent. Panics after `within`.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read)
        .await
        .expect("the server closes the connection");
    out
}

/// One request on its own connection, answered within 2 s: `Some(status)`, or `None`
/// when nothing came back in time.
async fn quick_status(addr: SocketAddr) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /.well-known/plait HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    if read.is_err() || buf.len() < 12 {
        return None;
    }
    std::str::from_utf8(&buf[9..12]).ok()?.parse().ok()
}

/// The `limits` object of the status resource.
async fn limits(p: &Plait) -> serde_json::Value {
    let r = wire::send(p.addr, "GET", "/.well-known/plait", &[], b"").await;
    serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["limits"].clone()
}

#[tokio::test]
async fn idle_sockets_do_not_lock_out_other_clients() {
    let p = Plait::start_with_env(
        Store::Embedded,
        &[],
        &[
            ("PLAIT_LIMITS__MAX_CONNECTIONS", "5"),
            ("PLAIT_LIMITS__IDLE_TIMEOUT_SECS", "1"),
        ],
    );
    let mut idle = Vec::new();
    // Nothing at all; half a request line; a bare HTTP/2 preface; an idle keep-alive
    // connection after one request; an HTTP/2 preface and SETTINGS, then nothing.
    idle.push(TcpStream::connect(p.addr).await.unwrap());
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /").await.unwrap();
    idle.push(s);
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    idle.push(s);
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /.well-known/plait HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first[9..12], b"200");
    idle.push(s);
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    idle.push(s);
    // Each is closed by the server within a bounded time.
    for (i, s) in idle.iter_mut().enumerate() {
        let t = Instant::now();
        read_until_closed(s, Duration::from_secs(15)).await;
        assert!(t.elapsed() < Duration::from_secs(15), "socket {i}");
    }
    // And a new client is served.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if quick_status(p.addr).await == Some(200) {
            break;
        }
        assert!(Instant::now() < deadline, "a sixth client is still not served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn past_the_cap_a_connection_is_answered_503_at_once() {
    let p = Plait::start_with_env(Store::Embedded, &[], &[("PLAIT_LIMITS__MAX_CONNECTIONS", "2")]);
    let _a = TcpStream::connect(p.addr).await.unwrap();
    let _b = TcpStream::connect(p.addr).await.unwrap();
    let r = wire::send(p.addr, "GET", "/.well-known/plait", &[], b"").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("plait-error"), Some("too-many-connections"));
    assert!(r.header("retry-after").is_some_and(|v| v.parse::<u64>().is_ok()));
    assert!(r.text().contains("max_connections"), "{}", r.text());
    drop((_a, _b));
    // The places are given back when the sockets close.
    let deadline = Instant::now() + Duration::from_secs(10);
    while quick_status(p.addr).await != Some(200) {
        assert!(Instant::now() < deadline, "not served after the others left");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn past_the_cap_an_http2_client_is_answered_in_http2() {
    let p = Plait::start_with_env(Store::Embedded, &[], &[("PLAIT_LIMITS__MAX_CONNECTIONS", "1")]);
    let _a = TcpStream::connect(p.addr).await.unwrap();
    // HTTP/2 with prior knowledge (h2c), as a load balancer or gRPC-style client speaks it.
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("an HTTP/2 handshake on a refused connection");
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/.well-known/plait", p.addr))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let res = send.send_request(req).await.expect("an answer");
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["plait-error"], "too-many-connections");
    assert!(
        res.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .is_ok()
    );
}

#[tokio::test]
async fn connections_per_address_are_capped() {
    let p = Plait::start_with_env(
        Store::Embedded,
        &[],
        &[("PLAIT_LIMITS__MAX_CONNECTIONS_PER_ADDRESS", "2")],
    );
    let a = TcpStream::connect(p.addr).await.unwrap();
    let _b = TcpStream::connect(p.addr).await.unwrap();
    let asked = Instant::now();
    let r = wire::send(p.addr, "GET", "/.well-known/plait", &[], b"").await;
    assert_eq!(r.status, 503);
    // Held `limits.rate_limited_delay_ms` (1 s) as a 429 is, so a client reconnecting as
    // soon as it is refused does so about once a second. (A lower bound: a slow machine
    // cannot make it fail.)
    assert!(asked.elapsed() >= Duration::from_millis(1000), "not held");
    assert_eq!(r.header("plait-error"), Some("too-many-connections-from-address"));
    assert!(r.header("retry-after").is_some());
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(10);
    while quick_status(p.addr).await != Some(200) {
        assert!(Instant::now() < deadline, "not served after one left");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_body_that_never_ends_is_cut() {
    let p = Plait::start_with_env(
        Store::Embedded,
        &[],
        &[
            ("PLAIT_LIMITS__BODY_READ_TIMEOUT_SECS", "1"),
            ("PLAIT_LIMITS__IDLE_TIMEOUT_SECS", "2"),
        ],
    );
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        b"PUT /slow HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n[1,",
    )
    .await
    .unwrap();
    let answer = read_until_closed(&mut s, Duration::from_secs(15)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "a stalled body is a request timeout: {answer}"
    );
    assert!(answer.contains("body_read_timeout_secs"), "{answer}");
    assert_eq!(
        wire::send(p.addr, "GET", "/slow", &[], b"").await.text(),
        "",
        "nothing stored"
    );
    let limits = &limits(&p).await;
    assert_eq!(limits["body_read_timeout_secs"], 1);
    assert_eq!(limits["idle_timeout_secs"], 2);
    assert_eq!(limits["max_connections_per_address"], 256);
    assert!(
        limits["max_connections"].as_u64().is_some_and(|n| n >= 16),
        "{limits}"
    );
}

#[tokio::test]
async fn websockets_count_toward_the_connection_cap() {
    let p = Plait::start_with_env(Store::Embedded, &[], &[("PLAIT_LIMITS__MAX_CONNECTIONS", "2")]);
    let url = format!("ws://{}/_connect_to_statebus_/websocket", p.addr);
    let (a, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (b, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let r = wire::send(p.addr, "GET", "/.well-known/plait", &[], b"").await;
    assert_eq!(r.status, 503, "{}", r.text());
    drop((a, b));
    let deadline = Instant::now() + Duration::from_secs(10);
    while quick_status(p.addr).await != Some(200) {
        assert!(
            Instant::now() < deadline,
            "not served after the websockets closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn websockets_that_answer_no_pings_are_closed() {
    let p = Plait::start_with_env(
        Store::Embedded,
        &[],
        &[
            ("PLAIT_LIMITS__PING_INTERVAL_SECS", "1"),
            ("PLAIT_LIMITS__PING_TIMEOUT_SECS", "1"),
        ],
    );
    let url = format!("ws://{}/_connect_to_statebus_/websocket", p.addr);
    let (mut quiet, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (mut live, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    // `live` reads (so it answers pings) throughout; `quiet` reads nothing for 4 s.
    let live_task = tokio::spawn(async move {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            match tokio::time::timeout(Duration::from_millis(500), live.next()).await {
                Ok(Some(Ok(_))) | Err(_) => {}
                Ok(_) => return false,
            }
        }
        true
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = quiet.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the quiet websocket is still open");
    assert!(
        live_task.await.unwrap(),
        "the websocket answering pings was closed"
    );
}
