//! `plait-load`: drives a running Plait server with real Braid subscriptions and writes, and
//! reports latency percentiles, throughput, server memory and bytes per subscription.
//!
//! Workloads (see BENCHMARKS.md for the recorded runs and `tests/load/run` for set-ups):
//! * `fanout` — N subscribers to one resource (HTTP/1.1, or HTTP/2 streams; plain or TLS); a
//!   writer PUTs timestamped JSON; delivery latency per subscriber and update (`fanout`).
//! * `idle` — N subscriptions held open over HTTP/2 streams (many per connection); reports
//!   the server's resident memory per subscription and the machine's memory (`idle`).
//! * `puts` — durable PUTs from C concurrent keep-alive connections to R resources;
//!   acknowledgement latency and throughput.
//! * `mux` — one browser-like client with N subscriptions through one Braid multiplexer, or
//!   one HTTP/1.1 connection each; delivery latency and server memory per subscription.
//! * `gets` — GETs of one path from C concurrent keep-alive connections; with `--proxy-url`
//!   the same load runs against the server direct and then through a proxy, in one run,
//!   and the report gives the proxy's added latency.
//!
//! * `text-floor` — the floor of `puts --kind text` on one document: the same edits to one
//!   automerge text document in a loop, in process (`text_floor`).
//! * `sqlite-floor` — the floor of `puts` on the embedded store: raw SQLite inserts with
//!   the store's durability settings and writer model (`sqlite_floor`).
//! * `fanout-floor` — the floor `fanout` and `idle` are judged against: a minimal tokio
//!   server writing the same bytes to the same sockets (`floor`).
//! * `restore fill|verify|floor` — a device restoring a namespace from a mirror: the
//!   owner's resources, checking what the device restored, and the link's floor (`restore`).
//! * `handshakes`, `tls-floor`, `tls-cert` — TLS handshakes per second against Plait and
//!   against the floor, a bare acceptor with the same certificate and crypto (`tls`).
//!
//! `https://` URLs (with `--ca`) work for `fanout` and `handshakes` (`net`).
//!
//! Everything is measured on the wire: the tool speaks raw HTTP/1.1 (and h2 for `idle`) so
//! its own overhead stays small next to the server's.

mod abuse;
mod fanout;
mod floor;
mod idle;
mod mux;
mod net;
mod restore;
mod sqlite_floor;
mod text_floor;
mod tls;

use net::{Conn, Target, addr_of, find, request, server_rss};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

