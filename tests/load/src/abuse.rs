//! `plait-load abuse`: normal clients beside abusers. The same normal load (Braid PUTs and
//! GETs on keep-alive connections at a steady pace, Statebus `get` round trips) runs twice against one
//! server: alone, then beside 1,000 slow sockets, a login flood, a Statebus subscription
//! flood, big PUTs, deep JSON and catch-ups from a past version of a big document. Reports the normal clients' latency in both runs and the
//! ratio, what the abusers were answered, the server's peak memory, and whether it stayed
//! up.
//!
//! The normal clients run on a thread and runtime of their own. Normal clients connect
//! from 127.0.0.1, abusers from other loopback addresses (one per
//! kind of abuse, the slow sockets from four), so the per-address caps apply to them as
//! they would to clients on other hosts.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

use crate::net::Conn;
use crate::{hist, summary};

/// Answers the abusers got, by status (0: the connection failed or was closed).
type Answers = Arc<Mutex<BTreeMap<String, u64>>>;

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A connection from the loopback address `from`. The port is chosen at connect, not at
/// bind (`IP_BIND_ADDRESS_NO_PORT`): binding port 0 makes the kernel search every port in
/// use for one free for any destination, which took 8 % of the machine's CPU under the
/// abusers' thousands of connections, CPU the server then lacked.
async fn connect_from(from: IpAddr, to: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket, and a pointer to an int of the size given.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    socket.bind(SocketAddr::new(from, 0))?;
    let s = socket.connect(to).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// The kinds of abuse, as `--abusers` names them.
pub const KINDS: [&str; 6] = ["slow", "login", "subscriptions", "big", "deep", "history"];

pub async fn abuse(
    url: &str,
    seconds: u64,
    server_pid: Option<u32>,
    kinds: &[String],
) -> anyhow::Result<serde_json::Value> {
    if let Some(k) = kinds.iter().find(|k| !KINDS.contains(&k.as_str())) {
        anyhow::bail!("--abusers takes {}, not {k}", KINDS.join(", "));
    }
    let addr = crate::net::addr_of(url)?;
    let span = Duration::from_secs(seconds);
    let clean = normal_load_apart(addr, span).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Answers = Arc::default();
    let on = |k: &str| kinds.iter().any(|x| x == k);
    let abusers = start_abusers(addr, stop.clone(), answers.clone(), &on);
    // Let the abusers get going before measuring.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let abused = normal_load_apart(addr, span).await;
    stop.store(true, Ordering::SeqCst);
    for a in abusers {
        a.abort();
    }
    let abused = abused?;
    // Up: the process lives and answers its status within 10 s of the abusers stopping
    // (their sockets may take a moment to be closed and counted out). Asked from an
    // address of its own: the abusers' connections can use up 127.0.0.1's local ports.
    let mut up = Err(anyhow::anyhow!("not asked"));
    for _ in 0..20 {
        up = status_from(loopback(99), addr).await;
        if up.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let alive = server_pid.map(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
    let peak = server_pid.and_then(peak_rss);
    let ratio = |k: &str, q: &str| {
        let (a, c) = (
            abused[k][q].as_f64().unwrap_or(0.0),
            clean[k][q].as_f64().unwrap_or(0.0),
        );
        if c > 0.0 { a / c } else { 0.0 }
    };
    Ok(serde_json::json!({
        "workload": "abuse",
        "seconds": seconds,
        "abusers": kinds,
        "p99_ratio_braid": ratio("braid", "p99_ms"),
        "p99_ratio_statebus": ratio("statebus", "p99_ms"),
        "clean": clean,
        "abused": abused,
        "abusers_answered": *answers.lock().await,
        "server_peak_rss_bytes": peak,
        "server_stayed_up": up.is_ok() && alive != Some(false),
        "server_process_alive": alive,
        "server_status_error": up.err().map(|e| format!("{e:#}")),
    }))
}

/// The server's status resource answered 200, asked from `from`.
async fn status_from(from: IpAddr, addr: SocketAddr) -> anyhow::Result<()> {
    let mut s = connect_from(from, addr).await?;
    let mut conn = Conn::default();
    conn.send(&mut s, "GET", "/.well-known/plait", &[], b"").await?;
    let (status, _) = conn.recv(&mut s).await?;
    anyhow::ensure!(status == 200, "the status resource answered {status}");
    Ok(())
}

/// `VmHWM` of the server process.
fn peak_rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// [`normal_load`] on a thread and runtime of its own, so that the abusers' tasks in this
/// process never delay the normal clients' timers or reads (they still share the cores).
async fn normal_load_apart(addr: SocketAddr, span: Duration) -> anyhow::Result<serde_json::Value> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
        let r = match rt {
            Ok(rt) => rt.block_on(normal_load(addr, span)),
            Err(e) => Err(e.into()),
        };
        let _ = tx.send(r);
    });
    rx.await?
}

