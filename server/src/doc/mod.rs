//! Documents: the in-memory state of one resource and the rules for changing it.
//!
//! A [`Document`] is text ([`text::TextDoc`]) or JSON ([`json::JsonDoc`]), both automerge
//! documents with a Braid version index, or bytes ([`bytes::BytesDoc`]). A write is
//! applied at the parents it names (merging when those are not current) and yields an
//! [`Applied`]: the change to store and the update to send subscribers that were at the old
//! frontier. This module knows nothing of storage, HTTP or subscribers.

pub mod am;
pub mod bytes;
pub mod json;
pub mod text;
pub mod versions;

#[cfg(test)]
mod convergence;

use ::bytes::Bytes;

use crate::model::{Kind, Version, VersionId};
use crate::update::{UpdateBody, WriteBody};

pub use self::bytes::{BytesDoc, BytesValue};
pub use json::JsonDoc;
pub use text::TextDoc;

/// A write as a document sees it.
#[derive(Debug, Clone, Copy)]
pub struct DocWrite<'a> {
    pub body: &'a WriteBody,
    /// The id the client chose for this edit, if any.
    pub version: Option<&'a VersionId>,
    /// The version the edit was made against; `None` = the current version.
    pub parents: Option<&'a Version>,
    /// The client's `Peer`, used as the agent of an edit that names no version.
    pub agent_hint: Option<&'a str>,
    /// Record a change even if the write changes nothing (it creates the resource).
    pub force: bool,
    /// The SHA-256 the representation must have at the write's own version (its parents
    /// plus this edit); a mismatch refuses the write.
    pub digest: Option<&'a [u8; 32]>,
    /// Deepest JSON nesting the *result* of a JSON write may have
    /// (`limits.max_json_depth`, at most [`json::MAX_JSON_DEPTH`]).
    pub max_json_depth: usize,
}

/// The result of a write.
#[derive(Debug)]
pub enum Outcome {
    /// Stored nothing: the edit changes nothing, or its version id was seen before.
    Unchanged,
    Applied(Applied),
}

/// A change made to a document, ready to be stored and announced.
#[derive(Debug)]
pub struct Applied {
    /// The change's version id.
    pub id: VersionId,
    /// What the change was based on.
    pub parents: Version,
    /// Events (code points for text) the change stands for.
    pub n: u64,
    /// Bytes to store: an automerge change, or for bytes resources the BLAKE3 hash of the
    /// value (the value itself is the snapshot in `body`).
    pub change: Vec<u8>,
    /// A big text write is committed as a run of changes (see
    /// [`text::MAX_EVENTS_PER_CHANGE`]): those before `change`, oldest first, each with
    /// its own id inside the run. Empty for every other write.
    pub earlier: Vec<EarlierChange>,
    /// The frontier before the change, and after it (a merge when the change was made on
    /// older parents).
    pub event_parents: Version,
    pub event_version: Version,
    /// What takes a subscriber at `event_parents` to `event_version`.
    pub body: UpdateBody,
}

/// One change of a run that ends with an [`Applied`]'s own change.
#[derive(Debug, Clone)]
pub struct EarlierChange {
    pub id: VersionId,
    pub parents: Version,
    pub change: Vec<u8>,
}

/// Why a write or read failed. Everything but `Corrupt` is the client's doing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocError {
    #[error("unknown version {}", crate::braid::format_version(&Version::new(.0.clone())))]
    UnknownVersion(Vec<VersionId>),
    #[error("the body is not valid UTF-8 text")]
    NotUtf8,
    #[error("the body is not valid JSON: {0}")]
    BadJson(String),
    #[error("{0}")]
    BadPatch(String),
    #[error("a {kind} resource takes `{expected}` ranges")]
    WrongUnit {
        kind: &'static str,
        expected: &'static str,
    },
    #[error("{0}")]
    OutOfRange(String),
    #[error("this resource holds {have}; a {got} body cannot replace it (DELETE it first)")]
    MediaType { have: &'static str, got: String },
    #[error("{0}")]
    Conflict(String),
    /// The JSON a write would build nests deeper than `limits.max_json_depth`.
    #[error("the JSON this write builds nests deeper than limits.max_json_depth ({limit} levels)")]
    TooDeep { limit: usize },
    #[error("Repr-Digest does not match the representation after this write")]
    DigestMismatch,
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
}

