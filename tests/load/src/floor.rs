//! `fanout-floor`: what fan-out and idle subscriptions cost without Plait — the kernel's
//! and tokio's share, measured by the same client in the same run. A minimal tokio server
//! that speaks just enough of Plait's wire for `plait-load fanout` and `plait-load idle`:
//!
//! * `GET` with `Subscribe` (HTTP/1.1): the response head Plait sends for a JSON
//!   subscription (`209 Multiresponse`, chunked) and the current value as one update block;
//!   the socket then has its own writer task, as each of Plait's subscriptions has.
//! * `PUT`: `200`, and the body as an update block, encoded once (one shared `Bytes`: chunk
//!   size, block, CRLF, as hyper writes it) and written by every socket's task to its socket.
//! * HTTP/2 (prior knowledge, as `idle` connects): each subscription stream answered with
//!   the same head and first block, then held open; nothing else.
//! * `GET /.well-known/plait`: `{"rss_bytes", "subscriptions"}`, as Plait's status answers.
//!
//! No storage, no versions kept, no access checks, no per-subscriber state but the socket:
//! a floor, not a server. Knows nothing of the workloads that measure it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use anyhow::Context;
use bytes::{BufMut, Bytes, BytesMut};
use plait_server::braid::frame::encode_update;
use plait_server::model::{Version, VersionId};
use plait_server::update::{Update, UpdateBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

use crate::net::{content_length, find};

/// Updates a socket's writer may fall behind by.
const UPDATES_QUEUE: usize = 1024;

/// What every connection shares.
struct Floor {
    /// The latest value's update block, as a chunk (what a new subscriber gets first).
    current: std::sync::Mutex<Bytes>,
    /// Each write's chunk, seen by every socket's writer (none skipped: a writer behind
    /// by more than `UPDATES_QUEUE` reports it).
    updates: broadcast::Sender<Bytes>,
    /// Version numbers of the writes (the block names one, as Plait's do).
    seq: AtomicU64,
    subscriptions: AtomicUsize,
}

/// The same response head Plait's subscription answers carry (the version is the floor's).
fn subscription_head(version: &str) -> String {
    format!(
        "HTTP/1.1 209 Multiresponse\r\nsubscribe: true\r\ncache-control: no-cache, no-transform, no-store\r\n\
         x-accel-buffering: no\r\ncontent-type: application/json\r\ncurrent-version: {version}\r\n\
         editable: true\r\naccept-subscribe: true\r\ntransfer-encoding: chunked\r\n\
         date: Thu, 01 Jan 2026 00:00:00 GMT\r\n\r\n"
    )
}

/// A version id as long as Plait's (a 10-character agent and a sequence number).
fn version_id(seq: u64) -> VersionId {
    VersionId::new("floorfloor", seq).expect("a valid agent")
}

/// An update block for `body` at `seq`, as Plait encodes a JSON write.
fn block(body: Bytes, seq: u64) -> Bytes {
    encode_update(&Update {
        version: Version::one(version_id(seq)),
        parents: Version::one(version_id(seq.saturating_sub(1))),
        digest: Some(plait_server::engine::digest(&body)),
        body: UpdateBody::Snapshot(body),
        media_type: "application/json".into(),
    })
}

/// `block` as one HTTP/1.1 chunk.
fn chunk(block: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(block.len() + 12);
    out.put_slice(format!("{:X}\r\n", block.len()).as_bytes());
    out.put_slice(block);
    out.put_slice(b"\r\n");
    out.freeze()
}

/// Serves until killed.
pub async fn fanout_floor(listen: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let listener = TcpListener::bind(listen).await?;
    let first = chunk(&block(Bytes::from_static(b"{\"start\":true}"), 0));
    let (updates, _) = broadcast::channel(UPDATES_QUEUE);
    let floor = Arc::new(Floor {
        current: std::sync::Mutex::new(first),
        updates,
        seq: AtomicU64::new(0),
        subscriptions: AtomicUsize::new(0),
    });
    eprintln!("fanout-floor listening on {listen}, one writer task per subscriber");
    loop {
        let (s, _) = listener.accept().await?;
        let _ = s.set_nodelay(true);
        let floor = floor.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(s, floor).await {
                eprintln!("fanout-floor: a connection failed: {e:#}");
            }
        });
    }
}

