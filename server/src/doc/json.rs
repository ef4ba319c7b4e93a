//! JSON resources: a JSON value kept as automerge maps, lists and scalars under the root
//! key `v`, so concurrent writers merge field by field.
//!
//! A write (a whole value, or `json` range patches applied to the value at the write's
//! parents) is reconciled into the document as the smallest set of ops that turns the old
//! value into the new one: unchanged fields are not touched, so a concurrent write to
//! another field survives. Strings are scalars (last writer wins), as JSON apps expect.

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ChangeHash, ObjId, ObjType, Prop, ROOT, ReadDoc, ScalarValue, Value as AmValue};
use serde_json::{Map, Number, Value};

use super::am::{AmDoc, Genesis, same_set};
use super::{Applied, DocError, DocWrite, Outcome};
use crate::model::{Kind, Version};
use crate::update::{JsonStep, Patch, Range, UpdateBody, WriteBody};

/// The most `limits.max_json_depth` may be: serde_json's parser refuses deeper input
/// (its recursion limit, on by default), and every recursive walk of a stored value (reading
/// it out of automerge, reconciling, serializing) is bounded by it.
pub const MAX_JSON_DEPTH: usize = 128;

/// A JSON resource's document.
pub struct JsonDoc {
    base: AmDoc,
    /// The value at the heads it was read at (or written at), so that a write made on
    /// the current value neither reads it out of automerge first nor again after: the
    /// value is a function of the heads, so any other change to the document misses it.
    current: Option<(Vec<ChangeHash>, Value)>,
}

impl JsonDoc {
    pub fn new() -> Self {
        JsonDoc {
            base: AmDoc::new(Genesis::Json),
            current: None,
        }
    }

    pub(crate) fn from_base(base: AmDoc) -> Self {
        JsonDoc { base, current: None }
    }

    pub(crate) fn base(&mut self) -> &mut AmDoc {
        &mut self.base
    }

    pub fn frontier(&mut self) -> Version {
        self.base.frontier()
    }

    /// The current value.
    pub fn value(&self) -> Value {
        read_prop(&self.base.am, &ROOT, Genesis::Json.key().into(), None).unwrap_or(Value::Null)
    }

    /// The current value as JSON text. Read out of automerge only when no write or read
    /// since the document last changed kept it (see `current`); kept for the next caller.
    pub fn render(&mut self) -> Vec<u8> {
        let heads = self.base.heads();
        let value = self.take_current(&heads);
        let body = serde_json::to_vec(&value).expect("JSON serializes");
        self.current = Some((heads, value));
        body
    }

    /// The value at a version (whole changes only: JSON changes are one event each).
    pub fn value_at(&mut self, version: &Version) -> Result<Value, DocError> {
        let heads = self.base.heads_for(version)?;
        Ok(self.value_at_heads(&heads))
    }

    fn value_at_heads(&self, heads: &[ChangeHash]) -> Value {
        read_prop(&self.base.am, &ROOT, Genesis::Json.key().into(), Some(heads)).unwrap_or(Value::Null)
    }

    /// Each change after `from` with the value it produced.
    pub fn history_since(
        &mut self,
        from: &Version,
    ) -> Result<Vec<(crate::model::VersionId, Version, UpdateBody)>, DocError> {
        let changes = self.base.changes_since(from)?;
        Ok(changes
            .into_iter()
            .map(|e| {
                let v = self.value_at_heads(&[e.hash]);
                (
                    e.id,
                    e.parents,
                    UpdateBody::Snapshot(serde_json::to_vec(&v).expect("JSON serializes").into()),
                )
            })
            .collect())
    }

