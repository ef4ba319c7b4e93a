//! `plait serve` under a service manager: systemd's notify protocol spoken to a socket the
//! test holds (readiness, watchdog, reload, stopping), SIGHUP reading the settings again
//! without stopping, and the shipped unit checked by `systemd-analyze verify`; the
//! container file checked against what the build reads (and built where podman or docker
//! is installed).

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

/// The repository root.
fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// What the server's build reads from outside its crate: every workspace member's
/// manifest and sources, and the directories the server embeds (`#[folder]`,
/// `embed_migrations!`), as paths from the repository root.
fn build_inputs(root: &std::path::Path) -> Vec<String> {
    let mut out = vec!["Cargo.toml".to_string(), "Cargo.lock".to_string()];
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members = manifest
        .lines()
        .find_map(|l| l.strip_prefix("members = "))
        .expect("workspace members");
    for m in members.trim_matches(['[', ']']).split(',') {
        let m = m.trim().trim_matches('"');
        out.push(format!("{m}/Cargo.toml"));
        out.push(format!("{m}/src"));
    }
    let walk = walkdir(root.join("server/src"));
    for file in walk {
        let text = std::fs::read_to_string(&file).unwrap();
        for (open, close) in [("#[folder = \"", "\""), ("embed_migrations!(\"", "\"")] {
            for piece in text.split(open).skip(1) {
                let rel = piece.split(close).next().unwrap();
                let path = root.join("server").join(rel);
                let path = path
                    .canonicalize()
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let from_root = path.strip_prefix(root.canonicalize().unwrap()).unwrap();
                out.push(from_root.to_string_lossy().trim_end_matches('/').to_string());
            }
        }
    }
    out
}

fn walkdir(dir: std::path::PathBuf) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walkdir(p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

#[test]
fn the_container_file_copies_what_the_build_reads() {
    let root = repo();
    let file = std::fs::read_to_string(root.join("server/deploy/Containerfile")).unwrap();
    // Its stages: the lines from each `FROM` to the next.
    let mut stages: Vec<String> = Vec::new();
    for line in file.lines() {
        if line.starts_with("FROM ") {
            stages.push(String::new());
        }
        if let Some(stage) = stages.last_mut() {
            stage.push_str(line);
            stage.push('\n');
        }
    }
    assert_eq!(stages.len(), 2, "a build stage and a small run stage");
    // What the build stage copies in (`COPY SRC... DST`).
    let copied: Vec<String> = stages[0]
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .flat_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            parts[..parts.len() - 1]
                .iter()
                .map(|s| s.trim_end_matches('/').to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    for need in build_inputs(&root) {
        assert!(
            copied
                .iter()
                .any(|c| need == *c || need.starts_with(&format!("{c}/"))),
            "the Containerfile's build stage does not copy {need} (it copies {copied:?})"
        );
    }
    assert!(file.contains("\nCOPY web/dashboard"), "the dashboard is embedded");
    // The run stage: not root, the data dir a volume.
    let run = &stages[1];
    assert!(
        run.lines().any(|l| l.starts_with("USER ") && !l.contains("root")),
        "{run}"
    );
    assert!(
        run.contains("VOLUME /data") && run.contains("PLAIT_DATA_DIR=/data"),
        "{run}"
    );
    assert!(!run.contains("cargo"), "no toolchain in the image");

    // Where a container engine runs and has the base images (or PLAIT_BUILD_CONTAINER=1
    // says it may pull them), build it for real.
    let ok = |tool: &str, args: &[&str]| {
        Command::new(tool)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let bases: Vec<&str> = stages
        .iter()
        .filter_map(|s| s.strip_prefix("FROM ")?.split_whitespace().next())
        .collect();
    let tool = ["podman", "docker"].into_iter().find(|t| {
        ok(t, &["info"])
            && (std::env::var_os("PLAIT_BUILD_CONTAINER").is_some()
                || bases.iter().all(|b| ok(t, &["image", "inspect", b])))
    });
    let Some(tool) = tool else {
        eprintln!("no container engine with {bases:?} here: the image is not built");
        return;
    };
    let out = Command::new(tool)
        .args([
            "build",
            "-f",
            "server/deploy/Containerfile",
            "-t",
            "plait-test",
            ".",
        ])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{tool} build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every shell script the repository ships or runs (found by `git ls-files` and its
/// `#!` line) parses: a lost `;;` in one `case` arm breaks every workload of the script,
/// not only its own.
#[test]
fn every_shell_script_parses() {
    let root = repo();
    let files = std::process::Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(&root)
        .output()
        .expect("git runs");
    assert!(files.status.success(), "git ls-files");
    let mut checked = Vec::new();
    for name in files.stdout.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let path = root.join(String::from_utf8_lossy(name).as_ref());
        let Ok(head) = std::fs::read(&path) else { continue };
        let first = head.split(|b| *b == b'\n').next().unwrap_or_default();
        if !(first.starts_with(b"#!") && (first.ends_with(b"bash") || first.ends_with(b"/sh"))) {
            continue;
        }
        let out = std::process::Command::new("bash")
            .arg("-n")
            .arg(&path)
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "{} does not parse: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked.push(path);
    }
    assert!(
        checked.iter().any(|p| p.ends_with("tests/load/run"))
            && checked.iter().any(|p| p.ends_with(".ci/run")),
        "the scripts were found: {checked:?}"
    );
}
