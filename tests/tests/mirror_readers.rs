//! Readers with real processes: an owner O writes text, JSON and bytes under `/shared/…`
//! and `/personal/…` and pushes them, sealed, to a mirror M; a reader R (its own instance,
//! following O's chain on M with `plait mirror follow` and M's invite) is shared `/shared`
//! (`plait mirror share` on O, with R's identity and age recipient). R fetches and opens
//! only that part, live — of O's private megabyte it downloads the age header alone —: a later write by O under `/shared` reaches R. O's own server lets
//! R read `/shared` even where its rules would not (the share, through the access layer),
//! and only while shared. After `plait mirror unshare`, O's later writes under `/shared`
//! reach M but not R. O is killed with `kill -9`; R restarts and serves every `/shared`
//! resource under `/~<O>/…` with what O wrote, answers 404 for `/personal` (to a JSON
//! reader; a Braid reader gets the empty text of a missing resource), and neither
//! R's storage nor M's holds the `/personal` plaintext (M's holds none at all). Run with
//! checkpoints rare (R starts from segment 1) and after every segment (R starts from a
//! checkpoint it cannot open, and finds its part sealed again after it; this run R,
//! a member of M's network already, follows without a link, on the mirrors O's DHT
//! record names as holders). Both stores.
//! (The unshared part is `/personal`, not `/private`: `private…` of another namespace is
//! refused outright by the access layer's conventions, which would hide what R holds.)

use std::time::Duration;

use plait_bridge::Keypair;
use plait_tests::mirror::{
    another, followed, holds, id, last_line, mirror_list, ok, on, p2p_plait, pushed, put, raw_storage, until,
};
use plait_tests::on_both_stores;
use plait_tests::plait::{Plait, Store};

const SHARED_TEXT: &str = "reader-shared-text-KPL1";
const SHARED_JSON: &str = "reader-shared-json-KPL2";
const SHARED_BYTES: &str = "reader-shared-bytes-KPL3";
const LIVE_BYTES: &str = "reader-shared-live-KPL4";
const AFTER_UNSHARE: &str = "reader-after-unshare-KPL5";
const PRIVATE: [&str; 4] = [
    "reader-private-text-KPL6",
    "reader-private-json-KPL7",
    "reader-private-bytes-KPL8",
    "reader-private-later-KPL9",
];