    /// Applies a write; see [`super::Document::apply`].
    pub fn apply(&mut self, w: &DocWrite<'_>, time_secs: i64) -> Result<Outcome, DocError> {
        let old_frontier = self.base.frontier();
        let heads = self.base.heads();
        let (parents_version, parent_heads) = match w.parents {
            Some(p) => (p.clone(), self.base.heads_for(p)?),
            None => (old_frontier.clone(), heads.clone()),
        };
        let on_current = same_set(&parent_heads, &heads);
        let old = if on_current {
            self.take_current(&heads)
        } else {
            self.value_at_heads(&parent_heads)
        };
        let new = match w.body {
            WriteBody::Full { media_type, body } => {
                if let Some(m) = media_type {
                    super::check_media_type(Kind::Json, m)?;
                }
                parse_json(body, w.max_json_depth)?
            }
            WriteBody::Patches(ps) => {
                let mut v = old.clone();
                for (i, p) in ps.iter().enumerate() {
                    let reach = apply_json_patch(&mut v, p)
                        .map_err(|e| DocError::OutOfRange(format!("patch {}: {e}", i + 1)))?;
                    // Checked after every patch, so what is built (and later dropped, which
                    // recurses) never nests much deeper than one patch's content.
                    if reach > w.max_json_depth {
                        return Err(DocError::TooDeep {
                            limit: w.max_json_depth,
                        });
                    }
                }
                v
            }
        };
        // The result as a whole: the value the patches were applied to may itself be
        // deeper than the limit (stored before it was lowered).
        if depth(&new) > w.max_json_depth {
            return Err(DocError::TooDeep {
                limit: w.max_json_depth,
            });
        }
        if w.digest.is_some() {
            super::check_digest(w.digest, &serde_json::to_vec(&new).expect("JSON serializes"))?;
        }
        if same(&new, &old) && w.version.is_none() && !w.force {
            self.keep_current(on_current, heads, old);
            return Ok(Outcome::Unchanged);
        }
        let Some(id) = self.base.choose_id(w.version, w.agent_hint, 1) else {
            self.keep_current(on_current, heads, old);
            return Ok(Outcome::Unchanged);
        };
        let committed = self.base.commit_at(&parent_heads, &id, 1, time_secs, |am| {
            reconcile_prop(am, &ROOT, Genesis::Json.key().into(), Some(&old), &new)
        })?;
        let new_frontier = self.base.frontier();
        // Made on the current value, the change turned it into `new` (reconcile_prop's
        // contract); made on older parents, it merged with what came since: read it.
        let value = if committed.was_current {
            debug_assert!(same(&new, &self.value()), "a current write reads back as written");
            new
        } else {
            self.value()
        };
        let body = serde_json::to_vec(&value).expect("JSON serializes");
        self.current = Some((self.base.heads(), value));
        Ok(Outcome::Applied(Applied {
            id: committed.id,
            parents: parents_version,
            n: 1,
            change: committed.bytes,
            earlier: Vec::new(),
            event_parents: old_frontier,
            event_version: new_frontier,
            body: UpdateBody::Snapshot(body.into()),
        }))
    }
}

impl JsonDoc {
    /// The current value (the document is at `heads`): the one kept, if it was kept at
    /// those heads, else read out of automerge (the current value reads faster than a
    /// value at given heads). Taken: the caller keeps it again.
    fn take_current(&mut self, heads: &[ChangeHash]) -> Value {
        match self.current.take() {
            Some((at, v)) if same_set(&at, heads) => v,
            _ => self.value(),
        }
    }

    /// Keeps `value` as the current value when it was read at the current `heads`.
    fn keep_current(&mut self, on_current: bool, heads: Vec<ChangeHash>, value: Value) {
        if on_current {
            self.current = Some((heads, value));
        }
    }
}

impl Default for JsonDoc {
    fn default() -> Self {
        Self::new()
    }
}

/// Parses a JSON body, refusing nesting deeper than `max_depth` levels (serde_json's
/// parser itself stops at [`MAX_JSON_DEPTH`]).
pub fn parse_json(body: &[u8], max_depth: usize) -> Result<Value, DocError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| DocError::BadJson(e.to_string()))?;
    if depth(&v) > max_depth {
        return Err(DocError::TooDeep { limit: max_depth });
    }
    Ok(v)
}

