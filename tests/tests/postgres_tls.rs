//! Postgres over TLS: `sslmode` in the database URL as libpq reads it, against a cluster
//! that takes TCP connections over TLS only, with a certificate the test makes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use plait_tests::pg::Cluster;
use plait_tests::pki::Ca;
use plait_tests::plait::{Plait, Store, binary};
use plait_tests::wire;

/// Starts `plait serve` on `url` (with the data dir `dir`): Ok once it listens,
/// Err(its output) if it exits first.
fn serve_in(dir: &std::path::Path, url: &str) -> Result<(), String> {
    let mut child = Command::new(binary())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-p2p",
            "--database-url",
            url,
            "--data-dir",
        ])
        .arg(dir)
        .env_remove("DATABASE_URL")
        .env_remove("PLAIT_DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let end = Instant::now() + Duration::from_secs(60);
    for line in lines.lines() {
        let line = line.unwrap_or_default();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("listening on") {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(());
        }
        if Instant::now() > end {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_is_honoured() {
    let ca = Ca::new("Plait test CA");
    let issued = ca.issue(&["127.0.0.1", "localhost"], None);
    let cluster = Cluster::private_tls(&issued.cert_pem(), &issued.key_pem());
    let url = cluster.create_database();
    let files = tempfile::tempdir().unwrap();
    let ca_file = files.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let other_ca = files.path().join("other-ca.pem");
    std::fs::write(&other_ca, Ca::new("Someone else").pem()).unwrap();
    let with = |q: &str| format!("{url}?{q}");
    let data_dir = tempfile::tempdir().unwrap();
    let serve = |u: &str| serve_in(data_dir.path(), u);

    // The cluster refuses plain TCP: disable cannot connect, everything else encrypts.
    let err = serve(&with("sslmode=disable")).unwrap_err();
    assert!(
        err.contains("no encryption") || err.contains("hostnossl") || err.contains("rejects"),
        "{err}"
    );
    serve(&url).expect("prefer (the default) uses TLS");
    serve(&with("sslmode=require")).expect("require: encrypted, the certificate unchecked");
    let ca_q = format!("sslrootcert={}", ca_file.display());
    serve(&with(&format!("sslmode=verify-full&{ca_q}"))).expect("verify-full with the right CA and name");
    serve(&with(&format!("sslmode=verify-ca&{ca_q}"))).expect("verify-ca with the right CA");
    let err = serve(&with(&format!(
        "sslmode=verify-ca&sslrootcert={}",
        other_ca.display()
    )))
    .unwrap_err();
    assert!(
        err.to_lowercase().contains("certificate"),
        "another CA must be refused: {err}"
    );
    let err = serve(&with("sslmode=verify-full")).unwrap_err();
    assert!(
        err.contains("sslrootcert"),
        "verify-full without a CA is a clear error: {err}"
    );

    // A certificate for another name: verify-ca accepts it, verify-full does not.
    let issued = ca.issue(&["db.example"], None);
    let named = Cluster::private_tls(&issued.cert_pem(), &issued.key_pem());
    let named_url = named.create_database();
    let data_dir2 = tempfile::tempdir().unwrap();
    let serve = |u: &str| serve_in(data_dir2.path(), u);
    serve(&format!("{named_url}?sslmode=verify-ca&{ca_q}")).expect("verify-ca ignores the name");
    let err = serve(&format!("{named_url}?sslmode=verify-full&{ca_q}")).unwrap_err();
    assert!(
        err.to_lowercase().contains("certificate"),
        "verify-full checks the name: {err}"
    );

    // And it works end to end: writes over TLS, notices on a TLS connection of their own
    // (a second process on the same database sees the first's writes live).
    let full = format!("{}?sslmode=verify-full&{ca_q}", cluster.create_database());
    let a = Plait::start(Store::Postgres(full.clone()));
    let b = Plait::start_sharing(&a, &[]);
    let json = [("Content-Type", "application/json")];
    let r = wire::send(a.addr, "PUT", "/over-tls", &json, br#"{"n":1}"#).await;
    assert!(r.status < 300);
    assert_eq!(
        wire::send(b.addr, "GET", "/over-tls", &[], b"").await.text(),
        r#"{"n":1}"#
    );
    let mut sub = wire::subscribe(
        b.addr,
        "/over-tls",
        &[("Subscribe", "true"), ("Accept", "application/json")],
    )
    .await;
    sub.next_block(Duration::from_secs(5)).await;
    let r = wire::send(a.addr, "PUT", "/over-tls", &json, br#"{"n":"encrypted"}"#).await;
    assert!(r.status < 300);
    let mut got = false;
    for _ in 0..5 {
        match sub.next_block(Duration::from_secs(5)).await {
            Some(b) if b.body_text().contains("encrypted") => {
                got = true;
                break;
            }
            Some(_) => {}
            None => break,
        }
    }
    assert!(
        got,
        "the other process heard the write through its TLS notice connection: {}",
        b.log()
    );
}