/// How often each normal client does its work (a Braid PUT and GET; a Statebus `get`).
/// 16 Braid clients at this pace make 640 writes a second from one address: normal use,
/// within the default per-writer rate (`limits.writes_per_second`, 2,000), so that the
/// clean run measures the server rather than its refusals (clients running flat out met
/// the limit and were mostly answered 429, which made the clean p99 a refusal's).
const NORMAL_PERIOD: Duration = Duration::from_millis(25);

/// 16 Braid clients (a PUT then a GET, on keep-alive connections) and 4 Statebus clients
/// (`get` then `forget` of a fresh key, timed to its state), each every
/// [`NORMAL_PERIOD`], for `span`; latency from the moment the work was due, so a stalled
/// server is charged for the requests that waited. Any answer but 200 is an error.
async fn normal_load(addr: SocketAddr, span: Duration) -> anyhow::Result<serde_json::Value> {
    let braid = Arc::new(Mutex::new(hist()));
    let statebus = Arc::new(Mutex::new(hist()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let until = Instant::now() + span;
    let mut tasks = Vec::new();
    for c in 0..16 {
        let (braid, errors) = (braid.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = hist();
            let mut s = connect_from(loopback(1), addr).await?;
            let mut conn = Conn::default();
            let mut k = 0u64;
            let mut pace = tokio::time::interval(NORMAL_PERIOD);
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while Instant::now() < until {
                let t = pace.tick().await.into_std();
                let path = format!("/normal/{c}");
                let body = format!("{{\"k\":{k}}}");
                conn.send(
                    &mut s,
                    "PUT",
                    &path,
                    &[("Content-Type", "application/json")],
                    body.as_bytes(),
                )
                .await?;
                let (status, _) = conn.recv(&mut s).await?;
                conn.send(&mut s, "GET", &path, &[], b"").await?;
                let (got, _) = conn.recv(&mut s).await?;
                if status != 200 || got != 200 {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                local.record(t.elapsed().as_micros().max(1) as u64)?;
                k += 1;
            }
            braid.lock().await.add(&local)?;
            anyhow::Ok(())
        }));
    }
    for c in 0..4 {
        let (statebus, errors) = (statebus.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = hist();
            let url = format!("ws://{addr}/_connect_to_statebus_/websocket");
            // Without TCP_NODELAY each `get` after a `forget` waited for the server's
            // delayed ACK (40 ms), which was most of every Statebus figure.
            let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
            let mut k = 0u64;
            let mut pace = tokio::time::interval(NORMAL_PERIOD);
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while Instant::now() < until {
                let t = pace.tick().await.into_std();
                let key = format!("sbnormal/{c}/{k}");
                ws.send(Message::text(serde_json::json!({"get": key}).to_string()))
                    .await?;
                loop {
                    let Some(m) = ws.next().await else {
                        anyhow::bail!("the websocket closed")
                    };
                    if let Message::Text(text) = m? {
                        let v: serde_json::Value = serde_json::from_str(&text)?;
                        if v.get("error").is_some() {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        if v["set"]["key"] == key.as_str() || v["about"] == key.as_str() {
                            break;
                        }
                    }
                }
                local.record(t.elapsed().as_micros().max(1) as u64)?;
                ws.send(Message::text(serde_json::json!({"forget": key}).to_string()))
                    .await?;
                k += 1;
            }
            statebus.lock().await.add(&local)?;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let (braid, statebus): (Histogram<u64>, Histogram<u64>) =
        (braid.lock().await.clone(), statebus.lock().await.clone());
    Ok(serde_json::json!({
        "braid": summary(&braid),
        "statebus": summary(&statebus),
        "errors": errors.load(Ordering::Relaxed),
    }))
}

async fn note(answers: &Answers, what: &str, status: u16) {
    *answers
        .lock()
        .await
        .entry(format!("{what} {status}"))
        .or_default() += 1;
}

fn start_abusers(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    answers: Answers,
    on: &dyn Fn(&str) -> bool,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    // 1,000 slow sockets: a request head sent a byte every 5 s; reconnected when closed.
    for i in 0..if on("slow") { 1000u32 } else { 0 } {
        let (stop, answers) = (stop.clone(), answers.clone());
        tasks.push(tokio::spawn(async move {
            let from = loopback(10 + (i / 250) as u8);
            while !stop.load(Ordering::SeqCst) {
                let Ok(mut s) = connect_from(from, addr).await else {
                    note(&answers, "slow-socket connect", 0).await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                };
                let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await;
                while s.write_all(b"X").await.is_ok() {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                note(&answers, "slow-socket closed", 0).await;
            }
        }));
    }
    // A login flood: wrong passwords as fast as the answers come.
    for _ in 0..if on("login") { 4 } else { 0 } {
        let (stop, answers) = (stop.clone(), answers.clone());
        tasks.push(tokio::spawn(async move {
            let body = br#"{"login_as":{"name":"victim","pass":"wrong"}}"#;
            while !stop.load(Ordering::SeqCst) {
                let status = one(loopback(20), addr, "PUT", "/current_user", &[], body).await;
                note(&answers, "login", status).await;
            }
        }));
    }
    // A subscription flood: one Statebus socket asking for 20,000 keys, again and again.
    // The frames are encoded once, as an attacker would: encoding them anew each round took
    // a core of the load generator's, CPU the machine's normal clients then lacked.
    if on("subscriptions") {
        let (stop, answers) = (stop.clone(), answers.clone());
        let gets = masked_text_frames((0..20_000).map(|k| format!(r#"{{"get":"flood/{k}"}}"#)));
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let Ok(s) = connect_from(loopback(21), addr).await else {
                    continue;
                };
                let url = format!("ws://{addr}/_connect_to_statebus_/websocket");
                let Ok((mut ws, _)) = tokio_tungstenite::client_async(url, s).await else {
                    note(&answers, "subscription-flood connect", 0).await;
                    continue;
                };
                let _ = ws.get_mut().write_all(&gets).await;
                note(&answers, "subscription-flood round", 0).await;
            }
        }));
    }
    // Big PUTs: 8 MB of bytes, then 2 MB of text, over and over.
    if on("big") {
        let (stop, answers) = (stop.clone(), answers.clone());
        tasks.push(tokio::spawn(async move {
            let blob = vec![7u8; 8 << 20];
            let text = "x".repeat(2 << 20);
            let mut k = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let (path, kind, body) = if k.is_multiple_of(2) {
                    (format!("/big/b{k}"), "application/octet-stream", blob.as_slice())
                } else {
                    (format!("/big/t{k}"), "text/plain", text.as_bytes())
                };
                let status = one(loopback(22), addr, "PUT", &path, &[("Content-Type", kind)], body).await;
                note(&answers, "big-put", status).await;
                k += 1;
            }
        }));
    }
    // Deep JSON: 1,000 levels in a body.
    if on("deep") {
        let (stop, answers) = (stop.clone(), answers.clone());
        tasks.push(tokio::spawn(async move {
            let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
            while !stop.load(Ordering::SeqCst) {
                let h = [("Content-Type", "application/json")];
                let status = one(loopback(23), addr, "PUT", "/deep", &h, deep.as_bytes()).await;
                note(&answers, "deep-json", status).await;
            }
        }));
    }
    // Past-version reads: a megabyte of text written once (from one address), then
    // catch-ups from its first run's end (from another), four at a time, over and over.
    if on("history") {
        let (stop, answers) = (stop.clone(), answers.clone());
        tasks.push(tokio::spawn(async move {
            let text = "x".repeat(1 << 20);
            let h = [("Content-Type", "text/plain"), ("Peer", "abuser")];
            let status = one(loopback(24), addr, "PUT", "/history", &h, text.as_bytes()).await;
            note(&answers, "history-put", status).await;
            let readers = (0..4).map(|_| {
                let (stop, answers) = (stop.clone(), answers.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let h = [("Parents", "\"abuser-65535\"")];
                        let status = one(loopback(25), addr, "GET", "/history", &h, b"").await;
                        note(&answers, "history-catch-up", status).await;
                    }
                })
            });
            futures::future::join_all(readers.collect::<Vec<_>>()).await;
        }));
    }
    tasks
}

/// Client-to-server websocket text frames, one per message, masked with the key 0 (the
/// payload unchanged); each message is under 126 bytes.
fn masked_text_frames(messages: impl Iterator<Item = String>) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        assert!(m.len() < 126, "a short message");
        out.extend_from_slice(&[0x81, 0x80 | m.len() as u8, 0, 0, 0, 0]);
        out.extend_from_slice(m.as_bytes());
    }
    out
}

/// One request on a fresh connection from `from`; its status, or 0 when it failed.
async fn one(
    from: IpAddr,
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> u16 {
    let Ok(mut s) = connect_from(from, to).await else {
        return 0;
    };
    let mut c = Conn::default();
    if c.send(&mut s, method, path, headers, body).await.is_err() {
        return 0;
    }
    c.recv(&mut s).await.map(|(status, _)| status).unwrap_or(0)
}
