//! A device's writes and the owner merging them, with real processes: an owner O writes
//! text, JSON and bytes and pushes them, sealed, to a mirror M, prints a device link,
//! then writes again (text and JSON) without sealing it and is killed with `kill -9`. A
//! new data dir D joins with the link, restores every resource from M and, served, takes
//! writes under `/~<O>/…` from its own owner: a text edit, a JSON change and a new bytes
//! resource, which it seals to O and pushes to M on its own chain. O restarts and its
//! resources hold both its own unsealed writes and D's, merged; D, following O's chain,
//! gets the merged result and O's new writes live. M's storage holds none of D's
//! plaintext. Once O revokes D, O tells M, which refuses D's later pushes (`revoked`), so
//! what D seals after is neither stored nor merged, and what O seals after does not open
//! on D. D with a certificate that is not O's signature has its pushes
//! refused (`bad-certificate`). Both stores.

use std::time::Duration;

use plait_tests::mirror::{
    WAIT, another, device_join, followed, holds, last_line, mirror_list, ok, owner_get, p2p_plait, pushed,
    put, raw_storage, until,
};
use plait_tests::on_both_stores;
use plait_tests::plait::{Plait, Store};

/// What D writes; none may appear in M's storage.
const SECRETS: [&str; 3] = [
    "device-text-secret-DW1",
    "device-json-secret-DW2",
    "device-bytes-secret-DW3",
];

