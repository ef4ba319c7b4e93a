//! The mirror over Braid-HTTP, with real processes: an owner O pushes sealed segments to a
//! mirror M; a subscriber signing its requests with O's key follows
//! `/.well-known/plait/mirror/<O>/segments` on M and gets each new descriptor as a Braid
//! version (`seg-N`, parents `seg-(N-1)`) as O writes; the ciphertexts it fetches from M
//! (`…/segments/N`) verify (signature, chain, BLAKE3, length) and open with O's seal key to
//! exactly what O wrote, while M's storage holds none of it. A resumed subscription starts
//! after its `Parents`. A checkpoint is served with its signed checkpoint and opens to
//! what O wrote. A stranger is refused: 401 without a credential, 403 signed by a
//! key that is neither O's, M's owner's nor a member's. Both stores.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use plait_bridge::Keypair;
use plait_bridge::mirror::{ChainHead, Descriptor, SealKey};
use plait_server::braid::frame::Decoder;
use plait_server::mirror::batch;
use plait_tests::mirror::{another, holds, id, ok, p2p_plait, put, raw_storage};
use plait_tests::on_both_stores;
use plait_tests::plait::{Plait, Store};

const T: Duration = Duration::from_secs(30);

/// Strings O writes; none may appear in M's storage.
const SECRETS: [&str; 3] = [
    "over-http-the-eagle-lands-ZQY1",
    "over-http-hunter2-ZQY2",
    "over-http-binary-payload-ZQY3",
];

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A GET to `path` on `p`, signed by `key` (RFC 9421) unless `None`, with `extra` headers.
async fn get(p: &Plait, key: Option<&Keypair>, path: &str, extra: &[(&str, &str)]) -> reqwest::Response {
    let url = p.url(path);
    let mut h = http::HeaderMap::new();
    if let Some(key) = key {
        plait_server::access::signature::sign_request(key, &http::Method::GET, &url, &mut h, None, now(), 60)
            .unwrap();
    }
    let mut req = reqwest::Client::new().get(&url);
    for (k, v) in &h {
        req = req.header(k.as_str(), v.to_str().unwrap());
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

async fn json(r: reqwest::Response) -> serde_json::Value {
    assert_eq!(r.status(), 200);
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
}

/// One update of a subscription: its version, parents and body.
#[derive(Debug)]
struct Got {
    version: String,
    parents: String,
    body: serde_json::Value,
}

/// Follows a 209 stream, sending each update block it reads.
fn follow(res: reqwest::Response) -> tokio::sync::mpsc::UnboundedReceiver<Got> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = res.bytes_stream();
        let mut dec = Decoder::default();
        while let Some(Ok(chunk)) = stream.next().await {
            dec.push(&chunk);
            while let Some(b) = dec.next_block().unwrap() {
                let at = b.raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                let got = Got {
                    version: format!("{:?}", b.version.unwrap()),
                    parents: format!("{:?}", b.parents.unwrap_or_default()),
                    body: serde_json::from_slice(&b.raw[at + 4..]).unwrap(),
                };
                if tx.send(got).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// The next update; on failure, says so with the logs of `servers`.
async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Got>, servers: &[&Plait]) -> Got {
    let logs = || {
        servers
            .iter()
            .map(|p| p.log())
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    match tokio::time::timeout(T, rx.recv()).await {
        Ok(Some(g)) => g,
        Ok(None) => panic!("the subscription ended; logs:\n{}", logs()),
        Err(_) => panic!("no update within {T:?}; logs:\n{}", logs()),
    }
}

/// Fetches segment `seq` from M as `key`, checks it against the descriptor the stream
/// announced and the chain so far, and opens it with O's seal key.
async fn fetch_and_open(
    m: &Plait,
    key: &Keypair,
    oid: &str,
    announced: &serde_json::Value,
    head: &mut ChainHead,
    seal: &SealKey,
) -> Vec<batch::Entry> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let seq = announced["seq"].as_u64().unwrap();
    let res = get(
        m,
        Some(key),
        &format!("/.well-known/plait/mirror/{oid}/segments/{seq}"),
        &[],
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/octet-stream");
    let d = b64
        .decode(res.headers()["plait-descriptor"].to_str().unwrap())
        .unwrap();
    assert_eq!(
        d,
        b64.decode(announced["descriptor"].as_str().unwrap()).unwrap(),
        "the segment's descriptor is the one the stream announced"
    );
    let ciphertext = res.bytes().await.unwrap().to_vec();
    let d = Descriptor::from_bytes(&d).unwrap();
    assert_eq!(d.namespace.to_string(), oid);
    assert_eq!(d.seq, seq);
    assert_eq!(d.seq, head.seq + 1, "gap-free");
    assert_eq!(d.prev, head.hash, "chained");
    assert!(d.verify_signature());
    assert_eq!(d.len, ciphertext.len() as u64);
    assert_eq!(&d.hash, blake3::hash(&ciphertext).as_bytes());
    *head = ChainHead::of(&d);
    batch::decode(&plait_bridge::mirror::open(seal, &ciphertext).unwrap()).unwrap()
}

fn has(entries: &[batch::Entry], path: &str, secret: &str) -> bool {
    entries.iter().any(|e| {
        e.path.as_str().trim_start_matches('/') == path
            && e.data.windows(secret.len()).any(|w| w == secret.as_bytes())
    })
}

async fn a_subscriber_follows_and_decrypts_what_the_mirror_keeps(store: Store) {
    let m = p2p_plait(store.clone());
    let o = p2p_plait(another(&store));
    let oid = id(&o);
    ok(&m, &["mirror", "grant", &oid, "--quota", "10MiB"]);
    let link = ok(&m, &["invite"]);
    ok(&o, &["mirror", "add", &link]);

    let okey = Keypair::load(&o.data_dir().join("identity.pem")).unwrap();
    let seal = SealKey::load_or_create(&o.data_dir().join(plait_bridge::mirror::SEAL_KEY_FILE)).unwrap();
    let base = format!("/.well-known/plait/mirror/{oid}");

    // Strangers are refused: no credential (401), a key M does not know (403).
    let stranger = Keypair::generate();
    for path in [
        base.clone(),
        format!("{base}/segments"),
        format!("{base}/segments/1"),
        format!("{base}/checkpoint"),
    ] {
        assert_eq!(get(&m, None, &path, &[]).await.status(), 401, "{path}");
        assert_eq!(get(&m, Some(&stranger), &path, &[]).await.status(), 403, "{path}");
    }
    let sub = get(
        &m,
        Some(&stranger),
        &format!("{base}/segments"),
        &[("Subscribe", "true")],
    )
    .await;
    assert_eq!(sub.status(), 403);

    // O subscribes from the start, then writes.
    let sub = get(
        &m,
        Some(&okey),
        &format!("{base}/segments"),
        &[("Subscribe", "true")],
    )
    .await;
    assert_eq!(sub.status(), 209);
    let mut rx = follow(sub);
    let (mut head, mut entries, mut seqs) = (ChainHead::default(), Vec::new(), Vec::new());
    // The first write, then the others once it came: at least two segments.
    for (i, write) in [0usize, 1].into_iter().enumerate() {
        if write == 0 {
            put(&o, "/notes/secret", "text/plain", SECRETS[0].as_bytes()).await;
        } else {
            put(
                &o,
                "/cfg",
                "application/json",
                format!(r#"{{"password":"{}"}}"#, SECRETS[1]).as_bytes(),
            )
            .await;
            put(&o, "/img.bin", "application/octet-stream", SECRETS[2].as_bytes()).await;
        }
        let deadline = Instant::now() + T;
        while !(has(&entries, "notes/secret", SECRETS[0])
            && (i == 0 || has(&entries, "cfg", SECRETS[1]) && has(&entries, "img.bin", SECRETS[2])))
        {
            assert!(Instant::now() < deadline, "the subscriber did not get O's writes");
            let got = next(&mut rx, &[&m, &o]).await;
            let seq = got.body["seq"].as_u64().unwrap();
            assert_eq!(got.version, format!("[\"seg-{seq}\"]"));
            let parents = if seq == 1 {
                "[]".to_string()
            } else {
                format!("[\"seg-{}\"]", seq - 1)
            };
            assert_eq!(got.parents, parents);
            entries.extend(fetch_and_open(&m, &okey, &oid, &got.body, &mut head, &seal).await);
            seqs.push(seq);
        }
    }
    assert!(head.seq >= 2);
    assert_eq!(
        seqs,
        (1..=head.seq).collect::<Vec<_>>(),
        "every descriptor, in order"
    );

    // A GET lists the same descriptors; the summary names the head.
    let list = json(get(&m, Some(&okey), &format!("{base}/segments"), &[]).await).await;
    let listed: Vec<u64> = list["descriptors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["seq"].as_u64().unwrap())
        .collect();
    assert!(listed.starts_with(&seqs), "{list}");
    let from2 = json(get(&m, Some(&okey), &format!("{base}/segments?from=2"), &[]).await).await;
    assert_eq!(from2["descriptors"][0]["seq"], 2);
    let summary = json(get(&m, Some(&okey), &base, &[]).await).await;
    assert!(summary["head"].as_u64().unwrap() >= head.seq, "{summary}");
    assert_eq!(summary["namespace"], oid.as_str());
    // M's owner (the operator) may read too; no checkpoint is held yet.
    let (k, v) = m.owner_auth();
    assert_eq!(get(&m, None, &base, &[(k, &v)]).await.status(), 200);
    assert_eq!(
        get(&m, Some(&okey), &format!("{base}/checkpoint"), &[])
            .await
            .status(),
        404
    );

    // A subscription resumed at seg-1 starts at segment 2.
    let sub = get(
        &m,
        Some(&okey),
        &format!("{base}/segments"),
        &[("Subscribe", "true"), ("Parents", "\"seg-1\"")],
    )
    .await;
    assert_eq!(sub.status(), 209);
    let mut rx2 = follow(sub);
    let first = next(&mut rx2, &[&m, &o]).await;
    assert_eq!(first.body["seq"], 2);
    assert_eq!(first.parents, "[\"seg-1\"]");

    // Nothing new past the head: a subscriber that asked for heartbeats gets blank lines.
    let sub = get(
        &m,
        Some(&okey),
        &format!("{base}/segments"),
        &[
            ("Subscribe", "true"),
            ("Parents", &format!("\"seg-{}\"", head.seq)),
            ("Heartbeats", "0.5s"),
        ],
    )
    .await;
    assert_eq!(sub.status(), 209);
    assert_eq!(sub.headers()["heartbeats"], "0.5s");
    let mut body = sub.bytes_stream();
    let mut beats = Vec::new();
    while beats.len() < 4 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("a heartbeat within 10 s")
            .expect("the stream goes on")
            .unwrap();
        beats.extend_from_slice(&chunk);
    }
    assert!(beats.iter().all(|b| b"\r\n".contains(b)), "{beats:?}");

    // M never had the plaintext.
    let raw = raw_storage(&m);
    for s in SECRETS {
        assert!(!holds(&raw, s), "{s} in M's storage");
    }
    assert!(
        holds(&raw_storage(&o), SECRETS[2]),
        "the search finds what is there"
    );
}

/// With a checkpoint after every segment, M's summary names it and `…/checkpoint` serves
/// the sealed snapshot with its signed checkpoint, which verifies and opens to O's write.
async fn the_checkpoint_is_served_signed_and_sealed(store: Store) {
    use base64::Engine as _;
    let m = p2p_plait(store.clone());
    let o = Plait::start_with_env(
        another(&store),
        &["--p2p-listen", "/ip4/127.0.0.1/tcp/0"],
        &[
            ("PLAIT_MIRROR__SEGMENT_MAX_DELAY_MS", "200"),
            ("PLAIT_MIRROR__CHECKPOINT_RATIO", "0"),
            ("PLAIT_MIRROR__CHECKPOINT_MIN_BYTES", "0"),
        ],
    );
    let oid = id(&o);
    ok(&m, &["mirror", "grant", &oid, "--quota", "10MiB"]);
    put(&o, "/notes/secret", "text/plain", SECRETS[0].as_bytes()).await;
    ok(&o, &["mirror", "add", &ok(&m, &["invite"])]);
    // The sealer checkpoints after the segments it seals (not after the first sync's).
    put(&o, "/notes/more", "text/plain", SECRETS[1].as_bytes()).await;
    let okey = Keypair::load(&o.data_dir().join("identity.pem")).unwrap();
    let seal = SealKey::load_or_create(&o.data_dir().join(plait_bridge::mirror::SEAL_KEY_FILE)).unwrap();
    let base = format!("/.well-known/plait/mirror/{oid}");

    let deadline = Instant::now() + T;
    let upto = loop {
        let s = json(get(&m, Some(&okey), &base, &[]).await).await;
        if let Some(u) = s["checkpoint"].as_u64() {
            break u;
        }
        assert!(Instant::now() < deadline, "M holds no checkpoint: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let res = get(&m, Some(&okey), &format!("{base}/checkpoint"), &[]).await;
    assert_eq!(res.status(), 200);
    let c = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(res.headers()["plait-checkpoint"].to_str().unwrap())
        .unwrap();
    let snapshot = res.bytes().await.unwrap().to_vec();
    let c = plait_bridge::mirror::Checkpoint::from_bytes(&c).unwrap();
    assert_eq!(c.namespace.to_string(), oid);
    assert!(c.upto >= upto);
    assert!(c.verify_signature());
    assert_eq!(c.len, snapshot.len() as u64);
    assert_eq!(&c.hash, blake3::hash(&snapshot).as_bytes());
    let entries = batch::decode(&plait_bridge::mirror::open(&seal, &snapshot).unwrap()).unwrap();
    assert!(has(&entries, "notes/secret", SECRETS[0]));
    assert!(has(&entries, "notes/more", SECRETS[1]));
    // The segments it superseded are gone; the list starts after them.
    assert_eq!(
        get(&m, Some(&okey), &format!("{base}/segments/1"), &[])
            .await
            .status(),
        404
    );
    let list = json(get(&m, Some(&okey), &format!("{base}/segments"), &[]).await).await;
    assert!(
        list["descriptors"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["seq"].as_u64().unwrap() > c.upto),
        "{list}"
    );
    let raw = raw_storage(&m);
    assert!(!holds(&raw, SECRETS[0]) && !holds(&raw, SECRETS[1]));
}

on_both_stores!(
    a_subscriber_follows_and_decrypts_what_the_mirror_keeps,
    the_checkpoint_is_served_signed_and_sealed
);
