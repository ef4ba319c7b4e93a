//! The engine: live resources, their writers, and the subscription hub.
//!
//! Each resource in use has one [`actor`] task that owns its [`Document`]. Writes are
//! messages to that actor, which applies every write waiting in its mailbox, stores the
//! resulting changes in one durable append (group commit), and only then answers the
//! writers, publishes the new state for readers and announces the changes to subscribers.
//! So nothing is visible before it is durable, and a hot document's writes are batched.
//!
//! Readers never wait for the actor: the current state of a loaded resource is an
//! [`arc_swap::ArcSwap`] they read without locking. Subscribers get [`Event`]s through a
//! bounded broadcast queue (see [`subscription`] for what happens when one falls behind).
//!
//! Resources not used recently are dropped from memory: the registry holds them weakly and a
//! small LRU keeps the warm ones alive. This module knows nothing of HTTP or of Braid bytes.
//!
//! [`Document`]: crate::doc::Document

mod actor;
mod create;
pub mod limits;
pub mod subscription;

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use arc_swap::ArcSwap;
use bytes::Bytes;
use lru::LruCache;
use plait_bridge::Identity;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::doc::DocError;
use crate::model::{Kind, Namespace, ResourceKey, Version, VersionId};
use crate::storage::{Notice, ResourceId, Storage, StorageError};
use crate::update::{Update, UpdateBody, WriteBody};

pub use create::Start;
pub use limits::{WriteLimits, Writer};
pub use subscription::{Delivery, Subscription};

/// Tunables of the engine (named settings; see `config`).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Events a subscriber may fall behind before it is caught up with one coalesced update.
    pub subscriber_queue: usize,
    /// Resources kept in memory while nobody uses them.
    pub warm_resources: usize,
    /// Changes after which a document is snapshotted and its log compacted (once their
    /// bytes also reach the last snapshot's size: see `actor::compaction`).
    pub snapshot_every: usize,
    /// Commands waiting for one resource before writers are made to wait.
    pub mailbox: usize,
    /// How long the correction to a writer's own edit waits (see `subscription`).
    pub correction_delay: std::time::Duration,
    /// Speed bumps on writes.
    pub limits: WriteLimits,
    /// The instance's identity, whose writes no identity quota limits.
    pub owner: Option<plait_bridge::Identity>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            subscriber_queue: 256,
            warm_resources: 1024,
            snapshot_every: 1000,
            mailbox: 4096,
            correction_delay: std::time::Duration::from_millis(25),
            limits: WriteLimits::default(),
            owner: None,
        }
    }
}

/// Why the engine could not do something.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Doc(#[from] DocError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A patch write to a resource that does not exist, in a unit that cannot start one.
    #[error("{0}")]
    CannotCreate(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The writer went over `limits.{limit}` (`writes_per_second` or
    /// `write_bytes_per_second`).
    #[error("over limits.{limit}; try again in {retry_after:?}")]
    RateLimited {
        retry_after: std::time::Duration,
        limit: &'static str,
    },
    /// One write larger than `limits.write_bytes_burst`: it could never pass.
    #[error("a write of {size} bytes; limits.write_bytes_burst is {limit}")]
    WriteTooLarge { size: u64, limit: u64 },
    /// The resources this writer created would go over `limits.max_stored_bytes_per_identity`.
    #[error(
        "the resources this identity created hold {used} bytes; limits.max_stored_bytes_per_identity is {limit}"
    )]
    IdentityQuotaExceeded { used: u64, limit: u64 },
    /// The namespace would go over `limits.max_stored_bytes_per_namespace`.
    #[error("the namespace holds {used} bytes; limits.max_stored_bytes_per_namespace is {limit}")]
    QuotaExceeded { used: u64, limit: u64 },
    /// The write carries more patches than `limits.max_patches_per_request`.
    #[error("{n} patches in one write; limits.max_patches_per_request is {limit}")]
    TooManyPatches { n: usize, limit: usize },
}

/// A write as the engine takes it.
#[derive(Debug, Clone)]
pub struct Write {
    pub body: WriteBody,
    pub version: Option<VersionId>,
    pub parents: Option<Version>,
    pub peer: Option<String>,
    pub author: Option<Identity>,
    /// SHA-256 the representation must have after this write (`Repr-Digest`).
    pub digest: Option<[u8; 32]>,
    /// Who is writing, for the rate limit.
    pub writer: Writer,
}