/// Polls `p` until `path` satisfies `f`, for at most [`WAIT`]; the last body.
async fn until_body(p: &Plait, path: &str, what: &str, f: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (status, body) = owner_get(p, path).await;
        if status == 200 && f(&body) {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out: {what}: {path} is {status} {}\nlog:\n{}",
            String::from_utf8_lossy(&body),
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What O writes once back, which D (following O) serves.
const OWNER_BACK: &str = "owner-is-back-DW5";
/// What O writes after revoking D, which D never opens.
const AFTER_REVOKE: &str = "sealed-after-revocation-DW6";

fn has(body: &[u8], s: &str) -> bool {
    String::from_utf8_lossy(body).contains(s)
}

async fn the_owner_merges_a_devices_writes_after_a_kill(store: Store) {
    let m = p2p_plait(store.clone());
    // O seals only when asked (`mirror add`) until it restarts: its writes after the
    // link stay its own, so D's writes are concurrent with them. It merges every 300 ms.
    let mut o = Plait::start_with_env(
        another(&store),
        &["--p2p-listen", "/ip4/127.0.0.1/tcp/0"],
        &[
            ("PLAIT_MIRROR__SEGMENT_MAX_DELAY_MS", "600000"),
            ("PLAIT_MIRROR__DEVICE_MERGE_INTERVAL_MS", "300"),
        ],
    );
    let oid = last_line(&ok(&o, &["keygen"]));
    ok(&m, &["mirror", "grant", &oid, "--quota", "10MiB"]);

    put(&o, "/notes", "text/plain", b"first line\n").await;
    put(&o, "/cfg", "application/json", br#"{"a":1}"#).await;
    put(&o, "/img.bin", "application/octet-stream", b"owner-bytes").await;
    ok(&o, &["mirror", "add", &last_line(&ok(&m, &["invite"]))]);
    let linked = ok(&o, &["device", "link"]);
    let link = last_line(&linked);
    let device = linked.split_whitespace().nth(1).unwrap().to_string();

    // O writes again, not sealed, then is gone.
    put(&o, "/notes", "text/plain", b"first line\nowner line\n").await;
    put(&o, "/cfg", "application/json", br#"{"a":1,"o":true}"#).await;
    o.kill9();

    // D restores what M holds: O's writes before the link.
    let dstore = another(&store);
    let ddir = tempfile::tempdir().unwrap();
    let (joined, out) = device_join(ddir.path(), &dstore, &link);
    assert!(joined, "device join failed: {out}\nmirror log:\n{}", m.log());
    assert!(out.contains("restored 3 resources"), "{out}");
    let mut d = Plait::start_in(dstore, ddir.path(), &["--p2p-listen", "/ip4/127.0.0.1/tcp/0"]);
    let (status, body) = owner_get(&d, &format!("/~{oid}/notes")).await;
    assert_eq!(
        (status, body.as_slice()),
        (200, &b"first line\n"[..]),
        "{}",
        d.log()
    );

    // D's owner writes under /~O/: a text edit, a JSON change, a new bytes resource.
    let text = format!("{}\nfirst line\n", SECRETS[0]);
    put(&d, &format!("/~{oid}/notes"), "text/plain", text.as_bytes()).await;
    let json = format!(r#"{{"a":1,"d":"{}"}}"#, SECRETS[1]);
    put(&d, &format!("/~{oid}/cfg"), "application/json", json.as_bytes()).await;
    put(
        &d,
        &format!("/~{oid}/dev.bin"),
        "application/octet-stream",
        SECRETS[2].as_bytes(),
    )
    .await;
    let (status, body) = owner_get(&d, &format!("/~{oid}/notes")).await;
    assert_eq!((status, body.as_slice()), (200, text.as_bytes()));
    // Anyone else may not write there.
    let r = reqwest::Client::new()
        .put(d.url(&format!("/~{oid}/notes")))
        .body("anonymous")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());

    // O comes back, sealing as it goes from now on, and merges D's writes with its own.
    o.env = vec![
        ("PLAIT_MIRROR__SEGMENT_MAX_DELAY_MS".into(), "200".into()),
        ("PLAIT_MIRROR__DEVICE_MERGE_INTERVAL_MS".into(), "300".into()),
    ];
    o.restart();
    let notes = until_body(&o, "/notes", "D's text edit merged", |b| has(b, SECRETS[0])).await;
    let notes = String::from_utf8(notes).unwrap();
    assert_eq!(
        notes,
        format!("{}\nfirst line\nowner line\n", SECRETS[0]),
        "both edits"
    );
    let cfg = until_body(&o, "/cfg", "D's JSON change merged", |b| has(b, SECRETS[1])).await;
    let cfg: serde_json::Value = serde_json::from_slice(&cfg).unwrap();
    assert_eq!(
        cfg,
        serde_json::json!({"a": 1, "o": true, "d": SECRETS[1]}),
        "both changes"
    );
    // A missing resource answers a plain GET 200 with an empty body: wait for the bytes.
    let bin = until_body(&o, "/dev.bin", "D's bytes resource merged", |b| {
        has(b, SECRETS[2])
    })
    .await;
    assert_eq!(bin, SECRETS[2].as_bytes());
    let (status, body) = owner_get(&o, "/img.bin").await;
    assert_eq!((status, body.as_slice()), (200, &b"owner-bytes"[..]));

    // D follows O's chain on M: the merged text (with O's line written before the kill)
    // and a new write of O's reach D through M, with O gone again (so not from O).
    let before = pushed(&o, 0).await;
    put(&o, "/back", "text/plain", OWNER_BACK.as_bytes()).await;
    let sealed = pushed(&o, before).await;
    o.kill9();
    followed(&d, &oid, sealed).await;
    until_body(&d, &format!("/~{oid}/back"), "O's new write on D", |b| {
        b == OWNER_BACK.as_bytes()
    })
    .await;
    until_body(&d, &format!("/~{oid}/notes"), "O's merged text on D", |b| {
        b == notes.as_bytes()
    })
    .await;
    o.restart();

    // M held only ciphertext of D's writes.
    let raw = raw_storage(&m);
    for s in SECRETS {
        assert!(!holds(&raw, s), "{s} in M's storage");
    }
    assert!(
        holds(&raw_storage(&d), SECRETS[2]),
        "the search finds what is there"
    );

    // Revoked, D is refused by M (O tells it at once) and O has nothing D sealed after.
    let out = ok(&o, &["device", "revoke", &device]);
    assert!(out.contains("1 mirror(s) told"), "{out}");
    let held = || async { chain_on(&m, &device).await.0 };
    let before = held().await;
    assert!(before >= 1, "M holds D's chain");
    put(
        &d,
        &format!("/~{oid}/late"),
        "text/plain",
        b"after-the-revocation-DW4",
    )
    .await;
    until("M refuses the revoked device's push", || {
        m.log()
            .lines()
            .any(|l| l.contains("device push refused") && l.contains(&device) && l.contains("revoked"))
    })
    .await;
    until("D shows the refusal", || {
        let l = mirror_list(&d);
        l["device_pushes"].to_string().contains("refused, revoked")
    })
    .await;
    assert_eq!(
        held().await,
        before,
        "M stored nothing of D's after the revocation"
    );
    let (_, body) = owner_get(&o, "/late").await;
    assert!(!has(&body, "DW4"), "a revoked device's later write is not merged");
    // Nor does D open what O seals after the revocation, though it follows past it
    // (with O gone, so that D can only have it from M).
    let before = pushed(&o, 0).await;
    put(&o, "/after-revoke", "text/plain", AFTER_REVOKE.as_bytes()).await;
    let sealed = pushed(&o, before).await;
    o.kill9();
    followed(&d, &oid, sealed).await;
    let (_, body) = owner_get(&d, &format!("/~{oid}/after-revoke")).await;
    assert!(
        !has(&body, AFTER_REVOKE),
        "a revoked device opened a later segment"
    );
    assert!(!holds(&raw_storage(&d), AFTER_REVOKE));

    // A device whose certificate is not its owner's signature is refused by M.
    let mut dev: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ddir.path().join("device.json")).unwrap()).unwrap();
    let cert = dev["certificate"].as_str().unwrap();
    let mut bytes = data_encoding::BASE64URL_NOPAD.decode(cert.as_bytes()).unwrap();
    bytes[120] ^= 1; // in the owner's signature
    dev["certificate"] = data_encoding::BASE64URL_NOPAD.encode(&bytes).into();
    std::fs::write(ddir.path().join("device.json"), dev.to_string()).unwrap();
    d.restart();
    put(&d, &format!("/~{oid}/forged"), "text/plain", b"not merged").await;
    until("M refuses the forged certificate", || {
        m.log().contains("bad-certificate") && m.log().contains(&device)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, body) = owner_get(&o, "/forged").await;
    assert!(!has(&body, "not merged"), "nothing of a refused chain is merged");
}

/// Where M's chain of `namespace` stands: (head, checkpoint upto).
async fn chain_on(m: &Plait, namespace: &str) -> (u64, u64) {
    let (k, v) = m.owner_auth();
    let r = reqwest::Client::new()
        .get(m.url(&format!("/.well-known/plait/mirror/{namespace}")))
        .header(k, v)
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    (v["head"].as_u64().unwrap(), v["checkpoint"].as_u64().unwrap_or(0))
}

/// O checkpoints its own chain after each seal (ratio 0): once it merged D's writes and
/// M holds a checkpoint made after, O has M drop D's chain up to what it merged. D's
/// chain goes on after that, and O merges what follows.
async fn the_owners_checkpoint_compacts_a_devices_merged_chain(store: Store) {
    let m = p2p_plait(store.clone());
    let o = Plait::start_with_env(
        another(&store),
        &["--p2p-listen", "/ip4/127.0.0.1/tcp/0"],
        &[
            ("PLAIT_MIRROR__SEGMENT_MAX_DELAY_MS", "200"),
            ("PLAIT_MIRROR__DEVICE_MERGE_INTERVAL_MS", "300"),
            ("PLAIT_MIRROR__CHECKPOINT_RATIO", "0"),
            ("PLAIT_MIRROR__CHECKPOINT_MIN_BYTES", "1"),
        ],
    );
    let oid = last_line(&ok(&o, &["keygen"]));
    ok(&m, &["mirror", "grant", &oid, "--quota", "10MiB"]);
    put(&o, "/notes", "text/plain", b"first line\n").await;
    ok(&o, &["mirror", "add", &last_line(&ok(&m, &["invite"]))]);
    let linked = ok(&o, &["device", "link"]);
    let link = last_line(&linked);
    let device = linked.split_whitespace().nth(1).unwrap().to_string();
    let dstore = another(&store);
    let ddir = tempfile::tempdir().unwrap();
    let (joined, out) = device_join(ddir.path(), &dstore, &link);
    assert!(joined, "device join failed: {out}\nmirror log:\n{}", m.log());
    let d = Plait::start_in(dstore, ddir.path(), &["--p2p-listen", "/ip4/127.0.0.1/tcp/0"]);

    let used = || -> u64 { mirror_list(&m)["grants"][0]["used"].as_u64().unwrap() };
    for i in 0..3 {
        let v = format!("device write {i} {}", "x".repeat(20_000));
        put(&d, &format!("/~{oid}/d{i}"), "text/plain", v.as_bytes()).await;
        until_body(&o, &format!("/d{i}"), "D's write merged", |b| b == v.as_bytes()).await;
    }
    // Merged, then sealed by O into a checkpoint M holds: D's chain there is dropped.
    let mut at = (0, 0);
    until("M drops what O merged of D's chain", || {
        at = futures::executor::block_on(chain_on(&m, &device));
        at.0 >= 1 && at.1 == at.0
    })
    .await;
    let compacted = used();
    assert!(
        compacted < 3 * 20_000,
        "M's use for O and D is {compacted} bytes after the compaction, {at:?}\nO's log:\n{}",
        o.log()
    );
    assert!(
        o.log().contains("compacted devices' merged chains"),
        "{}",
        o.log()
    );

    // D's chain goes on after the checkpoint, and O merges what follows.
    put(
        &d,
        &format!("/~{oid}/after"),
        "text/plain",
        b"after-the-compaction",
    )
    .await;
    until_body(&o, "/after", "D's write after the compaction merged", |b| {
        b == b"after-the-compaction"
    })
    .await;
    let (head, _) = chain_on(&m, &device).await;
    assert!(
        head > at.0,
        "D's chain grew past the checkpoint: {head} after {at:?}"
    );
}

on_both_stores!(
    the_owner_merges_a_devices_writes_after_a_kill,
    the_owners_checkpoint_compacts_a_devices_merged_chain
);
