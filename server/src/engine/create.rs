//! Many absent resources created at once, outside their actors: a mirror's restore starts
//! thousands of resources a device does not hold yet, and one store call for a segment's
//! worth of them costs a fraction of an actor, a load and an append for each.
//!
//! A resource live here (it has a handle: someone reads, writes or follows it) is left to
//! its actor: it is reported as not created, and the caller goes the usual way. The others
//! are stored as another process sharing the store would store them: a resource that
//! exists already is left as it was (the store's create is refused), and a handle that
//! came alive while they were stored is told to look again, as for another process's
//! notice, so it does not keep a "missing" it read before the commit.
//!
//! Knows nothing of mirrors or segments.

use bytes::Bytes;

use super::{Engine, EngineError, Write, Writer, actor, kind_index};
use crate::doc::{DocError, DocWrite, Document, Outcome};
use crate::model::{Kind, ResourceKey};
use crate::storage::{First, NewChange, NewResource};

/// What a resource created by [`Engine::create_many`] starts with.
#[derive(Debug, Clone)]
pub enum Start {
    /// An automerge document's whole state (a replica's first sync), stored as it came and
    /// loaded at its first use, as [`super::SnapshotLoad::AtFirstUse`].
    Snapshot {
        kind: Kind,
        media_type: String,
        data: Bytes,
    },
    /// A whole value, written as the server's own write of it to an absent resource
    /// would be ([`Write::internal_value`]).
    Value { media_type: String, body: Bytes },
}