/// Refuses a write whose result does not have the digest the client expected.
pub(crate) fn check_digest(expected: Option<&[u8; 32]>, result: &[u8]) -> Result<(), DocError> {
    use sha2::Digest as _;
    match expected {
        Some(want) if sha2::Sha256::digest(result).as_slice() != want.as_slice() => {
            Err(DocError::DigestMismatch)
        }
        _ => Ok(()),
    }
}

/// Checks that a whole-body write's media type fits the resource's kind.
pub(crate) fn check_media_type(kind: Kind, media_type: &str) -> Result<(), DocError> {
    let got = Kind::for_media_type(Some(media_type));
    // Text resources also accept bodies sent without a useful type (curl's default).
    if got == kind {
        Ok(())
    } else {
        Err(DocError::MediaType {
            have: kind.name(),
            got: media_type.to_string(),
        })
    }
}

/// One resource's document.
pub enum Document {
    Text(TextDoc),
    Json(JsonDoc),
    Bytes(BytesDoc),
}

impl Document {
    pub fn new(kind: Kind) -> Self {
        match kind {
            Kind::Text => Document::Text(TextDoc::new()),
            Kind::Json => Document::Json(JsonDoc::new()),
            Kind::Bytes => Document::Bytes(BytesDoc::new()),
        }
    }

    /// A text or JSON document from a snapshot and the stored changes after it.
    pub fn load_automerge<'a>(
        kind: Kind,
        snapshot: Option<&[u8]>,
        changes: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Self, DocError> {
        let changes = changes
            .into_iter()
            .map(am::decode_change)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(match kind {
            Kind::Text => Document::Text(TextDoc::from_base(am::AmDoc::load(
                am::Genesis::Text,
                snapshot,
                changes,
            )?)),
            Kind::Json => Document::Json(JsonDoc::from_base(am::AmDoc::load(
                am::Genesis::Json,
                snapshot,
                changes,
            )?)),
            Kind::Bytes => unreachable!("bytes documents are not automerge documents"),
        })
    }

    pub fn kind(&self) -> Kind {
        match self {
            Document::Text(_) => Kind::Text,
            Document::Json(_) => Kind::Json,
            Document::Bytes(_) => Kind::Bytes,
        }
    }

    /// Applies a write at its parents. `time_secs` is recorded in the change.
    pub fn apply(&mut self, w: &DocWrite<'_>, time_secs: i64) -> Result<Outcome, DocError> {
        match self {
            Document::Text(d) => d.apply(w, time_secs),
            Document::Json(d) => d.apply(w, time_secs),
            Document::Bytes(d) => d.apply(w),
        }
    }

