//! The automerge document underneath text and JSON resources: genesis, loading, resolving
//! Braid versions to heads, and committing a labelled change at any set of parents.
//!
//! Every document starts from a *genesis* change that is byte-identical on every machine
//! (fixed actor, time 0, no message), so two replicas that create the same resource
//! independently share the root object instead of racing to create two of them.

use std::collections::HashMap;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutoCommit, Change, ChangeHash, LoadOptions, ObjType, ROOT, TextEncoding};

use super::DocError;
use super::versions::{ChangeLabel, Resolved, VersionIndex, synthetic_id};
use crate::model::{Version, VersionId};

/// Root key written by a write that changes nothing else (see [`AmDoc::commit_at`]).
const VERSION_MARK_KEY: &str = "_version";

/// Actor of genesis changes only; never used for edits.
const GENESIS_ACTOR: [u8; 16] = *b"plait-genesis-v1";

/// What a genesis change creates under the root map.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Genesis {
    /// `text`: an automerge Text object.
    Text,
    /// `v`: a map holding the JSON value (replaced wholesale when the value is not an object).
    Json,
}

impl Genesis {
    pub(crate) fn key(self) -> &'static str {
        match self {
            Genesis::Text => "text",
            Genesis::Json => "v",
        }
    }

    /// The genesis change, made once per kind (it is the same bytes every time, and
    /// making it builds a document).
    fn change(self) -> Change {
        static TEXT: std::sync::OnceLock<Change> = std::sync::OnceLock::new();
        static JSON: std::sync::OnceLock<Change> = std::sync::OnceLock::new();
        match self {
            Genesis::Text => &TEXT,
            Genesis::Json => &JSON,
        }
        .get_or_init(|| self.make())
        .clone()
    }

    fn make(self) -> Change {
        let mut am = AutoCommit::new_with_encoding(TextEncoding::UnicodeCodePoint)
            .with_actor(ActorId::from(GENESIS_ACTOR));
        let ty = match self {
            Genesis::Text => ObjType::Text,
            Genesis::Json => ObjType::Map,
        };
        am.put_object(ROOT, self.key(), ty).expect("genesis op");
        am.commit_with(CommitOptions::default().with_time(0))
            .expect("genesis commits");
        am.get_last_local_change().expect("genesis change")
    }
}

/// An automerge document with its Braid version index.
pub(crate) struct AmDoc {
    pub(crate) am: AutoCommit,
    pub(crate) index: VersionIndex,
    genesis: ChangeHash,
    /// Changes that arrived before their dependencies: automerge holds them back, and they
    /// join the index, under the label they carry, once it applies them.
    queued: HashMap<ChangeHash, Option<(VersionId, u64)>>,
}

impl AmDoc {
    /// A document holding only the genesis change.
    pub(crate) fn new(genesis: Genesis) -> Self {
        Self::load(genesis, None, Vec::new()).expect("a fresh document loads")
    }

    /// A document from an optional snapshot (`save()` output) plus later changes.
    pub(crate) fn load(
        genesis: Genesis,
        snapshot: Option<&[u8]>,
        changes: Vec<Change>,
    ) -> Result<Self, DocError> {
        let g = genesis.change();
        let mut am = match snapshot {
            Some(bytes) => AutoCommit::load_with_options(
                bytes,
                LoadOptions::new().text_encoding(TextEncoding::UnicodeCodePoint),
            )
            .map_err(|e| DocError::Corrupt(format!("snapshot does not load: {e}")))?,
            None => AutoCommit::new_with_encoding(TextEncoding::UnicodeCodePoint),
        };
        am.apply_changes(std::iter::once(g.clone()).chain(changes))
            .map_err(|e| DocError::Corrupt(format!("stored changes do not apply: {e}")))?;
        am.set_actor(ActorId::random());
        let mut doc = AmDoc {
            am,
            index: VersionIndex::default(),
            genesis: g.hash(),
            queued: HashMap::new(),
        };
        doc.reindex();
        Ok(doc)
    }

