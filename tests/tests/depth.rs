//! JSON nesting and patch counts: what a write *builds* is limited, not only each body,
//! over Braid-HTTP and the Statebus websocket, against the real `plait` binary.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use plait_tests::plait::{Plait, Store};
use plait_tests::wire;
use tokio_tungstenite::tungstenite::Message;

/// `n` patches to `.a`, each nesting 120 levels deeper than the last: each body alone
/// passes any depth check, the value they build is 1,201 levels deep. As (range, content).
fn nesting_patches(n: usize) -> Vec<(String, String)> {
    const LEVELS: usize = 120;
    let content = "[".repeat(LEVELS) + &"]".repeat(LEVELS);
    (0..n)
        .map(|k| {
            // The innermost empty list of the previous patch, and its first slot.
            let range = ".a".to_string() + &"[0]".repeat(LEVELS * k);
            (range, content.clone())
        })
        .collect()
}

fn patch_blocks(patches: &[(String, String)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (range, content) in patches {
        body.extend_from_slice(
            format!(
                "Content-Length: {}\r\nContent-Range: json {range}\r\n\r\n{content}\r\n\r\n",
                content.len()
            )
            .as_bytes(),
        );
    }
    body
}

/// The `limits` object of the status resource.
async fn limits(p: &Plait) -> serde_json::Value {
    let r = wire::send(p.addr, "GET", "/.well-known/plait", &[], b"").await;
    serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["limits"].clone()
}

#[tokio::test]
async fn patches_that_build_deep_json_are_refused_over_http() {
    let mut p = Plait::start(Store::Embedded);
    let json = [("Content-Type", "application/json")];
    assert_eq!(wire::send(p.addr, "PUT", "/deep", &json, b"{}").await.status, 200);
    let patches = nesting_patches(10);
    let body = patch_blocks(&patches);
    assert!(body.len() < 20_000, "{} bytes", body.len());
    let r = wire::send(p.addr, "PUT", "/deep", &[("Patches", "10")], &body).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.header("plait-error"), Some("too-deep"));
    assert!(r.text().contains("max_json_depth"), "{}", r.text());
    assert!(p.is_running(), "the server survived; its output:\n{}", p.log());
    assert_eq!(wire::send(p.addr, "GET", "/deep", &[], b"").await.text(), "{}");
    // The limit is a setting, published.
    assert_eq!(limits(&p).await["max_json_depth"], 128);
    assert_eq!(limits(&p).await["max_patches_per_request"], 10_000);
}

#[tokio::test]
async fn the_depth_and_patch_limits_are_settings() {
    let p = Plait::start_with_env(
        Store::Embedded,
        &[],
        &[
            ("PLAIT_LIMITS__MAX_JSON_DEPTH", "3"),
            ("PLAIT_LIMITS__MAX_PATCHES_PER_REQUEST", "2"),
        ],
    );
    let json = [("Content-Type", "application/json")];
    assert_eq!(
        wire::send(p.addr, "PUT", "/r", &json, b"[[[]]]").await.status,
        200
    );
    let r = wire::send(p.addr, "PUT", "/r", &json, b"[[[[]]]]").await;
    assert_eq!((r.status, r.header("plait-error")), (413, Some("too-deep")));
    // Each patch alone is shallow; together they are 4 deep.
    let body = patch_blocks(&[
        ("[0][0][0]".into(), "1".into()),
        ("[0][0][0]".into(), "[]".into()),
    ]);
    let r = wire::send(p.addr, "PUT", "/r", &[("Patches", "2")], &body).await;
    assert_eq!(
        (r.status, r.header("plait-error")),
        (413, Some("too-deep")),
        "{}",
        r.text()
    );
    let body = patch_blocks(&[
        ("[0][0][0]".into(), "1".into()),
        ("[0][0][1]".into(), "2".into()),
        ("[0][0][2]".into(), "3".into()),
    ]);
    let r = wire::send(p.addr, "PUT", "/r", &[("Patches", "3")], &body).await;
    assert_eq!(
        (r.status, r.header("plait-error")),
        (413, Some("too-many-patches"))
    );
    assert_eq!(wire::send(p.addr, "GET", "/r", &[], b"").await.text(), "[[[]]]");
    let body = patch_blocks(&[("[0][0][0]".into(), "1".into()), ("[0][0][1]".into(), "2".into())]);
    assert_eq!(
        wire::send(p.addr, "PUT", "/r", &[("Patches", "2")], &body)
            .await
            .status,
        200
    );
    assert_eq!(
        wire::send(p.addr, "GET", "/r", &[], b"").await.text(),
        "[[[1,2]]]"
    );
    assert_eq!(limits(&p).await["max_json_depth"], 3);
    assert_eq!(limits(&p).await["max_patches_per_request"], 2);
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws(p: &Plait) -> Ws {
    let url = format!("ws://{}/_connect_to_statebus_/websocket", p.addr);
    tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket opens")
        .0
}

/// The next JSON frame within 10 s; `None` if the connection ended.
async fn recv(s: &mut Ws) -> Option<serde_json::Value> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("a frame within 10 s")?;
        match m {
            Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).expect("JSON frame")),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

#[tokio::test]
async fn patches_that_build_deep_json_are_refused_over_statebus() {
    let mut p = Plait::start(Store::Embedded);
    let mut s = ws(&p).await;
    s.send(Message::text(r#"{"set":{"key":"deep","val":{}}}"#))
        .await
        .unwrap();
    s.send(Message::text(r#"{"get":"deep"}"#)).await.unwrap();
    assert_eq!(
        recv(&mut s).await,
        Some(serde_json::json!({"set": {"key": "deep", "val": {}}}))
    );
    let patches: Vec<serde_json::Value> = nesting_patches(10)
        .into_iter()
        .map(|(range, content)| serde_json::json!({"unit": "json", "range": range, "content": content}))
        .collect();
    let frame = serde_json::json!({"set": "deep", "patches": patches}).to_string();
    s.send(Message::text(frame)).await.unwrap();
    let e = recv(&mut s).await.expect("an answer, not a dead server");
    assert!(
        e["error"].as_str().is_some_and(|m| m.contains("max_json_depth")),
        "{e}"
    );
    // The client is told the state it should hold again: still `{}`.
    let revert = recv(&mut s).await.expect("the revert");
    assert_eq!(revert["set"]["val"], serde_json::json!({}), "{revert}");
    assert!(p.is_running(), "the server survived; its output:\n{}", p.log());
    let mut other = ws(&p).await;
    other.send(Message::text(r#"{"get":"deep"}"#)).await.unwrap();
    assert_eq!(
        recv(&mut other).await,
        Some(serde_json::json!({"set": {"key": "deep", "val": {}}}))
    );
}