impl Write {
    /// A whole JSON value written by the server itself (accounts, sessions, the access
    /// rules, imports): no peer, no author, not rate-limited.
    pub fn internal_json(value: &serde_json::Value) -> Write {
        Write::internal_value(
            "application/json".into(),
            bytes::Bytes::from(serde_json::to_vec(value).expect("JSON serializes")),
        )
    }

    /// A whole value of `media_type` written by the server itself (a replica's bytes
    /// value, from a home instance, a mirror or a device): no peer, no author, not
    /// rate-limited.
    pub fn internal_value(media_type: String, body: bytes::Bytes) -> Write {
        Write::internal(WriteBody::Full {
            media_type: Some(media_type),
            body,
        })
    }

    /// `body` written by the server itself, unversioned: no peer, no author, not
    /// rate-limited.
    pub fn internal(body: WriteBody) -> Write {
        Write {
            body,
            version: None,
            parents: None,
            peer: None,
            author: None,
            digest: None,
            writer: Writer::Internal,
        }
    }

    /// Bytes the write brings (what the quota counts before storing).
    pub(crate) fn size(&self) -> u64 {
        match &self.body {
            WriteBody::Full { body, .. } => body.len() as u64,
            WriteBody::Patches(ps) => ps.iter().map(|p| p.content.len() as u64).sum(),
        }
    }
}

/// What a write did.
#[derive(Debug, Clone)]
pub struct WriteResult {
    /// The resource's version after the write.
    pub version: Version,
    /// False when the write changed nothing (a repeat, or no difference).
    pub changed: bool,
    /// The resource's kind.
    pub kind: Kind,
}

/// The state readers see: the current representation of a resource.
#[derive(Debug)]
pub struct State {
    /// `None` when the resource does not exist.
    pub kind: Option<Kind>,
    pub media_type: String,
    pub version: Version,
    pub body: Bytes,
    /// `sha-256=:<base64>:` of `body`, computed the first time someone asks.
    digest: OnceLock<String>,
}

impl State {
    pub(crate) fn new(kind: Option<Kind>, media_type: String, version: Version, body: Bytes) -> State {
        State {
            kind,
            media_type,
            version,
            body,
            digest: OnceLock::new(),
        }
    }

    pub(crate) fn missing() -> State {
        State::new(
            None,
            Kind::Text.default_media_type().to_string(),
            Version::root(),
            Bytes::new(),
        )
    }

    pub fn exists(&self) -> bool {
        self.kind.is_some()
    }

    /// `sha-256=:<base64>:` of the body.
    pub fn digest(&self) -> &str {
        self.digest.get_or_init(|| digest(&self.body))
    }
}

/// `sha-256=:<base64>:` (RFC 9530 `Repr-Digest`).
pub fn digest(body: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let h = sha2::Sha256::digest(body);
    format!(
        "sha-256=:{}:",
        base64::engine::general_purpose::STANDARD.encode(h)
    )
}

/// One step of a resource's history as subscribers see it.
#[derive(Debug)]
pub struct Event {
    /// Position in this resource's event stream (per process, from 1).
    pub seq: u64,
    /// Frontier before and after.
    pub parents: Version,
    pub version: Version,
    pub body: UpdateBody,
    pub media_type: String,
    /// The state this event reaches, when that was current (the last event of a batch):
    /// updates that reach the current version carry its digest.
    pub reaches: Option<Arc<State>>,
    /// The write that caused it, for echo suppression.
    pub origin: Option<Origin>,
    /// When the actor published it, which is after its changes were committed (for a
    /// change another process made, after this one read it): where delivery latency is
    /// measured from.
    pub committed: std::time::Instant,
    /// Cache of the Braid encoding, filled by the first subscriber that sends it; every
    /// subscriber at `parents` sends these same bytes.
    pub wire: OnceLock<Bytes>,
}

impl Event {
    pub fn update(&self) -> Update {
        Update {
            version: self.version.clone(),
            parents: self.parents.clone(),
            body: self.body.clone(),
            media_type: self.media_type.clone(),
            digest: self.reaches.as_ref().map(|s| s.digest().to_string()),
        }
    }
}

