//! Ownership and access against the real `plait` binary, with anonymous writes refused (the
//! default): owner and limited tokens, the rules as state (written, enforced, followed by
//! open subscriptions), login sessions that nobody else can take over, login limits, and
//! what is served on the origin — over Braid-HTTP and the Statebus websocket, on both
//! stores.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use plait_tests::plait::{Plait, Store};
use plait_tests::wire;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use plait_tests::on_both_stores;

on_both_stores!(
    only_the_owner_writes_by_default,
    tokens_are_scoped_revocable_and_expire,
    rules_are_state_the_owner_edits,
    a_reader_who_loses_the_right_stops_getting_updates,
    statebus_callers_go_through_the_same_rules,
    every_caller_over_http_as_the_rules_say,
    every_caller_over_statebus_as_the_rules_say,
);

/// A server whose anonymous writes are refused (the default for a new data dir).
fn owned(store: Store) -> Plait {
    Plait::start_with_env(store, &[], &[("PLAIT_ACCESS__PUBLIC_WRITES", "false")])
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn put(p: &Plait, path: &str, headers: &[(&str, &str)], body: &str) -> wire::Response {
    wire::send(p.addr, "PUT", path, headers, body.as_bytes()).await
}

/// The owner replaces the access rules.
async fn set_rules(p: &Plait, rules: &Value) {
    let owner = bearer(&p.owner_token());
    let h = [
        ("Authorization", owner.as_str()),
        ("Content-Type", "application/json"),
    ];
    let r = put(p, "/.well-known/plait/access", &h, &rules.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

fn json_of(r: &wire::Response) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|_| panic!("a JSON body, got {:?}", r.text()))
}

async fn only_the_owner_writes_by_default(store: Store) {
    let p = owned(store);
    // Anonymous: reads, but every write is 401 naming the schemes, and nothing is stored.
    for (method, path) in [
        ("PUT", "/"),
        ("PUT", "/notes"),
        ("PATCH", "/notes"),
        ("DELETE", "/notes"),
    ] {
        let r = wire::send(p.addr, method, path, &[], b"x").await;
        assert_eq!(r.status, 401, "{method} {path}: {}", r.text());
        assert!(
            r.header("www-authenticate")
                .is_some_and(|h| h.starts_with("Bearer"))
        );
        assert!(
            r.header("accept-signature")
                .is_some_and(|h| h.contains("ed25519"))
        );
        let body = json_of(&r);
        assert_eq!(body["error"], "unauthenticated");
        assert_eq!(body["rule"], "/");
    }
    assert_eq!(wire::send(p.addr, "GET", "/notes", &[], b"").await.text(), "");
    // The owner writes and deletes.
    let owner = bearer(&p.owner_token());
    let auth = [("Authorization", owner.as_str())];
    assert_eq!(put(&p, "/notes", &auth, "mine").await.status, 200);
    assert_eq!(wire::send(p.addr, "GET", "/notes", &[], b"").await.text(), "mine");
    assert_eq!(
        wire::send(p.addr, "DELETE", "/notes", &auth, b"").await.status,
        204
    );
    // A token that is not one is 401, not anonymous.
    let r = put(&p, "/notes", &[("Authorization", "Bearer plait_nope_nope")], "x").await;
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").unwrap().contains("invalid_token"));
    let r = put(&p, "/notes", &[("Authorization", "Basic Zm9vOmJhcg==")], "x").await;
    assert_eq!(r.status, 401);
    // State is never active content on this origin; nothing is sniffed.
    assert_eq!(
        put(
            &p,
            "/page",
            &[("Authorization", owner.as_str()), ("Content-Type", "text/html")],
            "<script>1</script>"
        )
        .await
        .status,
        200
    );
    let r = wire::send(p.addr, "GET", "/page", &[], b"").await;
    assert_eq!(r.header("content-security-policy"), Some("sandbox"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    let r = wire::send(p.addr, "GET", "/.well-known/plait", &[], b"").await;
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    // The server says how to get the owner token.
    assert!(p.log().contains("plait token --data-dir"), "{}", p.log());
}

async fn tokens_are_scoped_revocable_and_expire(store: Store) {
    let p = owned(store);
    let limited = p.token(&["--write", "/a", "--read", "/r", "--label", "ci"]);
    let auth = bearer(&limited);
    let h = [("Authorization", auth.as_str())];
    assert_eq!(put(&p, "/a", &h, "1").await.status, 200);
    assert_eq!(put(&p, "/a/deeper", &h, "1").await.status, 200);
    assert_eq!(
        wire::send(p.addr, "DELETE", "/a/deeper", &h, b"").await.status,
        204
    );
    // A token for /a used on /b (or /ab) is refused, with the rule and the scope named.
    for path in ["/b", "/ab", "/r"] {
        let r = put(&p, path, &h, "1").await;
        assert_eq!(r.status, 403, "{path}");
        let body = json_of(&r);
        assert_eq!(body["error"], "forbidden");
        assert!(body["reason"].as_str().unwrap().contains("/a"), "{body}");
    }
    // Listed (without the token itself), then revoked.
    let out = std::process::Command::new(plait_tests::plait::binary())
        .args(["token", "--list", "--data-dir"])
        .arg(p.data_dir())
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&out.stdout).to_string();
    let line = list
        .lines()
        .find(|l| l.contains("ci"))
        .expect("the token is listed");
    assert!(!list.contains(limited.rsplit('_').next().unwrap()));
    let id = line.split('\t').next().unwrap();
    let st = std::process::Command::new(plait_tests::plait::binary())
        .args(["token", "--revoke", id, "--data-dir"])
        .arg(p.data_dir())
        .status()
        .unwrap();
    assert!(st.success());
    let r = put(&p, "/a", &h, "2").await;
    assert_eq!(r.status, 401, "a revoked token: {}", r.text());
    // Tokens are stored hashed.
    let file = std::fs::read_to_string(p.data_dir().join("tokens.json")).unwrap();
    assert!(!file.contains(p.owner_token().rsplit('_').next().unwrap()));
    // An expired token.
    let short = p.token(&["--ttl", "1s"]);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = put(&p, "/a", &[("Authorization", bearer(&short).as_str())], "3").await;
    assert_eq!(r.status, 401);
    assert!(r.text().contains("expired"), "{}", r.text());
    // Tokens work across restarts.
    let mut p = p;
    p.restart();
    let owner = bearer(&p.owner_token());
    assert_eq!(
        put(&p, "/a", &[("Authorization", owner.as_str())], "4")
            .await
            .status,
        200
    );
}

async fn login(p: &Plait, name: &str, pass: &str, create: bool) -> String {
    p.login(name, pass, create).await
}

async fn rules_are_state_the_owner_edits(store: Store) {
    let p = owned(store);
    let owner = bearer(&p.owner_token());
    let o = [
        ("Authorization", owner.as_str()),
        ("Content-Type", "application/json"),
    ];
    // The default rules, readable by the owner only.
    let r = wire::send(p.addr, "GET", "/.well-known/plait/access", &o, b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(json_of(&r)["rules"][0]["path"], "/");
    assert_eq!(
        wire::send(p.addr, "GET", "/.well-known/plait/access", &[], b"")
            .await
            .status,
        401
    );
    let alice = login(&p, "alice", "pw-alice", true).await;
    let a = [("Cookie", alice.as_str())];
    let r = wire::send(p.addr, "GET", "/.well-known/plait/access", &a, b"").await;
    assert_eq!(r.status, 403);
    assert_eq!(
        put(&p, "/.well-known/plait/access", &a, "{\"rules\":[]}")
            .await
            .status,
        403
    );
    // Alice, an account, may not write /shared yet.
    assert_eq!(put(&p, "/shared/a", &a, "hi").await.status, 403);
    // A document that does not parse is refused and changes nothing.
    let r = put(
        &p,
        "/.well-known/plait/access",
        &o,
        r#"{"rules":[{"path":"/","read":["nobody"]}]}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let rules = json!({"rules": [
        {"path": "/", "read": ["everyone"], "write": ["owner"], "delete": ["owner"]},
        {"path": "/shared", "write": ["accounts"], "delete": ["account:alice"]},
        {"path": "/shared/locked", "deny": {"write": ["account:alice"]}},
        {"path": "/secret", "deny": {"read": ["everyone"]}},
    ]});
    assert_eq!(
        put(&p, "/.well-known/plait/access", &o, &rules.to_string())
            .await
            .status,
        200
    );
    // In force at once.
    assert_eq!(put(&p, "/shared/a", &a, "hi").await.status, 200);
    assert_eq!(
        wire::send(p.addr, "DELETE", "/shared/a", &a, b"").await.status,
        204
    );
    let r = put(&p, "/shared/locked/x", &a, "no").await;
    assert_eq!(r.status, 403);
    assert_eq!(json_of(&r)["rule"], "/shared/locked");
    assert_eq!(put(&p, "/elsewhere", &a, "no").await.status, 403);
    // Bob, another account, writes /shared but may not delete there.
    let bob = login(&p, "bob", "pw-bob", true).await;
    let b = [("Cookie", bob.as_str())];
    assert_eq!(put(&p, "/shared/b", &b, "bob").await.status, 200);
    assert_eq!(
        wire::send(p.addr, "DELETE", "/shared/b", &b, b"").await.status,
        403
    );
    // Deny wins over everyone; the owner still reads.
    assert_eq!(put(&p, "/secret/x", &o, "\"s\"").await.status, 200);
    assert_eq!(wire::send(p.addr, "GET", "/secret/x", &[], b"").await.status, 401);
    assert_eq!(wire::send(p.addr, "GET", "/secret/x", &b, b"").await.status, 403);
    assert_eq!(wire::send(p.addr, "GET", "/secret/x", &o, b"").await.status, 200);
    // The rules survive a restart.
    let mut p = p;
    p.restart();
    assert_eq!(
        put(&p, "/shared/c", &[("Cookie", alice.as_str())], "again")
            .await
            .status,
        200
    );
    // Logging out everywhere ends the session.
    let r = put(
        &p,
        "/current_user",
        &[("Cookie", alice.as_str())],
        r#"{"logout_everywhere":true}"#,
    )
    .await;
    assert_eq!(json_of(&r)["logged_in"], false);
    assert_eq!(
        put(&p, "/shared/d", &[("Cookie", alice.as_str())], "x")
            .await
            .status,
        401
    );
}

async fn a_reader_who_loses_the_right_stops_getting_updates(store: Store) {
    let p = owned(store);
    let owner = bearer(&p.owner_token());
    // A bytes resource: every update is the whole value.
    let o = [
        ("Authorization", owner.as_str()),
        ("Content-Type", "application/octet-stream"),
    ];
    assert_eq!(put(&p, "/feed", &o, "0").await.status, 200);
    let mut reader = wire::subscribe(p.addr, "/feed", &[("Subscribe", "true")]).await;
    assert_eq!(reader.status, 209);
    let mut owner_sub = wire::subscribe(
        p.addr,
        "/feed",
        &[("Subscribe", "true"), ("Authorization", owner.as_str())],
    )
    .await;
    assert!(reader.next_block(Duration::from_secs(10)).await.is_some());
    assert!(owner_sub.next_block(Duration::from_secs(10)).await.is_some());
    assert_eq!(put(&p, "/feed", &o, "1").await.status, 200);
    assert_eq!(
        reader
            .next_block(Duration::from_secs(10))
            .await
            .unwrap()
            .body_text(),
        "1"
    );
    // The owner takes reading away from everyone but itself.
    let rules = json!({"rules": [
        {"path": "/", "read": ["everyone"], "write": ["owner"], "delete": ["owner"]},
        {"path": "/feed", "read": ["owner"]},
    ]});
    set_rules(&p, &rules).await;
    assert_eq!(put(&p, "/feed", &o, "2").await.status, 200);
    // The reader's subscription ends without the new state; the owner's goes on.
    let mut seen = Vec::new();
    while let Some(b) = reader.next_block(Duration::from_secs(10)).await {
        seen.push(b.body_text());
    }
    assert!(!seen.iter().any(|t| t.contains('2')), "the reader got {seen:?}");
    assert_eq!(
        owner_sub
            .next_block(Duration::from_secs(10))
            .await
            .unwrap()
            .body_text(),
        "1"
    );
    assert_eq!(
        owner_sub
            .next_block(Duration::from_secs(10))
            .await
            .unwrap()
            .body_text(),
        "2"
    );
    // A new subscription is refused.
    let again = wire::subscribe(p.addr, "/feed", &[("Subscribe", "true")]).await;
    assert_eq!(again.status, 401);
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws(p: &Plait, auth: Option<&str>) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}/_connect_to_statebus_/websocket", p.addr)
        .into_client_request()
        .unwrap();
    if let Some(a) = auth {
        req.headers_mut().insert("authorization", a.parse().unwrap());
    }
    tokio_tungstenite::connect_async(req)
        .await
        .expect("websocket opens")
        .0
}

