//! When a document is snapshotted: its whole state saved and the change log before it
//! dropped ([`super::Actor::maybe_compact`] does it; this file decides when).
//!
//! Saving costs the whole document, so saving every `snapshot_every` changes would charge
//! each change a share of the document's size: a growing hot document would cost more per
//! write the bigger it got. A snapshot is therefore due once at least `snapshot_every`
//! changes have piled up *and* their bytes have reached the last snapshot's size. Saving
//! then costs a bounded number of bytes per byte written, whatever the document's size
//! (the snapshots' sizes grow geometrically: with snapshots a fraction `s` of the changes
//! they fold, about `1 + s` bytes saved per byte written), and the log kept beside a
//! snapshot (what a load replays) stays about as big as the snapshot. Bytes resources have no snapshot (their log is dropped): only the count
//! applies to them.

/// A run of changes as a snapshot's rule counts them: how many, and their bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Counted {
    pub(super) changes: usize,
    pub(super) bytes: usize,
}

/// A change in a resource's log, as [`Counted`] sees it.
pub(super) trait LogEntry {
    /// The bytes it adds to the log.
    fn log_bytes(&self) -> usize;
}

impl LogEntry for crate::storage::StoredChange {
    fn log_bytes(&self) -> usize {
        self.data.len()
    }
}

impl LogEntry for crate::storage::NewChange {
    fn log_bytes(&self) -> usize {
        self.data.len()
    }
}

impl Counted {
    pub(super) fn of<C: LogEntry>(changes: &[C]) -> Counted {
        Counted {
            changes: changes.len(),
            bytes: changes.iter().map(LogEntry::log_bytes).sum(),
        }
    }
}

/// What has piled up since the last snapshot.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct SinceSnapshot {
    changes: usize,
    bytes: usize,
    /// The last snapshot's size (0: none).
    snapshot_bytes: usize,
}

impl SinceSnapshot {
    /// A document as loaded: its snapshot's size, and the changes after it.
    pub(super) fn loaded(snapshot_bytes: usize, after: Counted) -> Self {
        SinceSnapshot {
            changes: after.changes,
            bytes: after.bytes,
            snapshot_bytes,
        }
    }

    /// Changes appended (by this process or another).
    pub(super) fn add(&mut self, added: Counted) {
        self.changes = self.changes.saturating_add(added.changes);
        self.bytes = self.bytes.saturating_add(added.bytes);
    }

    /// A snapshot is due at once (a big write was committed as a run of changes).
    pub(super) fn force(&mut self, every: usize) {
        self.changes = self.changes.max(every);
        self.bytes = self.bytes.max(self.snapshot_bytes);
    }

    /// Whether a snapshot is due (`every`: the `snapshot_every` setting).
    pub(super) fn due(&self, every: usize) -> bool {
        self.changes >= every.max(1) && self.bytes >= self.snapshot_bytes
    }