/// Who caused an event.
#[derive(Debug, Clone)]
pub struct Origin {
    pub peer: Option<String>,
    /// The id the write was stored under, and what it was based on.
    pub write: VersionId,
    pub write_parents: Version,
}

/// Commands to a resource's actor.
pub(crate) enum Command {
    Write(Box<Write>, oneshot::Sender<Result<WriteResult, EngineError>>),
    Delete(oneshot::Sender<Result<bool, EngineError>>),
    /// The current state (loading the resource first if needed).
    Read(oneshot::Sender<Result<Arc<State>, EngineError>>),
    /// The representation at a version, and the current version; its document work is
    /// charged to the reader.
    ReadAt(
        Version,
        Writer,
        oneshot::Sender<Result<(Bytes, Version), EngineError>>,
    ),
    /// The current state and the last event seq it includes.
    Snapshot(oneshot::Sender<Result<(Arc<State>, u64), EngineError>>),
    /// What takes a subscriber at `from` to now, and the last event seq that includes.
    /// With `strict`, an unknown `from` is an error; otherwise it gets the whole value.
    /// When `peer` wrote after event `own_after`, its client is at its latest write
    /// instead (it moved there when it sent it), and the update starts from that. Its
    /// document work is charged to `who`.
    CatchUp {
        from: Version,
        strict: bool,
        peer: Option<String>,
        own_after: u64,
        who: Writer,
        reply: oneshot::Sender<Result<(Update, u64), EngineError>>,
    },
    /// The changes after `from`, each as an update; its document work is charged to the
    /// reader.
    History(Version, Writer, oneshot::Sender<Result<Vec<Update>, EngineError>>),
    /// Another process changed the resource: read what is new and announce it.
    Refresh,
    /// The automerge heads (empty for a missing or bytes resource).
    Heads(oneshot::Sender<Result<Vec<automerge::ChangeHash>, EngineError>>),
    /// What a replica holding these heads lacks (federation).
    Export(
        Vec<automerge::ChangeHash>,
        oneshot::Sender<Result<Option<Export>, EngineError>>,
    ),
    /// A home's whole document for an empty replica: stored as its snapshot, announced;
    /// `false` if the replica is not empty (nothing done).
    ImportSnapshot {
        kind: Kind,
        media_type: String,
        snapshot: Bytes,
        load: SnapshotLoad,
        reply: oneshot::Sender<Result<bool, EngineError>>,
    },
    /// A peer's changes to a replica: applied, stored, announced; `true` if any were new.
    Import {
        kind: Kind,
        media_type: String,
        changes: Vec<Bytes>,
        reply: oneshot::Sender<Result<bool, EngineError>>,
    },
}

/// When an imported whole document is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotLoad {
    /// Now: a document that does not load is refused, and the replica stays empty. For
    /// a document from a peer's node (federation), which a reader is usually waiting for.
    Now,
    /// At its first use, as every stored document is after a restart, unless someone
    /// follows the resource already (then now, so that they get its state). For a
    /// mirror's restore: thousands of documents nobody reads yet, each the owner's own
    /// saved document in a segment whose signature and hash were checked.
    AtFirstUse,
}

/// What a replica lacks of a resource, from the resource's home.
#[derive(Debug, Clone)]
pub struct Export {
    pub kind: Kind,
    pub media_type: String,
    /// For text and JSON: the automerge changes, in causal order.
    pub changes: Vec<Bytes>,
    /// Instead of changes, for a replica that holds nothing of a long history: the whole
    /// document, compact (loading it is far cheaper than applying its changes one by one).
    pub snapshot: Option<Bytes>,
    /// The home's heads after them.
    pub heads: Vec<automerge::ChangeHash>,
}

/// What a live resource shares with readers and subscribers.
pub(crate) struct Shared {
    /// The current state, or `None` until the actor has loaded the resource.
    pub current: ArcSwap<Option<Arc<State>>>,
    pub events: broadcast::Sender<Arc<Event>>,
    /// A `Refresh` is queued; more notices about this resource need not queue another.
    pub refresh_queued: std::sync::atomic::AtomicBool,
    /// [`EngineConfig::correction_delay`].
    pub correction_delay: std::time::Duration,
}

