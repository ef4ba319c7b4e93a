//! `plait-load restore …`: the pieces of `tests/load/run mirror-restore`, a device restoring
//! an owner's namespace from a mirror (`plait device join`), judged against the link.
//!
//! * `fill` — the owner's namespace: N resources under `/bench/restore/`, a realistic mix
//!   (one in ten a text document, one in ten a JSON document, each 0.5–4 KiB; the rest
//!   bytes values, incompressible, log-uniform 1–46 KiB: about 100 MB for 10,000), PUT by
//!   the owner over C keep-alive connections. Every value is a function of its index, so
//!   `verify` needs nothing but the index.
//! * `verify` — GETs every resource from the device (`/~<owner>/bench/restore/…`) and
//!   compares it with what `fill` wrote: resources and bytes restored, mismatches.
//! * `floor` — the link's floor: the mirror's stored bytes for the namespace (checkpoint,
//!   descriptors, ciphertexts, read from its embedded store as the mirror reads them to
//!   answer) sent over one loopback TCP connection to a reader that counts them: the time
//!   to move the same ciphertext over the same link with nothing else done. With
//!   `--store FILE` the reader also keeps what it receives durably, as any restore must:
//!   each segment a row of a fresh SQLite file with the embedded store's settings (WAL,
//!   `synchronous=FULL`), one commit per segment, written by a thread beside the reader;
//!   the time ends with the last commit. That is the link plus the disk's cost of the same
//!   bytes in as many commits as the chain has segments. With `--listen ADDR --sender-netns
//!   NS` the sender is a process of its own in network namespace NS (`restore send`, run
//!   by `ip netns exec`), so the bytes cross the same shaped link the mirror's do.
//! * `send` — the floor's sender alone: reads the store and writes the stream to `--to`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use crate::net::{Conn, addr_of};
use crate::{Auth, borrowed};

#[derive(Subcommand)]
pub enum Cmd {
    /// Writes the owner's namespace (see the module doc).
    Fill(Fill),
    /// Reads every resource back from the device and compares.
    Verify(Verify),
    /// Moves the mirror's stored bytes for a namespace over loopback TCP (the floor).
    Floor(Floor),
    /// The floor's sender alone (run by `floor --sender-netns`).
    Send(SendArgs),
}

#[derive(Args)]
pub struct Fill {
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 10_000)]
    resources: usize,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// `token:TOKEN` (the owner's) or `sign:KEY.pem`.
    #[arg(long, default_value = "none")]
    auth: String,
}

#[derive(Args)]
pub struct Verify {
    /// The device's server.
    #[arg(long)]
    url: String,
    /// The owner's identity (the device serves `/~<owner>/…`).
    #[arg(long)]
    owner: String,
    #[arg(long, default_value_t = 10_000)]
    resources: usize,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    #[arg(long, default_value = "none")]
    auth: String,
}

#[derive(Args)]
pub struct Floor {
    /// The mirror's embedded store (`plait.db` in its data dir).
    #[arg(long)]
    db: PathBuf,
    /// The owner's identity, whose stored segments are sent.
    #[arg(long)]
    namespace: String,
    /// Also keep what is received durably in this (new) SQLite file, one commit per
    /// segment.
    #[arg(long)]
    store: Option<PathBuf>,
    /// Where the receiver listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Run the sender as a process in this network namespace (`ip netns exec`).
    #[arg(long)]
    sender_netns: Option<String>,
}

#[derive(Args)]
pub struct SendArgs {
    /// The mirror's embedded store (`plait.db` in its data dir).
    #[arg(long)]
    db: PathBuf,
    /// The owner's identity, whose stored segments are sent.
    #[arg(long)]
    namespace: String,
    /// The receiver's address.
    #[arg(long)]
    to: SocketAddr,
}

pub async fn run(cmd: Cmd) -> anyhow::Result<serde_json::Value> {
    match cmd {
        Cmd::Fill(a) => fill(a).await,
        Cmd::Verify(a) => verify(a).await,
        Cmd::Floor(a) => floor(a).await,
        Cmd::Send(a) => {
            let ns = a
                .namespace
                .parse()
                .map_err(|e| anyhow::anyhow!("--namespace: {e}"))?;
            let db = a.db.clone();
            let (bytes, segments) = tokio::task::spawn_blocking(move || send_stored(&db, ns, a.to)).await??;
            Ok(serde_json::json!({"workload": "restore-send", "bytes": bytes, "segments": segments}))
        }
    }
}

