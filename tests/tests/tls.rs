//! HTTPS against the real `plait` binary, with a CA and certificates the test makes:
//! curl over HTTP/2, a Braid subscription over HTTP/2, the Statebus websocket over wss
//! (HTTP/1.1, raw and with the statebus npm client) and over HTTP/2 (RFC 8441), handshakes that fail or stall counted as
//! refusals, certificates replaced on disk (by their files changing, and on SIGHUP), and
//! the plain listener's redirects.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use plait_tests::pki::Ca;
use plait_tests::plait::{Plait, Store};
use plait_tests::wire;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;

/// A test CA and the files of a server certificate it issued for `localhost`.
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca: Ca::new("Plait test CA"),
        };
        std::fs::write(pki.ca_file(), pki.ca.pem()).unwrap();
        pki.issue("first");
        pki
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
    fn cert_file(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }
    fn key_file(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }

    /// Issues a new certificate for `localhost` (named `name`) with a new key, writes
    /// both files (each replaced by rename, as certbot and friends do), and returns it.
    fn issue(&self, name: &str) -> CertificateDer<'static> {
        let issued = self.ca.issue(&["localhost"], Some(name));
        replace(&self.key_file(), issued.key_pem().as_bytes());
        replace(&self.cert_file(), issued.cert_pem().as_bytes());
        issued.cert.der().clone()
    }

    /// `plait serve` arguments for HTTPS with these files.
    fn args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert_file().display().to_string(),
            "--tls-key".into(),
            self.key_file().display().to_string(),
        ]
    }

    /// A client configuration trusting only the test CA, offering `alpn`.
    fn client(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn start(pki: &Pki, extra: &[&str], env: &[(&str, &str)]) -> Plait {
    let mut args = pki.args();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Plait::start_with_env(Store::Embedded, &args, env)
}

/// A TLS connection to the server as `localhost`.
async fn connect(p: &Plait, pki: &Pki, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    pki.client(alpn)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake")
}

/// The certificate the server presents to a new handshake.
async fn presented(p: &Plait, pki: &Pki) -> CertificateDer<'static> {
    let tls = connect(p, pki, &[b"http/1.1"]).await;
    tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone()
}

/// An HTTP/2 connection over TLS (ALPN `h2`).
async fn h2(p: &Plait, pki: &Pki) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let tls = connect(p, pki, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN chose h2");
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    send
}

fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> http::Request<Full<Bytes>> {
    let mut r = http::Request::builder()
        .method(method)
        .uri(format!("https://localhost{path}"));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

/// `curl` with the test CA: (HTTP version, status, body).
fn curl(pki: &Pki, url: &str, extra: &[&str]) -> (String, String, String) {
    let body = pki.dir.path().join("curl-body");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(pki.ca_file())
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_version} %{http_code}"])
        .args(extra)
        .arg(url)
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w = String::from_utf8(out.stdout).unwrap();
    let (version, code) = w.split_once(' ').unwrap();
    let body = std::fs::read_to_string(&body).unwrap_or_default();
    (version.to_string(), code.to_string(), body)
}

