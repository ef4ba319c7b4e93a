//! `sqlite-floor`: the floor `puts-embedded` is judged against — raw SQLite inserts with
//! the durability settings of Plait's embedded store (WAL, `synchronous=FULL`) and its
//! concurrency model: C client tasks hand rows to the one writer thread that owns the only
//! writing connection, and each waits for the commit that made its row durable.
//!
//! Two modes, each a separate run on a fresh file:
//! * `single` — one `BEGIN IMMEDIATE … COMMIT` (one fsync) per insert;
//! * `batched` — the writer takes everything queued and commits it in one transaction, as
//!   Plait's writer does (group commit). This is the floor for Plait's design.
//!
//! A row is one row of a table shaped like Plait's `changes` table (same columns, same
//! primary key, `WITHOUT ROWID`), with payloads of the sizes a PUT stored (`--sizes-from`
//! reads them from a Plait store after its run). Nothing else: no resource row, no
//! savepoint, no HTTP — what is between this and Plait is Plait.
//!
//! This module knows nothing about Plait's server; it only reads a store's `changes` table.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rusqlite::{Connection, params};
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::{hist, summary};

/// The byte sizes of one stored change's columns.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    data: usize,
    version: usize,
    parents: usize,
    author: usize,
}

impl Sizes {
    /// The average sizes of the changes in a Plait embedded store (read-only).
    pub fn from_store(path: &Path) -> anyhow::Result<Sizes> {
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening {}", path.display()))?;
        let (data, version, parents, author): (f64, f64, f64, f64) = conn.query_row(
            "SELECT avg(length(data)), avg(length(version)), avg(length(parents)),
                    coalesce(avg(length(author)), 0) FROM changes",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
        Ok(Sizes {
            data: data.round() as usize,
            version: version.round() as usize,
            parents: parents.round() as usize,
            author: author.round() as usize,
        })
    }

    /// Sizes given on the command line.
    pub fn fixed(data: usize) -> Sizes {
        Sizes {
            data,
            version: 20,
            parents: 20,
            author: 0,
        }
    }
}

/// One row handed to the writer, and where to say it is durable.
struct Job {
    resource: i64,
    reply: oneshot::Sender<anyhow::Result<()>>,
}

fn open(path: &Path) -> anyhow::Result<Connection> {
    open_durable(
        path,
        "CREATE TABLE changes (
             resource_id INTEGER NOT NULL, seq INTEGER NOT NULL, version TEXT NOT NULL,
             parents TEXT NOT NULL, author BLOB, at_ms INTEGER NOT NULL, data BLOB NOT NULL,
             meta TEXT, PRIMARY KEY (resource_id, seq)) WITHOUT ROWID;",
    )
}

/// A new SQLite file at `path` (an old one is removed) with the durability of Plait's
/// embedded store (server/src/storage/sqlite): WAL, `synchronous=FULL`; `schema` is run
/// in it. Each statement outside a transaction is one commit (one fsync).
pub fn open_durable(path: &Path, schema: &str) -> anyhow::Result<Connection> {
    let _ = std::fs::remove_file(path);
    let conn = Connection::open(path).with_context(|| format!("creating {}", path.display()))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    anyhow::ensure!(mode.eq_ignore_ascii_case("wal"), "no WAL mode ({mode})");
    conn.execute_batch("PRAGMA synchronous = FULL;")?;
    conn.execute_batch(schema)?;
    Ok(conn)
}

/// The writer thread: in `batched` mode everything queued goes into one transaction.
fn writer(mut conn: Connection, mut rx: mpsc::UnboundedReceiver<Job>, batched: bool, sizes: Sizes) {
    let data = vec![7u8; sizes.data];
    let version = "v".repeat(sizes.version);
    let parents = "p".repeat(sizes.parents);
    let author = (sizes.author > 0).then(|| vec![1u8; sizes.author]);
    let mut seq: i64 = 0;
    let at_ms = 1_700_000_000_000i64;
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        if batched {
            while let Ok(j) = rx.try_recv() {
                batch.push(j);
            }
        }
        let r = (|| -> rusqlite::Result<()> {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO changes (resource_id, seq, version, parents, author, at_ms, data, meta)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL)",
                )?;
                for j in &batch {
                    seq += 1;
                    insert.execute(params![j.resource, seq, version, parents, author, at_ms, data])?;
                }
            }
            tx.commit()
        })();
        for j in batch {
            let _ = j
                .reply
                .send(r.as_ref().map(|_| ()).map_err(|e| anyhow::anyhow!("{e}")));
        }
    }
}

/// One run of `seconds` with `concurrency` clients in one mode.
async fn run(
    path: &Path,
    mode: &str,
    concurrency: usize,
    seconds: u64,
    sizes: Sizes,
) -> anyhow::Result<serde_json::Value> {
    let batched = match mode {
        "single" => false,
        "batched" => true,
        other => anyhow::bail!("--modes are single and batched, not {other}"),
    };
    let conn = open(path)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let thread = std::thread::spawn(move || writer(conn, rx, batched, sizes));
    let lat = Arc::new(Mutex::new(hist()));
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(seconds);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (tx, lat, done) = (tx.clone(), lat.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = hist();
            let mut i = 0i64;
            while Instant::now() < end {
                let sent = Instant::now();
                let (reply, wait) = oneshot::channel();
                let resource = (w as i64 * 7919 + i * 104_729) % 1000;
                tx.send(Job { resource, reply })
                    .map_err(|_| anyhow::anyhow!("writer gone"))?;
                wait.await??;
                local.record(sent.elapsed().as_micros().max(1) as u64)?;
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            lat.lock().await.add(&local)?;
            Ok::<(), anyhow::Error>(())
        }));
    }
    drop(tx);
    for t in tasks {
        t.await??;
    }
    let secs = t0.elapsed().as_secs_f64();
    thread.join().map_err(|_| anyhow::anyhow!("writer panicked"))?;
    let lat = lat.lock().await;
    let n = done.load(Ordering::Relaxed);
    Ok(serde_json::json!({
        "mode": mode,
        "inserts": n,
        "seconds": secs,
        "inserts_per_sec": n as f64 / secs,
        "ack_latency": summary(&lat),
    }))
}

/// Runs each mode in turn on a fresh file at `path`.
pub async fn floor(
    path: PathBuf,
    modes: &[String],
    concurrency: usize,
    seconds: u64,
    sizes: Sizes,
) -> anyhow::Result<serde_json::Value> {
    let mut runs = Vec::new();
    for mode in modes {
        runs.push(run(&path, mode, concurrency, seconds, sizes).await?);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
    Ok(serde_json::json!({
        "workload": "sqlite-floor",
        "concurrency": concurrency,
        "row_bytes": {"data": sizes.data, "version": sizes.version, "parents": sizes.parents, "author": sizes.author},
        "runs": runs,
    }))
}
