//! Collaborative text: an automerge Text object addressed in Unicode code points.
//!
//! Writes arrive as Braid patches (absolute code-point ranges against the write's parents)
//! or as a whole new text, which is diffed against the parents' text so concurrent edits
//! still merge. Automerge's diffs (sequential splices) are turned back into Braid's form by
//! [`absolute_patches`].

use automerge::PatchAction;
use automerge::{AutoCommit, ChangeHash, ObjId, ROOT, ReadDoc, transaction::Transactable};

use super::am::{AmDoc, Genesis};
use super::versions::Resolved;
use super::{Applied, DocError, DocWrite, Outcome};
use crate::model::{Version, VersionId};
use crate::update::{Range, TextPatch, UpdateBody, WriteBody};

/// A text resource's document.
pub struct TextDoc {
    base: AmDoc,
    obj: ObjId,
    /// The current text, kept up to date with the same patches subscribers get, so
    /// reading it costs a copy instead of a walk over the document's history.
    rope: ropey::Rope,
}

impl TextDoc {
    pub fn new() -> Self {
        Self::from_base(AmDoc::new(Genesis::Text))
    }

    pub(crate) fn from_base(base: AmDoc) -> Self {
        let obj = match base.am.get(ROOT, Genesis::Text.key()) {
            Ok(Some((_, id))) => id,
            _ => unreachable!("the genesis change creates the text object"),
        };
        let rope = ropey::Rope::from_str(&base.am.text(&obj).unwrap_or_default());
        TextDoc { base, obj, rope }
    }

    pub(crate) fn base(&mut self) -> &mut AmDoc {
        &mut self.base
    }

    /// Applies changes made elsewhere and re-reads the text.
    pub(crate) fn apply_remote(&mut self, changes: Vec<automerge::Change>) -> Result<(), DocError> {
        self.base.apply_remote(changes)?;
        self.rope = ropey::Rope::from_str(&self.automerge_text());
        Ok(())
    }

    /// Rebuilds the rope after changes went into the base directly.
    pub(crate) fn resync_rope(&mut self) {
        self.rope = ropey::Rope::from_str(&self.automerge_text());
    }

    /// The text as automerge holds it (what the rope must always equal).
    pub fn automerge_text(&self) -> String {
        self.base.am.text(&self.obj).unwrap_or_default()
    }

    /// Applies Braid patches (absolute against the current text) to the rope.
    fn rope_apply(&mut self, patches: &[TextPatch]) {
        for p in patches.iter().rev() {
            self.rope.remove(p.start..p.end);
            self.rope.insert(p.start, &p.content);
        }
    }

    pub fn frontier(&mut self) -> Version {
        self.base.frontier()
    }

    /// The current text.
    pub fn text(&self) -> String {
        self.rope.to_string()
    }

    /// The current length in code points.
    pub fn len_chars(&self) -> usize {
        self.rope.len_chars()
    }

    fn text_at_heads(&self, heads: &[ChangeHash]) -> String {
        self.base.am.text_at(&self.obj, heads).unwrap_or_default()
    }

    /// The text at a version; ids inside a run resolve to a prefix of that run's events.
    pub fn text_at(&mut self, version: &Version) -> Result<String, DocError> {
        let resolved = self.base.resolve_each(version)?;
        let partial: Vec<_> = resolved
            .iter()
            .filter_map(|r| match r {
                Resolved::Within { change, events } => Some((*change, *events)),
                Resolved::Change(_) => None,
            })
            .collect();
        if partial.is_empty() {
            let heads = self.base.heads_for(version)?;
            return Ok(self.text_at_heads(&heads));
        }
        // A version inside a run names a state that was never a whole change. Only a
        // single id is meaningful here (the run's own frontier); combinations with other
        // ids inside runs are not.
        let [(change, events)] = partial[..] else {
            return Err(DocError::UnknownVersion(version.ids().to_vec()));
        };
        if resolved.len() != 1 {
            return Err(DocError::UnknownVersion(version.ids().to_vec()));
        }
        let deps = self
            .base
            .am
            .get_change_meta_by_hash(&change)
            .map(|m| m.deps.clone())
            .ok_or_else(|| DocError::Corrupt("indexed change is missing".into()))?;
        let before = self.text_at_heads(&deps);
        let patches = self.patches_between(&deps, &[change])?;
        Ok(apply_event_prefix(&before, &patches, events))
    }

    /// Each change after `from` with its own patches (against its own parents).
    pub fn history_since(
        &mut self,
        from: &Version,
    ) -> Result<Vec<(crate::model::VersionId, Version, UpdateBody)>, DocError> {
        let changes = self.base.changes_since(from)?;
        let mut out = Vec::with_capacity(changes.len());
        for e in changes {
            let patches = self.patches_between(&e.deps, &[e.hash])?;
            out.push((e.id, e.parents, UpdateBody::Text(patches)));
        }
        Ok(out)
    }

