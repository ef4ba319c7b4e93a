//! Speed bumps: writes per second per client, stored bytes per namespace. Refusals are
//! 429/507 with a machine-readable reason (and Retry-After for 429), store nothing, and the
//! limits are published at the status resource.

use std::time::Duration;

use plait_tests::plait::{Plait, Store};
use plait_tests::wire;

#[tokio::test]
async fn writes_per_second_per_client() {
    let p = Plait::start_with_env(
        Store::Embedded,
        &[],
        &[
            ("PLAIT_LIMITS__WRITES_PER_SECOND", "2"),
            ("PLAIT_LIMITS__WRITE_BURST", "5"),
        ],
    );
    for n in 1..=5 {
        let r = wire::send(
            p.addr,
            "PUT",
            "/r",
            &[("Content-Type", "application/json")],
            format!("{n}").as_bytes(),
        )
        .await;
        assert_eq!(r.status, 200, "write {n} is within the burst");
    }
    let asked = std::time::Instant::now();
    let r = wire::send(p.addr, "PUT", "/r", &[("Content-Type", "application/json")], b"6").await;
    assert_eq!(r.status, 429);
    // Held before it is sent (`limits.rate_limited_delay_ms`, 1 s by default), so a client
    // asking again at once asks about once a second. (A lower bound: a slow machine
    // cannot make it fail.)
    assert!(
        asked.elapsed() >= Duration::from_millis(1000),
        "the 429 was not held"
    );
    assert_eq!(r.header("plait-error"), Some("rate-limited"));
    let retry: u64 = r.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After: {retry}");
    assert_eq!(
        wire::send(p.addr, "GET", "/r", &[], b"").await.text(),
        "5",
        "the refused write stored nothing"
    );
    // Reads are not limited, and the bucket refills.
    for _ in 0..20 {
        assert_eq!(wire::send(p.addr, "GET", "/r", &[], b"").await.status, 200);
    }
    tokio::time::sleep(Duration::from_secs(retry)).await;
    let r = wire::send(p.addr, "PUT", "/r", &[("Content-Type", "application/json")], b"7").await;
    assert_eq!(r.status, 200);
    let info: serde_json::Value = serde_json::from_slice(
        &wire::send(p.addr, "GET", "/.well-known/plait", &[], b"")
            .await
            .body,
    )
    .unwrap();
    assert_eq!(info["limits"]["writes_per_second"], 2);
    assert_eq!(info["limits"]["write_burst"], 5);
    assert_eq!(info["limits"]["rate_limited_delay_ms"], 1000);
}