#[derive(Parser)]
#[command(name = "plait-load", about = "Load generator for Plait")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// The CA certificate (PEM) that `https://` servers are verified against.
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// One resource, many subscribers, timestamped writes.
    Fanout(fanout::Args),
    /// The fan-out floor: a minimal tokio server that answers subscriptions as Plait does
    /// and writes each PUT's update block to every subscriber, until killed.
    FanoutFloor {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Full TLS handshakes per second (an https:// URL, with --ca).
    Handshakes {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// The handshake floor: a bare TLS acceptor (Plait's, same certificate), until killed.
    TlsFloor {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Writes a test CA (ca.pem) and a certificate for 127.0.0.1 (cert.pem, key.pem) into DIR.
    TlsCert {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Many idle subscriptions over HTTP/2; server memory per subscription.
    Idle {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 10_000)]
        subs: usize,
        /// HTTP/2 connections to spread them over.
        #[arg(long, default_value_t = 100)]
        conns: usize,
        /// Distinct resources subscribed to (subscription i takes resource i % resources).
        #[arg(long, default_value_t = 1)]
        resources: usize,
        /// Connections being set up at once (each until its streams had their first update).
        #[arg(long, default_value_t = 200)]
        opening: usize,
        /// Longest time setting the subscriptions up may take.
        #[arg(long, default_value_t = 600)]
        open_timeout_secs: u64,
        /// The server's process id (on this machine): its /proc/PID/status before and after.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// Normal Braid and Statebus clients alone, then beside abusers (slow sockets, a login
    /// flood, a subscription flood, big PUTs, deep JSON): their latency in both, the
    /// server's peak memory, whether it stayed up.
    Abuse {
        #[arg(long)]
        url: String,
        /// Length of each of the two runs.
        #[arg(long, default_value_t = 15)]
        seconds: u64,
        /// The server's process id, for its peak memory (`VmHWM`).
        #[arg(long)]
        server_pid: Option<u32>,
        /// Which abusers run (comma-separated): slow, login, subscriptions, big, deep, history.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "slow,login,subscriptions,big,deep,history"
        )]
        abusers: Vec<String>,
    },
    /// Durable PUT throughput and acknowledgement latency.
    Puts {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1000)]
        resources: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// `json` (a small object per PUT) or `text` (a small insertion per PUT).
        #[arg(long, default_value = "json")]
        kind: String,
        /// How each PUT proves who sends it: `none` (anonymous), `token:TOKEN` (a bearer
        /// token), or `sign:KEY.pem` (an RFC 9421 signature by that ed25519 key, made
        /// afresh for every request, as a client would).
        #[arg(long, default_value = "none")]
        auth: String,
    },
    /// The embedded store's floor: raw SQLite inserts (WAL, synchronous=FULL) from C
    /// clients through one writer thread, one commit per insert and group-committed.
    SqliteFloor {
        /// The scratch database file (replaced).
        #[arg(long)]
        path: PathBuf,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// `single` (one transaction per insert), `batched` (group commit), or both.
        #[arg(long, value_delimiter = ',', default_value = "single,batched")]
        modes: Vec<String>,
        /// A Plait embedded store whose changes give the row sizes (else --data-bytes).
        #[arg(long)]
        sizes_from: Option<PathBuf>,
        #[arg(long, default_value_t = 100)]
        data_bytes: usize,
    },
    /// The floor of `hot-text`: the same one-character insertions applied to one
    /// automerge text document in a loop in this process (what the CRDT alone costs).
    TextFloor {
        #[arg(long, default_value_t = 15)]
        seconds: u64,
    },
    /// Federation sync: writes N changes to a text document at its home, then times how
    /// long a replica on another member takes to hold them all.
    Sync {
        /// The home server (where the document is written).
        #[arg(long)]
        home: String,
        /// The replica server (another member of the home's network).
        #[arg(long)]
        replica: String,
        /// The home's identity (the replica reads `/~<id>/<path>`).
        #[arg(long)]
        home_id: String,
        #[arg(long, default_value_t = 100_000)]
        changes: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value = "/bench/sync")]
        path: String,
    },
    /// One browser-like client holding many subscriptions through one Braid multiplexer
    /// (`--mode multiplexed`) or one connection each (`--mode plain`): delivery latency
    /// and server memory per subscription.
    Mux {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1000)]
        subs: usize,
        /// Distinct resources (subscription i follows resource i % resources).
        #[arg(long, default_value_t = 10)]
        resources: usize,
        #[arg(long, default_value_t = 100)]
        updates: usize,
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
        /// `multiplexed` or `plain`.
        #[arg(long, default_value = "multiplexed")]
        mode: String,
    },
    /// A device restoring from a mirror: `fill`, `verify`, `floor` (see `restore`).
    #[command(subcommand)]
    Restore(restore::Cmd),
    /// GET throughput and latency; direct and through a proxy when `--proxy-url` is given.
    Gets {
        /// The server that holds the resource.
        #[arg(long)]
        url: String,
        /// A proxy in front of it: the same path is fetched through it too.
        #[arg(long)]
        proxy_url: Option<String>,
        #[arg(long, default_value = "/app/doc")]
        path: String,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_micros() as u64
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn summary(h: &Histogram<u64>) -> serde_json::Value {
    serde_json::json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
    })
}

