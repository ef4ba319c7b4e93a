//! Plait behind nginx and Caddy, with the configurations shipped in `server/deploy/`
//! (only their addresses changed): subscriptions stream through at once (nginx passes a
//! small update on promptly even with `proxy_buffering on`; what the shipped `off` and the
//! day-long read timeout are for — large updates, idle subscriptions past nginx's 60 s
//! default — is not timed here), the Statebus
//! websocket passes, and with `trusted_proxies` each client behind the proxy has its own
//! write budget while a forged `X-Forwarded-For` earns nobody a fresh one.
//!
//! Addresses: the proxy listens on 127.0.0.2, clients connect from 127.0.0.3 and
//! 127.0.0.4, Plait (trusting 127.0.0.1, where the proxy connects from) on 127.0.0.1.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use plait_tests::plait::{Plait, Store};
use plait_tests::wire;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../server/deploy");

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A proxy process, killed when dropped.
struct Proxy {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    async fn wait_ready(self) -> Proxy {
        let end = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(self.addr).await.is_err() {
            assert!(
                Instant::now() < end,
                "the proxy did not start listening on {}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self
    }

    async fn nginx(plait: SocketAddr) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.2:{}", free_port("127.0.0.2")).parse().unwrap();
        let site = std::fs::read_to_string(format!("{DEPLOY}/nginx.conf"))
            .unwrap()
            .replace("listen 80;", &format!("listen {addr};"))
            .replace("server 127.0.0.1:7524;", &format!("server {plait};"));
        let d = dir.path().display();
        std::fs::write(dir.path().join("site.conf"), site).unwrap();
        std::fs::write(
            dir.path().join("nginx.conf"),
            format!(
                "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid;
                 error_log {d}/error.log;
                 events {{ worker_connections 256; }}
                 http {{ access_log off; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
                   fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
                   include {d}/site.conf; }}"
            ),
        )
        .unwrap();
        let child = Command::new("nginx")
            .args(["-p", &d.to_string(), "-e", &format!("{d}/error.log"), "-c"])
            .arg(dir.path().join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (Debian's nginx package; .ci/run installs it)");
        Proxy {
            child,
            addr,
            _dir: dir,
        }
        .wait_ready()
        .await
    }

    async fn caddy(plait: SocketAddr) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.2:{}", free_port("127.0.0.2")).parse().unwrap();
        let site = std::fs::read_to_string(format!("{DEPLOY}/Caddyfile"))
            .unwrap()
            .replace("example.org {", &format!("http://{addr} {{"))
            .replace("reverse_proxy 127.0.0.1:7524", &format!("reverse_proxy {plait}"));
        let file = dir.path().join("Caddyfile");
        std::fs::write(&file, format!("{{\n\tadmin off\n}}\n{site}")).unwrap();
        let child = Command::new("caddy")
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&file)
            .env("HOME", dir.path())
            .env("XDG_DATA_HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("caddy (Debian's caddy package; .ci/run installs it)");
        Proxy {
            child,
            addr,
            _dir: dir,
        }
        .wait_ready()
        .await
    }
}

/// A PUT of a fresh value from source address `from` to `to`; the status.
async fn put_from(from: &str, to: SocketAddr, path: &str, extra: &[(&str, &str)]) -> u16 {
    let body = format!("{from} {}", rand::random::<u64>());
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(to).await.unwrap();
    let mut req = format!(
        "PUT {path} HTTP/1.1\r\nHost: {to}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}

async fn behind(make: impl AsyncFnOnce(SocketAddr) -> Proxy) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("plait.toml");
    std::fs::write(&config, "trusted_proxies = [\"127.0.0.1\"]\n").unwrap();
    let p = Plait::start_with_env(
        Store::Embedded,
        &["--config", config.to_str().unwrap()],
        &[
            ("PLAIT_LIMITS__WRITES_PER_SECOND", "1"),
            ("PLAIT_LIMITS__WRITE_BURST", "1"),
            // 429s answered at once: one held a second would outlast the one-second budget
            // these assertions rely on.
            ("PLAIT_LIMITS__RATE_LIMITED_DELAY_MS", "0"),
        ],
    );
    let proxy = make(p.addr).await;

    // A subscription through the proxy sees an update within a moment.
    assert_eq!(put_from("127.0.0.5", p.addr, "/live", &[]).await, 200);
    let mut sub = wire::subscribe(proxy.addr, "/live", &[("Subscribe", "true")]).await;
    assert_eq!(sub.status, 209, "subscribed through the proxy");
    sub.next_block(Duration::from_secs(5))
        .await
        .expect("the current state");
    let written = Instant::now();
    assert_eq!(put_from("127.0.0.6", p.addr, "/live", &[]).await, 200);
    sub.next_block(Duration::from_secs(5))
        .await
        .expect("the update, through the proxy");
    assert!(
        written.elapsed() < Duration::from_secs(2),
        "the update took {:?} through the proxy",
        written.elapsed()
    );

    // The Statebus websocket passes.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/_connect_to_statebus_/websocket", proxy.addr))
            .await
            .expect("a websocket through the proxy");
    use futures::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        r#"{"get": "/live"}"#,
    ))
    .await
    .unwrap();
    use futures::StreamExt;
    let first = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert!(
        matches!(first, Ok(Some(Ok(_)))),
        "an answer over the websocket: {first:?}"
    );

    // Each client behind the proxy has its own write budget (one write a second here)...
    assert_eq!(put_from("127.0.0.3", proxy.addr, "/a", &[]).await, 200);
    assert_eq!(
        put_from("127.0.0.3", proxy.addr, "/a", &[]).await,
        429,
        "the same client again"
    );
    // ...which a forged X-Forwarded-For does not renew...
    assert_eq!(
        put_from("127.0.0.3", proxy.addr, "/a", &[("X-Forwarded-For", "9.9.9.9")]).await,
        429,
        "a forged X-Forwarded-For must not pass for another client"
    );
    // ...while another client, behind the same proxy, is not held back by the first.
    assert_eq!(
        put_from("127.0.0.4", proxy.addr, "/b", &[]).await,
        200,
        "another client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx() {
    behind(Proxy::nginx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_caddy() {
    behind(Proxy::caddy).await;
}
