//! `idle`: N subscriptions held open over HTTP/2 streams (many per connection), and what
//! they cost the server: its resident memory before and after, per subscription; with
//! `--server-pid` also the server's `/proc/PID/status` (RSS, peak, swap) and the machine's
//! `/proc/meminfo` (free memory, swap used) before and after, as `idle-1m` reports them.
//!
//! Connections are opened a bounded number at a time (`--opening`): a connection holds its
//! place until its streams have all had their first update, so that a million streams do
//! not arrive at the server's accept queue and h2 buffers at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::net::{Target, Waves, addr_of, request, server_rss, server_status};

/// What `idle` is asked to hold.
pub struct Idle {
    pub url: String,
    pub subs: usize,
    /// HTTP/2 connections the subscriptions are spread over.
    pub conns: usize,
    /// Distinct resources (subscription i takes resource i % resources).
    pub resources: usize,
    /// Connections being set up at once.
    pub opening: usize,
    /// Longest time setting up may take before the run fails.
    pub open_timeout: Duration,
    /// The server's process (on this machine), for `/proc/PID/status`.
    pub server_pid: Option<u32>,
}

pub async fn idle(args: Idle) -> anyhow::Result<serde_json::Value> {
    let Idle {
        url,
        subs,
        conns,
        resources,
        opening,
        open_timeout,
        server_pid,
    } = args;
    let addr = addr_of(&url)?;
    for r in 0..resources {
        request(
            &Target::plain(addr),
            "PUT",
            &format!("/bench/idle/{r}"),
            &[("Content-Type", "application/json")],
            b"{\"idle\":true}",
        )
        .await?;
    }
    let rss0 = server_rss(&Target::plain(addr)).await?;
    let machine0 = meminfo()?;
    let proc0 = server_pid.map(proc_status).transpose()?;
    let per_conn = subs.div_ceil(conns.max(1));
    let opened = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(opening.max(1)));
    let t0 = Instant::now();
    let mut holders = Vec::new();
    for c in 0..conns {
        let n = per_conn.min(subs.saturating_sub(c * per_conn));
        if n == 0 {
            break;
        }
        let (opened, gate) = (opened.clone(), gate.clone());
        holders.push(tokio::spawn(hold(addr, c * per_conn, n, resources, opened, gate)));
    }
    while opened.load(Ordering::SeqCst) < subs {
        if let Some(i) = holders.iter().position(|h| h.is_finished()) {
            let err = match holders.swap_remove(i).await {
                Ok(Ok(())) => "ended".to_string(),
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) => e.to_string(),
            };
            bail!(
                "an HTTP/2 connection failed after {} subscriptions opened: {err}",
                opened.load(Ordering::SeqCst)
            );
        }
        if t0.elapsed() > open_timeout {
            bail!(
                "only {} of {subs} subscriptions opened in {open_timeout:?}",
                opened.load(Ordering::SeqCst)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let open_s = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = server_status(&Target::plain(addr)).await?;
    let rss1 = status["rss_bytes"].as_u64().context("rss_bytes")?;
    let machine1 = meminfo()?;
    let proc1 = server_pid.map(proc_status).transpose()?;
    let load_rss = proc_status(std::process::id())?["vm_rss"].clone();
    Ok(serde_json::json!({
        "workload": "idle",
        "subscriptions": subs,
        "http2_connections": holders.len(),
        "resources": resources,
        "open_secs": open_s,
        "subscriptions_opened_per_sec": subs as f64 / open_s,
        "server_rss_before": rss0,
        "server_rss_after": rss1,
        "server_counts_subscriptions": status["subscriptions"],
        "server_bytes_per_subscription": rss1.saturating_sub(rss0) / subs.max(1) as u64,
        "server_proc_status": {"before": proc0, "after": proc1},
        "machine_meminfo": {"before": machine0, "after": machine1},
        "load_tool_rss": load_rss,
    }))
}

/// One HTTP/2 connection holding subscriptions `first..first + n`, until the process ends.
async fn hold(
    addr: SocketAddr,
    first: usize,
    n: usize,
    resources: usize,
    opened: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
) -> anyhow::Result<()> {
    let permit = gate.acquire_owned().await?;
    let tcp = TcpStream::connect(addr).await?;
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(65_535)
        .handshake::<_, bytes::Bytes>(tcp)
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client;
    let mut readers = Vec::with_capacity(n);
    let waves = Waves::default();
    for k in 0..n {
        waves.turn(k).await;
        let i = first + k;
        client = client.ready().await?;
        let req = http::Request::get(format!("http://{addr}/bench/idle/{}", i % resources))
            .header("subscribe", "true")
            .header("accept", "application/json")
            .body(())?;
        let (resp, _) = client.send_request(req, true)?;
        let (opened, waves) = (opened.clone(), waves.clone());
        // Each stream is read as its data arrives, as a real client would.
        readers.push(tokio::spawn(async move {
            let resp = resp.await?;
            if resp.status().as_u16() != 209 {
                bail!("subscription answered {}", resp.status());
            }
            let mut body = resp.into_body();
            let mut first = true;
            while let Some(d) = body.data().await {
                let d = d?;
                let _ = body.flow_control().release_capacity(d.len());
                if std::mem::take(&mut first) {
                    opened.fetch_add(1, Ordering::SeqCst);
                    waves.arrived();
                }
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    waves.all(n).await;
    drop(permit);
    // Hold the connection open until the process ends; report a stream's failure.
    for r in readers {
        r.await??;
    }
    drop(client);
    Ok(())
}

/// The machine's memory from `/proc/meminfo`, in bytes.
fn meminfo() -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    let kib = |name: &str| field_kib(&text, name).map(|k| k * 1024);
    let (swap_total, swap_free) = (kib("SwapTotal"), kib("SwapFree"));
    Ok(serde_json::json!({
        "mem_total": kib("MemTotal"),
        "mem_free": kib("MemFree"),
        "mem_available": kib("MemAvailable"),
        "swap_total": swap_total,
        "swap_used": swap_total.zip(swap_free).map(|(t, f)| t - f),
    }))
}

/// A process's memory from `/proc/PID/status`, in bytes.
fn proc_status(pid: u32) -> anyhow::Result<serde_json::Value> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kib = |name: &str| field_kib(&text, name).map(|k| k * 1024);
    Ok(serde_json::json!({
        "vm_rss": kib("VmRSS"),
        "vm_hwm": kib("VmHWM"),
        "vm_swap": kib("VmSwap"),
    }))
}

/// `Name:   1234 kB` from a `/proc` file, in KiB.
fn field_kib(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}