/// One subscriber's writer: each update written to its socket, until the socket fails.
async fn writer(mut s: TcpStream, mut updates: broadcast::Receiver<Bytes>) {
    loop {
        let bytes = match updates.recv().await {
            Ok(bytes) => bytes,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                eprintln!("fanout-floor: a subscriber's writer fell {n} updates behind");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if s.write_all(&bytes).await.is_err() {
            return;
        }
    }
}

async fn connection(mut s: TcpStream, floor: Arc<Floor>) -> anyhow::Result<()> {
    let mut preface = [0u8; 3];
    if s.peek(&mut preface).await? == 3 && &preface == b"PRI" {
        return h2_connection(s, floor).await;
    }
    let mut buf = Vec::new();
    let mut chunk_in = [0u8; 16384];
    loop {
        let he = loop {
            if let Some(he) = find(&buf, b"\r\n\r\n") {
                break he;
            }
            let n = s.read(&mut chunk_in).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk_in[..n]);
        };
        let head = std::str::from_utf8(&buf[..he])?.to_string();
        let len = content_length(&head);
        while buf.len() < he + 4 + len {
            let n = s.read(&mut chunk_in).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk_in[..n]);
        }
        let body = Bytes::copy_from_slice(&buf[he + 4..he + 4 + len]);
        buf.drain(..he + 4 + len);
        let line = head.lines().next().unwrap_or("");
        let subscribe = head
            .lines()
            .any(|l| l.to_ascii_lowercase().starts_with("subscribe:"));
        if line.starts_with("GET /.well-known/plait ") {
            let status = serde_json::json!({
                "rss_bytes": rss_bytes(),
                "subscriptions": floor.subscriptions.load(Ordering::Relaxed),
            })
            .to_string();
            let res = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{status}",
                status.len()
            );
            s.write_all(res.as_bytes()).await?;
        } else if line.starts_with("GET ") && subscribe {
            // Subscribed before the current value is read: no update falls between.
            let updates = floor.updates.subscribe();
            let first = floor.current.lock().expect("not poisoned").clone();
            let seq = floor.seq.load(Ordering::Relaxed);
            let mut out = subscription_head(&format!("\"{}\"", version_id(seq))).into_bytes();
            out.extend_from_slice(&first);
            s.write_all(&out).await?;
            floor.subscriptions.fetch_add(1, Ordering::Relaxed);
            writer(s, updates).await;
            return Ok(());
        } else if line.starts_with("PUT ") {
            let seq = floor.seq.fetch_add(1, Ordering::Relaxed) + 1;
            let c = chunk(&block(body, seq));
            *floor.current.lock().expect("not poisoned") = c.clone();
            let _ = floor.updates.send(c);
            let res = format!(
                "HTTP/1.1 200 OK\r\nversion: \"{}\"\r\ncontent-length: 0\r\ndate: Thu, 01 Jan 2026 00:00:00 GMT\r\n\r\n",
                version_id(seq)
            );
            s.write_all(res.as_bytes()).await?;
        } else {
            s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                .await?;
        }
    }
}

/// HTTP/2: every request a subscription, answered with the head and the current value,
/// its stream then held open (what an idle subscription costs the kernel, tokio and h2).
async fn h2_connection(s: TcpStream, floor: Arc<Floor>) -> anyhow::Result<()> {
    let mut conn = h2::server::Builder::new()
        .max_concurrent_streams(2000)
        .handshake::<_, Bytes>(s)
        .await
        .context("HTTP/2 handshake")?;
    let mut held = Vec::new();
    while let Some(req) = conn.accept().await {
        let (_req, mut respond) = req?;
        let seq = floor.seq.load(Ordering::Relaxed);
        let res = http::Response::builder()
            .status(209)
            .header("subscribe", "true")
            .header("cache-control", "no-cache, no-transform, no-store")
            .header("x-accel-buffering", "no")
            .header("content-type", "application/json")
            .header("current-version", format!("\"{}\"", version_id(seq)))
            .header("editable", "true")
            .header("accept-subscribe", "true")
            .body(())?;
        let mut send = respond.send_response(res, false)?;
        send.send_data(block(Bytes::from_static(b"{\"idle\":true}"), seq), false)?;
        floor.subscriptions.fetch_add(1, Ordering::Relaxed);
        held.push(send);
    }
    floor.subscriptions.fetch_sub(held.len(), Ordering::Relaxed);
    Ok(())
}

/// This process's resident memory.
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
