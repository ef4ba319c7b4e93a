//! The `mux` workload: one browser-like client holding many subscriptions, either through
//! one Braid multiplexer (as braid-http's browser client does: a `POST
//! /.well-known/multiplexer/<id>` stream, and each subscription sent with
//! `Multiplex-Through` on a pool of six keep-alive connections, a browser's per-origin
//! limit) or with one HTTP/1.1 connection per subscription (`plain`). Timestamped JSON
//! updates go round-robin to the resources; the report gives the delivery latency and
//! the server's resident memory per subscription.
//!
//! It speaks plain HTTP/1.1 on its own (a few small helpers at the end) and shares only
//! the histogram helpers with the other workloads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use super::net::{Target, content_length, find, server_rss};
use super::{hist, now_us, summary};

/// Connections a browser opens to one origin over HTTP/1.1.
const BROWSER_CONNECTIONS: usize = 6;

/// How the client holds its subscriptions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Through one multiplexer.
    Multiplexed,
    /// One HTTP/1.1 connection each.
    Plain,
}

impl Mode {
    pub fn parse(s: &str) -> anyhow::Result<Mode> {
        match s {
            "multiplexed" => Ok(Mode::Multiplexed),
            "plain" => Ok(Mode::Plain),
            other => bail!("--mode is multiplexed or plain, not {other}"),
        }
    }
}

/// What the subscribers report: first updates seen, deliveries, their latency.
#[derive(Clone)]
struct Tally {
    ready: Arc<AtomicUsize>,
    got: Arc<AtomicU64>,
    lat: Arc<Mutex<Histogram<u64>>>,
    stop: Arc<tokio::sync::Notify>,
}