/// `(String, String)` headers as the `(&str, &str)` pairs [`Conn::send`] takes.
fn borrowed(h: &[(String, String)]) -> Vec<(&str, &str)> {
    h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// How a request of [`puts`] or [`fanout`] authenticates.
#[derive(Clone)]
enum Auth {
    None,
    Token(String),
    Sign(Arc<plait_bridge::Keypair>),
}

impl Auth {
    fn parse(s: &str) -> anyhow::Result<Auth> {
        Ok(match s.split_once(':') {
            None if s == "none" => Auth::None,
            Some(("token", t)) => Auth::Token(format!("Bearer {t}")),
            Some(("sign", path)) => Auth::Sign(Arc::new(
                plait_bridge::Keypair::load(std::path::Path::new(path))
                    .with_context(|| format!("loading the key {path}"))?,
            )),
            _ => bail!("--auth is none, token:TOKEN or sign:KEY.pem, not {s}"),
        })
    }

    fn name(&self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Token(_) => "token",
            Auth::Sign(_) => "signature",
        }
    }

    /// The headers that authenticate one request (`Host: load`, as [`Conn::send`] says).
    fn headers(&self, method: &str, path: &str, body: &[u8]) -> anyhow::Result<Vec<(String, String)>> {
        Ok(match self {
            Auth::None => Vec::new(),
            Auth::Token(t) => vec![("Authorization".into(), t.clone())],
            Auth::Sign(key) => {
                let mut h = http::HeaderMap::new();
                let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
                plait_server::access::signature::sign_request(
                    key,
                    &method.parse()?,
                    &format!("http://load{path}"),
                    &mut h,
                    Some(body),
                    now,
                    60,
                )
                .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
                h.iter()
                    .map(|(k, v)| Ok((k.to_string(), v.to_str()?.to_string())))
                    .collect::<anyhow::Result<_>>()?
            }
        })
    }
}

async fn puts(
    url: &str,
    resources: usize,
    concurrency: usize,
    seconds: u64,
    kind: &str,
    auth: &str,
) -> anyhow::Result<serde_json::Value> {
    let addr = addr_of(url)?;
    let text = match kind {
        "json" => false,
        "text" => true,
        other => bail!("--kind is json or text, not {other}"),
    };
    let auth = Auth::parse(auth)?;
    let auth_name = auth.name();
    let lat = Arc::new(Mutex::new(hist()));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (lat, done, errors) = (lat.clone(), done.clone(), errors.clone());
        let auth = auth.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            let mut c = Conn::default();
            let mut local = hist();
            let mut i = 0u64;
            while Instant::now() < end {
                let r = (w as u64 * 7919 + i * 104_729) as usize % resources;
                let path = format!("/bench/puts/{r}");
                let sent = Instant::now();
                let (body, mut headers) = if text {
                    (b"x".to_vec(), vec![("Content-Range", "text [0:0]")])
                } else {
                    (
                        format!("{{\"w\":{w},\"i\":{i}}}").into_bytes(),
                        vec![("Content-Type", "application/json")],
                    )
                };
                // Signing is part of what a signed request costs: inside the timing.
                let proof = auth.headers("PUT", &path, &body)?;
                headers.extend(proof.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                c.send(&mut s, "PUT", &path, &headers, &body).await?;
                let (status, _) = c.recv(&mut s).await?;
                if status == 200 {
                    local.record(sent.elapsed().as_micros().max(1) as u64)?;
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
            lat.lock().await.add(&local)?;
            Ok::<(), anyhow::Error>(())
        }));
    }
    let t0 = Instant::now();
    for t in tasks {
        t.await??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let lat = lat.lock().await;
    Ok(serde_json::json!({
        "workload": "puts",
        "kind": kind,
        "auth": auth_name,
        "resources": resources,
        "concurrency": concurrency,
        "seconds": secs,
        "acknowledged": done.load(Ordering::Relaxed),
        "errors": errors.load(Ordering::Relaxed),
        "puts_per_sec": done.load(Ordering::Relaxed) as f64 / secs,
        "ack_latency": summary(&lat),
        "server_rss": server_rss(&Target::plain(addr)).await.ok(),
    }))
}

