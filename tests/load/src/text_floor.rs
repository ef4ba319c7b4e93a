//! `text-floor`: the floor of `hot-text` — what the CRDT alone costs. The same edits
//! `puts --kind text --resources 1` makes (one code point inserted at the start of one text
//! document, per PUT) applied in a loop in this process to one automerge text document, the
//! way Plait's text document commits a write: a splice, a commit with a label and a time,
//! and the committed change's bytes copied out (what the store then appends). No HTTP, no
//! store, no subscribers: the ratio of Plait's PUT/s to this is the share of a write that
//! is the CRDT's.

use std::time::{Duration, Instant};

use anyhow::Context;
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{AutoCommit, ObjType, ROOT};

use crate::{hist, summary};

pub fn text_floor(seconds: u64) -> anyhow::Result<serde_json::Value> {
    let mut doc = AutoCommit::new();
    let text = doc.put_object(ROOT, "text", ObjType::Text)?;
    doc.commit();
    let mut lat = hist();
    let mut bytes = 0usize;
    let mut edits = 0u64;
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(seconds);
    while Instant::now() < end {
        let sent = Instant::now();
        doc.splice_text(&text, 0, 0, "x")?;
        let hash = doc
            .commit_with(
                CommitOptions::default()
                    .with_message(format!("load-{edits}"))
                    .with_time(1_700_000_000),
            )
            .context("an edit made no change")?;
        let change = doc
            .get_change_by_hash(&hash)
            .context("committed change missing")?;
        bytes += change.raw_bytes().to_vec().len();
        lat.record(sent.elapsed().as_micros().max(1) as u64)?;
        edits += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "workload": "text-floor",
        "seconds": secs,
        "edits": edits,
        "edits_per_sec": edits as f64 / secs,
        "change_bytes_avg": bytes as f64 / edits.max(1) as f64,
        "edit_latency": summary(&lat),
    }))
}