#[tokio::test]
async fn stored_bytes_per_namespace() {
    let p = Plait::start_with_env(
        Store::Embedded,
        &[],
        &[("PLAIT_LIMITS__MAX_STORED_BYTES_PER_NAMESPACE", "3000")],
    );
    let r = wire::send(
        p.addr,
        "PUT",
        "/a.bin",
        &[("Content-Type", "application/octet-stream")],
        &[1; 1500],
    )
    .await;
    assert_eq!(r.status, 200);
    let r = wire::send(
        p.addr,
        "PUT",
        "/b.bin",
        &[("Content-Type", "application/octet-stream")],
        &[2; 1600],
    )
    .await;
    assert_eq!(r.status, 507, "{}", r.text());
    assert_eq!(r.header("plait-error"), Some("quota-exceeded"));
    assert!(r.text().contains("max_stored_bytes_per_namespace"));
    assert_eq!(
        wire::send(p.addr, "GET", "/b.bin", &[("Accept", "application/json")], b"")
            .await
            .status,
        404,
        "nothing stored"
    );
    // Freeing space lets writes in again (usage is re-read within a second).
    assert_eq!(wire::send(p.addr, "DELETE", "/a.bin", &[], b"").await.status, 204);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = wire::send(
        p.addr,
        "PUT",
        "/b.bin",
        &[("Content-Type", "application/octet-stream")],
        &[2; 1600],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let info: serde_json::Value = serde_json::from_slice(
        &wire::send(p.addr, "GET", "/.well-known/plait", &[], b"")
            .await
            .body,
    )
    .unwrap();
    assert_eq!(info["limits"]["max_stored_bytes_per_namespace"], 3000);
    assert_eq!(info["limits"]["max_body_bytes"], 10 * 1024 * 1024);
    assert!(info["limits"]["max_streams_per_connection"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn deletes_count_against_the_writer_rate() {
    let p = Plait::start_with_env(
        Store::Embedded,
        &[],
        &[
            ("PLAIT_LIMITS__WRITES_PER_SECOND", "1"),
            ("PLAIT_LIMITS__WRITE_BURST", "3"),
        ],
    );
    for n in 0..3 {
        let r = wire::send(p.addr, "DELETE", &format!("/gone/{n}"), &[], b"").await;
        assert_eq!(r.status, 404, "delete {n} is within the burst");
    }
    let r = wire::send(p.addr, "DELETE", "/gone/3", &[], b"").await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.header("retry-after").is_some());
}

/// Bytes written count per writer too (`write_bytes_per_second`, `write_bytes_burst`): a
/// writer of big values is slowed with a 429 naming that limit while small writes of its
/// own, other writers and the owner go on; the setting is published; a burst smaller than
/// the largest body is refused at start.
#[tokio::test]
async fn bytes_written_per_second_per_client() {
    let p = Plait::start_with_env(
        Store::Embedded,
        &[],
        &[
            ("PLAIT_LIMITS__WRITE_BYTES_PER_SECOND", "65536"),
            ("PLAIT_LIMITS__WRITE_BYTES_BURST", "131072"),
            ("PLAIT_LIMITS__MAX_BODY_BYTES", "131072"),
        ],
    );
    let big = vec![7u8; 100 << 10];
    let put = |path: &'static str, auth: Option<(&'static str, String)>| {
        let (addr, big) = (p.addr, big.clone());
        async move {
            let mut h = vec![("Content-Type", "application/octet-stream")];
            if let Some((k, v)) = &auth {
                h.push((k, v.as_str()));
            }
            wire::send(addr, "PUT", path, &h, &big).await
        }
    };
    assert_eq!(put("/big/1", None).await.status, 200, "within the burst");
    let r = put("/big/2", None).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("plait-error"), Some("rate-limited"));
    assert!(r.text().contains("limits.write_bytes_per_second"), "{}", r.text());
    let retry: u64 = r.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!((1..=3).contains(&retry), "Retry-After: {retry}");
    assert_eq!(
        wire::send(p.addr, "GET", "/big/2", &[("Accept", "application/json")], b"")
            .await
            .status,
        404,
        "the refused write stored nothing"
    );
    // A small write still fits what is left of the bucket.
    let r = wire::send(
        p.addr,
        "PUT",
        "/small",
        &[("Content-Type", "application/json")],
        b"1",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The owner's bytes are not counted.
    for _ in 0..3 {
        let r = put("/big/owner", Some(p.owner_auth())).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(put("/big/3", None).await.status, 200, "the bucket refills");
    let info: serde_json::Value = serde_json::from_slice(
        &wire::send(p.addr, "GET", "/.well-known/plait", &[], b"")
            .await
            .body,
    )
    .unwrap();
    assert_eq!(info["limits"]["write_bytes_per_second"], 65536);
    assert_eq!(info["limits"]["write_bytes_burst"], 131072);

    // A burst smaller than the largest body could never let such a body in: refused at
    // start, naming both settings.
    let out = std::process::Command::new(plait_tests::plait::binary())
        .args(["serve", "--no-p2p", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tempfile::tempdir().unwrap().path())
        .env("PLAIT_LIMITS__WRITE_BYTES_BURST", "1000")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("limits.write_bytes_burst") && err.contains("limits.max_body_bytes"),
        "{err}"
    );
}

/// What applying a writer's writes costs the server's CPU is limited too
/// (`document_work_ms_per_second`, `document_work_burst_ms`): a client whose big text
/// write took more than its share of document work is refused, naming that limit, until
/// it has paid it off, and nothing of the refused write is stored; the owner writes on;
/// the settings are published.
#[tokio::test]
async fn document_work_per_writer() {
    let p = Plait::start_with_env(
        Store::Embedded,
        &[],
        &[
            ("PLAIT_LIMITS__DOCUMENT_WORK_MS_PER_SECOND", "10"),
            ("PLAIT_LIMITS__DOCUMENT_WORK_BURST_MS", "0"),
        ],
    );
    let text = |path: &'static str, body: Vec<u8>, auth: Option<(&'static str, String)>| {
        let addr = p.addr;
        async move {
            let mut h = vec![("Content-Type", "text/plain")];
            if let Some((k, v)) = &auth {
                h.push((k, v.as_str()));
            }
            wire::send(addr, "PUT", path, &h, &body).await
        }
    };
    // 256 KiB of new text is a quarter of a million automerge ops: tens of milliseconds
    // of work at least, seconds to pay off at 10 ms a second.
    // Three sent at once to one resource all pass the check made before they are queued;
    // its actor asks again before applying each, so only the first is made.
    let answers =
        futures::future::join_all((0..3).map(|_| text("/novel", vec![b'x'; 256 << 10], None))).await;
    let mut statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
    statuses.sort();
    assert_eq!(
        statuses,
        [200, 429, 429],
        "a fresh writer's first write passes, once"
    );
    let r = text("/note", b"hello".to_vec(), None).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("plait-error"), Some("rate-limited"));
    assert!(
        r.text().contains("limits.document_work_ms_per_second"),
        "{}",
        r.text()
    );
    let retry: u64 = r.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!(retry >= 2, "Retry-After: {retry}");
    let got = wire::send(p.addr, "GET", "/note", &[("Accept", "application/json")], b"").await;
    assert_eq!(got.status, 404, "the refused write stored nothing");
    let r = text("/note", b"from the owner".to_vec(), Some(p.owner_auth())).await;
    assert_eq!(r.status, 200, "the owner's work is not counted: {}", r.text());
    let info: serde_json::Value = serde_json::from_slice(
        &wire::send(p.addr, "GET", "/.well-known/plait", &[], b"")
            .await
            .body,
    )
    .unwrap();
    assert_eq!(info["limits"]["document_work_ms_per_second"], 10);
    assert_eq!(info["limits"]["document_work_burst_ms"], 0);
}

/// Reading past versions of a big document is document work too, charged to the reader:
/// a stranger's catch-up from an old version (`Parents`), read of an old version
/// (`Version`) or subscription from one is refused while it owes more than the burst, also
/// when it sent several at once; the owner reads on.
#[tokio::test]
async fn reading_past_versions_is_document_work() {
    let p = Plait::start_with_env(
        Store::Embedded,
        &[],
        &[
            ("PLAIT_LIMITS__DOCUMENT_WORK_MS_PER_SECOND", "10"),
            ("PLAIT_LIMITS__DOCUMENT_WORK_BURST_MS", "0"),
        ],
    );
    // 256 KiB of text from the owner (not counted), stored as four runs of 65,536
    // characters: `w-65535` is the first run's end.
    let (k, v) = p.owner_auth();
    let h = [("Content-Type", "text/plain"), ("Peer", "w"), (k, v.as_str())];
    let r = wire::send(p.addr, "PUT", "/paper", &h, &vec![b'x'; 256 << 10]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Four catch-ups sent at once all pass the check made before they are queued; the
    // resource's actor asks again before each, so only the first is made.
    let old = [("Parents", "\"w-65535\"")];
    let answers =
        futures::future::join_all((0..4).map(|_| wire::send(p.addr, "GET", "/paper", &old, b""))).await;
    let mut statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
    statuses.sort();
    assert_eq!(
        statuses,
        [209, 429, 429, 429],
        "a stranger's first catch-up is answered, once"
    );
    for (what, h) in [
        ("a catch-up", ("Parents", "\"w-65535\"")),
        ("an old version", ("Version", "\"w-1000\"")),
    ] {
        let r = wire::send(p.addr, "GET", "/paper", &[h], b"").await;
        assert_eq!(r.status, 429, "{what}: {}", r.text());
        assert!(
            r.text().contains("limits.document_work_ms_per_second"),
            "{}",
            r.text()
        );
    }
    let sub = [("Subscribe", "true"), ("Parents", "\"w-65535\"")];
    let r = wire::send(p.addr, "GET", "/paper", &sub, b"").await;
    assert_eq!(r.status, 429, "a subscription from an old version: {}", r.text());
    // The current version costs no document work; the owner is not counted.
    let r = wire::send(p.addr, "GET", "/paper", &[], b"").await;
    assert_eq!((r.status, r.body.len()), (200, 256 << 10));
    let r = wire::send(p.addr, "GET", "/paper", &[old[0], (k, v.as_str())], b"").await;
    assert_eq!(r.status, 209, "{}", r.text());
}

/// Per-address limits count an IPv6 client by its /64, which it may pick addresses from
/// at will: writes from two addresses of one /64 share a budget, and another /64 has its
/// own. The server and the clients (curl, bound to each address) run in a network
/// namespace of the test's, with the addresses on its loopback.
#[test]
fn an_ipv6_64_is_one_writer() {
    let net = plait_tests::netns::NetNs::new("v6");
    let [a1, a2, b1] = ["2001:db8:1::a", "2001:db8:1::b", "2001:db8:2::a"];
    for a in [a1, a2, b1] {
        let ok = std::process::Command::new("ip")
            .args([
                "-n",
                &net.name,
                "addr",
                "add",
                &format!("{a}/128"),
                "dev",
                "lo",
                "nodad",
            ])
            .status()
            .unwrap();
        assert!(ok.success(), "ip addr add {a}");
    }
    let p = Plait::start_at_with_env(
        Store::Embedded,
        "[::]:0",
        Some(&net.name),
        &[],
        &[
            ("PLAIT_LIMITS__WRITES_PER_SECOND", "1"),
            ("PLAIT_LIMITS__WRITE_BURST", "1"),
        ],
    );
    let put = |from: &str, path: &str| -> String {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &net.name,
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .args([
                "--interface",
                from,
                "-X",
                "PUT",
                "-H",
                "Content-Type: application/json",
            ])
            .args(["--data", "1", &format!("http://[{a1}]:{}{path}", p.addr.port())])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(put(a1, "/one"), "200");
    assert_eq!(
        put(a2, "/two"),
        "429",
        "another address of the same /64 shares its budget"
    );
    assert_eq!(put(b1, "/three"), "200", "another /64 has its own");
}

/// A client sending malformed requests in a loop is answered at once up to
/// `bad_requests_per_second_per_address`, then each answer waits
/// `rate_limited_delay_ms`; the answer itself is unchanged, and the limit is published.
#[tokio::test]
async fn bad_requests_in_a_loop_are_answered_slowly() {
    let p = Plait::start_with_env(
        Store::Embedded,
        &[],
        &[("PLAIT_LIMITS__BAD_REQUESTS_PER_SECOND_PER_ADDRESS", "3")],
    );
    let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
    let started = std::time::Instant::now();
    for n in 0..5 {
        let r = wire::send(
            p.addr,
            "PUT",
            "/deep",
            &[("Content-Type", "application/json")],
            deep.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 400, "bad request {n}: {}", r.text());
    }
    // Three at once, then the fourth held a second (a lower bound: a slow machine cannot
    // make this fail); meanwhile the bucket refilled, so a client in a loop gets about
    // the budget a second, whatever it sends.
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    let info: serde_json::Value = serde_json::from_slice(
        &wire::send(p.addr, "GET", "/.well-known/plait", &[], b"")
            .await
            .body,
    )
    .unwrap();
    assert_eq!(info["limits"]["bad_requests_per_second_per_address"], 3);
}

/// An account's or identity's resources may occupy `max_stored_bytes_per_identity`; past it
/// its writes are 507 naming the limit, while other accounts, anonymous writers and the
/// owner still write; deleting frees the room again.
async fn an_identity_has_a_storage_quota(store: Store) {
    let p = Plait::start_with_env(
        store,
        &[],
        &[("PLAIT_LIMITS__MAX_STORED_BYTES_PER_IDENTITY", "20000")],
    );
    let alice = p.login("alice", "pw-a", true).await;
    let bob = p.login("bob", "pw-b", true).await;
    let put = |path: String, cookie: Option<String>| {
        let addr = p.addr;
        async move {
            let mut h = vec![("Content-Type", "application/octet-stream")];
            if let Some(c) = &cookie {
                h.push(("Cookie", c.as_str()));
            }
            wire::send(addr, "PUT", &path, &h, &[7; 4000]).await
        }
    };
    let mut refused = None;
    for i in 0..10 {
        let r = put(format!("/alice/{i}"), Some(alice.clone())).await;
        if r.status != 200 {
            refused = Some((i, r));
            break;
        }
    }
    let (i, r) = refused.expect("alice is cut off within 10 × 4,000 bytes");
    assert!((4..=5).contains(&i), "refused at write {i}");
    assert_eq!(r.status, 507, "{}", r.text());
    assert_eq!(r.header("plait-error"), Some("identity-quota-exceeded"));
    assert!(r.text().contains("max_stored_bytes_per_identity"), "{}", r.text());
    let missing = wire::send(
        p.addr,
        "GET",
        &format!("/alice/{i}"),
        &[("Accept", "application/json")],
        b"",
    )
    .await;
    assert_eq!(missing.status, 404, "nothing stored");
    // The refusal is published, by its code, with the limits.
    let status = wire::send(p.addr, "GET", "/.well-known/plait", &[], b"").await;
    let status: serde_json::Value = serde_json::from_slice(&status.body).unwrap();
    assert_eq!(status["refusals"]["identity-quota-exceeded"], 1, "{status}");
    assert_eq!(status["limits"]["max_stored_bytes_per_identity"], 20000);
    // Others are not held back by alice's use.
    assert_eq!(put("/bob/0".into(), Some(bob)).await.status, 200);
    assert_eq!(put("/anon/0".into(), None).await.status, 200);
    let (k, v) = p.owner_auth();
    for n in 0..8 {
        let r = wire::send(
            p.addr,
            "PUT",
            &format!("/owner/{n}"),
            &[(k, v.as_str())],
            &[1; 4000],
        )
        .await;
        assert_eq!(r.status, 200, "the owner has no identity quota");
    }
    // Deleting frees alice's room (once the usage figure is read again).
    let h = [("Cookie", alice.as_str())];
    for n in 0..i {
        assert_eq!(
            wire::send(p.addr, "DELETE", &format!("/alice/{n}"), &h, b"")
                .await
                .status,
            204
        );
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(put("/alice/again".into(), Some(alice)).await.status, 200);
}

plait_tests::on_both_stores!(an_identity_has_a_storage_quota);