    /// Rebuilds the version index from the change messages.
    fn reindex(&mut self) {
        let mut index = VersionIndex::default();
        for meta in self.am.get_changes_meta(&[]) {
            if meta.hash == self.genesis {
                continue;
            }
            match ChangeLabel::from_message(meta.message.as_deref()) {
                Some((id, n)) => index.insert(meta.hash, id, n),
                None => index.insert_unlabelled(meta.hash),
            };
        }
        self.index = index;
    }

    /// Applies changes that were made elsewhere (another process, a peer). Already-known
    /// changes are skipped by automerge.
    pub(crate) fn apply_remote(&mut self, changes: Vec<Change>) -> Result<(), DocError> {
        let fresh: Vec<Change> = changes
            .into_iter()
            .filter(|c| self.am.get_change_meta_by_hash(&c.hash()).is_none())
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        // The label travels in the change itself, so a change that has to wait for its
        // dependencies (a peer or another process sent it out of order) keeps it.
        for c in &fresh {
            let label = ChangeLabel::from_message(c.message());
            self.queued.insert(c.hash(), label);
        }
        self.am
            .apply_changes_batch(fresh)
            .map_err(|e| DocError::Corrupt(format!("changes do not apply: {e}")))?;
        let (am, index) = (&mut self.am, &mut self.index);
        self.queued.retain(|hash, label| {
            if am.get_change_meta_by_hash(hash).is_none() {
                return true; // still waiting for a dependency
            }
            match label.take() {
                Some((id, n)) => index.insert(*hash, id, n),
                None => index.insert_unlabelled(*hash),
            };
            false
        });
        Ok(())
    }

    pub(crate) fn heads(&mut self) -> Vec<ChangeHash> {
        self.am.get_heads()
    }

    pub(crate) fn frontier(&mut self) -> Version {
        let heads = self.heads();
        self.index.version_of(&heads)
    }

    /// Heads for a Braid version whose ids all end a change; the root is the genesis.
    pub(crate) fn heads_for(&self, version: &Version) -> Result<Vec<ChangeHash>, DocError> {
        if version.is_root() {
            return Ok(vec![self.genesis]);
        }
        let mut heads = Vec::with_capacity(version.ids().len());
        let mut unknown = Vec::new();
        for id in version.ids() {
            match self.index.resolve(id) {
                Some(Resolved::Change(h)) => heads.push(h),
                _ => unknown.push(id.clone()),
            }
        }
        if unknown.is_empty() {
            Ok(heads)
        } else {
            Err(DocError::UnknownVersion(unknown))
        }
    }

    /// Resolves each id, allowing ids inside a run.
    pub(crate) fn resolve_each(&self, version: &Version) -> Result<Vec<Resolved>, DocError> {
        let mut out = Vec::new();
        let mut unknown = Vec::new();
        for id in version.ids() {
            match self.index.resolve(id) {
                Some(r) => out.push(r),
                None => unknown.push(id.clone()),
            }
        }
        if unknown.is_empty() {
            Ok(out)
        } else {
            Err(DocError::UnknownVersion(unknown))
        }
    }

    /// Picks the id for a new change of `n` events: the client's (None when it is already
    /// known, which makes the write a duplicate), or `<agent>-<next seq + n - 1>` with the
    /// agent taken from the client's `Peer` when that is a valid agent name.
    pub(crate) fn choose_id(
        &self,
        requested: Option<&VersionId>,
        agent_hint: Option<&str>,
        n: u64,
    ) -> Option<VersionId> {
        if let Some(id) = requested {
            return (!self.index.knows(id)).then(|| id.clone());
        }
        // The id names the change's last event; an agent whose seqs a client used up (by
        // naming the largest) is passed over for a random one.
        let last_seq = |agent: &str| self.index.next_seq(agent)?.checked_add(n.max(1) - 1);
        let (agent, seq) = agent_hint
            .filter(|a| VersionId::new(*a, 0).is_ok())
            .and_then(|a| Some((a.to_string(), last_seq(a)?)))
            .unwrap_or_else(|| {
                loop {
                    let agent = random_agent();
                    if let Some(seq) = last_seq(&agent) {
                        break (agent, seq);
                    }
                }
            });
        Some(VersionId::new(agent, seq).expect("agent checked above"))
    }