    /// Patches that take a client at `from` to the current text.
    pub fn diff_from(&mut self, from: &Version) -> Result<Vec<TextPatch>, DocError> {
        let before = self.base.heads_for(from)?;
        let after = self.base.heads();
        self.patches_between(&before, &after)
    }

    fn patches_between(
        &mut self,
        before: &[ChangeHash],
        after: &[ChangeHash],
    ) -> Result<Vec<TextPatch>, DocError> {
        if same(before, after) {
            return Ok(Vec::new());
        }
        let base_len = self.base.am.length_at(&self.obj, before);
        let obj = self.obj.clone();
        let ops = self
            .base
            .am
            .diff(before, after)
            .into_iter()
            .filter(|p| p.obj == obj)
            .filter_map(|p| match p.action {
                PatchAction::SpliceText { index, value, .. } => Some(SeqOp::Insert {
                    at: index,
                    text: value.make_string(),
                }),
                PatchAction::DeleteSeq { index, length } => Some(SeqOp::Delete {
                    at: index,
                    len: length,
                }),
                _ => None,
            });
        Ok(absolute_patches(base_len, ops))
    }

    /// Applies a write; see [`super::Document::apply`].
    pub fn apply(&mut self, w: &DocWrite<'_>, time_secs: i64) -> Result<Outcome, DocError> {
        let old_frontier = self.base.frontier();
        let (parents_version, parent_heads) = match w.parents {
            Some(p) => (p.clone(), self.base.heads_for(p)?),
            None => (old_frontier.clone(), self.base.heads()),
        };
        // The text itself is only needed to diff a whole body or check a digest; patches
        // need the length alone, which is far cheaper on a long document.
        let needs_text = matches!(w.body, WriteBody::Full { .. }) || w.digest.is_some();
        let base_text = needs_text.then(|| match w.parents {
            None => self.text(),
            Some(_) => self.text_at_heads(&parent_heads),
        });
        let base_len = match &base_text {
            Some(t) => t.chars().count(),
            None if w.parents.is_none() => self.rope.len_chars(),
            None => self.base.am.length_at(&self.obj, &parent_heads),
        };
        let patches = match w.body {
            WriteBody::Full { media_type, body } => {
                if let Some(m) = media_type {
                    super::check_media_type(crate::model::Kind::Text, m)?;
                }
                let new = std::str::from_utf8(body).map_err(|_| DocError::NotUtf8)?;
                diff_texts(base_text.as_deref().unwrap_or_default(), new)
            }
            WriteBody::Patches(ps) => checked_patches(ps, base_len)?,
        };
        if let Some(t) = &base_text
            && w.digest.is_some()
        {
            super::check_digest(w.digest, apply_patches(t, &patches).as_bytes())?;
        }
        let n: u64 = patches
            .iter()
            .map(|p| (p.end - p.start + p.content.chars().count()) as u64)
            .sum();
        if n == 0 && w.version.is_none() && !w.force {
            return Ok(Outcome::Unchanged);
        }
        let Some(id) = self.base.choose_id(w.version, w.agent_hint, n) else {
            return Ok(Outcome::Unchanged);
        };
        let obj = self.obj.clone();
        // Committed as one change, or as a run of them when the write is big; each change's
        // parents are the one before it.
        let mut parents = parent_heads;
        let mut parents_v = parents_version.clone();
        let mut earlier = Vec::new();
        let mut was_current = None;
        let mut last = None;
        for run in runs_of(&patches, n, &id) {
            let c = self
                .base
                .commit_at(&parents, &run.id, run.n, time_secs, |am: &mut AutoCommit| {
                    for e in &run.edits {
                        am.splice_text(&obj, e.at, e.delete as isize, e.insert)
                            .map_err(|e| DocError::Corrupt(format!("splice failed: {e}")))?;
                    }
                    Ok(())
                })?;
            was_current.get_or_insert(c.was_current);
            parents = vec![c.hash];
            if let Some(prev) = last.replace(c) {
                let id = prev.id.clone();
                earlier.push(super::EarlierChange {
                    id: prev.id,
                    parents: std::mem::replace(&mut parents_v, Version::one(id)),
                    change: prev.bytes,
                });
            }
        }
        let committed = last.ok_or_else(|| DocError::Corrupt("a write made no change".into()))?;
        let committed_was_current = was_current.unwrap_or(true);
        let new_frontier = self.base.frontier();
        let event_patches = if committed_was_current {
            patches
        } else {
            let old_heads = self.base.heads_for(&old_frontier)?;
            let now = self.base.heads();
            self.patches_between(&old_heads, &now)?
        };
        self.rope_apply(&event_patches);
        Ok(Outcome::Applied(Applied {
            id: committed.id,
            parents: parents_version,
            n,
            change: committed.bytes,
            earlier,
            event_parents: old_frontier,
            event_version: new_frontier,
            body: UpdateBody::Text(event_patches),
        }))
    }
}

