//! `plait import statebus`: a statebus server's store (file_store `db`, sqlite `cache`,
//! Postgres `store`) becomes Plait state; accounts keep their bcrypt passwords, sessions
//! stay logged in, and importing again changes nothing.

use std::process::Command;

use plait_tests::plait::{Plait, Store, binary};
use plait_tests::wire;
use serde_json::json;

fn bcrypt_2a(pass: &str) -> String {
    bcrypt::hash_with_result(pass, 4)
        .unwrap()
        .format_for_version(bcrypt::Version::TwoA)
}

fn import(source: &str, data_dir: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(binary())
        .args(["import", "statebus", source, "--data-dir"])
        .arg(data_dir)
        .env_remove("DATABASE_URL")
        .env_remove("PLAIT_DATABASE_URL")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn put_json(p: &Plait, path: &str, cookie: &str, body: serde_json::Value) -> serde_json::Value {
    let c = format!("plait_session={cookie}");
    let r = wire::send(
        p.addr,
        "PUT",
        path,
        &[("Cookie", &c), ("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .await;
    serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null)
}

async fn get(p: &Plait, path: &str, cookie: &str) -> wire::Response {
    let c = format!("plait_session={cookie}");
    wire::send(p.addr, "GET", path, &[("Cookie", &c)], b"").await
}

#[tokio::test]
async fn a_file_store_db_with_accounts_and_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (bcrypt_2a("alicepw"), bcrypt_2a("bobpw"));
    let db = json!({
        "@alice": {"key": "@alice", "val": {"name": "alice", "pass": alice, "email": "alice@example.com", "bio": "hi"}},
        "users": {"key": "users", "val": [{"link": "@alice"}]},
        "users/passwords": {"key": "users/passwords", "val": {"alice": {"user": "@alice", "pass": alice}}},
        "logged_in_clients": {"key": "logged_in_clients", "val": {"oldclient123": {"link": "@alice"}}},
        "chat": {"key": "chat", "val": {"messages": [{"text": "hi", "author": {"link": "@alice"}}], "title": "Chat"}},
        "@alice/notes": {"key": "@alice/notes", "val": "alice's notes"},
        "user/bob": {"key": "user/bob", "name": "bob", "pass": bob, "email": "bob@example.com"},
        "v6thing": {"key": "v6thing", "zed": 1, "alpha": "two"},
        "current_user": {"key": "current_user", "val": {"logged_in": false}},
    });
    let file = dir.path().join("db");
    std::fs::write(&file, serde_json::to_string_pretty(&db).unwrap()).unwrap();
    let data = dir.path().join("plait");
    let (ok, out, err) = import(file.to_str().unwrap(), &data);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("2 accounts created") && out.contains("1 sessions"),
        "{out}"
    );
    assert!(
        err.contains("skipped users:") && err.contains("skipped current_user:"),
        "{err}"
    );
    // Again: nothing new.
    let (ok, out, _) = import(file.to_str().unwrap(), &data);
    assert!(ok);
    assert!(
        out.contains(" 0 values written") && out.contains("0 accounts created, 2 updated"),
        "{out}"
    );

    let p = plait_on(&data).await;
    assert_eq!(
        get(&p, "/chat", "x").await.text(),
        r#"{"messages":[{"text":"hi","author":{"link":"@alice"}}],"title":"Chat"}"#
    );
    assert_eq!(
        get(&p, "/v6thing", "x").await.text(),
        r#"{"key":"v6thing","zed":1,"alpha":"two"}"#
    );
    // The bcrypt passwords still work, for the v7 and the v6 account.
    let v = put_json(
        &p,
        "/current_user",
        "fresh",
        json!({"login_as": {"name": "alice", "pass": "alicepw"}}),
    )
    .await;
    assert_eq!(v["logged_in"], true, "{v}");
    let v = put_json(
        &p,
        "/current_user",
        "fresh2",
        json!({"login_as": {"name": "bob", "pass": "bobpw"}}),
    )
    .await;
    assert_eq!(v["logged_in"], true, "{v}");
    let v = put_json(
        &p,
        "/current_user",
        "fresh3",
        json!({"login_as": {"name": "bob", "pass": "nope"}}),
    )
    .await;
    assert_eq!(v["logged_in"], false);
    // The imported session is logged in; the closet and profile came along.
    let v: serde_json::Value =
        serde_json::from_slice(&get(&p, "/current_user", "oldclient123").await.body).unwrap();
    assert_eq!(v, json!({"user": {"link": "@alice"}, "logged_in": true}));
    assert_eq!(get(&p, "/@alice/notes", "x").await.text(), r#""alice's notes""#);
    let profile = get(&p, "/@alice", "x").await.text();
    assert!(
        profile.contains(r#""bio":"hi""#)
            && !profile.contains("pass")
            && !profile.contains("alice@example.com"),
        "{profile}"
    );
}

/// A plait server on an existing data dir.
async fn plait_on(data: &std::path::Path) -> Plait {
    let mut p = Plait::start(Store::Embedded);
    p.kill9();
    p.use_data_dir(data);
    p.restart();
    p
}

#[tokio::test]
async fn a_sqlite_cache_and_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("statebus.sqlite");
    {
        let c = rusqlite::Connection::open(&file).unwrap();
        c.execute_batch("create table cache (key text primary key, obj text)")
            .unwrap();
        let carol = bcrypt_2a("carolpw");
        for (k, v) in [
            (
                "@carol",
                json!({"key": "@carol", "val": {"name": "carol", "pass": carol}}),
            ),
            ("board", json!({"key": "board", "val": {"pins": [1, 2, 3]}})),
        ] {
            c.execute(
                "insert into cache values (?1, ?2)",
                rusqlite::params![k, v.to_string()],
            )
            .unwrap();
        }
    }
    // With the embedded store, a running server holds the data dir: import says so.
    let p = Plait::start(Store::Embedded);
    let (ok, _, err) = import(file.to_str().unwrap(), p.data_dir());
    assert!(!ok && err.contains("another plait server is using"), "{err}");
    let data = dir.path().join("plait");
    let (ok, out, err) = import(file.to_str().unwrap(), &data);
    assert!(ok, "{out}{err}");
    let p = plait_on(&data).await;
    assert_eq!(get(&p, "/board", "x").await.text(), r#"{"pins":[1,2,3]}"#);
    let v = put_json(
        &p,
        "/current_user",
        "c",
        json!({"login_as": {"name": "carol", "pass": "carolpw"}}),
    )
    .await;
    assert_eq!(v["logged_in"], true, "{v}");
}

#[tokio::test]
async fn a_postgres_store_with_pointers() {
    let url = plait_tests::pg::fresh_database();
    let dave = bcrypt_2a("davepw");
    plait_tests::pg::cluster().psql(
        &url,
        &format!(
            "create table store (key text primary key, value jsonb);
             insert into store values
               ('@dave', '{{\"key\":\"@dave\",\"val\":{{\"name\":\"dave\",\"pass\":\"{dave}\"}}}}'),
               ('post/1', '{{\"key\":\"post/1\",\"val\":{{\"text\":\"first\"}}}}'),
               ('feed', '{{\"key\":\"feed\",\"val\":{{\"posts\":[{{\"_key\":\"post/1\"}}]}}}}');"
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, err) = import(&url, dir.path());
    assert!(ok, "{out}{err}");
    let p = plait_on(dir.path()).await;
    // pg_store's pointers become links.
    assert_eq!(
        get(&p, "/feed", "x").await.text(),
        r#"{"posts":[{"key":"post/1"}]}"#
    );
    assert_eq!(get(&p, "/post/1", "x").await.text(), r#"{"text":"first"}"#);
    let v = put_json(
        &p,
        "/current_user",
        "d",
        json!({"login_as": {"name": "dave", "pass": "davepw"}}),
    )
    .await;
    assert_eq!(v["logged_in"], true, "{v}");
}