/// splitmix64: a value's bytes from its index, reproducibly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const WORDS: [&str; 16] = [
    "plait", "braid", "mirror", "device", "sealed", "segment", "owner", "restore", "note", "garden", "river",
    "window", "morning", "letter", "market", "harbour",
];

/// Resource `i`: its path, media type and body.
fn resource(i: usize) -> (String, &'static str, Vec<u8>) {
    let mut r = Rng(i as u64 ^ 0x5EED_0000);
    match i % 10 {
        0 => {
            let target = 512 + (r.unit() * 3584.0) as usize;
            let mut s = String::with_capacity(target + 16);
            while s.len() < target {
                s.push_str(WORDS[(r.next() % 16) as usize]);
                s.push(if r.next().is_multiple_of(12) { '\n' } else { ' ' });
            }
            (format!("/bench/restore/notes/{i}"), "text/plain", s.into_bytes())
        }
        1 => {
            let target = 512 + (r.unit() * 3584.0) as usize;
            let mut items = Vec::new();
            let mut len = 0;
            while len < target {
                let title: Vec<&str> = (0..4).map(|_| WORDS[(r.next() % 16) as usize]).collect();
                let item = serde_json::json!({
                    "id": r.next() % 1_000_000,
                    "title": title.join(" "),
                    "done": r.next().is_multiple_of(2),
                    "score": (r.next() % 10_000) as f64 / 100.0,
                });
                len += item.to_string().len() + 1;
                items.push(item);
            }
            let doc = serde_json::json!({"owner": "bench", "index": i, "items": items});
            (
                format!("/bench/restore/docs/{i}"),
                "application/json",
                doc.to_string().into_bytes(),
            )
        }
        _ => {
            // Log-uniform between 1 KiB and 46 KiB: mean about 12 KB.
            let (lo, hi) = (1024f64, 46.0 * 1024.0);
            let len = (lo * (hi / lo).powf(r.unit())) as usize;
            let mut b = Vec::with_capacity(len + 8);
            while b.len() < len {
                b.extend_from_slice(&r.next().to_le_bytes());
            }
            b.truncate(len);
            (
                format!("/bench/restore/blobs/{i}.bin"),
                "application/octet-stream",
                b,
            )
        }
    }
}

/// Runs `job(i)` for every `i < n` on `concurrency` keep-alive connections to `addr`.
async fn each<F, Fut>(addr: SocketAddr, n: usize, concurrency: usize, job: F) -> anyhow::Result<()>
where
    F: Fn(usize, TcpStream, Conn) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<(TcpStream, Conn)>> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let job = Arc::new(job);
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (next, job) = (next.clone(), job.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            let mut c = Conn::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    return Ok::<(), anyhow::Error>(());
                }
                (s, c) = job(i, s, c).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn fill(a: Fill) -> anyhow::Result<serde_json::Value> {
    let addr = addr_of(&a.url)?;
    let auth = Auth::parse(&a.auth)?;
    let bytes = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let counted = bytes.clone();
    each(addr, a.resources, a.concurrency, move |i, mut s, mut c| {
        let (auth, bytes) = (auth.clone(), counted.clone());
        async move {
            let (path, ty, body) = resource(i);
            let mut headers = auth.headers("PUT", &path, &body)?;
            headers.push(("Content-Type".into(), ty.into()));
            c.send(&mut s, "PUT", &path, &borrowed(&headers), &body).await?;
            let (status, answer) = c.recv(&mut s).await?;
            if status != 200 {
                bail!(
                    "PUT {path} answered {status}: {}",
                    String::from_utf8_lossy(&answer)
                );
            }
            bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
            Ok((s, c))
        }
    })
    .await?;
    let secs = t0.elapsed().as_secs_f64();
    let (mut text, mut json, mut blobs) = (0u64, 0u64, 0u64);
    for i in 0..a.resources {
        let n = resource(i).2.len() as u64;
        match i % 10 {
            0 => text += n,
            1 => json += n,
            _ => blobs += n,
        }
    }
    Ok(serde_json::json!({
        "workload": "restore-fill",
        "resources": a.resources,
        "bytes": bytes.load(Ordering::Relaxed),
        "bytes_by_kind": {"text": text, "json": json, "bytes": blobs},
        "seconds": secs,
        "puts_per_sec": a.resources as f64 / secs,
    }))
}

