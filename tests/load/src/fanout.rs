//! The `fanout` workload: N subscribers to one resource, a writer PUTs timestamped JSON;
//! delivery latency = receive time − write time, per subscriber and update. Subscribers
//! hold one HTTP/1.1 connection each, or share HTTP/2 connections (`--h2-streams` per
//! connection, as a browser does); over plain TCP or TLS (an `https://` URL). `--stalled M`
//! adds M subscribers that never read; `--write-url` writes through another server process.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, watch};

use crate::net::{Conn, Target, Waves, content_length, find, request, server_rss};
use crate::{Auth, borrowed, hist, now_us, summary};

/// Subscribers that may be in their TLS handshake at once.
const TLS_CONNECTING: usize = 64;

#[derive(clap::Args)]
pub struct Args {
    /// Server the subscribers connect to, e.g. http://127.0.0.1:7524 (or https:// with --ca)
    #[arg(long)]
    url: String,
    /// Server the writer PUTs to (default: --url).
    #[arg(long)]
    write_url: Option<String>,
    #[arg(long, default_value_t = 1000)]
    subs: usize,
    /// 0: each subscriber on its own HTTP/1.1 connection; N: subscribers share HTTP/2
    /// connections, N streams on each.
    #[arg(long, default_value_t = 0)]
    h2_streams: usize,
    /// Subscribers that never read their responses (plain HTTP/1.1).
    #[arg(long, default_value_t = 0)]
    stalled: usize,
    #[arg(long, default_value_t = 100)]
    updates: usize,
    #[arg(long, default_value_t = 50)]
    interval_ms: u64,
    #[arg(long, default_value = "/bench/fanout")]
    path: String,
    /// Path the writer PUTs to (default: --path). With federation the subscribers read
    /// `/~<home>/x` on a replica while the writer writes `/x` at the home.
    #[arg(long)]
    write_path: Option<String>,
    /// Before measuring, write one value of this many KiB, so that subscribers that do
    /// not read have full socket buffers (as a really stalled client does).
    #[arg(long, default_value_t = 0)]
    prefill_kib: usize,
    /// How each subscription proves who asks (as `puts --auth`; a signature is made
    /// afresh for each).
    #[arg(long, default_value = "none")]
    sub_auth: String,
    /// How the writer's PUTs prove who writes.
    #[arg(long, default_value = "none")]
    write_auth: String,
}

/// What every subscriber reports into.
#[derive(Clone)]
struct Tally {
    /// Subscribers that got their first update (the current state).
    ready: Arc<AtomicUsize>,
    /// Stamped updates received, all subscribers.
    got: Arc<AtomicU64>,
    lat: Arc<Mutex<Histogram<u64>>>,
    stop: watch::Receiver<bool>,
    /// Subscribers connecting at once (over TLS: as many handshakes as a client pool
    /// would run, so that what is measured is fan-out, not the handshake timeout).
    connecting: Arc<tokio::sync::Semaphore>,
}

/// One subscriber's view of its stream: whole Braid update blocks (headers, blank line,
/// `Content-Length` bytes), each one's stamp recorded.
struct Reader {
    buf: Vec<u8>,
    first: bool,
    local: Histogram<u64>,
    tally: Tally,
}

impl Reader {
    fn new(tally: Tally) -> Reader {
        Reader {
            buf: Vec::new(),
            first: true,
            local: hist(),
            tally,
        }
    }

