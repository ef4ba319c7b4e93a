//! One resource, 10,000 subscribers, the server at its default settings (no limit raised,
//! as `plait serve` starts on a machine whose open-files limit is 20,000): every
//! subscriber gets every update. The subscribers come from 40 loopback addresses, as
//! 10,000 real clients come from many (the per-address cap is 256); the writer from
//! another.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use plait_tests::plait::{Plait, Store};
use plait_tests::wire;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SUBSCRIBERS: usize = 10_000;
const PER_ADDRESS: usize = 250;
const UPDATES: usize = 5;

/// This process holds one socket per subscriber: its soft open-files limit goes up to the
/// hard one.
fn raise_open_files() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
    l.rlim_cur
}

/// Subscribes from `from`; counts itself ready once the first state came, then reads
/// until it has seen every update. Whether it did.
async fn subscriber(server: SocketAddr, from: IpAddr, ready: Arc<AtomicUsize>) -> bool {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind(SocketAddr::new(from, 0))
        .expect("bind a loopback address");
    let Ok(mut s) = socket.connect(server).await else {
        return false;
    };
    let req = "GET /fan HTTP/1.1\r\nHost: x\r\nSubscribe: true\r\nAccept: application/json\r\n\r\n";
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let mut counted = false;
    let read_all = async {
        loop {
            let n = match s.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen);
            if !counted && text.contains("\"n\":0") {
                counted = true;
                ready.fetch_add(1, Ordering::SeqCst);
            }
            if (1..=UPDATES).all(|k| text.contains(&format!("\"n\":{k}}}"))) {
                return true;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read_all)
        .await
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_subscribers_at_default_settings_get_every_update() {
    let files = raise_open_files();
    assert!(
        files as usize > SUBSCRIBERS + 1_000,
        "this test needs an open-files limit above {} (it is {files})",
        SUBSCRIBERS + 1_000
    );
    let p = Plait::start(Store::Embedded);
    let json = [("Content-Type", "application/json")];
    assert_eq!(
        wire::send(p.addr, "PUT", "/fan", &json, b"{\"n\":0}")
            .await
            .status,
        200
    );
    let ready = Arc::new(AtomicUsize::new(0));
    let mut subs = Vec::with_capacity(SUBSCRIBERS);
    for i in 0..SUBSCRIBERS {
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i / PER_ADDRESS) as u8));
        subs.push(tokio::spawn(subscriber(p.addr, from, ready.clone())));
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for _ in 0..1200 {
        if ready.load(Ordering::SeqCst) == SUBSCRIBERS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        ready.load(Ordering::SeqCst),
        SUBSCRIBERS,
        "every subscriber got the first state"
    );
    for k in 1..=UPDATES {
        let r = wire::send(p.addr, "PUT", "/fan", &json, format!("{{\"n\":{k}}}").as_bytes()).await;
        assert_eq!(r.status, 200, "update {k}: {}", r.text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut complete = 0;
    for s in subs {
        complete += usize::from(s.await.unwrap());
    }
    assert_eq!(complete, SUBSCRIBERS, "subscribers that got every update");
}