/// Levels of nesting of a value (a scalar is 0, `[]` is 1), walked without recursion: the
/// value may be the result of patches, deeper than any parsed body.
pub fn depth(v: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(v, 0usize)];
    while let Some((v, d)) = stack.pop() {
        match v {
            Value::Array(a) => {
                deepest = deepest.max(d + 1);
                stack.extend(a.iter().map(|x| (x, d + 1)));
            }
            Value::Object(o) => {
                deepest = deepest.max(d + 1);
                stack.extend(o.values().map(|x| (x, d + 1)));
            }
            _ => {}
        }
    }
    deepest
}

/// Applies one `json` range patch to a value. Empty content deletes (a field, or a slice).
/// Returns the nesting the patch reaches: the levels of its path plus those of its
/// content, which is how deep the result is at least (0 for a deletion).
pub fn apply_json_patch(target: &mut Value, patch: &Patch) -> Result<usize, String> {
    let Range::Json(path) = &patch.range else {
        return Err("a JSON resource takes `json` ranges".into());
    };
    let content = if patch.content.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(parse_json(&patch.content, MAX_JSON_DEPTH).map_err(|e| e.to_string())?)
    };
    // A slice's content is a list of the items put in place of the slice: they sit one
    // level above the content's own nesting.
    let in_slice = matches!(path.last(), Some(JsonStep::Slice(..))) as usize;
    let reach = content
        .as_ref()
        .map_or(0, |c| (path.len() + depth(c)).saturating_sub(in_slice));
    let Some((last, walk)) = path.split_last() else {
        *target = content.unwrap_or(Value::Null);
        return Ok(reach);
    };
    let mut cur = target;
    for step in walk {
        cur = match (step, cur) {
            (JsonStep::Key(k), Value::Object(o)) => o.get_mut(k).ok_or_else(|| format!("no field {k:?}"))?,
            (JsonStep::Index(i), Value::Array(a)) => {
                let at = index(*i, a.len(), false)?;
                &mut a[at]
            }
            (s, _) => return Err(format!("cannot step {s:?} into this value")),
        };
    }
    match (last, cur) {
        (JsonStep::Key(k), Value::Object(o)) => {
            match content {
                Some(c) => o.insert(k.clone(), c),
                None => o.shift_remove(k),
            };
        }
        (JsonStep::Index(i), Value::Array(a)) => {
            let at = index(*i, a.len(), true)?;
            match (content, at == a.len()) {
                (Some(c), true) => a.push(c),
                (Some(c), false) => a[at] = c,
                (None, false) => {
                    a.remove(at);
                }
                (None, true) => return Err(format!("index {i} is past the end")),
            }
        }
        (JsonStep::Slice(s, e), Value::Array(a)) => {
            let (s, e) = (index(*s, a.len(), true)?, index(*e, a.len(), true)?);
            if e < s {
                return Err(format!("slice [{s}:{e}] ends before it starts"));
            }
            let items = match content {
                None => Vec::new(),
                Some(Value::Array(items)) => items,
                Some(_) => return Err("an array slice is replaced by an array".into()),
            };
            a.splice(s..e, items);
        }
        (JsonStep::Slice(s, e), Value::String(text)) => {
            let mut chars: Vec<char> = text.chars().collect();
            let (s, e) = (index(*s, chars.len(), true)?, index(*e, chars.len(), true)?);
            if e < s {
                return Err(format!("slice [{s}:{e}] ends before it starts"));
            }
            let with = match content {
                None => String::new(),
                Some(Value::String(w)) => w,
                Some(_) => return Err("a string slice is replaced by a string".into()),
            };
            chars.splice(s..e, with.chars());
            *text = chars.into_iter().collect();
        }
        (s, _) => return Err(format!("cannot apply {s:?} to this value")),
    }
    Ok(reach)
}

