//! The `plait` command line: identity, settings layers, and refusals at start-up.

use std::process::Command;

use plait_tests::plait::{Plait, Store, binary};
use plait_tests::wire;

#[test]
fn keygen_prints_the_identity_the_server_uses() {
    let p = Plait::start(Store::Embedded);
    let out = Command::new(binary())
        .arg("keygen")
        .arg("--data-dir")
        .arg(p.data_dir())
        .output()
        .unwrap();
    assert!(out.status.success());
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(serde_json::Value::String(id.clone()), p.well_known()["id"]);
    // The key file is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(p.data_dir().join("identity.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // The log names the identity and the address.
    assert!(p.log().contains(&id));
    assert!(p.log().contains(&format!("listening on http://{}", p.addr)));
}

#[test]
fn config_file_then_environment_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("plait.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:1\"\n[limits]\nmax_body_bytes = 1000\nmax_connections = 50\n",
    )
    .unwrap();
    let mut child = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--public-writes", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("PLAIT_LIMITS__MAX_CONNECTIONS", "77")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let line = std::io::BufRead::lines(std::io::BufReader::new(stderr))
        .map_while(Result::ok)
        .find(|l| l.contains("listening on http://"))
        .expect("listening line");
    let addr: std::net::SocketAddr = line.split("http://").nth(1).unwrap().trim().parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(
        &rt.block_on(wire::send(addr, "GET", "/.well-known/plait", &[], b""))
            .body,
    )
    .unwrap();
    assert_eq!(info["limits"]["max_body_bytes"], 1000, "from the file");
    assert_eq!(
        info["limits"]["max_connections"], 77,
        "the environment beats the file"
    );
    let r = rt.block_on(wire::send(addr, "PUT", "/x", &[], &[b'a'; 1001]));
    assert_eq!(r.status, 413);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn start_up_refusals_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    // A typo in the config file.
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[limits]\nmax_body_byts = 1\n").unwrap();
    let out = Command::new(binary())
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_body_byts"));
    // A second server on the same embedded store.
    let p = Plait::start(Store::Embedded);
    let out = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(p.data_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another plait server is using"));
    // An address that cannot be bound.
    let out = Command::new(binary())
        .args(["serve", "--listen", &p.addr.to_string(), "--data-dir"])
        .arg(dir.path().join("other"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("listening on"));
}

#[test]
fn a_database_belongs_to_one_identity() {
    let url = plait_tests::pg::fresh_database();
    let mut a = Plait::start(Store::Postgres(url.clone()));
    a.terminate();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &url,
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("belongs to instance"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn serve_with_no_arguments_uses_the_default_data_dir() {
    // A fresh HOME stands for a fresh machine.
    let home = tempfile::tempdir().unwrap();
    let mut child = Command::new(binary())
        .arg("serve")
        .env("HOME", home.path())
        .env_remove("XDG_DATA_HOME")
        .env("PLAIT_LISTEN", "127.0.0.1:0")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let found = std::io::BufRead::lines(std::io::BufReader::new(stderr))
        .map_while(Result::ok)
        .any(|l| l.contains("listening on http://"));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(found);
    assert!(home.path().join(".local/share/plait/identity.pem").exists());
    assert!(home.path().join(".local/share/plait/plait.db").exists());
}
