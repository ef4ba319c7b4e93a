//! `plait backup`, `plait restore` and `plait migrate` with the real binary: a backup of
//! a server taking writes holds every write acknowledged before it began, history
//! included, and restores into a new data dir; a store moves from the embedded file to
//! Postgres and back with rows and hashes equal, and nothing is copied into a store that
//! holds data or out of one a server is using.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plait_tests::on_both_stores;
use plait_tests::plait::{Plait, Store, binary};
use plait_tests::wire;

on_both_stores!(backup_while_writing_then_restore);

/// Runs `plait ARGS…`; returns (success, stdout, stderr).
async fn plait(args: Vec<String>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(binary())
            .args(&args)
            .env_remove("DATABASE_URL")
            .env_remove("PLAIT_DATABASE_URL")
            .output()
            .expect("running plait");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

fn args(list: &[&str], dir: &Path, store: &Store) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    v.push("--data-dir".into());
    v.push(dir.display().to_string());
    if let Store::Postgres(url) = store {
        v.push("--database-url".into());
        v.push(url.clone());
    }
    v
}

/// A text resource with history, JSON, and bytes.
async fn write_some(p: &Plait) {
    let put = |path: &'static str, headers: Vec<(&'static str, &'static str)>, body: &'static [u8]| {
        let addr = p.addr;
        async move {
            let r = wire::send(addr, "PUT", path, &headers, body).await;
            assert!(r.status < 300, "PUT {path}: {}", r.status);
        }
    };
    put("/t", vec![("Version", "\"a-4\"")], b"hello").await;
    put(
        "/t",
        vec![
            ("Version", "\"b-0\""),
            ("Parents", "\"a-4\""),
            ("Content-Range", "text [5:5]"),
        ],
        b"!",
    )
    .await;
    put(
        "/j",
        vec![("Content-Type", "application/json")],
        br#"{"a":[1,2]}"#,
    )
    .await;
    put(
        "/bin",
        vec![("Content-Type", "application/octet-stream")],
        b"\x00\x01\x02",
    )
    .await;
}

async fn check_some(addr: std::net::SocketAddr) {
    let t = wire::send(addr, "GET", "/t", &[], b"").await;
    assert_eq!(t.text(), "hello!");
    assert_eq!(t.header("version"), Some("\"b-0\""));
    let old = wire::send(addr, "GET", "/t", &[("Version", "\"a-4\"")], b"").await;
    assert_eq!(old.text(), "hello", "history came along");
    assert_eq!(
        wire::send(addr, "GET", "/j", &[], b"").await.text(),
        r#"{"a":[1,2]}"#
    );
    assert_eq!(
        wire::send(addr, "GET", "/bin", &[], b"").await.body,
        b"\x00\x01\x02"
    );
}

