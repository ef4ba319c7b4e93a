//! The network between instances, with real `plait` processes on 127.0.0.1: an invite
//! chain made with the CLI (`plait invite`, `plait join` through the admin socket), a
//! lookup through the DHT of an address nobody handed over, the gate refusing a server
//! that was never invited, used-up and tampered invites refused, and a member that
//! restarts rejoining from its saved state (embedded store, and Postgres), federation:
//! live replicas of another member's resources, through that member's restart, relays and
//! hole punching between homes behind real NAT routers (network namespaces), and a server
//! in two networks at once, federating with each and keeping them apart.

use std::process::Command;
use std::time::{Duration, Instant};

use plait_tests::plait::{Plait, Store, binary};
use plait_tests::wire;

const T: Duration = Duration::from_secs(20);

fn p2p_plait() -> Plait {
    p2p_plait_on(Store::Embedded)
}

fn p2p_plait_on(store: Store) -> Plait {
    Plait::start_with(
        store,
        &[
            "--p2p-listen",
            "/ip4/127.0.0.1/tcp/0",
            "--p2p-listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
        ],
    )
}

/// Runs `plait <args> --data-dir <p's dir>`: success and what it printed.
fn admin(p: &Plait, args: &[&str]) -> (bool, String) {
    let out = Command::new(binary())
        .args(args)
        .arg("--data-dir")
        .arg(p.data_dir())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text.trim().to_string())
}

fn ok(p: &Plait, args: &[&str]) -> String {
    let (success, text) = admin(p, args);
    assert!(success, "plait {args:?} failed: {text}\nserver log:\n{}", p.log());
    text
}

fn p2p(p: &Plait) -> serde_json::Value {
    p.well_known()["p2p"]["status"].clone()
}

fn id(p: &Plait) -> String {
    p.well_known()["id"].as_str().unwrap().to_string()
}

