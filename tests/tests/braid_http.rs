//! Braid-HTTP behaviour of the real `plait` binary over raw HTTP/1.1, on both stores.
//!
//! Every test runs twice: on the embedded store and on Postgres.

use std::time::Duration;

use plait_tests::plait::{Plait, Store};
use plait_tests::wire::{self, Block, Subscription};

const T: Duration = Duration::from_secs(5);

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test] async fn $name() { super::$name(plait_tests::plait::Store::Embedded).await })*
        }
        mod postgres {
            $(#[tokio::test] async fn $name() { super::$name(plait_tests::plait::Store::fresh_postgres()).await })*
        }
    };
}

on_both_stores!(
    text_lifecycle_with_exact_framing,
    subscribe_spellings_and_headers,
    json_resources,
    bytes_resources,
    delete_tells_subscribers,
    history_and_resume,
    concurrent_writes_merge,
    bad_input_is_refused_and_stores_nothing,
    heartbeats,
    namespaces,
    simpleton_clients_converge_after_concurrent_edits,
    repr_digest_is_verified,
    random_concurrent_edits_converge_everywhere_and_survive_restart,
);

async fn put(p: &Plait, path: &str, headers: &[(&str, &str)], body: &str) -> wire::Response {
    wire::send(p.addr, "PUT", path, headers, body.as_bytes()).await
}

async fn get(p: &Plait, path: &str, headers: &[(&str, &str)]) -> wire::Response {
    wire::send(p.addr, "GET", path, headers, b"").await
}

async fn next(s: &mut Subscription) -> Block {
    s.next_block(T).await.expect("an update within 5 s")
}

fn patches(b: &Block) -> Vec<(String, String)> {
    b.patches
        .iter()
        .map(|(r, c)| (r.clone(), String::from_utf8(c.clone()).unwrap()))
        .collect()
}