async fn verify(a: Verify) -> anyhow::Result<serde_json::Value> {
    let addr = addr_of(&a.url)?;
    let auth = Auth::parse(&a.auth)?;
    let owner = Arc::new(a.owner.clone());
    let restored = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let missing = Arc::new(AtomicU64::new(0));
    let wrong = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (r2, b2, m2, w2) = (restored.clone(), bytes.clone(), missing.clone(), wrong.clone());
    let t0 = Instant::now();
    each(addr, a.resources, a.concurrency, move |i, mut s, mut c| {
        let (auth, owner) = (auth.clone(), owner.clone());
        let (restored, bytes, missing, wrong) = (r2.clone(), b2.clone(), m2.clone(), w2.clone());
        async move {
            let (path, ty, want) = resource(i);
            let path = format!("/~{owner}{path}");
            let headers = auth.headers("GET", &path, b"")?;
            c.send(&mut s, "GET", &path, &borrowed(&headers), b"").await?;
            let (status, got) = c.recv(&mut s).await?;
            if status == 404 {
                missing.fetch_add(1, Ordering::Relaxed);
                return Ok((s, c));
            }
            if status != 200 {
                bail!("GET {path} answered {status}");
            }
            let same = if ty == "application/json" {
                serde_json::from_slice::<serde_json::Value>(&got).ok()
                    == serde_json::from_slice::<serde_json::Value>(&want).ok()
            } else {
                got == want
            };
            if same {
                restored.fetch_add(1, Ordering::Relaxed);
                bytes.fetch_add(got.len() as u64, Ordering::Relaxed);
            } else {
                wrong.lock().expect("lock").push(path);
            }
            Ok((s, c))
        }
    })
    .await?;
    let wrong = wrong.lock().expect("lock").clone();
    Ok(serde_json::json!({
        "workload": "restore-verify",
        "expected": a.resources,
        // Each resource's first read since the device started: its document is loaded then.
        "seconds": t0.elapsed().as_secs_f64(),
        "restored_equal": restored.load(Ordering::Relaxed),
        "restored_bytes": bytes.load(Ordering::Relaxed),
        "missing": missing.load(Ordering::Relaxed),
        "different": wrong.len(),
        "different_first": wrong.iter().take(5).collect::<Vec<_>>(),
    }))
}

