//! A subscriber that stops reading blocks nobody: writers and other subscribers go on at
//! full speed, the server keeps answering, and the stalled subscriber is caught up with
//! one coalesced update when it reads again.

use std::time::{Duration, Instant};

use plait_tests::plait::{Plait, Store};
use plait_tests::wire;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Opens a subscription with a tiny receive buffer and never reads it.
async fn stalled_subscriber(addr: std::net::SocketAddr, path: &str) -> tokio::net::TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    socket.set_nonblocking(true).unwrap();
    let mut s = tokio::net::TcpSocket::from_std_stream(socket.into())
        .connect(addr)
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nSubscribe: true\r\n\r\n").as_bytes())
        .await
        .unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_blocks_nobody() {
    let p = Plait::start_with_env(Store::Embedded, &[], &[("PLAIT_ENGINE__SUBSCRIBER_QUEUE", "16")]);
    let doc = "/bp";
    let octets = [("Content-Type", "application/octet-stream")];
    wire::send(p.addr, "PUT", doc, &octets, b"start").await;
    let mut stalled = stalled_subscriber(p.addr, doc).await;
    let mut fast = wire::subscribe(p.addr, doc, &[("Subscribe", "true")]).await;
    assert_eq!(
        fast.next_block(Duration::from_secs(5)).await.unwrap().body_text(),
        "start"
    );
    // 48 writes of 128 KiB: more than the stalled socket's kernel buffers (the sender's grow
    // to a few MiB) plus hyper's buffer and the shared queue (16 events) can hold.
    let t0 = Instant::now();
    for i in 0..48u8 {
        let value = vec![i; 128 * 1024];
        let r = wire::send(p.addr, "PUT", doc, &octets, &value).await;
        assert_eq!(r.status, 200, "write {i}");
        // The fast subscriber keeps up, update by update.
        let b = fast
            .next_block(Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("fast subscriber stalled at {i}"));
        assert_eq!(b.body.as_deref(), Some(&value[..]));
    }
    assert!(t0.elapsed() < Duration::from_secs(60));
    // Other requests are answered meanwhile.
    assert_eq!(
        wire::send(p.addr, "GET", "/.well-known/plait", &[], b"")
            .await
            .status,
        200
    );
    // When the stalled client reads again, it gets everything it missed without a gap:
    // what it reads ends with an update that takes it to the current version.
    let current = wire::send(p.addr, "GET", doc, &[], b"")
        .await
        .header("version")
        .unwrap()
        .to_string();
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(20);
    let needle = format!("Version: {current}");
    // Only the bytes since the last look (and a needle's length before them) are searched:
    // several MiB arrive in 64 KiB reads.
    let mut looked: usize = 0;
    while !String::from_utf8_lossy(&raw[looked.saturating_sub(needle.len())..]).contains(&needle) {
        looked = raw.len();
        assert!(
            Instant::now() < deadline,
            "the stalled subscriber never caught up"
        );
        match tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => raw.extend_from_slice(&buf[..n]),
            other => panic!("stalled subscriber's connection ended: {other:?}"),
        }
    }
    // The backlog was coalesced, not queued: far fewer update blocks than writes.
    let blocks = String::from_utf8_lossy(&raw).matches("HTTP 200 OK").count();
    assert!(blocks < 36, "{blocks} update blocks for 48 writes");
}
