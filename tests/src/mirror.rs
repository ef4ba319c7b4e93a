//! What the encrypted mirror's tests share (`mirror`, `devices`, `device_writes`,
//! `mirror_http`, `mirror_holders`, `mirror_readers`): servers with a p2p node that seal
//! quickly, a second store of the same sort, the `plait` command on a server's data dir
//! (and `plait device join` into a new one), the owner's writes and reads, waiting for a
//! condition, and searching everything a server stores for plaintext.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::plait::{Plait, Store, binary};

/// How long a test waits for something a server does on its own (a push, a lookup).
pub const WAIT: Duration = Duration::from_secs(30);

/// A server with a p2p node on a free port that seals its changes every 200 ms.
pub fn p2p_plait(store: Store) -> Plait {
    Plait::start_with_env(
        store,
        &["--p2p-listen", "/ip4/127.0.0.1/tcp/0"],
        &[("PLAIT_MIRROR__SEGMENT_MAX_DELAY_MS", "200")],
    )
}

/// Another store of the same sort (a second fresh database on Postgres).
pub fn another(store: &Store) -> Store {
    match store {
        Store::Embedded => Store::Embedded,
        Store::Postgres(_) => Store::fresh_postgres(),
    }
}

/// Runs `plait ARGS`: whether it succeeded, and its output (stdout then stderr), trimmed.
pub fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(binary()).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text.trim().to_string())
}

/// The last line of a command's output (where `plait` prints a link, key or id), trimmed.
pub fn last_line(s: &str) -> String {
    s.lines().last().unwrap_or_default().trim().to_string()
}

/// `plait device join LINK` into a new data dir `dir`, on `store`.
pub fn device_join(dir: &std::path::Path, store: &Store, link: &str) -> (bool, String) {
    let dir = dir.to_str().unwrap();
    let mut args = vec!["device", "join", "--data-dir", dir];
    if let Store::Postgres(url) = store {
        args.extend(["--database-url", url.as_str()]);
    }
    args.push(link);
    run(&args)
}

/// A GET on `p` as its owner: the status and body, or status 0 if it did not answer
/// within 30 s.
pub async fn owner_get(p: &Plait, path: &str) -> (u16, Vec<u8>) {
    let (k, v) = p.owner_auth();
    match reqwest::Client::new()
        .get(p.url(path))
        .header(k, v)
        .timeout(WAIT)
        .send()
        .await
    {
        Ok(r) => (r.status().as_u16(), r.bytes().await.unwrap_or_default().to_vec()),
        Err(_) => (0, Vec::new()),
    }
}

/// `plait mirror list --json` on a running server.
pub fn mirror_list(p: &Plait) -> serde_json::Value {
    serde_json::from_str(&ok(p, &["mirror", "list", "--json"])).unwrap()
}

/// Waits until owner `o` has sealed past `after` and its (first) mirror acknowledged
/// every segment it sealed; answers with its sealed seq.
pub async fn pushed(o: &Plait, after: u64) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let l = mirror_list(o);
        let sealed = l["sealed_seq"].as_u64().unwrap_or(0);
        if sealed > after && l["mirrors"][0]["acked"].as_u64() == Some(sealed) {
            return sealed;
        }
        assert!(
            Instant::now() < deadline,
            "timed out: the mirror holds all the owner sealed past {after}; the owner's list: {l}\nits log:\n{}",
            o.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `p` (a reader or a device) has followed `owner`'s chain through `seq`.
pub async fn followed(p: &Plait, owner: &str, seq: u64) {
    until(&format!("following {owner}'s chain through {seq}"), || {
        mirror_list(p)["following"][owner]["seq"]
            .as_u64()
            .is_some_and(|s| s >= seq)
    })
    .await;
}

/// Runs `plait ARGS --data-dir <p's data dir>`.
pub fn on(p: &Plait, args: &[&str]) -> (bool, String) {
    let dir = p.data_dir().to_str().unwrap().to_string();
    let mut all = args.to_vec();
    all.extend(["--data-dir", &dir]);
    run(&all)
}

/// [`on`], which must succeed; its output.
pub fn ok(p: &Plait, args: &[&str]) -> String {
    let (success, text) = on(p, args);
    assert!(success, "plait {args:?} failed: {text}\nserver log:\n{}", p.log());
    text
}

/// The server's identity (the last line `plait keygen` prints for an existing key).
pub fn id(p: &Plait) -> String {
    ok(p, &["keygen"]).lines().last().unwrap().to_string()
}

/// Waits until `f` holds, for at most [`WAIT`].
pub async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A PUT by the server's owner, which must succeed.
pub async fn put(p: &Plait, path: &str, ty: &str, body: &[u8]) {
    let (k, v) = p.owner_auth();
    let r = reqwest::Client::new()
        .put(p.url(path))
        .header(k, v)
        .header("Content-Type", ty)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "PUT {path}: {}", r.status());
}

/// Everything a server stores, as bytes to search: the files of its data dir (the
/// embedded store, its journal, key files) or every row of every table of its database.
pub fn raw_storage(m: &Plait) -> Vec<u8> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(m.data_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            all.extend(std::fs::read(&p).unwrap_or_default());
        }
    }
    if let Store::Postgres(url) = &m.store {
        let pg = crate::pg::cluster();
        let tables = pg.psql(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'");
        for t in tables.lines().filter(|l| !l.is_empty()) {
            // Rows as text: bytea shows as hex, which `holds` also looks for.
            all.extend(
                pg.psql(url, &format!("SELECT t::text FROM \"{t}\" t"))
                    .into_bytes(),
            );
        }
    }
    all
}

/// Whether `hay` holds `needle` anywhere.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether `raw` holds `s`, as is or hex-encoded (Postgres shows bytea as hex).
pub fn holds(raw: &[u8], s: &str) -> bool {
    let hex: String = s.bytes().map(|b| format!("{b:02x}")).collect();
    contains(raw, s.as_bytes()) || contains(raw, hex.as_bytes())
}
