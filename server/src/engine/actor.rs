//! The actor that owns one resource's document.
//!
//! Invariants kept here:
//! * Nothing reaches readers, subscribers or the writer's reply before the storage append
//!   that holds it has returned (durable).
//! * Writes waiting in the mailbox are applied together and stored in one append.
//! * If an append fails, the in-memory document (which already holds the failed changes)
//!   is dropped and reloaded from storage before the next command.
//! * `known_through` is the seq the document ends at, and every append is made on it: when
//!   the store holds more (another process's changes), the append is refused, and the
//!   writes are made again on the reloaded document under a [`Hold`], so a write always
//!   lands after every write acknowledged before it.
//! * A snapshot never claims more than `known_through`, so compaction cannot lose another
//!   process's changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{
    Command, EngineConfig, EngineError, Event, Origin, ResourceHandle, Shared, State, Write, WriteResult,
};
use crate::braid::format_version;
use crate::doc::{BytesDoc, BytesValue, DocWrite, Document, Outcome};
use crate::model::{Kind, ResourceKey, Version, VersionId};
use crate::storage::{Hold, LoadedResource, NewChange, ResourceId, Seq, Storage, StorageError, Target};
use crate::update::{Update, UpdateBody, WriteBody};

/// Most commands taken from the mailbox in one round.
const MAX_ROUND: usize = 1024;

/// Most tries of a write (or an import) whose append keeps finding that other processes
/// appended first; past it the writer is told to try again later (503).
const MAX_REMAKES: usize = 8;

/// Document work on more than this many bytes (a large write, loading a long history) is
/// moved off the async workers, which other connections need.
const HEAVY_BYTES: u64 = 256 * 1024;