/// A megabyte O keeps to itself (incompressible): R must not download it.
fn big_private() -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A GET on `p`: signed by `key` (RFC 9421), or as its owner.
async fn get(p: &Plait, key: Option<&Keypair>, path: &str) -> (u16, Vec<u8>) {
    let url = p.url(path);
    let mut req = reqwest::Client::new().get(&url).timeout(Duration::from_secs(60));
    match key {
        Some(key) => {
            let mut h = http::HeaderMap::new();
            plait_server::access::signature::sign_request(
                key,
                &http::Method::GET,
                &url,
                &mut h,
                None,
                now(),
                60,
            )
            .unwrap();
            for (k, v) in &h {
                req = req.header(k.as_str(), v.to_str().unwrap());
            }
        }
        None => {
            let (k, v) = p.owner_auth();
            req = req.header(k, v);
        }
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

/// A GET as `p`'s owner asking for JSON: its status.
async fn get_json(p: &Plait, path: &str) -> u16 {
    let (k, v) = p.owner_auth();
    reqwest::Client::new()
        .get(p.url(path))
        .header(k, v)
        .header("Accept", "application/json")
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn a_reader_follows_its_shared_part_and_nothing_else(store: Store, checkpoint_each_segment: bool) {
    let m = p2p_plait(store.clone());
    let mut env = vec![("PLAIT_MIRROR__SEGMENT_MAX_DELAY_MS", "200")];
    if checkpoint_each_segment {
        env.extend([
            ("PLAIT_MIRROR__CHECKPOINT_RATIO", "0"),
            ("PLAIT_MIRROR__CHECKPOINT_MIN_BYTES", "0"),
        ]);
    }
    let p2p = ["--p2p-listen", "/ip4/127.0.0.1/tcp/0"];
    let mut o = Plait::start_with_env(another(&store), &p2p, &env);
    let mut r = Plait::start_with_env(
        another(&store),
        &p2p,
        &[("PLAIT_MIRROR__FOLLOW_INTERVAL_MS", "200")],
    );
    let (oid, rid) = (id(&o), id(&r));
    ok(&m, &["mirror", "grant", &oid, "--quota", "10MiB"]);

    put(&o, "/shared/notes/a", "text/plain", SHARED_TEXT.as_bytes()).await;
    let json = format!(r#"{{"secret":"{SHARED_JSON}","n":[1,2]}}"#);
    put(&o, "/shared/cfg", "application/json", json.as_bytes()).await;
    put(
        &o,
        "/shared/img.bin",
        "application/octet-stream",
        SHARED_BYTES.as_bytes(),
    )
    .await;
    put(&o, "/personal/notes/a", "text/plain", PRIVATE[0].as_bytes()).await;
    let private_json = format!(r#"{{"secret":"{}"}}"#, PRIVATE[1]);
    put(&o, "/personal/cfg", "application/json", private_json.as_bytes()).await;
    put(
        &o,
        "/personal/img.bin",
        "application/octet-stream",
        PRIVATE[2].as_bytes(),
    )
    .await;
    put(
        &o,
        "/personal/big.bin",
        "application/octet-stream",
        &big_private(),
    )
    .await;
    ok(&o, &["mirror", "add", &last_line(&ok(&m, &["invite"]))]);

    // R follows O on M and prints the recipient O shares with: joining M's network with
    // M's invite, or (the second run) a member already, on the holders O's record names.
    let invite = last_line(&ok(&m, &["invite"]));
    let followed_out = if checkpoint_each_segment {
        ok(&r, &["join", &invite]);
        let out = ok(&r, &["mirror", "follow", &oid]);
        assert!(out.contains("the mirrors its record names"), "{out}");
        out
    } else {
        ok(&r, &["mirror", "follow", &oid, &invite])
    };
    let recipient = last_line(&ok(&r, &["mirror", "recipient"]));
    assert!(recipient.starts_with("age1"), "{recipient}");
    assert!(followed_out.ends_with(&recipient), "{followed_out}");

    // A bad recipient is refused and changes nothing.
    let (shared, out) = on(
        &o,
        &["mirror", "share", "/shared", &rid, "--recipient", "age1nope"],
    );
    assert!(!shared && out.contains("not an age recipient"), "{out}");
    assert!(ok(&o, &["mirror", "shares"]).is_empty());

    // O's rules keep /shared to its owner; the share lets R read it there too.
    let rules = r#"{"rules":[{"path":"/","read":["everyone"],"write":["owner"],"delete":["owner"]},
                             {"path":"/shared","read":["owner"]}]}"#;
    put(
        &o,
        "/.well-known/plait/access",
        "application/json",
        rules.as_bytes(),
    )
    .await;
    let rkey = Keypair::load(&r.data_dir().join("identity.pem")).unwrap();
    let stranger = Keypair::generate();
    assert_eq!(
        get(&o, Some(&rkey), "/shared/img.bin").await.0,
        403,
        "not shared yet"
    );

    ok(
        &o,
        &["mirror", "share", "/shared", &rid, "--recipient", &recipient],
    );
    assert!(ok(&o, &["mirror", "shares"]).contains(&rid));
    let (status, body) = get(&o, Some(&rkey), "/shared/img.bin").await;
    assert_eq!((status, body.as_slice()), (200, SHARED_BYTES.as_bytes()));
    assert_eq!(get(&o, Some(&stranger), "/shared/img.bin").await.0, 403);

    // R fetches what O shared, from M (R never asks O: nothing is read from R's server
    // while O is up, so only the follower can have stored it).
    let seq = pushed(&o, 0).await;
    followed(&r, &oid, seq).await;
    until("R holds the shared bytes", || {
        holds(&raw_storage(&r), SHARED_BYTES)
    })
    .await;
    // R downloaded the heads of O's segments and its own part, not O's private megabyte
    // (nor, with checkpoints, the snapshot holding it), though M holds them.
    let fetched = mirror_list(&r)["following"][&oid]["fetched_bytes"]
        .as_u64()
        .unwrap();
    let grants = mirror_list(&m)["grants"].clone();
    let used = grants
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["id"] == oid.as_str())
        .and_then(|g| g["used"].as_u64())
        .unwrap();
    eprintln!("R fetched {fetched} bytes of the {used} M holds for O");
    assert!(
        used > 1 << 20 && fetched < 128 << 10,
        "R fetched {fetched} bytes of the {used} M holds for O"
    );

    // Live: a new write under /shared reaches R; one under /personal, sealed with it,
    // does not.
    put(
        &o,
        "/personal/later.bin",
        "application/octet-stream",
        PRIVATE[3].as_bytes(),
    )
    .await;
    put(
        &o,
        "/shared/live.bin",
        "application/octet-stream",
        LIVE_BYTES.as_bytes(),
    )
    .await;
    until("R holds O's new write", || holds(&raw_storage(&r), LIVE_BYTES)).await;

    // Unshared: R is refused on O, and what O seals from now on is not sealed to R.
    ok(&o, &["mirror", "unshare", "/shared", &rid]);
    assert_eq!(get(&o, Some(&rkey), "/shared/img.bin").await.0, 403);
    // The sealer reads the shares at its next tick (200 ms).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before = pushed(&o, 0).await;
    put(
        &o,
        "/shared/after.bin",
        "application/octet-stream",
        AFTER_UNSHARE.as_bytes(),
    )
    .await;
    let seq = pushed(&o, before).await;
    followed(&r, &oid, seq).await;
    assert!(
        !holds(&raw_storage(&r), AFTER_UNSHARE),
        "R opened a segment sealed after the unshare"
    );

    // O is gone for good; R restarts and serves its part from what it fetched.
    o.kill9();
    r.restart();
    let (status, body) = get(&r, None, &format!("/~{oid}/shared/notes/a")).await;
    assert_eq!(
        (status, String::from_utf8_lossy(&body).to_string()),
        (200, SHARED_TEXT.to_string()),
        "{}",
        r.log()
    );
    let (status, body) = get(&r, None, &format!("/~{oid}/shared/cfg")).await;
    assert_eq!(status, 200);
    let got: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(got, serde_json::from_str::<serde_json::Value>(&json).unwrap());
    for (path, value) in [("img.bin", SHARED_BYTES), ("live.bin", LIVE_BYTES)] {
        let (status, body) = get(&r, None, &format!("/~{oid}/shared/{path}")).await;
        assert_eq!((status, body.as_slice()), (200, value.as_bytes()), "{path}");
    }
    // What R does not hold is missing: 404 to a JSON reader, the empty text a Braid
    // reader of a missing resource gets otherwise.
    for path in [
        "shared/after.bin",
        "personal/notes/a",
        "personal/cfg",
        "personal/img.bin",
        "personal/later.bin",
    ] {
        let path = format!("/~{oid}/{path}");
        assert_eq!(get_json(&r, &path).await, 404, "{path}");
        assert_eq!(get(&r, None, &path).await, (200, Vec::new()), "{path}");
    }

    // Neither R nor M holds what R was not shared; M holds no plaintext at all.
    let raw_r = raw_storage(&r);
    assert!(holds(&raw_r, SHARED_BYTES), "the search finds what is there");
    for s in PRIVATE.iter().chain([&AFTER_UNSHARE]) {
        assert!(!holds(&raw_r, s), "{s} in R's storage");
    }
    let raw_m = raw_storage(&m);
    for s in PRIVATE
        .iter()
        .chain(&[SHARED_TEXT, SHARED_JSON, SHARED_BYTES, LIVE_BYTES, AFTER_UNSHARE])
    {
        assert!(!holds(&raw_m, s), "{s} in M's storage");
    }

    // Unfollowed: no more fetching, what was fetched stays.
    ok(&r, &["mirror", "unfollow", &oid]);
    let (again, out) = on(&r, &["mirror", "unfollow", &oid]);
    assert!(!again && out.contains("does not follow"), "{out}");
    until("R's status drops O", || {
        mirror_list(&r)["following"].get(&oid).is_none()
    })
    .await;
    let (status, body) = get(&r, None, &format!("/~{oid}/shared/img.bin")).await;
    assert_eq!((status, body.as_slice()), (200, SHARED_BYTES.as_bytes()));
}

async fn a_reader_from_the_first_segment(store: Store) {
    a_reader_follows_its_shared_part_and_nothing_else(store, false).await;
}

async fn a_reader_after_checkpoints_on_the_holders(store: Store) {
    a_reader_follows_its_shared_part_and_nothing_else(store, true).await;
}

on_both_stores!(
    a_reader_from_the_first_segment,
    a_reader_after_checkpoints_on_the_holders
);