pub async fn mux(
    url: &str,
    subs: usize,
    resources: usize,
    updates: usize,
    interval: Duration,
    mode: Mode,
) -> anyhow::Result<serde_json::Value> {
    let addr: SocketAddr = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .context("only http://IP:PORT URLs")?
        .parse()
        .context("the URL's host is not IP:PORT")?;
    let resources = resources.clamp(1, subs.max(1));
    let path = |r: usize| format!("/bench/mux/{r}");
    for r in 0..resources {
        let (status, _) = KeepAlive::connect(addr)
            .await?
            .exchange(
                "PUT",
                &path(r),
                &[("Content-Type", "application/json")],
                b"{\"start\":true}",
            )
            .await?;
        if status != 200 {
            bail!("creating {} answered {status}", path(r));
        }
    }
    let rss0 = server_rss(&Target::plain(addr)).await?;
    let tally = Tally {
        ready: Arc::new(AtomicUsize::new(0)),
        got: Arc::new(AtomicU64::new(0)),
        lat: Arc::new(Mutex::new(hist())),
        stop: Arc::new(tokio::sync::Notify::new()),
    };
    let t_connect = Instant::now();
    let mut tasks = Vec::new();
    let connections = match mode {
        Mode::Plain => {
            for i in 0..subs {
                tasks.push(tokio::spawn(plain_subscriber(
                    addr,
                    path(i % resources),
                    tally.clone(),
                )));
            }
            subs
        }
        Mode::Multiplexed => {
            let id = format!("load{}", now_us());
            let stream = open_multiplexer(addr, &id).await?;
            tasks.push(tokio::spawn(read_multiplexer(stream, tally.clone())));
            // Six connections send the subscriptions, each answered 293 at once.
            let mut senders = Vec::new();
            for c in 0..BROWSER_CONNECTIONS {
                let id = id.clone();
                let mine: Vec<usize> = (c..subs).step_by(BROWSER_CONNECTIONS).collect();
                senders.push(tokio::spawn(async move {
                    let mut conn = KeepAlive::connect(addr).await?;
                    for i in mine {
                        let through = format!("/.well-known/multiplexer/{id}/r{i}");
                        let headers = [
                            ("Subscribe", "true"),
                            ("Accept", "application/json"),
                            ("Multiplex-Version", "1.0"),
                            ("Multiplex-Through", through.as_str()),
                        ];
                        let (status, body) = conn
                            .exchange("GET", &format!("/bench/mux/{}", i % resources), &headers, b"")
                            .await?;
                        if status != 293 {
                            bail!(
                                "a multiplexed subscription answered {status}: {}",
                                String::from_utf8_lossy(&body)
                            );
                        }
                    }
                    Ok::<(), anyhow::Error>(())
                }));
            }
            for s in senders {
                s.await??;
            }
            1 + BROWSER_CONNECTIONS
        }
    };
    while tally.ready.load(Ordering::SeqCst) < subs {
        if t_connect.elapsed() > Duration::from_secs(120) {
            bail!(
                "only {} of {subs} subscriptions got their first update",
                tally.ready.load(Ordering::SeqCst)
            );
        }
        if let Some(t) = tasks.iter().position(|t| t.is_finished()) {
            let outcome = tasks.swap_remove(t).await;
            bail!("a subscriber ended before the updates: {outcome:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_s = t_connect.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss1 = server_rss(&Target::plain(addr)).await?;
    // The writer: one keep-alive connection, timestamped JSON, round-robin over resources.
    let mut w = KeepAlive::connect(addr).await?;
    let mut want = 0u64;
    let t0 = Instant::now();
    for i in 0..updates {
        let r = i % resources;
        let body = format!("{{\"t\":{},\"i\":{i}}}", now_us());
        let (status, text) = w
            .exchange(
                "PUT",
                &path(r),
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            )
            .await?;
        if status != 200 {
            bail!("PUT answered {status}: {}", String::from_utf8_lossy(&text));
        }
        // Subscription k follows resource k % resources.
        want += ((subs + resources - 1 - r) / resources) as u64;
        tokio::time::sleep(interval).await;
    }
    let write_s = t0.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tally.got.load(Ordering::Relaxed) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tally.stop.notify_waiters();
    for t in tasks {
        let _ = t.await;
    }
    let lat = tally.lat.lock().await;
    Ok(serde_json::json!({
        "workload": "mux",
        "mode": match mode { Mode::Multiplexed => "multiplexed", Mode::Plain => "plain" },
        "subscriptions": subs,
        "resources": resources,
        "client_connections": connections,
        "updates": updates,
        "interval_ms": interval.as_millis() as u64,
        "delivered": tally.got.load(Ordering::Relaxed),
        "expected": want,
        "connect_secs": connect_s,
        "deliveries_per_sec": tally.got.load(Ordering::Relaxed) as f64 / write_s,
        "delivery_latency": summary(&lat),
        "server_rss_before": rss0,
        "server_rss_subscribed": rss1,
        "server_bytes_per_subscription": rss1.saturating_sub(rss0) / subs.max(1) as u64,
    }))
}

/// `POST /.well-known/multiplexer/<id>`: the stream, past its response head.
async fn open_multiplexer(addr: SocketAddr, id: &str) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!(
            "POST /.well-known/multiplexer/{id} HTTP/1.1\r\nHost: load\r\nMultiplex-Version: 1.0\r\nContent-Length: 0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("the multiplexer closed before its response head");
        }
        raw.extend_from_slice(&chunk[..n]);
        if let Some(e) = find(&raw, b"\r\n\r\n") {
            if !raw.starts_with(b"HTTP/1.1 200") {
                bail!("opening a multiplexer: {}", String::from_utf8_lossy(&raw[..e]));
            }
            raw.drain(..e + 4);
            return Ok((s, raw));
        }
    }
}

/// One multiplexed response as the client has it so far.
#[derive(Default)]
struct Response {
    /// Bytes not yet parsed: the response head, then update blocks.
    buf: Vec<u8>,
    head_done: bool,
    first: bool,
}

/// Reads the multiplexer's stream (chunked), splits it into the responses it carries and
/// their update blocks, and records each stamped update's latency, as the page's one
/// JavaScript thread would.
async fn read_multiplexer((mut s, mut raw): (TcpStream, Vec<u8>), tally: Tally) -> anyhow::Result<()> {
    let mut stream = Vec::new();
    let mut at = 0;
    let mut responses: HashMap<String, Response> = HashMap::new();
    let mut local = hist();
    let mut chunk = vec![0u8; 65536];
    // Enabled once, so a stop that comes while a read is being handled is not missed.
    let stopped = tally.stop.notified();
    tokio::pin!(stopped);
    stopped.as_mut().enable();
    loop {
        // De-chunk.
        while let Some(nl) = find(&raw, b"\r\n") {
            let size = usize::from_str_radix(std::str::from_utf8(&raw[..nl])?.trim(), 16)?;
            if raw.len() < nl + 2 + size + 2 {
                break;
            }
            stream.extend_from_slice(&raw[nl + 2..nl + 2 + size]);
            raw.drain(..nl + 2 + size + 2);
        }
        // Frames: `start response ID`, `N bytes for response ID` + N bytes, `close response ID`.
        loop {
            while stream.get(at).is_some_and(|b| *b == b'\r' || *b == b'\n') {
                at += 1;
            }
            let Some(eol) = find(&stream[at..], b"\r\n") else {
                break;
            };
            let line = std::str::from_utf8(&stream[at..at + eol])?;
            let words: Vec<&str> = line.split(' ').collect();
            match words.as_slice() {
                ["start", "response", _] | ["close", "response", _] => at += eol + 2,
                [n, "bytes", "for", "response", id] => {
                    let n: usize = n.parse().context("a frame length")?;
                    if stream.len() < at + eol + 2 + n {
                        break;
                    }
                    let data = &stream[at + eol + 2..at + eol + 2 + n];
                    let r = responses.entry(id.to_string()).or_default();
                    r.buf.extend_from_slice(data);
                    at += eol + 2 + n;
                    let id = id.to_string();
                    updates(&id, r, &tally, &mut local)?;
                }
                _ => bail!("not a multiplexer frame: {line:?}"),
            }
        }
        if at > 1 << 20 {
            stream.drain(..at);
            at = 0;
        }
        let n = tokio::select! {
            r = s.read(&mut chunk) => r?,
            _ = &mut stopped => break,
        };
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
    }
    tally.lat.lock().await.add(&local)?;
    Ok(())
}

/// Takes the response head and whole update blocks off `r`, recording stamped ones.
fn updates(id: &str, r: &mut Response, tally: &Tally, local: &mut Histogram<u64>) -> anyhow::Result<()> {
    if !r.head_done {
        let Some(e) = find(&r.buf, b"\r\n\r\n") else {
            return Ok(());
        };
        if !r.buf.starts_with(b"HTTP/1.1 209") {
            bail!(
                "{id} is not a subscription: {}",
                String::from_utf8_lossy(&r.buf[..e])
            );
        }
        r.buf.drain(..e + 4);
        r.head_done = true;
        r.first = true;
    }
    loop {
        let skip = r.buf.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
        r.buf.drain(..skip);
        let Some(he) = find(&r.buf, b"\r\n\r\n") else {
            return Ok(());
        };
        let len = content_length(std::str::from_utf8(&r.buf[..he])?);
        if r.buf.len() < he + 4 + len {
            return Ok(());
        }
        let t = stamp(&r.buf[he + 4..he + 4 + len]);
        r.buf.drain(..he + 4 + len);
        if std::mem::take(&mut r.first) {
            tally.ready.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(t) = t {
            local.record(now_us().saturating_sub(t).max(1))?;
            tally.got.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A subscription on a connection of its own: its chunked body parsed like a multiplexed
/// response's.
async fn plain_subscriber(addr: SocketAddr, path: String, tally: Tally) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: load\r\nSubscribe: true\r\nAccept: application/json\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16384];
    let mut r = Response::default();
    let mut local = hist();
    let stopped = tally.stop.notified();
    tokio::pin!(stopped);
    stopped.as_mut().enable();
    loop {
        if !r.head_done
            && let Some(e) = find(&raw, b"\r\n\r\n")
        {
            // The response head, as `updates` takes it; then the chunked body.
            r.buf.extend_from_slice(&raw[..e + 4]);
            raw.drain(..e + 4);
            updates(&path, &mut r, &tally, &mut local)?;
        }
        if r.head_done {
            while let Some(nl) = find(&raw, b"\r\n") {
                let size = usize::from_str_radix(std::str::from_utf8(&raw[..nl])?.trim(), 16)?;
                if raw.len() < nl + 2 + size + 2 {
                    break;
                }
                r.buf.extend_from_slice(&raw[nl + 2..nl + 2 + size]);
                raw.drain(..nl + 2 + size + 2);
            }
            updates(&path, &mut r, &tally, &mut local)?;
        }
        let n = tokio::select! {
            n = s.read(&mut chunk) => n?,
            _ = &mut stopped => break,
        };
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
    }
    tally.lat.lock().await.add(&local)?;
    Ok(())
}

/// A keep-alive HTTP/1.1 connection for requests whose answers have a `Content-Length`.
struct KeepAlive {
    s: TcpStream,
    buf: Vec<u8>,
}

impl KeepAlive {
    async fn connect(addr: SocketAddr) -> anyhow::Result<KeepAlive> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(KeepAlive { s, buf: Vec::new() })
    }

    /// Sends one request and reads its answer: status and body.
    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: load\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let mut out = req.into_bytes();
        out.extend_from_slice(body);
        self.s.write_all(&out).await?;
        let mut chunk = [0u8; 16384];
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end])?.to_string();
                let status: u16 = head.split(' ').nth(1).context("a status line")?.parse()?;
                let len = content_length(&head);
                if self.buf.len() >= end + 4 + len {
                    let body = self.buf[end + 4..end + 4 + len].to_vec();
                    self.buf.drain(..end + 4 + len);
                    return Ok((status, body));
                }
            }
            let n = self.s.read(&mut chunk).await?;
            if n == 0 {
                bail!("the connection closed");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The write time stamped in an update (`"t":<µs>`).
fn stamp(body: &[u8]) -> Option<u64> {
    let at = find(body, b"\"t\":")? + 4;
    let digits: String = body[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .map(|&b| b as char)
        .collect();
    digits.parse().ok()
}
