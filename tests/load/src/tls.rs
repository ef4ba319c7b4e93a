//! TLS figures: `handshakes` (full TLS handshakes per second from C concurrent clients,
//! each on a fresh TCP connection, no session resumption), `tls-floor` (the floor they are
//! judged against: a minimal tokio server that only accepts and runs Plait's own TLS
//! acceptor, same certificate and crypto provider, none of the server around it) and
//! `tls-cert` (a test CA and a certificate for 127.0.0.1, for the run script).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

use crate::net::Target;
use crate::{hist, summary};

/// Full handshakes from `concurrency` clients for `seconds`; each client connects, agrees
/// on TLS (ALPN `http/1.1`), closes with `close_notify` and starts again.
pub async fn handshakes(url: &str, concurrency: usize, seconds: u64) -> anyhow::Result<serde_json::Value> {
    let target = Target::parse(url)?;
    anyhow::ensure!(target.is_tls(), "handshakes needs an https:// URL");
    let lat = Arc::new(Mutex::new(hist()));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(seconds);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (target, lat, done, errors) = (target.clone(), lat.clone(), done.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = hist();
            while Instant::now() < end {
                let t = Instant::now();
                match target.connect().await {
                    Ok(mut s) => {
                        local.record(t.elapsed().as_micros().max(1) as u64)?;
                        done.fetch_add(1, Ordering::Relaxed);
                        let _ = s.shutdown().await;
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat.lock().await.add(&local)?;
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let lat = lat.lock().await;
    Ok(serde_json::json!({
        "workload": "handshakes",
        "url": url,
        "concurrency": concurrency,
        "seconds": secs,
        "handshakes": done.load(Ordering::Relaxed),
        "errors": errors.load(Ordering::Relaxed),
        "handshakes_per_sec": done.load(Ordering::Relaxed) as f64 / secs,
        "handshake_latency": summary(&lat),
    }))
}

/// Serves TLS handshakes on `listen` until killed: accept, Plait's acceptor
/// (`plait_server::http::tls::Tls`, the same configuration `plait serve --tls-cert` uses),
/// then read until the client closes. Prints `listening ADDR` once bound.
pub async fn floor(listen: SocketAddr, cert: &Path, key: &Path) -> anyhow::Result<serde_json::Value> {
    let tls = Arc::new(plait_server::http::tls::Tls::new(
        cert,
        key,
        Duration::from_secs(10),
    )?);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    loop {
        let (tcp, _) = listener.accept().await?;
        let tls = tls.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            if let Ok(mut s) = tls.handshake(tcp).await {
                let mut buf = [0u8; 4096];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            }
        });
    }
}

/// Writes `ca.pem`, `cert.pem` and `key.pem` (a certificate for 127.0.0.1 and localhost
/// that the CA issued) into `dir`.
pub fn cert(dir: &PathBuf) -> anyhow::Result<serde_json::Value> {
    std::fs::create_dir_all(dir)?;
    let ca = plait_tests::pki::Ca::new("plait-load CA");
    let issued = ca.issue(&["127.0.0.1", "localhost"], Some("127.0.0.1"));
    let write = |name: &str, text: String| {
        std::fs::write(dir.join(name), text).with_context(|| format!("writing {name}"))
    };
    write("ca.pem", ca.pem())?;
    write("cert.pem", issued.cert_pem())?;
    write("key.pem", issued.key_pem())?;
    Ok(serde_json::json!({"dir": dir}))
}
