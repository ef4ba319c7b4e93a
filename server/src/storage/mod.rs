//! Durable storage: one [`Storage`] trait, two backends.
//!
//! * [`postgres::PostgresStorage`]: tokio-postgres with a deadpool pool; schema from the
//!   numbered SQL files in `migrations/`, applied at start-up and tracked by refinery.
//! * [`sqlite::SqliteStorage`]: the embedded default, a SQLite file in the data dir (WAL,
//!   `synchronous=FULL`); see ARCHITECTURE.md for why SQLite.
//!
//! The model (DESIGN.md §2): a resource row per (namespace, path) with its kind and media
//! type; an append-only log of changes per resource numbered by `seq`; at most one snapshot
//! per resource that folds the log up to some `seq`; blobs by BLAKE3 hash for bytes
//! resources. Both backends pass the same suite ([`suite`]).
//!
//! **Durability contract:** [`Storage::append`] returns only after the changes are
//! committed to disk (fsync), and concurrent appends are group-committed: many callers'
//! changes share one transaction, which is what makes durable writes fast.
//!
//! This module knows nothing of documents, HTTP or subscribers: changes are opaque bytes.

pub mod columns;
pub mod dump;
pub mod postgres;
pub mod sqlite;
pub mod suite;

use async_trait::async_trait;
use bytes::Bytes;
use plait_bridge::Identity;

use crate::model::{Kind, Namespace, ResourceKey, ResourcePath, Version, VersionId};

/// A resource's row id.
pub type ResourceId = i64;
/// Position of a change in its resource's log (1, 2, …; gap-free, in commit order).
pub type Seq = i64;

/// A resource as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceRow {
    pub id: ResourceId,
    pub kind: Kind,
    pub media_type: String,
    /// The seq of the last change appended.
    pub head_seq: Seq,
}

/// A stored change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredChange {
    pub seq: Seq,
    /// The change's version id.
    pub version: VersionId,
    /// The version it was made on.
    pub parents: Version,
    /// Who made it, when known.
    pub author: Option<Identity>,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// An automerge change, or for bytes resources the BLAKE3 hash of the value.
    pub data: Bytes,
    /// For bytes resources: the media type of the value.
    pub meta: Option<String>,
}

/// A change to append.
#[derive(Debug, Clone)]
pub struct NewChange {
    pub version: VersionId,
    pub parents: Version,
    pub author: Option<Identity>,
    pub at_ms: i64,
    pub data: Bytes,
    pub meta: Option<String>,
    /// For bytes resources: the value, stored under its BLAKE3 hash (`data`).
    pub blob: Option<Bytes>,
}

impl NewChange {
    /// The bytes it adds to the store (as a resource row's `bytes` counts them): the
    /// change, and a bytes value's blob.
    pub fn stored_bytes(&self) -> usize {
        self.data.len() + self.blob.as_ref().map_or(0, Bytes::len)
    }
}

/// A resource to create with its first content (see [`Storage::create`]).
#[derive(Debug, Clone)]
pub struct NewResource {
    pub key: ResourceKey,
    pub kind: Kind,
    pub media_type: String,
    pub first: First,
}

/// What a new resource starts with.
#[derive(Debug, Clone)]
pub enum First {
    /// One snapshot covering seq 0, so its first change will be seq 1 (a replica's first
    /// sync).
    Snapshot(Bytes),
    /// Its first changes, from seq 1.
    Changes(Vec<NewChange>),
}

impl NewResource {
    /// The bytes it adds to the store (as its row's `bytes` counts them).
    pub fn bytes(&self) -> usize {
        match &self.first {
            First::Snapshot(d) => d.len(),
            First::Changes(cs) => cs.iter().map(NewChange::stored_bytes).sum(),
        }
    }
}

/// Everything needed to rebuild a resource's document.
#[derive(Debug, Clone)]
pub struct LoadedResource {
    pub row: ResourceRow,
    /// `(upto_seq, bytes)`: a snapshot covering changes up to `upto_seq`.
    pub snapshot: Option<(Seq, Bytes)>,
    /// Changes after the snapshot, in order.
    pub changes: Vec<StoredChange>,
    /// For bytes resources: the value of the latest change.
    pub blob: Option<Bytes>,
}

