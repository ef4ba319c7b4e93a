//! The actor that owns one resource's document: its mailbox, loading and life (this
//! file), and its jobs each in a file: [`write`] applies writes and commits them,
//! [`replica`] is what federation exports and imports, [`read`] answers for versions,
//! catch-ups and history.
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
    Command, EngineConfig, EngineError, Event, Origin, ResourceHandle, Shared, SnapshotLoad, State, Write,
    WriteResult,
};
use crate::cpu::{HEAVY_DOCUMENT_BYTES, document_work};
use crate::doc::{BytesDoc, BytesValue, DocWrite, Document, Outcome};
use crate::model::{Kind, ResourceKey, Version, VersionId};
use crate::storage::{
    Hold, LoadedResource, NewChange, ResourceId, Seq, Storage, StorageError, Target, now_ms,
};
use crate::update::{Update, UpdateBody, WriteBody};

mod compaction;
mod read;
mod replica;
mod write;

use compaction::{Counted, SinceSnapshot};
pub(super) use write::{start_resource, stored_changes};

/// Most commands taken from the mailbox in one round.
const MAX_ROUND: usize = 1024;

/// Most tries of a write (or an import) whose append keeps finding that other processes
/// appended first; past it the writer is told to try again later (503).
const MAX_REMAKES: usize = 8;

/// A history longer than this many stored changes makes reading past versions heavy work
/// too, whatever the document's size.
const HEAVY_HISTORY: Seq = 10_000;

/// Document work done for `who` (a write's, or a read of past versions): refused while
/// `who` owes more than the budget allows, run as [`document_work`], and charged to `who` by
/// the CPU time it took, read only when `who` is metered. Asked here, on the actor, and not
/// only before the request was queued: requests a client sent at once all passed that
/// check before the first of them was charged.
fn metered_work<T: Send>(
    limiter: &super::limits::Limiter,
    who: &super::Writer,
    heavy: bool,
    f: impl FnOnce() -> T + Send,
) -> Result<T, EngineError> {
    limiter.check_work(who)?;
    if !limiter.meters_work(who) {
        return Ok(document_work(heavy, f));
    }
    let (out, work) = document_work(heavy, || crate::cpu::timed(f));
    limiter.charge_work(who, work);
    Ok(out)
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
    /// The engine's write limits, charged for the document work each write took.
    pub limiter: Arc<super::limits::Limiter>,
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
        limiter: s.limiter,
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
    limiter: Arc<super::limits::Limiter>,
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
    since_snapshot: SinceSnapshot,
}

/// Past this many changes, an empty replica is sent the whole document, not the changes.
const SNAPSHOT_SYNC_AFTER: usize = 256;

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
                Command::ReadAt(v, who, reply) => {
                    let _ = reply.send(self.metered(&who, |a| a.read_at(&v)));
                }
                Command::Snapshot(reply) => {
                    let _ = reply.send(Ok((self.current(), self.event_seq)));
                }
                Command::CatchUp {
                    from,
                    strict,
                    peer,
                    own_after,
                    who,
                    reply,
                } => {
                    let from = match peer.and_then(|p| self.peer_writes.peek(&p).cloned()) {
                        Some((seq, write)) if seq > own_after => Version::one(write),
                        _ => from,
                    };
                    let caught_up = self.metered(&who, |a| a.catch_up(&from, strict));
                    let _ = reply.send(caught_up.map(|u| (u, self.event_seq)));
                }
                Command::History(from, who, reply) => {
                    let _ = reply.send(self.metered(&who, |a| a.history(&from)));
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
                    load,
                    reply,
                } => {
                    let r = self.import_snapshot(kind, media_type, snapshot, load).await;
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

    /// A read of past versions (`f`) as [`metered_work`]: heavy when the document is big
    /// or its history long.
    fn metered<T: Send>(
        &mut self,
        who: &super::Writer,
        f: impl FnOnce(&mut Actor) -> Result<T, EngineError> + Send,
    ) -> Result<T, EngineError> {
        let heavy = match &self.res {
            Some(Res::Present(p)) => {
                self.current().body.len() as u64 > HEAVY_DOCUMENT_BYTES || p.known_through > HEAVY_HISTORY
            }
            _ => false,
        };
        let limiter = self.limiter.clone();
        metered_work(&limiter, who, heavy, || f(self))?
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
                let bytes = l.snapshot.as_ref().map_or(0, |s| s.1.len()) + Counted::of(&l.changes).bytes;
                Res::Present(Box::new(document_work(
                    bytes as u64 > HEAVY_DOCUMENT_BYTES,
                    || build(l),
                )?))
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
                            p.since_snapshot.add(Counted::of(&changes));
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
    /// With no subscriber the event is not made: it would be dropped as it was sent, and
    /// making it is a diff of the document (a device restoring from a mirror spent a tenth
    /// of its time on these). Its number is still taken, as sending it would.
    fn announce_since(&mut self, before: &State) -> Result<(), EngineError> {
        let now = self.current();
        if now.version == before.version && now.exists() == before.exists() {
            return Ok(());
        }
        if self.shared.events.receiver_count() == 0 {
            self.event_seq += 1;
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
            committed: std::time::Instant::now(),
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
        ev.committed = std::time::Instant::now();
        if let Some(o) = &ev.origin
            && let Some(peer) = &o.peer
        {
            self.peer_writes.put(peer.clone(), (ev.seq, o.write.clone()));
        }
        let _ = self.shared.events.send(Arc::new(ev));
    }

    fn present_id(&self) -> Option<ResourceId> {
        match &self.res {
            Some(Res::Present(p)) => p.id,
            _ => None,
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
            since_snapshot: SinceSnapshot::default(),
        })));
        target
    }

    /// Snapshots the document in the background once enough changes have piled up.
    fn maybe_compact(&mut self) {
        let Some(Res::Present(p)) = &mut self.res else {
            return;
        };
        let Some(id) = p.id else { return };
        if !p.since_snapshot.due(self.config.snapshot_every) {
            return;
        }
        let upto = p.known_through;
        let storage = self.storage.clone();
        let key = self.key.clone();
        let snapshot = p.doc.save();
        p.since_snapshot.saved(snapshot.as_ref().map_or(0, Vec::len));
        match snapshot {
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
                committed: std::time::Instant::now(),
            });
        }
        Ok(existed)
    }
}