/// A live resource: the way to its actor. Dropping the last handle stops the actor.
pub struct ResourceHandle {
    pub key: ResourceKey,
    mailbox: mpsc::Sender<Command>,
    pub(crate) shared: Arc<Shared>,
}

impl ResourceHandle {
    /// Asks the actor to read what other processes changed; at most one such request waits.
    fn refresh(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.shared.refresh_queued.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = self.mailbox.try_send(Command::Refresh) {
            let h = self.clone();
            tokio::spawn(async move {
                let _ = h.mailbox.send(Command::Refresh).await;
            });
        }
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, EngineError>>) -> Command,
    ) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.mailbox
            .send(make(tx))
            .await
            .map_err(|_| EngineError::ShuttingDown)?;
        rx.await.map_err(|_| EngineError::ShuttingDown)?
    }
}

/// The engine: a handle to every live resource. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    storage: Arc<dyn Storage>,
    config: EngineConfig,
    registry: Mutex<HashMap<ResourceKey, Weak<ResourceHandle>>>,
    warm: Mutex<LruCache<ResourceKey, Arc<ResourceHandle>>>,
    limiter: Arc<limits::Limiter>,
    /// Live resources by row id, for notices from other processes (actors add themselves
    /// once they know their id).
    by_id: Arc<Mutex<HashMap<ResourceId, Weak<ResourceHandle>>>>,
    /// Writes acknowledged since start, by kind (text, JSON, bytes), for metrics.
    writes: [std::sync::atomic::AtomicU64; 3],
}