fn header_of(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

/// A GET that keeps the response head (for its headers).
async fn get_with_head(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String, usize)> {
    let mut s = TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: load\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let end = find(&buf, b"\r\n\r\n").context("no response head")?;
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let status: u16 = head.split(' ').nth(1).context("status line")?.parse()?;
    Ok((status, head, buf.len() - end - 4))
}

async fn sync(
    home: &str,
    replica: &str,
    home_id: &str,
    changes: usize,
    concurrency: usize,
    path: &str,
) -> anyhow::Result<serde_json::Value> {
    let (haddr, raddr) = (addr_of(home)?, addr_of(replica)?);
    // Write the history: `changes` one-character insertions from concurrent writers.
    let next = Arc::new(AtomicUsize::new(0));
    let t_write = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, path) = (next.clone(), path.to_string());
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(haddr).await?;
            s.set_nodelay(true)?;
            let mut c = Conn::default();
            while next.fetch_add(1, Ordering::Relaxed) < changes {
                c.send(&mut s, "PUT", &path, &[("Content-Range", "text [0:0]")], b"x")
                    .await?;
                let (status, body) = c.recv(&mut s).await?;
                if status != 200 {
                    bail!("PUT answered {status}: {}", String::from_utf8_lossy(&body));
                }
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let write_s = t_write.elapsed().as_secs_f64();
    let (status, head, len) = get_with_head(haddr, path).await?;
    if status != 200 {
        bail!("GET at the home answered {status}");
    }
    let want = header_of(&head, "version").context("the home's answer has no Version")?;
    // Time until the replica holds the same version (each read makes it fetch what it lacks).
    let rpath = format!("/~{home_id}{path}");
    let t0 = Instant::now();
    let mut reads = 0;
    loop {
        let (status, head, rlen) = get_with_head(raddr, &rpath).await?;
        reads += 1;
        if status == 200 && header_of(&head, "version").as_deref() == Some(want.as_str()) {
            if rlen != len {
                bail!("the replica has the version but {rlen} bytes, not {len}");
            }
            break;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("the replica did not catch up in 10 minutes");
        }
    }
    let sync_s = t0.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "workload": "sync",
        "changes": changes,
        "write_seconds": write_s,
        "text_bytes": len,
        "sync_seconds": sync_s,
        "changes_per_sec": changes as f64 / sync_s,
        "replica_reads": reads,
        "replica_rss": server_rss(&Target::plain(raddr)).await.ok(),
    }))
}

/// GETs `path` from `concurrency` keep-alive connections for `seconds`.
async fn gets_once(
    addr: SocketAddr,
    path: &str,
    concurrency: usize,
    seconds: u64,
) -> anyhow::Result<(f64, u64, Histogram<u64>)> {
    let lat = Arc::new(Mutex::new(hist()));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (lat, done, errors, path) = (lat.clone(), done.clone(), errors.clone(), path.to_string());
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            let mut c = Conn::default();
            let mut local = hist();
            while Instant::now() < end {
                let sent = Instant::now();
                c.send(&mut s, "GET", &path, &[], b"").await?;
                let (status, _) = c.recv(&mut s).await?;
                if status == 200 {
                    local.record(sent.elapsed().as_micros().max(1) as u64)?;
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            lat.lock().await.add(&local)?;
            Ok::<(), anyhow::Error>(())
        }));
    }
    let t0 = Instant::now();
    for t in tasks {
        t.await??;
    }
    let rate = done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
    let lat = lat.lock().await.clone();
    Ok((rate, errors.load(Ordering::Relaxed), lat))
}