/// Rebuilds a document from what storage holds.
fn build(l: LoadedResource) -> Result<Present, EngineError> {
    let known_through = l.row.head_seq;
    let doc = match l.row.kind {
        Kind::Bytes => {
            let ids = l.changes.iter().map(|c| c.version.clone());
            let current = match (l.changes.last(), l.blob) {
                (Some(c), Some(body)) => Some(BytesValue {
                    id: c.version.clone(),
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
        since_snapshot: SinceSnapshot::loaded(
            l.snapshot.as_ref().map_or(0, |(_, b)| b.len()),
            Counted::of(&l.changes),
        ),
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
        Command::ReadAt(_, _, r) => drop(r.send(Err(e))),
        Command::Snapshot(r) => drop(r.send(Err(e))),
        Command::CatchUp { reply, .. } => drop(reply.send(Err(e))),
        Command::History(_, _, r) => drop(r.send(Err(e))),
        Command::Heads(r) => drop(r.send(Err(e))),
        Command::Export(_, r) => drop(r.send(Err(e))),
        Command::Import { reply, .. } => drop(reply.send(Err(e))),
        Command::ImportSnapshot { reply, .. } => drop(reply.send(Err(e))),
        Command::Refresh => {}
    }
}

/// What the engine's tests share: an engine on a fresh embedded store, a text edit, and a
/// text document saved whole.
#[cfg(test)]
pub(super) mod testing {
    use std::sync::Arc;

    use bytes::Bytes;
    use plait_bridge::Keypair;

    use crate::engine::{Engine, EngineConfig, Write};
    use crate::model::{ResourceKey, ResourcePath};
    use crate::storage::CommitLimits;
    use crate::storage::sqlite::SqliteStorage;
    use crate::update::{Patch, Range, WriteBody};

    /// An engine with `config` on a fresh embedded store, and a key of a new namespace.
    pub(in crate::engine) struct Fixture {
        pub storage: Arc<SqliteStorage>,
        pub engine: Engine,
        pub key: ResourceKey,
        _dir: tempfile::TempDir,
    }

    pub(in crate::engine) fn fixture(config: EngineConfig) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let storage =
            Arc::new(SqliteStorage::open(&dir.path().join("s.db"), CommitLimits::default()).unwrap());
        Fixture {
            engine: Engine::new(storage.clone(), config),
            storage,
            key: ResourceKey::new(Keypair::generate().identity(), ResourcePath::new("/hot").unwrap()),
            _dir: dir,
        }
    }

    /// An internal write inserting `text` at the start of a text document.
    pub(in crate::engine) fn insert(text: &str) -> Write {
        Write::internal(WriteBody::Patches(vec![Patch {
            range: Range::Text { start: 0, end: 0 },
            content: Bytes::from(text.to_string()),
        }]))
    }

    /// A text document holding `text`, saved whole, as a home (or an owner's sealer)
    /// sends it.
    pub(in crate::engine) async fn saved_text(text: &str) -> Bytes {
        use crate::storage::Storage;
        let home = fixture(EngineConfig::default());
        home.engine.write(&home.key, insert(text)).await.unwrap();
        let stored = home.storage.load(&home.key).await.unwrap().unwrap();
        let mut doc = crate::doc::Document::load_automerge(
            crate::model::Kind::Text,
            None,
            stored.changes.iter().map(|c| c.data.as_ref()),
        )
        .unwrap();
        Bytes::from(doc.save().unwrap())
    }
}