/// Which resource an append goes to, and the state its changes were made on.
///
/// An append is refused with [`StorageError::Behind`], storing nothing, when the resource
/// holds more than its changes were made on: another process appended meanwhile, or the
/// commit of a process killed a moment ago landed late. The writer then reads what it
/// lacks and makes its changes again, so a write always lands after every write that was
/// acknowledged before it (automerge would otherwise treat the two as concurrent and could
/// keep either).
// Short-lived and passed by value once per append; boxing the key would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Target {
    /// An existing resource whose log the changes were made on ends at `after`.
    Existing { id: ResourceId, after: Seq },
    /// A resource that does not exist yet; refused (`Behind`) if it does.
    Create {
        key: ResourceKey,
        kind: Kind,
        media_type: String,
    },
}

/// The result of an append: where the changes landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub resource: ResourceId,
    pub first_seq: Seq,
    pub last_seq: Seq,
}

/// A wake-up from another process sharing the store. It carries ids only: the changes
/// themselves are read from the tables, so a lost notice costs latency, never data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Changes up to `last_seq` were appended to `resource` (`created`: its first ones).
    Appended {
        resource: ResourceId,
        last_seq: Seq,
        created: bool,
    },
    /// The resource was deleted.
    Deleted { resource: ResourceId },
    /// Notices may have been missed (the listening connection was re-established):
    /// everything live should be checked.
    Resync,
}

/// A line of a namespace listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceSummary {
    pub path: ResourcePath,
    pub kind: Kind,
    pub media_type: String,
    pub head_seq: Seq,
}

/// A sealed segment as stored (see `plait_bridge::mirror`): opaque bytes here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSegment {
    /// Its place in its namespace's chain (1, 2, …).
    pub seq: Seq,
    /// The signed descriptor's bytes.
    pub descriptor: Bytes,
    pub ciphertext: Bytes,
}

/// How much of a stored ciphertext (a segment's, a snapshot's) a read brings back: its
/// first bytes, up to a count — none, a head (what a reader tells its age header from),
/// or all of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Take(i32);

impl Take {
    pub const NOTHING: Take = Take(0);
    /// All of it: a ciphertext is far below 2 GiB (a push carries at most 64 MiB).
    pub const ALL: Take = Take(i32::MAX);

    /// The first `n` bytes.
    pub fn head(n: usize) -> Take {
        Take(n.min(i32::MAX as usize) as i32)
    }

    /// The count, as the stores' `substr` takes it.
    pub fn bytes(self) -> i32 {
        self.0
    }
}

/// A namespace's mirror checkpoint as stored: opaque bytes here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCheckpoint {
    /// The last segment it supersedes.
    pub upto: Seq,
    /// The signed checkpoint's bytes.
    pub checkpoint: Bytes,
    /// The snapshot's ciphertext, as much as was asked for.
    pub snapshot: Bytes,
}

/// Why storage failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// The database cannot be reached or refused the work; the caller may retry later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The resource this append targets no longer exists.
    #[error("the resource was deleted")]
    Gone,
    /// The resource holds changes this append was not made on (see [`Target`]); nothing
    /// was stored.
    #[error("the resource changed meanwhile")]
    Behind,
    /// Stored data does not make sense.
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
    /// The database refused a statement for another reason.
    #[error("storage failed: {0}")]
    Failed(String),
}

/// A connection pool's figures (what deadpool tells).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    /// Connections it may open at most.
    pub max_size: usize,
    /// Connections open now (idle or in use).
    pub size: usize,
    /// Of those, idle ones.
    pub available: usize,
    /// Tasks waiting for a connection.
    pub waiting: usize,
}