/// The refusals tally of `/.well-known/plait`, read over HTTPS.
fn refusals(p: &Plait, pki: &Pki) -> serde_json::Value {
    let url = format!("https://localhost:{}/.well-known/plait", p.addr.port());
    let (_, code, body) = curl(pki, &url, &[]);
    assert_eq!(code, "200");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["refusals"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_speaks_http2_and_bad_handshakes_are_refusals() {
    let pki = Pki::new();
    let p = start(&pki, &[], &[("PLAIT_LIMITS__TLS_HANDSHAKE_TIMEOUT_SECS", "1")]);
    let url = format!("https://localhost:{}/.well-known/plait", p.addr.port());
    let (version, code, body) = curl(&pki, &url, &["--http2"]);
    assert_eq!((version.as_str(), code.as_str()), ("2", "200"), "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["limits"]["tls_handshake_timeout_secs"],
        1
    );
    let (version, code, _) = curl(&pki, &url, &["--http1.1"]);
    assert_eq!((version.as_str(), code.as_str()), ("1.1", "200"));

    // Plain HTTP to the HTTPS port: the handshake fails, the connection is closed.
    let mut plain = TcpStream::connect(p.addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut got))
        .await
        .expect("closed within 5 s");
    assert!(!got.starts_with(b"HTTP/"), "no HTTP answer in the clear");
    // A client that never says hello: let go after the handshake timeout.
    let mut silent = TcpStream::connect(p.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a silent connection is closed within the handshake timeout: {closed:?}"
    );
    let counted = refusals(&p, &pki);
    assert!(counted["tls-handshake-failed"].as_u64() >= Some(1), "{counted}");
    assert_eq!(counted["tls-handshake-timeout"], 1, "{counted}");
    // And the server serves on.
    let (version, code, _) = curl(&pki, &url, &["--http2"]);
    assert_eq!((version.as_str(), code.as_str()), ("2", "200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_cap_the_503_comes_over_tls() {
    let pki = Pki::new();
    let p = start(&pki, &[], &[("PLAIT_LIMITS__MAX_CONNECTIONS", "2")]);
    let url = format!("https://localhost:{}/.well-known/plait", p.addr.port());
    let held = (
        connect(&p, &pki, &[b"http/1.1"]).await,
        connect(&p, &pki, &[b"h2"]).await,
    );
    // A refused connection still gets a TLS handshake and a real answer in its protocol.
    for version in ["--http2", "--http1.1"] {
        let (v, code, body) = curl(&pki, &url, &[version]);
        assert_eq!(code, "503", "{version}: {body}");
        assert_eq!(v, if version == "--http2" { "2" } else { "1.1" });
        assert!(body.contains("max_connections"), "{body}");
    }
    // Its headers: Retry-After and the machine-readable reason.
    let mut send = {
        let tls = connect(&p, &pki, &[b"h2"]).await;
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("HTTP/2 handshake on a refused connection");
        tokio::spawn(conn);
        send
    };
    let res = send
        .send_request(request("GET", "/.well-known/plait", &[], ""))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["plait-error"], "too-many-connections");
    assert!(
        res.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .is_ok()
    );
    drop(held);
    // The places are given back when the connections close.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, code, _) = curl(&pki, &url, &["--http2"]);
        if code == "200" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not served after the others left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn braid_subscription_over_http2() {
    let pki = Pki::new();
    let p = start(&pki, &[], &[]);
    let mut send = h2(&p, &pki).await;
    let json = [("Content-Type", "application/json")];
    let r = send
        .send_request(request("PUT", "/notes/tls", &json, r#"{"n":1}"#))
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(r.version(), http::Version::HTTP_2);

    // Subscribe and write on the same connection, on two streams.
    let sub = send
        .send_request(request("GET", "/notes/tls", &[("Subscribe", "true")], ""))
        .await
        .unwrap();
    assert_eq!(sub.status(), 209);
    let mut body = sub.into_body();
    let mut got = Vec::new();
    let mut blocks = Vec::new();
    let mut wrote = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !blocks
        .iter()
        .any(|b: &wire::Block| b.body_text().contains(r#""n":2"#))
    {
        // The first block is the current state; then the write.
        if !wrote && !blocks.is_empty() {
            assert!(blocks[0].body_text().contains(r#""n":1"#), "{blocks:?}");
            let r = send
                .send_request(request("PUT", "/notes/tls", &json, r#"{"n":2}"#))
                .await
                .unwrap();
            assert!(r.status().is_success(), "{}", r.status());
            wrote = true;
        }
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .expect("the update within 10 s")
            .expect("the subscription is open")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            got.extend_from_slice(&data);
        }
        while let Some((block, used)) = wire::parse_block(&got) {
            blocks.push(block);
            got.drain(..used);
        }
    }
    assert!(wrote);
}

/// A websocket to the Statebus endpoint; JSON frames in, JSON frames out.
async fn set_and_get<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, key: &str, val: i64)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let set = serde_json::json!({"set": {"key": key, "val": {"n": val}}});
    ws.send(Message::text(set.to_string())).await.unwrap();
    ws.send(Message::text(serde_json::json!({"get": key}).to_string()))
        .await
        .unwrap();
    assert_eq!(
        next_json(ws).await,
        serde_json::json!({"set": {"key": key, "val": {"n": val}}})
    );
}

async fn next_json<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> serde_json::Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame within 5 s")
            .expect("the websocket is open")
            .unwrap();
        if let Message::Text(t) = m {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statebus_over_wss_and_over_http2() {
    let pki = Pki::new();
    // Websockets are requests in flight however long they last: not idle.
    let p = start(&pki, &[], &[("PLAIT_LIMITS__IDLE_TIMEOUT_SECS", "1")]);
    let url = format!(
        "wss://localhost:{}/_connect_to_statebus_/websocket",
        p.addr.port()
    );

    // wss: HTTP/1.1 upgrade over TLS.
    let tls = connect(&p, &pki, &[b"http/1.1"]).await;
    let (mut ws1, res) = tokio_tungstenite::client_async(url.as_str(), tls)
        .await
        .expect("wss opens");
    assert_eq!(res.status(), 101);
    set_and_get(&mut ws1, "tls_one", 1).await;

    // RFC 8441: extended CONNECT on an HTTP/2 stream, beside an ordinary request.
    let mut send = h2(&p, &pki).await;
    let r = send
        .send_request(request("GET", "/.well-known/plait", &[], ""))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut ws2 = h2_websocket(&mut send, "/_connect_to_statebus_/websocket").await;
    set_and_get(&mut ws2, "tls_two", 2).await;
    // Each sees the other's writes.
    ws2.send(Message::text(r#"{"get":"tls_one"}"#)).await.unwrap();
    assert_eq!(
        next_json(&mut ws2).await,
        serde_json::json!({"set": {"key": "tls_one", "val": {"n": 1}}})
    );
    ws1.send(Message::text(r#"{"set":{"key":"tls_one","val":{"n":3}}}"#))
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut ws2).await,
        serde_json::json!({"set": {"key": "tls_one", "val": {"n": 3}}})
    );
    // Past the idle timeout, both websockets (and the HTTP/2 connection) are still open.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    set_and_get(&mut ws2, "tls_two", 4).await;
    set_and_get(&mut ws1, "tls_one", 5).await;
    assert_eq!(
        next_json(&mut ws2).await,
        serde_json::json!({"set": {"key": "tls_one", "val": {"n": 5}}})
    );
    // The same connection still takes requests.
    let r = send
        .send_request(request("GET", "/.well-known/plait", &[], ""))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Opens a websocket on an HTTP/2 connection (RFC 8441: extended CONNECT).
async fn h2_websocket(
    send: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    path: &str,
) -> tokio_tungstenite::WebSocketStream<TokioIo<hyper::upgrade::Upgraded>> {
    let mut connect = request("CONNECT", path, &[("sec-websocket-version", "13")], "");
    connect
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let mut res = send.send_request(connect).await.expect("extended CONNECT");
    assert_eq!(res.status(), 200, "{:?}", res.headers());
    let upgraded = hyper::upgrade::on(&mut res)
        .await
        .expect("the stream is a websocket");
    tokio_tungstenite::WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_websocket_over_http2_goes_upstream_as_http1() {
    // Browsers open websockets over HTTP/2 when the server offers extended CONNECT, to
    // every path: a proxy route's upstream speaks HTTP/1.1 websockets only.
    let echo = plait_tests::upstream::websocket_echo().await;
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("plait.toml");
    std::fs::write(
        &config,
        format!("[[proxy]]\nprefix = \"/ws\"\nupstream = \"http://{echo}\"\n"),
    )
    .unwrap();
    let p = start(
        &pki,
        &["--config", config.to_str().unwrap()],
        &[("PLAIT_LIMITS__IDLE_TIMEOUT_SECS", "1")],
    );
    let mut send = h2(&p, &pki).await;
    let r = send
        .send_request(request("GET", "/.well-known/plait", &[], ""))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut ws = h2_websocket(&mut send, "/ws/echo").await;
    for (i, msg) in ["hello", "world"].into_iter().enumerate() {
        if i == 1 {
            // Past the idle timeout the tunnel is still open.
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
        ws.send(Message::text(msg)).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("the echo within 5 s")
            .expect("the tunnel is open")
            .unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), msg);
    }
    // Extended CONNECT elsewhere is still refused: not an open proxy.
    let mut connect = request("CONNECT", "/notes/a", &[("sec-websocket-version", "13")], "");
    connect
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let res = send.send_request(connect).await.unwrap();
    assert_eq!(res.status(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statebus_npm_client_over_wss() {
    let pki = Pki::new();
    let p = start(&pki, &[], &[]);
    let base = format!("https://localhost:{}", p.addr.port());
    let ca = pki.ca_file().display().to_string();
    tokio::task::spawn_blocking(move || {
        plait_tests::node::run_with_env(
            "statebus_v7.js",
            &[&base, "live"],
            &[("NODE_EXTRA_CA_CERTS", &ca)],
        )
    })
    .await
    .unwrap();
}

/// Waits up to 10 s for new handshakes to see `want`.
async fn wait_for_certificate(p: &Plait, pki: &Pki, want: &CertificateDer<'static>) -> bool {
    for _ in 0..100 {
        if presented(p, pki).await == *want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_reloaded_when_their_files_change() {
    let pki = Pki::new();
    let p = start(&pki, &[], &[("PLAIT_TLS__RELOAD_INTERVAL_SECS", "1")]);
    let first = presented(&p, &pki).await;
    // An open connection outlives the change.
    let mut old = h2(&p, &pki).await;

    // A key that is not PEM: the old certificate stays, and the error is logged.
    replace(&pki.key_file(), b"not a key\n");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(presented(&p, &pki).await, first, "the previous certificate stays");
    assert!(
        p.log().contains("do not load"),
        "the bad files are logged:\n{}",
        p.log()
    );

    let second = pki.issue("second");
    assert_ne!(first, second);
    assert!(
        wait_for_certificate(&p, &pki, &second).await,
        "the new certificate is served"
    );
    let r = old
        .send_request(request("GET", "/.well-known/plait", &[], ""))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let url = format!("https://localhost:{}/.well-known/plait", p.addr.port());
    assert_eq!(curl(&pki, &url, &["--http2"]).1, "200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_certificates_at_once() {
    let pki = Pki::new();
    let p = start(&pki, &[], &[("PLAIT_TLS__RELOAD_INTERVAL_SECS", "3600")]);
    let first = presented(&p, &pki).await;
    let second = pki.issue("second");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(presented(&p, &pki).await, first, "not checked again for an hour");
    let pid = p.pid().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        wait_for_certificate(&p, &pki, &second).await,
        "SIGHUP loads the new pair"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_listener_redirects_to_https() {
    let pki = Pki::new();
    let p = start(&pki, &["--redirect-listen", "127.0.0.1:0"], &[]);
    let log = p.log();
    let addr: std::net::SocketAddr = log
        .lines()
        .find(|l| l.contains("redirecting plain HTTP to HTTPS"))
        .and_then(|l| l.split("addr=").nth(1))
        .and_then(|a| a.split_whitespace().next())
        .expect("the redirect listener's address is logged")
        .parse()
        .unwrap();
    let r = wire::send(addr, "GET", "/notes/a?x=1", &[], b"").await;
    assert_eq!(r.status, 308);
    let want = format!("https://127.0.0.1:{}/notes/a?x=1", p.addr.port());
    assert_eq!(r.header("location"), Some(want.as_str()));
    let r = wire::send(addr, "PUT", "/notes/b", &[], b"{}").await;
    assert_eq!(r.status, 308, "every method: 308 keeps it");
    // curl follows it to HTTPS.
    let url = format!("http://localhost:{}/.well-known/plait", addr.port());
    let (version, code, _) = curl(&pki, &url, &["-L", "--http2"]);
    assert_eq!((version.as_str(), code.as_str()), ("2", "200"));
}
