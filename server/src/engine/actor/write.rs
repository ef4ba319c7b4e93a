//! Writes: a round's writes applied to the document together and committed in one
//! append (remade on the reloaded document, under a hold, when another process wrote
//! first); nothing is told to anyone before the append returns.

use super::*;

impl Actor {
    /// Applies writes and stores them in one append. When the store holds changes the
    /// document lacked (another process's, or the late commit of a killed predecessor),
    /// nothing was stored: the resource is held, reloaded, and the writes made again on
    /// it, so they land after everything acknowledged before them.
    pub(super) async fn write_batch(&mut self, mut writes: Vec<(Box<Write>, WriteReply)>) {
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

    /// After an append refused as `Behind`: holds the resource (`id`, or the one created
    /// meanwhile) and reloads it, so what is made on it next cannot be refused again.
    /// `None` when there is nothing to hold (it was deleted meanwhile).
    pub(super) async fn hold_and_reload(
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
    pub(super) async fn try_write_batch(
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
            let heavy = w.size() > HEAVY_DOCUMENT_BYTES;
            // Refused by the work budget or by the document: either way, nothing applied.
            let applied = metered_work(&self.limiter, &w.writer, heavy, || p.doc.apply(&dw, now / 1000))
                .and_then(|applied| applied.map_err(EngineError::from));
            match applied {
                Err(e) => {
                    if creating {
                        // Nothing was stored for a resource this write was to create.
                        self.res = Some(Res::Missing);
                        create = None;
                    }
                    let _ = reply.send(Err(e));
                }
                Ok(Outcome::Unchanged) => {
                    let v = p.doc.frontier();
                    replies.push((w, reply, v, false));
                }
                Ok(Outcome::Applied(mut a)) => {
                    let stored = stored_changes(&p.doc, &mut a, w.author, now);
                    big |= stored.len() > 1;
                    let media_type = stored
                        .last()
                        .and_then(|c| c.meta.clone())
                        .unwrap_or_else(|| p.media_type.clone());
                    changes.extend(stored);
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
                        committed: std::time::Instant::now(),
                    });
                }
            }
        }
        if changes.is_empty() {
            let kind = match &self.res {
                Some(Res::Present(p)) => p.kind,
                _ => Kind::Text,
            };
            for (_, reply, v, changed) in replies {
                let _ = reply.send(Ok(WriteResult {
                    version: v,
                    changed,
                    kind,
                }));
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
        let counted = super::Counted::of(&changes);
        match append(&self.storage, target, hold, changes).await {
            Ok(app) => {
                debug_assert_eq!(
                    app.first_seq,
                    p.known_through + 1,
                    "appended where the document ends"
                );
                p.id = Some(app.resource);
                p.known_through = app.last_seq;
                p.since_snapshot.add(counted);
                if big {
                    p.since_snapshot.force(self.config.snapshot_every);
                }
                let kind = p.kind;
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
                    let _ = reply.send(Ok(WriteResult {
                        version: v,
                        changed,
                        kind,
                    }));
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
}

/// The changes an applied write stores: a big text write's earlier changes, then its own
/// (after the last of them); for a bytes value, its media type with it and the value as
/// its blob. More than one means the write was committed as a run of changes: its
/// document is then saved as a snapshot at once, since automerge loads a snapshot in a
/// fraction of the time and memory that replaying the run takes.
pub(in crate::engine) fn stored_changes(
    doc: &Document,
    a: &mut crate::doc::Applied,
    author: Option<plait_bridge::Identity>,
    now: i64,
) -> Vec<NewChange> {
    let (meta, blob) = match (doc, &a.body) {
        (Document::Bytes(b), UpdateBody::Snapshot(body)) => {
            (b.current().map(|c| c.media_type.clone()), Some(body.clone()))
        }
        _ => (None, None),
    };
    let earlier = std::mem::take(&mut a.earlier);
    let parents = match earlier.last() {
        Some(e) => Version::one(e.id.clone()),
        None => a.parents.clone(),
    };
    let mut changes: Vec<NewChange> = earlier
        .into_iter()
        .map(|e| NewChange {
            version: e.id,
            parents: e.parents,
            author,
            at_ms: now,
            data: Bytes::from(e.change),
            meta: None,
            blob: None,
        })
        .collect();
    changes.push(NewChange {
        version: a.id.clone(),
        parents,
        author,
        at_ms: now,
        data: Bytes::from(std::mem::take(&mut a.change)),
        meta,
        blob,
    });
    changes
}

/// The kind and media type of a resource created by this write.
pub(in crate::engine) fn start_resource(body: &WriteBody) -> Result<(Kind, String), EngineError> {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::super::testing::{fixture, insert};
    use crate::engine::subscription::Delivery;
    use crate::engine::{Engine, EngineConfig};
    use crate::storage::Storage;

    /// Many writers on one document, so that writes pile up in its mailbox and are stored
    /// in rounds: a write is answered only once the store holds it, subscribers get every
    /// change once, in order, and a fresh engine loads what the live one shows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_answered_and_told_in_order_once_stored() {
        const WRITERS: usize = 48;
        const EACH: usize = 40;
        let config = EngineConfig {
            // No snapshot: every change stays in the log, where the test counts them.
            snapshot_every: usize::MAX,
            ..EngineConfig::default()
        };
        let f = fixture(config.clone());
        let (storage, engine, key) = (f.storage.clone(), f.engine.clone(), f.key.clone());
        engine.write(&key, insert("start")).await.unwrap();
        let mut sub = engine.subscribe(&key, None, None).await.unwrap();
        let mut version = match sub.next().await {
            Some(Delivery::Own(u)) => u.version,
            other => panic!("the first delivery is the state: {other:?}"),
        };

        let acked = Arc::new(AtomicUsize::new(0));
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let (engine, key, storage, acked) = (engine.clone(), key.clone(), storage.clone(), acked.clone());
            writers.push(tokio::spawn(async move {
                for i in 0..EACH {
                    let r = engine.write(&key, insert(&format!("<{w}.{i}>"))).await.unwrap();
                    assert!(r.changed);
                    let n = acked.fetch_add(1, Ordering::SeqCst) + 1;
                    if n % 40 == 0 {
                        // Every write answered so far is in the store (one change each,
                        // after the first).
                        let l = storage.load(&key).await.unwrap().unwrap();
                        assert!(l.changes.len() > n, "{n} answered, {} stored", l.changes.len());
                    }
                }
            }));
        }
        let mut told = 0;
        let mut last_seq = None;
        while told < WRITERS * EACH {
            let ev = match tokio::time::timeout(std::time::Duration::from_secs(30), sub.next()).await {
                Ok(Some(Delivery::Shared(ev))) => ev,
                other => panic!("after {told} events: {other:?}"),
            };
            assert_eq!(
                ev.parents, version,
                "each event starts where the one before ended"
            );
            if let Some(s) = last_seq {
                assert_eq!(ev.seq, s + 1, "events are numbered without gaps");
            }
            last_seq = Some(ev.seq);
            version = ev.version.clone();
            told += 1;
        }
        for w in writers {
            w.await.unwrap();
        }
        let text = engine.read(&key).await.unwrap();
        assert_eq!(
            text.version, version,
            "the last event reaches the state readers see"
        );
        let body = String::from_utf8(text.body.to_vec()).unwrap();
        for w in 0..WRITERS {
            for i in 0..EACH {
                assert!(body.contains(&format!("<{w}.{i}>")), "<{w}.{i}> is in the text");
            }
        }
        let stored = storage.load(&key).await.unwrap().unwrap();
        assert_eq!(stored.changes.len(), 1 + WRITERS * EACH);
        let fresh = Engine::new(storage.clone(), config);
        let loaded = fresh.read(&key).await.unwrap();
        assert_eq!(loaded.body, text.body);
        assert_eq!(loaded.version, version);
    }
}