    /// Applies automerge changes made elsewhere (other processes, peers).
    pub fn apply_remote<'a>(&mut self, changes: impl IntoIterator<Item = &'a [u8]>) -> Result<(), DocError> {
        let decoded = changes
            .into_iter()
            .map(am::decode_change)
            .collect::<Result<Vec<_>, _>>()?;
        match self {
            Document::Text(d) => d.apply_remote(decoded),
            Document::Json(d) => d.base().apply_remote(decoded),
            Document::Bytes(_) => Err(DocError::Corrupt(
                "bytes resources take no automerge changes".into(),
            )),
        }
    }

    pub fn frontier(&mut self) -> Version {
        match self {
            Document::Text(d) => d.frontier(),
            Document::Json(d) => d.frontier(),
            Document::Bytes(d) => d.frontier(),
        }
    }

    /// The current representation.
    pub fn render(&mut self) -> Bytes {
        match self {
            Document::Text(d) => Bytes::from(d.text()),
            Document::Json(d) => d.render().into(),
            Document::Bytes(d) => d.current().map(|c| c.body.clone()).unwrap_or_default(),
        }
    }

    /// The representation at a version.
    pub fn render_at(&mut self, version: &Version) -> Result<Bytes, DocError> {
        match self {
            Document::Text(d) => d.text_at(version).map(Bytes::from),
            Document::Json(d) => d
                .value_at(version)
                .map(|v| serde_json::to_vec(&v).expect("JSON serializes").into()),
            Document::Bytes(d) => {
                if *version == d.frontier() {
                    Ok(self.render())
                } else {
                    // Old values of bytes resources are not kept.
                    Err(DocError::UnknownVersion(version.ids().to_vec()))
                }
            }
        }
    }

    /// What takes a client at `from` to the current version: text patches, or for JSON
    /// and bytes the current value.
    pub fn diff_from(&mut self, from: &Version) -> Result<UpdateBody, DocError> {
        match self {
            Document::Text(d) => d.diff_from(from).map(UpdateBody::Text),
            Document::Json(d) => {
                d.value_at(from)?;
                Ok(UpdateBody::Snapshot(self.render()))
            }
            Document::Bytes(_) => Ok(UpdateBody::Snapshot(self.render())),
        }
    }

    /// The changes not in `from`'s history, in causal order, each as (id, parents, what it
    /// did): text patches against its parents, or the JSON value after it.
    pub fn history_since(
        &mut self,
        from: &Version,
    ) -> Result<Vec<(VersionId, Version, UpdateBody)>, DocError> {
        match self {
            Document::Text(d) => d.history_since(from),
            Document::Json(d) => d.history_since(from),
            Document::Bytes(d) => {
                let now = d.frontier();
                if *from == now {
                    return Ok(Vec::new());
                }
                Ok(d.current()
                    .map(|c| (c.id.clone(), from.clone(), UpdateBody::Snapshot(c.body.clone())))
                    .into_iter()
                    .collect())
            }
        }
    }

    /// Whether every id of `version` is known here (inside a run counts).
    pub fn knows(&mut self, version: &Version) -> Result<(), DocError> {
        match self {
            Document::Text(d) => d.base().resolve_each(version).map(|_| ()),
            Document::Json(d) => d.base().heads_for(version).map(|_| ()),
            Document::Bytes(d) => {
                if version.is_root() || *version == d.frontier() {
                    Ok(())
                } else {
                    Err(DocError::UnknownVersion(version.ids().to_vec()))
                }
            }
        }
    }

    /// The automerge heads (replicas compare them to know what the other lacks); bytes
    /// documents have none.
    pub fn heads(&mut self) -> Vec<automerge::ChangeHash> {
        match self {
            Document::Text(d) => d.base().heads(),
            Document::Json(d) => d.base().heads(),
            Document::Bytes(_) => Vec::new(),
        }
    }

    /// The changes a replica at `have` lacks (automerge kinds; bytes have none).
    pub fn export(&mut self, have: &[automerge::ChangeHash]) -> Vec<am::Exported> {
        match self {
            Document::Text(d) => d.base().export(have),
            Document::Json(d) => d.base().export(have),
            Document::Bytes(_) => Vec::new(),
        }
    }

    /// Applies a peer's changes; returns those that were new here.
    pub fn import<'a>(
        &mut self,
        changes: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Vec<am::Exported>, DocError> {
        let decoded = changes
            .into_iter()
            .map(am::decode_change)
            .collect::<Result<Vec<_>, _>>()?;
        match self {
            Document::Text(d) => {
                let fresh = d.base().import(decoded)?;
                d.resync_rope();
                Ok(fresh)
            }
            Document::Json(d) => d.base().import(decoded),
            Document::Bytes(_) => Err(DocError::Corrupt(
                "bytes resources take no automerge changes".into(),
            )),
        }
    }

    /// A compact snapshot of the whole document (automerge kinds only).
    pub fn save(&mut self) -> Option<Vec<u8>> {
        match self {
            Document::Text(d) => Some(d.base().save()),
            Document::Json(d) => Some(d.base().save()),
            Document::Bytes(_) => None,
        }
    }

    /// How many changes the document holds.
    pub fn change_count(&mut self) -> usize {
        match self {
            Document::Text(d) => d.base().change_count(),
            Document::Json(d) => d.base().change_count(),
            Document::Bytes(_) => 1,
        }
    }
}
