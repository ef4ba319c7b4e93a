//! Bytes resources: any media type that is neither text nor JSON. A value is stored once
//! under its BLAKE3 hash; writes replace it (last writer wins) or patch byte ranges of the
//! current value.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};

use super::{Applied, DocError, DocWrite, Outcome};
use crate::model::{Kind, Version, VersionId};
use crate::update::{Range, UpdateBody, WriteBody};

/// The current value of a bytes resource.
#[derive(Debug, Clone)]
pub struct BytesValue {
    pub id: VersionId,
    pub media_type: String,
    pub body: Bytes,
}

/// A bytes resource's document: its current value and the ids it has seen.
#[derive(Debug, Default)]
pub struct BytesDoc {
    current: Option<BytesValue>,
    /// agent → highest seq seen, for ids of unversioned writes and duplicate detection.
    seen: HashMap<String, u64>,
}

impl BytesDoc {
    pub fn new() -> Self {
        Self::default()
    }

    /// A document from its latest value and every id written so far.
    pub fn load(current: Option<BytesValue>, ids: impl IntoIterator<Item = VersionId>) -> Self {
        let mut d = BytesDoc {
            current,
            seen: HashMap::new(),
        };
        for id in ids {
            d.note(&id);
        }
        if let Some(c) = d.current.clone() {
            d.note(&c.id);
        }
        d
    }

    fn note(&mut self, id: &VersionId) {
        let e = self.seen.entry(id.agent().to_string()).or_insert(id.seq());
        *e = (*e).max(id.seq());
    }

    fn knows(&self, id: &VersionId) -> bool {
        self.seen.get(id.agent()).is_some_and(|&s| s >= id.seq())
    }

    pub fn current(&self) -> Option<&BytesValue> {
        self.current.as_ref()
    }

    pub fn frontier(&self) -> Version {
        self.current
            .as_ref()
            .map(|c| Version::one(c.id.clone()))
            .unwrap_or_default()
    }

    /// Applies a write. The new value's bytes are in the returned event's snapshot.
    pub fn apply(&mut self, w: &DocWrite<'_>) -> Result<Outcome, DocError> {
        let frontier = self.frontier();
        if let Some(p) = w.parents {
            let unknown: Vec<_> = p.ids().iter().filter(|id| !self.knows(id)).cloned().collect();
            if !unknown.is_empty() {
                return Err(DocError::UnknownVersion(unknown));
            }
        }
        let (media_type, body) = match w.body {
            WriteBody::Full { media_type, body } => {
                let m = media_type
                    .clone()
                    .or_else(|| self.current.as_ref().map(|c| c.media_type.clone()))
                    .unwrap_or_else(|| Kind::Bytes.default_media_type().to_string());
                super::check_media_type(Kind::Bytes, &m)?;
                (m, body.clone())
            }
            WriteBody::Patches(ps) => {
                if w.parents.is_some_and(|p| *p != frontier) {
                    return Err(DocError::Conflict(
                        "bytes resources are last-writer-wins: patch against the current version".into(),
                    ));
                }
                let cur = self
                    .current
                    .as_ref()
                    .ok_or_else(|| DocError::OutOfRange("there are no bytes to patch yet".into()))?;
                (cur.media_type.clone(), patch_bytes(&cur.body, ps)?)
            }
        };
        super::check_digest(w.digest, &body)?;
        if w.version.is_none()
            && !w.force
            && self
                .current
                .as_ref()
                .is_some_and(|c| c.body == body && c.media_type == media_type)
        {
            return Ok(Outcome::Unchanged);
        }
        if w.version.is_some_and(|v| self.knows(v)) {
            return Ok(Outcome::Unchanged);
        }
        // The value's address in the store, and the agent of an unversioned write.
        let hash = blake3::hash(&body);
        let id = match w.version {
            Some(v) => v.clone(),
            None => {
                // The client's `Peer`, else one named by the value's hash. An agent whose
                // seqs a client used up (by naming the largest) is passed over, for a
                // random one at last, as automerge documents do (`AmDoc::choose_id`).
                let next = |agent: &str| self.seen.get(agent).map_or(Some(0), |s| s.checked_add(1));
                let hashed = format!("b{}", &hash.to_hex()[..8]);
                let (agent, seq) = w
                    .agent_hint
                    .filter(|a| VersionId::new(*a, 0).is_ok())
                    .map(str::to_string)
                    .into_iter()
                    .chain([hashed])
                    .find_map(|a| next(&a).map(|s| (a, s)))
                    .unwrap_or_else(|| {
                        loop {
                            let a = super::am::random_agent();
                            if let Some(s) = next(&a) {
                                break (a, s);
                            }
                        }
                    });
                VersionId::new(agent, seq).expect("agent checked")
            }
        };
        self.note(&id);
        self.current = Some(BytesValue {
            id: id.clone(),
            media_type: media_type.clone(),
            body: body.clone(),
        });
        Ok(Outcome::Applied(Applied {
            id: id.clone(),
            parents: w.parents.cloned().unwrap_or_else(|| frontier.clone()),
            n: 1,
            change: hash.as_bytes().to_vec(),
            earlier: Vec::new(),
            event_parents: frontier,
            event_version: Version::one(id),
            body: UpdateBody::Snapshot(body),
        }))
    }
}

