//! Speed bumps: writes per second per client, stored bytes per namespace. Refusals are
//! 429/413 with a machine-readable reason (and Retry-After for 429), store nothing, and the
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
    let r = wire::send(p.addr, "PUT", "/r", &[("Content-Type", "application/json")], b"6").await;
    assert_eq!(r.status, 429);
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
    assert_eq!(r.status, 413, "{}", r.text());
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