fn connected(p: &Plait) -> Vec<String> {
    p2p(p)["connected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn decode_link(link: &str) -> serde_json::Value {
    let b64 = link.strip_prefix("plait-invite:").unwrap();
    serde_json::from_slice(&data_encoding::BASE64URL_NOPAD.decode(b64.as_bytes()).unwrap()).unwrap()
}

#[test]
fn invite_chain_dht_lookup_gate_and_restart() {
    let a = p2p_plait();
    // B listens on QUIC only: C, handed B's addresses, reaches it over QUIC.
    let mut b = Plait::start_with(Store::Embedded, &["--p2p-listen", "/ip4/127.0.0.1/udp/0/quic-v1"]);
    let c = p2p_plait();
    let d = p2p_plait();
    let (ida, idb, idc) = (id(&a), id(&b), id(&c));

    // Before any invite a server belongs to no network.
    assert_eq!(p2p(&a)["dhts"], serde_json::json!([]));

    // A invites B (A's network is created by its first invite).
    let link = ok(&a, &["invite"]);
    assert!(
        link.starts_with("plait-invite:") && !link.contains(char::is_whitespace),
        "{link}"
    );
    assert!(ok(&b, &["join", &link]).contains(&ida));
    until("A and B connect", || connected(&a).contains(&idb));
    assert_eq!(p2p(&a)["dhts"][0]["dht"], "plait");

    // The link was for one use; a second server cannot use it.
    let (joined, why) = admin(&d, &["join", &link]);
    assert!(!joined && why.contains("used up"), "{why}");
    // A tampered link is refused before anything is sent.
    let mut inv = decode_link(&link);
    inv["uses"] = 99.into();
    let forged = format!(
        "plait-invite:{}",
        data_encoding::BASE64URL_NOPAD.encode(inv.to_string().as_bytes())
    );
    let (joined, why) = admin(&d, &["join", &forged]);
    assert!(!joined && why.contains("signature"), "{why}");

    // B invites C. C's link carries B's addresses (QUIC), not A's.
    let link = ok(&b, &["invite"]);
    let inv = decode_link(&link);
    assert_eq!(inv["inviter"], idb.as_str());
    assert!(inv["addrs"][0].as_str().unwrap().ends_with("/quic-v1"), "{inv}");
    let a_addrs: Vec<String> = p2p(&a)["listen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().into())
        .collect();
    assert!(!link.contains(&a_addrs[0]) && !inv.to_string().contains(&a_addrs[0]));
    ok(&c, &["join", &link]);
    // A learns from B that C is a member.
    until("A learns of C", || p2p(&a)["members"] == 3);

    // C looks A up in the DHT: A's signed record, with A's addresses; C connects.
    let mut found = None;
    until("C resolves A", || {
        let (success, text) = admin(&c, &["resolve", &ida]);
        if success {
            found = Some(serde_json::from_str::<serde_json::Value>(&text).unwrap());
        }
        success
    });
    let rec = found.unwrap();
    assert_eq!(rec["id"], ida.as_str());
    let got: Vec<String> = rec["addrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().into())
        .collect();
    assert_eq!(got, a_addrs);
    until("C connects to A", || {
        connected(&c).contains(&ida) && connected(&a).contains(&idc)
    });

    // D was never admitted: A hangs up on it.
    let a_peer = p2p(&a)["peer_id"].as_str().unwrap().to_string();
    let (dialled, why) = admin(&d, &["connect", &format!("{}/p2p/{a_peer}", a_addrs[0])]);
    assert!(!dialled && why.contains("not admitted"), "{why}");
    assert!(!connected(&a).iter().any(|i| *i != idb && *i != idc));
    // The same dial from a member is admitted.
    assert!(ok(&b, &["connect", &format!("{}/p2p/{a_peer}", a_addrs[0])]).contains(&ida));

    // `plait status` prints the same.
    let status: serde_json::Value = serde_json::from_str(&ok(&a, &["status"])).unwrap();
    assert_eq!(status["members"], 3);
    assert_eq!(status["dhts"][0]["dht"], "plait");

    // B restarts (kill -9): it rejoins from its saved state, without any invite.
    b.restart();
    until("B is back with A and C", || {
        let s = p2p(&b);
        s["members"] == 3 && connected(&b).contains(&ida) && connected(&b).contains(&idc)
    });
    until("A sees B again", || connected(&a).contains(&idb));
}

#[test]
fn the_admin_commands_explain_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .args(["status", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no running plait"), "{err}");
    // A server with p2p off answers joins with 404 and has no admin socket.
    let p = Plait::start(Store::Embedded);
    assert_eq!(p.well_known()["p2p"]["enabled"], false);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let r = rt.block_on(wire::send(p.addr, "POST", "/.well-known/plait/join", &[], b"{}"));
    assert_eq!(r.status, 404);
    let (success, _) = admin(&p, &["invite"]);
    assert!(!success);
    // Garbage at the join endpoint of a server with p2p on is a 400; a valid-looking
    // request with someone else's invite is a 403.
    let q = p2p_plait();
    let r = rt.block_on(wire::send(
        q.addr,
        "POST",
        "/.well-known/plait/join",
        &[],
        b"{not json",
    ));
    assert_eq!(r.status, 400);
    let other = p2p_plait();
    let link = ok(&other, &["invite"]);
    let inv = decode_link(&link);
    let keys = plait_bridge::Keypair::generate();
    let invite: plait_bridge::invite::Invite = serde_json::from_value(inv).unwrap();
    let req = plait_bridge::invite::JoinRequest::new(invite, &keys, vec![]);
    let body = serde_json::to_vec(&req).unwrap();
    let r = rt.block_on(wire::send(q.addr, "POST", "/.well-known/plait/join", &[], &body));
    assert_eq!(r.status, 403, "{}", r.text());
    // A network name that is no DHT name is refused, and makes no network.
    let (made, why) = admin(&q, &["invite", "--dht", "Bad/Name"]);
    assert!(!made && why.contains("not a DHT name"), "{why}");
    assert_eq!(p2p(&q)["dhts"], serde_json::json!([]));
}

/// A invites B, B invites C; returns once A knows all three.
fn chain(a: &Plait, b: &Plait, c: &Plait) {
    let link = ok(a, &["invite"]);
    ok(b, &["join", &link]);
    let link = ok(b, &["invite"]);
    ok(c, &["join", &link]);
    until("A knows all three members", || p2p(a)["members"] == 3);
    until("B knows all three members", || p2p(b)["members"] == 3);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Reads updates until one has body `want`: updates may coalesce, so each write arrives or is
/// overtaken by a later one.
async fn until_body(s: &mut wire::Subscription, want: &str) {
    while s.next_block(T).await.expect("the update arrives").body_text() != want {}
}

async fn put_json(p: &Plait, path: &str, body: &str) {
    let r = wire::send(
        p.addr,
        "PUT",
        path,
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "PUT {path}: {}", r.text());
}

#[test]
fn federation_is_live_and_survives_a_restart() {
    let a = p2p_plait();
    // B keeps its state (node state included) in Postgres, and restarts.
    let mut b = p2p_plait_on(Store::fresh_postgres());
    let c = p2p_plait();
    chain(&a, &b, &c);
    let (ida, idb) = (id(&a), id(&b));
    let rt = runtime();
    let json = [("Subscribe", "true"), ("Accept", "application/json")];

    // A subscriber on C to A's document sees A's writes live.
    let mut s = rt.block_on(async {
        put_json(&a, "/doc", r#"{"n":1}"#).await;
        let mut s = wire::subscribe(c.addr, &format!("/~{ida}/doc"), &json).await;
        assert_eq!(s.status, 209);
        assert_eq!(s.header("plait-replica"), Some("live"));
        assert_eq!(s.next_block(T).await.unwrap().body_text(), r#"{"n":1}"#);
        for n in 2..=5 {
            put_json(&a, "/doc", &format!(r#"{{"n":{n}}}"#)).await;
            until_body(&mut s, &format!(r#"{{"n":{n}}}"#)).await;
        }
        // The replica is read-only on C (an anonymous writer is told to authenticate, and
        // even C's owner may not write it); a plain read there is in step.
        let r = wire::send(
            c.addr,
            "PUT",
            &format!("/~{ida}/doc"),
            &[("Content-Type", "application/json")],
            b"{}",
        )
        .await;
        assert_eq!(r.status, 401);
        let (k, v) = c.owner_auth();
        let r = wire::send(
            c.addr,
            "PUT",
            &format!("/~{ida}/doc"),
            &[("Content-Type", "application/json"), (k, v.as_str())],
            b"{}",
        )
        .await;
        assert_eq!(r.status, 403);
        let r = wire::send(
            c.addr,
            "GET",
            &format!("/~{ida}/doc"),
            &[("Accept", "application/json")],
            b"",
        )
        .await;
        assert_eq!((r.status, r.text().as_str()), (200, r#"{"n":5}"#));
        assert_eq!(r.header("plait-replica"), Some("live"));
        // Text documents too, with their Braid versions.
        let r = wire::send(
            a.addr,
            "PUT",
            "/text",
            &[("Content-Type", "text/plain"), ("Version", "\"ann-4\"")],
            b"hello",
        )
        .await;
        assert_eq!(r.status, 200);
        let r = wire::send(
            a.addr,
            "PUT",
            "/text",
            &[
                ("Content-Range", "text [5:5]"),
                ("Version", "\"ann-10\""),
                ("Parents", "\"ann-4\""),
            ],
            b" world",
        )
        .await;
        assert_eq!(r.status, 200);
        let r = wire::send(c.addr, "GET", &format!("/~{ida}/text"), &[], b"").await;
        assert_eq!((r.status, r.text().as_str()), (200, "hello world"));
        assert_eq!(r.header("version"), Some("\"ann-10\""));
        // A long history reaches an empty replica as one compact document; later changes
        // follow as changes.
        for _ in 0..300 {
            let r = wire::send(a.addr, "PUT", "/long", &[("Content-Range", "text [0:0]")], b"x").await;
            assert_eq!(r.status, 200);
        }
        let home = wire::send(a.addr, "GET", "/long", &[], b"").await;
        let r = wire::send(c.addr, "GET", &format!("/~{ida}/long"), &[], b"").await;
        assert_eq!(r.text(), "x".repeat(300));
        assert_eq!(r.header("version"), home.header("version"));
        let r = wire::send(a.addr, "PUT", "/long", &[("Content-Range", "text [0:0]")], b"y").await;
        assert_eq!(r.status, 200);
        let r = wire::send(c.addr, "GET", &format!("/~{ida}/long"), &[], b"").await;
        assert_eq!(r.text(), format!("y{}", "x".repeat(300)));
        // Bytes resources travel by value, compared by digest.
        let png = [0x89u8, b'P', b'N', b'G', 0, 1, 2, 3];
        let r = wire::send(a.addr, "PUT", "/logo", &[("Content-Type", "image/png")], &png).await;
        assert_eq!(r.status, 200);
        let r = wire::send(c.addr, "GET", &format!("/~{ida}/logo"), &[], b"").await;
        assert_eq!(
            (r.status, r.body.as_slice(), r.header("content-type")),
            (200, &png[..], Some("image/png"))
        );
        let r = wire::send(
            a.addr,
            "PUT",
            "/logo",
            &[("Content-Type", "image/png")],
            b"\x89PNG v2",
        )
        .await;
        assert_eq!(r.status, 200);
        let r = wire::send(c.addr, "GET", &format!("/~{ida}/logo"), &[], b"").await;
        assert_eq!(r.body.as_slice(), b"\x89PNG v2");
        s
    });

    // B's notes, subscribed from C, through B going away and coming back.
    let mut notes = rt.block_on(async {
        put_json(&b, "/notes", r#"{"v":1}"#).await;
        let mut n = wire::subscribe(c.addr, &format!("/~{idb}/notes"), &json).await;
        assert_eq!(n.next_block(T).await.unwrap().body_text(), r#"{"v":1}"#);
        n
    });
    b.kill9();
    rt.block_on(async {
        // C still serves its replica, and says it is offline.
        let r = wire::send(
            c.addr,
            "GET",
            &format!("/~{idb}/notes"),
            &[("Accept", "application/json")],
            b"",
        )
        .await;
        assert_eq!((r.status, r.text().as_str()), (200, r#"{"v":1}"#));
        assert_eq!(r.header("plait-replica"), Some("offline"));
    });
    b.restart();
    rt.block_on(async {
        // A write made as soon as B is back reaches the subscriber that stayed on C.
        put_json(&b, "/notes", r#"{"v":2}"#).await;
        until_body(&mut notes, r#"{"v":2}"#).await;
        put_json(&b, "/notes", r#"{"v":3}"#).await;
        assert_eq!(notes.next_block(T).await.unwrap().body_text(), r#"{"v":3}"#);
        // A's document stayed live meanwhile.
        put_json(&a, "/doc", r#"{"n":6}"#).await;
        assert_eq!(s.next_block(T).await.unwrap().body_text(), r#"{"n":6}"#);
    });
}

/// H runs in a network namespace of its own and listens for peers only on that namespace's
/// loopback: nobody can dial it, it can only dial out (a home machine behind NAT). It names
/// R, a member the others can reach, as its relay. C, handed only R's invite, follows H's
/// document live: it finds H's relayed address through the DHT and reaches H through R.
#[test]
fn a_member_nobody_can_dial_is_followed_through_a_relay() {
    let net = plait_tests::netns::NetNs::new("nat");
    let r = Plait::start_at(
        Store::Embedded,
        &format!("{}:0", net.host),
        None,
        &["--p2p-listen", &format!("/ip4/{}/tcp/0", net.host)],
    );
    until("R listens for peers", || p2p(&r)["listen"][0].is_string());
    let relay = format!(
        "{}/p2p/{}",
        p2p(&r)["listen"][0].as_str().unwrap(),
        p2p(&r)["peer_id"].as_str().unwrap()
    );
    let h = Plait::start_at(
        Store::Embedded,
        &format!("{}:0", net.inner),
        Some(&net.name),
        &["--p2p-listen", "/ip4/127.0.0.1/tcp/0", "--p2p-relay", &relay],
    );
    let c = p2p_plait();
    let link = ok(&r, &["invite", "--uses", "2"]);
    ok(&h, &["join", &link]);
    ok(&c, &["join", &link]);
    until("H is reachable through R", || {
        p2p(&h)["listen"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a.as_str().unwrap().starts_with(&format!("{relay}/p2p-circuit")))
    });
    let idh = id(&h);
    // C finds H's relayed address through the DHT (once H's record has reached R).
    until("C resolves H to its relayed address", || {
        let (found, text) = admin(&c, &["resolve", &idh]);
        found && text.contains(&format!("{relay}/p2p-circuit"))
    });
    let rt = runtime();
    rt.block_on(async {
        put_json(&h, "/doc", r#"{"n":1}"#).await;
        let json = [("Subscribe", "true"), ("Accept", "application/json")];
        let mut s = wire::subscribe(c.addr, &format!("/~{idh}/doc"), &json).await;
        assert_eq!(s.status, 209, "{}", c.log());
        assert_eq!(
            s.header("plait-replica"),
            Some("live"),
            "C:\n{}\nH:\n{}",
            c.log(),
            h.log()
        );
        assert_eq!(s.next_block(T).await.unwrap().body_text(), r#"{"n":1}"#);
        put_json(&h, "/doc", r#"{"n":2}"#).await;
        assert_eq!(s.next_block(T).await.unwrap().body_text(), r#"{"n":2}"#);
    });
    assert!(connected(&c).contains(&idh), "C is connected to H");
}

/// Two homes, each behind its own NAT router (nftables masquerade; nothing unsolicited gets
/// in), and a VPS R on the internet that relays for members. B follows A's document: the
/// first connection goes through R, then the two punch a hole (DCUtR) and connect directly,
/// so A's writes still reach B after R is gone.
#[test]
fn homes_behind_nat_punch_a_hole_and_keep_it_without_the_relay() {
    let lab = plait_tests::netns::NatLab::new("punch", 2);
    let public = &lab.public;
    let mut r = Plait::start_at(
        Store::Embedded,
        &format!("{public}:0"),
        None,
        &[
            "--p2p-listen",
            &format!("/ip4/{public}/tcp/0"),
            "--p2p-listen",
            &format!("/ip4/{public}/udp/0/quic-v1"),
        ],
    );
    until("R listens for peers", || p2p(&r)["listen"][1].is_string());
    let relay = format!(
        "{}/p2p/{}",
        p2p(&r)["listen"][0].as_str().unwrap(),
        p2p(&r)["peer_id"].as_str().unwrap()
    );
    let port = plait_tests::netns::NatLab::P2P_PORT;
    let at_home = |h: &plait_tests::netns::Home| {
        Plait::start_at(
            Store::Embedded,
            &format!("{}:0", h.lan),
            Some(&h.ns),
            &[
                "--p2p-listen",
                &format!("/ip4/0.0.0.0/tcp/{port}"),
                "--p2p-listen",
                &format!("/ip4/0.0.0.0/udp/{port}/quic-v1"),
                "--p2p-relay",
                &relay,
            ],
        )
    };
    let (a, b) = (at_home(&lab.homes[0]), at_home(&lab.homes[1]));
    let link = ok(&r, &["invite", "--uses", "2"]);
    ok(&a, &["join", &link]);
    ok(&b, &["join", &link]);
    let ida = id(&a);
    until("A is reachable through R", || {
        p2p(&a)["listen"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().starts_with(&format!("{relay}/p2p-circuit")))
    });
    until("B resolves A to its relayed address", || {
        let (found, text) = admin(&b, &["resolve", &ida]);
        found && text.contains("/p2p-circuit")
    });
    let rt = runtime();
    let json = [("Subscribe", "true"), ("Accept", "application/json")];
    let mut s = rt.block_on(async {
        put_json(&a, "/doc", r#"{"n":1}"#).await;
        let mut s = wire::subscribe(b.addr, &format!("/~{ida}/doc"), &json).await;
        assert_eq!(
            (s.status, s.header("plait-replica")),
            (209, Some("live")),
            "B:\n{}\nA:\n{}",
            b.log(),
            a.log()
        );
        assert_eq!(s.next_block(T).await.unwrap().body_text(), r#"{"n":1}"#);
        s
    });
    let direct = |p: &Plait, id: &str| {
        p2p(p)["direct"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d.as_str() == Some(id))
    };
    let deadline = Instant::now() + T;
    while !direct(&b, &ida) {
        assert!(
            Instant::now() < deadline,
            "no direct connection from B to A: {}\nB:\n{}\nA:\n{}",
            p2p(&b),
            b.log(),
            a.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(direct(&a, &id(&b)));
    assert!(
        b.log().contains("by hole punching") || a.log().contains("by hole punching"),
        "the direct connection is DCUtR's"
    );
    // Without the relay, A's writes still reach B, over the hole.
    r.kill9();
    rt.block_on(async {
        for n in 2..=3 {
            put_json(&a, "/doc", &format!(r#"{{"n":{n}}}"#)).await;
            until_body(&mut s, &format!(r#"{{"n":{n}}}"#)).await;
        }
    });
    assert!(direct(&b, &ida), "{}", p2p(&b));
}

/// B belongs to A's network and makes one of its own (`plait invite --dht friends`) for D.
/// D follows B's document live through "friends", A through "plait"; D and A share no
/// network, so neither can reach the other. B restarts in both.
#[test]
fn a_server_in_two_networks() {
    let a = p2p_plait();
    let mut b = p2p_plait();
    let d = p2p_plait();
    let (ida, idb) = (id(&a), id(&b));
    ok(&b, &["join", &ok(&a, &["invite"])]);
    let link = ok(&b, &["invite", "--dht", "friends"]);
    assert_eq!(decode_link(&link)["dht"], "friends");
    assert!(ok(&d, &["join", &link]).contains("friends"));
    let names = |p: &Plait| -> Vec<String> {
        p2p(p)["dhts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["dht"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&b), ["plait", "friends"]);
    assert_eq!(
        (names(&a), names(&d)),
        (vec!["plait".to_string()], vec!["friends".to_string()])
    );
    let friends_listen = p2p(&b)["dhts"][1]["listen"].clone();
    assert_ne!(friends_listen, p2p(&b)["dhts"][0]["listen"]);
    // With two networks, `plait invite` must be told which: the `[p2p] dht` setting's.
    assert_eq!(decode_link(&ok(&b, &["invite"]))["dht"], "plait");

    let rt = runtime();
    let json = [("Subscribe", "true"), ("Accept", "application/json")];
    rt.block_on(async {
        put_json(&b, "/doc", r#"{"n":1}"#).await;
        put_json(&a, "/mine", r#"{"a":1}"#).await;
        let mut on_d = wire::subscribe(d.addr, &format!("/~{idb}/doc"), &json).await;
        let mut on_a = wire::subscribe(a.addr, &format!("/~{idb}/doc"), &json).await;
        for s in [&mut on_d, &mut on_a] {
            assert_eq!((s.status, s.header("plait-replica")), (209, Some("live")));
            assert_eq!(s.next_block(T).await.unwrap().body_text(), r#"{"n":1}"#);
        }
        put_json(&b, "/doc", r#"{"n":2}"#).await;
        for s in [&mut on_d, &mut on_a] {
            until_body(s, r#"{"n":2}"#).await;
        }
        // D is no member of A's network: A's namespace is not followed from D.
        let r = wire::send(
            d.addr,
            "GET",
            &format!("/~{ida}/mine"),
            &[("Accept", "application/json")],
            b"",
        )
        .await;
        assert!(
            r.header("plait-replica").is_none() && !r.text().contains("\"a\""),
            "{} {}",
            r.status,
            r.text()
        );
    });
    // Nor can D reach A by hand: A's gate hangs up.
    let a_addr = format!(
        "{}/p2p/{}",
        p2p(&a)["listen"][0].as_str().unwrap(),
        p2p(&a)["peer_id"].as_str().unwrap()
    );
    let (dialled, why) = admin(&d, &["connect", &a_addr]);
    assert!(!dialled && why.contains("not admitted"), "{why}");

    // B restarts (kill -9): both memberships come back, "friends" where it listened.
    b.restart();
    until("B is back in both networks", || {
        let s = p2p(&b);
        s["dhts"].as_array().is_some_and(|d| d.len() == 2) && s["dhts"][1]["listen"] == friends_listen
    });
    until("B is back with A and D", || {
        connected(&b).contains(&ida) && connected(&b).contains(&id(&d))
    });
}

/// `plait members --json` on `p`.
fn members(p: &Plait) -> serde_json::Value {
    let text = ok(p, &["members", "--json"]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The identities `plait members` lists in `p`'s first network.
fn member_ids(p: &Plait) -> Vec<String> {
    members(p)["dhts"][0]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// A invites B and C, who both follow A's `/x`. A removes C: A and B hang up on C at once,
/// `plait members` no longer lists it, C's replica of `/x` gets none of A's later writes
/// (B's still does) and says so; C, restarted, is still refused, and cannot rejoin.
#[test]
fn a_removed_member_is_cut_off_and_stays_out() {
    let a = p2p_plait();
    let b = p2p_plait();
    let mut c = p2p_plait();
    let (ida, idb, idc) = (id(&a), id(&b), id(&c));
    let link = ok(&a, &["invite", "--uses", "2"]);
    ok(&b, &["join", &link]);
    ok(&c, &["join", &link]);
    until("A and B know all three", || {
        p2p(&a)["members"] == 3 && p2p(&b)["members"] == 3
    });
    until("A is connected to B and C, and B to C", || {
        connected(&a).contains(&idb) && connected(&a).contains(&idc) && connected(&b).contains(&idc)
    });

    // `plait members`: each member, who admitted it, how it is connected.
    let listed = members(&a);
    let dht = &listed["dhts"][0];
    assert_eq!(
        (dht["dht"].as_str(), dht["root"].as_str()),
        (Some("plait"), Some(ida.as_str()))
    );
    let of_c = dht["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == idc.as_str())
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(of_c["admitted_by"], ida.as_str());
    assert_eq!(
        (of_c["connected"].as_bool(), of_c["direct"].as_bool()),
        (Some(true), Some(true))
    );
    let text = ok(&a, &["members"]);
    assert!(
        text.contains(&format!("{idc}  admitted by {ida}; connected directly")),
        "{text}"
    );

    let rt = runtime();
    let json = [("Subscribe", "true"), ("Accept", "application/json")];
    let path = format!("/~{ida}/x");
    let (mut on_b, mut on_c) = rt.block_on(async {
        put_json(&a, "/x", r#"{"n":1}"#).await;
        let mut on_b = wire::subscribe(b.addr, &path, &json).await;
        let mut on_c = wire::subscribe(c.addr, &path, &json).await;
        for s in [&mut on_b, &mut on_c] {
            assert_eq!((s.status, s.header("plait-replica")), (209, Some("live")));
            assert_eq!(s.next_block(T).await.unwrap().body_text(), r#"{"n":1}"#);
        }
        put_json(&a, "/x", r#"{"n":2}"#).await;
        for s in [&mut on_b, &mut on_c] {
            until_body(s, r#"{"n":2}"#).await;
        }
        (on_b, on_c)
    });

    // Only the root, or the member that admitted C, may remove it: B may not.
    let (removed, why) = admin(&b, &["members", "remove", &idc]);
    assert!(!removed && why.contains("may remove"), "{why}");
    assert_eq!(
        ok(&a, &["members", "remove", &idc]),
        format!("removed {idc} from plait")
    );
    assert!(!connected(&a).contains(&idc), "A closes C's connections at once");
    until("B learns of it from A and hangs up on C", || {
        !connected(&b).contains(&idc) && !member_ids(&b).contains(&idc)
    });
    for p in [&a, &b] {
        let listed = members(p);
        assert_eq!(listed["dhts"][0]["removed"][0]["id"], idc.as_str(), "{listed}");
        assert_eq!(listed["dhts"][0]["removed"][0]["removed_by"], ida.as_str());
        assert_eq!(member_ids(p).len(), 2);
    }
    let (removed, why) = admin(&a, &["members", "remove", &idc]);
    assert!(!removed && why.contains("was removed"), "{why}");

    rt.block_on(async {
        put_json(&a, "/x", r#"{"n":3}"#).await;
        until_body(&mut on_b, r#"{"n":3}"#).await;
        // Nothing more reaches C.
        while let Some(block) = on_c.next_block(Duration::from_secs(3)).await {
            assert_ne!(
                block.body_text(),
                r#"{"n":3}"#,
                "C got A's write after its removal"
            );
        }
        let r = wire::send(c.addr, "GET", &path, &[("Accept", "application/json")], b"").await;
        assert_eq!((r.status, r.text().as_str()), (200, r#"{"n":2}"#));
        assert_eq!(r.header("plait-replica"), Some("offline"));
    });

    // C restarts from its saved state (which still counts A and B as members): refused.
    c.restart();
    let a_addr = format!(
        "{}/p2p/{}",
        p2p(&a)["listen"][0].as_str().unwrap(),
        p2p(&a)["peer_id"].as_str().unwrap()
    );
    let (dialled, why) = admin(&c, &["connect", &a_addr]);
    assert!(!dialled && why.contains("not admitted"), "{why}");
    rt.block_on(async {
        put_json(&a, "/x", r#"{"n":4}"#).await;
        until_body(&mut on_b, r#"{"n":4}"#).await;
        let r = wire::send(c.addr, "GET", &path, &[("Accept", "application/json")], b"").await;
        assert_eq!((r.status, r.text().as_str()), (200, r#"{"n":2}"#));
        assert_eq!(r.header("plait-replica"), Some("offline"));
    });
    // C dialled them (at start, and to fetch for the read): they hung up each time.
    assert!(!connected(&a).contains(&idc) && !connected(&b).contains(&idc));
    // Nor can C come back through another member's invite.
    let link = ok(&b, &["invite"]);
    let (joined, why) = admin(&c, &["join", &link]);
    assert!(!joined && why.contains("was removed"), "{why}");
}

/// A link whose signature is not the inviter's it names is refused by `plait join`, which
/// then neither contacts anyone nor keeps anything; a link re-made by another key in its
/// own name is refused by the server it points at.
#[test]
fn join_refuses_a_link_not_signed_by_the_inviter_it_names() {
    let a = p2p_plait();
    let d = p2p_plait();
    let ida = id(&a);
    let link = ok(&a, &["invite"]);
    let real: plait_bridge::invite::Invite = serde_json::from_value(decode_link(&link)).unwrap();
    let other = plait_bridge::Keypair::generate();
    let remade = plait_bridge::invite::Invite::new(
        &other,
        &real.dht,
        real.root,
        real.addrs.clone(),
        real.join_url.clone(),
        real.expires_at,
        real.uses,
    );
    let to_link = |inv: &plait_bridge::invite::Invite| inv.to_link();
    // Signed by another key, still naming A.
    let mut resigned = remade.clone();
    resigned.inviter = real.inviter;
    // Naming another inviter, with A's signature.
    let mut swapped = real.clone();
    swapped.inviter = other.identity();
    for (forged, named) in [
        (to_link(&resigned), ida.clone()),
        (to_link(&swapped), other.identity().to_string()),
    ] {
        let (joined, why) = admin(&d, &["join", &forged]);
        assert!(
            !joined && why.contains("not the inviter's") && why.contains(&named),
            "{why}"
        );
    }
    // A link that another key made in its own name, pointing at A: A made no such invite.
    let (joined, why) = admin(&d, &["join", &to_link(&remade)]);
    assert!(!joined && why.contains("not made by this node"), "{why}");
    assert_eq!(p2p(&d)["dhts"], serde_json::json!([]));
    assert!(connected(&a).is_empty() && connected(&d).is_empty());
    assert_eq!(p2p(&a)["members"], 1);
    // The real link, unused, still admits D.
    assert!(ok(&d, &["join", &link]).contains(&ida));
    until("A and D connect", || connected(&a).contains(&id(&d)));
}

/// A member fetching `/~A/…` for its clients asks as itself: A's rules decide what it gets.
#[test]
fn a_members_fetches_follow_the_homes_rules() {
    let a = p2p_plait();
    let b = p2p_plait();
    let c = p2p_plait();
    chain(&a, &b, &c);
    let (ida, idb) = (id(&a), id(&b));
    let rt = runtime();
    rt.block_on(async {
        put_json(&a, "/open", r#"{"n":1}"#).await;
        put_json(&a, "/for-b", r#"{"n":2}"#).await;
        put_json(&a, "/members-only", r#"{"n":3}"#).await;
        let rules = serde_json::json!({"rules": [
            {"path": "/", "read": ["everyone"], "write": ["everyone"], "delete": ["owner"]},
            {"path": "/for-b", "read": [format!("identity:{idb}")]},
            {"path": "/members-only", "read": ["members"]},
        ]});
        let (k, v) = a.owner_auth();
        let r = wire::send(
            a.addr,
            "PUT",
            "/.well-known/plait/access",
            &[(k, v.as_str()), ("Content-Type", "application/json")],
            rules.to_string().as_bytes(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        // On A itself, an anonymous reader may not read /for-b.
        let r = wire::send(a.addr, "GET", "/for-b", &[("Accept", "application/json")], b"").await;
        assert_eq!(r.status, 401);
        let read = |p: &Plait, path: String| {
            let addr = p.addr;
            async move { wire::send(addr, "GET", &path, &[("Accept", "application/json")], b"").await }
        };
        // B's clients get all three through B's replicas.
        for (path, body) in [
            ("open", r#"{"n":1}"#),
            ("for-b", r#"{"n":2}"#),
            ("members-only", r#"{"n":3}"#),
        ] {
            let r = read(&b, format!("/~{ida}/{path}")).await;
            assert_eq!((r.status, r.text().as_str()), (200, body), "B reads /{path}");
        }
        // C's replica of /for-b gets nothing from A (A refuses C's fetch); the rest it gets.
        let r = read(&c, format!("/~{ida}/members-only")).await;
        assert_eq!(r.text(), r#"{"n":3}"#);
        let r = read(&c, format!("/~{ida}/for-b")).await;
        assert!(!r.text().contains("\"n\":2"), "C got B's resource: {}", r.text());
        assert_ne!(r.header("plait-replica"), Some("live"), "{:?}", r.headers);
    });
    assert!(a.log().contains("does not allow read"), "A says why it refused C");
}