async fn backup_while_writing_then_restore(store: Store) {
    let p = Plait::start(store.clone());
    write_some(&p).await;
    let token = p.owner_token();

    // Writers keep writing through the backup; each records what was acknowledged.
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (acked, stop, addr) = (acked.clone(), stop.clone(), p.addr);
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let path = format!("/w/{w}/{}", i % 50);
                let body = format!("value {i}");
                let r = wire::send(addr, "PUT", &path, &[], body.as_bytes()).await;
                if r.status < 300 {
                    acked.lock().unwrap().push((path, body));
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = acked.lock().unwrap().clone();
    let scratch = tempfile::tempdir().unwrap();
    let file = scratch.path().join("plait.backup");
    let (ok, out, err) = plait(args(
        &["backup", "--keys", file.to_str().unwrap()],
        p.data_dir(),
        &store,
    ))
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert!(ok, "backup failed: {out}\n{err}");
    assert!(
        out.contains("backed up") && out.contains("with its keys"),
        "{out}"
    );
    assert!(
        err.contains("backup:") && err.contains("done"),
        "a last progress line: {err}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the backup carries keys: the owner's alone");
    assert!(
        before.len() > 10,
        "the writers wrote during the test: {}",
        before.len()
    );

    // Restored into a new data dir on the embedded store, whatever the source was.
    let dir2 = tempfile::tempdir().unwrap();
    let (ok, out, err) = plait(args(
        &["restore", file.to_str().unwrap()],
        dir2.path(),
        &Store::Embedded,
    ))
    .await;
    assert!(ok, "restore failed: {out}\n{err}");
    assert!(out.contains("as in the backup"), "{out}");
    // Not twice into the same place.
    let (ok, _, err) = plait(args(
        &["restore", file.to_str().unwrap()],
        dir2.path(),
        &Store::Embedded,
    ))
    .await;
    assert!(
        !ok && err.contains("already"),
        "a second restore must be refused: {err}"
    );

    let q = Plait::start_in(Store::Embedded, dir2.path(), &[]);
    let id = |p: &Plait| {
        let (k, v) = p.owner_auth();
        let addr = p.addr;
        async move {
            let r = wire::send(addr, "GET", "/.well-known/plait", &[(k, v.as_str())], b"").await;
            serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["id"].clone()
        }
    };
    assert_eq!(id(&q).await, id(&p).await, "the same instance");
    check_some(q.addr).await;
    // Every write acknowledged before the backup began: the path holds it or a later value
    // of the same writer (values only grow per path).
    let num = |s: &str| s.trim_start_matches("value ").parse::<u64>().unwrap();
    for (path, body) in &before {
        let r = wire::send(q.addr, "GET", path, &[], b"").await;
        assert_eq!(r.status, 200, "{path} was acknowledged before the backup");
        assert!(
            num(&r.text()) >= num(body),
            "{path}: {} older than acknowledged {body}",
            r.text()
        );
    }
    // The owner's token came along.
    let r = wire::send(
        q.addr,
        "GET",
        "/.well-known/plait/access",
        &[("Authorization", &format!("Bearer {token}"))],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "the owner token works on the restored server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_embedded_to_postgres_and_back() {
    let mut p = Plait::start(Store::Embedded);
    write_some(&p).await;
    let dir = p.data_dir().to_path_buf();
    let url = plait_tests::pg::fresh_database();
    let to_pg = |d: &Path| args(&["migrate", "--to", &url], d, &Store::Embedded);

    let (ok, _, err) = plait(to_pg(&dir)).await;
    assert!(
        !ok && err.contains("another plait server is using"),
        "not while serving: {err}"
    );
    assert_eq!(p.terminate(), Some(0));
    let (ok, out, err) = plait(to_pg(&dir)).await;
    assert!(ok, "migrate failed: {out}\n{err}");
    assert!(
        out.contains("equal on both sides") && out.contains("blake3"),
        "{out}"
    );
    let (ok, _, err) = plait(to_pg(&dir)).await;
    assert!(
        !ok && err.contains("already holds data"),
        "not into a database with data: {err}"
    );

    // Served from Postgres with the same data dir, then one more write.
    let q = Plait::start_in(Store::Postgres(url.clone()), &dir, &[]);
    check_some(q.addr).await;
    let r = wire::send(q.addr, "PUT", "/after", &[], b"on postgres").await;
    assert!(r.status < 300);
    drop(q);

    // And back, into a new data dir holding the same key.
    let dir3 = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("identity.pem"), dir3.path().join("identity.pem")).unwrap();
    let (ok, out, err) = plait(args(
        &["migrate", "--to", "embedded"],
        dir3.path(),
        &Store::Postgres(url.clone()),
    ))
    .await;
    assert!(ok, "migrate back failed: {out}\n{err}");
    let summary = |s: &str| s.split("blake3 ").nth(1).map(|h| h[..64].to_string());
    let back = summary(&out).expect("a hash");
    let r = Plait::start_in(Store::Embedded, dir3.path(), &[]);
    check_some(r.addr).await;
    assert_eq!(
        wire::send(r.addr, "GET", "/after", &[], b"").await.text(),
        "on postgres"
    );
    assert_eq!(back.len(), 64);
}

/// `--keys` carries what an owner with devices holds beside its key: the retired seal
/// keys (a device was revoked, so the key it held was retired) and `devices.json`;
/// `plait restore` puts them back, 0600. Without `--keys` only `devices.json` travels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_keys_carry_retired_seal_keys_and_devices() {
    use plait_tests::mirror::{ok, p2p_plait, put};
    use std::os::unix::fs::PermissionsExt;

    let m = p2p_plait(Store::Embedded);
    let o = p2p_plait(Store::Embedded);
    let oid = ok(&o, &["keygen"]).lines().last().unwrap().trim().to_string();
    ok(&m, &["mirror", "grant", &oid, "--quota", "10MiB"]);
    put(&o, "/before", "text/plain", b"sealed before the revocation").await;
    let invite = ok(&m, &["invite"]).lines().last().unwrap().trim().to_string();
    ok(&o, &["mirror", "add", &invite]);
    let linked = ok(&o, &["device", "link"]);
    let device = linked.split_whitespace().nth(1).unwrap().to_string();
    let said = ok(&o, &["device", "revoke", &device]);
    assert!(said.contains("retired"), "{said}");
    let retired: Vec<String> = std::fs::read_dir(o.data_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("seal-key-retired-"))
        .collect();
    assert_eq!(retired.len(), 1, "{retired:?}");
    let carried = [
        retired[0].as_str(),
        "seal-key.txt",
        "identity.pem",
        "devices.json",
    ];

    let scratch = tempfile::tempdir().unwrap();
    for keys in [true, false] {
        let file = scratch.path().join(format!("keys-{keys}.backup"));
        let mut list = vec!["backup"];
        if keys {
            list.push("--keys");
        }
        list.push(file.to_str().unwrap());
        let (done, out, err) = plait(args(&list, o.data_dir(), &Store::Embedded)).await;
        assert!(done, "backup failed: {out}\n{err}");
        let dir2 = tempfile::tempdir().unwrap();
        if !keys {
            std::fs::copy(
                o.data_dir().join("identity.pem"),
                dir2.path().join("identity.pem"),
            )
            .unwrap();
        }
        let (done, out, err) = plait(args(
            &["restore", file.to_str().unwrap()],
            dir2.path(),
            &Store::Embedded,
        ))
        .await;
        assert!(done, "restore failed: {out}\n{err}");
        for name in carried {
            let restored = dir2.path().join(name);
            let travels = keys || name == "devices.json" || name == "identity.pem";
            assert_eq!(restored.exists(), travels, "{name}, --keys {keys}");
            if travels {
                assert_eq!(
                    std::fs::read(&restored).unwrap(),
                    std::fs::read(o.data_dir().join(name)).unwrap(),
                    "{name} restored as it was"
                );
                let mode = std::fs::metadata(&restored).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{name}");
            }
        }
        // The restored owner knows its device as revoked.
        let devices: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir2.path().join("devices.json")).unwrap()).unwrap();
        assert!(devices["devices"][&device]["revoked_ms"].is_u64(), "{devices}");
    }
}