fn patch_bytes(cur: &Bytes, ps: &[crate::update::Patch]) -> Result<Bytes, DocError> {
    let mut ranges = Vec::new();
    for p in ps {
        let Range::Bytes { start, end } = p.range else {
            return Err(DocError::WrongUnit {
                kind: "bytes",
                expected: "bytes first-last",
            });
        };
        let len = cur.len() as u64;
        let end = end.unwrap_or(len);
        if start > len || end > len {
            return Err(DocError::OutOfRange(format!(
                "bytes {start}-{} is past the end ({len} bytes)",
                end.saturating_sub(1)
            )));
        }
        ranges.push((start as usize, end as usize, &p.content));
    }
    ranges.sort_by_key(|r| r.0);
    let mut out = BytesMut::with_capacity(cur.len());
    let mut at = 0;
    for (s, e, c) in ranges {
        if s < at {
            return Err(DocError::BadPatch("byte ranges overlap".into()));
        }
        out.extend_from_slice(&cur[at..s]);
        out.extend_from_slice(c);
        at = e;
    }
    out.extend_from_slice(&cur[at..]);
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::Patch;

    fn w<'a>(body: &'a WriteBody, parents: Option<&'a Version>) -> DocWrite<'a> {
        DocWrite {
            body,
            version: None,
            parents,
            agent_hint: Some("cam"),
            force: false,
            digest: None,
            max_json_depth: crate::doc::json::MAX_JSON_DEPTH,
        }
    }

    #[test]
    fn a_peer_whose_seqs_were_used_up_gets_another_agent() {
        // Found by the `doc_patch` fuzzer: a write naming `a-<u64::MAX>`, then an
        // unversioned one from peer `a`, overflowed the next seq.
        let mut d = BytesDoc::new();
        let body = WriteBody::Full {
            media_type: None,
            body: Bytes::from_static(b"one"),
        };
        let last = VersionId::new("cam", u64::MAX).unwrap();
        let named = DocWrite {
            version: Some(&last),
            ..w(&body, None)
        };
        assert!(matches!(d.apply(&named).unwrap(), Outcome::Applied(_)));
        let again = WriteBody::Full {
            media_type: None,
            body: Bytes::from_static(b"two"),
        };
        let Outcome::Applied(a) = d.apply(&w(&again, None)).unwrap() else {
            panic!("applied")
        };
        assert_ne!(a.id.agent(), "cam");
        assert_eq!(a.id.seq(), 0);
        // The same value's hash agent, used up as well: a random one.
        let hashed = VersionId::new(format!("b{}", &blake3::hash(b"three").to_hex()[..8]), u64::MAX).unwrap();
        let three = WriteBody::Full {
            media_type: None,
            body: Bytes::from_static(b"three"),
        };
        d.apply(&DocWrite {
            version: Some(&hashed),
            agent_hint: None,
            ..w(&again, None)
        })
        .unwrap();
        let Outcome::Applied(b) = d
            .apply(&DocWrite {
                agent_hint: Some("cam"),
                force: true,
                ..w(&three, None)
            })
            .unwrap()
        else {
            panic!("applied")
        };
        assert!(
            b.id.agent() != "cam" && b.id.agent() != hashed.agent(),
            "{}",
            b.id
        );
    }

    #[test]
    fn last_writer_wins_and_range_patches() {
        let mut d = BytesDoc::new();
        let png = WriteBody::Full {
            media_type: Some("image/png".into()),
            body: Bytes::from_static(b"\x89PNGabc"),
        };
        let Outcome::Applied(a) = d.apply(&w(&png, None)).unwrap() else {
            panic!()
        };
        assert_eq!(a.id.to_string(), "cam-0");
        assert_eq!(a.change, blake3::hash(b"\x89PNGabc").as_bytes().to_vec());
        let p = WriteBody::Patches(vec![Patch {
            range: Range::Bytes {
                start: 4,
                end: Some(7),
            },
            content: Bytes::from_static(b"XY"),
        }]);
        d.apply(&w(&p, None)).unwrap();
        assert_eq!(&d.current().unwrap().body[..], b"\x89PNGXY");
        assert_eq!(d.current().unwrap().media_type, "image/png");
        assert!(matches!(
            d.apply(&w(&png, Some(&Version::one(VersionId::parse("zz-1").unwrap())))),
            Err(DocError::UnknownVersion(_))
        ));
        let stale = Version::one(a.id);
        assert!(matches!(
            d.apply(&w(&p, Some(&stale))),
            Err(DocError::Conflict(_))
        ));
        let far = WriteBody::Patches(vec![Patch {
            range: Range::Bytes { start: 40, end: None },
            content: Bytes::new(),
        }]);
        assert!(matches!(d.apply(&w(&far, None)), Err(DocError::OutOfRange(_))));
    }

    #[test]
    fn text_or_json_bodies_do_not_belong_here() {
        let mut d = BytesDoc::new();
        let t = WriteBody::Full {
            media_type: Some("text/plain".into()),
            body: Bytes::from_static(b"x"),
        };
        assert!(matches!(d.apply(&w(&t, None)), Err(DocError::MediaType { .. })));
    }
}
