//! Writes applied to a document through the engine's document code (`doc::Document`),
//! parsed as the HTTP layer parses them: Braid headers (`Version`, `Parents`, `Peer`,
//! `Repr-Digest`) and a PUT body (whole, `Content-Range` or `Patches: N`). Input: a first
//! line naming the kind (`json`, `text` or `bytes`), then writes, each a request head, a
//! blank line and a body, separated by lines reading `---`.
//!
//! Beyond not panicking: a JSON document never nests deeper than the depth limit after
//! any write (whatever the patches and the parents they were made on), and renders as
//! JSON that parses again; a text document's rope agrees with its automerge text; every
//! document renders the same at its current version as now.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use plait_server::braid::BraidHeaders;
use plait_server::braid::patch::parse_write_body;
use plait_server::doc::{DocWrite, Document, json};
use plait_server::model::Kind;

/// The depth limit the writes are held to: low, so that reaching it is within a fuzzer's
/// reach (the default is 128).
const MAX_DEPTH: usize = 8;

/// Writes per input: enough to make merges, few enough to keep executions fast.
const MAX_WRITES: usize = 8;

fuzz_target!(|data: &[u8]| {
    let parts = plait_fuzz::split_on_line(data, b"---");
    let (first, writes) = parts.split_first().expect("at least one part");
    let kind = match first.trim_ascii() {
        b"json" => Kind::Json,
        b"text" => Kind::Text,
        b"bytes" => Kind::Bytes,
        _ => return,
    };
    let mut doc = Document::new(kind);
    let mut created = false;
    for (i, w) in writes.iter().take(MAX_WRITES).enumerate() {
        let (head, body) = plait_fuzz::split_head(w);
        let headers = plait_fuzz::header_map(head);
        let Ok(braid) = BraidHeaders::parse(&headers) else {
            continue;
        };
        let Ok(body) = parse_write_body(&headers, Bytes::copy_from_slice(body)) else {
            continue;
        };
        // A PUT names at most one version id (as `http::resource` requires).
        let version = match braid.version.as_ref().map(|v| v.ids()) {
            None | Some([]) => None,
            Some([one]) => Some(one),
            Some(_) => continue,
        };
        let write = DocWrite {
            body: &body,
            version,
            parents: braid.parents.as_ref(),
            agent_hint: braid.peer.as_deref(),
            force: !created,
            digest: braid.repr_digest.as_ref(),
            max_json_depth: MAX_DEPTH,
        };
        if doc.apply(&write, 1_800_000_000 + i as i64).is_ok() {
            created = true;
        }
        check(&mut doc);
    }
});

fn check(doc: &mut Document) {
    let now = doc.render();
    match doc {
        Document::Json(d) => {
            let v = d.value();
            assert!(json::depth(&v) <= MAX_DEPTH, "{v}");
            let again: serde_json::Value = serde_json::from_slice(&now).expect("renders as JSON");
            assert_eq!(again, v);
        }
        Document::Text(d) => assert_eq!(d.text(), d.automerge_text()),
        Document::Bytes(_) => {}
    }
    let frontier = doc.frontier();
    assert_eq!(doc.render_at(&frontier).as_deref(), Ok(&now[..]));
}
