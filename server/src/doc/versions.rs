//! The map between Braid version ids and automerge change hashes.
//!
//! Every automerge change Plait makes carries its Braid id in the change's message, as
//! `{"v":"<agent>-<seq>","n":<events>}`, so the map is part of the document itself: it is
//! saved with every snapshot, survives compaction and travels with the document to peers.
//! [`VersionIndex`] is the in-memory lookup rebuilt from those messages on load.
//!
//! `n` is the number of Braid events the change stands for (for text: code points inserted
//! plus deleted), so an id inside a run (`alice-2` of a change named `alice-4` with `n = 5`)
//! can be resolved to "the first 3 events of that change".

use std::collections::{BTreeMap, HashMap};

use automerge::ChangeHash;
use serde::{Deserialize, Serialize};

use crate::model::{Version, VersionId};

/// What Plait writes into an automerge change's message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChangeLabel {
    /// The Braid version id of the change (the id of its last event).
    pub v: String,
    /// How many events the change stands for (at least 1).
    pub n: u64,
}

impl ChangeLabel {
    pub fn new(id: &VersionId, n: u64) -> Self {
        ChangeLabel {
            v: id.to_string(),
            n: n.max(1),
        }
    }

    pub fn to_message(&self) -> String {
        serde_json::to_string(self).expect("label serializes")
    }

    /// Reads a change message; `None` for changes Plait did not label (the genesis change,
    /// or changes made by other automerge software).
    pub fn from_message(message: Option<&str>) -> Option<(VersionId, u64)> {
        let label: ChangeLabel = serde_json::from_str(message?).ok()?;
        Some((VersionId::parse(&label.v).ok()?, label.n.max(1)))
    }
}

/// Where a requested version id points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// Exactly the end of a change.
    Change(ChangeHash),
    /// Inside a change's run: the first `events` events of `change`.
    Within { change: ChangeHash, events: u64 },
}

/// Braid ids ↔ change hashes for one document.
#[derive(Debug, Default, Clone)]
pub struct VersionIndex {
    by_hash: HashMap<ChangeHash, (VersionId, u64)>,
    /// agent → (seq of the run's last event → change).
    by_agent: HashMap<String, BTreeMap<u64, ChangeHash>>,
}

impl VersionIndex {
    /// Records a change. A second change claiming an id already taken is given a synthetic
    /// id so ids stay unique (two offline replicas may have picked the same one).
    pub fn insert(&mut self, hash: ChangeHash, id: VersionId, n: u64) -> VersionId {
        let id = if self.contains_exact(&id) {
            synthetic_id(&hash)
        } else {
            id
        };
        self.by_agent
            .entry(id.agent().to_string())
            .or_default()
            .insert(id.seq(), hash);
        self.by_hash.insert(hash, (id.clone(), n));
        id
    }

    /// Records a change made elsewhere without a Plait label.
    pub fn insert_unlabelled(&mut self, hash: ChangeHash) -> VersionId {
        self.insert(hash, synthetic_id(&hash), 1)
    }

    pub fn id_of(&self, hash: &ChangeHash) -> Option<&VersionId> {
        self.by_hash.get(hash).map(|(id, _)| id)
    }

    pub fn events_of(&self, hash: &ChangeHash) -> Option<u64> {
        self.by_hash.get(hash).map(|(_, n)| *n)
    }

    pub fn contains_exact(&self, id: &VersionId) -> bool {
        self.by_agent
            .get(id.agent())
            .is_some_and(|runs| runs.contains_key(&id.seq()))
    }

    /// Whether `id` names an event already recorded (exactly or inside a run).
    pub fn knows(&self, id: &VersionId) -> bool {
        self.resolve(id).is_some()
    }

    /// Finds the change an id names, or the change whose run contains it.
    pub fn resolve(&self, id: &VersionId) -> Option<Resolved> {
        let runs = self.by_agent.get(id.agent())?;
        let (&end, &hash) = runs.range(id.seq()..).next()?;
        if end == id.seq() {
            return Some(Resolved::Change(hash));
        }
        let n = self.events_of(&hash)?;
        // The run is `end - n + 1 ..= end`, cut at 0; `end` may be the largest seq.
        let first = end.saturating_sub(n.saturating_sub(1));
        (id.seq() >= first).then(|| Resolved::Within {
            change: hash,
            events: id.seq() - first + 1,
        })
    }