impl Default for TextDoc {
    fn default() -> Self {
        Self::new()
    }
}

fn same(a: &[ChangeHash], b: &[ChangeHash]) -> bool {
    a.len() == b.len() && a.iter().all(|h| b.contains(h))
}

/// Turns Braid text patches into checked, sorted code-point edits against a text of
/// `len` code points.
fn checked_patches(ps: &[crate::update::Patch], len: usize) -> Result<Vec<TextPatch>, DocError> {
    let mut out = Vec::with_capacity(ps.len());
    for p in ps {
        let Range::Text { start, end } = p.range else {
            return Err(DocError::WrongUnit {
                kind: "text",
                expected: "text [start:end]",
            });
        };
        let content = std::str::from_utf8(&p.content).map_err(|_| DocError::NotUtf8)?;
        out.push(TextPatch {
            start,
            end,
            content: content.to_string(),
        });
    }
    out.sort_by_key(|p| (p.start, p.end));
    let mut prev_end = 0;
    for p in &out {
        if p.end > len {
            return Err(DocError::OutOfRange(format!(
                "text [{}:{}] reaches past the end of the text ({len} code points at the parents)",
                p.start, p.end
            )));
        }
        if p.start < prev_end {
            return Err(DocError::BadPatch(format!(
                "text patches overlap at [{}:{}]",
                p.start, p.end
            )));
        }
        prev_end = p.end;
    }
    Ok(out)
}

/// The code-point edits that turn `old` into `new` (for whole-body writes).
/// How many events (code points inserted plus deleted) one automerge change holds at most.
/// A bigger write is committed as a run of changes, each named by the id of its last event
/// inside the write's run (`alice-4` of a write `alice-9` of ten events): automerge keeps a
/// transaction's ops uncompressed until it commits, so a 5 MB text in one change peaked at
/// 1.6 GB, and in changes of this size at 35 MB.
pub const MAX_EVENTS_PER_CHANGE: u64 = 65_536;

/// One splice: delete `delete` code points at `at`, then insert `insert` there.
#[derive(Debug, PartialEq)]
struct Edit<'a> {
    at: usize,
    delete: usize,
    insert: &'a str,
}

/// The edits of one change of a write.
#[derive(Debug)]
struct Run<'a> {
    id: VersionId,
    n: u64,
    edits: Vec<Edit<'a>>,
}

/// A write's patches (absolute ranges against its parents) as the changes that make it:
/// one when it has at most [`MAX_EVENTS_PER_CHANGE`] events (or its id leaves no room for
/// ids inside the run), otherwise runs of at most that many, applied right to left so that
/// earlier offsets stay valid. The last run's id is `id`.
fn runs_of<'a>(patches: &'a [TextPatch], n: u64, id: &VersionId) -> Vec<Run<'a>> {
    let whole = |p: &'a TextPatch| Edit {
        at: p.start,
        delete: p.end - p.start,
        insert: &p.content,
    };
    if n <= MAX_EVENTS_PER_CHANGE || id.seq() + 1 < n {
        return vec![Run {
            id: id.clone(),
            n,
            edits: patches.iter().rev().map(whole).collect(),
        }];
    }
    let max = MAX_EVENTS_PER_CHANGE as usize;
    let mut runs = Vec::new();
    let mut edits = Vec::new();
    let (mut room, mut done) = (max, 0u64);
    let mut close = |edits: &mut Vec<Edit<'a>>, room: &mut usize, done: &mut u64| {
        let k = (max - *room) as u64;
        *done += k;
        let seq = id.seq() - (n - *done);
        runs.push(Run {
            id: VersionId::new(id.agent(), seq).expect("the agent of a valid id"),
            n: k,
            edits: std::mem::take(edits),
        });
        *room = max;
    };
    for p in patches.iter().rev() {
        let mut delete = p.end - p.start;
        while delete > 0 {
            let k = delete.min(room);
            edits.push(Edit {
                at: p.start,
                delete: k,
                insert: "",
            });
            (delete, room) = (delete - k, room - k);
            if room == 0 {
                close(&mut edits, &mut room, &mut done);
            }
        }
        let (mut rest, mut at) = (p.content.as_str(), p.start);
        while !rest.is_empty() {
            let cut = rest.char_indices().nth(room).map_or(rest.len(), |(i, _)| i);
            let (piece, after) = rest.split_at(cut);
            let k = piece.chars().count();
            edits.push(Edit {
                at,
                delete: 0,
                insert: piece,
            });
            (rest, at, room) = (after, at + k, room - k);
            if room == 0 {
                close(&mut edits, &mut room, &mut done);
            }
        }
    }
    if room < max {
        close(&mut edits, &mut room, &mut done);
    }
    runs
}

