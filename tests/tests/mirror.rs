//! The end-to-end-encrypted mirror with real processes: an owner O pushes sealed segments
//! to a mirror M that granted it storage; M's database and files never hold the plaintext
//! O wrote, yet the segments M holds verify (signatures, chain, hashes) and open with O's
//! seal key to exactly those writes. O resumes from M's acknowledged sequence after a
//! restart. Over the real libp2p protocol, M refuses, each with its machine-readable
//! reason, a push without a grant, over quota, replayed, with a broken chain, a bad
//! signature, a tampered ciphertext, and one larger than a push may carry. A checkpoint
//! shrinks what M stores for O (the grant's `used`), and what M keeps — the snapshot and
//! the segments after it — still opens to every resource's current value; a forged
//! checkpoint, an older one and a segment at or below the checkpoint are refused. Both
//! stores.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use plait_bridge::Keypair;
use plait_bridge::mirror::wire::{Request, Response};
use plait_bridge::mirror::{
    ChainHead, Checkpoint, Descriptor, Refusal, SealKey, SealedCheckpoint, SealedSegment, seal,
    seal_checkpoint,
};
use plait_server::mirror::batch;
use plait_tests::mirror::{WAIT, another, contains, holds, id, ok, p2p_plait, put, raw_storage, until};
use plait_tests::on_both_stores;
use plait_tests::plait::{Plait, Store};

/// Strings O writes; none may appear in M's storage.
const SECRETS: [&str; 4] = [
    "the-eagle-lands-at-midnight-ZQX1",
    "hunter2-password-ZQX2",
    "binary-secret-payload-ZQX3",
    "written-after-restart-ZQX4",
];

