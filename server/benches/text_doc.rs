//! Text documents under the automerge-perf editing trace (259,778 edits of the LaTeX
//! source of a paper), applied the way the server applies PUTs: one labelled change per
//! edit, through `TextDoc::apply`.
//!
//! Also: a text document new to a replica (a device restoring from a mirror), built from
//! the one change that wrote it or loaded from the document saved whole (`new_document`).
//!
//! Run: `PLAIT_EDITING_TRACE=/path/to/automerge-paper.json.gz cargo bench -p plait-server --bench text_doc`
//! (`-- new_document` for that group alone)
//!
//! The trace is `benchmark_data/automerge-paper.json.gz` in josephg/diamond-types (the same
//! edits as automerge/automerge-perf). It is not on any package registry, so it is not a
//! dependency and is not in this repository: point `PLAIT_EDITING_TRACE` at a copy. Without
//! it the bench runs a synthetic trace of the same length and mix (typing at a moving
//! cursor, 30% deletions), generated from a fixed seed, and says so.

use std::hint::black_box;
use std::io::Read;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use plait_server::doc::{DocWrite, Document, Outcome, TextDoc};
use plait_server::model::Kind;
use plait_server::update::{Patch, Range, WriteBody};

/// One edit: at code point `pos`, delete `del`, insert `ins`.
struct Edit {
    pos: usize,
    del: usize,
    ins: String,
}

struct Trace {
    name: String,
    edits: Vec<Edit>,
    end: Option<String>,
}

fn load_trace() -> Trace {
    if let Ok(path) = std::env::var("PLAIT_EDITING_TRACE") {
        let raw = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut json = String::new();
        if path.ends_with(".gz") {
            flate2::read::GzDecoder::new(&raw[..])
                .read_to_string(&mut json)
                .expect("gzip");
        } else {
            json = String::from_utf8(raw).expect("utf-8");
        }
        let v: serde_json::Value = serde_json::from_str(&json).expect("trace JSON");
        let edits = v["txns"]
            .as_array()
            .expect("txns")
            .iter()
            .flat_map(|t| t["patches"].as_array().expect("patches").clone())
            .map(|p| Edit {
                pos: p[0].as_u64().unwrap() as usize,
                del: p[1].as_u64().unwrap() as usize,
                ins: p[2].as_str().unwrap().to_string(),
            })
            .collect();
        return Trace {
            name: format!("automerge-perf ({path})"),
            edits,
            end: v["endContent"].as_str().map(str::to_string),
        };
    }
    // Synthetic: same length, typing at a cursor that mostly moves forward.
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut len, mut cursor, mut edits) = (0usize, 0usize, Vec::with_capacity(259_778));
    for _ in 0..259_778 {
        if next() % 50 == 0 {
            cursor = (next() as usize) % (len + 1);
        }
        if len > 0 && cursor > 0 && next() % 10 < 3 {
            edits.push(Edit {
                pos: cursor - 1,
                del: 1,
                ins: String::new(),
            });
            cursor -= 1;
            len -= 1;
        } else {
            let c = (b'a' + (next() % 26) as u8) as char;
            edits.push(Edit {
                pos: cursor,
                del: 0,
                ins: c.to_string(),
            });
            cursor += 1;
            len += 1;
        }
    }
    Trace {
        name: "synthetic (set PLAIT_EDITING_TRACE for the automerge-perf trace)".into(),
        edits,
        end: None,
    }
}

fn put(doc: &mut TextDoc, e: &Edit) {
    let body = WriteBody::Patches(vec![Patch {
        range: Range::Text {
            start: e.pos,
            end: e.pos + e.del,
        },
        content: Bytes::copy_from_slice(e.ins.as_bytes()),
    }]);
    write(doc, &body);
}

/// Applies `body` as a PUT from one client, at the current version.
fn write(doc: &mut TextDoc, body: &WriteBody) {
    let w = DocWrite {
        body,
        version: None,
        parents: None,
        agent_hint: Some("bench"),
        force: false,
        digest: None,
        max_json_depth: plait_server::doc::json::MAX_JSON_DEPTH,
    };
    black_box(doc.apply(&w, 0).expect("the write applies"));
}

fn doc_with(trace: &Trace, n: usize) -> TextDoc {
    let mut d = TextDoc::new();
    for e in &trace.edits[..n] {
        put(&mut d, e);
    }
    d
}