async fn recv(s: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("a frame within 10 s")
            .expect("the connection is open")
            .unwrap();
        if let Message::Text(t) = m {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

/// The next frame about `key` (skipping others).
async fn recv_about(s: &mut Ws, key: &str) -> Value {
    loop {
        let v = recv(s).await;
        if v["about"] == key || v["set"]["key"] == key {
            return v;
        }
    }
}

async fn statebus_callers_go_through_the_same_rules(store: Store) {
    let p = owned(store);
    let mut anon = ws(&p, None).await;
    anon.send(Message::text(
        r#"{"set":{"key":"current_user","val":{"client":"c1"}}}"#,
    ))
    .await
    .unwrap();
    // An anonymous set is refused with a reason; the connection stays and the state is unchanged.
    anon.send(Message::text(r#"{"set":{"key":"chat","val":"spam"}}"#))
        .await
        .unwrap();
    let e = recv_about(&mut anon, "chat").await;
    assert_eq!(e["status"], 401, "{e}");
    assert_eq!(e["op"], "write");
    let revert = recv_about(&mut anon, "chat").await;
    assert!(revert["set"].get("val").is_none(), "{revert}");
    anon.send(Message::text(r#"{"delete":"chat"}"#)).await.unwrap();
    assert_eq!(recv_about(&mut anon, "chat").await["op"], "delete");
    // The owner's token on the upgrade makes the connection the owner's.
    let owner = bearer(&p.owner_token());
    let mut own = ws(&p, Some(&owner)).await;
    own.send(Message::text(r#"{"set":{"key":"chat","val":"hello"}}"#))
        .await
        .unwrap();
    own.send(Message::text(r#"{"get":".well-known/plait/access"}"#))
        .await
        .unwrap();
    let rules = recv_about(&mut own, ".well-known/plait/access").await;
    assert_eq!(rules["set"]["val"]["rules"][0]["path"], "/", "{rules}");
    // Anonymous readers follow chat until the owner takes reading away.
    anon.send(Message::text(r#"{"get":"chat"}"#)).await.unwrap();
    assert_eq!(recv_about(&mut anon, "chat").await["set"]["val"], "hello");
    anon.send(Message::text(r#"{"get":".well-known/plait/access"}"#))
        .await
        .unwrap();
    assert_eq!(
        recv_about(&mut anon, ".well-known/plait/access").await["status"],
        401
    );
    let new_rules = json!({"rules": [
        {"path": "/", "read": ["everyone"], "write": ["owner"], "delete": ["owner"]},
        {"path": "/chat", "deny": {"read": ["everyone"]}},
    ]});
    own.send(Message::text(
        json!({"set": {"key": ".well-known/plait/access", "val": new_rules}}).to_string(),
    ))
    .await
    .unwrap();
    let ended = recv_about(&mut anon, "chat").await;
    assert_eq!(ended["status"], 401, "{ended}");
    own.send(Message::text(r#"{"set":{"key":"chat","val":"after"}}"#))
        .await
        .unwrap();
    // The anonymous connection gets its emptied state, never "after".
    let cleared = recv_about(&mut anon, "chat").await;
    assert!(cleared["set"].get("val").is_none(), "{cleared}");
    let quiet = tokio::time::timeout(Duration::from_millis(500), recv(&mut anon)).await;
    assert!(quiet.is_err(), "nothing more: {quiet:?}");
    // A bad rules document over the websocket is refused with a reason.
    own.send(Message::text(
        r#"{"set":{"key":".well-known/plait/access","val":{"rules":[{"path":"nope"}]}}}"#,
    ))
    .await
    .unwrap();
    let e = recv_about(&mut own, ".well-known/plait/access").await;
    assert!(e["error"].as_str().unwrap().contains("starts with /"), "{e}");
}

/// A version id that names a writer's peer is no key to its session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_id_is_no_session() {
    let p = owned(Store::Embedded);
    let alice = login(&p, "alice", "pw", true).await;
    let r = put(
        &p,
        "/@alice/note",
        &[("Cookie", alice.as_str()), ("Peer", "alicepeer")],
        "mine",
    )
    .await;
    assert_eq!(r.status, 200);
    let version = r.header("version").unwrap().to_string();
    assert!(version.contains("alicepeer"), "{version}");
    // Someone who read that version tries it as a peer, a cookie and a session.
    let agent = "alicepeer";
    for h in [
        ("Peer", agent.to_string()),
        ("Cookie", format!("peer={agent}")),
        ("Cookie", format!("plait_session={agent}")),
    ] {
        let headers = [(h.0, h.1.as_str())];
        let cu = wire::send(p.addr, "GET", "/current_user", &headers, b"").await;
        assert_eq!(json_of(&cu)["logged_in"], false, "{h:?}");
        assert_eq!(
            put(&p, "/@alice/note", &headers, "defaced").await.status,
            401,
            "{h:?}"
        );
    }
    // Nothing stored or served carries the session secret.
    let secret = alice.trim_start_matches("plait_session=");
    let history = wire::send(p.addr, "GET", "/@alice/note", &[("Parents", "\"root\"")], b"").await;
    assert!(!history.text().contains(secret));
    assert!(!p.log().contains(secret));
}

/// Sends one request from `from` (a loopback address of its own).
async fn send_from(from: &str, to: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(to).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {to}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_is_cut_off_while_others_log_in() {
    let p = owned(Store::Embedded);
    login(&p, "victim", "right", true).await;
    login(&p, "other", "right2", true).await;
    let wrong = json!({"login_as": {"name": "victim", "pass": "wrong"}}).to_string();
    let mut statuses = std::collections::BTreeMap::new();
    let mut refusal = None;
    // In waves of 200 at once (within `max_connections_per_address`): each 429 is held
    // a second (`limits.rate_limited_delay_ms`), so a flood asking one at a time would
    // make about one attempt a second.
    for _ in 0..5 {
        let wave = (0..200).map(|_| send_from("127.0.0.7", p.addr, "PUT", "/current_user", &wrong));
        for (status, text) in futures::future::join_all(wave).await {
            *statuses.entry(status).or_insert(0) += 1;
            if status == 429 {
                refusal = Some(text);
            }
        }
    }
    // At most the per-address burst was even tried; the rest were refused with 429,
    // saying when to try again. (A single attempt after the waves is not asked: on a
    // loaded machine the waves take long enough for the address's budget to refill.)
    assert!(statuses.get(&429).copied().unwrap_or(0) >= 980, "{statuses:?}");
    let text = refusal.expect("a refusal");
    assert!(text.to_lowercase().contains("retry-after"), "{text}");
    // Another address still logs in, to another account.
    let ok = json!({"login_as": {"name": "other", "pass": "right2"}}).to_string();
    let (status, text) = send_from("127.0.0.8", p.addr, "PUT", "/current_user", &ok).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"logged_in\":true"), "{text}");
    // An unknown name and a wrong password get the same answer.
    let unknown = json!({"login_as": {"name": "nobody-here", "pass": "wrong"}}).to_string();
    let (_, a) = send_from("127.0.0.9", p.addr, "PUT", "/current_user", &unknown).await;
    let known = json!({"login_as": {"name": "other", "pass": "wrong"}}).to_string();
    let (_, b) = send_from("127.0.0.9", p.addr, "PUT", "/current_user", &known).await;
    let body = |t: &str| t.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    assert_eq!(body(&a), body(&b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_network_to_the_owner_only() {
    let p = Plait::start_with_env(
        Store::Embedded,
        &["--p2p-listen", "/ip4/127.0.0.1/tcp/0"],
        &[("PLAIT_ACCESS__PUBLIC_WRITES", "false")],
    );
    let public: Value = json_of(&wire::send(p.addr, "GET", "/.well-known/plait", &[], b"").await);
    assert_eq!(public["p2p"], json!({"enabled": true}));
    assert_eq!(public["access"]["public_writes"], false);
    assert!(public["limits"].is_object());
    let (k, v) = p.owner_auth();
    let own = json_of(&wire::send(p.addr, "GET", "/.well-known/plait", &[(k, v.as_str())], b"").await);
    assert!(own["p2p"]["status"]["peer_id"].is_string(), "{own}");
}

/// In Chromium, HTML written as state runs no script on the server's origin, while the
/// owner's own page from --web-dir does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_html_runs_no_script_in_a_browser() {
    let web = tempfile::tempdir().unwrap();
    let html = "<!doctype html><body><script>document.body.dataset.ran = 'yes'; try { localStorage.x = 1 } catch (e) {}</script></body>";
    std::fs::write(web.path().join("own.html"), html).unwrap();
    let p = Plait::start_with_env(
        Store::Embedded,
        &["--web-dir", web.path().to_str().unwrap()],
        &[("PLAIT_ACCESS__PUBLIC_WRITES", "false")],
    );
    let owner = bearer(&p.owner_token());
    let r = put(
        &p,
        "/stored",
        &[("Authorization", owner.as_str()), ("Content-Type", "text/html")],
        html,
    )
    .await;
    assert_eq!(r.status, 200);
    let base = format!("http://{}", p.addr);
    let out = tokio::task::spawn_blocking(move || {
        plait_tests::node::run("stored_html.js", &[&base, "/stored", "/own.html"])
    })
    .await
    .unwrap();
    assert!(out.contains("ok:"), "{out}");
}

/// Signs a request as `key` would (RFC 9421), for `wire::send`.
fn signed(
    p: &Plait,
    key: &plait_bridge::Keypair,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    now: u64,
) -> Vec<(String, String)> {
    let mut h = http::HeaderMap::new();
    plait_server::access::signature::sign_request(
        key,
        &method.parse().unwrap(),
        &format!("http://{}{path}", p.addr),
        &mut h,
        body,
        now,
        60,
    )
    .unwrap();
    h.iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
        .collect()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn send_signed(
    p: &Plait,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> wire::Response {
    let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    wire::send(p.addr, method, path, &h, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_requests_act_as_their_identity() {
    let p = owned(Store::Embedded);
    let friend = plait_bridge::Keypair::generate();
    let stranger = plait_bridge::Keypair::generate();
    let rules = json!({"rules": [
        {"path": "/", "read": ["everyone"], "write": ["owner"], "delete": ["owner"]},
        {"path": "/inbox", "write": [format!("identity:{}", friend.identity())]},
    ]});
    set_rules(&p, &rules).await;
    // The friend's signed PUT lands, attributed to it.
    let h = signed(&p, &friend, "PUT", "/inbox/1", Some(b"hello"), now());
    let r = send_signed(&p, "PUT", "/inbox/1", &h, b"hello").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        wire::send(p.addr, "GET", "/inbox/1", &[], b"").await.text(),
        "hello"
    );
    // The same request again is a replay.
    let r = send_signed(&p, "PUT", "/inbox/1", &h, b"hello").await;
    assert_eq!(
        (r.status, r.header("plait-error")),
        (401, Some("signature-replayed")),
        "{}",
        r.text()
    );
    // A body that is not the one signed.
    let h = signed(&p, &friend, "PUT", "/inbox/2", Some(b"hello"), now());
    let r = send_signed(&p, "PUT", "/inbox/2", &h, b"HELLO").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(wire::send(p.addr, "GET", "/inbox/2", &[], b"").await.text(), "");
    // Another path than the one signed.
    let h = signed(&p, &friend, "PUT", "/inbox/3", Some(b"x"), now());
    assert_eq!(send_signed(&p, "PUT", "/inbox/4", &h, b"x").await.status, 401);
    // Expired, and from the future beyond the skew.
    let h = signed(&p, &friend, "PUT", "/inbox/5", Some(b"x"), now() - 3600);
    assert_eq!(send_signed(&p, "PUT", "/inbox/5", &h, b"x").await.status, 401);
    let h = signed(&p, &friend, "PUT", "/inbox/6", Some(b"x"), now() + 3600);
    assert_eq!(send_signed(&p, "PUT", "/inbox/6", &h, b"x").await.status, 401);
    // A forgery: signed by a stranger, claiming to be the friend.
    let mut h = signed(&p, &stranger, "PUT", "/inbox/7", Some(b"x"), now());
    for (k, v) in h.iter_mut() {
        if k == "signature-input" {
            *v = v.replace(&stranger.identity().to_string(), &friend.identity().to_string());
        }
    }
    assert_eq!(send_signed(&p, "PUT", "/inbox/7", &h, b"x").await.status, 401);
    // A genuine stranger is who it says, and the rules do not let it write: 403.
    let h = signed(&p, &stranger, "PUT", "/inbox/8", Some(b"x"), now());
    let r = send_signed(&p, "PUT", "/inbox/8", &h, b"x").await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(json_of(&r)["rule"], "/inbox");
    // The friend is no owner elsewhere.
    let h = signed(&p, &friend, "PUT", "/elsewhere", Some(b"x"), now());
    assert_eq!(send_signed(&p, "PUT", "/elsewhere", &h, b"x").await.status, 403);
    // Signed with the instance key, a request is the owner's.
    let keys = plait_bridge::Keypair::load(&p.data_dir().join("identity.pem")).unwrap();
    let h = signed(&p, &keys, "DELETE", "/inbox/1", None, now());
    assert_eq!(send_signed(&p, "DELETE", "/inbox/1", &h, b"").await.status, 204);
}

/// Who asks, in the caller × way-in matrix.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    Anonymous,
    Alice,
    Bob,
    /// A token that writes `/tok` and reads `/secret`.
    Token,
    /// A signed request from an identity the rules name.
    Friend,
    Owner,
}

/// Whether `who` may do `op` ("read", "write", "delete") on `path` under [`MATRIX_RULES`].
fn allowed(who: Who, op: &str, path: &str) -> bool {
    use Who::*;
    let top = path.split('/').nth(1).unwrap();
    who == Owner
        || match (op, top) {
            ("read", "secret") => who == Token,
            ("read", _) => true,
            ("write", "acct") => matches!(who, Alice | Bob),
            ("delete", "acct") => who == Alice,
            (_, "friend") => who == Friend,
            (_, "tok") => who == Token,
            _ => false,
        }
}

fn matrix_rules(friend: &plait_bridge::Keypair) -> Value {
    let friend = format!("identity:{}", friend.identity());
    json!({"rules": [
        {"path": "/", "read": ["everyone"], "write": ["owner"], "delete": ["owner"]},
        {"path": "/secret", "read": ["owner"]},
        {"path": "/acct", "write": ["accounts"], "delete": ["account:alice"]},
        {"path": "/friend", "write": [friend], "delete": [friend]},
    ]})
}

/// The paths each caller is tried on.
const MATRIX_PATHS: [&str; 5] = ["/plain", "/secret", "/acct", "/friend", "/tok"];

struct Callers {
    alice: String,
    bob: String,
    token: String,
    friend: plait_bridge::Keypair,
}

impl Callers {
    /// The credential headers of `who` for `method path` (a signature covers exactly one
    /// request).
    fn headers(&self, p: &Plait, who: Who, method: &str, path: &str, body: &[u8]) -> Vec<(String, String)> {
        let one = |k: &str, v: String| vec![(k.to_string(), v)];
        match who {
            Who::Anonymous => vec![],
            Who::Alice => one("Cookie", self.alice.clone()),
            Who::Bob => one("Cookie", self.bob.clone()),
            Who::Token => one("Authorization", bearer(&self.token)),
            Who::Owner => one("Authorization", bearer(&p.owner_token())),
            Who::Friend => {
                let body = (!body.is_empty() || method == "PUT").then_some(body);
                signed(p, &self.friend, method, path, body, now())
            }
        }
    }
}

const EVERY_CALLER: [Who; 6] = [
    Who::Anonymous,
    Who::Alice,
    Who::Bob,
    Who::Token,
    Who::Friend,
    Who::Owner,
];

async fn matrix_server(store: Store) -> (Plait, Callers) {
    let p = owned(store);
    let friend = plait_bridge::Keypair::generate();
    set_rules(&p, &matrix_rules(&friend)).await;
    let callers = Callers {
        alice: login(&p, "alice", "pw-a", true).await,
        bob: login(&p, "bob", "pw-b", true).await,
        token: p.token(&["--write", "/tok", "--read", "/secret"]),
        friend,
    };
    let (k, v) = p.owner_auth();
    for path in MATRIX_PATHS {
        for who in EVERY_CALLER {
            for what in ["r", "d"] {
                let at = format!("{path}/{who:?}-{what}");
                assert_eq!(put(&p, &at, &[(k, v.as_str())], "seed").await.status, 200);
            }
        }
    }
    (p, callers)
}

/// The owner's view of `path` (a resource never written, or deleted, reads as empty).
async fn owner_reads(p: &Plait, path: &str) -> String {
    let (k, v) = p.owner_auth();
    let r = wire::send(p.addr, "GET", path, &[(k, v.as_str())], b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
}

/// Every caller reads, writes and deletes on every path over Braid-HTTP, and is allowed or
/// refused (401 when anonymous, 403 otherwise) as the rules say; a refused write or delete
/// changes nothing.
async fn every_caller_over_http_as_the_rules_say(store: Store) {
    let (p, c) = matrix_server(store).await;
    for who in EVERY_CALLER {
        let refused = if who == Who::Anonymous { 401 } else { 403 };
        for path in MATRIX_PATHS {
            let at = format!("{path}/{who:?}-r");
            let h = c.headers(&p, who, "GET", &at, b"");
            let r = send_signed(&p, "GET", &at, &h, b"").await;
            let want = if allowed(who, "read", path) { 200 } else { refused };
            assert_eq!(r.status, want, "{who:?} reads {at}: {}", r.text());
            if want == 200 {
                assert_eq!(r.text(), "seed");
            }

            let at = format!("{path}/{who:?}-w");
            let body = format!("by {who:?}");
            let h = c.headers(&p, who, "PUT", &at, body.as_bytes());
            let r = send_signed(&p, "PUT", &at, &h, body.as_bytes()).await;
            let ok = allowed(who, "write", path);
            assert_eq!(
                r.status,
                if ok { 200 } else { refused },
                "{who:?} writes {at}: {}",
                r.text()
            );
            assert_eq!(owner_reads(&p, &at).await == body, ok, "{who:?} writes {at}");

            let at = format!("{path}/{who:?}-d");
            let h = c.headers(&p, who, "DELETE", &at, b"");
            let r = send_signed(&p, "DELETE", &at, &h, b"").await;
            let ok = allowed(who, "delete", path);
            assert_eq!(
                r.status,
                if ok { 204 } else { refused },
                "{who:?} deletes {at}: {}",
                r.text()
            );
            assert_eq!(owner_reads(&p, &at).await != "seed", ok, "{who:?} deletes {at}");
        }
    }
}

/// The same matrix over the Statebus websocket: the caller is proved once, on the upgrade
/// (a bearer token, a login session cookie, or a signature over the upgrade request).
async fn every_caller_over_statebus_as_the_rules_say(store: Store) {
    let (p, c) = matrix_server(store).await;
    let url = "/_connect_to_statebus_/websocket";
    for who in EVERY_CALLER {
        let refused = if who == Who::Anonymous { 401 } else { 403 };
        let mut s = {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let mut req = format!("ws://{}{url}", p.addr).into_client_request().unwrap();
            for (k, v) in c.headers(&p, who, "GET", url, b"") {
                let name = http::HeaderName::from_bytes(k.as_bytes()).unwrap();
                req.headers_mut().insert(name, v.parse().unwrap());
            }
            let upgraded = tokio_tungstenite::connect_async(req).await;
            upgraded
                .unwrap_or_else(|e| panic!("{who:?} opens a websocket: {e}"))
                .0
        };
        for path in MATRIX_PATHS {
            let key = format!("{}/{who:?}-r", &path[1..]);
            s.send(Message::text(json!({"get": key}).to_string()))
                .await
                .unwrap();
            let f = recv_about(&mut s, &key).await;
            if allowed(who, "read", path) {
                assert_eq!(f["set"]["val"], "seed", "{who:?} gets {key}: {f}");
            } else {
                assert_eq!(f["status"], refused, "{who:?} gets {key}: {f}");
                assert_eq!(f["op"], "read");
            }

            let key = format!("{}/{who:?}-w", &path[1..]);
            let val = format!("by {who:?}");
            s.send(Message::text(
                json!({"set": {"key": key, "val": val}}).to_string(),
            ))
            .await
            .unwrap();
            if allowed(who, "write", path) {
                let at = format!("/{key}");
                let written = eventually(|| async { owner_reads(&p, &at).await.contains(&val) }).await;
                assert!(written, "{who:?} sets {key}");
            } else {
                let f = recv_about(&mut s, &key).await;
                assert_eq!(
                    (f["status"].clone(), f["op"].clone()),
                    (json!(refused), json!("write")),
                    "{who:?} sets {key}: {f}"
                );
                assert_eq!(owner_reads(&p, &format!("/{key}")).await, "");
            }

            let key = format!("{}/{who:?}-d", &path[1..]);
            s.send(Message::text(json!({"delete": key}).to_string()))
                .await
                .unwrap();
            let at = format!("/{key}");
            if allowed(who, "delete", path) {
                let gone = eventually(|| async { owner_reads(&p, &at).await != "seed" }).await;
                assert!(gone, "{who:?} deletes {key}");
            } else {
                let f = recv_about(&mut s, &key).await;
                assert_eq!(
                    (f["status"].clone(), f["op"].clone()),
                    (json!(refused), json!("delete")),
                    "{who:?} deletes {key}: {f}"
                );
                assert_eq!(owner_reads(&p, &at).await, "seed");
            }
        }
    }
}

/// Whether `check` comes true within five seconds.
async fn eventually<F, Fut>(check: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