/// The segments a mirror's store holds for `namespace`: (seq, descriptor, ciphertext).
fn stored_segments(m: &Plait, namespace: &str) -> Vec<(i64, Vec<u8>, Vec<u8>)> {
    let ns: plait_bridge::Identity = namespace.parse().unwrap();
    match &m.store {
        Store::Embedded => {
            let db = rusqlite::Connection::open_with_flags(
                m.data_dir().join("plait.db"),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .unwrap();
            let mut q = db
                .prepare("SELECT seq, descriptor, ciphertext FROM mirror_segments WHERE namespace = ?1 ORDER BY seq")
                .unwrap();
            q.query_map([ns.as_bytes().as_slice()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect()
        }
        Store::Postgres(url) => {
            let hexns: String = ns.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
            let out = plait_tests::pg::cluster().psql(
                url,
                &format!(
                    "SELECT seq, encode(descriptor, 'hex'), encode(ciphertext, 'hex') FROM mirror_segments \
                     WHERE namespace = '\\x{hexns}'::bytea ORDER BY seq"
                ),
            );
            out.lines()
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let mut f = l.split('|');
                    let seq = f.next().unwrap().parse().unwrap();
                    let d = data_encoding::HEXLOWER
                        .decode(f.next().unwrap().as_bytes())
                        .unwrap();
                    let c = data_encoding::HEXLOWER
                        .decode(f.next().unwrap().as_bytes())
                        .unwrap();
                    (seq, d, c)
                })
                .collect()
        }
    }
}

/// The checkpoint a mirror's store holds for `namespace`: (upto, checkpoint, snapshot).
fn stored_checkpoint(m: &Plait, namespace: &str) -> Option<(i64, Vec<u8>, Vec<u8>)> {
    let ns: plait_bridge::Identity = namespace.parse().unwrap();
    match &m.store {
        Store::Embedded => {
            let db = rusqlite::Connection::open_with_flags(
                m.data_dir().join("plait.db"),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .unwrap();
            let mut q = db
                .prepare("SELECT upto, checkpoint, snapshot FROM mirror_checkpoints WHERE namespace = ?1")
                .unwrap();
            q.query_map([ns.as_bytes().as_slice()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap()
            .map(Result::unwrap)
            .next()
        }
        Store::Postgres(url) => {
            let hexns: String = ns.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
            let out = plait_tests::pg::cluster().psql(
                url,
                &format!(
                    "SELECT upto, encode(checkpoint, 'hex'), encode(snapshot, 'hex') FROM mirror_checkpoints \
                     WHERE namespace = '\\x{hexns}'::bytea"
                ),
            );
            out.lines().find(|l| !l.is_empty()).map(|l| {
                let mut f = l.split('|');
                let upto = f.next().unwrap().parse().unwrap();
                let mut hex = || {
                    data_encoding::HEXLOWER
                        .decode(f.next().unwrap().as_bytes())
                        .unwrap()
                };
                let c = hex();
                (upto, c, hex())
            })
        }
    }
}

/// Checks the chain the way a mirror does and opens each segment with O's key; returns
/// the decrypted batches' entries.
fn verify_and_open(segs: &[(i64, Vec<u8>, Vec<u8>)], owner: &str, key: &SealKey) -> Vec<batch::Entry> {
    verify_and_open_from(ChainHead::default(), Vec::new(), segs, owner, key)
}

/// What a reader restores from a mirror: the checkpoint's snapshot (signature and hash
/// checked), then the segments after it, chained to the checkpoint's head.
fn restore(
    checkpoint: &(i64, Vec<u8>, Vec<u8>),
    segs: &[(i64, Vec<u8>, Vec<u8>)],
    owner: &str,
    key: &SealKey,
) -> Vec<batch::Entry> {
    let (upto, c, snapshot) = checkpoint;
    let c = Checkpoint::from_bytes(c).unwrap();
    assert_eq!(c.namespace.to_string(), owner);
    assert_eq!(c.upto as i64, *upto);
    assert!(c.verify_signature());
    assert_eq!(c.len, snapshot.len() as u64);
    assert_eq!(&c.hash, blake3::hash(snapshot).as_bytes());
    let snap = batch::decode(&plait_bridge::mirror::open(key, snapshot).unwrap()).unwrap();
    assert!(snap.iter().all(|e| e.what != batch::What::Change));
    verify_and_open_from(c.chain_head(), snap, segs, owner, key)
}

fn verify_and_open_from(
    mut head: ChainHead,
    mut entries: Vec<batch::Entry>,
    segs: &[(i64, Vec<u8>, Vec<u8>)],
    owner: &str,
    key: &SealKey,
) -> Vec<batch::Entry> {
    for (seq, d, c) in segs {
        let d = Descriptor::from_bytes(d).unwrap();
        assert_eq!(d.namespace.to_string(), owner);
        assert_eq!(d.seq as i64, *seq);
        assert_eq!(d.seq, head.seq + 1, "gap-free");
        assert_eq!(d.prev, head.hash, "chained");
        assert!(d.verify_signature());
        assert_eq!(d.len, c.len() as u64);
        assert_eq!(&d.hash, blake3::hash(c).as_bytes());
        head = ChainHead::of(&d);
        let plain = plait_bridge::mirror::open(key, c).unwrap();
        entries.extend(batch::decode(&plain).unwrap());
    }
    entries
}

fn has_secret(entries: &[batch::Entry], path: &str, secret: &str) -> bool {
    entries
        .iter()
        .any(|e| e.path.as_str().trim_start_matches('/') == path && contains(&e.data, secret.as_bytes()))
}

async fn owner_pushes_segments_the_mirror_cannot_read(store: Store) {
    let m = p2p_plait(store.clone());
    let mut o = p2p_plait(another(&store));
    let (mid, oid) = (id(&m), id(&o));

    // The operator's consent first (M runs: the grant file is read at the next push).
    assert!(ok(&m, &["mirror", "grant", &oid, "--quota", "10MiB"]).contains(&oid));
    let link = ok(&m, &["invite"]);

    // O writes before it has a mirror: what it sealed goes in the first sync.
    put(&o, "/notes/secret", "text/plain", SECRETS[0].as_bytes()).await;
    put(
        &o,
        "/cfg",
        "application/json",
        format!(r#"{{"password":"{}"}}"#, SECRETS[1]).as_bytes(),
    )
    .await;
    put(&o, "/img.bin", "application/octet-stream", SECRETS[2].as_bytes()).await;
    let listed =
        || -> serde_json::Value { serde_json::from_str(&ok(&o, &["mirror", "list", "--json"])).unwrap() };
    assert_eq!(
        listed()["sealed_seq"],
        0,
        "an owner without mirrors seals nothing"
    );

    // `mirror add` seals what there is, waits for the first sync with progress, and
    // returns once M holds it.
    let added = ok(&o, &["mirror", "add", &link]);
    assert!(added.contains(&mid) && added.contains("joined"), "{added}");
    assert!(added.contains("segments done"), "{added}");
    let now = listed();
    assert!(now["sealed_seq"].as_u64() >= Some(1), "{now}");
    assert!(
        now["mirrors"][0]["acked"].as_u64() >= now["sealed_seq"].as_u64(),
        "{now}"
    );

    let key = SealKey::load_or_create(&o.data_dir().join(plait_bridge::mirror::SEAL_KEY_FILE)).unwrap();
    let all_there = |segs: &[(i64, Vec<u8>, Vec<u8>)]| {
        let e = verify_and_open(segs, &oid, &key);
        has_secret(&e, "notes/secret", SECRETS[0])
            && has_secret(&e, "cfg", SECRETS[1])
            && has_secret(&e, "img.bin", SECRETS[2])
    };
    until("M holds segments with O's three writes", || {
        all_there(&stored_segments(&m, &oid))
    })
    .await;

    // M stores ciphertext only: no plaintext in its files or tables, raw or as hex.
    let raw = raw_storage(&m);
    for s in &SECRETS[..3] {
        assert!(!holds(&raw, s), "{s} in M's storage");
    }
    // The search finds what is there: O's own store holds the bytes value.
    assert!(holds(&raw_storage(&o), SECRETS[2]));

    // Both sides report: M its grant's use, O what M acknowledged.
    let listed: serde_json::Value = serde_json::from_str(&ok(&m, &["mirror", "list", "--json"])).unwrap();
    assert_eq!(listed["grants"][0]["id"], oid.as_str());
    assert!(listed["grants"][0]["used"].as_u64().unwrap() > 0, "{listed}");
    let n = stored_segments(&m, &oid).len() as u64;
    until("O knows M acknowledged its segments", || {
        let l: serde_json::Value = serde_json::from_str(&ok(&o, &["mirror", "list", "--json"])).unwrap();
        l["mirrors"][0]["id"] == mid.as_str()
            && l["mirrors"][0]["acked"].as_u64() == l["sealed_seq"].as_u64()
            && l["sealed_seq"].as_u64() >= Some(n)
    })
    .await;

    // O restarts and writes again: the chain goes on where M's ends, nothing twice.
    o.terminate();
    o.restart();
    put(&o, "/later", "text/plain", SECRETS[3].as_bytes()).await;
    until("M holds the write made after O's restart", || {
        let segs = stored_segments(&m, &oid);
        let e = verify_and_open(&segs, &oid, &key);
        has_secret(&e, "later", SECRETS[3])
    })
    .await;
    let segs = stored_segments(&m, &oid);
    let entries = verify_and_open(&segs, &oid, &key);
    let mut seen = std::collections::HashSet::new();
    for e in &entries {
        assert!(
            seen.insert((e.path.clone(), e.seq)),
            "{} {} sealed twice",
            e.path.as_str(),
            e.seq
        );
    }
    assert!(!holds(&raw_storage(&m), SECRETS[3]));

    // A revoked grant stores nothing more.
    ok(&m, &["mirror", "revoke", &oid]);
    let before = stored_segments(&m, &oid).len();
    put(&o, "/after-revoke", "text/plain", b"more").await;
    until("O is told no-grant", || {
        let l: serde_json::Value = serde_json::from_str(&ok(&o, &["mirror", "list", "--json"])).unwrap();
        l["mirrors"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("no-grant"))
    })
    .await;
    assert_eq!(stored_segments(&m, &oid).len(), before);
}

/// Joins M's network as a bare bridge node (a peer that crafts its own segments).
async fn join_as_bare_node(m: &Plait, dir: &Path) -> (plait_bridge::node::Node, Keypair) {
    let keys = Keypair::generate();
    let node = plait_bridge::node::Node::start(
        Keypair::from_secret_bytes(&keys.secret_bytes()),
        Arc::new(plait_bridge::state::FileStore(dir.join("state.json"))),
        plait_bridge::types::NodeSettings {
            listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap();
    let link = ok(m, &["invite"]);
    let invite = plait_bridge::invite::Invite::from_link(&link).unwrap();
    let req = node.join_request(&keys, invite.clone()).await.unwrap();
    let grant = reqwest::Client::new()
        .post(&invite.join_url)
        .header("Content-Type", "application/json")
        .body(serde_json::to_vec(&req).unwrap())
        .send()
        .await
        .unwrap();
    assert!(grant.status().is_success());
    let grant: plait_bridge::types::JoinGrant =
        serde_json::from_slice(&grant.bytes().await.unwrap()).unwrap();
    node.joined(&invite, grant).await.unwrap();
    (node, keys)
}

async fn ask(node: &plait_bridge::node::Node, m: plait_bridge::Identity, req: Request) -> Response {
    let deadline = Instant::now() + WAIT;
    loop {
        match node.mirror(m, req.clone()).await {
            Ok(r) => return r,
            Err(e) => {
                assert!(Instant::now() < deadline, "M does not answer: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

fn refused(r: Response) -> &'static str {
    match r {
        Response::Refused(r) => r.reason(),
        other => panic!("not refused: {other:?}"),
    }
}

async fn the_mirror_refuses_bad_pushes_over_libp2p(store: Store) {
    let m = p2p_plait(store);
    let mid: plait_bridge::Identity = id(&m).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (node, keys) = join_as_bare_node(&m, dir.path()).await;
    let ns = keys.identity();
    let to = [SealKey::generate().recipient()];
    let s1 = seal(&keys, &to, ChainHead::default(), &[1; 1000], 1).unwrap();
    let s2 = seal(&keys, &to, ChainHead::of(&s1.descriptor), &[2; 1000], 2).unwrap();
    let s3 = seal(&keys, &to, ChainHead::of(&s2.descriptor), &[3; 100_000], 3).unwrap();

    // No grant: nothing lands.
    assert_eq!(
        refused(ask(&node, mid, Request::Push(s1.clone())).await),
        "no-grant"
    );
    assert_eq!(
        ask(&node, mid, Request::Head { namespace: ns }).await,
        Response::Head(ChainHead::default())
    );

    ok(&m, &["mirror", "grant", &ns.to_string(), "--quota", "4KiB"]);
    assert_eq!(
        ask(&node, mid, Request::Push(s1.clone())).await,
        Response::Stored { seq: 1 }
    );
    // The same segment again, and a gap.
    assert_eq!(
        refused(ask(&node, mid, Request::Push(s1.clone())).await),
        "replayed"
    );
    assert_eq!(
        refused(ask(&node, mid, Request::Push(s3.clone())).await),
        "broken-chain"
    );
    // A ciphertext changed in transit.
    let mut tampered = s2.clone();
    tampered.ciphertext[500] ^= 0x40;
    assert_eq!(
        refused(ask(&node, mid, Request::Push(tampered)).await),
        "hash-mismatch"
    );
    // A descriptor signed by someone else for this namespace.
    let other = seal(
        &Keypair::generate(),
        &to,
        ChainHead::of(&s1.descriptor),
        &[2; 1000],
        2,
    )
    .unwrap();
    let mut b = other.descriptor.to_bytes();
    b[4..36].copy_from_slice(ns.as_bytes());
    let forged = SealedSegment {
        descriptor: Descriptor::from_bytes(&b).unwrap(),
        ciphertext: other.ciphertext,
    };
    assert_eq!(
        refused(ask(&node, mid, Request::Push(forged)).await),
        "bad-signature"
    );
    assert_eq!(
        ask(&node, mid, Request::Push(s2.clone())).await,
        Response::Stored { seq: 2 }
    );
    // 100 kB more does not fit 4 KiB.
    match ask(&node, mid, Request::Push(s3.clone())).await {
        Response::Refused(Refusal::OverQuota { quota, used, len }) => {
            assert_eq!(quota, 4096);
            assert_eq!(
                used,
                2 * 188 + s1.ciphertext.len() as u64 + s2.ciphertext.len() as u64
            );
            assert_eq!(len, 188 + s3.ciphertext.len() as u64);
        }
        other => panic!("{other:?}"),
    }
    // A push declaring more than a push may carry is refused from its descriptor alone.
    let huge = Descriptor::sign(
        &keys,
        ChainHead::of(&s2.descriptor),
        &vec![0; (17 << 20) as usize],
        9,
    );
    assert_eq!(
        refused(ask(&node, mid, Request::Oversize(huge)).await),
        "too-large"
    );

    // What was stored is served by range, verbatim, and the chain head is segment 2.
    assert_eq!(
        ask(
            &node,
            mid,
            Request::Range {
                namespace: ns,
                from: 1,
                to: 10
            }
        )
        .await,
        Response::Segments(vec![s1.clone(), s2.clone()])
    );
    assert_eq!(
        ask(&node, mid, Request::Head { namespace: ns }).await,
        Response::Head(ChainHead::of(&s2.descriptor))
    );
    assert_eq!(stored_segments(&m, &ns.to_string()).len(), 2);
}

/// The current value of `path` in restored entries: the entry at the highest seq.
fn current<'a>(entries: &'a [batch::Entry], path: &str) -> &'a batch::Entry {
    entries
        .iter()
        .filter(|e| e.path.as_str().trim_start_matches('/') == path)
        .max_by_key(|e| e.seq)
        .unwrap_or_else(|| panic!("{path} not restored"))
}

/// `GET /.well-known/plait`, as the owner or as anyone.
async fn well_known(p: &Plait, as_owner: bool) -> serde_json::Value {
    let mut r = reqwest::Client::new().get(p.url("/.well-known/plait"));
    if as_owner {
        let (k, v) = p.owner_auth();
        r = r.header(k, v);
    }
    serde_json::from_slice(&r.send().await.unwrap().bytes().await.unwrap()).unwrap()
}

/// A bytes value of 20,000 bytes, different for each `i`, holding `SECRETS[2]`.
fn big_value(i: u8) -> Vec<u8> {
    let mut v = format!("{}-{i:03}-", SECRETS[2]).into_bytes();
    v.resize(20_000, b'a' + i);
    v
}

async fn a_checkpoint_compacts_what_the_mirror_keeps(store: Store) {
    let m = p2p_plait(store.clone());
    // A checkpoint once the segments since the last one pass 150 kB (whatever the
    // namespace's size: ratio 0).
    let o = Plait::start_with_env(
        another(&store),
        &["--p2p-listen", "/ip4/127.0.0.1/tcp/0"],
        &[
            ("PLAIT_MIRROR__SEGMENT_MAX_DELAY_MS", "200"),
            ("PLAIT_MIRROR__CHECKPOINT_RATIO", "0"),
            ("PLAIT_MIRROR__CHECKPOINT_MIN_BYTES", "150000"),
        ],
    );
    let (mid, oid) = (id(&m), id(&o));
    ok(&m, &["mirror", "grant", &oid, "--quota", "10MiB"]);
    put(&o, "/notes/secret", "text/plain", SECRETS[0].as_bytes()).await;
    put(
        &o,
        "/cfg",
        "application/json",
        format!(r#"{{"password":"{}"}}"#, SECRETS[1]).as_bytes(),
    )
    .await;
    ok(&o, &["mirror", "add", &ok(&m, &["invite"])]);
    let synced = || {
        let l: serde_json::Value = serde_json::from_str(&ok(&o, &["mirror", "list", "--json"])).unwrap();
        l["mirrors"][0]["acked"].as_u64() == l["sealed_seq"].as_u64() && l["mirrors"][0]["error"].is_null()
    };
    let used = || -> u64 {
        let l: serde_json::Value = serde_json::from_str(&ok(&m, &["mirror", "list", "--json"])).unwrap();
        l["grants"][0]["used"].as_u64().unwrap()
    };
    // Each value in a segment of its own: the history M keeps grows by 20 kB a write.
    let mut write = 0u8;
    let mut overwrite = async |n: u8| {
        for _ in 0..n {
            write += 1;
            let sealed_before = {
                let l: serde_json::Value =
                    serde_json::from_str(&ok(&o, &["mirror", "list", "--json"])).unwrap();
                l["sealed_seq"].as_u64().unwrap()
            };
            put(&o, "/img.bin", "application/octet-stream", &big_value(write)).await;
            until("the write is sealed and pushed", || {
                let l: serde_json::Value =
                    serde_json::from_str(&ok(&o, &["mirror", "list", "--json"])).unwrap();
                l["sealed_seq"].as_u64() > Some(sealed_before) && synced()
            })
            .await;
        }
    };
    overwrite(5).await;
    assert!(
        stored_checkpoint(&m, &oid).is_none(),
        "no checkpoint below 150 kB"
    );
    let before = used();
    assert!(before > 5 * 20_000, "{before}");

    overwrite(5).await;
    let deadline = Instant::now() + WAIT;
    while !(stored_checkpoint(&m, &oid).is_some() && synced()) {
        assert!(
            Instant::now() < deadline,
            "M holds no checkpoint; O's log:\n{}",
            o.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = used();
    assert!(
        after < before,
        "a checkpoint shrinks M's storage: {before} -> {after}"
    );
    let checkpoint = stored_checkpoint(&m, &oid).unwrap();
    let segs = stored_segments(&m, &oid);
    assert!(
        segs.iter().all(|(seq, ..)| *seq > checkpoint.0),
        "superseded segments dropped"
    );
    assert_eq!(
        after,
        (188 + checkpoint.2.len() + segs.iter().map(|(_, d, c)| d.len() + c.len()).sum::<usize>()) as u64
    );

    // What M keeps opens to every resource's current value.
    let key = SealKey::load_or_create(&o.data_dir().join(plait_bridge::mirror::SEAL_KEY_FILE)).unwrap();
    let entries = restore(&checkpoint, &segs, &oid, &key);
    assert_eq!(current(&entries, "img.bin").data.as_ref(), &big_value(10)[..]);
    assert!(contains(
        &current(&entries, "notes/secret").data,
        SECRETS[0].as_bytes()
    ));
    assert!(contains(&current(&entries, "cfg").data, SECRETS[1].as_bytes()));
    // Still none of it readable on M.
    let raw = raw_storage(&m);
    for s in &SECRETS[..3] {
        assert!(!holds(&raw, s), "{s} in M's storage");
    }

    // The chain goes on after the checkpoint.
    put(&o, "/later", "text/plain", SECRETS[3].as_bytes()).await;
    until("M holds the write made after the checkpoint", || {
        let c = stored_checkpoint(&m, &oid).unwrap();
        let e = restore(&c, &stored_segments(&m, &oid), &oid, &key);
        has_secret(&e, "later", SECRETS[3])
    })
    .await;

    // Status: O shows M's lag and health, M the grant's use against its quota.
    let status = |p: &Plait| -> serde_json::Value { serde_json::from_str(&ok(p, &["status"])).unwrap() };
    until("O's status shows M caught up", || {
        status(&o)["mirror"]["mirrors"][0]["lag"] == 0
    })
    .await;
    let s = status(&o);
    let theirs = &s["mirror"]["mirrors"][0];
    assert_eq!(theirs["id"], mid.as_str(), "{s}");
    assert!(theirs["error"].is_null(), "{s}");
    assert!(theirs["last_ok_ms"].as_u64() > Some(1_600_000_000_000), "{s}");
    assert!(theirs["checkpoint"].as_u64() >= Some(checkpoint.0 as u64), "{s}");
    assert!(theirs["acked"].as_u64() > Some(checkpoint.0 as u64), "{s}");
    let s = status(&m);
    assert_eq!(s["mirror"]["grants"][0]["id"], oid.as_str(), "{s}");
    assert_eq!(s["mirror"]["grants"][0]["quota"], 10 << 20, "{s}");
    assert_eq!(s["mirror"]["grants"][0]["used"].as_u64(), Some(used()), "{s}");
    // The same in /.well-known/plait, to the owner only.
    let shown = well_known(&m, true).await;
    assert_eq!(
        shown["p2p"]["mirror"]["grants"][0]["used"].as_u64(),
        Some(used()),
        "{shown}"
    );
    let public = well_known(&m, false).await;
    assert!(public["p2p"].get("mirror").is_none(), "{public}");
    let shown = well_known(&o, true).await;
    assert_eq!(shown["p2p"]["mirror"]["mirrors"][0]["lag"], 0, "{shown}");
}

/// Checkpoints over the real protocol: a forged one, an older one after a newer one, and
/// a segment at or below the checkpoint are refused with their reasons; a reader gets the
/// snapshot, then the segments after it.
async fn the_mirror_checks_checkpoints_over_libp2p(store: Store) {
    let m = p2p_plait(store);
    let mid: plait_bridge::Identity = id(&m).parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (node, keys) = join_as_bare_node(&m, dir.path()).await;
    let ns = keys.identity();
    let to = [SealKey::generate().recipient()];
    let s1 = seal(&keys, &to, ChainHead::default(), &[1; 1000], 1).unwrap();
    let s2 = seal(&keys, &to, ChainHead::of(&s1.descriptor), &[2; 1000], 2).unwrap();
    let s3 = seal(&keys, &to, ChainHead::of(&s2.descriptor), &[3; 100], 3).unwrap();
    let c1 = seal_checkpoint(&keys, &to, ChainHead::of(&s1.descriptor), b"state at 1", 4).unwrap();
    let c2 = seal_checkpoint(&keys, &to, ChainHead::of(&s2.descriptor), b"state at 2", 5).unwrap();

    assert_eq!(
        refused(ask(&node, mid, Request::Checkpoint(c2.clone())).await),
        "no-grant"
    );
    ok(&m, &["mirror", "grant", &ns.to_string(), "--quota", "1MiB"]);
    for s in [&s1, &s2] {
        assert!(matches!(
            ask(&node, mid, Request::Push(s.clone())).await,
            Response::Stored { .. }
        ));
    }
    let used = || -> u64 {
        let l: serde_json::Value = serde_json::from_str(&ok(&m, &["mirror", "list", "--json"])).unwrap();
        l["grants"][0]["used"].as_u64().unwrap()
    };
    let before = used();
    assert_eq!(
        before,
        (2 * 188 + s1.ciphertext.len() + s2.ciphertext.len()) as u64
    );

    // Signed by someone else for this namespace.
    let other = seal_checkpoint(&Keypair::generate(), &to, ChainHead::of(&s2.descriptor), b"x", 5).unwrap();
    let mut b = other.checkpoint.to_bytes();
    b[4..36].copy_from_slice(ns.as_bytes());
    let forged = SealedCheckpoint {
        checkpoint: Checkpoint::from_bytes(&b).unwrap(),
        snapshot: other.snapshot,
    };
    assert_eq!(
        refused(ask(&node, mid, Request::Checkpoint(forged)).await),
        "bad-signature"
    );
    // A checkpoint naming another history at seq 2.
    let elsewhere = seal_checkpoint(
        &keys,
        &to,
        ChainHead {
            seq: 2,
            hash: [7; 32],
        },
        b"y",
        5,
    )
    .unwrap();
    assert_eq!(
        refused(ask(&node, mid, Request::Checkpoint(elsewhere)).await),
        "broken-chain"
    );
    assert_eq!(used(), before, "nothing refused was stored");

    assert_eq!(
        ask(&node, mid, Request::Checkpoint(c2.clone())).await,
        Response::Stored { seq: 2 }
    );
    assert_eq!(used(), (188 + c2.snapshot.len()) as u64);
    assert!(used() < before);
    assert!(stored_segments(&m, &ns.to_string()).is_empty());
    // An older checkpoint, the same again, and segments at or below it.
    match ask(&node, mid, Request::Checkpoint(c1)).await {
        Response::Refused(Refusal::StaleCheckpoint { upto: 1, held: 2 }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(
        refused(ask(&node, mid, Request::Checkpoint(c2.clone())).await),
        "stale-checkpoint"
    );
    assert_eq!(
        refused(ask(&node, mid, Request::Push(s2.clone())).await),
        "replayed"
    );
    assert_eq!(
        refused(ask(&node, mid, Request::Push(s1.clone())).await),
        "replayed"
    );
    // The chain goes on after it; a reader gets the snapshot, then what follows.
    assert_eq!(
        ask(&node, mid, Request::Head { namespace: ns }).await,
        Response::Head(ChainHead::of(&s2.descriptor))
    );
    assert_eq!(
        ask(&node, mid, Request::Push(s3.clone())).await,
        Response::Stored { seq: 3 }
    );
    assert_eq!(
        ask(&node, mid, Request::GetCheckpoint { namespace: ns }).await,
        Response::Checkpoint(Some(Box::new(c2.clone())))
    );
    assert_eq!(
        ask(
            &node,
            mid,
            Request::Range {
                namespace: ns,
                from: c2.checkpoint.upto + 1,
                to: u64::MAX
            }
        )
        .await,
        Response::Segments(vec![s3])
    );
}

on_both_stores!(
    owner_pushes_segments_the_mirror_cannot_read,
    the_mirror_refuses_bad_pushes_over_libp2p,
    a_checkpoint_compacts_what_the_mirror_keeps,
    the_mirror_checks_checkpoints_over_libp2p
);