async fn floor(a: Floor) -> anyhow::Result<serde_json::Value> {
    let ns: plait_bridge::Identity = a
        .namespace
        .parse()
        .map_err(|e| anyhow::anyhow!("--namespace: {e}"))?;
    let listener = TcpListener::bind(a.listen).await?;
    let addr = listener.local_addr()?;
    let t0 = Instant::now();
    let sender = match &a.sender_netns {
        None => {
            let db = a.db.clone();
            Sender::Task(tokio::task::spawn_blocking(move || send_stored(&db, ns, addr)))
        }
        Some(netns) => Sender::Process(
            tokio::process::Command::new("ip")
                .args(["netns", "exec", netns])
                .arg(std::env::current_exe()?)
                .args([
                    "restore",
                    "send",
                    "--namespace",
                    &a.namespace,
                    "--to",
                    &addr.to_string(),
                    "--db",
                ])
                .arg(&a.db)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .context("running the sender with ip netns exec")?,
        ),
    };
    // The keeper: one commit per pair received.
    let (keep, kept) = match &a.store {
        Some(path) => {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Vec<u8>, Vec<u8>)>();
            let conn = crate::sqlite_floor::open_durable(
                path,
                "CREATE TABLE segments (seq INTEGER PRIMARY KEY, descriptor BLOB NOT NULL,
                     ciphertext BLOB NOT NULL);",
            )?;
            let keeper = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
                let mut n = 0u64;
                while let Some((descriptor, ciphertext)) = rx.blocking_recv() {
                    conn.execute(
                        "INSERT INTO segments (seq, descriptor, ciphertext) VALUES (?1, ?2, ?3)",
                        rusqlite::params![n as i64, descriptor, ciphertext],
                    )?;
                    n += 1;
                }
                Ok(n)
            });
            (Some(tx), Some(keeper))
        }
        None => (None, None),
    };
    let (s, _) = listener.accept().await?;
    let mut s = tokio::io::BufReader::with_capacity(1 << 16, s);
    let mut received = 0u64;
    while let Some(first) = frame(&mut s).await? {
        let second = frame(&mut s).await?.context("a pair cut in half")?;
        received += (first.len() + second.len()) as u64;
        if let Some(k) = &keep {
            k.send((first, second)).context("the keeper stopped")?;
        }
    }
    drop(keep);
    let commits = match kept {
        Some(k) => Some(k.await??),
        None => None,
    };
    let secs = t0.elapsed().as_secs_f64();
    let (sent, segments) = match sender {
        Sender::Task(t) => t.await??,
        Sender::Process(p) => {
            let out = p.wait_with_output().await?;
            if !out.status.success() {
                bail!("the sender failed: {}", out.status);
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("the sender's report")?;
            (
                v["bytes"].as_u64().unwrap_or(0),
                v["segments"].as_u64().unwrap_or(0),
            )
        }
    };
    if sent != received || sent == 0 {
        bail!("the floor sent {sent} bytes and received {received}");
    }
    Ok(serde_json::json!({
        "workload": if commits.is_some() { "restore-floor-link-and-disk" } else { "restore-floor-link" },
        "segments": segments,
        "bytes": received,
        "commits": commits,
        "seconds": secs,
        "mb_per_sec": received as f64 / 1e6 / secs,
    }))
}

/// The floor's sender: a task of the floor's own process, or a process in another network
/// namespace.
enum Sender {
    Task(tokio::task::JoinHandle<anyhow::Result<(u64, u64)>>),
    Process(tokio::process::Child),
}

/// Reads the store as the mirror answers a range: the checkpoint, then each segment's
/// descriptor and ciphertext in seq order, written to `to` as they are read, each behind
/// its length (4 bytes, big-endian), a pair at a time. Answers bytes and segments sent.
fn send_stored(
    db: &std::path::Path,
    ns: plait_bridge::Identity,
    to: SocketAddr,
) -> anyhow::Result<(u64, u64)> {
    use std::io::Write;
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("opening {}", db.display()))?;
    let mut s = std::io::BufWriter::with_capacity(1 << 16, std::net::TcpStream::connect(to)?);
    let (mut bytes, mut segments) = (0u64, 0u64);
    let mut send = |a: &[u8], b: &[u8]| -> anyhow::Result<()> {
        for part in [a, b] {
            s.write_all(&(part.len() as u32).to_be_bytes())?;
            s.write_all(part)?;
            bytes += part.len() as u64;
        }
        Ok(())
    };
    let mut q = conn.prepare("SELECT checkpoint, snapshot FROM mirror_checkpoints WHERE namespace = ?1")?;
    let mut rows = q.query([ns.as_bytes().as_slice()])?;
    while let Some(r) = rows.next()? {
        send(r.get_ref(0)?.as_blob()?, r.get_ref(1)?.as_blob()?)?;
    }
    let mut q =
        conn.prepare("SELECT descriptor, ciphertext FROM mirror_segments WHERE namespace = ?1 ORDER BY seq")?;
    let mut rows = q.query([ns.as_bytes().as_slice()])?;
    while let Some(r) = rows.next()? {
        send(r.get_ref(0)?.as_blob()?, r.get_ref(1)?.as_blob()?)?;
        segments += 1;
    }
    s.into_inner()
        .map_err(|e| e.into_error())?
        .shutdown(std::net::Shutdown::Write)?;
    Ok((bytes, segments))
}

/// One frame of the floor's stream (its length, then its bytes); `None` at the end.
async fn frame(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await?;
    Ok(Some(buf))
}
