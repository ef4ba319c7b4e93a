//! Several `plait serve` processes on one Postgres: a subscriber on one sees, in order and
//! without loss, what is written through another — including creations and deletions — and
//! concurrent writers on both converge.

use std::time::Duration;

use plait_tests::plait::{Plait, Store};
use plait_tests::wire::{self, Block};

const T: Duration = Duration::from_secs(10);

fn json(b: &Block) -> serde_json::Value {
    serde_json::from_slice(b.body.as_deref().unwrap_or_default()).unwrap_or(serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_one_process_sees_every_write_made_through_another_in_order() {
    let a = Plait::start(Store::fresh_postgres());
    let b = Plait::start_sharing(&a, &[]);
    // Subscribed on B before the resource exists: its creation on A arrives too.
    let mut s = wire::subscribe(
        b.addr,
        "/feed",
        &[("Subscribe", "true"), ("Accept", "application/json")],
    )
    .await;
    assert_eq!(s.next_block(T).await.unwrap().status, Some(404));
    for n in 1..=200 {
        let body = format!("{{\"n\":{n}}}");
        let r = wire::send(
            a.addr,
            "PUT",
            "/feed",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    // Updates may be coalesced when they arrive together, but never reordered or lost:
    // the values seen increase and end at the last write.
    let mut last = 0;
    while last < 200 {
        let b = s
            .next_block(T)
            .await
            .unwrap_or_else(|| panic!("stalled after n = {last}"));
        let n = json(&b)["n"].as_i64().unwrap();
        assert!(n > last, "saw {n} after {last}");
        last = n;
    }
    // Reads on B are current too.
    let r = wire::send(b.addr, "GET", "/feed", &[], b"").await;
    assert_eq!(json_body(&r)["n"], 200);
    // A delete on A reaches B's subscriber.
    assert_eq!(wire::send(a.addr, "DELETE", "/feed", &[], b"").await.status, 204);
    assert_eq!(s.next_block(T).await.unwrap().status, Some(404));
}

/// Cuts both processes' notice connections: for the second each waits before listening
/// again, neither hears of the other's writes.
fn cut_listeners(url: &str) {
    let cut = plait_tests::pg::cluster().psql(
        url,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN%' AND pid <> pg_backend_pid()",
    );
    assert_eq!(cut.trim(), "2", "both processes' listeners were cut");
}

fn json_body(r: &wire::Response) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_text_edits_on_two_processes_converge() {
    const WRITERS: usize = 4;
    const EDITS: usize = 15;
    let a = Plait::start(Store::fresh_postgres());
    let b = Plait::start_sharing(&a, &[]);
    let r = wire::send(a.addr, "PUT", "/doc", &[("Version", "\"root-2\"")], b"abc").await;
    assert_eq!(r.status, 200);
    // Let B load it, then edit on both sides from the same parents, many times.
    assert_eq!(wire::send(b.addr, "GET", "/doc", &[], b"").await.text(), "abc");
    let mut sa = wire::subscribe(a.addr, "/doc", &[("Subscribe", "true")]).await;
    let mut sb = wire::subscribe(b.addr, "/doc", &[("Subscribe", "true")]).await;
    // Several writers on each side at once: each process stores rounds of several writes
    // in one append, and makes a round again when the other's changes got in first.
    let tags: Vec<String> = ["A", "B"]
        .iter()
        .flat_map(|side| (0..WRITERS).map(move |w| format!("{side}{w}.")))
        .collect();
    let mut writers = Vec::new();
    for tag in &tags {
        let addr = if tag.starts_with('A') { a.addr } else { b.addr };
        let tag = tag.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..EDITS {
                let body = format!("<{tag}{i}>");
                let r = wire::send(
                    addr,
                    "PUT",
                    "/doc",
                    &[("Content-Range", "text [0:0]")],
                    body.as_bytes(),
                )
                .await;
                assert_eq!(r.status, 200, "{}", r.text());
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let all = |text: &str| {
        tags.iter()
            .all(|tag| (0..EDITS).all(|i| text.contains(&format!("<{tag}{i}>"))))
    };
    // Both processes end with the same text containing every edit.
    let mut texts = Vec::new();
    for p in [&a, &b] {
        let mut text = String::new();
        for _ in 0..100 {
            text = wire::send(p.addr, "GET", "/doc", &[], b"").await.text();
            if all(&text) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        texts.push(text);
    }
    assert_eq!(texts[0], texts[1]);
    assert!(texts[0].ends_with("abc"));
    assert!(all(&texts[0]), "every edit is in {}", texts[0]);
    // Both subscribers are live (their streams carry updates from both processes).
    assert!(sa.next_block(T).await.is_some());
    assert!(sb.next_block(T).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_notices_are_caught_up_when_the_listener_reconnects() {
    let url = plait_tests::pg::fresh_database();
    let a = Plait::start(Store::Postgres(url.clone()));
    let b = Plait::start_sharing(&a, &[]);
    wire::send(
        a.addr,
        "PUT",
        "/x",
        &[("Content-Type", "application/json")],
        b"{\"n\":0}",
    )
    .await;
    let mut s = wire::subscribe(
        b.addr,
        "/x",
        &[("Subscribe", "true"), ("Accept", "application/json")],
    )
    .await;
    assert_eq!(json(&s.next_block(T).await.unwrap())["n"], 0);
    // Cut every listening connection, then write while they are down: those notices are lost.
    // (A terminated backend goes a moment later: writes made before B saw its listener go
    // would still reach it as notices, so wait for B to say so; it reconnects 1 s later.)
    cut_listeners(&url);
    let deadline = std::time::Instant::now() + T;
    while !b.log().contains("lost the notice connection") {
        assert!(
            std::time::Instant::now() < deadline,
            "B never saw its listener cut: {}",
            b.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for n in 1..=5 {
        let body = format!("{{\"n\":{n}}}");
        assert_eq!(
            wire::send(
                a.addr,
                "PUT",
                "/x",
                &[("Content-Type", "application/json")],
                body.as_bytes()
            )
            .await
            .status,
            200
        );
    }
    // B notices it may have missed something when it reconnects, and catches up.
    let mut last = 0;
    while last < 5 {
        let blk = s.next_block(T).await.expect("B catches up after reconnecting");
        last = json(&blk)["n"].as_i64().unwrap();
    }
    assert!(b.log().contains("notices may have been missed"), "{}", b.log());
}

/// A write lands after every write acknowledged before it, whichever process took either:
/// a client that writes through one process and then through the other never sees its
/// newer value lose to its older one. (Made on a document that lacks the other process's
/// latest change, a write would be concurrent with it, and automerge could keep either.)
/// The processes are made deaf to each other's notices, so the second one's document is
/// behind when it takes the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_either_process_lands_after_what_was_acknowledged() {
    const KEYS: usize = 4;
    const ROUNDS: i64 = 3;
    let url = plait_tests::pg::fresh_database();
    let a = Plait::start(Store::Postgres(url.clone()));
    let b = Plait::start_sharing(&a, &[]);
    let key = |k: usize| format!("/turns/{k}");
    let put = |addr, key: String, n: i64| async move {
        let body = format!("{{\"n\":{n}}}");
        let r = wire::send(
            addr,
            "PUT",
            &key,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
    };
    let read = |addr, key: String| async move {
        json_body(&wire::send(addr, "GET", &key, &[], b"").await)["n"]
            .as_i64()
            .unwrap()
    };
    // A subscriber on each process keeps every document live (in memory) on both.
    let mut subscribers = Vec::new();
    for k in 0..KEYS {
        put(a.addr, key(k), 0).await;
        for p in [&a, &b] {
            let mut s = wire::subscribe(
                p.addr,
                &key(k),
                &[("Subscribe", "true"), ("Accept", "application/json")],
            )
            .await;
            assert_eq!(json(&s.next_block(T).await.unwrap())["n"], 0);
            subscribers.push(s);
        }
    }
    for round in 1..=ROUNDS {
        cut_listeners(&url);
        // Well within the second a process waits before listening again.
        let (older, newer) = (2 * round - 1, 2 * round);
        for k in 0..KEYS {
            put(a.addr, key(k), older).await;
            put(b.addr, key(k), newer).await;
        }
        // Once both listen again and have caught up, both hold the newer value.
        for k in 0..KEYS {
            let deadline = std::time::Instant::now() + T;
            loop {
                let (on_a, on_b) = (read(a.addr, key(k)).await, read(b.addr, key(k)).await);
                if on_a == on_b && on_a != older - 1 {
                    assert_eq!(on_a, newer, "{}: {older} then {newer} acknowledged", key(k));
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{}: A holds {on_a}, B holds {on_b}",
                    key(k)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// A process that saw a resource missing and is asked to create it as text, after another
/// process created it as JSON, answers as if it had known: the kind mismatch is the
/// writer's error (415), and the JSON value stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_what_another_process_just_created_as_another_kind_is_refused_clearly() {
    let url = plait_tests::pg::fresh_database();
    let a = Plait::start(Store::Postgres(url.clone()));
    let b = Plait::start_sharing(&a, &[]);
    // B keeps the resource live while it is missing.
    let mut s = wire::subscribe(
        b.addr,
        "/made",
        &[("Subscribe", "true"), ("Accept", "application/json")],
    )
    .await;
    assert_eq!(s.next_block(T).await.unwrap().status, Some(404));
    // B does not hear of A's write (for the second its listener takes to come back), so
    // B's write is made as a create and refused by the store as behind.
    cut_listeners(&url);
    let r = wire::send(
        a.addr,
        "PUT",
        "/made",
        &[("Content-Type", "application/json")],
        br#"{"by":"a"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let r = wire::send(b.addr, "PUT", "/made", &[("Content-Type", "text/plain")], b"by b").await;
    assert_eq!(r.status, 415, "{}", r.text());
    for p in [&a, &b] {
        let r = wire::send(p.addr, "GET", "/made", &[], b"").await;
        assert_eq!(json_body(&r), serde_json::json!({"by": "a"}));
    }
}
