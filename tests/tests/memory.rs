//! What one request may cost in memory, read from the server process (`VmHWM`), not
//! guessed. A bytes or JSON PUT of N bytes stays within 10 N. A text PUT keeps what
//! automerge keeps for a text, about 40 bytes per code point for as long as the document
//! is loaded, so its bound is 40 N; before big text writes were committed as runs of
//! changes (automerge holds a transaction's ops uncompressed until it commits) the same
//! PUT took about 300 N. Each document comes back whole after a crash.

use plait_tests::plait::{Plait, Store};
use plait_tests::wire;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_text_put_costs_a_small_multiple_of_its_size() {
    let mut p = Plait::start(Store::Embedded);
    // Code points of one, two and three bytes, so that no cut falls inside one.
    let text: String = (0..700_000).map(|i| ['a', 'é', '€'][i % 3]).collect();
    let n = text.len() as u64;
    let before = p.peak_rss();
    let r = wire::send(
        p.addr,
        "PUT",
        "/big",
        &[("Content-Type", "text/plain")],
        text.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let grew = p.peak_rss().saturating_sub(before);
    assert!(
        grew <= 40 * n,
        "a {n}-byte text PUT raised the peak by {grew} bytes ({:.1}×)",
        grew as f64 / n as f64
    );
    assert_eq!(wire::send(p.addr, "GET", "/big", &[], b"").await.text(), text);
    // Acknowledged, so it survives kill -9, and loads again.
    p.restart();
    assert_eq!(wire::send(p.addr, "GET", "/big", &[], b"").await.text(), text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_bytes_and_json_puts_cost_a_small_multiple_of_their_size() {
    let mut p = Plait::start(Store::Embedded);
    let bytes: Vec<u8> = (0..8_000_000u32).map(|i| (i % 251) as u8).collect();
    let items: Vec<String> = (0..1_000).map(|i| format!("item {i}")).collect();
    let json = serde_json::json!({"text": "x".repeat(3_000_000), "items": items}).to_string();
    for (path, kind, body) in [
        ("/blob", "application/octet-stream", bytes.clone()),
        ("/doc", "application/json", json.clone().into_bytes()),
    ] {
        let n = body.len() as u64;
        let before = p.peak_rss();
        let r = wire::send(p.addr, "PUT", path, &[("Content-Type", kind)], &body).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let grew = p.peak_rss().saturating_sub(before);
        assert!(
            grew <= 10 * n,
            "a {n}-byte {kind} PUT raised the peak by {grew} bytes ({:.1}×)",
            grew as f64 / n as f64
        );
    }
    p.restart();
    assert_eq!(wire::send(p.addr, "GET", "/blob", &[], b"").await.body, bytes);
    let got: serde_json::Value =
        serde_json::from_slice(&wire::send(p.addr, "GET", "/doc", &[], b"").await.body).unwrap();
    assert_eq!(got, serde_json::from_str::<serde_json::Value>(&json).unwrap());
}
