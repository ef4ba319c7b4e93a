//! The microblog demo (`web/demo`) in Chromium across two instances joined in one network,
//! one browser context per instance (`tests/clients/demo_app.js`): a post on one appears
//! live on the other through federation, a reply shows under its post on both. The last
//! screen is saved; with `PLAIT_UPDATE_SCREENSHOTS=1` over `docs/demo.png`, which the
//! README shows.

use std::path::PathBuf;
use std::process::Command;

use plait_tests::plait::{Plait, Store, binary};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

/// An instance serving the demo, with its p2p node on loopback; only its owner writes (the
/// default, which the test harness otherwise turns off).
fn instance(web: &str) -> Plait {
    Plait::start_with_env(
        Store::Embedded,
        &[
            "--web-dir",
            web,
            "--p2p-listen",
            "/ip4/127.0.0.1/tcp/0",
            "--p2p-listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
        ],
        &[("PLAIT_ACCESS__PUBLIC_WRITES", "false")],
    )
}

/// `plait <args> --data-dir <p's dir>`: what it printed, once it succeeded.
fn cli(p: &Plait, args: &[&str]) -> String {
    let out = Command::new(binary())
        .args(args)
        .arg("--data-dir")
        .arg(p.data_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "plait {args:?} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn a_post_on_one_instance_appears_live_on_the_other() {
    let web = repo().join("web/demo");
    assert!(
        web.join("node_modules/braid-http").exists(),
        "{}/node_modules is missing: run `npm ci` there (tests/run does)",
        web.display()
    );
    let web = web.to_str().unwrap().to_string();
    let a = instance(&web);
    let b = instance(&web);
    let link = cli(&a, &["invite"]);
    cli(&b, &["join", &link]);
    let scratch = tempfile::tempdir().unwrap();
    let shot = if std::env::var_os("PLAIT_UPDATE_SCREENSHOTS").is_some() {
        repo().join("docs/demo.png")
    } else {
        scratch.path().join("demo.png")
    };
    let (url_a, url_b) = (a.url(""), b.url(""));
    let (token_a, token_b) = (a.owner_token(), b.owner_token());
    let out = plait_tests::node::run(
        "demo_app.js",
        &[&url_a, &token_a, &url_b, &token_b, shot.to_str().unwrap()],
    );
    assert!(out.contains("ok:"), "{out}");
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "a screenshot");
}
