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
    pub(super) async fn import_snapshot(
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