async fn gets(
    url: &str,
    proxy_url: Option<&str>,
    path: &str,
    concurrency: usize,
    seconds: u64,
) -> anyhow::Result<serde_json::Value> {
    let direct_addr = addr_of(url)?;
    let (status, _) = request(&Target::plain(direct_addr), "GET", path, &[], b"").await?;
    if status != 200 {
        bail!("GET {path} answered {status}: put something there first");
    }
    let (rate, errors, lat) = gets_once(direct_addr, path, concurrency, seconds).await?;
    let direct = serde_json::json!({"gets_per_sec": rate, "errors": errors, "latency": summary(&lat)});
    let Some(proxy_url) = proxy_url else {
        return Ok(
            serde_json::json!({"workload": "gets", "path": path, "concurrency": concurrency, "direct": direct}),
        );
    };
    let (prate, perrors, plat) = gets_once(addr_of(proxy_url)?, path, concurrency, seconds).await?;
    let added = |q: f64| ms(plat.value_at_quantile(q)) - ms(lat.value_at_quantile(q));
    Ok(serde_json::json!({
        "workload": "gets",
        "path": path,
        "concurrency": concurrency,
        "direct": direct,
        "proxied": {"gets_per_sec": prate, "errors": perrors, "latency": summary(&plat)},
        "added_latency_ms": {"p50": added(0.5), "p99": added(0.99)},
        "throughput_ratio": prate / rate,
    }))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(ca) = &cli.ca {
        net::trust(ca)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = rt.block_on(async {
        match cli.cmd {
            Cmd::Fanout(args) => fanout::fanout(args).await,
            Cmd::FanoutFloor { listen } => floor::fanout_floor(listen).await,
            Cmd::Handshakes {
                url,
                concurrency,
                seconds,
            } => tls::handshakes(&url, concurrency, seconds).await,
            Cmd::TlsFloor { listen, cert, key } => tls::floor(listen, &cert, &key).await,
            Cmd::TlsCert { dir } => tls::cert(&dir),
            Cmd::Abuse {
                url,
                seconds,
                server_pid,
                abusers,
            } => abuse::abuse(&url, seconds, server_pid, &abusers).await,
            Cmd::Idle {
                url,
                subs,
                conns,
                resources,
                opening,
                open_timeout_secs,
                server_pid,
            } => {
                idle::idle(idle::Idle {
                    url,
                    subs,
                    conns,
                    resources,
                    opening,
                    open_timeout: Duration::from_secs(open_timeout_secs),
                    server_pid,
                })
                .await
            }
            Cmd::Puts {
                url,
                resources,
                concurrency,
                seconds,
                kind,
                auth,
            } => puts(&url, resources, concurrency, seconds, &kind, &auth).await,
            Cmd::SqliteFloor {
                path,
                concurrency,
                seconds,
                modes,
                sizes_from,
                data_bytes,
            } => {
                let sizes = match sizes_from {
                    Some(p) => sqlite_floor::Sizes::from_store(&p)?,
                    None => sqlite_floor::Sizes::fixed(data_bytes),
                };
                sqlite_floor::floor(path, &modes, concurrency, seconds, sizes).await
            }
            Cmd::TextFloor { seconds } => text_floor::text_floor(seconds),
            Cmd::Sync {
                home,
                replica,
                home_id,
                changes,
                concurrency,
                path,
            } => sync(&home, &replica, &home_id, changes, concurrency, &path).await,
            Cmd::Mux {
                url,
                subs,
                resources,
                updates,
                interval_ms,
                mode,
            } => {
                let mode = mux::Mode::parse(&mode)?;
                mux::mux(
                    &url,
                    subs,
                    resources,
                    updates,
                    Duration::from_millis(interval_ms),
                    mode,
                )
                .await
            }
            Cmd::Gets {
                url,
                proxy_url,
                path,
                concurrency,
                seconds,
            } => gets(&url, proxy_url.as_deref(), &path, concurrency, seconds).await,
            Cmd::Restore(cmd) => restore::run(cmd).await,
        }
    })?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