    /// Commits the ops `edit` makes as one change based on `parents`, labelled `id`.
    /// On error nothing is kept.
    pub(crate) fn commit_at<F>(
        &mut self,
        parents: &[ChangeHash],
        id: &VersionId,
        n: u64,
        time_secs: i64,
        edit: F,
    ) -> Result<Committed, DocError>
    where
        F: FnOnce(&mut AutoCommit) -> Result<(), DocError>,
    {
        let current = self.heads();
        let isolated = !same_set(parents, &current);
        if isolated {
            self.am.isolate(parents);
        }
        let mut result = edit(&mut self.am);
        if result.is_ok() && self.am.pending_ops() == 0 {
            // A write that changes nothing but names a version still needs a change so the
            // id exists for later writes to name. It must hold an op: automerge picks
            // actors for isolated edits by their highest op, and an empty change would
            // leave this actor looking unused and let a later edit reuse its sequence.
            result = self
                .am
                .put(ROOT, VERSION_MARK_KEY, id.to_string())
                .map(|_| ())
                .map_err(|e| DocError::Corrupt(format!("automerge: {e}")));
        }
        let label = ChangeLabel::new(id, n).to_message();
        let hash = match result {
            Ok(()) => self
                .am
                .commit_with(CommitOptions::default().with_message(label).with_time(time_secs)),
            Err(e) => {
                self.am.rollback();
                if isolated {
                    self.am.integrate();
                }
                return Err(e);
            }
        };
        if isolated {
            self.am.integrate();
        }
        let hash = hash.ok_or_else(|| DocError::Corrupt("a change with ops did not commit".into()))?;
        let change = self
            .am
            .get_change_by_hash(&hash)
            .ok_or_else(|| DocError::Corrupt("committed change is missing".into()))?;
        let id = self.index.insert(hash, id.clone(), n);
        Ok(Committed {
            id,
            hash,
            bytes: change.raw_bytes().to_vec(),
            was_current: !isolated,
        })
    }

    /// Changes not in the history of `from`, in causal order.
    pub(crate) fn changes_since(&mut self, from: &Version) -> Result<Vec<HistoryEntry>, DocError> {
        let have = self.heads_for(from)?;
        let metas: Vec<(ChangeHash, Vec<ChangeHash>)> = self
            .am
            .get_changes_meta(&have)
            .into_iter()
            .map(|m| (m.hash, m.deps.clone()))
            .collect();
        Ok(metas
            .into_iter()
            .filter(|(h, _)| *h != self.genesis)
            .filter_map(|(hash, deps)| {
                let id = self.index.id_of(&hash)?.clone();
                let parents = self.index.version_of(&deps);
                Some(HistoryEntry {
                    hash,
                    id,
                    deps,
                    parents,
                })
            })
            .collect())
    }

    /// Changes a replica holding `have` lacks (all but genesis when `have` names nothing
    /// known here), with each one's Braid id and parents.
    pub(crate) fn export(&mut self, have: &[ChangeHash]) -> Vec<Exported> {
        let known: Vec<ChangeHash> = have
            .iter()
            .copied()
            .filter(|h| self.am.get_change_meta_by_hash(h).is_some())
            .collect();
        let changes = self.am.get_changes(&known);
        changes
            .into_iter()
            .filter(|c| c.hash() != self.genesis)
            .map(|c| self.describe(c))
            .collect()
    }

    /// A change with its Braid id and parents (from the version index).
    fn describe(&self, c: Change) -> Exported {
        let hash = c.hash();
        // A change still waiting for its dependencies is not in the index yet: it is named
        // as the index will name it once applied.
        let version = match self.index.id_of(&hash) {
            Some(id) => id.clone(),
            None => match ChangeLabel::from_message(c.message()) {
                Some((id, _)) => id,
                None => synthetic_id(&hash),
            },
        };
        let parents = self.index.version_of(c.deps());
        Exported {
            bytes: c.raw_bytes().to_vec(),
            version,
            parents,
        }
    }