/// Resolves a possibly negative index against `len`; `end_ok` allows `len` itself.
fn index(i: i64, len: usize, end_ok: bool) -> Result<usize, String> {
    let at = if i < 0 { len as i64 + i } else { i };
    let max = if end_ok { len as i64 } else { len as i64 - 1 };
    if at < 0 || at > max {
        return Err(format!("index {i} is out of range (length {len})"));
    }
    Ok(at as usize)
}

/// Reads the JSON value stored at `obj[prop]`.
fn read_prop(am: &AutoCommit, obj: &ObjId, prop: Prop, heads: Option<&[ChangeHash]>) -> Option<Value> {
    let got = match heads {
        Some(h) => am.get_at(obj, prop, h),
        None => am.get(obj, prop),
    };
    let (v, id) = got.ok().flatten()?;
    Some(read_value(am, v, &id, heads))
}

fn read_value(am: &AutoCommit, v: AmValue<'_>, id: &ObjId, heads: Option<&[ChangeHash]>) -> Value {
    // Children are read by iterating the object once: reading a list's items by index
    // seeks from the start for each (quadratic in its length).
    let child = |value: automerge::ValueRef<'_>, id: Option<ObjId>| {
        read_value(am, value.into_value(), id.as_ref().unwrap_or(&ROOT), heads)
    };
    match v {
        AmValue::Scalar(s) => scalar_to_json(&s),
        AmValue::Object(ObjType::Map | ObjType::Table) => {
            let items = match heads {
                Some(h) => am.map_range_at(id, .., h),
                None => am.map_range(id, ..),
            };
            let mut order = None;
            let mut entries = Vec::new();
            for item in items {
                let id = matches!(item.value, automerge::ValueRef::Object(_)).then(|| item.id());
                let v = child(item.value, id);
                if item.key == ORDER_KEY {
                    order = Some(v);
                } else {
                    entries.push((item.key.into_owned(), v));
                }
            }
            // Keys in the order they were written; any the order list does not know of
            // (written by software that does not keep it) come after, sorted.
            if let Some(Value::Array(order)) = order {
                let mut pos = std::collections::HashMap::new();
                for (i, o) in order.iter().enumerate() {
                    if let Some(k) = o.as_str() {
                        pos.entry(k).or_insert(i);
                    }
                }
                entries.sort_by_key(|(k, _)| pos.get(k.as_str()).copied().unwrap_or(usize::MAX));
            }
            Value::Object(entries.into_iter().collect::<Map<_, _>>())
        }
        AmValue::Object(ObjType::List) => {
            let items = match heads {
                Some(h) => am.list_range_at(id, .., h),
                None => am.list_range(id, ..),
            };
            Value::Array(
                items
                    .map(|item| {
                        let id = matches!(item.value, automerge::ValueRef::Object(_)).then(|| item.id());
                        child(item.value, id)
                    })
                    .collect(),
            )
        }
        AmValue::Object(ObjType::Text) => Value::String(
            match heads {
                Some(h) => am.text_at(id, h),
                None => am.text(id),
            }
            .unwrap_or_default(),
        ),
    }
}

fn scalar_to_json(s: &ScalarValue) -> Value {
    match s {
        ScalarValue::Str(s) => Value::String(s.to_string()),
        ScalarValue::Int(i) | ScalarValue::Timestamp(i) => Value::Number((*i).into()),
        ScalarValue::Counter(c) => Value::Number(i64::from(c).into()),
        ScalarValue::Uint(u) => Value::Number((*u).into()),
        ScalarValue::F64(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        ScalarValue::Boolean(b) => Value::Bool(*b),
        ScalarValue::Bytes(b) => Value::Array(b.iter().map(|x| Value::Number((*x).into())).collect()),
        ScalarValue::Null | ScalarValue::Unknown { .. } => Value::Null,
    }
}

fn json_to_scalar(v: &Value) -> Option<ScalarValue> {
    Some(match v {
        Value::Null => ScalarValue::Null,
        Value::Bool(b) => ScalarValue::Boolean(*b),
        Value::String(s) => ScalarValue::Str(s.as_str().into()),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else {
                ScalarValue::F64(n.as_f64().unwrap_or(0.0))
            }
        }
        Value::Array(_) | Value::Object(_) => return None,
    })
}