async fn text_lifecycle_with_exact_framing(store: Store) {
    let p = Plait::start(store);
    let r = get(&p, "/notes/a", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"");
    assert_eq!(r.header("version"), Some(""));

    let mut s = wire::subscribe(p.addr, "/notes/a", &[("Subscribe", "true")]).await;
    assert_eq!(s.status, 209);
    let first = next(&mut s).await;
    assert_eq!(first.status, Some(200));
    assert_eq!(first.header("version"), Some(""));
    assert_eq!(first.header("parents"), Some(""));
    assert_eq!(first.body.as_deref(), Some(&b""[..]));

    let r = put(&p, "/notes/a", &[("Content-Type", "text/plain")], "hello").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v1 = r.header("version").unwrap().to_string();
    assert!(
        v1.starts_with('"') && v1.ends_with("-4\""),
        "server-assigned id counts 5 code points: {v1}"
    );
    let u = next(&mut s).await;
    assert_eq!(u.header("version"), Some(v1.as_str()));
    assert_eq!(u.header("parents"), Some(""));
    assert_eq!(patches(&u), vec![("text [0:0]".into(), "hello".into())]);
    assert_eq!(
        u.header("repr-digest"),
        Some("sha-256=:LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=:"),
        "digest of \"hello\" as braid-text computes it"
    );

    let r = put(
        &p,
        "/notes/a",
        &[
            ("Version", "\"bob-5\""),
            ("Parents", &v1),
            ("Content-Range", "text [5:5]"),
        ],
        " wörld",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("version"), Some("\"bob-5\""));
    let u = next(&mut s).await;
    assert_eq!(u.header("parents"), Some(v1.as_str()));
    assert_eq!(patches(&u), vec![("text [5:5]".into(), " wörld".into())]);

    // Patches: 2, the way braid-http 1.4 writes them (capitalised, http-patches type).
    let body = "Content-Length: 1\r\nContent-Range: text [0:1]\r\n\r\nH\r\n\r\nContent-Length: 1\r\nContent-Range: text [11:11]\r\n\r\n!\r\n";
    let r = put(
        &p,
        "/notes/a",
        &[
            ("Version", "\"carol-2\""),
            ("Parents", "\"bob-5\""),
            ("Patches", "2"),
            ("Content-Type", "application/http-patches; count=2"),
        ],
        body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let u = next(&mut s).await;
    assert_eq!(
        patches(&u),
        vec![
            ("text [0:1]".into(), "H".into()),
            ("text [11:11]".into(), "!".into())
        ]
    );

    let r = put(
        &p,
        "/notes/a",
        &[
            ("Version", "\"dave-5\""),
            ("Parents", "\"carol-2\""),
            ("Content-Range", "text [5:11]"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    next(&mut s).await;
    let r = get(&p, "/notes/a", &[]).await;
    assert_eq!(r.text(), "Hello!");
    assert_eq!(r.header("version"), Some("\"dave-5\""));
    assert_eq!(r.header("content-type"), Some("text/plain"));

    // A full-body PUT is diffed into patches for subscribers.
    put(&p, "/notes/a", &[], "Hello, you!").await;
    let u = next(&mut s).await;
    assert_eq!(patches(&u), vec![("text [5:5]".into(), ", you".into())]);

    // HEAD: headers without a body.
    let r = wire::send(p.addr, "HEAD", "/notes/a", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("11"));
    assert!(r.body.is_empty());
}

async fn subscribe_spellings_and_headers(store: Store) {
    let p = Plait::start(store);
    put(&p, "/doc", &[], "x").await;
    for value in ["true", "?1", ""] {
        let mut s = wire::subscribe(p.addr, "/doc", &[("Subscribe", value)]).await;
        assert_eq!(s.status, 209, "Subscribe: {value:?}");
        assert_eq!(s.header("subscribe"), Some(value));
        assert_eq!(
            s.header("cache-control"),
            Some("no-cache, no-transform, no-store")
        );
        assert_eq!(s.header("x-accel-buffering"), Some("no"));
        assert_eq!(s.header("transfer-encoding"), Some("chunked"));
        assert_eq!(next(&mut s).await.body_text(), "x");
    }
    // `Subscribe: false` is a plain GET.
    let r = get(&p, "/doc", &[("Subscribe", "false")]).await;
    assert_eq!(r.status, 200);
    // The raw bytes of the first block, as BRAID.md §3.3 captures them.
    let mut s = wire::subscribe(p.addr, "/fresh", &[("Subscribe", "true")]).await;
    let raw = s.raw_for(Duration::from_millis(300)).await;
    assert_eq!(
        String::from_utf8(raw).unwrap(),
        "HTTP 200 OK\r\nVersion: \r\nParents: \r\nContent-Length: 0\r\n\r\n\r\n\r\n"
    );
    // Peer quoted and unquoted both name the agent of unversioned writes.
    let r = put(&p, "/peer", &[("Peer", "alice")], "ab").await;
    assert_eq!(r.header("version"), Some("\"alice-1\""));
    let r = put(&p, "/peer", &[("Peer", "\"alice\"")], "abcd").await;
    assert_eq!(
        r.header("version"),
        Some("\"alice-3\""),
        "the same peer's next edit does not collide"
    );
}

async fn json_resources(store: Store) {
    let p = Plait::start(store);
    let accept = [("Accept", "application/json")];
    let r = get(&p, "/state/k1", &accept).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("plait-error"), Some("not-found"));
    let mut s = wire::subscribe(
        p.addr,
        "/state/k1",
        &[("Subscribe", "true"), ("Accept", "application/json")],
    )
    .await;
    assert_eq!(s.status, 209);
    let first = next(&mut s).await;
    assert_eq!(first.status, Some(404));
    let r = put(
        &p,
        "/state/k1",
        &[("Content-Type", "application/json")],
        r#"{"n":1,"s":"hello","list":[1,2,{"x":true}]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let u = next(&mut s).await;
    assert_eq!(u.status, Some(200));
    let v: serde_json::Value = serde_json::from_slice(u.body.as_ref().unwrap()).unwrap();
    assert_eq!(v, serde_json::json!({"n":1,"s":"hello","list":[1,2,{"x":true}]}));
    let r = put(&p, "/state/k1", &[("Content-Range", "json .list[1:2]")], "[7,8]").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let u = next(&mut s).await;
    let v: serde_json::Value = serde_json::from_slice(u.body.as_ref().unwrap()).unwrap();
    assert_eq!(v["list"], serde_json::json!([1, 7, 8, {"x": true}]));
    let r = get(&p, "/state/k1", &accept).await;
    assert_eq!(r.header("content-type"), Some("application/json"));
    // An unchanged value is not a new version and is not broadcast.
    let before = r.header("version").unwrap().to_string();
    let same = r.text();
    let r = put(&p, "/state/k1", &[("Content-Type", "application/json")], &same).await;
    assert_eq!(r.header("version"), Some(before.as_str()));
    assert!(
        s.next_block(Duration::from_millis(300)).await.is_none(),
        "no update for an unchanged value"
    );
    // Empty values create resources too.
    put(&p, "/state/empty", &[("Content-Type", "application/json")], "{}").await;
    assert_eq!(get(&p, "/state/empty", &accept).await.text(), "{}");
    // A JSON body cannot replace a text resource.
    put(&p, "/t", &[], "text").await;
    let r = put(&p, "/t", &[("Content-Type", "application/json")], "1").await;
    assert_eq!(r.status, 415);
}

async fn bytes_resources(store: Store) {
    let p = Plait::start(store);
    let png = b"\x89PNG\r\n\x1a\n\x00\x01binary\xff";
    let r = wire::send(
        p.addr,
        "PUT",
        "/img/logo.png",
        &[("Content-Type", "image/png")],
        png,
    )
    .await;
    assert_eq!(r.status, 200);
    let r = get(&p, "/img/logo.png", &[]).await;
    assert_eq!(r.body, png);
    assert_eq!(r.header("content-type"), Some("image/png"));
    let r = wire::send(
        p.addr,
        "PUT",
        "/img/logo.png",
        &[("Content-Range", "bytes 8-9")],
        b"ZZ",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(&get(&p, "/img/logo.png", &[]).await.body[8..10], b"ZZ");
}

async fn delete_tells_subscribers(store: Store) {
    let p = Plait::start(store);
    put(&p, "/gone", &[("Content-Type", "application/json")], "[1]").await;
    let mut s = wire::subscribe(
        p.addr,
        "/gone",
        &[("Subscribe", "true"), ("Accept", "application/json")],
    )
    .await;
    assert_eq!(next(&mut s).await.body_text(), "[1]");
    let r = wire::send(p.addr, "DELETE", "/gone", &[], b"").await;
    assert_eq!(r.status, 204);
    assert_eq!(next(&mut s).await.status, Some(404));
    assert_eq!(
        get(&p, "/gone", &[("Accept", "application/json")]).await.status,
        404
    );
    assert_eq!(wire::send(p.addr, "DELETE", "/gone", &[], b"").await.status, 404);
    // Created again, the subscriber sees it.
    put(&p, "/gone", &[("Content-Type", "application/json")], "[2]").await;
    assert_eq!(next(&mut s).await.body_text(), "[2]");
}

async fn history_and_resume(store: Store) {
    let p = Plait::start(store);
    put(&p, "/h", &[("Version", "\"amy-2\""), ("Parents", "")], "abc").await;
    put(
        &p,
        "/h",
        &[
            ("Version", "\"bo-0\""),
            ("Parents", "\"amy-2\""),
            ("Content-Range", "text [3:3]"),
        ],
        "d",
    )
    .await;
    let r = get(&p, "/h", &[("Version", "\"amy-2\"")]).await;
    assert_eq!(r.text(), "abc");
    assert_eq!(r.header("current-version"), Some("\"bo-0\""));
    assert_eq!(
        get(&p, "/h", &[("Version", "\"amy-0\"")]).await.text(),
        "a",
        "ids inside a run resolve"
    );
    let r = get(&p, "/h", &[("Version", "\"nope-3\"")]).await;
    assert_eq!(r.status, 309);
    assert_eq!(r.header("version"), Some("\"nope-3\""));
    // Resume: only what is missing.
    let mut s = wire::subscribe(p.addr, "/h", &[("Subscribe", "true"), ("Parents", "\"amy-2\"")]).await;
    let u = next(&mut s).await;
    assert_eq!(u.header("parents"), Some("\"amy-2\""));
    assert_eq!(patches(&u), vec![("text [3:3]".into(), "d".into())]);
    // Resuming at the current version sends nothing until something changes.
    let mut s = wire::subscribe(p.addr, "/h", &[("Subscribe", "true"), ("Parents", "\"bo-0\"")]).await;
    assert!(s.next_block(Duration::from_millis(300)).await.is_none());
    // Version with Subscribe is refused; unknown Parents too.
    let r = get(&p, "/h", &[("Subscribe", "true"), ("Version", "\"bo-0\"")]).await;
    assert_eq!(r.status, 400);
    let r = get(&p, "/h", &[("Subscribe", "true"), ("Parents", "\"zz-9\"")]).await;
    assert_eq!(r.status, 309);
    // GET with Parents: the range of updates as a finished 209.
    let r = get(&p, "/h", &[("Parents", "\"amy-2\"")]).await;
    assert_eq!(r.status, 209);
    assert_eq!(r.header("content-type"), Some("application/http-history"));
    let (b, _) = wire::parse_block(&r.body).expect("one update");
    assert_eq!(b.header("version"), Some("\"bo-0\""));
}

async fn concurrent_writes_merge(store: Store) {
    let p = Plait::start(store);
    put(&p, "/m", &[("Version", "\"d-5\""), ("Parents", "")], "Hello!").await;
    let mut s = wire::subscribe(p.addr, "/m", &[("Subscribe", "true")]).await;
    next(&mut s).await;
    let a = put(
        &p,
        "/m",
        &[
            ("Version", "\"erin-0\""),
            ("Parents", "\"d-5\""),
            ("Content-Range", "text [0:0]"),
        ],
        "A",
    );
    let b = put(
        &p,
        "/m",
        &[
            ("Version", "\"fred-0\""),
            ("Parents", "\"d-5\""),
            ("Content-Range", "text [6:6]"),
        ],
        "Z",
    );
    let (a, b) = tokio::join!(a, b);
    assert_eq!((a.status, b.status), (200, 200));
    let mut text = "Hello!".to_string();
    let mut last = String::new();
    while text != "AHello!Z" {
        let u = next(&mut s).await;
        let mut chars: Vec<char> = text.chars().collect();
        let mut off: isize = 0;
        for (range, content) in patches(&u) {
            let inner = range.trim_start_matches("text [").trim_end_matches(']');
            let (x, y) = inner.split_once(':').unwrap();
            let (x, y): (isize, isize) = (x.parse().unwrap(), y.parse().unwrap());
            chars.splice((x + off) as usize..(y + off) as usize, content.chars());
            off += content.chars().count() as isize - (y - x);
        }
        text = chars.into_iter().collect();
        last = u.header("version").unwrap().to_string();
    }
    assert_eq!(last, "\"erin-0\", \"fred-0\"");
    let r = get(&p, "/m", &[]).await;
    assert_eq!(r.text(), "AHello!Z");
    assert_eq!(r.header("version"), Some("\"erin-0\", \"fred-0\""));
}

async fn bad_input_is_refused_and_stores_nothing(store: Store) {
    let p = Plait::start_with(store, &[]);
    put(&p, "/b", &[("Version", "\"a-4\"")], "hello").await;
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, u16);
    let cases: Vec<Case> = vec![
        (vec![("Version", "a-5")], "x", 400),        // unquoted version
        (vec![("Parents", "\"a-4\",,")], "x", 400),  // malformed list
        (vec![("Merge-Type", "ot-json")], "x", 400), // unknown merge type
        (vec![("Merge-Type", "dt")], "x", 400),      // not yet
        (vec![("Patches", "1")], "content-range: text [0:0]\r\n\r\nx", 400), // no Content-Length
        (
            vec![("Patches", "1")],
            "content-length: 50\r\ncontent-range: text [0:0]\r\n\r\nx",
            400,
        ),
        (vec![("Patches", "many")], "", 400),
        (vec![("Content-Range", "text [99:99]")], "x", 416), // out of range
        (vec![("Content-Range", "lines 1-2")], "x", 400),    // unknown unit
        (vec![("Content-Range", "json .a")], "1", 400),      // json patch on text
        (vec![("Parents", "\"zz-1\"")], "x", 309),           // unknown parents
        (vec![("Version", "\"a-1\", \"b-1\"")], "x", 400),   // two ids
    ];
    for (headers, body, status) in &cases {
        let r = put(&p, "/b", headers, body).await;
        assert_eq!(r.status, *status, "{headers:?} {body:?}: {}", r.text());
        assert!(
            r.header("plait-error").is_some(),
            "{headers:?}: machine-readable reason"
        );
        assert!(
            !r.text().trim().is_empty() && !r.text().trim().contains('\n'),
            "one-line reason: {:?}",
            r.text()
        );
    }
    // Oversize bodies: declared, and streamed without a length.
    let big = vec![b'x'; 10 * 1024 * 1024 + 1];
    let r = wire::send(p.addr, "PUT", "/b", &[], &big).await;
    assert_eq!(r.status, 413);
    let mut raw = "PUT /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        .as_bytes()
        .to_vec();
    for _ in 0..11 {
        raw.extend_from_slice(format!("{:x}\r\n", 1024 * 1024).as_bytes());
        raw.extend(std::iter::repeat_n(b'y', 1024 * 1024));
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let r = wire::send_raw(p.addr, &raw).await;
    assert_eq!(r.status, 413);
    // Paths and namespaces.
    assert_eq!(get(&p, "/a/../b", &[]).await.status, 400);
    assert_eq!(get(&p, "/%ff", &[]).await.status, 400);
    assert_eq!(get(&p, "/~notakey/x", &[]).await.status, 400);
    assert_eq!(wire::send(p.addr, "POST", "/b", &[], b"x").await.status, 405);
    // A malformed request line does not take the server down.
    let r = wire::send_raw(p.addr, b"GARBAGE\r\n\r\n").await;
    assert_eq!(r.status, 400);
    // Nothing of the above was stored.
    let r = get(&p, "/b", &[]).await;
    assert_eq!(r.text(), "hello");
    assert_eq!(r.header("version"), Some("\"a-4\""));
}

async fn heartbeats(store: Store) {
    let p = Plait::start(store);
    let mut s = wire::subscribe(p.addr, "/hb", &[("Subscribe", "true"), ("Heartbeats", "1s")]).await;
    assert_eq!(s.header("heartbeats"), Some("1s"));
    let raw = s.raw_for(Duration::from_millis(2600)).await;
    let first_block_end = "HTTP 200 OK\r\nVersion: \r\nParents: \r\nContent-Length: 0\r\n\r\n\r\n\r\n".len();
    assert_eq!(&raw[first_block_end..], b"\r\n\r\n", "two heartbeats in 2.6 s");
}

async fn namespaces(store: Store) {
    let p = Plait::start(store);
    let r = get(&p, "/.well-known/plait", &[]).await;
    let info: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let me = info["id"].as_str().unwrap().to_string();
    assert_eq!(me.len(), 52);
    assert_eq!(info["limits"]["max_body_bytes"], 10 * 1024 * 1024);
    put(&p, "/mine", &[], "x").await;
    // `/~<own id>/path` is the same resource as `/path`.
    assert_eq!(get(&p, &format!("/~{me}/mine"), &[]).await.text(), "x");
    let other = plait_bridge::Keypair::generate().identity();
    // Another namespace is read-only: an anonymous writer is told to prove who it is
    // (only that namespace's account could write there).
    let r = put(&p, &format!("/~{other}/theirs"), &[], "y").await;
    assert_eq!(r.status, 401);
    assert_eq!(
        wire::send(p.addr, "DELETE", &format!("/~{other}/theirs"), &[], b"")
            .await
            .status,
        401
    );
    // CORS preflight.
    let r = wire::send(
        p.addr,
        "OPTIONS",
        "/mine",
        &[
            ("Origin", "http://app.example"),
            ("Access-Control-Request-Method", "PUT"),
            ("Access-Control-Request-Headers", "version, parents, peer"),
        ],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("version, parents, peer")
    );
    assert!(r.header("access-control-allow-methods").unwrap().contains("PUT"));
}

/// A client that behaves like braid-text's simpleton client: it keeps (version, text),
/// applies an update only when the update's parents are its version, and moves to its own
/// version as soon as it sends an edit.
struct Simpleton {
    peer: &'static str,
    version: String,
    text: String,
    sub: Subscription,
}

impl Simpleton {
    async fn open(p: &Plait, path: &str, peer: &'static str) -> Simpleton {
        let mut sub = wire::subscribe(
            p.addr,
            path,
            &[("Subscribe", "true"), ("Peer", peer), ("Merge-Type", "simpleton")],
        )
        .await;
        let first = next(&mut sub).await;
        Simpleton {
            peer,
            version: first.header("version").unwrap().to_string(),
            text: first.body_text(),
            sub,
        }
    }

    async fn edit(&mut self, p: &Plait, path: &str, at: usize, insert: &str, events_so_far: usize) {
        let version = format!("\"{}-{}\"", self.peer, events_so_far + insert.chars().count() - 1);
        let r = put(
            p,
            path,
            &[
                ("Version", &version),
                ("Parents", &self.version),
                ("Peer", self.peer),
                ("Content-Range", &format!("text [{at}:{at}]")),
            ],
            insert,
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let mut chars: Vec<char> = self.text.chars().collect();
        chars.splice(at..at, insert.chars());
        self.text = chars.into_iter().collect();
        self.version = version;
    }

    /// Replaces `del` code points at `at` with `insert`, and sends that edit.
    async fn change(
        &mut self,
        p: &Plait,
        path: &str,
        at: usize,
        del: usize,
        insert: &str,
        events_so_far: usize,
    ) {
        let n = del + insert.chars().count();
        let version = format!("\"{}-{}\"", self.peer, events_so_far + n - 1);
        let range = format!("text [{at}:{}]", at + del);
        let headers = [
            ("Version", version.as_str()),
            ("Parents", &self.version),
            ("Peer", self.peer),
            ("Content-Range", &range),
        ];
        let r = put(p, path, &headers, insert).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let mut chars: Vec<char> = self.text.chars().collect();
        chars.splice(at..at + del, insert.chars());
        self.text = chars.into_iter().collect();
        self.version = version;
    }

    /// Applies the updates that arrive within `wait` (those on other parents are refused).
    async fn drain(&mut self, wait: Duration) {
        while let Some(u) = self.sub.next_block(wait).await {
            self.apply(&u);
        }
    }

    fn apply(&mut self, u: &Block) {
        if u.header("parents") != Some(self.version.as_str()) {
            return;
        }
        let mut chars: Vec<char> = self.text.chars().collect();
        let mut off: isize = 0;
        for (range, content) in patches(u) {
            let (x, y) = range
                .trim_start_matches("text [")
                .trim_end_matches(']')
                .split_once(':')
                .unwrap();
            let (x, y): (isize, isize) = (x.parse().unwrap(), y.parse().unwrap());
            chars.splice((x + off) as usize..(y + off) as usize, content.chars());
            off += content.chars().count() as isize - (y - x);
        }
        self.text = chars.into_iter().collect();
        self.version = u.header("version").unwrap().to_string();
    }

    /// Applies updates until the text is `want`; updates on other parents are refused.
    async fn until(&mut self, want: &str) {
        while self.text != want {
            let u = self
                .sub
                .next_block(T)
                .await
                .unwrap_or_else(|| panic!("{} stuck at {:?} (wanted {want:?})", self.peer, self.text));
            self.apply(&u);
        }
    }
}

async fn simpleton_clients_converge_after_concurrent_edits(store: Store) {
    let p = Plait::start(store);
    put(&p, "/s", &[("Version", "\"base-4\""), ("Parents", "")], "hello").await;
    let mut a = Simpleton::open(&p, "/s", "pa").await;
    let mut b = Simpleton::open(&p, "/s", "pb").await;
    // Both edit on the same version: one is applied as is, the other merged.
    a.edit(&p, "/s", 5, " A", 0).await;
    b.edit(&p, "/s", 0, "B ", 0).await;
    a.until("B hello A").await;
    b.until("B hello A").await;
    assert_eq!(get(&p, "/s", &[]).await.text(), "B hello A");
    // Neither got its own edit echoed back: the next thing each sees is the other's edit.
    a.edit(&p, "/s", 9, "!", 2).await;
    b.until("B hello A!").await;
    assert!(
        a.sub.next_block(Duration::from_millis(300)).await.is_none(),
        "no echo of a's own edit"
    );
}

fn sha256(s: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    format!(
        "sha-256=:{}:",
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(s))
    )
}

async fn repr_digest_is_verified(store: Store) {
    let p = Plait::start(store);
    let r = put(&p, "/d", &[("Repr-Digest", &sha256(b"hello"))], "hello").await;
    assert_eq!(r.status, 200);
    let r = put(
        &p,
        "/d",
        &[
            ("Content-Range", "text [5:5]"),
            ("Repr-Digest", &sha256(b"hello")),
        ],
        "!",
    )
    .await;
    assert_eq!(r.status, 550, "{}", r.text());
    assert_eq!(r.header("plait-error"), Some("digest-mismatch"));
    assert_eq!(get(&p, "/d", &[]).await.text(), "hello", "nothing stored");
    let r = put(
        &p,
        "/d",
        &[
            ("Content-Range", "text [5:5]"),
            ("Repr-Digest", &sha256(b"hello!")),
        ],
        "!",
    )
    .await;
    assert_eq!(r.status, 200);
    // JSON is checked against its canonical serialization (compact, keys in the order
    // written); other algorithms are ignored.
    let r = put(
        &p,
        "/j",
        &[
            ("Content-Type", "application/json"),
            ("Repr-Digest", &sha256(br#"{"b":2,"a":1}"#)),
        ],
        r#"{"b": 2, "a": 1}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = put(
        &p,
        "/j",
        &[
            ("Content-Type", "application/json"),
            ("Repr-Digest", "sha-512=:AAAA:"),
        ],
        "[]",
    )
    .await;
    assert_eq!(r.status, 200);
    let r = put(&p, "/j", &[("Repr-Digest", "sha-256=:nope:")], "[]").await;
    assert_eq!(r.status, 400);
}

/// Three simpleton-style peers make random edits (inserts and deletes) at the same time,
/// each on whatever version it has; every subscriber converges to the server's text, and
/// the text and version survive a restart. The random choices come from a fixed seed per
/// store, so a failure can be replayed.
async fn random_concurrent_edits_converge_everywhere_and_survive_restart(store: Store) {
    let mut p = Plait::start(store);
    put(
        &p,
        "/r",
        &[("Version", "\"seed-9\""), ("Parents", "")],
        "0123456789",
    )
    .await;
    let peers = ["pa", "pb", "pc"];
    let mut clients = Vec::new();
    for peer in peers {
        clients.push(Simpleton::open(&p, "/r", peer).await);
    }
    let p_ref = &p;
    let runs = clients.into_iter().enumerate().map(|(k, mut c)| async move {
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15 ^ (k as u64 + 1);
        let mut next = move |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n.max(1) as u64) as usize
        };
        let mut events = 0;
        for _ in 0..15 {
            let len = c.text.chars().count();
            let at = next(len + 1);
            let del = if len > at && next(3) == 0 {
                1 + next((len - at).min(3))
            } else {
                0
            };
            let ins: String = (0..next(3) + usize::from(del == 0))
                .map(|_| (b'a' + next(26) as u8) as char)
                .collect();
            c.change(p_ref, "/r", at, del, &ins, events).await;
            events += del + ins.chars().count();
            // Take whatever has arrived, without waiting for it.
            c.drain(Duration::from_millis(next(20) as u64)).await;
        }
        c
    });
    let mut clients = futures::future::join_all(runs).await;
    let want = get(&p, "/r", &[]).await.text();
    for c in &mut clients {
        c.until(&want).await;
    }
    let version = get(&p, "/r", &[]).await.header("version").unwrap().to_string();
    p.restart();
    let r = get(&p, "/r", &[]).await;
    assert_eq!(r.text(), want);
    assert_eq!(r.header("version"), Some(version.as_str()));
}
