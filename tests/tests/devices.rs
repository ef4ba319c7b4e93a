//! Devices with real processes: an owner O writes text, JSON and bytes and pushes them,
//! sealed, to a mirror M; O prints a device link and is killed with `kill -9`; a new data
//! dir D joins with the link — joining M's network, taking its keys from M — and restores
//! every resource of O's namespace from M, which `plait serve` on D then serves under
//! `/~<O>/…` with exactly what O wrote. M's storage holds none of the plaintext or keys.
//! A link used already and one expired are refused with a clear error. Both stores.

use std::path::Path;
use std::time::Duration;

use plait_bridge::mirror::SealKey;
use plait_bridge::mirror::device::DeviceLink;
use plait_server::mirror::batch;
use plait_tests::mirror::{
    another, contains, device_join, holds, last_line, ok, owner_get, p2p_plait, put, raw_storage, run, until,
};
use plait_tests::on_both_stores;
use plait_tests::plait::{Plait, Store};

/// Strings O writes; none may appear in M's storage.
const SECRETS: [&str; 3] = [
    "device-text-secret-QWV1",
    "device-json-secret-QWV2",
    "device-bytes-secret-QWV3",
];

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn a_device_restores_from_the_mirror_while_the_owner_is_gone(store: Store) {
    let m = p2p_plait(store.clone());
    let mut o = p2p_plait(another(&store));
    let oid = last_line(&ok(&o, &["keygen"]));
    ok(&m, &["mirror", "grant", &oid, "--quota", "10MiB"]);

    put(&o, "/notes/secret", "text/plain", SECRETS[0].as_bytes()).await;
    let json = format!(r#"{{"password":"{}","n":[1,2]}}"#, SECRETS[1]);
    put(&o, "/cfg", "application/json", json.as_bytes()).await;
    put(&o, "/img.bin", "application/octet-stream", SECRETS[2].as_bytes()).await;
    // Waits until M holds all of it.
    ok(&o, &["mirror", "add", &last_line(&ok(&m, &["invite"]))]);

    // The link carries a one-use invite to M's network that M made for O's device.
    let linked = ok(&o, &["device", "link"]);
    let link = last_line(&linked);
    assert!(link.starts_with("plait-device:"), "{linked}");
    assert!(
        link.parse::<DeviceLink>()
            .unwrap()
            .invite
            .starts_with("plait-invite:"),
        "{linked}"
    );
    // Links made with an invite of M's operator.
    let invite = last_line(&ok(&m, &["invite", "--uses", "2"]));
    let twice = last_line(&ok(&o, &["device", "link", "--invite", &invite]));
    let short = last_line(&ok(
        &o,
        &["device", "link", "--invite", &invite, "--expires", "1"],
    ));

    // O is gone for good.
    o.kill9();

    // D joins and restores everything from M.
    let dstore = another(&store);
    let ddir = tempfile::tempdir().unwrap();
    let (joined, out) = device_join(ddir.path(), &dstore, &link);
    assert!(joined, "device join failed: {out}\nmirror log:\n{}", m.log());
    assert!(
        out.contains(&oid) && out.contains("restored 3 resources"),
        "{out}"
    );
    #[cfg(unix)]
    for f in [
        "identity.pem",
        "seal-key.txt",
        "owner-seal-key.txt",
        "device.json",
    ] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(ddir.path().join(f))
            .unwrap_or_else(|e| panic!("{f}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let device: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ddir.path().join("device.json")).unwrap()).unwrap();
    assert_eq!(device["owner"], oid.as_str());

    let d = Plait::start_in(dstore, ddir.path(), &["--p2p-listen", "/ip4/127.0.0.1/tcp/0"]);
    let (status, body) = owner_get(&d, &format!("/~{oid}/notes/secret")).await;
    assert_eq!(
        (status, body.as_slice()),
        (200, SECRETS[0].as_bytes()),
        "{}",
        d.log()
    );
    let (status, body) = owner_get(&d, &format!("/~{oid}/cfg")).await;
    assert_eq!(status, 200);
    let got: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(got, serde_json::from_str::<serde_json::Value>(&json).unwrap());
    let (status, body) = owner_get(&d, &format!("/~{oid}/img.bin")).await;
    assert_eq!((status, body.as_slice()), (200, SECRETS[2].as_bytes()));

    // M held only ciphertext: no plaintext, and not the keys it passed on.
    let raw = raw_storage(&m);
    for s in SECRETS {
        assert!(!holds(&raw, s), "{s} in M's storage");
    }
    let owner_key = std::fs::read_to_string(ddir.path().join("owner-seal-key.txt")).unwrap();
    let secret = owner_key
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .unwrap();
    assert!(!holds(&raw, secret), "the owner's seal key in M's storage");
    // The search finds what is there: D's store holds the bytes value.
    assert!(holds(&raw_storage(&d), SECRETS[2]));

    // The link works once: its bundle is gone (the device, a member already, is let
    // into M's network again, so the refusal is the bundle's).
    let again = tempfile::tempdir().unwrap();
    let (joined, out) = device_join(again.path(), &another(&store), &link);
    assert!(!joined, "{out}");
    assert!(out.contains("no-bundle") && out.contains("used already"), "{out}");
    // A link carrying an invite of M's operator works as well.
    let other = tempfile::tempdir().unwrap();
    let (joined, out) = device_join(other.path(), &another(&store), &twice);
    assert!(joined, "{out}");
    assert!(out.contains("restored 3 resources"), "{out}");

    // An expired link is refused before anything is done.
    let expires = short.parse::<DeviceLink>().unwrap().expires_ms;
    while now_ms() <= expires {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let late = tempfile::tempdir().unwrap();
    let (joined, out) = device_join(late.path(), &another(&store), &short);
    assert!(!joined, "{out}");
    assert!(out.contains("expired"), "{out}");
    assert!(!late.path().join("identity.pem").exists());
}

/// The ciphertexts a mirror's store holds for `namespace`, in seq order.
fn stored_ciphertexts(m: &Plait, namespace: &str) -> Vec<Vec<u8>> {
    let ns: plait_bridge::Identity = namespace.parse().unwrap();
    match &m.store {
        Store::Embedded => {
            let db = rusqlite::Connection::open_with_flags(
                m.data_dir().join("plait.db"),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .unwrap();
            let mut q = db
                .prepare("SELECT ciphertext FROM mirror_segments WHERE namespace = ?1 ORDER BY seq")
                .unwrap();
            q.query_map([ns.as_bytes().as_slice()], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        }
        Store::Postgres(url) => {
            let hexns: String = ns.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
            let out = plait_tests::pg::cluster().psql(
                url,
                &format!(
                    "SELECT encode(ciphertext, 'hex') FROM mirror_segments \
                     WHERE namespace = '\\x{hexns}'::bytea ORDER BY seq"
                ),
            );
            out.lines()
                .filter(|l| !l.is_empty())
                .map(|l| data_encoding::HEXLOWER.decode(l.trim().as_bytes()).unwrap())
                .collect()
        }
    }
}

/// Whether `key` opens a segment whose batch holds `secret`.
fn opens_with(key: &SealKey, ciphertext: &[u8], secret: &str) -> bool {
    plait_bridge::mirror::open(key, ciphertext).is_ok_and(|plain| {
        batch::decode(&plain)
            .unwrap()
            .iter()
            .any(|e| contains(&e.data, secret.as_bytes()))
    })
}

/// The segment M holds that `key` opens and that holds `secret`.
async fn sealed_holding(m: &Plait, oid: &str, key_file: &Path, secret: &str) -> Vec<u8> {
    let key = SealKey::load_or_create(key_file).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(c) = stored_ciphertexts(m, oid)
            .into_iter()
            .find(|c| opens_with(&key, c, secret))
        {
            return c;
        }
        assert!(std::time::Instant::now() < deadline, "M never held {secret}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn a_revoked_device_cannot_open_what_is_sealed_after(store: Store) {
    let m = p2p_plait(store.clone());
    let o = p2p_plait(another(&store));
    let oid = last_line(&ok(&o, &["keygen"]));
    ok(&m, &["mirror", "grant", &oid, "--quota", "10MiB"]);
    put(&o, "/before", "text/plain", b"before-the-link-RVK0").await;
    ok(&o, &["mirror", "add", &last_line(&ok(&m, &["invite"]))]);
    let linked = ok(&o, &["device", "link"]);
    let device = linked.split_whitespace().nth(1).unwrap().to_string();
    let ddir = tempfile::tempdir().unwrap();
    let (joined, out) = device_join(ddir.path(), &another(&store), &last_line(&linked));
    assert!(joined, "{out}");
    let own = SealKey::load_or_create(&ddir.path().join("seal-key.txt")).unwrap();
    let given = SealKey::load_or_create(&ddir.path().join("owner-seal-key.txt")).unwrap();
    let o_key = o.data_dir().join("seal-key.txt");

    // What O seals after the link is sealed to the device's own key too.
    put(&o, "/after-link", "text/plain", b"after-the-link-RVK1").await;
    let c = sealed_holding(&m, &oid, &o_key, "after-the-link-RVK1").await;
    assert!(opens_with(&own, &c, "after-the-link-RVK1"));

    // Revoked: O's seal key, which the device holds, is replaced.
    let said = ok(&o, &["device", "revoke", &device]);
    assert!(said.contains(&device) && said.contains("retired"), "{said}");
    put(&o, "/after-revoke", "text/plain", b"after-the-revocation-RVK2").await;
    let c = sealed_holding(&m, &oid, &o_key, "after-the-revocation-RVK2").await;
    assert!(!opens_with(&own, &c, "after-the-revocation-RVK2"));
    assert!(plait_bridge::mirror::open(&own, &c).is_err());
    assert!(plait_bridge::mirror::open(&given, &c).is_err());
    // The key the device was given is the retired one: it still opens what came before.
    let new = SealKey::load_or_create(&o_key).unwrap();
    assert_ne!(new.recipient().to_string(), given.recipient().to_string());
    let retired: Vec<_> = std::fs::read_dir(o.data_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("seal-key-retired-"))
        .collect();
    assert_eq!(retired.len(), 1);
    let old = SealKey::load_or_create(&retired[0].path()).unwrap();
    assert_eq!(old.recipient().to_string(), given.recipient().to_string());
    // Revoking it again changes nothing more; an unknown device is an error.
    let again = ok(&o, &["device", "revoke", &device]);
    assert!(!again.contains("retired"), "{again}");
    let (known, out) = run(&[
        "device",
        "revoke",
        "--data-dir",
        o.data_dir().to_str().unwrap(),
        &oid,
    ]);
    assert!(!known && out.contains("not a device"), "{out}");
}

on_both_stores!(
    a_device_restores_from_the_mirror_while_the_owner_is_gone,
    a_revoked_device_cannot_open_what_is_sealed_after
);

/// A device joined with `link` into a fresh embedded data dir, whose join said `said`,
/// serving.
fn restored_device(m: &Plait, link: &str, said: &str) -> (tempfile::TempDir, Plait) {
    let ddir = tempfile::tempdir().unwrap();
    let (joined, out) = device_join(ddir.path(), &Store::Embedded, link);
    assert!(joined, "device join failed: {out}\nmirror log:\n{}", m.log());
    assert!(out.contains(said), "{out}");
    let d = Plait::start_in(
        Store::Embedded,
        ddir.path(),
        &["--p2p-listen", "/ip4/127.0.0.1/tcp/0"],
    );
    (ddir, d)
}

/// A chain of many segments (one resource each) is restored range by range, later ranges
/// fetched while earlier ones are applied, and a segment applied while the one before it
/// still is when the two hold different resources: every resource arrives, in the
/// chain's order (the last, a bytes value written twice in consecutive segments, holds
/// its second value).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_restores_a_long_chain_range_by_range() {
    const N: usize = 23;
    let m = p2p_plait(Store::Embedded);
    let mut o = Plait::start_with_env(
        Store::Embedded,
        &["--p2p-listen", "/ip4/127.0.0.1/tcp/0"],
        &[
            ("PLAIT_MIRROR__SEGMENT_MAX_DELAY_MS", "200"),
            ("PLAIT_MIRROR__SEGMENT_MAX_BYTES", "1"),
        ],
    );
    let oid = last_line(&ok(&o, &["keygen"]));
    ok(&m, &["mirror", "grant", &oid, "--quota", "10MiB"]);
    ok(&o, &["mirror", "add", &last_line(&ok(&m, &["invite"]))]);
    let last = N - 1;
    let ty = |i| {
        if i == last {
            "application/octet-stream"
        } else {
            "text/plain"
        }
    };
    for i in 0..N {
        put(&o, &format!("/many/{i}"), ty(i), format!("value {i}").as_bytes()).await;
    }
    // Each resource new to the chain is sealed whole; once all are, the last is written
    // again, in the next segment: restored in order, the later value wins.
    until("M holds every resource", || {
        stored_ciphertexts(&m, &oid).len() >= N
    })
    .await;
    put(&o, &format!("/many/{last}"), ty(last), b"value last, again").await;
    until("M holds the second write", || {
        stored_ciphertexts(&m, &oid).len() > N
    })
    .await;
    let link = last_line(&ok(&o, &["device", "link"]));
    let segments = stored_ciphertexts(&m, &oid).len();
    assert!(
        segments > N,
        "{segments} segments: the chain should hold one entry each"
    );
    o.kill9();

    let (_ddir, d) = restored_device(
        &m,
        &link,
        &format!("restored {N} resources ({segments} segments)"),
    );
    for i in 0..N {
        let want = if i == last {
            "value last, again".to_string()
        } else {
            format!("value {i}")
        };
        let (status, body) = owner_get(&d, &format!("/~{oid}/many/{i}")).await;
        assert_eq!((status, String::from_utf8_lossy(&body).into_owned()), (200, want));
    }
}

/// A segment that holds a resource an earlier one still being applied holds waits for
/// it: the earlier segment holds more resources than are applied at once, and the last
/// of them, a bytes value, is written again in the next segment. The device must hold
/// the second value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_waits_for_an_earlier_one_that_holds_the_same_resource() {
    const N: usize = 100;
    let m = p2p_plait(Store::Embedded);
    let mut o = Plait::start_with_env(
        Store::Embedded,
        &["--p2p-listen", "/ip4/127.0.0.1/tcp/0"],
        &[("PLAIT_MIRROR__SEGMENT_MAX_DELAY_MS", "200")],
    );
    let oid = last_line(&ok(&o, &["keygen"]));
    ok(&m, &["mirror", "grant", &oid, "--quota", "10MiB"]);
    let ty = "application/octet-stream";
    for i in 0..N {
        put(&o, &format!("/wide/{i:03}"), ty, format!("value {i}").as_bytes()).await;
    }
    // All in one segment (the mirror is added after they are written), then the last again.
    ok(&o, &["mirror", "add", &last_line(&ok(&m, &["invite"]))]);
    until("M holds the first segment", || {
        stored_ciphertexts(&m, &oid).len() == 1
    })
    .await;
    let last = format!("/wide/{:03}", N - 1);
    put(&o, &last, ty, b"the second value").await;
    until("M holds the second segment", || {
        stored_ciphertexts(&m, &oid).len() == 2
    })
    .await;
    let link = last_line(&ok(&o, &["device", "link"]));
    o.kill9();

    let (_ddir, d) = restored_device(&m, &link, &format!("restored {N} resources (2 segments)"));
    let (status, body) = owner_get(&d, &format!("/~{oid}{last}")).await;
    assert_eq!((status, &body[..]), (200, &b"the second value"[..]));
}