impl Engine {
    /// Creates those of `items` that neither exist nor are live here, in one transaction.
    /// For each, in order, whether it was created; one that was not is the caller's to
    /// write the usual way (it exists, or its actor has it).
    pub async fn create_many(&self, items: &[(ResourceKey, Start)]) -> Result<Vec<bool>, EngineError> {
        let now = crate::storage::now_ms();
        let mut asked = Vec::new();
        let mut new = Vec::new();
        for (i, (key, start)) in items.iter().enumerate() {
            if self.live(key).is_some() {
                continue;
            }
            let (kind, media_type, first) = match start {
                Start::Snapshot {
                    kind: Kind::Bytes, ..
                } => {
                    return Err(
                        DocError::Corrupt("bytes resources have no automerge snapshot".into()).into(),
                    );
                }
                Start::Snapshot {
                    kind,
                    media_type,
                    data,
                } => (*kind, media_type.clone(), First::Snapshot(data.clone())),
                Start::Value { media_type, body } => {
                    let (kind, media_type, changes) = first_write(media_type, body, now)?;
                    (kind, media_type, First::Changes(changes))
                }
            };
            asked.push(i);
            new.push(NewResource {
                key: key.clone(),
                kind,
                media_type,
                first,
            });
        }
        let sizes: Vec<(Kind, u64)> = new.iter().map(|r| (r.kind, r.bytes() as u64)).collect();
        let ids = self.inner.storage.create(new).await?;
        let mut created = vec![false; items.len()];
        for ((i, id), (kind, size)) in asked.into_iter().zip(ids).zip(sizes) {
            if id.is_none() {
                continue;
            }
            created[i] = true;
            let key = &items[i].0;
            if let Some(h) = self.live(key) {
                h.refresh();
            }
            self.inner.limiter.count(&key.namespace, &Writer::Internal, size);
            if matches!(items[i].1, Start::Value { .. }) {
                self.inner.writes[kind_index(kind)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(created)
    }
}

/// The kind, media type and changes of a new resource whose first write is the server's
/// own write of `body` (as its actor would make them).
fn first_write(
    media_type: &str,
    body: &Bytes,
    now: i64,
) -> Result<(Kind, String, Vec<NewChange>), EngineError> {
    let write = Write::internal_value(media_type.to_string(), body.clone());
    let (kind, media_type) = actor::start_resource(&write.body)?;
    let mut doc = Document::new(kind);
    let dw = DocWrite {
        body: &write.body,
        version: None,
        parents: None,
        agent_hint: None,
        force: true,
        digest: None,
        max_json_depth: crate::doc::json::MAX_JSON_DEPTH,
    };
    match doc.apply(&dw, now / 1000)? {
        Outcome::Applied(mut a) => Ok((kind, media_type, actor::stored_changes(&doc, &mut a, None, now))),
        Outcome::Unchanged => Err(DocError::Corrupt("a forced first write changed nothing".into()).into()),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::Start;
    use crate::engine::actor::testing::{fixture, saved_text};
    use crate::engine::{Engine, EngineConfig, EngineError, Write};
    use crate::model::{Kind, ResourceKey, ResourcePath};
    use crate::storage::Storage;

    fn key_in(k: &ResourceKey, path: &str) -> ResourceKey {
        ResourceKey::new(k.namespace, ResourcePath::new(path).unwrap())
    }

    fn value(media_type: &str, body: &'static [u8]) -> Start {
        Start::Value {
            media_type: media_type.into(),
            body: Bytes::from_static(body),
        }
    }

    /// Absent resources are created in one call, stored and not loaded, and read as the
    /// server's own writes of them (or a snapshot imported at first use) would read; one
    /// that exists is left as it was.
    #[tokio::test]
    async fn absent_resources_are_created_together_and_read_as_written() {
        let f = fixture(EngineConfig::default());
        let (doc, img, note, there) = (
            key_in(&f.key, "/doc"),
            key_in(&f.key, "/img"),
            key_in(&f.key, "/note"),
            key_in(&f.key, "/there"),
        );
        // Written by another engine on the same store, so not live in `f.engine`.
        let other = Engine::new(f.storage.clone(), EngineConfig::default());
        other
            .write(
                &there,
                Write::internal_value("image/png".into(), Bytes::from_static(b"OLD")),
            )
            .await
            .unwrap();
        drop(other);
        let items = [
            (
                doc.clone(),
                Start::Snapshot {
                    kind: Kind::Text,
                    media_type: "text/plain".into(),
                    data: saved_text("restored whole").await,
                },
            ),
            (img.clone(), value("image/png", b"\x89PNG")),
            (note.clone(), value("text/plain", b"a note")),
            (there.clone(), value("image/png", b"NEW")),
        ];
        let created = f.engine.create_many(&items).await.unwrap();
        assert_eq!(created, [true, true, true, false]);
        assert!(
            f.engine.resource(&doc).shared.current.load().is_none(),
            "not loaded: the first read loads it"
        );
        assert_eq!(
            f.engine.read(&doc).await.unwrap().body.as_ref(),
            b"restored whole"
        );
        let read = f.engine.read(&img).await.unwrap();
        assert_eq!(
            (read.kind, read.media_type.as_str()),
            (Some(Kind::Bytes), "image/png")
        );
        assert_eq!(read.body.as_ref(), b"\x89PNG");
        let read = f.engine.read(&note).await.unwrap();
        assert_eq!(
            (read.kind, read.body.as_ref()),
            (Some(Kind::Text), b"a note".as_slice())
        );
        assert_eq!(f.engine.read(&there).await.unwrap().body.as_ref(), b"OLD");
        // A value written through its actor has the same version (a text document's
        // agent is random).
        let g = fixture(EngineConfig::default());
        for (k, start) in &items[1..2] {
            let Start::Value { media_type, body } = start else {
                unreachable!()
            };
            let k = key_in(&g.key, k.path.as_str());
            let w = g
                .engine
                .write(&k, Write::internal_value(media_type.clone(), body.clone()))
                .await
                .unwrap();
            let here = f.engine.read(&key_in(&f.key, k.path.as_str())).await.unwrap();
            assert_eq!(here.version, w.version, "{}", k.path.as_str());
        }
        // Their logs go on from there.
        f.engine
            .write(
                &img,
                Write::internal_value("image/png".into(), Bytes::from_static(b"later")),
            )
            .await
            .unwrap();
        assert_eq!(f.engine.read(&img).await.unwrap().body.as_ref(), b"later");
        let stored = f.storage.load(&img).await.unwrap().unwrap();
        assert_eq!(stored.changes.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2]);
    }

    /// A resource with a handle here (followed, or read while it was missing) is left to
    /// its actor; nothing of it is stored. A snapshot of a bytes resource is refused.
    #[tokio::test]
    async fn a_resource_live_here_is_left_to_its_actor() {
        let f = fixture(EngineConfig::default());
        let read = key_in(&f.key, "/read");
        let _sub = f.engine.subscribe(&f.key, None, None).await.unwrap();
        assert!(!f.engine.read(&read).await.unwrap().exists());
        let created = f
            .engine
            .create_many(&[
                (f.key.clone(), value("image/png", b"A")),
                (read.clone(), value("image/png", b"B")),
            ])
            .await
            .unwrap();
        assert_eq!(created, [false, false]);
        assert!(f.storage.load(&f.key).await.unwrap().is_none());
        assert!(f.storage.load(&read).await.unwrap().is_none());
        let bytes_snapshot = Start::Snapshot {
            kind: Kind::Bytes,
            media_type: "image/png".into(),
            data: Bytes::from_static(b"x"),
        };
        let refused = f
            .engine
            .create_many(&[(key_in(&f.key, "/b"), bytes_snapshot)])
            .await;
        assert!(matches!(refused, Err(EngineError::Doc(_))), "{refused:?}");
    }
}
