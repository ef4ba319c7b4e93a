//! The admin dashboard against the real `plait` binary.
//!
//! Over plain HTTP: every status resource is the owner's only (401 without a credential,
//! 403 for a limited token, the JSON document for an owner token), the status page links
//! the dashboard, a one-time link from `plait dashboard` is redeemed once for an owner
//! session cookie that reads the status resources, and a subscription to a status
//! resource gets a new version when another client subscribes to a resource, and ends
//! once its token is revoked. On both stores (owner sessions are kept in the store).
//!
//! In Chromium (`tests/clients/dashboard.js`, playwright-core, Debian's `/usr/bin/chromium`):
//! the page shows nothing without a credential, the link logs in once, another client's
//! subscription appears, a rule saved in the editor takes effect, and a screenshot is
//! taken (into `docs/dashboard.png` with `PLAIT_UPDATE_SCREENSHOTS=1`); the page's Braid reader
//! (`web/dashboard/braid.js`) alone in Node (`tests/clients/dashboard_braid.mjs`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use plait_tests::plait::{Plait, Store, binary};
use plait_tests::{node, on_both_stores, wire};

const SECTIONS: &[&str] = &[
    "overview", "live", "storage", "network", "mirrors", "tokens", "refusals", "all",
];

/// `plait dashboard --data-dir DIR --url URL`: the one-time link it prints.
fn login_link(p: &Plait) -> String {
    let out = Command::new(binary())
        .args(["dashboard", "--data-dir"])
        .arg(p.data_dir())
        .args(["--url", &p.url("")])
        .output()
        .expect("run plait dashboard");
    assert!(
        out.status.success(),
        "plait dashboard failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let link = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        link.starts_with(&p.url("/.well-known/plait/dashboard/#login=")),
        "{link}"
    );
    link
}

on_both_stores!(status_resources_are_the_owners_and_follow_the_server);