fn am_err(e: automerge::AutomergeError) -> DocError {
    DocError::Corrupt(format!("automerge: {e}"))
}

/// Makes `obj[prop]` hold `new`, given that it holds `old`, touching only what differs.
fn reconcile_prop(
    am: &mut AutoCommit,
    obj: &ObjId,
    prop: Prop,
    old: Option<&Value>,
    new: &Value,
) -> Result<(), DocError> {
    if old.is_some_and(|o| same(o, new)) {
        return Ok(());
    }
    // Only a container written over one of its kind is reconciled inside; anything else is
    // put whole, without looking up what the document holds there.
    let same_container = matches!(
        (old, new),
        (Some(Value::Object(_)), Value::Object(_)) | (Some(Value::Array(_)), Value::Array(_))
    );
    if !same_container {
        return put_value(am, obj, prop, new, false);
    }
    let existing = am.get(obj, prop.clone()).map_err(am_err)?;
    match (old, new, existing) {
        (Some(Value::Object(o)), Value::Object(n), Some((AmValue::Object(ObjType::Map), id))) => {
            for k in o.keys().filter(|k| !n.contains_key(*k)) {
                am.delete(&id, k.as_str()).map_err(am_err)?;
            }
            for (k, v) in n {
                reconcile_prop(am, &id, k.as_str().into(), o.get(k), v)?;
            }
            sync_order(am, &id, n)
        }
        (Some(Value::Array(o)), Value::Array(n), Some((AmValue::Object(ObjType::List), id))) => {
            reconcile_list(am, &id, o, n)
        }
        _ => put_value(am, obj, prop, new, false),
    }
}

/// Hidden key of a map's key order: JavaScript apps see an object's keys in the order they
/// were written (`JSON.stringify` compares by it), while automerge maps sort them. Kept as an
/// automerge list, so keys added concurrently are all kept.
const ORDER_KEY: &str = "\u{0}order";

/// Makes a map's order list say `m`'s key order, with the fewest edits.
fn sync_order(am: &mut AutoCommit, id: &ObjId, m: &Map<String, Value>) -> Result<(), DocError> {
    let want: Vec<Value> = m.keys().map(|k| Value::String(k.clone())).collect();
    match am.get(id, ORDER_KEY).map_err(am_err)? {
        Some((AmValue::Object(ObjType::List), list)) => {
            let have = match read_prop(am, id, ORDER_KEY.into(), None) {
                Some(Value::Array(a)) => a,
                _ => Vec::new(),
            };
            if have != want {
                reconcile_list(am, &list, &have, &want)
            } else {
                Ok(())
            }
        }
        _ => {
            let list = am.put_object(id, ORDER_KEY, ObjType::List).map_err(am_err)?;
            for (i, k) in want.into_iter().enumerate() {
                put_value(am, &list, i.into(), &k, true)?;
            }
            Ok(())
        }
    }
}

/// Equality that also compares the order of object keys (serde_json's ignores it).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((ka, va), (kb, vb))| ka == kb && same(va, vb))
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q)),
        _ => a == b,
    }
}

