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
    statebus6_connections_and_whole_states,
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

/// The statebus 6 client sees the open connections live (`/connections`, `/connection`),
/// and a flat state it saves reads back over plain HTTP GET as the whole object, `key`
/// included.
async fn statebus6_connections_and_whole_states(store: Store) {
    let p = Plait::start(store);
    let key = format!("v6whole-{:08x}/obj", rand::random::<u32>());
    node("statebus_v6_connections.js", vec![p.url(""), key.clone()]).await;
    let r = reqwest::get(p.url(&format!("/{key}"))).await.unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"key": key, "n": 1, "s": "hello", "list": [1, {"x": true}]})
    );
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

/// A client that sends a thousand `get`s and vanishes costs nothing after it is gone: the
/// server stops at the first answer it cannot deliver rather than reading (at the paced
/// rate, for 20 s here) and following keys for nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_client_s_queued_messages_are_not_read() {
    let p = Plait::start_with_env(
        Store::Embedded,
        &[],
        &[("PLAIT_LIMITS__STATEBUS_MESSAGES_PER_SECOND_PER_ADDRESS", "50")],
    );
    let open = || async { p.status().await["subscriptions"].as_u64().expect("a count") };
    let mut flood = ws(&p).await;
    for k in 0..1100 {
        send(&mut flood, &format!(r#"{{"get":"gone/{k}"}}"#)).await;
    }
    // The burst's hundred are followed; the rest wait in the socket.
    recv(&mut flood).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while open().await < 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "the burst was never followed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Gone without a close frame, answers unread (the kernel resets the connection).
    drop(flood);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = open().await;
        if n == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} subscriptions still open 5 s after their client vanished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Who sees the open connections is the access layer's to say: a rule that denies reading
/// `/connections` refuses the list (to a follower at once), while a connection's own record
/// stays its own; and a v7 client has no such states (they are ordinary keys to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connections_follow_the_access_rules() {
    let p = Plait::start(Store::Embedded);
    let mut a = ws(&p).await;
    send(&mut a, r#"{"fetch":"connection"}"#).await;
    let own = recv(&mut a).await;
    let id = own["save"]["id"].as_str().expect("an id").to_string();
    assert_eq!(own["save"]["key"], "connection");
    assert_eq!(own["save"]["client"], id.as_str());
    send(&mut a, r#"{"fetch":"connections"}"#).await;
    let all = recv(&mut a).await;
    let listed: Vec<&str> = all["save"]["all"]
        .as_array()
        .expect("a list under all")
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert_eq!(listed, vec![id.as_str()], "{all}");
    // Another connection opens: the follower is told.
    let mut b = ws(&p).await;
    send(&mut b, r#"{"fetch":"connection"}"#).await;
    let b_id = recv(&mut b).await["save"]["id"].as_str().unwrap().to_string();
    let all = recv(&mut a).await;
    assert_eq!(all["save"]["all"].as_array().unwrap().len(), 2, "{all}");
    assert!(all.to_string().contains(&b_id), "{all}");
    // To a v7 connection `connections` is an ordinary key (here, one never written). Its
    // opening is told to A's follow.
    let mut c = ws(&p).await;
    send(&mut c, r#"{"get":"connections"}"#).await;
    assert_eq!(
        recv(&mut c).await,
        serde_json::json!({"set": {"key": "connections"}})
    );
    assert_eq!(recv(&mut a).await["save"]["all"].as_array().unwrap().len(), 3);
    // The owner denies everyone the list: A's follow ends with a refusal.
    let rules = serde_json::json!({"rules": [
        {"path": "/", "read": ["everyone"]},
        {"path": "/connections", "deny": {"read": ["everyone"]}}
    ]});
    let (k, v) = p.owner_auth();
    let r = wire::send(
        p.addr,
        "PUT",
        "/.well-known/plait/access",
        &[(k, v.as_str()), ("Content-Type", "application/json")],
        rules.to_string().as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);
    let refusal = recv(&mut a).await;
    assert_eq!(refusal["about"], "connections", "{refusal}");
    assert_eq!(refusal["status"], 401);
    assert_eq!(
        recv(&mut a).await,
        serde_json::json!({"save": {"key": "connections"}})
    );
    // Asked again: refused, answered empty; its own record is still shown.
    send(&mut b, r#"{"fetch":"connections"}"#).await;
    assert_eq!(recv(&mut b).await["status"], 401);
    assert_eq!(
        recv(&mut b).await,
        serde_json::json!({"save": {"key": "connections"}})
    );
    send(&mut b, &format!(r#"{{"fetch":"connection/{id}"}}"#)).await;
    assert_eq!(recv(&mut b).await["status"], 401);
    recv(&mut b).await;
    send(&mut b, &format!(r#"{{"fetch":"connection/{b_id}"}}"#)).await;
    assert_eq!(recv(&mut b).await["save"]["id"], b_id.as_str());
    // Clients read these states; they do not write them.
    send(&mut b, r#"{"save":{"key":"connection","client":"me"}}"#).await;
    assert!(recv(&mut b).await["error"].is_string());
    assert_eq!(recv(&mut b).await["save"]["client"], b_id.as_str());
}
