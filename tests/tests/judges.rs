//! The outside judges (`../shared/conformance`: the real braid-http and statebus npm
//! clients, written for the reference servers, which let anyone write) against the real
//! binary: they pass on a server started with `--public-writes`, and without it their
//! anonymous writes are refused with 401.

use std::path::{Path, PathBuf};
use std::process::Command;

use plait_tests::plait::{Plait, Store};

/// `../shared/conformance/<name>`, copied to a temporary dir (the shared copy may be read
/// only) with its npm dependencies installed.
fn judge(name: &str) -> (tempfile::TempDir, PathBuf) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/conformance")
        .join(name);
    assert!(
        src.join("harness.js").exists(),
        "{} is missing: the judges live in ../shared beside the repository",
        src.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["harness.js", "package.json", "package-lock.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir)
        .output()
        .expect("npm runs");
    assert!(
        out.status.success(),
        "npm ci: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (tmp, dir)
}

/// Runs a judge; returns whether it passed and what it printed.
fn run(dir: &Path, args: &[String]) -> (bool, String) {
    let out = Command::new("node")
        .arg("harness.js")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("node runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_braid_judge_passes_with_public_writes_and_is_refused_without() {
    let (_tmp, dir) = judge("braid");
    let open = Plait::start_with(Store::Embedded, &["--public-writes"]);
    let (ok, text) = run(&dir, &[format!("--url=http://{}", open.addr)]);
    assert!(ok, "the braid judge failed with --public-writes:\n{text}");
    assert!(text.contains(" 0 failed"), "{text}");
    drop(open);
    let owned = Plait::start_with_env(Store::Embedded, &[], &[("PLAIT_ACCESS__PUBLIC_WRITES", "false")]);
    let (ok, text) = run(&dir, &[format!("--url=http://{}", owned.addr)]);
    assert!(!ok, "the braid judge's anonymous writes were accepted:\n{text}");
    assert!(
        text.contains("HTTP 401"),
        "its writes are refused with 401:\n{text}"
    );
}

#[test]
fn the_statebus_judge_passes_with_public_writes_and_is_refused_without() {
    let (_tmp, dir) = judge("statebus");
    let open = Plait::start_with(Store::Embedded, &["--public-writes"]);
    let (ok, text) = run(&dir, &["--url".into(), format!("http://{}", open.addr)]);
    assert!(ok, "the statebus judge failed with --public-writes:\n{text}");
    drop(open);
    let owned = Plait::start_with_env(Store::Embedded, &[], &[("PLAIT_ACCESS__PUBLIC_WRITES", "false")]);
    let (ok, text) = run(&dir, &["--url".into(), format!("http://{}", owned.addr)]);
    assert!(
        !ok,
        "the statebus judge's anonymous writes were accepted:\n{text}"
    );
    // Its HTTP writes get 401.
    assert!(text.contains("401"), "{text}");
}
