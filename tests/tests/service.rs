//! `plait serve` under a service manager: systemd's notify protocol spoken to a socket the
//! test holds (readiness, watchdog, reload, stopping), SIGHUP reading the settings again
//! without stopping, and the shipped unit checked by `systemd-analyze verify`.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use plait_tests::plait::{Plait, Store, binary};
use plait_tests::wire;

/// Receives notify messages until one contains `want` (each message is one datagram of
/// `KEY=VALUE` lines); returns every message seen.
fn until(sock: &UnixDatagram, want: &str, within: Duration) -> Vec<String> {
    let end = Instant::now() + within;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        sock.set_read_timeout(Some(
            end.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = m.lines().any(|l| l == want);
                seen.push(m);
                if done {
                    return seen;
                }
            }
            Err(_) => break,
        }
    }
    panic!("no {want} within {within:?}; got {seen:?}");
}

fn signal(p: &Plait, sig: &str) {
    let pid = p.pid().expect("running").to_string();
    assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_protocol_reload_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let config = dir.path().join("plait.toml");
    std::fs::write(&config, "[limits]\nmax_body_bytes = 1000000\n").unwrap();
    let mut p = Plait::start_with_env(
        Store::Embedded,
        &["--config", config.to_str().unwrap()],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let seen = until(&sock, "READY=1", Duration::from_secs(10));
    assert!(
        seen.iter().any(|m| m.contains("STATUS=listening on http://")),
        "a status line with readiness: {seen:?}"
    );
    // Fed every 200 ms.
    until(&sock, "WATCHDOG=1", Duration::from_secs(2));
    until(&sock, "WATCHDOG=1", Duration::from_secs(2));

    // SIGHUP with a changed setting: reloading, ready again, told what applies when,
    // still serving.
    std::fs::write(&config, "[limits]\nmax_body_bytes = 2000000\n").unwrap();
    signal(&p, "-HUP");
    let seen = until(&sock, "RELOADING=1", Duration::from_secs(5));
    assert!(seen.last().unwrap().contains("MONOTONIC_USEC="), "{seen:?}");
    until(&sock, "READY=1", Duration::from_secs(5));
    assert!(p.is_running(), "SIGHUP must not stop the server");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !p.log().contains("limits.max_body_bytes") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        p.log().contains("limits.max_body_bytes") && p.log().contains("applies at the next start"),
        "{}",
        p.log()
    );
    // A file that no longer loads changes nothing and is reported.
    std::fs::write(&config, "[limits]\nmax_body_byte = 5\n").unwrap();
    signal(&p, "-HUP");
    until(&sock, "READY=1", Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !p.log().contains("the settings do not load") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(p.log().contains("the settings do not load"), "{}", p.log());
    let r = wire::send(p.addr, "PUT", "/after-hup", &[], b"ok").await;
    assert!(r.status < 300, "still serving after SIGHUP: {}", r.status);

    // SIGTERM: STOPPING=1, then a clean exit.
    signal(&p, "-TERM");
    until(&sock, "STOPPING=1", Duration::from_secs(10));
    assert_eq!(p.terminate(), Some(0), "{}", p.log());
}

/// The shipped unit, with the binary under test as its ExecStart, passes
/// `systemd-analyze verify` without a warning.
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../server/deploy/plait.service"
    ))
    .unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec=") && unit.contains("User=plait"));
    assert!(unit.contains("ProtectSystem=strict") && unit.contains("StateDirectory=plait"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plait.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/plait", binary().to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian's systemd package; .ci/run installs it)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {err}"
    );
}