async fn status_resources_are_the_owners_and_follow_the_server(store: Store) {
    let p = Plait::start(store);
    let (k, v) = p.owner_auth();
    let owner = [(k, v.as_str())];
    let limited = format!("Bearer {}", p.token(&["--read", "/"]));

    // The status page links the dashboard and the status resources.
    let wk = wire::send(p.addr, "GET", "/.well-known/plait", &owner, b"").await;
    let wk: serde_json::Value = serde_json::from_slice(&wk.body).unwrap();
    assert_eq!(wk["dashboard"], "/.well-known/plait/dashboard/");
    assert_eq!(wk["status"].as_array().unwrap().len(), SECTIONS.len());
    assert_eq!(wk["dashboard_settings"]["status_interval_ms"], 250);
    assert_eq!(wk["access"]["owner_session_lifetime_secs"], 12 * 3600);

    for s in SECTIONS {
        let path = format!("/.well-known/plait/status/{s}");
        let r = wire::send(p.addr, "GET", &path, &[], b"").await;
        assert_eq!(r.status, 401, "{path} without a credential: {}", r.text());
        assert!(!r.text().contains("\"id\""), "{}", r.text());
        let r = wire::send(p.addr, "GET", &path, &[("Authorization", &limited)], b"").await;
        assert_eq!(r.status, 403, "{path} with a limited token: {}", r.text());
        let r = wire::send(p.addr, "GET", &path, &owner, b"").await;
        assert_eq!(r.status, 200, "{path} as the owner: {}", r.text());
        assert!(r.header("version").is_some(), "{path} has no Version");
        let doc: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert!(doc.is_object(), "{path}: {doc}");
    }
    let overview: serde_json::Value = serde_json::from_slice(
        &wire::send(p.addr, "GET", "/.well-known/plait/status/overview", &owner, b"")
            .await
            .body,
    )
    .unwrap();
    assert_eq!(overview["id"], wk["id"]);
    let r = wire::send(p.addr, "GET", "/.well-known/plait/status/nothing", &owner, b"").await;
    assert_eq!(r.status, 404);
    // The tokens section lists tokens, never their hashes.
    let tokens = wire::send(p.addr, "GET", "/.well-known/plait/status/tokens", &owner, b"").await;
    assert_eq!(tokens.status, 200);
    assert!(tokens.text().contains("\"owner\":true"), "{}", tokens.text());
    assert!(!tokens.text().contains("hash"), "{}", tokens.text());

    // The pages themselves are in the binary.
    let page = wire::send(p.addr, "GET", "/.well-known/plait/dashboard/", &[], b"").await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("app.js"), "{}", page.text());
    assert!(
        page.header("content-security-policy")
            .unwrap()
            .contains("default-src 'none'")
    );

    // A one-time link: redeemed once for a cookie that reads the status resources.
    let link = login_link(&p);
    let secret = link.split("login=").nth(1).unwrap();
    let login = "/.well-known/plait/dashboard/login";
    let r = wire::send(p.addr, "POST", login, &[], secret.as_bytes()).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let cookie = r.cookie("plait_owner").expect("an owner session cookie");
    let set = r.header("set-cookie").unwrap();
    assert!(
        set.contains("HttpOnly")
            && set.contains("SameSite=Strict")
            && set.contains("Path=/.well-known/plait;"),
        "{set}"
    );
    let again = wire::send(p.addr, "POST", login, &[], secret.as_bytes()).await;
    assert_eq!(again.status, 401, "a link works once: {}", again.text());
    let with_cookie = format!("plait_owner={cookie}");
    let r = wire::send(
        p.addr,
        "GET",
        "/.well-known/plait/status/live",
        &[("Cookie", &with_cookie)],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let forged = wire::send(
        p.addr,
        "GET",
        "/.well-known/plait/status/live",
        &[(
            "Cookie",
            "plait_owner=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        )],
        b"",
    )
    .await;
    assert_eq!(forged.status, 401, "{}", forged.text());
    // Logging out ends the session.
    let out = wire::send(
        p.addr,
        "POST",
        "/.well-known/plait/dashboard/logout",
        &[("Cookie", &with_cookie)],
        b"",
    )
    .await;
    assert_eq!(out.status, 204);
    let r = wire::send(
        p.addr,
        "GET",
        "/.well-known/plait/status/live",
        &[("Cookie", &with_cookie)],
        b"",
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.text());

    // A subscription to `live` gets a new version when another client subscribes.
    let put = wire::send(
        p.addr,
        "PUT",
        "/watched",
        &[owner[0], ("Content-Type", "application/json")],
        b"{}",
    )
    .await;
    assert!(put.status < 300, "{}", put.text());
    let mut live = wire::subscribe(
        p.addr,
        "/.well-known/plait/status/live",
        &[owner[0], ("Subscribe", "true")],
    )
    .await;
    assert_eq!(live.status, 209);
    let first = live
        .next_block(Duration::from_secs(5))
        .await
        .expect("the first version");
    assert!(first.header("version").is_some());
    let mut other = wire::subscribe(p.addr, "/watched", &[("Subscribe", "true")]).await;
    assert_eq!(other.status, 209);
    let _ = other.next_block(Duration::from_secs(5)).await;
    let shows = |b: &wire::Block| {
        let doc: serde_json::Value = serde_json::from_str(&b.body_text()).unwrap();
        doc["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["path"] == "/watched" && r["subscriptions"].as_u64() >= Some(1))
    };
    let mut seen = shows(&first);
    let give_up = std::time::Instant::now() + Duration::from_secs(20);
    while !seen {
        assert!(
            std::time::Instant::now() < give_up,
            "no version of `live` showed the other client's subscription"
        );
        let b = live
            .next_block(Duration::from_secs(10))
            .await
            .expect("a new version showing the other client's subscription");
        seen = shows(&b);
    }

    // A subscription ends once its credential no longer makes the owner.
    let second = p.token(&[]);
    let id = second.split('_').nth(1).expect("plait_<id>_<secret>").to_string();
    let bearer = format!("Bearer {second}");
    let mut watching = wire::subscribe(
        p.addr,
        "/.well-known/plait/status/live",
        &[("Authorization", &bearer), ("Subscribe", "true")],
    )
    .await;
    assert_eq!(watching.status, 209);
    watching
        .next_block(Duration::from_secs(5))
        .await
        .expect("the first version");
    let revoked = Command::new(binary())
        .args(["token", "--data-dir"])
        .arg(p.data_dir())
        .args(["--revoke", &id])
        .output()
        .unwrap();
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    // `live` changes (another subscriber comes); the revoked reader gets no more of it.
    let _third = wire::subscribe(p.addr, "/watched", &[("Subscribe", "true")]).await;
    assert!(
        watching.ended_within(Duration::from_secs(20)).await,
        "a status subscription outlived its revoked token"
    );
}

#[tokio::test]
async fn the_dashboard_in_chromium() {
    let p = Plait::start(Store::Embedded);
    let (k, v) = p.owner_auth();
    for path in ["/dash-watched", "/dash-secret"] {
        let r = wire::send(
            p.addr,
            "PUT",
            path,
            &[(k, v.as_str()), ("Content-Type", "application/json")],
            br#"{"note": "written by the test"}"#,
        )
        .await;
        assert!(r.status < 300, "{path}: {}", r.text());
    }
    let link = login_link(&p);
    // `PLAIT_UPDATE_SCREENSHOTS=1` refreshes the committed picture in docs/.
    let scratch = tempfile::tempdir().unwrap();
    let shot = match std::env::var_os("PLAIT_UPDATE_SCREENSHOTS") {
        Some(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/dashboard.png"),
        None => scratch.path().join("dashboard.png"),
    };
    let base = p.url("");
    let at = shot.clone();
    let out =
        tokio::task::spawn_blocking(move || node::run("dashboard.js", &[&base, &link, at.to_str().unwrap()]))
            .await
            .unwrap();
    assert!(out.contains("dashboard ok"), "{out}");
    let png = std::fs::read(&shot).expect("the screenshot was saved");
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
}

#[tokio::test]
async fn the_owner_makes_invite_links_from_the_dashboard() {
    let p = Plait::start_with(Store::Embedded, &["--p2p-listen", "/ip4/127.0.0.1/udp/0/quic-v1"]);
    let (k, v) = p.owner_auth();
    let path = "/.well-known/plait/dashboard/invite";
    let ask = br#"{"uses": 2, "ttl_secs": 600}"#;
    let r = wire::send(p.addr, "POST", path, &[("Content-Type", "application/json")], ask).await;
    assert_eq!(r.status, 401, "{}", r.text());
    let limited = format!("Bearer {}", p.token(&["--write", "/"]));
    let r = wire::send(p.addr, "POST", path, &[("Authorization", &limited)], ask).await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = wire::send(p.addr, "POST", path, &[(k, v.as_str())], ask).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let made: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert!(
        made["link"].as_str().unwrap().starts_with("plait-invite:"),
        "{made}"
    );
    assert_eq!(made["uses"], 2);
    // The overview says the node is on, and which network the link is for.
    let o = wire::send(
        p.addr,
        "GET",
        "/.well-known/plait/status/overview",
        &[(k, v.as_str())],
        b"",
    )
    .await;
    let o: serde_json::Value = serde_json::from_slice(&o.body).unwrap();
    assert_eq!(o["p2p"], true);
    assert!(
        o["invite"]["networks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| *n == made["dht"]),
        "{o}"
    );
}

/// The page's Braid reader splits blocks right however the stream is chunked.
#[test]
fn the_pages_braid_reader_splits_blocks_at_any_chunking() {
    let out = node::run("dashboard_braid.mjs", &[]);
    assert!(out.contains("braid.js ok"), "{out}");
}