pub fn diff_texts(old: &str, new: &str) -> Vec<TextPatch> {
    let mut out: Vec<TextPatch> = Vec::new();
    let mut pos = 0usize; // in `old`, code points
    for chunk in dissimilar::diff(old, new) {
        match chunk {
            dissimilar::Chunk::Equal(s) => pos += s.chars().count(),
            dissimilar::Chunk::Delete(s) => {
                let n = s.chars().count();
                match out.last_mut() {
                    Some(last) if last.end == pos => last.end += n,
                    _ => out.push(TextPatch {
                        start: pos,
                        end: pos + n,
                        content: String::new(),
                    }),
                }
                pos += n;
            }
            dissimilar::Chunk::Insert(s) => match out.last_mut() {
                Some(last) if last.end == pos => last.content.push_str(s),
                _ => out.push(TextPatch {
                    start: pos,
                    end: pos,
                    content: s.to_string(),
                }),
            },
        }
    }
    out
}

/// One sequential edit, as automerge reports them: positions are in the text as it is
/// after the edits before it.
#[derive(Debug, Clone)]
pub enum SeqOp {
    Insert { at: usize, text: String },
    Delete { at: usize, len: usize },
}

/// Converts sequential edits on a text of `base_len` code points into Braid's form:
/// disjoint patches, sorted, with ranges in the coordinates of the original text.
pub fn absolute_patches(base_len: usize, ops: impl IntoIterator<Item = SeqOp>) -> Vec<TextPatch> {
    #[derive(Debug)]
    enum Piece {
        Orig { start: usize, len: usize },
        Ins(Vec<char>),
    }
    impl Piece {
        fn len(&self) -> usize {
            match self {
                Piece::Orig { len, .. } => *len,
                Piece::Ins(c) => c.len(),
            }
        }
        fn split(self, at: usize) -> (Piece, Piece) {
            match self {
                Piece::Orig { start, len } => (
                    Piece::Orig { start, len: at },
                    Piece::Orig {
                        start: start + at,
                        len: len - at,
                    },
                ),
                Piece::Ins(mut c) => {
                    let tail = c.split_off(at);
                    (Piece::Ins(c), Piece::Ins(tail))
                }
            }
        }
    }
    /// Splits the pieces so that a piece boundary falls at `pos`; returns its index.
    fn boundary(pieces: &mut Vec<Piece>, pos: usize) -> usize {
        let mut acc = 0;
        for i in 0..pieces.len() {
            let l = pieces[i].len();
            if acc == pos {
                return i;
            }
            if pos < acc + l {
                let p = pieces.remove(i);
                let (a, b) = p.split(pos - acc);
                pieces.insert(i, b);
                pieces.insert(i, a);
                return i + 1;
            }
            acc += l;
        }
        pieces.len()
    }

    let mut pieces = vec![Piece::Orig {
        start: 0,
        len: base_len,
    }];
    pieces.retain(|p| p.len() > 0);
    for op in ops {
        match op {
            SeqOp::Insert { at, text } => {
                if text.is_empty() {
                    continue;
                }
                let i = boundary(&mut pieces, at);
                pieces.insert(i, Piece::Ins(text.chars().collect()));
            }
            SeqOp::Delete { at, len } => {
                if len == 0 {
                    continue;
                }
                let i = boundary(&mut pieces, at);
                let j = boundary(&mut pieces, at + len);
                pieces.drain(i..j);
            }
        }
    }
    let mut out = Vec::new();
    let mut orig_pos = 0;
    let mut pending = String::new();
    for p in pieces {
        match p {
            Piece::Orig { start, len } => {
                if start > orig_pos || !pending.is_empty() {
                    out.push(TextPatch {
                        start: orig_pos,
                        end: start,
                        content: std::mem::take(&mut pending),
                    });
                }
                orig_pos = start + len;
            }
            Piece::Ins(c) => pending.extend(c),
        }
    }
    if orig_pos < base_len || !pending.is_empty() {
        out.push(TextPatch {
            start: orig_pos,
            end: base_len,
            content: pending,
        });
    }
    out
}

/// Applies Braid patches (absolute against `text`) to `text`.
pub fn apply_patches(text: &str, patches: &[TextPatch]) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for p in patches {
        out.extend(&chars[at..p.start.min(chars.len())]);
        out.push_str(&p.content);
        at = p.end.min(chars.len());
    }
    out.extend(&chars[at.min(chars.len())..]);
    out
}

