//! Property tests of the merge invariant (issue 16): replicas of one document that edit it
//! concurrently and then take each other's changes, each in its own random order, end with
//! the same value and the same version — for text and for JSON, whatever the edits.

use bytes::Bytes;
use proptest::prelude::*;

use super::{DocWrite, Document, Outcome};
use crate::model::Kind;
use crate::update::{Patch, Range, WriteBody};

/// One replica's edit, in terms that fit any current value.
#[derive(Debug, Clone)]
enum Edit {
    /// Text: replace `[at, at+del)` (clamped to the text) with `ins`.
    Text {
        at: usize,
        del: usize,
        ins: String,
    },
    /// JSON: set `.m.<key>`, splice `.list`, or replace `.a`.
    Key {
        key: u8,
        value: i64,
    },
    Splice {
        at: usize,
        del: usize,
        values: Vec<i64>,
    },
    Scalar(i64),
    /// JSON: remove `.m.<key>` (if there).
    Remove {
        key: u8,
    },
}

fn text_edit() -> impl Strategy<Value = Edit> {
    (0usize..40, 0usize..4, "[a-zé😀]{0,4}").prop_map(|(at, del, ins)| Edit::Text { at, del, ins })
}

fn json_edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (0u8..4, any::<i64>()).prop_map(|(key, value)| Edit::Key { key, value }),
        (0usize..6, 0usize..3, prop::collection::vec(-9i64..9, 0..3))
            .prop_map(|(at, del, values)| Edit::Splice { at, del, values }),
        any::<i64>().prop_map(Edit::Scalar),
        (0u8..4).prop_map(|key| Edit::Remove { key }),
    ]
}

/// Applies `e` on `doc`'s current version as agent `agent`; the changes it made.
fn edit(doc: &mut Document, agent: &str, e: &Edit) -> Vec<Vec<u8>> {
    let current = doc.render();
    let patch = match e {
        Edit::Text { at, del, ins } => {
            let len = std::str::from_utf8(&current).unwrap().chars().count();
            let at = (*at).min(len);
            let del = (*del).min(len - at);
            Patch {
                range: Range::Text {
                    start: at,
                    end: at + del,
                },
                content: Bytes::from(ins.clone()),
            }
        }
        _ => {
            let v: serde_json::Value = serde_json::from_slice(&current).unwrap();
            let (range, content) = match e {
                Edit::Key { key, value } => (format!(".m.k{key}"), value.to_string()),
                Edit::Splice { at, del, values } => {
                    let len = v["list"].as_array().map_or(0, Vec::len);
                    let at = (*at).min(len);
                    let del = (*del).min(len - at);
                    (
                        format!(".list[{at}:{}]", at + del),
                        serde_json::to_string(values).unwrap(),
                    )
                }
                Edit::Scalar(n) => (".a".to_string(), n.to_string()),
                Edit::Remove { key } => {
                    if v["m"].get(format!("k{key}")).is_none() {
                        return Vec::new();
                    }
                    (format!(".m.k{key}"), String::new())
                }
                Edit::Text { .. } => unreachable!(),
            };
            Patch {
                range: crate::braid::patch::parse_content_range(&format!("json {range}")).unwrap(),
                content: Bytes::from(content),
            }
        }
    };
    write(doc, agent, WriteBody::Patches(vec![patch]))
}

fn write(doc: &mut Document, agent: &str, body: WriteBody) -> Vec<Vec<u8>> {
    let w = DocWrite {
        body: &body,
        version: None,
        parents: None,
        agent_hint: Some(agent),
        force: false,
        digest: None,
        max_json_depth: super::json::MAX_JSON_DEPTH,
    };
    match doc.apply(&w, 0).expect("an edit that fits the value applies") {
        Outcome::Applied(a) => a
            .earlier
            .into_iter()
            .map(|c| c.change)
            .chain(std::iter::once(a.change))
            .collect(),
        Outcome::Unchanged => Vec::new(),
    }
}

/// Three replicas share a base, each makes its `edits` (interleaved with nothing from the
/// others), then each takes the others' changes in the order `orders` shuffles them into,
/// one change at a time. All three must agree.
fn converge(
    kind: Kind,
    base: &str,
    edits: [Vec<Edit>; 3],
    orders: [Vec<usize>; 3],
) -> Result<(), TestCaseError> {
    let mut replicas: Vec<Document> = (0..3).map(|_| Document::new(kind)).collect();
    let media_type = match kind {
        Kind::Json => "application/json",
        _ => "text/plain",
    };
    let made = write(
        &mut replicas[0],
        "origin",
        WriteBody::Full {
            media_type: Some(media_type.into()),
            body: Bytes::from(base.to_string()),
        },
    );
    for r in &mut replicas[1..] {
        r.import(made.iter().map(Vec::as_slice)).unwrap();
    }
    let mut changes: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 3];
    for (i, (r, es)) in replicas.iter_mut().zip(&edits).enumerate() {
        for e in es {
            changes[i].extend(edit(r, &format!("r{i}"), e));
        }
    }
    for (i, r) in replicas.iter_mut().enumerate() {
        // The others' changes, in this replica's own order: a change may come before the
        // one it depends on (a peer relays out of order); the document holds it back.
        let mut theirs: Vec<&[u8]> = (0..3)
            .filter(|&j| j != i)
            .flat_map(|j| changes[j].iter().map(Vec::as_slice))
            .collect();
        let order = &orders[i];
        for k in (1..theirs.len()).rev() {
            theirs.swap(k, order[k % order.len()] % (k + 1));
        }
        for c in theirs {
            r.import([c]).unwrap();
        }
    }
    let values: Vec<Bytes> = replicas.iter_mut().map(Document::render).collect();
    prop_assert_eq!(&values[0], &values[1]);
    prop_assert_eq!(&values[0], &values[2]);
    let versions: Vec<_> = replicas.iter_mut().map(Document::frontier).collect();
    prop_assert_eq!(&versions[0], &versions[1]);
    prop_assert_eq!(&versions[0], &versions[2]);
    if kind == Kind::Json {
        serde_json::from_slice::<serde_json::Value>(&values[0]).expect("the merge is JSON");
    }
    Ok(())
}

fn orders() -> impl Strategy<Value = [Vec<usize>; 3]> {
    let one = || prop::collection::vec(any::<usize>(), 1..12);
    (one(), one(), one()).prop_map(|(a, b, c)| [a, b, c])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn concurrent_text_edits_converge_in_any_order(
        base in "[a-z ]{0,20}",
        a in prop::collection::vec(text_edit(), 0..6),
        b in prop::collection::vec(text_edit(), 0..6),
        c in prop::collection::vec(text_edit(), 0..6),
        orders in orders(),
    ) {
        converge(Kind::Text, &base, [a, b, c], orders)?;
    }

    #[test]
    fn concurrent_json_patches_converge_in_any_order(
        a in prop::collection::vec(json_edit(), 0..6),
        b in prop::collection::vec(json_edit(), 0..6),
        c in prop::collection::vec(json_edit(), 0..6),
        orders in orders(),
    ) {
        converge(Kind::Json, r#"{"a":0,"list":[1,2,3],"m":{"k0":0}}"#, [a, b, c], orders)?;
    }
}
