//! A subscriber's view of one resource.
//!
//! Each subscriber remembers the version its client has. An event whose parents are that
//! version is passed on as is ([`Delivery::Shared`]: every such subscriber sends the same
//! bytes, encoded once). Otherwise — the client is elsewhere because of a merge, or because
//! it fell behind — the subscriber asks the resource's actor for one update from the
//! client's version to now ([`Delivery::Own`]).
//!
//! **Slow subscribers.** Events reach subscribers through a broadcast queue of
//! `subscriber_queue` entries shared by all of them; each subscriber holds only a cursor.
//! A subscriber that stops reading never blocks the writer or the others and costs no
//! memory beyond that queue: when it reads again and finds it was overtaken
//! (`Lagged`), it skips what it missed and sends one coalesced update (text: the patches
//! from its client's version to now; JSON and bytes: the current value). It is not cut off.
//!
//! **Echo suppression** (simpleton): a client that sent an edit has applied it and moved to
//! its own version (a simpleton client then refuses any update whose parents are not that
//! version). So when the event of a client's own edit reaches the subscriber with the same
//! `Peer`, the subscriber takes the client to be at that edit: it sends nothing if nothing
//! else happened concurrently, and otherwise the correction from the edit to the merge.
//! A subscriber that fell behind may lose the events of its client's edits: the resource's
//! actor remembers each peer's latest write, and an update made for a subscriber starts
//! from there when its client wrote since (a client that sent an edit before an update
//! reached it refuses the update).
//! A client's own writes made through another process are not recognised (their events
//! carry no origin), so a simpleton client should write where it subscribes.

use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use super::{Command, EngineError, Event, ResourceHandle, Writer};
use crate::model::Version;
use crate::update::{Update, UpdateBody};

/// What to send a subscriber next.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// An event every subscriber at its parents sends as is.
    Shared(Arc<Event>),
    /// An update made for this subscriber.
    Own(Update),
}

/// The version a subscriber's client has. Usually that of the last event the subscriber
/// passed on, held by the event every subscriber at its parents shares: passing an update
/// on costs each subscriber a reference count, not a copy of the version.
#[derive(Debug)]
enum ClientVersion {
    Own(Version),
    Event(Arc<Event>),
}

// Every idle subscription holds one: no bigger than the version it replaced.
const _: () = assert!(size_of::<ClientVersion>() == size_of::<Version>());

impl ClientVersion {
    fn get(&self) -> &Version {
        match self {
            ClientVersion::Own(v) => v,
            ClientVersion::Event(e) => &e.version,
        }
    }
}

/// An open subscription; dropping it unsubscribes.
pub struct Subscription {
    handle: Arc<ResourceHandle>,
    rx: tokio::sync::broadcast::Receiver<Arc<Event>>,
    /// The version the client has (the root when it has nothing or the resource is gone).
    version: ClientVersion,
    peer: Option<String>,
    /// Events up to this seq are already covered by an update sent.
    skip_through: u64,
    /// The client's own edits up to this seq are accounted for: the version sent from
    /// takes them into account (never below `skip_through`).
    own_seen: u64,
    /// An update from the client's version to now is owed, to be made at this moment.
    owed: Option<Instant>,
    /// The first update, until sent (boxed: a subscription lives long, this briefly).
    first: Option<Box<Update>>,
}

impl Subscription {
    /// The resource followed (its key, for whoever holds the subscription).
    pub fn resource(&self) -> Arc<ResourceHandle> {
        self.handle.clone()
    }

    pub(crate) async fn open(
        handle: Arc<ResourceHandle>,
        parents: Option<(Version, Writer)>,
        peer: Option<String>,
    ) -> Result<Subscription, EngineError> {
        // Subscribe before asking for the state, so no event falls between the two.
        let rx = handle.shared.events.subscribe();
        let (first, version, seq) = match parents {
            None => {
                let (state, seq) = handle.ask(Command::Snapshot).await?;
                let update = Update {
                    version: state.version.clone(),
                    parents: Version::root(),
                    body: if state.exists() {
                        UpdateBody::Snapshot(state.body.clone())
                    } else {
                        UpdateBody::Missing
                    },
                    media_type: state.media_type.clone(),
                    digest: state.exists().then(|| state.digest().to_string()),
                };
                (Some(Box::new(update)), state.version.clone(), seq)
            }
            Some((p, who)) => {
                let (update, seq) = handle
                    .ask(|r| Command::CatchUp {
                        from: p.clone(),
                        strict: true,
                        peer: None,
                        own_after: 0,
                        who,
                        reply: r,
                    })
                    .await?;
                let nothing_new =
                    update.version == p && matches!(&update.body, UpdateBody::Text(t) if t.is_empty());
                let version = update.version.clone();
                ((!nothing_new).then(|| Box::new(update)), version, seq)
            }
        };
        Ok(Subscription {
            handle,
            rx,
            version: ClientVersion::Own(version),
            peer,
            skip_through: seq,
            own_seen: seq,
            owed: None,
            first,
        })
    }