    /// Applies a peer's changes and describes the ones that were new here (in the order
    /// given, which [`export`](Self::export) makes causal).
    pub(crate) fn import(&mut self, changes: Vec<Change>) -> Result<Vec<Exported>, DocError> {
        let fresh: Vec<Change> = changes
            .into_iter()
            .filter(|c| self.am.get_change_meta_by_hash(&c.hash()).is_none())
            .collect();
        self.apply_remote(fresh.clone())?;
        Ok(fresh.into_iter().map(|c| self.describe(c)).collect())
    }

    pub(crate) fn save(&mut self) -> Vec<u8> {
        self.am.save()
    }

    /// Number of changes in the document (genesis included).
    pub(crate) fn change_count(&self) -> usize {
        self.index.len() + 1
    }
}

/// A change as it travels between replicas: its bytes, Braid id and parents.
#[derive(Debug, Clone)]
pub struct Exported {
    pub bytes: Vec<u8>,
    pub version: VersionId,
    pub parents: Version,
}

/// One change in a history listing.
pub(crate) struct HistoryEntry {
    pub(crate) hash: ChangeHash,
    pub(crate) id: VersionId,
    /// Its automerge dependencies, and the same as a Braid version.
    pub(crate) deps: Vec<ChangeHash>,
    pub(crate) parents: Version,
}

/// A change just made.
pub(crate) struct Committed {
    pub(crate) id: VersionId,
    pub(crate) hash: ChangeHash,
    pub(crate) bytes: Vec<u8>,
    /// Whether it was made on the current heads (no merge happened).
    pub(crate) was_current: bool,
}

pub(crate) fn same_set(a: &[ChangeHash], b: &[ChangeHash]) -> bool {
    a.len() == b.len() && a.iter().all(|h| b.contains(h))
}

/// A short random agent name for writes that name none, like braid-text's.
pub(crate) fn random_agent() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..5)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Parses stored change bytes.
pub(crate) fn decode_change(bytes: &[u8]) -> Result<Change, DocError> {
    Change::from_bytes(bytes.to_vec()).map_err(|e| DocError::Corrupt(format!("stored change: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::ReadDoc;

    #[test]
    fn the_kept_genesis_is_the_one_made_anew_and_each_kind_has_its_own() {
        for g in [Genesis::Text, Genesis::Json] {
            assert_eq!(g.change().hash(), g.make().hash());
            assert_eq!(g.change().raw_bytes(), g.make().raw_bytes());
        }
        assert_ne!(Genesis::Text.change().hash(), Genesis::Json.change().hash());
    }

    /// Edits that change nothing, then an edit on old parents: the stored changes must
    /// replay (automerge requires each actor's changes to chain).
    #[test]
    fn no_op_versions_then_an_isolated_edit_replay() {
        let mut d = AmDoc::new(Genesis::Text);
        let root = d.heads();
        let mut stored = vec![];
        for k in 0..3 {
            let id = VersionId::new(format!("p{k}"), 0).unwrap();
            let parents = if k == 0 { root.clone() } else { d.heads() };
            stored.push(d.commit_at(&parents, &id, 0, 0, |_| Ok(())).unwrap().bytes);
        }
        let first = match d.index.resolve(&VersionId::parse("p0-0").unwrap()) {
            Some(super::super::versions::Resolved::Change(h)) => h,
            other => panic!("{other:?}"),
        };
        let obj = match d.am.get(ROOT, "text") {
            Ok(Some((_, id))) => id,
            _ => panic!(),
        };
        let c = d
            .commit_at(&[first], &VersionId::parse("p3-0").unwrap(), 1, 0, |am| {
                am.splice_text(&obj, 0, 0, "a").unwrap();
                Ok(())
            })
            .unwrap();
        assert!(!c.was_current);
        stored.push(c.bytes);
        let changes = stored.iter().map(|b| decode_change(b).unwrap()).collect();
        let mut r = AmDoc::load(Genesis::Text, None, changes).unwrap();
        assert_eq!(r.frontier(), d.frontier());
    }
}