/// Keeps the common prefix and suffix of a list, reconciles the middle element by element,
/// then deletes or inserts the rest.
fn reconcile_list(am: &mut AutoCommit, id: &ObjId, old: &[Value], new: &[Value]) -> Result<(), DocError> {
    let prefix = old.iter().zip(new).take_while(|(a, b)| same(a, b)).count();
    let max_suffix = old.len().min(new.len()) - prefix;
    let suffix = old
        .iter()
        .rev()
        .zip(new.iter().rev())
        .take(max_suffix)
        .take_while(|(a, b)| same(a, b))
        .count();
    let old_mid = &old[prefix..old.len() - suffix];
    let new_mid = &new[prefix..new.len() - suffix];
    let common = old_mid.len().min(new_mid.len());
    for i in 0..common {
        reconcile_prop(am, id, (prefix + i).into(), Some(&old_mid[i]), &new_mid[i])?;
    }
    let at = prefix + common;
    if old_mid.len() > common {
        am.splice(
            id,
            at,
            (old_mid.len() - common) as isize,
            std::iter::empty::<ScalarValue>(),
        )
        .map_err(am_err)?;
    }
    for (k, v) in new_mid[common..].iter().enumerate() {
        put_value(am, id, (at + k).into(), v, true)?;
    }
    Ok(())
}