    /// A snapshot of `snapshot_bytes` was made (0: the log was dropped, no snapshot).
    pub(super) fn saved(&mut self, snapshot_bytes: usize) {
        *self = SinceSnapshot {
            snapshot_bytes,
            ..Default::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::testing::{fixture, insert};
    use super::{Counted, SinceSnapshot};
    use crate::engine::{Engine, EngineConfig};
    use crate::model::ResourceKey;
    use crate::storage::sqlite::SqliteStorage;
    use crate::storage::{Seq, Storage};

    /// The changes the store's snapshot of `key` covers and its size (0: none).
    async fn snapshot(storage: &Arc<SqliteStorage>, key: &ResourceKey) -> (Seq, usize) {
        let l = storage.load(key).await.unwrap().expect("the resource");
        l.snapshot.map_or((0, 0), |(upto, b)| (upto, b.len()))
    }

    /// The snapshot once it covers more than `after` (the actor saves in the background,
    /// right after the append that made one due).
    async fn snapshot_past(storage: &Arc<SqliteStorage>, key: &ResourceKey, after: Seq) -> (Seq, usize) {
        for _ in 0..500 {
            let s = snapshot(storage, key).await;
            if s.0 > after {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no snapshot past {after} within 10 s");
    }

    /// The rule in the actor: a snapshot after `snapshot_every` changes, the next only once
    /// the changes since have as many bytes as it; the text survives a fresh engine.
    #[tokio::test]
    async fn the_actor_snapshots_by_count_then_by_size() {
        let config = EngineConfig {
            snapshot_every: 10,
            ..EngineConfig::default()
        };
        let f = fixture(config.clone());
        let (storage, engine, key) = (f.storage.clone(), f.engine.clone(), f.key.clone());
        // A first write of 20,000 letters that do not compress, then one-letter edits.
        let big: String = rand::Rng::sample_iter(
            rand::thread_rng(),
            rand::distributions::Uniform::new_inclusive(b'a', b'z'),
        )
        .take(20_000)
        .map(char::from)
        .collect();
        engine.write(&key, insert(&big)).await.unwrap();
        for _ in 0..9 {
            engine.write(&key, insert("z")).await.unwrap();
        }
        let (upto, size) = snapshot_past(&storage, &key, 0).await;
        assert_eq!(upto, 10, "the first snapshot: after 10 changes");
        assert!(size > 10_000, "the snapshot holds the letters ({size} bytes)");

        // Ten more small edits: the count is reached, not the snapshot's size. (A save
        // still under way could only hide a wrong snapshot here, never fail this.)
        for _ in 0..10 {
            engine.write(&key, insert("y")).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(snapshot(&storage, &key).await.0, 10, "not yet: too few bytes");

        // Edits until their bytes reach the snapshot's size: then the next one comes.
        let mut edits = 10;
        loop {
            let l = storage.load(&key).await.unwrap().unwrap();
            if l.snapshot.as_ref().is_some_and(|(upto, _)| *upto > 10) {
                break;
            }
            if super::Counted::of(&l.changes).bytes >= size {
                snapshot_past(&storage, &key, 10).await;
                break;
            }
            engine.write(&key, insert("w")).await.unwrap();
            edits += 1;
            assert!(edits < 5_000, "the changes never reached {size} bytes");
        }
        assert!(
            edits > 20,
            "by count alone the second snapshot would have come at 20"
        );

        let text = engine.read(&key).await.unwrap().body.clone();
        let fresh = Engine::new(storage.clone(), config);
        assert_eq!(
            fresh.read(&key).await.unwrap().body,
            text,
            "loaded from the snapshot and the log"
        );
    }

    fn n(changes: usize, bytes: usize) -> Counted {
        Counted { changes, bytes }
    }

    #[test]
    fn due_after_the_count_and_the_last_snapshots_size() {
        let mut s = SinceSnapshot::default();
        s.add(n(999, 10));
        assert!(!s.due(1000), "fewer changes than the setting");
        s.add(n(1, 10));
        assert!(s.due(1000), "no snapshot yet: the count alone");
        s.saved(50_000);
        s.add(n(1000, 49_999));
        assert!(
            !s.due(1000),
            "the changes' bytes are short of the snapshot's size"
        );
        s.add(n(1, 1));
        assert!(s.due(1000));
        s.saved(0);
        s.add(n(1000, 0));
        assert!(
            s.due(1000),
            "after the log was dropped (bytes values): the count alone"
        );
    }

    #[test]
    fn forced_after_a_big_write() {
        let mut s = SinceSnapshot::loaded(1 << 20, n(3, 300));
        assert!(!s.due(1000));
        s.force(1000);
        assert!(s.due(1000));
    }

    #[test]
    fn saving_costs_a_bounded_share_of_what_was_written() {
        // A document growing by 100-byte changes, its snapshot a third of what it holds:
        // the bytes saved over its life stay within (1 + 1/3) of the bytes written (every
        // 1,000 changes, whatever the size, they would be about 170 times what was written).
        let (every, change) = (1000, 100);
        let mut s = SinceSnapshot::default();
        let (mut written, mut saved, mut size) = (0usize, 0usize, 0usize);
        for _ in 0..1_000_000 {
            s.add(n(1, change));
            written += change;
            size += change;
            if s.due(every) {
                let snapshot = size / 3;
                saved += snapshot;
                s.saved(snapshot);
            }
        }
        assert!(
            saved * 3 <= written * 4,
            "saved {saved} bytes for {written} written"
        );
    }
}
