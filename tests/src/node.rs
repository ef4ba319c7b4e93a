//! Runs the real JavaScript clients in `tests/clients` (installed from npm by `tests/run`).

use std::path::PathBuf;
use std::process::Command;

/// `tests/clients`.
pub fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients")
}

/// Runs `node <script> <args…>` in `tests/clients`; panics with its output unless it exits 0.
pub fn run(script: &str, args: &[&str]) -> String {
    run_with_env(script, args, &[])
}

/// [`run`] with extra environment variables (e.g. `NODE_EXTRA_CA_CERTS`).
pub fn run_with_env(script: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = clients_dir();
    assert!(
        dir.join("node_modules").exists(),
        "{}/node_modules is missing: run `npm ci` there (tests/run does)",
        dir.display()
    );
    let out = Command::new("node")
        .arg(dir.join(script))
        .args(args)
        .current_dir(&dir)
        .envs(env.iter().copied())
        .output()
        .expect("node runs (Node.js 20 is needed for the client tests)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "node {script} failed:\n{text}");
    text
}
