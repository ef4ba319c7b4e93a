//! Postgres restarted in the middle of sustained writes: requests made while it is down
//! get errors (never hang), Plait reconnects by itself, and nothing acknowledged is lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plait_tests::pg::Cluster;
use plait_tests::plait::{Plait, Store};
use plait_tests::wire;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_load() {
    let cluster = Cluster::private();
    let p = Plait::start(Store::Postgres(cluster.create_database()));
    // Six writers each on a resource of its own, six more on one shared document (each on
    // a key of its own), whose writes are stored in rounds of several.
    let shared = wire::send(
        p.addr,
        "PUT",
        "/shared",
        &[("Content-Type", "application/json")],
        b"{}",
    )
    .await;
    assert_eq!(shared.status, 200);
    let acked: Arc<Mutex<HashMap<usize, i64>>> = Arc::default();
    let statuses: Arc<Mutex<HashMap<u16, usize>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..12 {
        let (acked, statuses, stop, addr) = (acked.clone(), statuses.clone(), stop.clone(), p.addr);
        writers.push(tokio::spawn(async move {
            let mut n = 0i64;
            let mut slowest = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let (path, range, body) = if w < 6 {
                    (format!("/w/{w}"), None, format!("{{\"n\":{n}}}"))
                } else {
                    ("/shared".to_string(), Some(format!("json .w{w}")), n.to_string())
                };
                let mut headers = vec![("Content-Type", "application/json")];
                if let Some(range) = &range {
                    headers.push(("Content-Range", range));
                }
                let t0 = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(20),
                    wire::send(addr, "PUT", &path, &headers, body.as_bytes()),
                )
                .await
                .expect("a request made while Postgres is down is answered, not left hanging");
                slowest = slowest.max(t0.elapsed());
                *statuses.lock().unwrap().entry(r.status).or_default() += 1;
                match r.status {
                    200 => {
                        acked.lock().unwrap().insert(w, n);
                    }
                    503 => {
                        assert!(r.header("retry-after").is_some());
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    other => panic!("unexpected {other}: {}", r.text()),
                }
            }
            slowest
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    cluster.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.start_again();
    // Writes succeed again without restarting Plait.
    let before = acked.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = acked.lock().unwrap().clone();
        if now.iter().all(|(w, n)| before.get(w).is_none_or(|b| n > b)) && now.len() == 12 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes did not resume after Postgres came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        let slowest = w.await.unwrap();
        assert!(slowest < Duration::from_secs(15), "a request took {slowest:?}");
    }
    let statuses = statuses.lock().unwrap().clone();
    assert!(
        statuses.get(&503).copied().unwrap_or(0) > 0,
        "writes during the outage were refused: {statuses:?}"
    );
    let acked = acked.lock().unwrap().clone();
    let r = wire::send(p.addr, "GET", "/shared", &[], b"").await;
    let shared: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    for (w, n) in acked.iter() {
        let held = if *w < 6 {
            let r = wire::send(p.addr, "GET", &format!("/w/{w}"), &[], b"").await;
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            v["n"].as_i64().unwrap()
        } else {
            shared[format!("w{w}")].as_i64().unwrap()
        };
        assert!(held >= *n, "writer {w}: acknowledged {n}, holds {held}");
    }
}