/// Runs `f`, telling the runtime first when it will hold the thread for long.
fn cpu_bound<T>(heavy: bool, f: impl FnOnce() -> T) -> T {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if heavy && multi_thread {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// What an actor starts with.
pub(crate) struct Setup {
    pub key: ResourceKey,
    pub storage: Arc<dyn Storage>,
    pub config: EngineConfig,
    pub shared: Arc<Shared>,
    pub rx: mpsc::Receiver<Command>,
    /// The engine's map of live resources by row id, and this actor's own handle (weak,
    /// so the actor never keeps itself alive) to put in it.
    pub by_id: Arc<Mutex<HashMap<ResourceId, Weak<ResourceHandle>>>>,
    pub me: Weak<ResourceHandle>,
}

pub(crate) fn spawn(s: Setup) {
    let actor = Actor {
        key: s.key,
        storage: s.storage,
        config: s.config,
        shared: s.shared,
        rx: s.rx,
        by_id: s.by_id,
        me: s.me,
        registered: None,
        res: None,
        event_seq: 0,
        peer_writes: lru::LruCache::new(PEER_WRITES.try_into().expect("non-zero")),
    };
    tokio::spawn(actor.run());
}

struct Actor {
    key: ResourceKey,
    storage: Arc<dyn Storage>,
    config: EngineConfig,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Command>,
    by_id: Arc<Mutex<HashMap<ResourceId, Weak<ResourceHandle>>>>,
    me: Weak<ResourceHandle>,
    /// The id under which this actor is in `by_id`.
    registered: Option<ResourceId>,
    /// `None` until loaded (or after a failure that requires a reload).
    res: Option<Res>,
    event_seq: u64,
    /// Each writing peer's latest write and its event: a subscriber that fell behind
    /// and lost the events of its own client's edits still starts that client's update
    /// from where the client is.
    peer_writes: lru::LruCache<String, (u64, VersionId)>,
}

/// Writing peers remembered per live resource. A peer forgotten here only matters while
/// its subscriber is behind by more than this many other peers' writes; it then gets an
/// update from an older version, which its client refuses until the next one.
const PEER_WRITES: usize = 1024;

impl Drop for Actor {
    fn drop(&mut self) {
        if let Some(id) = self.registered {
            let mut ids = self.by_id.lock().expect("ids");
            if ids.get(&id).is_some_and(|w| w.strong_count() == 0) {
                ids.remove(&id);
            }
        }
    }
}

enum Res {
    Missing,
    Present(Box<Present>),
}

struct Present {
    /// `None` until the first append creates the row.
    id: Option<ResourceId>,
    kind: Kind,
    media_type: String,
    doc: Document,
    known_through: Seq,
    since_snapshot: usize,
}

/// Past this many changes, an empty replica is sent the whole document, not the changes.
const SNAPSHOT_SYNC_AFTER: usize = 256;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

type WriteReply = oneshot::Sender<Result<WriteResult, EngineError>>;

impl Actor {
    async fn run(mut self) {
        while let Some(first) = self.rx.recv().await {
            let mut round = vec![first];
            while round.len() < MAX_ROUND {
                match self.rx.try_recv() {
                    Ok(c) => round.push(c),
                    Err(_) => break,
                }
            }
            self.handle(round).await;
        }
    }

    async fn handle(&mut self, round: Vec<Command>) {
        if self.res.is_none()
            && let Err(e) = self.load().await
        {
            for c in round {
                fail(c, e.clone());
            }
            return;
        }
        let mut cmds = round.into_iter().peekable();
        while let Some(cmd) = cmds.next() {
            match cmd {
                Command::Write(w, reply) => {
                    let mut writes = vec![(w, reply)];
                    while let Some(Command::Write(..)) = cmds.peek() {
                        if let Some(Command::Write(w, r)) = cmds.next() {
                            writes.push((w, r));
                        }
                    }
                    self.write_batch(writes).await;
                }
                Command::Delete(reply) => {
                    let r = self.delete().await;
                    let _ = reply.send(r);
                }
                Command::Read(reply) => {
                    let _ = reply.send(Ok(self.current()));
                }
                Command::ReadAt(v, reply) => {
                    let _ = reply.send(self.read_at(&v));
                }
                Command::Snapshot(reply) => {
                    let _ = reply.send(Ok((self.current(), self.event_seq)));
                }
                Command::CatchUp {
                    from,
                    strict,
                    peer,
                    own_after,
                    reply,
                } => {
                    let from = match peer.and_then(|p| self.peer_writes.peek(&p).cloned()) {
                        Some((seq, write)) if seq > own_after => Version::one(write),
                        _ => from,
                    };
                    let _ = reply.send(self.catch_up(&from, strict).map(|u| (u, self.event_seq)));
                }
                Command::History(from, reply) => {
                    let _ = reply.send(self.history(&from));
                }
                Command::Heads(reply) => {
                    let heads = match &mut self.res {
                        Some(Res::Present(p)) => p.doc.heads(),
                        _ => Vec::new(),
                    };
                    let _ = reply.send(Ok(heads));
                }
                Command::Export(have, reply) => {
                    let _ = reply.send(Ok(self.export(&have)));
                }
                Command::ImportSnapshot {
                    kind,
                    media_type,
                    snapshot,
                    reply,
                } => {
                    let r = self.import_snapshot(kind, media_type, snapshot).await;
                    let _ = reply.send(r);
                }
                Command::Import {
                    kind,
                    media_type,
                    changes,
                    reply,
                } => {
                    let r = self.import(kind, media_type, changes).await;
                    let _ = reply.send(r);
                }
                Command::Refresh => {
                    self.shared
                        .refresh_queued
                        .store(false, std::sync::atomic::Ordering::Release);
                    if let Err(e) = self.refresh().await {
                        tracing::warn!(key = %self.key, error = %e, "could not read another process's changes");
                    }
                }
            }
            if self.res.is_none() {
                // A failed append dropped the document: reload before the next command.
                let rest: Vec<Command> = cmds.collect();
                if !rest.is_empty() {
                    Box::pin(self.handle(rest)).await;
                }
                return;
            }
        }
    }

    fn current(&self) -> Arc<State> {
        self.shared
            .current
            .load()
            .as_ref()
            .clone()
            .unwrap_or_else(|| Arc::new(State::missing()))
    }

    /// (Re)loads the resource from storage. If readers had seen an earlier state, the
    /// difference is announced to subscribers.
    async fn load(&mut self) -> Result<(), EngineError> {
        let before = self.shared.current.load().as_ref().clone();
        let loaded = self.storage.load(&self.key).await?;
        let res = match loaded {
            None => Res::Missing,
            Some(l) => {
                let bytes = l.snapshot.as_ref().map_or(0, |s| s.1.len())
                    + l.changes.iter().map(|c| c.data.len()).sum::<usize>();
                Res::Present(Box::new(cpu_bound(bytes as u64 > HEAVY_BYTES, || build(l))?))
            }
        };
        self.res = Some(res);
        self.register();
        self.publish_state();
        if let Some(before) = before {
            self.announce_since(&before)?;
        }
        Ok(())
    }

    /// Puts this actor in the engine's map of live resources by id, once it has an id.
    fn register(&mut self) {
        if let Some(id) = self.present_id()
            && self.registered != Some(id)
        {
            self.by_id.lock().expect("ids").insert(id, self.me.clone());
            self.registered = Some(id);
        }
    }

    /// Reads what other processes appended (or reloads when that is not enough: a
    /// delete, a compaction past what this process holds, a bytes value) and announces it.
    async fn refresh(&mut self) -> Result<(), EngineError> {
        let before = self.current();
        let tail = match &mut self.res {
            Some(Res::Present(p)) if !matches!(p.doc, Document::Bytes(_)) => match p.id {
                Some(id) => {
                    let changes = self.storage.changes_after(id, p.known_through).await?;
                    match changes.first() {
                        Some(first) if first.seq == p.known_through + 1 => {
                            p.doc.apply_remote(changes.iter().map(|c| c.data.as_ref()))?;
                            p.known_through = changes.last().map_or(p.known_through, |c| c.seq);
                            p.since_snapshot += changes.len();
                            true
                        }
                        _ => false,
                    }
                }
                None => false,
            },
            _ => false,
        };
        if tail {
            self.publish_state();
            self.announce_since(&before)?;
            self.maybe_compact();
            Ok(())
        } else {
            self.load().await
        }
    }

    /// Sends subscribers one event from the state readers saw before to the current one.
    fn announce_since(&mut self, before: &State) -> Result<(), EngineError> {
        let now = self.current();
        if now.version == before.version && now.exists() == before.exists() {
            return Ok(());
        }
        let u = self.catch_up(&before.version, false)?;
        self.publish_event(Event {
            seq: 0,
            parents: if before.exists() {
                before.version.clone()
            } else {
                Version::root()
            },
            version: u.version,
            body: u.body,
            media_type: u.media_type,
            reaches: Some(self.current()),
            origin: None,
            wire: OnceLock::new(),
        });
        Ok(())
    }

    /// Renders the current state for readers.
    fn publish_state(&mut self) {
        let state = match &mut self.res {
            Some(Res::Present(p)) => {
                let body = p.doc.render();
                let media_type = match &p.doc {
                    Document::Bytes(b) => b
                        .current()
                        .map(|c| c.media_type.clone())
                        .unwrap_or_else(|| p.media_type.clone()),
                    _ => p.media_type.clone(),
                };
                State::new(Some(p.kind), media_type, p.doc.frontier(), body)
            }
            _ => State::missing(),
        };
        self.shared.current.store(Arc::new(Some(Arc::new(state))));
    }

    fn publish_event(&mut self, mut ev: Event) {
        self.event_seq += 1;
        ev.seq = self.event_seq;
        if let Some(o) = &ev.origin
            && let Some(peer) = &o.peer
        {
            self.peer_writes.put(peer.clone(), (ev.seq, o.write.clone()));
        }
        let _ = self.shared.events.send(Arc::new(ev));
    }

    /// Applies writes and stores them in one append. When the store holds changes the
    /// document lacked (another process's, or the late commit of a killed predecessor),
    /// nothing was stored: the resource is held, reloaded, and the writes made again on
    /// it, so they land after everything acknowledged before them.
    async fn write_batch(&mut self, mut writes: Vec<(Box<Write>, WriteReply)>) {
        let mut hold = None;
        for made in 1.. {
            let id = self.present_id();
            let Some(again) = self.try_write_batch(writes, hold.take()).await else {
                return;
            };
            writes = again;
            let held = if made == MAX_REMAKES {
                Err(EngineError::from(StorageError::Behind))
            } else {
                self.hold_and_reload(id).await
            };
            match held {
                Ok(h) => hold = h,
                Err(e) => {
                    for (_, reply) in writes {
                        let _ = reply.send(Err(e.clone()));
                    }
                    return;
                }
            }
        }
    }

    fn present_id(&self) -> Option<ResourceId> {
        match &self.res {
            Some(Res::Present(p)) => p.id,
            _ => None,
        }
    }

    /// After an append refused as `Behind`: holds the resource (`id`, or the one created
    /// meanwhile) and reloads it, so what is made on it next cannot be refused again.
    /// `None` when there is nothing to hold (it was deleted meanwhile).
    async fn hold_and_reload(
        &mut self,
        id: Option<ResourceId>,
    ) -> Result<Option<Box<dyn Hold>>, EngineError> {
        let id = match id {
            Some(id) => Some(id),
            None => {
                self.load().await?;
                self.present_id()
            }
        };
        let hold = match id {
            None => None,
            Some(id) => match self.storage.hold(id).await {
                Ok(h) => Some(h),
                Err(StorageError::Gone) => None,
                Err(e) => return Err(e.into()),
            },
        };
        self.load().await?;
        Ok(hold.filter(|h| self.present_id() == Some(h.resource())))
    }

    /// One try of [`Self::write_batch`]: the writes back when the append was `Behind`.
    async fn try_write_batch(
        &mut self,
        writes: Vec<(Box<Write>, WriteReply)>,
        hold: Option<Box<dyn Hold>>,
    ) -> Option<Vec<(Box<Write>, WriteReply)>> {
        let now = now_ms();
        let mut create: Option<Target> = None;
        let mut changes: Vec<NewChange> = Vec::new();
        // Whether a write was committed as a run of changes (a big text write).
        let mut big = false;
        let mut events: Vec<Event> = Vec::new();
        let mut replies: Vec<(Box<Write>, WriteReply, Version, bool)> = Vec::new();
        for (w, reply) in writes {
            if matches!(self.res, Some(Res::Missing)) {
                match start_resource(&w.body) {
                    Ok((kind, media_type)) => create = Some(self.begin_resource(kind, media_type)),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        continue;
                    }
                }
            }
            let Some(Res::Present(p)) = &mut self.res else {
                unreachable!("made present above")
            };
            let creating = p.id.is_none() && changes.is_empty();
            let dw = DocWrite {
                body: &w.body,
                version: w.version.as_ref(),
                parents: w.parents.as_ref(),
                agent_hint: w.peer.as_deref(),
                force: creating,
                digest: w.digest.as_ref(),
                // The server's own writes (rules, accounts, imports) are its to shape;
                // the limit guards against clients.
                max_json_depth: if w.writer == crate::engine::Writer::Internal {
                    crate::doc::json::MAX_JSON_DEPTH
                } else {
                    self.config.limits.max_json_depth
                },
            };
            let heavy = w.size() > HEAVY_BYTES;
            match cpu_bound(heavy, || p.doc.apply(&dw, now / 1000)) {
                Err(e) => {
                    if creating {
                        // Nothing was stored for a resource this write was to create.
                        self.res = Some(Res::Missing);
                        create = None;
                    }
                    let _ = reply.send(Err(e.into()));
                }
                Ok(Outcome::Unchanged) => {
                    let v = p.doc.frontier();
                    replies.push((w, reply, v, false));
                }
                Ok(Outcome::Applied(a)) => {
                    let (meta, blob) = match (&p.doc, &a.body) {
                        (Document::Bytes(b), UpdateBody::Snapshot(body)) => {
                            (b.current().map(|c| c.media_type.clone()), Some(body.clone()))
                        }
                        _ => (None, None),
                    };
                    let media_type = meta.clone().unwrap_or_else(|| p.media_type.clone());
                    // A big text write's earlier changes, then its own (after the last of them).
                    // Its document is saved as a snapshot at once: automerge loads a snapshot
                    // in a fraction of the time and memory that replaying the run takes.
                    big |= !a.earlier.is_empty();
                    let stored_parents = match a.earlier.last() {
                        Some(e) => Version::one(e.id.clone()),
                        None => a.parents.clone(),
                    };
                    for e in a.earlier {
                        changes.push(NewChange {
                            version: e.id.to_string(),
                            parents: format_version(&e.parents),
                            author: w.author,
                            at_ms: now,
                            data: Bytes::from(e.change),
                            meta: None,
                            blob: None,
                        });
                    }
                    changes.push(NewChange {
                        version: a.id.to_string(),
                        parents: format_version(&stored_parents),
                        author: w.author,
                        at_ms: now,
                        data: Bytes::from(a.change),
                        meta,
                        blob,
                    });
                    let peer = w.peer.clone();
                    replies.push((w, reply, a.event_version.clone(), true));
                    events.push(Event {
                        seq: 0,
                        parents: a.event_parents,
                        version: a.event_version,
                        body: a.body,
                        media_type,
                        reaches: None,
                        origin: Some(Origin {
                            peer,
                            write: a.id,
                            write_parents: a.parents,
                        }),
                        wire: OnceLock::new(),
                    });
                }
            }
        }
        if changes.is_empty() {
            for (_, reply, v, changed) in replies {
                let _ = reply.send(Ok(WriteResult { version: v, changed }));
            }
            return None;
        }
        let Some(Res::Present(p)) = &mut self.res else {
            unreachable!("changes imply a document")
        };
        let target = match (create, p.id) {
            (Some(t), _) => t,
            (None, Some(id)) => Target::Existing {
                id,
                after: p.known_through,
            },
            (None, None) => unreachable!("a new resource has a create target"),
        };
        let n = if big {
            self.config.snapshot_every.max(1)
        } else {
            changes.len()
        };
        match append(&self.storage, target, hold, changes).await {
            Ok(app) => {
                debug_assert_eq!(
                    app.first_seq,
                    p.known_through + 1,
                    "appended where the document ends"
                );
                p.id = Some(app.resource);
                p.known_through = app.last_seq;
                p.since_snapshot += n;
                let newly_known = self.registered != Some(app.resource);
                self.publish_state();
                let reached = self.current();
                let last = events.len() - 1;
                for (i, mut ev) in events.into_iter().enumerate() {
                    if i == last {
                        ev.reaches = Some(reached.clone());
                    }
                    self.publish_event(ev);
                }
                for (_, reply, v, changed) in replies {
                    let _ = reply.send(Ok(WriteResult { version: v, changed }));
                }
                if newly_known {
                    self.register();
                }
                self.maybe_compact();
                None
            }
            Err(StorageError::Behind) => {
                tracing::debug!(key = %self.key, after = p.known_through, "changes from another process; making the writes again");
                self.res = None;
                Some(replies.into_iter().map(|(w, reply, _, _)| (w, reply)).collect())
            }
            Err(e) => {
                tracing::warn!(key = %self.key, error = %e, "append failed; reloading the document");
                for (_, reply, _, _) in replies {
                    let _ = reply.send(Err(e.clone().into()));
                }
                self.res = None;
                None
            }
        }
    }

    fn export(&mut self, have: &[automerge::ChangeHash]) -> Option<super::Export> {
        let Some(Res::Present(p)) = &mut self.res else {
            return None;
        };
        // A replica that holds nothing of a long history gets the whole document.
        if have.is_empty() && p.kind != Kind::Bytes && p.doc.change_count() > SNAPSHOT_SYNC_AFTER {
            let heavy = p.doc.change_count() > 10_000;
            let snapshot = cpu_bound(heavy, || p.doc.save()).map(Bytes::from);
            if snapshot.is_some() {
                return Some(super::Export {
                    kind: p.kind,
                    media_type: p.media_type.clone(),
                    changes: Vec::new(),
                    snapshot,
                    heads: p.doc.heads(),
                });
            }
        }
        let changes = p
            .doc
            .export(have)
            .into_iter()
            .map(|c| Bytes::from(c.bytes))
            .collect();
        Some(super::Export {
            kind: p.kind,
            media_type: p.media_type.clone(),
            changes,
            snapshot: None,
            heads: p.doc.heads(),
        })
    }

    /// Starts an empty replica from its home's whole document, stored as one snapshot.
    async fn import_snapshot(
        &mut self,
        kind: Kind,
        media_type: String,
        snapshot: Bytes,
    ) -> Result<bool, EngineError> {
        if !matches!(self.res, Some(Res::Missing)) {
            return Ok(false);
        }
        if kind == Kind::Bytes {
            return Err(EngineError::Doc(crate::doc::DocError::Corrupt(
                "bytes resources have no automerge snapshot".into(),
            )));
        }
        let before = self.current();
        let heavy = snapshot.len() > 64 << 10;
        let doc = cpu_bound(heavy, || {
            Document::load_automerge(kind, Some(snapshot.as_ref()), std::iter::empty::<&[u8]>())
        })?;
        match self
            .storage
            .create_from_snapshot(&self.key, kind, &media_type, snapshot)
            .await?
        {
            // Created meanwhile (another process): reload, and take changes from there.
            None => {
                self.res = None;
                Ok(false)
            }
            Some(id) => {
                self.res = Some(Res::Present(Box::new(Present {
                    id: Some(id),
                    kind,
                    media_type,
                    doc,
                    known_through: 0,
                    since_snapshot: 0,
                })));
                self.register();
                self.publish_state();
                self.announce_since(&before)?;
                Ok(true)
            }
        }
    }

    /// Applies a peer's changes to this replica, stores the new ones, and announces them.
    /// When the store holds changes the document lacked, it is reloaded and the import
    /// made again (the changes are the home's own, so only what is still new is stored).
    async fn import(
        &mut self,
        kind: Kind,
        media_type: String,
        changes: Vec<Bytes>,
    ) -> Result<bool, EngineError> {
        let mut hold = None;
        for _ in 1..MAX_REMAKES {
            let id = self.present_id();
            match self
                .try_import(kind, media_type.clone(), &changes, hold.take())
                .await
            {
                Err(EngineError::Storage(StorageError::Behind)) => hold = self.hold_and_reload(id).await?,
                done => return done,
            }
        }
        self.try_import(kind, media_type, &changes, hold).await
    }

    async fn try_import(
        &mut self,
        kind: Kind,
        media_type: String,
        changes: &[Bytes],
        hold: Option<Box<dyn Hold>>,
    ) -> Result<bool, EngineError> {
        if kind == Kind::Bytes {
            return Err(EngineError::Doc(crate::doc::DocError::Corrupt(
                "bytes resources take no automerge changes".into(),
            )));
        }
        let before = self.current();
        let mut create = None;
        if matches!(self.res, Some(Res::Missing)) {
            create = Some(self.begin_resource(kind, media_type));
        }
        let Some(Res::Present(p)) = &mut self.res else {
            unreachable!("made present above")
        };
        if p.kind != kind {
            return Err(EngineError::Doc(crate::doc::DocError::Corrupt(format!(
                "the replica is {} but the home sends {}",
                p.kind.name(),
                kind.name()
            ))));
        }
        let heavy = changes.iter().map(Bytes::len).sum::<usize>() as u64 > HEAVY_BYTES;
        let fresh = match cpu_bound(heavy, || p.doc.import(changes.iter().map(|c| c.as_ref()))) {
            Ok(f) => f,
            Err(e) => {
                // The document may hold part of the batch: reload it from storage.
                self.res = None;
                return Err(e.into());
            }
        };
        if fresh.is_empty() {
            if create.is_some() {
                self.res = Some(Res::Missing);
            }
            return Ok(false);
        }
        let now = now_ms();
        let n = fresh.len();
        let new: Vec<NewChange> = fresh
            .into_iter()
            .map(|c| NewChange {
                version: c.version,
                parents: c.parents,
                author: None,
                at_ms: now,
                data: Bytes::from(c.bytes),
                meta: None,
                blob: None,
            })
            .collect();
        let target = match (create, p.id) {
            (Some(t), _) => t,
            (None, Some(id)) => Target::Existing {
                id,
                after: p.known_through,
            },
            (None, None) => unreachable!("a present resource without an id is being created"),
        };
        match append(&self.storage, target, hold, new).await {
            Ok(app) => {
                debug_assert_eq!(
                    app.first_seq,
                    p.known_through + 1,
                    "appended where the document ends"
                );
                p.id = Some(app.resource);
                p.known_through = app.last_seq;
                p.since_snapshot += n;
                self.register();
                self.publish_state();
                self.announce_since(&before)?;
                self.maybe_compact();
                Ok(true)
            }
            Err(e) => {
                self.res = None;
                Err(e.into())
            }
        }
    }

    /// Makes a missing resource present with an empty document, to be created in storage
    /// by the first append (the target returned).
    fn begin_resource(&mut self, kind: Kind, media_type: String) -> Target {
        let target = Target::Create {
            key: self.key.clone(),
            kind,
            media_type: media_type.clone(),
        };
        self.res = Some(Res::Present(Box::new(Present {
            id: None,
            kind,
            media_type,
            doc: Document::new(kind),
            known_through: 0,
            since_snapshot: 0,
        })));
        target
    }

    /// Snapshots the document in the background once enough changes have piled up.
    fn maybe_compact(&mut self) {
        let Some(Res::Present(p)) = &mut self.res else {
            return;
        };
        let Some(id) = p.id else { return };
        if p.since_snapshot < self.config.snapshot_every.max(1) {
            return;
        }
        p.since_snapshot = 0;
        let upto = p.known_through;
        let storage = self.storage.clone();
        let key = self.key.clone();
        match p.doc.save() {
            Some(bytes) => {
                tokio::spawn(async move {
                    if let Err(e) = storage.save_snapshot(id, upto, bytes.into()).await {
                        tracing::warn!(%key, error = %e, "snapshot failed");
                    }
                });
            }
            None => {
                tokio::spawn(async move {
                    if let Err(e) = storage.drop_changes_before(id, upto).await {
                        tracing::warn!(%key, error = %e, "compaction failed");
                    }
                });
            }
        }
    }

    async fn delete(&mut self) -> Result<bool, EngineError> {
        let existed = self.storage.delete(&self.key).await?;
        let parents = match &mut self.res {
            Some(Res::Present(p)) => p.doc.frontier(),
            _ => Version::root(),
        };
        let was_present = matches!(self.res, Some(Res::Present(_)));
        self.res = Some(Res::Missing);
        self.publish_state();
        if existed || was_present {
            self.publish_event(Event {
                seq: 0,
                parents,
                version: Version::root(),
                body: UpdateBody::Missing,
                media_type: String::new(),
                reaches: None,
                origin: None,
                wire: OnceLock::new(),
            });
        }
        Ok(existed)
    }

    fn read_at(&mut self, v: &Version) -> Result<(Bytes, Version), EngineError> {
        match &mut self.res {
            Some(Res::Present(p)) => {
                let body = p.doc.render_at(v)?;
                Ok((body, p.doc.frontier()))
            }
            _ if v.is_root() => Ok((Bytes::new(), Version::root())),
            _ => Err(crate::doc::DocError::UnknownVersion(v.ids().to_vec()).into()),
        }
    }

    fn catch_up(&mut self, from: &Version, strict: bool) -> Result<Update, EngineError> {
        let state = self.current();
        match &mut self.res {
            Some(Res::Present(p)) => {
                let version = p.doc.frontier();
                let (parents, body) = match p.doc.knows(from) {
                    Ok(()) => (from.clone(), p.doc.diff_from(from)?),
                    Err(e) if strict => return Err(e.into()),
                    // A version from before a delete, or never seen: start over.
                    Err(_) => (Version::root(), UpdateBody::Snapshot(state.body.clone())),
                };
                Ok(Update {
                    version,
                    parents,
                    body,
                    media_type: state.media_type.clone(),
                    digest: Some(state.digest().to_string()),
                })
            }
            _ if strict && !from.is_root() => {
                Err(crate::doc::DocError::UnknownVersion(from.ids().to_vec()).into())
            }
            _ => Ok(Update {
                version: Version::root(),
                parents: from.clone(),
                body: UpdateBody::Missing,
                media_type: state.media_type.clone(),
                digest: None,
            }),
        }
    }

    fn history(&mut self, from: &Version) -> Result<Vec<Update>, EngineError> {
        let media_type = self.current().media_type.clone();
        match &mut self.res {
            Some(Res::Present(p)) => Ok(p
                .doc
                .history_since(from)?
                .into_iter()
                .map(|(id, parents, body)| Update {
                    version: Version::one(id),
                    parents,
                    body,
                    media_type: media_type.clone(),
                    digest: None,
                })
                .collect()),
            _ if from.is_root() => Ok(Vec::new()),
            _ => Err(crate::doc::DocError::UnknownVersion(from.ids().to_vec()).into()),
        }
    }
}

/// The kind and media type of a resource created by this write.
fn start_resource(body: &WriteBody) -> Result<(Kind, String), EngineError> {
    match body {
        WriteBody::Full { media_type, .. } => {
            let kind = Kind::for_media_type(media_type.as_deref());
            let media_type = match (kind, media_type) {
                (Kind::Text, Some(m)) if m.trim().to_ascii_lowercase().starts_with("text/") => m.clone(),
                (Kind::Text, _) => kind.default_media_type().to_string(),
                (_, Some(m)) => m.clone(),
                (_, None) => kind.default_media_type().to_string(),
            };
            Ok((kind, media_type))
        }
        WriteBody::Patches(ps) => match ps.first().map(|p| &p.range) {
            Some(crate::update::Range::Text { .. }) => {
                Ok((Kind::Text, Kind::Text.default_media_type().into()))
            }
            Some(crate::update::Range::Json(_)) => Ok((Kind::Json, Kind::Json.default_media_type().into())),
            Some(crate::update::Range::Bytes { .. }) => Err(EngineError::CannotCreate(
                "there are no bytes to patch yet; PUT the whole value first".into(),
            )),
            None => Err(EngineError::CannotCreate(
                "an empty patch list cannot create a resource".into(),
            )),
        },
    }
}

/// Rebuilds a document from what storage holds.
fn build(l: LoadedResource) -> Result<Present, EngineError> {
    let known_through = l.row.head_seq;
    let doc = match l.row.kind {
        Kind::Bytes => {
            let ids = l.changes.iter().filter_map(|c| VersionId::parse(&c.version).ok());
            let current = match (l.changes.last(), l.blob) {
                (Some(c), Some(body)) => Some(BytesValue {
                    id: VersionId::parse(&c.version)
                        .map_err(|e| crate::doc::DocError::Corrupt(e.to_string()))?,
                    media_type: c.meta.clone().unwrap_or_else(|| l.row.media_type.clone()),
                    body,
                }),
                _ => None,
            };
            Document::Bytes(BytesDoc::load(current, ids))
        }
        kind => Document::load_automerge(
            kind,
            l.snapshot.as_ref().map(|(_, b)| b.as_ref()),
            l.changes.iter().map(|c| c.data.as_ref()),
        )?,
    };
    Ok(Present {
        id: Some(l.row.id),
        kind: l.row.kind,
        media_type: l.row.media_type,
        doc,
        known_through,
        since_snapshot: l.changes.len(),
    })
}

/// Appends through the hold when there is one for the target (see
/// [`Actor::hold_and_reload`]), otherwise through the group commit.
async fn append(
    storage: &Arc<dyn Storage>,
    target: Target,
    hold: Option<Box<dyn Hold>>,
    changes: Vec<NewChange>,
) -> Result<crate::storage::Appended, StorageError> {
    match (hold, &target) {
        (Some(h), Target::Existing { id, after }) if h.resource() == *id => h.append(*after, changes).await,
        (other, _) => {
            // A hold on anything else is let go first: the group commit would wait for it.
            drop(other);
            storage.append(target, changes).await
        }
    }
}

fn fail(c: Command, e: EngineError) {
    match c {
        Command::Write(_, r) => drop(r.send(Err(e))),
        Command::Delete(r) => drop(r.send(Err(e))),
        Command::Read(r) => drop(r.send(Err(e))),
        Command::ReadAt(_, r) => drop(r.send(Err(e))),
        Command::Snapshot(r) => drop(r.send(Err(e))),
        Command::CatchUp { reply, .. } => drop(reply.send(Err(e))),
        Command::History(_, r) => drop(r.send(Err(e))),
        Command::Heads(r) => drop(r.send(Err(e))),
        Command::Export(_, r) => drop(r.send(Err(e))),
        Command::Import { reply, .. } => drop(reply.send(Err(e))),
        Command::ImportSnapshot { reply, .. } => drop(reply.send(Err(e))),
        Command::Refresh => {}
    }
}
