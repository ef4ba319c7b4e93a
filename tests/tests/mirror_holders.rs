//! Holder records with real processes: an owner O pushes sealed segments to a mirror M;
//! O's signed address record in M's network then names M as a holder. O is killed
//! (`kill -9`); a third server N joins M's network only afterwards (so it never saw O's
//! record) and looks O up: the record it finds, kept by M, names M. Both stores.

use plait_tests::mirror::{another, id, ok, on, p2p_plait, until};
use plait_tests::on_both_stores;
use plait_tests::plait::{Plait, Store};

/// The record `p` finds for `id` (`plait resolve`), if the lookup succeeds.
fn resolve(p: &Plait, id: &str) -> Option<serde_json::Value> {
    let (found, text) = on(p, &["resolve", id]);
    found.then(|| serde_json::from_str(&text).unwrap())
}

fn names(rec: &serde_json::Value, holder: &str) -> bool {
    rec["holders"]
        .as_array()
        .is_some_and(|h| h.iter().any(|x| x == holder))
}

async fn a_lookup_finds_the_mirror_while_the_owner_is_offline(store: Store) {
    let m = p2p_plait(store.clone());
    let mut o = p2p_plait(another(&store));
    let n = p2p_plait(another(&store));
    let (mid, oid) = (id(&m), id(&o));

    let link = ok(&m, &["invite"]);
    ok(&m, &["mirror", "grant", &oid, "--quota", "10MiB"]);
    ok(&o, &["mirror", "add", &link]);
    let (k, v) = o.owner_auth();
    let r = reqwest::Client::new()
        .put(o.url("/notes"))
        .header(k, v)
        .header("Content-Type", "text/plain")
        .body("held by the mirror")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());

    // Once M acknowledged a push, O's record (as M finds it) names M.
    until("O's record, as M finds it, names M", || {
        resolve(&m, &oid).is_some_and(|r| names(&r, &mid))
    })
    .await;

    // O goes away for good; N joins M's network only now, and looks O up.
    o.kill9();
    let link = ok(&m, &["invite"]);
    ok(&n, &["join", &link]);
    let mut found = None;
    until("N finds O's record", || {
        found = resolve(&n, &oid);
        found.is_some()
    })
    .await;
    let rec = found.unwrap();
    assert_eq!(rec["id"], oid.as_str());
    assert!(names(&rec, &mid), "{rec}");
    assert_eq!(rec["holders"].as_array().unwrap().len(), 1, "{rec}");
    // The record N found is O's: M cannot add itself to it (the signature covers holders).
    let held = plait_bridge::record::AddressRecord::check(
        &serde_json::to_vec(&rec).unwrap(),
        &plait_bridge::record::AddressRecord::key_for(rec["dht"].as_str().unwrap(), &oid.parse().unwrap()),
        rec["dht"].as_str().unwrap(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        None,
    )
    .unwrap();
    assert_eq!(held.holders, vec![mid.parse().unwrap()]);
}

on_both_stores!(a_lookup_finds_the_mirror_while_the_owner_is_offline);