impl Engine {
    /// An engine over `storage`. Must be called inside a tokio runtime: when other
    /// processes share the store, a task follows their notices.
    pub fn new(storage: Arc<dyn Storage>, config: EngineConfig) -> Engine {
        let cap = NonZeroUsize::new(config.warm_resources.max(1)).expect("non-zero");
        let notices = storage.take_notices();
        let engine = Engine {
            inner: Arc::new(Inner {
                storage,
                registry: Mutex::new(HashMap::new()),
                warm: Mutex::new(LruCache::new(cap)),
                limiter: Arc::new(limits::Limiter::new(config.limits, config.owner)),
                by_id: Arc::new(Mutex::new(HashMap::new())),
                writes: Default::default(),
                config,
            }),
        };
        let weak = Arc::downgrade(&engine.inner);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                every.tick().await;
                match weak.upgrade() {
                    Some(inner) => inner.limiter.prune(),
                    None => return,
                }
            }
        });
        if let Some(rx) = notices {
            tokio::spawn(follow(Arc::downgrade(&engine.inner), rx));
        }
        engine
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.inner.storage
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The live handle for a resource, starting its actor if needed.
    pub fn resource(&self, key: &ResourceKey) -> Arc<ResourceHandle> {
        let mut registry = self.inner.registry.lock().expect("registry");
        let handle = match registry.get(key).and_then(Weak::upgrade) {
            Some(h) => h,
            None => {
                let (tx, rx) = mpsc::channel(self.inner.config.mailbox.max(1));
                let (events, _) = broadcast::channel(self.inner.config.subscriber_queue.max(1));
                let shared = Arc::new(Shared {
                    current: ArcSwap::from_pointee(None),
                    events,
                    refresh_queued: Default::default(),
                    correction_delay: self.inner.config.correction_delay,
                });
                let h = Arc::new(ResourceHandle {
                    key: key.clone(),
                    mailbox: tx,
                    shared: shared.clone(),
                });
                actor::spawn(actor::Setup {
                    key: key.clone(),
                    storage: self.inner.storage.clone(),
                    config: self.inner.config.clone(),
                    shared,
                    rx,
                    by_id: self.inner.by_id.clone(),
                    me: Arc::downgrade(&h),
                    limiter: self.inner.limiter.clone(),
                });
                if registry.len() > 4 * self.inner.config.warm_resources + 1024 {
                    registry.retain(|_, w| w.strong_count() > 0);
                }
                registry.insert(key.clone(), Arc::downgrade(&h));
                h
            }
        };
        drop(registry);
        self.inner
            .warm
            .lock()
            .expect("warm")
            .put(key.clone(), handle.clone());
        handle
    }

    /// The current state of a resource.
    pub async fn read(&self, key: &ResourceKey) -> Result<Arc<State>, EngineError> {
        let h = self.resource(key);
        if let Some(state) = h.shared.current.load().as_ref() {
            return Ok(state.clone());
        }
        h.ask(Command::Read).await
    }

    /// The representation at `version` and the current version. Reading a past version
    /// is document work, limited per reader `who` as writes are (`limits::Limiter::check_work`).
    pub async fn read_at(
        &self,
        key: &ResourceKey,
        version: Version,
        who: Writer,
    ) -> Result<(Bytes, Version), EngineError> {
        self.inner.limiter.check_work(&who)?;
        self.resource(key).ask(|r| Command::ReadAt(version, who, r)).await
    }

    /// The updates after `from`, one per change; document work limited per reader `who`.
    pub async fn history(
        &self,
        key: &ResourceKey,
        from: Version,
        who: Writer,
    ) -> Result<Vec<Update>, EngineError> {
        self.inner.limiter.check_work(&who)?;
        self.resource(key).ask(|r| Command::History(from, who, r)).await
    }

    /// Applies a write; returns after it is durable. Writes over a limit are refused
    /// before anything is done.
    pub async fn write(&self, key: &ResourceKey, write: Write) -> Result<WriteResult, EngineError> {
        let limiter = &self.inner.limiter;
        limiter.check_patches(&write.body)?;
        let size = write.size();
        limiter.check_rate(&write.writer, size)?;
        if write.writer != Writer::Internal {
            let storage = self.inner.storage.as_ref();
            limiter.check_quota(storage, &key.namespace, size).await?;
            limiter.check_identity_quota(storage, &write.writer, size).await?;
        }
        let writer = write.writer;
        let result = self
            .resource(key)
            .ask(|r| Command::Write(Box::new(write), r))
            .await?;
        if result.changed {
            limiter.count(&key.namespace, &writer, size);
        }
        self.inner.writes[kind_index(result.kind)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(result)
    }

    /// Federation, at the resource's home: the changes a replica holding `have` lacks;
    /// `None` when the resource does not exist.
    pub async fn export(
        &self,
        key: &ResourceKey,
        have: Vec<automerge::ChangeHash>,
    ) -> Result<Option<Export>, EngineError> {
        self.resource(key).ask(|r| Command::Export(have, r)).await
    }

    /// The resource's automerge heads: what a replica holds.
    pub async fn heads(&self, key: &ResourceKey) -> Result<Vec<automerge::ChangeHash>, EngineError> {
        self.resource(key).ask(Command::Heads).await
    }

    /// Federation, at a replica: applies and stores the home's changes and tells
    /// subscribers, as for any write. `true` if anything was new.
    pub async fn import(
        &self,
        key: &ResourceKey,
        kind: Kind,
        media_type: String,
        changes: Vec<Bytes>,
    ) -> Result<bool, EngineError> {
        self.resource(key)
            .ask(|reply| Command::Import {
                kind,
                media_type,
                changes,
                reply,
            })
            .await
    }

    /// At an empty replica (federation, a mirror's restore): takes the home's whole
    /// document as its start, loaded as `load` says. `false` when the replica already
    /// holds something (then changes are the way).
    pub async fn import_snapshot(
        &self,
        key: &ResourceKey,
        kind: Kind,
        media_type: String,
        snapshot: Bytes,
        load: SnapshotLoad,
    ) -> Result<bool, EngineError> {
        self.resource(key)
            .ask(|reply| Command::ImportSnapshot {
                kind,
                media_type,
                snapshot,
                load,
                reply,
            })
            .await
    }

    /// The write limits in force.
    pub fn write_limits(&self) -> WriteLimits {
        self.inner.limiter.limits()
    }

    /// Deletes a resource; `false` if it did not exist.
    pub async fn delete(&self, key: &ResourceKey, writer: &Writer) -> Result<bool, EngineError> {
        // A delete counts against its writer's rate like any write.
        self.inner.limiter.check_rate(writer, 0)?;
        self.resource(key).ask(Command::Delete).await
    }

    /// Subscribes to a resource. With `parents`, the first update takes the client from
    /// there; without, it is the whole current state. `peer` enables echo suppression.
    /// Follows a resource from its current state, or from `parents`: the client's version,
    /// and who is charged for the document work of catching up from it (limited per
    /// subscriber as writes are per writer).
    pub async fn subscribe(
        &self,
        key: &ResourceKey,
        parents: Option<(Version, Writer)>,
        peer: Option<String>,
    ) -> Result<Subscription, EngineError> {
        if let Some((_, who)) = &parents {
            self.inner.limiter.check_work(who)?;
        }
        Subscription::open(self.resource(key), parents, peer).await
    }

    /// The live handle for a resource if it is in memory.
    fn live(&self, key: &ResourceKey) -> Option<Arc<ResourceHandle>> {
        self.inner
            .registry
            .lock()
            .expect("registry")
            .get(key)
            .and_then(Weak::upgrade)
    }

    /// Open subscriptions, over all resources in memory (for status).
    pub fn subscriptions(&self) -> usize {
        self.subscriptions_outside(None)
    }

    /// Open subscriptions to resources outside namespace `except` (the server's own
    /// followers of its internal state are not clients').
    pub fn subscriptions_outside(&self, except: Option<Namespace>) -> usize {
        let live: Vec<_> = self
            .inner
            .registry
            .lock()
            .expect("registry")
            .iter()
            .filter(|(k, _)| Some(k.namespace) != except)
            .filter_map(|(_, h)| h.upgrade())
            .collect();
        live.iter().map(|h| h.shared.events.receiver_count()).sum()
    }

    /// The resources in memory outside namespace `except`, each with its open
    /// subscriptions, most subscribed first (for the owner's dashboard).
    pub fn resources_outside(&self, except: Option<Namespace>) -> Vec<(ResourceKey, usize)> {
        let live: Vec<_> = self
            .inner
            .registry
            .lock()
            .expect("registry")
            .iter()
            .filter(|(k, _)| Some(k.namespace) != except)
            .filter_map(|(k, h)| Some((k.clone(), h.upgrade()?)))
            .collect();
        let mut out: Vec<_> = live
            .into_iter()
            .map(|(k, h)| (k, h.shared.events.receiver_count()))
            .collect();
        out.sort_by(|a, b| {
            b.1.cmp(&a.1)
                .then_with(|| a.0.path.as_str().cmp(b.0.path.as_str()))
        });
        out
    }

    /// Writes acknowledged since start (durable, or changing nothing), by kind; the
    /// server's own writes (accounts, sessions, rules, imports) included.
    pub fn writes_acknowledged(&self) -> [(Kind, u64); 3] {
        use std::sync::atomic::Ordering::Relaxed;
        [Kind::Text, Kind::Json, Kind::Bytes].map(|k| (k, self.inner.writes[kind_index(k)].load(Relaxed)))
    }

    /// Resources currently in memory (for status).
    pub fn live_resources(&self) -> usize {
        self.inner
            .registry
            .lock()
            .expect("registry")
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::Text => 0,
        Kind::Json => 1,
        Kind::Bytes => 2,
    }
}