/// Writes a JSON value at `obj[prop]` from scratch (`insert` for a new list slot).
fn put_value(am: &mut AutoCommit, obj: &ObjId, prop: Prop, v: &Value, insert: bool) -> Result<(), DocError> {
    if let Some(s) = json_to_scalar(v) {
        return match (insert, prop) {
            (true, Prop::Seq(i)) => am.insert(obj, i, s),
            (_, p) => am.put(obj, p, s),
        }
        .map_err(am_err);
    }
    let ty = if v.is_array() { ObjType::List } else { ObjType::Map };
    let child = match (insert, prop) {
        (true, Prop::Seq(i)) => am.insert_object(obj, i, ty),
        (_, p) => am.put_object(obj, p, ty),
    }
    .map_err(am_err)?;
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                put_value(am, &child, k.as_str().into(), x, false)?;
            }
            sync_order(am, &child, m)?;
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                put_value(am, &child, i.into(), x, true)?;
            }
        }
        _ => unreachable!("scalars handled above"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::VersionId;
    use bytes::Bytes;
    use proptest::prelude::*;
    use serde_json::json;

    fn full(v: &Value) -> WriteBody {
        WriteBody::Full {
            media_type: Some("application/json".into()),
            body: serde_json::to_vec(v).unwrap().into(),
        }
    }
    fn patch(range: &str, content: &str) -> Patch {
        Patch {
            range: crate::braid::patch::parse_content_range(&format!("json {range}")).unwrap(),
            content: Bytes::copy_from_slice(content.as_bytes()),
        }
    }
    fn write(d: &mut JsonDoc, body: WriteBody, parents: Option<&Version>) -> Outcome {
        d.apply(
            &DocWrite {
                body: &body,
                version: None,
                parents,
                agent_hint: None,
                force: false,
                digest: None,
                max_json_depth: crate::doc::json::MAX_JSON_DEPTH,
            },
            0,
        )
        .unwrap()
    }

    #[test]
    fn whole_values_and_patches() {
        let mut d = JsonDoc::new();
        write(
            &mut d,
            full(&json!({"n": 1, "s": "hello", "list": [1, 2, {"x": true}]})),
            None,
        );
        assert_eq!(
            d.value(),
            json!({"n": 1, "s": "hello", "list": [1, 2, {"x": true}]})
        );
        write(
            &mut d,
            WriteBody::Patches(vec![patch(".list[1:2]", "[7,8]"), patch(".s", "\"bye\"")]),
            None,
        );
        assert_eq!(
            d.value(),
            json!({"n": 1, "s": "bye", "list": [1, 7, 8, {"x": true}]})
        );
        write(
            &mut d,
            WriteBody::Patches(vec![patch(".list[-1].x", "false"), patch(".n", "")]),
            None,
        );
        assert_eq!(d.value(), json!({"s": "bye", "list": [1, 7, 8, {"x": false}]}));
        write(&mut d, WriteBody::Patches(vec![patch(".s[0:1]", "\"B\"")]), None);
        assert_eq!(d.value()["s"], json!("Bye"));
        write(&mut d, full(&json!(42)), None);
        assert_eq!(d.value(), json!(42));
        write(&mut d, full(&json!([1, "two", null, 2.5])), None);
        assert_eq!(d.value(), json!([1, "two", null, 2.5]));
    }

    #[test]
    fn keys_keep_the_order_they_were_written_in() {
        let mut d = JsonDoc::new();
        write(
            &mut d,
            WriteBody::Full {
                media_type: None,
                body: Bytes::from_static(br#"{"n":1,"s":"hello","list":[1,{"z":1,"a":2}]}"#),
            },
            None,
        );
        assert_eq!(
            serde_json::to_string(&d.value()).unwrap(),
            r#"{"n":1,"s":"hello","list":[1,{"z":1,"a":2}]}"#
        );
        // Reordering alone is a change (JavaScript sees it), and sticks.
        let r = write(
            &mut d,
            WriteBody::Full {
                media_type: None,
                body: Bytes::from_static(br#"{"list":[1,{"z":1,"a":2}],"s":"hello","n":1}"#),
            },
            None,
        );
        assert!(matches!(r, Outcome::Applied(_)));
        assert_eq!(
            serde_json::to_string(&d.value()).unwrap(),
            r#"{"list":[1,{"z":1,"a":2}],"s":"hello","n":1}"#
        );
        // New keys go last; deleted ones leave no gap.
        write(
            &mut d,
            WriteBody::Patches(vec![patch(".new", "true"), patch(".s", "")]),
            None,
        );
        assert_eq!(
            serde_json::to_string(&d.value()).unwrap(),
            r#"{"list":[1,{"z":1,"a":2}],"n":1,"new":true}"#
        );
        // Keys added concurrently are all kept.
        let base = d.frontier();
        let mut v: Value = d.value();
        v["x"] = json!(1);
        write(&mut d, full(&v), Some(&base));
        let mut w: Value = serde_json::from_str(r#"{"list":[1,{"z":1,"a":2}],"n":1,"new":true}"#).unwrap();
        w["y"] = json!(2);
        write(&mut d, full(&w), Some(&base));
        let keys: Vec<String> = d.value().as_object().unwrap().keys().cloned().collect();
        assert_eq!(&keys[..3], ["list", "n", "new"]);
        assert!(keys.contains(&"x".to_string()) && keys.contains(&"y".to_string()));
    }

    #[test]
    fn unchanged_values_are_not_changes() {
        let mut d = JsonDoc::new();
        write(&mut d, full(&json!({"a": 1})), None);
        assert!(matches!(
            write(&mut d, full(&json!({"a": 1})), None),
            Outcome::Unchanged
        ));
    }

    #[test]
    fn concurrent_field_writes_both_survive() {
        let mut d = JsonDoc::new();
        write(&mut d, full(&json!({"a": 1, "b": 1})), None);
        let base = d.frontier();
        write(&mut d, full(&json!({"a": 2, "b": 1})), Some(&base));
        write(&mut d, full(&json!({"a": 1, "b": 3})), Some(&base));
        assert_eq!(d.value(), json!({"a": 2, "b": 3}));
        assert_eq!(d.frontier().ids().len(), 2);
    }

    #[test]
    fn the_rendered_value_follows_changes_merged_from_another_replica() {
        let mut d = JsonDoc::new();
        write(&mut d, full(&json!({"a": 1, "b": 1})), None);
        assert_eq!(d.render(), br#"{"a":1,"b":1}"#);
        let mut e = JsonDoc::new();
        let all = d.base().export(&[]);
        e.base()
            .import(
                all.iter()
                    .map(|x| super::super::am::decode_change(&x.bytes).unwrap())
                    .collect(),
            )
            .unwrap();
        write(&mut e, full(&json!({"a": 1, "b": 2})), None);
        write(&mut d, full(&json!({"a": 3, "b": 1})), None);
        assert_eq!(d.render(), br#"{"a":3,"b":1}"#, "the value kept by the write");
        let theirs = e.base().export(&d.base().heads());
        d.base()
            .import(
                theirs
                    .iter()
                    .map(|x| super::super::am::decode_change(&x.bytes).unwrap())
                    .collect(),
            )
            .unwrap();
        assert_eq!(d.render(), br#"{"a":3,"b":2}"#, "read again once the heads moved");
    }

    #[test]
    fn bad_patches_are_refused_and_change_nothing() {
        let mut d = JsonDoc::new();
        write(&mut d, full(&json!({"a": [1]})), None);
        for (r, c) in [
            (".nope.x", "1"),
            (".a[5]", "1"),
            (".a[0:1]", "3"),
            (".a", "{bad"),
            ("[0]", "1"),
        ] {
            let body = WriteBody::Patches(vec![patch(r, c)]);
            let e = d.apply(
                &DocWrite {
                    body: &body,
                    version: None,
                    parents: None,
                    agent_hint: None,
                    force: false,
                    digest: None,
                    max_json_depth: crate::doc::json::MAX_JSON_DEPTH,
                },
                0,
            );
            assert!(e.is_err(), "{r} {c}");
        }
        let text_patch = Patch {
            range: Range::Text { start: 0, end: 0 },
            content: Bytes::new(),
        };
        let body = WriteBody::Patches(vec![text_patch]);
        assert!(
            d.apply(
                &DocWrite {
                    body: &body,
                    version: None,
                    parents: None,
                    agent_hint: None,
                    force: false,
                    digest: None,
                    max_json_depth: crate::doc::json::MAX_JSON_DEPTH
                },
                0
            )
            .is_err()
        );
        assert_eq!(d.value(), json!({"a": [1]}));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let deep = "[".repeat(MAX_JSON_DEPTH + 2) + &"]".repeat(MAX_JSON_DEPTH + 2);
        assert!(parse_json(deep.as_bytes(), MAX_JSON_DEPTH).is_err());
        let ok = "[".repeat(5) + &"]".repeat(5);
        assert!(parse_json(ok.as_bytes(), 5).is_ok());
        assert_eq!(parse_json(ok.as_bytes(), 4), Err(DocError::TooDeep { limit: 4 }));
    }

    #[test]
    fn history_reads() {
        let mut d = JsonDoc::new();
        let Outcome::Applied(a) = write(&mut d, full(&json!({"v": 1})), None) else {
            panic!()
        };
        write(&mut d, full(&json!({"v": 2})), None);
        assert_eq!(d.value_at(&Version::one(a.id.clone())).unwrap(), json!({"v": 1}));
        assert!(
            d.value_at(&Version::one(VersionId::parse("x-1").unwrap()))
                .is_err()
        );
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(|i| json!(i)),
            "[a-z]{0,3}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-c]", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Any path and content against any value: an answer, never a panic.
        #[test]
        fn patches_never_panic(
            v in arb_json(),
            steps in prop::collection::vec(prop_oneof![
                "[a-c]".prop_map(JsonStep::Key),
                (-4i64..6).prop_map(JsonStep::Index),
                ((-4i64..6), (-4i64..6)).prop_map(|(a, b)| JsonStep::Slice(a, b)),
            ], 0..4),
            content in prop_oneof![Just(String::new()), Just("[1,2]".to_string()), Just("\"s\"".to_string()), Just("{".to_string()), "[0-9]{1,3}"],
        ) {
            let mut target = v;
            let _ = apply_json_patch(&mut target, &Patch { range: Range::Json(steps), content: Bytes::from(content) });
        }

        #[test]
        fn any_sequence_of_values_reads_back(vs in prop::collection::vec(arb_json(), 1..6)) {
            let mut d = JsonDoc::new();
            for v in &vs {
                write(&mut d, full(v), None);
                prop_assert_eq!(&d.value(), v);
            }
        }
    }
}