/// The text after the first `events` events of an edit: patch by patch from the left,
/// each deleting right to left and then inserting left to right (the `text-runs` order).
fn apply_event_prefix(text: &str, patches: &[TextPatch], events: u64) -> String {
    let mut left = events as usize;
    let mut partial = Vec::new();
    for p in patches {
        if left == 0 {
            break;
        }
        let del = p.end - p.start;
        let ins: Vec<char> = p.content.chars().collect();
        let take_del = del.min(left);
        left -= take_del;
        let take_ins = ins.len().min(left);
        left -= take_ins;
        // Deleting right to left: the last `take_del` code points of the range go first.
        partial.push(TextPatch {
            start: p.end - take_del,
            end: p.end,
            content: ins[..take_ins].iter().collect(),
        });
    }
    apply_patches(text, &partial)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::VersionId;
    use crate::update::Patch;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn id(s: &str) -> VersionId {
        VersionId::parse(s).unwrap()
    }
    fn tp(start: usize, end: usize, c: &str) -> crate::update::Patch {
        Patch {
            range: Range::Text { start, end },
            content: Bytes::copy_from_slice(c.as_bytes()),
        }
    }
    fn put(
        doc: &mut TextDoc,
        v: Option<&str>,
        parents: Option<&[&str]>,
        body: WriteBody,
    ) -> Result<Outcome, DocError> {
        let vid = v.map(id);
        let parents = parents.map(|p| p.iter().map(|s| id(s)).collect::<Version>());
        doc.apply(
            &DocWrite {
                body: &body,
                version: vid.as_ref(),
                parents: parents.as_ref(),
                agent_hint: None,
                force: false,
                digest: None,
                max_json_depth: crate::doc::json::MAX_JSON_DEPTH,
            },
            0,
        )
    }
    fn full(s: &str) -> WriteBody {
        WriteBody::Full {
            media_type: None,
            body: Bytes::copy_from_slice(s.as_bytes()),
        }
    }

    /// A write whose agent has used up its seqs gets another agent instead of overflowing
    /// (the doc_patch fuzz target panicked here: `Version: "a-18446744073709551615"`,
    /// then a write with `Peer: a`).
    #[test]
    fn an_agent_at_the_largest_seq_is_passed_over() {
        let mut d = TextDoc::new();
        put(&mut d, Some("a-18446744073709551615"), None, full("hello")).unwrap();
        let body = WriteBody::Patches(vec![tp(0, 0, "x")]);
        let w = DocWrite {
            body: &body,
            version: None,
            parents: None,
            agent_hint: Some("a"),
            force: false,
            digest: None,
            max_json_depth: crate::doc::json::MAX_JSON_DEPTH,
        };
        let Outcome::Applied(a) = d.apply(&w, 0).unwrap() else {
            panic!("the write applies")
        };
        assert_ne!(a.id.agent(), "a");
        assert_eq!(d.text(), "xhello");
        // An id inside the largest run still names a prefix of it.
        let inside = Version::one(id("a-18446744073709551613"));
        assert_eq!(d.text_at(&inside).unwrap(), "hel");
    }

    #[test]
    fn the_harness_sequence() {
        let mut d = TextDoc::new();
        let Outcome::Applied(a) = put(&mut d, None, None, full("hello")).unwrap() else {
            panic!()
        };
        assert_eq!(a.id.seq(), 4);
        let v1 = a.id.to_string();
        put(
            &mut d,
            Some("bob-5"),
            Some(&[&v1]),
            WriteBody::Patches(vec![tp(5, 5, " world")]),
        )
        .unwrap();
        put(
            &mut d,
            Some("carol-2"),
            Some(&["bob-5"]),
            WriteBody::Patches(vec![tp(0, 1, "H"), tp(11, 11, "!")]),
        )
        .unwrap();
        put(
            &mut d,
            Some("dave-5"),
            Some(&["carol-2"]),
            WriteBody::Patches(vec![tp(5, 11, "")]),
        )
        .unwrap();
        assert_eq!(d.text(), "Hello!");
        assert_eq!(d.text_at(&Version::one(id("bob-5"))).unwrap(), "hello world");
        // Concurrent edits on the same parents merge.
        let Outcome::Applied(e) = put(
            &mut d,
            Some("erin-0"),
            Some(&["dave-5"]),
            WriteBody::Patches(vec![tp(0, 0, "A")]),
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            e.body_patches(),
            vec![TextPatch {
                start: 0,
                end: 0,
                content: "A".into()
            }]
        );
        let Outcome::Applied(f) = put(
            &mut d,
            Some("fred-0"),
            Some(&["dave-5"]),
            WriteBody::Patches(vec![tp(6, 6, "Z")]),
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(d.text(), "AHello!Z");
        assert_eq!(f.event_parents, Version::one(id("erin-0")));
        assert_eq!(f.event_version, Version::new(vec![id("erin-0"), id("fred-0")]));
        assert_eq!(
            f.body_patches(),
            vec![TextPatch {
                start: 7,
                end: 7,
                content: "Z".into()
            }]
        );
        assert_eq!(
            d.diff_from(&Version::one(id("bob-5"))).unwrap(),
            apply_diff_check(
                "hello world",
                "AHello!Z",
                &d.diff_from(&Version::one(id("bob-5"))).unwrap()
            )
        );
    }

    fn apply_diff_check(from: &str, to: &str, p: &[TextPatch]) -> Vec<TextPatch> {
        assert_eq!(apply_patches(from, p), to);
        p.to_vec()
    }

    impl Applied {
        fn body_patches(&self) -> Vec<TextPatch> {
            match &self.body {
                UpdateBody::Text(p) => p.clone(),
                _ => panic!(),
            }
        }
    }

    #[test]
    fn intermediate_versions_of_a_run() {
        let mut d = TextDoc::new();
        put(&mut d, Some("amy-2"), Some(&[]), full("abc")).unwrap();
        assert_eq!(d.text_at(&Version::one(id("amy-0"))).unwrap(), "a");
        assert_eq!(d.text_at(&Version::one(id("amy-1"))).unwrap(), "ab");
        assert_eq!(d.text_at(&Version::one(id("amy-2"))).unwrap(), "abc");
        put(
            &mut d,
            Some("bo-2"),
            Some(&["amy-2"]),
            WriteBody::Patches(vec![tp(1, 3, "X")]),
        )
        .unwrap();
        assert_eq!(d.text(), "aX");
        // Deletes go right to left: after one event "c" is gone.
        assert_eq!(d.text_at(&Version::one(id("bo-0"))).unwrap(), "ab");
        assert_eq!(d.text_at(&Version::one(id("bo-1"))).unwrap(), "a");
        assert!(matches!(
            d.text_at(&Version::one(id("bo-3"))),
            Err(DocError::UnknownVersion(_))
        ));
    }

    #[test]
    fn bad_writes_change_nothing() {
        let mut d = TextDoc::new();
        put(&mut d, Some("a-4"), None, full("hello")).unwrap();
        let before = d.frontier();
        assert!(matches!(
            put(&mut d, None, None, WriteBody::Patches(vec![tp(99, 99, "x")])),
            Err(DocError::OutOfRange(_))
        ));
        assert!(matches!(
            put(
                &mut d,
                None,
                None,
                WriteBody::Patches(vec![tp(0, 3, "x"), tp(2, 4, "y")])
            ),
            Err(DocError::BadPatch(_))
        ));
        assert!(matches!(
            put(&mut d, None, Some(&["nope-1"]), full("x")),
            Err(DocError::UnknownVersion(_))
        ));
        let bad = WriteBody::Patches(vec![Patch {
            range: Range::Text { start: 0, end: 0 },
            content: Bytes::from_static(b"\xff"),
        }]);
        assert!(matches!(put(&mut d, None, None, bad), Err(DocError::NotUtf8)));
        assert_eq!(d.frontier(), before);
        assert_eq!(d.text(), "hello");
    }

    #[test]
    fn duplicates_and_no_ops_are_unchanged() {
        let mut d = TextDoc::new();
        put(&mut d, Some("a-4"), None, full("hello")).unwrap();
        assert!(matches!(
            put(&mut d, Some("a-4"), None, full("other")).unwrap(),
            Outcome::Unchanged
        ));
        assert!(matches!(
            put(&mut d, Some("a-2"), None, full("other")).unwrap(),
            Outcome::Unchanged
        ));
        assert!(matches!(
            put(&mut d, None, None, full("hello")).unwrap(),
            Outcome::Unchanged
        ));
        assert_eq!(d.text(), "hello");
    }

    #[test]
    fn unversioned_writes_by_one_peer_do_not_collide() {
        let mut d = TextDoc::new();
        let w = |b| WriteBody::Full {
            media_type: None,
            body: Bytes::from_static(b),
        };
        let a = d
            .apply(
                &DocWrite {
                    body: &w(b"ab"),
                    version: None,
                    parents: None,
                    agent_hint: Some("zed"),
                    force: false,
                    digest: None,
                    max_json_depth: crate::doc::json::MAX_JSON_DEPTH,
                },
                0,
            )
            .unwrap();
        let b = d
            .apply(
                &DocWrite {
                    body: &w(b"ba"),
                    version: None,
                    parents: None,
                    agent_hint: Some("zed"),
                    force: false,
                    digest: None,
                    max_json_depth: crate::doc::json::MAX_JSON_DEPTH,
                },
                0,
            )
            .unwrap();
        let (Outcome::Applied(a), Outcome::Applied(b)) = (a, b) else {
            panic!()
        };
        assert_eq!(a.id, id("zed-1"));
        assert_ne!(a.id, b.id);
        assert_eq!(d.text(), "ba");
    }

    #[test]
    fn reload_from_save_and_changes_keeps_versions() {
        let mut d = TextDoc::new();
        let Outcome::Applied(a) = put(&mut d, Some("a-4"), None, full("hello")).unwrap() else {
            panic!()
        };
        let snap = d.base().save();
        let Outcome::Applied(b) = put(
            &mut d,
            Some("b-0"),
            Some(&["a-4"]),
            WriteBody::Patches(vec![tp(5, 5, "!")]),
        )
        .unwrap() else {
            panic!()
        };
        let changes = vec![super::super::am::decode_change(&b.change).unwrap()];
        let mut r = TextDoc::from_base(AmDoc::load(Genesis::Text, Some(&snap), changes).unwrap());
        assert_eq!(r.text(), "hello!");
        assert_eq!(r.frontier(), Version::one(id("b-0")));
        assert_eq!(r.text_at(&Version::one(id("a-4"))).unwrap(), "hello");
        let _ = a;
    }

    /// A write of more than `MAX_EVENTS_PER_CHANGE` events is a run of changes whose ids
    /// are inside the write's run; the document, its history and a reload agree.
    #[test]
    fn a_big_write_is_a_run_of_changes() {
        let max = MAX_EVENTS_PER_CHANGE as usize;
        let mut d = TextDoc::new();
        put(&mut d, Some("a-2"), None, full("xyz")).unwrap();
        let snap = d.base().save();
        // Replace "y" with 2.5 changes' worth of text (multi-byte code points, so cuts fall
        // between bytes of different widths).
        let big: String = (0..max * 5 / 2)
            .map(|i| if i % 3 == 0 { 'é' } else { 'a' })
            .collect();
        let n = 1 + big.chars().count() as u64;
        let v = format!("b-{}", 1000 + n - 1);
        let Outcome::Applied(a) = put(
            &mut d,
            Some(&v),
            Some(&["a-2"]),
            WriteBody::Patches(vec![tp(1, 2, &big)]),
        )
        .unwrap() else {
            panic!()
        };
        let want = format!("x{big}z");
        assert_eq!(d.text(), want);
        assert_eq!(a.id, id(&v));
        assert_eq!(
            a.body_patches(),
            vec![TextPatch {
                start: 1,
                end: 2,
                content: big.clone()
            }]
        );
        // Three changes: 65,536 events, 65,536, and the rest; each after the one before.
        let ids: Vec<String> = a.earlier.iter().map(|e| e.id.to_string()).collect();
        assert_eq!(
            ids,
            [
                format!("b-{}", 1000 + max - 1),
                format!("b-{}", 1000 + 2 * max - 1)
            ]
        );
        assert_eq!(a.earlier[0].parents, Version::one(id("a-2")));
        assert_eq!(a.earlier[1].parents, Version::one(id(&ids[0])));
        // The first change deleted "y" and inserted 65,535 code points.
        let first: String = big.chars().take(max - 1).collect();
        assert_eq!(
            d.text_at(&Version::one(id(&ids[0]))).unwrap(),
            format!("x{first}z")
        );
        // Reloaded from the snapshot before and the stored changes, in order.
        let changes = a
            .earlier
            .iter()
            .map(|e| &e.change)
            .chain([&a.change])
            .map(|c| super::super::am::decode_change(c).unwrap())
            .collect();
        let mut r = TextDoc::from_base(AmDoc::load(Genesis::Text, Some(&snap), changes).unwrap());
        assert_eq!(r.text(), want);
        assert_eq!(r.frontier(), Version::one(id(&v)));
        assert_eq!(
            r.text_at(&Version::one(id(&ids[1]))).unwrap().chars().count(),
            2 * max + 1
        );
    }

    /// An id too small to hold the write's events inside its run keeps the write whole.
    #[test]
    fn runs_need_room_for_their_ids() {
        let big = "a".repeat(MAX_EVENTS_PER_CHANGE as usize + 1);
        let patches = [TextPatch {
            start: 0,
            end: 0,
            content: big,
        }];
        let n = MAX_EVENTS_PER_CHANGE + 1;
        assert_eq!(runs_of(&patches, n, &id("c-5")).len(), 1);
        let runs = runs_of(&patches, n, &id(&format!("c-{}", n - 1)));
        assert_eq!(
            runs.iter().map(|r| r.n).collect::<Vec<_>>(),
            [MAX_EVENTS_PER_CHANGE, 1]
        );
        assert_eq!(
            runs[1].edits,
            [Edit {
                at: MAX_EVENTS_PER_CHANGE as usize,
                delete: 0,
                insert: "a"
            }]
        );
    }

    #[test]
    fn absolute_patches_examples() {
        // Insert then delete inside the insert.
        let p = absolute_patches(
            3,
            vec![
                SeqOp::Insert {
                    at: 1,
                    text: "xyz".into(),
                },
                SeqOp::Delete { at: 2, len: 1 },
            ],
        );
        assert_eq!(
            p,
            vec![TextPatch {
                start: 1,
                end: 1,
                content: "xz".into()
            }]
        );
        // Delete spanning original text and an insert.
        let p = absolute_patches(
            4,
            vec![
                SeqOp::Insert {
                    at: 2,
                    text: "__".into(),
                },
                SeqOp::Delete { at: 1, len: 3 },
            ],
        );
        assert_eq!(apply_patches("abcd", &p), "acd");
        assert_eq!(absolute_patches(0, vec![]), vec![]);
    }

    fn arb_ops(len: usize) -> impl Strategy<Value = Vec<(bool, usize, usize, String)>> {
        let _ = len;
        prop::collection::vec((any::<bool>(), 0usize..40, 0usize..6, "[a-zé😀]{0,4}"), 0..12)
    }

    proptest! {
        #[test]
        fn absolute_patches_reproduce_sequential_edits(base in "[a-zé😀 ]{0,30}", ops in arb_ops(0)) {
            let mut cur: Vec<char> = base.chars().collect();
            let mut seq = Vec::new();
            for (ins, at, len, text) in ops {
                let at = at.min(cur.len());
                if ins {
                    cur.splice(at..at, text.chars());
                    seq.push(SeqOp::Insert { at, text });
                } else {
                    let len = len.min(cur.len() - at);
                    cur.drain(at..at + len);
                    seq.push(SeqOp::Delete { at, len });
                }
            }
            let want: String = cur.into_iter().collect();
            let patches = absolute_patches(base.chars().count(), seq);
            for w in patches.windows(2) {
                prop_assert!(w[0].end <= w[1].start);
            }
            prop_assert_eq!(apply_patches(&base, &patches), want);
        }

        #[test]
        fn whole_text_diffs_reproduce_the_new_text(a in "[a-cé😀 ]{0,40}", b in "[a-cé😀 ]{0,40}") {
            prop_assert_eq!(apply_patches(&a, &diff_texts(&a, &b)), b);
        }

        /// Several peers edit from random earlier versions; every version's diff to now
        /// reproduces the current text, and a reload converges to the same text.
        #[test]
        fn concurrent_edits_converge(edits in prop::collection::vec((0usize..6, 0usize..30, 0usize..4, "[a-z]{0,3}"), 1..25)) {
            let mut d = TextDoc::new();
            let mut seen: Vec<(Version, String)> = vec![(Version::root(), String::new())];
            let mut changes = Vec::new();
            for (k, (pick, at, del, ins)) in edits.into_iter().enumerate() {
                let (parents, text) = seen[pick % seen.len()].clone();
                let len = text.chars().count();
                let at = at.min(len);
                let del = del.min(len - at);
                let body = WriteBody::Patches(vec![tp(at, at + del, &ins)]);
                let agent = format!("p{k}");
                let n = (del + ins.chars().count()) as u64;
                let vid = VersionId::new(agent, n.max(1) - 1).unwrap();
                match d.apply(&DocWrite { body: &body, version: Some(&vid), parents: Some(&parents), agent_hint: None, force: false, digest: None, max_json_depth: crate::doc::json::MAX_JSON_DEPTH }, 0).unwrap() {
                    Outcome::Applied(a) => {
                        changes.push(a.change.clone());
                        seen.push((d.frontier(), d.text()));
                    }
                    Outcome::Unchanged => {}
                }
            }
            let now = d.text();
            prop_assert_eq!(&now, &d.automerge_text());
            for (v, t) in &seen {
                let p = d.diff_from(v).unwrap();
                prop_assert_eq!(apply_patches(t, &p), now.clone());
            }
            let decoded = changes.iter().map(|c| super::super::am::decode_change(c).unwrap()).collect();
            let mut r = TextDoc::from_base(AmDoc::load(Genesis::Text, None, decoded).unwrap());
            prop_assert_eq!(r.text(), now);
            prop_assert_eq!(r.frontier(), d.frontier());
        }
    }
}