/// Routes other processes' notices to the live resources they concern.
async fn follow(engine: Weak<Inner>, mut rx: mpsc::UnboundedReceiver<Notice>) {
    while let Some(notice) = rx.recv().await {
        let Some(inner) = engine.upgrade() else { return };
        let engine = Engine { inner };
        let by_id = |id: ResourceId| {
            engine
                .inner
                .by_id
                .lock()
                .expect("ids")
                .get(&id)
                .and_then(Weak::upgrade)
        };
        match notice {
            Notice::Appended {
                resource, created, ..
            } => match by_id(resource) {
                Some(h) => h.refresh(),
                // A resource another process just created may be one waited for here.
                None if created => {
                    if let Ok(Some(key)) = engine.inner.storage.key_of(resource).await
                        && let Some(h) = engine.live(&key)
                    {
                        h.refresh();
                    }
                }
                None => {}
            },
            Notice::Deleted { resource } => {
                if let Some(h) = by_id(resource) {
                    h.refresh();
                }
            }
            Notice::Resync => {
                let live: Vec<_> = engine
                    .inner
                    .registry
                    .lock()
                    .expect("registry")
                    .values()
                    .filter_map(Weak::upgrade)
                    .collect();
                tracing::info!(
                    resources = live.len(),
                    "notices may have been missed; checking live resources"
                );
                for h in live {
                    h.refresh();
                }
            }
        }
    }
}