    /// The next free sequence number for `agent`; `None` once a client has named its
    /// largest one (`<agent>-18446744073709551615`).
    pub fn next_seq(&self, agent: &str) -> Option<u64> {
        match self.by_agent.get(agent).and_then(|runs| runs.keys().next_back()) {
            Some(last) => last.checked_add(1),
            None => Some(0),
        }
    }

    /// The Braid version for a set of automerge heads; heads without an id (the genesis
    /// change) are the root and drop out.
    pub fn version_of(&self, heads: &[ChangeHash]) -> Version {
        heads.iter().filter_map(|h| self.id_of(h).cloned()).collect()
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

/// An id for a change that has none: its hash prefix as the agent.
pub(crate) fn synthetic_id(hash: &ChangeHash) -> VersionId {
    VersionId::unlabelled(&hash.to_string()).expect("a hash is hex")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(b: u8) -> ChangeHash {
        ChangeHash([b; 32])
    }
    fn id(s: &str) -> VersionId {
        VersionId::parse(s).unwrap()
    }

    #[test]
    fn runs_resolve_exact_and_inside() {
        let mut ix = VersionIndex::default();
        ix.insert(h(1), id("alice-4"), 5);
        ix.insert(h(2), id("alice-9"), 5);
        assert_eq!(ix.resolve(&id("alice-4")), Some(Resolved::Change(h(1))));
        assert_eq!(
            ix.resolve(&id("alice-0")),
            Some(Resolved::Within {
                change: h(1),
                events: 1
            })
        );
        assert_eq!(
            ix.resolve(&id("alice-2")),
            Some(Resolved::Within {
                change: h(1),
                events: 3
            })
        );
        assert_eq!(
            ix.resolve(&id("alice-7")),
            Some(Resolved::Within {
                change: h(2),
                events: 3
            })
        );
        assert_eq!(ix.resolve(&id("alice-10")), None);
        assert_eq!(ix.resolve(&id("bob-0")), None);
        assert_eq!(ix.next_seq("alice"), Some(10));
        assert_eq!(ix.next_seq("bob"), Some(0));
    }

    /// A client may name the largest seq; `last + 1` and `end + 1` overflowed on it
    /// (the doc_patch fuzz target panicked at both).
    #[test]
    fn the_largest_seq_does_not_overflow() {
        let mut ix = VersionIndex::default();
        ix.insert(h(1), id("a-18446744073709551615"), 3);
        assert_eq!(ix.next_seq("a"), None);
        assert_eq!(
            ix.resolve(&id("a-18446744073709551614")),
            Some(Resolved::Within {
                change: h(1),
                events: 2
            })
        );
        assert_eq!(ix.resolve(&id("a-18446744073709551612")), None);
        assert_eq!(ix.resolve(&id("a-5")), None);
    }

    #[test]
    fn a_run_shorter_than_its_seq_leaves_a_gap() {
        let mut ix = VersionIndex::default();
        ix.insert(h(1), id("bob-5"), 2); // events 4 and 5
        assert_eq!(ix.resolve(&id("bob-3")), None);
        assert!(ix.knows(&id("bob-4")));
    }

    #[test]
    fn duplicate_ids_get_synthetic_names() {
        let mut ix = VersionIndex::default();
        ix.insert(h(1), id("zed-1"), 2);
        let second = ix.insert(h(2), id("zed-1"), 2);
        assert_ne!(second, id("zed-1"));
        assert_eq!(ix.id_of(&h(1)), Some(&id("zed-1")));
        assert_eq!(ix.id_of(&h(2)), Some(&second));
    }

    #[test]
    fn labels_round_trip_and_tolerate_foreign_messages() {
        let l = ChangeLabel::new(&id("bob-5"), 6);
        assert_eq!(
            ChangeLabel::from_message(Some(&l.to_message())),
            Some((id("bob-5"), 6))
        );
        assert_eq!(ChangeLabel::from_message(None), None);
        assert_eq!(ChangeLabel::from_message(Some("fixed a typo")), None);
    }

    #[test]
    fn heads_map_to_sorted_versions() {
        let mut ix = VersionIndex::default();
        ix.insert(h(1), id("fred-0"), 1);
        ix.insert(h(2), id("erin-0"), 1);
        let v = ix.version_of(&[h(1), h(2), h(9)]);
        assert_eq!(v.ids(), &[id("erin-0"), id("fred-0")]);
    }
}
