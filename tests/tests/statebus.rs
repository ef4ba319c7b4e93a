//! Statebus compatibility against the real `plait` binary: the statebus 7.2.6 and 6.0.38
//! npm clients, a raw websocket for exact frames and bad input, and the permission rules
//! over Braid-HTTP — on both stores.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use plait_tests::plait::{Plait, Store};
use plait_tests::wire;
use tokio_tungstenite::tungstenite::Message;

use plait_tests::on_both_stores;

on_both_stores!(
    statebus7_client,
    statebus6_client,
    sessions_and_data_survive_a_restart,
    bad_frames_are_answered_and_the_connection_survives,
    permissions_over_http,
);

async fn node(script: &'static str, args: Vec<String>) {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        plait_tests::node::run(script, &args)
    })
    .await
    .unwrap();
}

async fn statebus7_client(store: Store) {
    let p = Plait::start(store);
    node("statebus_v7.js", vec![p.url(""), "live".into()]).await;
}

async fn statebus6_client(store: Store) {
    let p = Plait::start(store);
    node("statebus_v6.js", vec![p.url("")]).await;
}

async fn sessions_and_data_survive_a_restart(store: Store) {
    let mut p = Plait::start(store);
    node("statebus_v7.js", vec![p.url(""), "before-restart".into()]).await;
    p.restart();
    node("statebus_v7.js", vec![p.url(""), "after-restart".into()]).await;
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws(p: &Plait) -> Ws {
    let url = format!("ws://{}/_connect_to_statebus_/websocket", p.addr);
    tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket opens")
        .0
}

async fn send(s: &mut Ws, frame: &str) {
    s.send(Message::text(frame)).await.unwrap();
}

/// The next JSON frame within 5 s.
async fn recv(s: &mut Ws) -> serde_json::Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .expect("a frame within 5 s")
            .expect("the connection is open")
            .unwrap();
        if let Message::Text(t) = m {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

async fn bad_frames_are_answered_and_the_connection_survives(store: Store) {
    let p = Plait::start(store);
    let mut s = ws(&p).await;
    for bad in [
        "this is not json",
        "[1,2]",
        r#"{"bogus":1}"#,
        r#"{"get":5}"#,
        r#"{"set":{"val":1}}"#,
    ] {
        send(&mut s, bad).await;
        let m = recv(&mut s).await;
        assert!(m["error"].is_string(), "{bad}: {m}");
    }
    // A patch on a key this connection never fetched (the reference server crashes here).
    send(
        &mut s,
        r#"{"set":"k","patches":[{"unit":"json","range":".a","content":"42"}]}"#,
    )
    .await;
    let m = recv(&mut s).await;
    assert!(m["error"].as_str().unwrap().contains("fetched"), "{m}");
    // Reserved and master keys: an error, and an answer so the client does not wait.
    for key in ["__proto__", "users", "users/passwords", "logged_in_clients"] {
        send(&mut s, &format!(r#"{{"get":"{key}"}}"#)).await;
        let e = recv(&mut s).await;
        assert!(e["error"].is_string(), "{key}: {e}");
        let answer = recv(&mut s).await;
        assert_eq!(answer["set"]["key"], key);
        assert!(answer["set"].get("val").is_none(), "{answer}");
    }
    send(&mut s, r#"{"set":{"key":"users","val":[{"link":"@me"}]}}"#).await;
    assert!(recv(&mut s).await["error"].is_string());
    assert!(recv(&mut s).await["set"].get("val").is_none());
    // The connection still works: set, get, patch after get.
    send(&mut s, r#"{"set":{"key":"k","val":{"a":1,"b":[1,2]}}}"#).await;
    send(&mut s, r#"{"get":"k"}"#).await;
    assert_eq!(
        recv(&mut s).await,
        serde_json::json!({"set": {"key": "k", "val": {"a": 1, "b": [1, 2]}}})
    );
    let mut other = ws(&p).await;
    send(&mut other, r#"{"get":"k"}"#).await;
    recv(&mut other).await;
    send(
        &mut s,
        r#"{"set":"k","patches":[{"unit":"json","range":".a","content":"42"}]}"#,
    )
    .await;
    assert_eq!(
        recv(&mut other).await,
        serde_json::json!({"set": {"key": "k", "val": {"a": 42, "b": [1, 2]}}})
    );
    // And the server serves new connections.
    let mut third = ws(&p).await;
    send(&mut third, r#"{"fetch":"k"}"#).await;
    assert_eq!(
        recv(&mut third).await,
        serde_json::json!({"save": {"key": "k", "a": 42, "b": [1, 2]}})
    );
}

/// An HTTP request as a browser would make it, with its login session cookie.
async fn as_client(p: &Plait, method: &str, path: &str, cookie: &str, body: &str) -> wire::Response {
    let c = format!("plait_session={cookie}");
    let headers = [("Cookie", c.as_str()), ("Content-Type", "application/json")];
    wire::send(p.addr, method, path, &headers, body.as_bytes()).await
}

async fn permissions_over_http(store: Store) {
    let p = Plait::start(store);
    // Master keys are refused, not left hanging (the reference never answers).
    for key in ["/users", "/users/passwords", "/logged_in_clients"] {
        assert_eq!(
            wire::send(p.addr, "GET", key, &[], b"").await.status,
            403,
            "{key}"
        );
        assert_eq!(
            wire::send(p.addr, "PUT", key, &[("Content-Type", "application/json")], b"[]")
                .await
                .status,
            403
        );
    }
    // Create an account and log in over HTTP; the session is the `plait_session` cookie,
    // which scripts cannot read.
    let r = wire::send(p.addr, "GET", "/current_user", &[], b"").await;
    let cookie = r.cookie("plait_session").expect("a session cookie");
    let set = r
        .headers
        .iter()
        .find(|(k, v)| k.eq_ignore_ascii_case("set-cookie") && v.starts_with("plait_session="))
        .map(|(_, v)| v.clone())
        .unwrap();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Lax") && set.contains("Max-Age=2592000"),
        "{set}"
    );
    let r = as_client(
        &p,
        "PUT",
        "/current_user",
        &cookie,
        r#"{"create_account":{"name":"Carol","pass":"pw1","email":"c@example.com"}}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let r = as_client(
        &p,
        "PUT",
        "/current_user",
        &cookie,
        r#"{"login_as":{"name":"carol","pass":"wrong"}}"#,
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["error"], "Cannot log in with that information");
    let r = as_client(
        &p,
        "PUT",
        "/current_user",
        &cookie,
        r#"{"login_as":{"name":"carol","pass":"pw1"}}"#,
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"user": {"link": "@Carol"}, "logged_in": true})
    );
    let r = as_client(&p, "GET", "/current_user", &cookie, "").await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["logged_in"],
        true
    );
    // The owner writes and reads the closet, private parts included.
    assert_eq!(
        as_client(&p, "PUT", "/@carol/notes", &cookie, r#""mine""#)
            .await
            .status,
        200
    );
    assert_eq!(
        as_client(&p, "PUT", "/@Carol/private/diary", &cookie, r#""secret""#)
            .await
            .status,
        200
    );
    assert_eq!(
        as_client(&p, "GET", "/@carol/private/diary", &cookie, "")
            .await
            .text(),
        r#""secret""#
    );
    // Others read the public part only, and write nothing (401: they have no credential).
    assert_eq!(
        as_client(&p, "GET", "/@carol/notes", "stranger", "").await.text(),
        r#""mine""#
    );
    assert_eq!(
        as_client(&p, "GET", "/@carol/private/diary", "stranger", "")
            .await
            .status,
        401
    );
    assert_eq!(
        as_client(&p, "PUT", "/@carol/notes", "stranger", r#""defaced""#)
            .await
            .status,
        401
    );
    assert_eq!(
        as_client(&p, "DELETE", "/@carol/notes", "stranger", "")
            .await
            .status,
        401
    );
    assert_eq!(
        as_client(&p, "GET", "/@carol/notes", "stranger", "").await.text(),
        r#""mine""#
    );
    // The public profile shows no password; the closet is also the account's namespace.
    let profile = as_client(&p, "GET", "/@carol", "stranger", "").await.text();
    assert!(
        profile.contains("Carol") && !profile.contains("pass") && !profile.contains("c@example.com"),
        "{profile}"
    );
    // A namespace that is not the viewer's is read-only, its private paths unreadable.
    let other = plait_bridge::Keypair::generate().identity();
    assert_eq!(
        as_client(&p, "PUT", &format!("/~{other}/x"), &cookie, "1")
            .await
            .status,
        403
    );
    // Logging out ends the owner's rights.
    as_client(&p, "PUT", "/current_user", &cookie, r#"{"logout":true}"#).await;
    assert_eq!(
        as_client(&p, "PUT", "/@carol/notes", &cookie, r#""x""#)
            .await
            .status,
        401
    );
}

/// A connection follows at most `limits.max_statebus_subscriptions` keys; `forget` frees one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_follows_a_bounded_number_of_keys() {
    let p = Plait::start_with_env(
        Store::Embedded,
        &[],
        &[("PLAIT_LIMITS__MAX_STATEBUS_SUBSCRIPTIONS", "2")],
    );
    let mut s = ws(&p).await;
    for k in ["a", "b"] {
        send(&mut s, &format!(r#"{{"get":"{k}"}}"#)).await;
        assert_eq!(recv(&mut s).await, serde_json::json!({"set": {"key": k}}));
    }
    send(&mut s, r#"{"get":"c"}"#).await;
    let e = recv(&mut s).await;
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("limits.max_statebus_subscriptions"),
        "{e}"
    );
    assert_eq!(recv(&mut s).await, serde_json::json!({"set": {"key": "c"}}));
    send(&mut s, r#"{"forget":"a"}"#).await;
    send(&mut s, r#"{"get":"c"}"#).await;
    assert_eq!(recv(&mut s).await, serde_json::json!({"set": {"key": "c"}}));
    // Followed now: a write to c reaches this connection.
    let r = wire::send(p.addr, "PUT", "/c", &[("Content-Type", "application/json")], b"1").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        recv(&mut s).await,
        serde_json::json!({"set": {"key": "c", "val": 1}})
    );
}

/// A flood of messages from one address is read at
/// `limits.statebus_messages_per_second_per_address` (after a burst of two seconds' worth):
/// every message is still answered, none before its time, and another address is served
/// meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_s_messages_are_paced() {
    let p = Plait::start_with_env(
        Store::Embedded,
        &[],
        &[("PLAIT_LIMITS__STATEBUS_MESSAGES_PER_SECOND_PER_ADDRESS", "50")],
    );
    let mut flood = ws(&p).await;
    let started = std::time::Instant::now();
    // 100 ride the burst; the other 150 take at least 3 s at 50 a second.
    for k in 0..250 {
        send(&mut flood, &format!(r#"{{"get":"flood/{k}"}}"#)).await;
    }
    // Another client address (127.0.0.2) is answered while the flood waits its turn.
    let other = {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let tcp = socket.connect(p.addr).await.unwrap();
        let url = format!("ws://{}/_connect_to_statebus_/websocket", p.addr);
        let tcp = tokio_tungstenite::MaybeTlsStream::Plain(tcp);
        tokio_tungstenite::client_async(url, tcp).await.unwrap().0
    };
    let mut other = other;
    send(&mut other, r#"{"get":"calm"}"#).await;
    assert_eq!(
        recv(&mut other).await,
        serde_json::json!({"set": {"key": "calm"}})
    );
    let mut answered = 0;
    while answered < 250 {
        let f = recv(&mut flood).await;
        assert!(f.get("error").is_none(), "{f}");
        answered += 1;
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2900),
        "250 messages read in {took:?}"
    );
}