    /// The key of the resource.
    pub fn key(&self) -> &crate::model::ResourceKey {
        &self.handle.key
    }

    /// The next thing to send; `None` when the resource's actor is gone.
    ///
    /// Cancel-safe (callers race it with heartbeats): an update owed to the client is
    /// remembered in the subscription until it has been made.
    pub async fn next(&mut self) -> Option<Delivery> {
        if let Some(u) = self.first.take() {
            return Some(Delivery::Own(*u));
        }
        loop {
            if let Some(at) = self.owed {
                // Boxed, as is the catch-up: the future of `next` lives as long as the
                // subscription (every idle subscriber holds one), these paths rarely run.
                Box::pin(tokio::time::sleep_until(at)).await;
                let made = Box::pin(self.catch_up()).await?;
                self.owed = None;
                match made {
                    Some(u) => return Some(Delivery::Own(u)),
                    None => continue,
                }
            }
            let ev = match self.rx.recv().await {
                Ok(ev) => ev,
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(key = %self.handle.key, missed, "subscriber fell behind; sending one update");
                    self.owed = Some(Instant::now());
                    continue;
                }
                Err(RecvError::Closed) => return None,
            };
            let own = ev
                .origin
                .as_ref()
                .filter(|o| o.peer.is_some() && o.peer == self.peer);
            if let Some(o) = own {
                if ev.seq <= self.own_seen {
                    // An update sent since started from this edit or a later one.
                    continue;
                }
                self.own_seen = ev.seq;
                // The client moved to its own edit when it sent it, whatever it had been
                // sent before (updates it had not applied yet it now refuses, as their
                // parents are not its version). From there it needs nothing, or the
                // correction to the merge, a moment later (see `correction_delay`).
                let client_has = Version::one(o.write.clone());
                let nothing_else = ev.version == client_has && ev.seq > self.skip_through;
                self.version = ClientVersion::Own(client_has);
                if nothing_else {
                    continue;
                }
                if matches!(ev.body, UpdateBody::Text(_)) {
                    self.owed = Some(Instant::now() + self.handle.shared.correction_delay);
                    continue;
                }
            } else if ev.seq <= self.skip_through {
                continue;
            }
            match &ev.body {
                UpdateBody::Text(_) if *self.version.get() != ev.parents => {
                    self.owed = Some(Instant::now());
                }
                _ => {
                    self.version = ClientVersion::Event(ev.clone());
                    return Some(Delivery::Shared(ev));
                }
            }
        }
    }

    /// One update from the client's version to now; `None` inside means nothing to send.
    async fn catch_up(&mut self) -> Option<Option<Update>> {
        let from = self.version.get().clone();
        let (u, seq) = self
            .handle
            .ask(|r| Command::CatchUp {
                from,
                strict: false,
                peer: self.peer.clone(),
                own_after: self.own_seen,
                // A subscriber that fell behind did not ask for it: others' writes did.
                who: Writer::Internal,
                reply: r,
            })
            .await
            .ok()?;
        self.skip_through = seq;
        self.own_seen = seq;
        let empty = u.version == u.parents && matches!(&u.body, UpdateBody::Text(t) if t.is_empty());
        self.version = ClientVersion::Own(u.version.clone());
        Some((!empty).then_some(u))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use plait_bridge::Keypair;

    use super::Delivery;
    use crate::engine::{Engine, EngineConfig, Write, Writer};
    use crate::model::{ResourceKey, ResourcePath, Version, VersionId};
    use crate::storage::CommitLimits;
    use crate::storage::sqlite::SqliteStorage;
    use crate::update::{Patch, Range, UpdateBody, WriteBody};

    async fn next(sub: &mut super::Subscription) -> crate::update::Update {
        match tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("an update")
        {
            Some(Delivery::Own(u)) => u,
            other => panic!("expected an update made for the client, got {other:?}"),
        }
    }

    fn insert(at: usize, text: &str, version: &str, parents: &str, peer: &str) -> Write {
        Write {
            body: WriteBody::Patches(vec![Patch {
                range: Range::Text { start: at, end: at },
                content: Bytes::from(text.to_string()),
            }]),
            version: Some(VersionId::parse(version).unwrap()),
            parents: Some(Version::one(VersionId::parse(parents).unwrap())),
            peer: Some(peer.into()),
            author: None,
            digest: None,
            writer: Writer::Internal,
        }
    }

    /// "hello" at `base-4`; client `pa` subscribed there; then two concurrent edits on it:
    /// another peer's (`pw-1`, "W " at 0), then the client's own (`pa-1`, " A" at 5).
    async fn concurrent_edits(config: EngineConfig) -> (tempfile::TempDir, Engine, super::Subscription) {
        let dir = tempfile::tempdir().unwrap();
        let storage = SqliteStorage::open(&dir.path().join("s.db"), CommitLimits::default()).unwrap();
        let engine = Engine::new(Arc::new(storage), config);
        let key = ResourceKey::new(Keypair::generate().identity(), ResourcePath::new("/s").unwrap());
        let mut base = insert(0, "hello", "base-4", "x-0", "base");
        base.parents = Some(Version::root());
        engine.write(&key, base).await.unwrap();
        let base = Version::one(VersionId::parse("base-4").unwrap());
        let sub = engine
            .subscribe(&key, Some((base, super::Writer::Internal)), Some("pa".into()))
            .await
            .unwrap();
        engine
            .write(&key, insert(0, "W ", "pw-1", "base-4", "pw"))
            .await
            .unwrap();
        engine
            .write(&key, insert(5, " A", "pa-1", "base-4", "pa"))
            .await
            .unwrap();
        (dir, engine, sub)
    }

    /// A subscriber falls behind while its client and another peer edit concurrently: the
    /// events of its client's edit are lost to it, yet the update it then sends starts from
    /// that edit (where the client is), not from the version it last sent.
    #[tokio::test]
    async fn overtaken_subscriber_starts_from_its_clients_edit() {
        let (_dir, _engine, mut sub) = concurrent_edits(EngineConfig {
            subscriber_queue: 1,
            ..EngineConfig::default()
        })
        .await;

        let correction = next(&mut sub).await;
        assert_eq!(
            correction.parents,
            Version::one(VersionId::parse("pa-1").unwrap())
        );
        assert_eq!(correction.version.ids().len(), 2, "the merge of both edits");
        match correction.body {
            UpdateBody::Text(patches) => {
                assert_eq!(patches.len(), 1);
                assert_eq!((patches[0].start, patches[0].end), (0, 0));
                assert_eq!(patches[0].content, "W ");
            }
            other => panic!("expected a text patch, got {other:?}"),
        }
    }

    /// The correction to a client's own edit comes a moment later, and calling `next`
    /// again after giving up on it (as a heartbeat does) still gets it.
    #[tokio::test]
    async fn a_correction_waits_and_survives_a_cancelled_next() {
        let (_dir, _engine, mut sub) = concurrent_edits(EngineConfig {
            correction_delay: Duration::from_millis(1500),
            ..EngineConfig::default()
        })
        .await;

        // The other peer's edit, as it was made.
        match tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
        {
            Some(Delivery::Shared(ev)) => {
                assert_eq!(ev.version, Version::one(VersionId::parse("pw-1").unwrap()))
            }
            other => panic!("expected the other peer's edit, got {other:?}"),
        }
        let started = std::time::Instant::now();
        assert!(
            tokio::time::timeout(Duration::from_millis(100), sub.next())
                .await
                .is_err(),
            "the correction waits"
        );
        let correction = next(&mut sub).await;
        assert!(started.elapsed() >= Duration::from_millis(1500));
        assert_eq!(
            correction.parents,
            Version::one(VersionId::parse("pa-1").unwrap())
        );
        match correction.body {
            UpdateBody::Text(patches) => assert_eq!(patches[0].content, "W "),
            other => panic!("expected a text patch, got {other:?}"),
        }
    }

    /// A simpleton client as braid-text's: it applies an update only when the update's
    /// parents are its version, and moves to its own edit when it sends it.
    struct Client {
        peer: String,
        version: Version,
        text: Vec<char>,
        counter: i64,
        inbox: tokio::sync::mpsc::UnboundedReceiver<crate::update::Update>,
        /// Each permit lets the subscription produce one delivery; meanwhile events wait
        /// in the queue (and overtake the subscriber when it is small).
        permits: Arc<tokio::sync::Semaphore>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Client {
        async fn open(engine: &Engine, key: &ResourceKey, peer: &str) -> Client {
            let mut sub = engine.subscribe(key, None, Some(peer.into())).await.unwrap();
            let (tx, inbox) = tokio::sync::mpsc::unbounded_channel();
            let permits = Arc::new(tokio::sync::Semaphore::new(1));
            let gate = permits.clone();
            let task = tokio::spawn(async move {
                loop {
                    gate.acquire().await.unwrap().forget();
                    let Some(d) = sub.next().await else { return };
                    let u = match d {
                        Delivery::Shared(ev) => ev.update(),
                        Delivery::Own(u) => u,
                    };
                    if tx.send(u).is_err() {
                        return;
                    }
                }
            });
            Client {
                peer: peer.into(),
                version: Version::root(),
                text: Vec::new(),
                counter: -1,
                inbox,
                permits,
                task,
            }
        }

        fn apply(&mut self, u: crate::update::Update) {
            if u.parents != self.version {
                return;
            }
            match u.body {
                UpdateBody::Snapshot(b) => {
                    self.text = String::from_utf8(b.to_vec()).unwrap().chars().collect()
                }
                UpdateBody::Missing => self.text.clear(),
                UpdateBody::Text(ps) => {
                    let mut off = 0isize;
                    for p in ps {
                        let (a, b) = ((p.start as isize + off) as usize, (p.end as isize + off) as usize);
                        self.text.splice(a..b, p.content.chars());
                        off += p.content.chars().count() as isize - (p.end - p.start) as isize;
                    }
                }
            }
            self.version = u.version;
        }

        async fn edit(&mut self, engine: &Engine, key: &ResourceKey, at: usize, del: usize, ins: &str) {
            let at = at.min(self.text.len());
            let del = del.min(self.text.len() - at);
            let n = del + ins.chars().count();
            if n == 0 {
                return;
            }
            self.counter += n as i64;
            let id = VersionId::new(self.peer.clone(), self.counter as u64).unwrap();
            let w = Write {
                body: WriteBody::Patches(vec![Patch {
                    range: Range::Text {
                        start: at,
                        end: at + del,
                    },
                    content: Bytes::from(ins.to_string()),
                }]),
                version: Some(id.clone()),
                parents: Some(self.version.clone()),
                peer: Some(self.peer.clone()),
                author: None,
                digest: None,
                writer: Writer::Internal,
            };
            engine.write(key, w).await.unwrap();
            self.text.splice(at..at + del, ins.chars());
            self.version = Version::one(id);
        }

        /// Lets the subscription produce one delivery and applies it if it comes soon
        /// (otherwise it is applied at a later step); `false` if nothing came.
        async fn receive(&mut self) -> bool {
            if self.permits.available_permits() == 0 {
                self.permits.add_permits(1);
            }
            match tokio::time::timeout(Duration::from_millis(5), self.inbox.recv()).await {
                Ok(Some(u)) => {
                    self.apply(u);
                    true
                }
                _ => false,
            }
        }

        fn text(&self) -> String {
            self.text.iter().collect()
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

        /// Three simpleton clients edit one text concurrently, taking in updates at random
        /// moments (with a tiny subscriber queue, so some are caught up): each ends at the
        /// stored text and version, and a restart reads the same text.
        #[test]
        fn simpleton_clients_converge(
            steps in proptest::collection::vec((0usize..3, 0u8..4, 0usize..12, 0usize..3, "[a-zé]{0,3}"), 1..40),
            queue in 1usize..4,
            delay in 0u64..8,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("s.db");
            let key = ResourceKey::new(Keypair::generate().identity(), ResourcePath::new("/t").unwrap());
            let open = |path: &std::path::Path| {
                let storage = SqliteStorage::open(path, CommitLimits::default()).unwrap();
                Engine::new(Arc::new(storage), EngineConfig {
                    subscriber_queue: queue,
                    correction_delay: Duration::from_millis(delay),
                    ..EngineConfig::default()
                })
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let now = rt.block_on(async {
                let engine = open(&path);
                let mut base = insert(0, "hello", "base-4", "x-0", "base");
                base.parents = Some(Version::root());
                engine.write(&key, base).await.unwrap();
                let mut clients = Vec::new();
                for peer in ["pa", "pb", "pc"] {
                    clients.push(Client::open(&engine, &key, peer).await);
                }
                for (who, what, at, del, ins) in steps {
                    let c = &mut clients[who];
                    match what {
                        0 | 1 => c.edit(&engine, &key, at, del, &ins).await,
                        2 => {
                            c.receive().await;
                        }
                        _ => while c.receive().await {},
                    }
                }
                let state = engine.read(&key).await.unwrap();
                let want = String::from_utf8(state.body.to_vec()).unwrap();
                for c in &mut clients {
                    c.permits.add_permits(1 << 20);
                    while c.text() != want || c.version != state.version {
                        let u = tokio::time::timeout(Duration::from_secs(5), c.inbox.recv())
                            .await
                            .unwrap_or_else(|_| panic!("{} stuck at {:?} {:?}; stored {want:?} {:?}",
                                c.peer, c.text(), c.version, state.version))
                            .unwrap();
                        c.apply(u);
                    }
                    c.task.abort();
                }
                want
            });
            drop(rt);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let reread = rt.block_on(async {
                let state = open(&path).read(&key).await.unwrap();
                String::from_utf8(state.body.to_vec()).unwrap()
            });
            proptest::prop_assert_eq!(reread, now);
        }
    }
}