    /// Takes more of the subscription's body (de-chunked).
    fn feed(&mut self, data: &[u8]) -> anyhow::Result<()> {
        self.buf.extend_from_slice(data);
        loop {
            let skip = self.buf.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
            self.buf.drain(..skip);
            let Some(he) = find(&self.buf, b"\r\n\r\n") else {
                return Ok(());
            };
            let head = std::str::from_utf8(&self.buf[..he])?;
            let len = content_length(head);
            if self.buf.len() < he + 4 + len {
                return Ok(());
            }
            let t = stamp(&self.buf[he + 4..he + 4 + len]);
            self.buf.drain(..he + 4 + len);
            if std::mem::take(&mut self.first) {
                self.tally.ready.fetch_add(1, Ordering::SeqCst);
            }
            if let Some(t) = t {
                self.local.record(now_us().saturating_sub(t).max(1))?;
                self.tally.got.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    async fn finish(self) -> anyhow::Result<()> {
        self.tally.lat.lock().await.add(&self.local)?;
        Ok(())
    }
}

/// Pulls `"t":<digits>` out of an update body.
fn stamp(body: &[u8]) -> Option<u64> {
    let at = find(body, b"\"t\":")? + 4;
    let digits: Vec<u8> = body[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// A subscriber on its own HTTP/1.1 connection.
async fn subscriber(target: Target, path: String, tally: Tally, auth: Auth) -> anyhow::Result<()> {
    let mut stop = tally.stop.clone();
    let connecting = tally.connecting.clone().acquire_owned().await?;
    let mut s = target.connect().await?;
    let mut head =
        format!("GET {path} HTTP/1.1\r\nHost: load\r\nSubscribe: true\r\nAccept: application/json\r\n");
    for (k, v) in auth.headers("GET", &path, b"")? {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await?;
    s.flush().await?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16384];
    // Response head.
    let body_start = loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed before the response head");
        }
        raw.extend_from_slice(&chunk[..n]);
        if let Some(e) = find(&raw, b"\r\n\r\n") {
            if !raw.starts_with(b"HTTP/1.1 209") {
                bail!("not a subscription: {}", String::from_utf8_lossy(&raw[..e]));
            }
            break e + 4;
        }
    };
    drop(connecting);
    raw.drain(..body_start);
    let mut reader = Reader::new(tally);
    loop {
        // De-chunk what we have.
        while let Some(nl) = find(&raw, b"\r\n") {
            let size = usize::from_str_radix(std::str::from_utf8(&raw[..nl])?.trim(), 16)?;
            if raw.len() < nl + 2 + size + 2 {
                break;
            }
            reader.feed(&raw[nl + 2..nl + 2 + size])?;
            raw.drain(..nl + 2 + size + 2);
        }
        let n = tokio::select! {
            r = s.read(&mut chunk) => r?,
            _ = stop.wait_for(|s| *s) => break,
        };
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
    }
    reader.finish().await
}

/// `n` subscribers as streams of one HTTP/2 connection.
async fn h2_subscribers(
    target: Target,
    path: String,
    n: usize,
    tally: Tally,
    auth: Auth,
) -> anyhow::Result<()> {
    let io = target.connect_h2().await?;
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .handshake::<_, bytes::Bytes>(io)
        .await
        .context("HTTP/2 handshake")?;
    let driver = tokio::spawn(conn);
    let scheme = if target.is_tls() { "https" } else { "http" };
    let mut client = client;
    let mut readers = Vec::with_capacity(n);
    let waves = Waves::default();
    for k in 0..n {
        waves.turn(k).await;
        client = client.ready().await?;
        let mut req = http::Request::get(format!("{scheme}://{}{path}", target.addr))
            .header("subscribe", "true")
            .header("accept", "application/json");
        for (k, v) in auth.headers("GET", &path, b"")? {
            req = req.header(k, v);
        }
        let (resp, _) = client.send_request(req.body(())?, true)?;
        let (tally, waves) = (tally.clone(), waves.clone());
        readers.push(tokio::spawn(async move {
            let mut stop = tally.stop.clone();
            let resp = resp.await?;
            if resp.status().as_u16() != 209 {
                bail!("subscription answered {}", resp.status());
            }
            let mut body = resp.into_body();
            let mut reader = Reader::new(tally);
            let mut counted = false;
            loop {
                let d = tokio::select! {
                    d = body.data() => d,
                    _ = stop.wait_for(|s| *s) => break,
                };
                let Some(d) = d else { break };
                let d = d?;
                let _ = body.flow_control().release_capacity(d.len());
                reader.feed(&d)?;
                if !counted && !reader.first {
                    counted = true;
                    waves.arrived();
                }
            }
            reader.finish().await
        }));
    }
    for r in readers {
        r.await??;
    }
    drop(client);
    driver.abort();
    Ok(())
}

/// A subscriber that reads nothing after the head: its socket buffers fill and stay full.
async fn stalled(target: &Target, path: &str) -> anyhow::Result<TcpStream> {
    if target.is_tls() {
        bail!("--stalled subscribers speak plain HTTP/1.1 only");
    }
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_recv_buffer_size(4096)?;
    socket.set_nonblocking(true)?;
    let s = tokio::net::TcpSocket::from_std_stream(socket.into());
    let mut s = s.connect(target.addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: load\r\nSubscribe: true\r\nAccept: application/json\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    Ok(s)
}

pub async fn fanout(a: Args) -> anyhow::Result<serde_json::Value> {
    let target = Target::parse(&a.url)?;
    let wtarget = Target::parse(a.write_url.as_deref().unwrap_or(&a.url))?;
    let path = a.path.as_str();
    let wpath = a.write_path.as_deref().unwrap_or(path);
    let sub_auth = Auth::parse(&a.sub_auth)?;
    let write_auth = Auth::parse(&a.write_auth)?;
    let (subs, updates) = (a.subs, a.updates);
    // The writer's headers for one PUT of `body`.
    let put_headers = |body: &[u8]| -> anyhow::Result<Vec<(String, String)>> {
        let mut h = write_auth.headers("PUT", wpath, body)?;
        h.push(("Content-Type".into(), "application/json".into()));
        Ok(h)
    };
    let start = b"{\"start\":true}";
    let (status, text) = request(&wtarget, "PUT", wpath, &borrowed(&put_headers(start)?), start).await?;
    if status != 200 {
        bail!(
            "the first PUT answered {status}: {}",
            String::from_utf8_lossy(&text)
        );
    }
    let rss0 = server_rss(&target).await?;
    let (stop_tx, stop) = watch::channel(false);
    let tally = Tally {
        ready: Arc::new(AtomicUsize::new(0)),
        got: Arc::new(AtomicU64::new(0)),
        lat: Arc::new(Mutex::new(hist())),
        stop,
        connecting: Arc::new(tokio::sync::Semaphore::new(if target.is_tls() {
            TLS_CONNECTING
        } else {
            tokio::sync::Semaphore::MAX_PERMITS
        })),
    };
    let mut tasks = Vec::new();
    let t_connect = Instant::now();
    if a.h2_streams == 0 {
        for i in 0..subs {
            tasks.push(tokio::spawn(subscriber(
                target.clone(),
                path.to_string(),
                tally.clone(),
                sub_auth.clone(),
            )));
            if i % 500 == 499 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    } else {
        let mut left = subs;
        while left > 0 {
            let n = left.min(a.h2_streams);
            left -= n;
            tasks.push(tokio::spawn(h2_subscribers(
                target.clone(),
                path.to_string(),
                n,
                tally.clone(),
                sub_auth.clone(),
            )));
        }
    }
    let mut stalled_conns = Vec::new();
    for _ in 0..a.stalled {
        stalled_conns.push(stalled(&target, path).await?);
    }
    while tally.ready.load(Ordering::SeqCst) < subs {
        if let Some(i) = tasks.iter().position(|t| t.is_finished()) {
            let why = match tasks.swap_remove(i).await {
                Ok(Ok(())) => "ended".to_string(),
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) => e.to_string(),
            };
            bail!(
                "a subscriber failed after {} were ready: {why}",
                tally.ready.load(Ordering::SeqCst)
            );
        }
        if t_connect.elapsed() > Duration::from_secs(120) {
            bail!(
                "only {} of {subs} subscribers got their first update",
                tally.ready.load(Ordering::SeqCst)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_s = t_connect.elapsed().as_secs_f64();
    if a.prefill_kib > 0 {
        let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(a.prefill_kib * 1024));
        let (status, _) = request(
            &wtarget,
            "PUT",
            wpath,
            &borrowed(&put_headers(big.as_bytes())?),
            big.as_bytes(),
        )
        .await?;
        if status != 200 {
            bail!("prefill PUT answered {status}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss1 = server_rss(&target).await?;
    // The writer: one keep-alive connection, timestamped JSON.
    let mut w = wtarget.connect().await?;
    let mut wc = Conn::default();
    let mut acks = hist();
    let t0 = Instant::now();
    for i in 0..updates {
        let body = format!("{{\"t\":{},\"i\":{i}}}", now_us());
        let sent = Instant::now();
        let h = put_headers(body.as_bytes())?;
        wc.send(&mut w, "PUT", wpath, &borrowed(&h), body.as_bytes())
            .await?;
        let (status, text) = wc.recv(&mut w).await?;
        if status != 200 {
            bail!("PUT answered {status}: {}", String::from_utf8_lossy(&text));
        }
        acks.record(sent.elapsed().as_micros().max(1) as u64)?;
        tokio::time::sleep(Duration::from_millis(a.interval_ms)).await;
    }
    let write_s = t0.elapsed().as_secs_f64();
    let want = (subs * updates) as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while tally.got.load(Ordering::Relaxed) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss2 = server_rss(&target).await?;
    stop_tx.send_replace(true);
    for t in tasks {
        let _ = t.await;
    }
    drop(stalled_conns);
    let got = tally.got.load(Ordering::Relaxed);
    let lat = tally.lat.lock().await;
    let transport = match (target.is_tls(), a.h2_streams) {
        (false, 0) => "http/1.1".to_string(),
        (true, 0) => "tls+http/1.1".to_string(),
        (false, n) => format!("h2c, {n} streams per connection"),
        (true, n) => format!("tls+h2, {n} streams per connection"),
    };
    Ok(serde_json::json!({
        "workload": "fanout",
        "transport": transport,
        "sub_auth": sub_auth.name(),
        "write_auth": write_auth.name(),
        "subscribers": subs,
        "stalled": a.stalled,
        "updates": updates,
        "interval_ms": a.interval_ms,
        "delivered": got,
        "expected": want,
        "connect_secs": connect_s,
        "deliveries_per_sec": got as f64 / write_s,
        "delivery_latency": summary(&lat),
        "put_ack_latency": summary(&acks),
        "server_rss_before": rss0,
        "server_rss_subscribed": rss1,
        "server_rss_end": rss2,
        "server_bytes_per_subscription": (rss1.saturating_sub(rss0)) / (subs + a.stalled).max(1) as u64,
    }))
}
