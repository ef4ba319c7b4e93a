//! Federation's side of a resource: the changes (or a snapshot) a replica lacks, and
//! changes or a snapshot imported from a resource's home.

use super::*;

impl Actor {
    pub(super) fn export(&mut self, have: &[automerge::ChangeHash]) -> Option<crate::engine::Export> {
        let Some(Res::Present(p)) = &mut self.res else {
            return None;
        };
        // A replica that holds nothing of a long history gets the whole document.
        if have.is_empty() && p.kind != Kind::Bytes && p.doc.change_count() > SNAPSHOT_SYNC_AFTER {
            let heavy = p.doc.change_count() > 10_000;
            let snapshot = document_work(heavy, || p.doc.save()).map(Bytes::from);
            if snapshot.is_some() {
                return Some(crate::engine::Export {
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
        Some(crate::engine::Export {
            kind: p.kind,
            media_type: p.media_type.clone(),
            changes,
            snapshot: None,
            heads: p.doc.heads(),
        })
    }

    /// Starts an empty replica from its home's whole document, stored as one snapshot.
    /// Loaded now, or (`SnapshotLoad::AtFirstUse`, when nobody follows the resource)
    /// stored only and loaded by the next command, as after a restart.
    pub(super) async fn import_snapshot(
        &mut self,
        kind: Kind,
        media_type: String,
        snapshot: Bytes,
        load: SnapshotLoad,
    ) -> Result<bool, EngineError> {
        if !matches!(self.res, Some(Res::Missing)) {
            return Ok(false);
        }
        if kind == Kind::Bytes {
            return Err(EngineError::Doc(crate::doc::DocError::Corrupt(
                "bytes resources have no automerge snapshot".into(),
            )));
        }
        if load == SnapshotLoad::AtFirstUse && self.shared.events.receiver_count() == 0 {
            let created = self
                .storage
                .create_from_snapshot(&self.key, kind, &media_type, snapshot)
                .await?;
            // Either way the store now holds the resource: the next command loads it
            // (readers of the shared state ask for it, as for a resource not loaded yet).
            self.res = None;
            self.shared.current.store(Arc::new(None));
            return Ok(created.is_some());
        }
        let before = self.current();
        let snapshot_bytes = snapshot.len();
        let heavy = snapshot_bytes > 64 << 10;
        let doc = document_work(heavy, || {
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
                    since_snapshot: super::SinceSnapshot::loaded(snapshot_bytes, super::Counted::default()),
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
    pub(super) async fn import(
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

    pub(super) async fn try_import(
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
        let heavy = changes.iter().map(Bytes::len).sum::<usize>() as u64 > HEAVY_DOCUMENT_BYTES;
        let fresh = match document_work(heavy, || p.doc.import(changes.iter().map(|c| c.as_ref()))) {
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
        let counted = super::Counted::of(&new);
        match append(&self.storage, target, hold, new).await {
            Ok(app) => {
                debug_assert_eq!(
                    app.first_seq,
                    p.known_through + 1,
                    "appended where the document ends"
                );
                p.id = Some(app.resource);
                p.known_through = app.last_seq;
                p.since_snapshot.add(counted);
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
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::testing::{Fixture, fixture, saved_text};
    use crate::engine::subscription::Delivery;
    use crate::engine::{EngineConfig, EngineError, SnapshotLoad};
    use crate::model::Kind;
    use crate::storage::Storage;

    /// `f`'s resource takes `snapshot` as a text document.
    async fn import(f: &Fixture, snapshot: Bytes, load: SnapshotLoad) -> Result<bool, EngineError> {
        f.engine
            .import_snapshot(&f.key, Kind::Text, "text/plain".into(), snapshot, load)
            .await
    }

    /// Taken at first use: the snapshot is stored as it came, the document is not loaded
    /// until a read asks for it, and that read gets its text.
    #[tokio::test]
    async fn a_snapshot_taken_at_first_use_is_stored_at_once_and_loaded_by_the_first_read() {
        let snapshot = saved_text("restored from a mirror").await;
        let f = fixture(EngineConfig::default());
        let took = import(&f, snapshot.clone(), SnapshotLoad::AtFirstUse)
            .await
            .unwrap();
        assert!(took, "the replica was empty");
        let stored = f.storage.load(&f.key).await.unwrap().expect("stored");
        assert_eq!(
            stored.snapshot.map(|(_, s)| s),
            Some(snapshot.clone()),
            "stored as it came"
        );
        assert!(
            f.engine.resource(&f.key).shared.current.load().is_none(),
            "not loaded: readers must ask the resource's actor"
        );
        let read = f.engine.read(&f.key).await.unwrap();
        assert_eq!(read.body.as_ref(), b"restored from a mirror");
        assert!(
            f.engine.resource(&f.key).shared.current.load().is_some(),
            "the read loaded it"
        );
        let again = import(&f, snapshot, SnapshotLoad::AtFirstUse).await.unwrap();
        assert!(!again, "a replica that holds the resource takes no snapshot");
    }

    /// Someone already follows the missing resource: the snapshot is loaded at once, so
    /// that they are told its state.
    #[tokio::test]
    async fn a_followed_resource_takes_its_snapshot_loaded_and_tells_its_followers() {
        let snapshot = saved_text("for the one waiting").await;
        let f = fixture(EngineConfig::default());
        let mut sub = f.engine.subscribe(&f.key, None, None).await.unwrap();
        match sub.next().await {
            Some(Delivery::Own(u)) => assert!(u.version.is_root(), "missing: {u:?}"),
            other => panic!("the first delivery is the state: {other:?}"),
        }
        let took = import(&f, snapshot, SnapshotLoad::AtFirstUse).await.unwrap();
        assert!(took);
        let told = tokio::time::timeout(std::time::Duration::from_secs(10), sub.next())
            .await
            .expect("told in time");
        let Some(Delivery::Shared(ev)) = told else {
            panic!("an event for every follower: {told:?}")
        };
        assert_eq!(ev.reaches.as_ref().unwrap().body.as_ref(), b"for the one waiting");
    }

    /// A document that does not load: refused when loaded now (nothing stored); stored
    /// when taken at first use, and then every read of it fails with the reason, as for
    /// any stored document that does not load.
    #[tokio::test]
    async fn a_snapshot_that_does_not_load_is_refused_now_or_fails_its_first_read() {
        let broken = Bytes::from_static(b"\x85\x6f\x4a\x83 not an automerge document");
        let f = fixture(EngineConfig::default());
        let now = import(&f, broken.clone(), SnapshotLoad::Now).await;
        assert!(matches!(now, Err(EngineError::Doc(_))), "{now:?}");
        assert!(f.storage.load(&f.key).await.unwrap().is_none(), "nothing stored");

        let took = import(&f, broken, SnapshotLoad::AtFirstUse).await.unwrap();
        assert!(took);
        let read = f.engine.read(&f.key).await;
        assert!(
            matches!(&read, Err(EngineError::Doc(e)) if e.to_string().contains("does not load")),
            "{read:?}"
        );
    }
}