fn benches(c: &mut Criterion) {
    let trace = load_trace();
    eprintln!("trace: {} — {} edits", trace.name, trace.edits.len());

    // The whole trace as PUTs: one run, timed by hand (a criterion sample would be minutes).
    // `PLAIT_BENCH_QUICK=1` skips it and the save/load group (for iterating on the rest).
    if std::env::var("PLAIT_BENCH_QUICK").is_ok() {
        return hot_doc(c, &trace);
    }
    let t0 = Instant::now();
    let full = doc_with(&trace, trace.edits.len());
    let took = t0.elapsed();
    if let Some(end) = &trace.end {
        assert_eq!(&full.text(), end, "the trace replays to its recorded end state");
    }
    eprintln!(
        "trace/apply_as_puts: {:.2} s for {} edits = {:.1} µs per edit ({:.0} edits/s)",
        took.as_secs_f64(),
        trace.edits.len(),
        took.as_secs_f64() * 1e6 / trace.edits.len() as f64,
        trace.edits.len() as f64 / took.as_secs_f64()
    );

    let mut g = c.benchmark_group("trace");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    let mut doc = Document::Text(full);
    let saved = doc.save().expect("text saves");
    eprintln!("trace/save size: {} bytes", saved.len());
    g.bench_function("save", |b| b.iter(|| black_box(doc.save())));
    g.bench_function("load", |b| {
        b.iter(|| black_box(Document::load_automerge(Kind::Text, Some(&saved), std::iter::empty()).unwrap()))
    });
    g.finish();
    drop(doc);

    hot_doc(c, &trace);
}

/// One more PUT (typing at the end) on a document whose history is already N edits long.
fn hot_doc(c: &mut Criterion, trace: &Trace) {
    let mut g = c.benchmark_group("hot_doc_put");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    for n in [1_000, 10_000, 100_000, trace.edits.len()] {
        let mut d = doc_with(trace, n);
        let mut len = d.text().chars().count();
        g.bench_function(format!("render_after_{n}"), |b| b.iter(|| black_box(d.text())));
        g.bench_function(format!("after_{n}"), |b| {
            b.iter(|| {
                put(
                    &mut d,
                    &Edit {
                        pos: len,
                        del: 0,
                        ins: "x".into(),
                    },
                );
                len += 1;
            })
        });
    }
    g.finish();
}

/// One PUT of a whole body of N bytes to a new text resource: what a client that uploads a
/// file costs the server (automerge holds one op per code point).
fn whole_body(c: &mut Criterion) {
    let mut g = c.benchmark_group("whole_body_put");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    for n in [256 << 10, 1 << 20, 2 << 20] {
        let body = WriteBody::Full {
            media_type: None,
            body: Bytes::from("x".repeat(n)),
        };
        g.bench_function(format!("{}_kib", n >> 10), |b| {
            b.iter(|| {
                let mut d = TextDoc::new();
                write(&mut d, &body);
                d
            })
        });
    }
    g.finish();
}

/// A text document of N letters written in one PUT, as a replica that has none of it gets
/// it: built from the change that wrote it (what a device restoring from a mirror does with
/// a change entry), against loaded from the document saved whole (a snapshot entry).
fn new_document(c: &mut Criterion) {
    let mut g = c.benchmark_group("new_document");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    for n in [500, 2_000, 4_000] {
        let letters: String = rand::Rng::sample_iter(
            rand::thread_rng(),
            rand::distributions::Uniform::new_inclusive(b'a', b'z'),
        )
        .take(n)
        .map(char::from)
        .collect();
        let body = WriteBody::Full {
            media_type: None,
            body: Bytes::from(letters),
        };
        let mut d = TextDoc::new();
        let w = DocWrite {
            body: &body,
            version: None,
            parents: None,
            agent_hint: Some("bench"),
            force: true,
            digest: None,
            max_json_depth: plait_server::doc::json::MAX_JSON_DEPTH,
        };
        let change = match d.apply(&w, 0).expect("the write applies") {
            Outcome::Applied(a) if a.earlier.is_empty() => a.change,
            _ => panic!("one change"),
        };
        let mut doc = Document::Text(d);
        let saved = doc.save().expect("text saves");
        eprintln!(
            "new_document/{n}: the change {} bytes, the document saved {} bytes",
            change.len(),
            saved.len()
        );
        g.bench_function(format!("from_change_{n}"), |b| {
            b.iter(|| black_box(Document::load_automerge(Kind::Text, None, [&change[..]]).unwrap()))
        });
        g.bench_function(format!("from_saved_{n}"), |b| {
            b.iter(|| {
                black_box(Document::load_automerge(Kind::Text, Some(&saved), std::iter::empty()).unwrap())
            })
        });
    }
    g.finish();
}

criterion_group!(text, whole_body, new_document, benches);
criterion_main!(text);