/// Durable storage of resources and their change logs.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// `"postgres"` or `"embedded"`.
    fn backend(&self) -> &'static str;

    /// The resource with its latest snapshot and the changes after it; `None` if absent.
    async fn load(&self, key: &ResourceKey) -> Result<Option<LoadedResource>, StorageError>;

    /// Appends changes to one resource, durably, if it holds exactly what they were made
    /// on (see [`Target`]). Returns after commit.
    async fn append(&self, target: Target, changes: Vec<NewChange>) -> Result<Appended, StorageError>;

    /// Keeps every other writer, in any process, off one resource until the returned
    /// [`Hold`] appends or is dropped; `Gone` if it does not exist. For a writer refused
    /// as `Behind` (see [`Target`]): holding the resource, it reads what it lacks, makes
    /// its changes again and appends them, and nobody can get in between, so a busy
    /// resource cannot starve it. Readers are not held up.
    async fn hold(&self, id: ResourceId) -> Result<Box<dyn Hold>, StorageError>;

    /// Changes of a resource with `seq > after`, in order.
    async fn changes_after(&self, id: ResourceId, after: Seq) -> Result<Vec<StoredChange>, StorageError>;

    /// Stores a snapshot covering changes `..= upto` and drops those changes.
    async fn save_snapshot(&self, id: ResourceId, upto: Seq, data: Bytes) -> Result<(), StorageError>;

    /// Creates a resource whose content is one snapshot (covering seq 0, so its first
    /// change will be seq 1), in one transaction: a replica's first sync. `None` when the
    /// resource exists already; nothing is changed then.
    async fn create_from_snapshot(
        &self,
        key: &ResourceKey,
        kind: Kind,
        media_type: &str,
        data: Bytes,
    ) -> Result<Option<ResourceId>, StorageError> {
        let one = NewResource {
            key: key.clone(),
            kind,
            media_type: media_type.to_string(),
            first: First::Snapshot(data),
        };
        Ok(self.create(vec![one]).await?.pop().flatten())
    }

    /// Creates resources that do not exist yet, each with its first content, in one
    /// transaction (a mirror's restore starts many at once). For each, in order: its id,
    /// or `None` when it exists already; nothing of it is changed then. Of items with
    /// the same key, one is created. Other processes are told of those created.
    async fn create(&self, items: Vec<NewResource>) -> Result<Vec<Option<ResourceId>>, StorageError>;

    /// For bytes resources: drops changes before `keep_from` and values no change uses.
    async fn drop_changes_before(&self, id: ResourceId, keep_from: Seq) -> Result<(), StorageError>;

    /// Deletes a resource with all its changes; `false` if it did not exist.
    async fn delete(&self, key: &ResourceKey) -> Result<bool, StorageError>;

    /// Resources of a namespace whose path starts with `prefix`, after `after`, by path.
    async fn list(
        &self,
        namespace: &Namespace,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ResourceSummary>, StorageError>;

    /// Bytes a namespace occupies in storage (changes, values and snapshots of its
    /// resources; a value shared by several resources counts for each).
    async fn namespace_bytes(&self, namespace: &Namespace) -> Result<u64, StorageError>;

    /// The resource a row id belongs to (for notices about resources this process has
    /// not loaded yet).
    /// Bytes occupied by the resources `author` created (their `bytes`, history included).
    async fn author_bytes(&self, author: &Identity) -> Result<u64, StorageError>;

    async fn key_of(&self, id: ResourceId) -> Result<Option<ResourceKey>, StorageError>;

    /// Notices of what other processes sharing this store changed, for the one caller
    /// that takes them (the engine). `None` for a store only one process can open.
    fn take_notices(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Notice>> {
        None
    }

    /// Stores segment `seq` of `namespace`'s chain of sealed segments, durably, if the
    /// chain ends at `seq - 1` (0: it is empty; its end is its last segment or its
    /// checkpoint's `upto`, whichever is later); otherwise nothing is stored and the answer
    /// is [`StorageError::Behind`]. The caller has checked the segment.
    async fn put_segment(
        &self,
        namespace: &Namespace,
        seq: Seq,
        descriptor: Bytes,
        ciphertext: Bytes,
    ) -> Result<(), StorageError>;

    /// Segments of `namespace` with `from <= seq <= to`, in order, stopping before their
    /// bytes (descriptors and ciphertexts) pass `max_bytes` — but at least one.
    async fn segments(
        &self,
        namespace: &Namespace,
        from: Seq,
        to: Seq,
        max_bytes: u64,
    ) -> Result<Vec<StoredSegment>, StorageError>;

    /// At most `limit` segments of `namespace` with `seq >= from`, in order, with as much
    /// of their ciphertexts as `take` says: what a mirror lists and streams over HTTP
    /// (nothing), and the heads a reader tells its own segments by.
    async fn descriptors(
        &self,
        namespace: &Namespace,
        from: Seq,
        limit: usize,
        take: Take,
    ) -> Result<Vec<StoredSegment>, StorageError>;

    /// The last segment of `namespace`'s chain, without its ciphertext (empty).
    async fn last_segment(&self, namespace: &Namespace) -> Result<Option<StoredSegment>, StorageError>;

    /// Bytes the segments of `namespace` occupy (descriptors and ciphertexts), its
    /// checkpoint and snapshot included.
    async fn segment_bytes(&self, namespace: &Namespace) -> Result<u64, StorageError>;

    /// Bytes the segments of `namespace` after `after` occupy.
    async fn segment_bytes_after(&self, namespace: &Namespace, after: Seq) -> Result<u64, StorageError>;

    /// Stores `namespace`'s checkpoint superseding segments up to `upto`, in one
    /// transaction: the segments with `seq <= upto` are dropped and the checkpoint held
    /// before is replaced. Refused ([`StorageError::Behind`]) unless `upto` is past the
    /// checkpoint held. The chain then ends at `upto` or at its last segment, whichever is
    /// later (see [`Self::put_segment`]). The caller has checked the checkpoint.
    async fn put_checkpoint(
        &self,
        namespace: &Namespace,
        upto: Seq,
        checkpoint: Bytes,
        snapshot: Bytes,
    ) -> Result<(), StorageError>;

    /// `namespace`'s checkpoint, with as much of its snapshot as `take` says.
    async fn checkpoint(
        &self,
        namespace: &Namespace,
        take: Take,
    ) -> Result<Option<StoredCheckpoint>, StorageError>;

    /// Bytes all resources occupy (the sum of what [`Self::namespace_bytes`] counts, over
    /// every namespace): the storage size metrics publish. One scan of the resources'
    /// sizes, not of their changes.
    async fn stored_bytes(&self) -> Result<u64, StorageError>;

    /// The connection pool as it is now, for a store that has one (Postgres).
    fn pool_status(&self) -> Option<PoolStatus> {
        None
    }

    /// A small instance-wide setting (e.g. which identity owns this database).
    async fn get_setting(&self, name: &str) -> Result<Option<String>, StorageError>;
    async fn put_setting(&self, name: &str, value: &str) -> Result<(), StorageError>;
}

/// One resource held for one append (see [`Storage::hold`]).
#[async_trait]
pub trait Hold: Send {
    /// The resource held.
    fn resource(&self) -> ResourceId;
    /// Appends changes made on the resource as stored through `after`, durably, and
    /// lets other writers on. Dropping the hold instead lets them on with nothing stored.
    async fn append(self: Box<Self>, after: Seq, changes: Vec<NewChange>) -> Result<Appended, StorageError>;
}

/// Smallest string greater than every string that starts with `prefix` (for range scans),
/// or `None` when there is none.
pub(crate) fn prefix_upper_bound(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        if let Some(next) = char::from_u32(last as u32 + 1) {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// Group-commit limits shared by both backends.
#[derive(Debug, Clone, Copy)]
pub struct CommitLimits {
    /// Most changes folded into one transaction.
    pub max_changes: usize,
    /// Most bytes of change data folded into one transaction.
    pub max_bytes: usize,
}

impl Default for CommitLimits {
    fn default() -> Self {
        CommitLimits {
            max_changes: 2_000,
            max_bytes: 16 << 20,
        }
    }
}

/// Milliseconds since the Unix epoch, as the stores keep times.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(crate) fn kind_from_code(code: i16) -> Result<Kind, StorageError> {
    Kind::from_code(code).ok_or_else(|| StorageError::Corrupt(format!("unknown kind code {code}")))
}

pub(crate) fn key_from_row(namespace: &[u8], path: String) -> Result<ResourceKey, StorageError> {
    let ns = Identity::from_bytes(namespace).map_err(|e| StorageError::Corrupt(e.to_string()))?;
    let path = ResourcePath::new(path).map_err(|e| StorageError::Corrupt(e.to_string()))?;
    Ok(ResourceKey::new(ns, path))
}

pub(crate) fn identity_from_bytes(bytes: Option<Vec<u8>>) -> Result<Option<Identity>, StorageError> {
    bytes
        .map(|b| Identity::from_bytes(&b).map_err(|e| StorageError::Corrupt(e.to_string())))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::prefix_upper_bound;

    #[test]
    fn prefix_bounds() {
        assert_eq!(prefix_upper_bound("abc").as_deref(), Some("abd"));
        assert_eq!(prefix_upper_bound("a/").as_deref(), Some("a0"));
        assert_eq!(prefix_upper_bound(""), None);
    }
}
