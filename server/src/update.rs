//! Typed changes on the way in and updates on the way out.
//!
//! A write arrives as a [`WriteBody`] of [`Patch`]es or a whole new representation; a
//! subscriber receives [`Update`]s. The Braid and Statebus codecs translate between these
//! values and their wire forms; the engine and the documents never see wire bytes.

use bytes::Bytes;

use crate::model::Version;

/// One step of a JSON range: `.name`, `["name"]`, `[3]`, `[-1]` or a slice `[a:b]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonStep {
    Key(String),
    Index(i64),
    Slice(i64, i64),
}

/// The part of a representation a patch replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Range {
    /// `text [start:end]`: code points, end exclusive.
    Text { start: usize, end: usize },
    /// `json <path>`: a path into a JSON value; empty = the whole value.
    Json(Vec<JsonStep>),
    /// `bytes <first>-<last>` (inclusive on the wire) or `bytes <first>-` (to the end).
    /// Held here as `[start, end)`; `end: None` means the end of the representation.
    Bytes { start: u64, end: Option<u64> },
}

/// "This range was replaced with this content" (range-patch draft).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    pub range: Range,
    pub content: Bytes,
}

/// What a write carries.
#[derive(Debug, Clone)]
pub enum WriteBody {
    /// A whole new representation with its media type, if the client gave one.
    Full { media_type: Option<String>, body: Bytes },
    /// Range patches against the version named by the write's parents.
    Patches(Vec<Patch>),
}

/// A text edit in a subscriber's coordinates: code points `[start, end)` of the state before
/// the update become `content`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextPatch {
    pub start: usize,
    pub end: usize,
    pub content: String,
}

/// What a subscriber receives: one step from `parents` to `version`.
#[derive(Debug, Clone)]
pub struct Update {
    pub version: Version,
    pub parents: Version,
    pub body: UpdateBody,
    /// Media type of the representation.
    pub media_type: String,
    /// `sha-256=:<base64>:` of the representation at `version`, when `version` is current.
    pub digest: Option<String>,
}

/// The content of an [`Update`].
#[derive(Debug, Clone)]
pub enum UpdateBody {
    /// The whole representation.
    Snapshot(Bytes),
    /// Text patches, absolute with respect to the state at `parents`, sorted, disjoint.
    Text(Vec<TextPatch>),
    /// The resource does not exist (never written, or deleted).
    Missing,
}
