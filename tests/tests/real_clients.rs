//! Real third-party clients from npm against the `plait` binary, on both stores.

use plait_tests::plait::{Plait, Store};

fn braid_http_client(store: Store) {
    let p = Plait::start(store);
    let out = plait_tests::node::run("braid_interop.js", &[&p.url("")]);
    assert!(out.contains("ok:"), "{out}");
}

#[test]
fn braid_http_client_on_embedded() {
    braid_http_client(Store::Embedded);
}

#[test]
fn braid_http_client_on_postgres() {
    braid_http_client(Store::fresh_postgres());
}
