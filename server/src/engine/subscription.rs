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
//! A client's own writes made through another process are not recognised (their events
//! carry no origin), so a simpleton client should write where it subscribes.

use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;

use super::{Command, EngineError, Event, ResourceHandle};
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

/// An open subscription; dropping it unsubscribes.
pub struct Subscription {
    handle: Arc<ResourceHandle>,
    rx: tokio::sync::broadcast::Receiver<Arc<Event>>,
    /// The version the client has (the root when it has nothing or the resource is gone).
    version: Version,
    peer: Option<String>,
    /// Events up to this seq are already covered by an update sent.
    skip_through: u64,
    first: Option<Update>,
}

impl Subscription {
    pub(crate) async fn open(
        handle: Arc<ResourceHandle>,
        parents: Option<Version>,
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
                (Some(update), state.version.clone(), seq)
            }
            Some(p) => {
                let (update, seq) = handle
                    .ask(|r| Command::CatchUp {
                        from: p.clone(),
                        strict: true,
                        reply: r,
                    })
                    .await?;
                let nothing_new =
                    update.version == p && matches!(&update.body, UpdateBody::Text(t) if t.is_empty());
                let version = update.version.clone();
                ((!nothing_new).then_some(update), version, seq)
            }
        };
        Ok(Subscription {
            handle,
            rx,
            version,
            peer,
            skip_through: seq,
            first,
        })
    }

    /// The key of the resource.
    pub fn key(&self) -> &crate::model::ResourceKey {
        &self.handle.key
    }

    /// The next thing to send; `None` when the resource's actor is gone.
    pub async fn next(&mut self) -> Option<Delivery> {
        if let Some(u) = self.first.take() {
            return Some(Delivery::Own(u));
        }
        loop {
            let ev = match self.rx.recv().await {
                Ok(ev) => ev,
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(key = %self.handle.key, missed, "subscriber fell behind; sending one update");
                    match self.catch_up().await? {
                        Some(u) => return Some(Delivery::Own(u)),
                        None => continue,
                    }
                }
                Err(RecvError::Closed) => return None,
            };
            if ev.seq <= self.skip_through {
                continue;
            }
            if let Some(o) = &ev.origin
                && o.peer.is_some()
                && o.peer == self.peer
            {
                // The client moved to its own edit when it sent it, whatever it had been
                // sent before (updates it had not applied yet it now refuses, as their
                // parents are not its version). From there it needs nothing, or the
                // correction to the merge.
                let client_has = Version::one(o.write.clone());
                self.version = client_has.clone();
                if ev.version == client_has {
                    continue;
                }
            }
            match &ev.body {
                UpdateBody::Text(_) if self.version != ev.parents => match self.catch_up().await? {
                    Some(u) => return Some(Delivery::Own(u)),
                    None => continue,
                },
                _ => {
                    self.version = ev.version.clone();
                    return Some(Delivery::Shared(ev));
                }
            }
        }
    }

    /// One update from the client's version to now; `None` inside means nothing to send.
    async fn catch_up(&mut self) -> Option<Option<Update>> {
        let from = self.version.clone();
        let (u, seq) = self
            .handle
            .ask(|r| Command::CatchUp {
                from,
                strict: false,
                reply: r,
            })
            .await
            .ok()?;
        self.skip_through = seq;
        let empty = u.version == self.version && matches!(&u.body, UpdateBody::Text(t) if t.is_empty());
        self.version = u.version.clone();
        Some((!empty).then_some(u))
    }
}
