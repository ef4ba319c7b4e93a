//! The behaviour every [`Storage`] backend must show, as one async test suite.
//!
//! The embedded backend runs it in its unit tests; the Postgres backend runs it from the
//! workspace tests against a throwaway cluster. `make` returns a fresh, empty store.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use plait_bridge::Keypair;

use super::{NewChange, Storage, StorageError, Target};
use crate::model::{Kind, ResourceKey, ResourcePath};

fn change(v: &str, data: &[u8]) -> NewChange {
    NewChange {
        version: v.to_string(),
        parents: String::new(),
        author: None,
        at_ms: 1_700_000_000_000,
        data: Bytes::copy_from_slice(data),
        meta: None,
        blob: None,
    }
}

fn key(ns: &Keypair, path: &str) -> ResourceKey {
    ResourceKey::new(ns.identity(), ResourcePath::new(path).unwrap())
}

fn create(k: &ResourceKey, kind: Kind) -> Target {
    Target::Create {
        key: k.clone(),
        kind,
        media_type: kind.default_media_type().to_string(),
    }
}

/// Runs every check, each on a fresh store from `make`.
pub async fn run<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Storage>>,
{
    appends_number_changes_and_load_returns_them(make().await).await;
    create_races_and_kind_conflicts(make().await).await;
    concurrent_appends_are_gap_free(make().await).await;
    snapshots_fold_the_log(make().await).await;
    a_resource_can_start_from_a_snapshot(make().await).await;
    bytes_values_and_collection(make().await).await;
    deletes_remove_everything(make().await).await;
    listing_by_prefix(make().await).await;
    settings_and_namespaces(make().await).await;
    namespace_bytes_follow_the_log(make().await).await;
}

async fn namespace_bytes_follow_the_log(s: Arc<dyn Storage>) {
    let ns = Keypair::generate();
    let id = ns.identity();
    assert_eq!(s.namespace_bytes(&id).await.unwrap(), 0);
    let a = s
        .append(
            create(&key(&ns, "t"), Kind::Text),
            vec![change("a-0", &[1; 100]), change("a-1", &[2; 50])],
        )
        .await
        .unwrap();
    assert_eq!(s.namespace_bytes(&id).await.unwrap(), 150);
    let mut v = change("b-0", blake3::hash(b"value").as_bytes());
    v.meta = Some("image/png".into());
    v.blob = Some(Bytes::from_static(&[7; 1000]));
    let b = s
        .append(create(&key(&ns, "img"), Kind::Bytes), vec![v])
        .await
        .unwrap();
    assert_eq!(s.namespace_bytes(&id).await.unwrap(), 150 + 32 + 1000);
    // A snapshot replaces the changes it folds.
    s.save_snapshot(a.resource, 2, Bytes::from_static(&[0; 20]))
        .await
        .unwrap();
    assert_eq!(s.namespace_bytes(&id).await.unwrap(), 20 + 32 + 1000);
    s.drop_changes_before(b.resource, 1).await.unwrap();
    assert_eq!(s.namespace_bytes(&id).await.unwrap(), 20 + 32 + 1000);
    assert!(s.delete(&key(&ns, "img")).await.unwrap());
    assert_eq!(s.namespace_bytes(&id).await.unwrap(), 20);
    // Other namespaces are not counted.
    assert_eq!(
        s.namespace_bytes(&Keypair::generate().identity()).await.unwrap(),
        0
    );
}

async fn appends_number_changes_and_load_returns_them(s: Arc<dyn Storage>) {
    let ns = Keypair::generate();
    let author = Keypair::generate().identity();
    let k = key(&ns, "notes/a");
    assert!(s.load(&k).await.unwrap().is_none());
    let mut c1 = change("alice-4", b"one");
    c1.author = Some(author);
    c1.parents = String::new();
    let mut c2 = change("bob-5", b"two");
    c2.parents = "\"alice-4\"".into();
    let a = s.append(create(&k, Kind::Text), vec![c1, c2]).await.unwrap();
    assert_eq!((a.first_seq, a.last_seq), (1, 2));
    let b = s
        .append(
            super::Target::Existing(a.resource),
            vec![change("carol-2", b"three")],
        )
        .await
        .unwrap();
    assert_eq!((b.resource, b.first_seq, b.last_seq), (a.resource, 3, 3));
    let l = s.load(&k).await.unwrap().expect("stored");
    assert_eq!(l.row.id, a.resource);
    assert_eq!(l.row.kind, Kind::Text);
    assert_eq!(l.row.head_seq, 3);
    assert_eq!(l.row.media_type, "text/plain; charset=utf-8");
    assert!(l.snapshot.is_none());
    let got: Vec<_> = l
        .changes
        .iter()
        .map(|c| (c.seq, c.version.as_str(), &c.data[..]))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, "alice-4", &b"one"[..]),
            (2, "bob-5", &b"two"[..]),
            (3, "carol-2", &b"three"[..])
        ]
    );
    assert_eq!(l.changes[0].author, Some(author));
    assert_eq!(l.changes[1].parents, "\"alice-4\"");
    assert_eq!(l.changes[0].at_ms, 1_700_000_000_000);
    let after = s.changes_after(a.resource, 1).await.unwrap();
    assert_eq!(after.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![2, 3]);
}

async fn create_races_and_kind_conflicts(s: Arc<dyn Storage>) {
    let ns = Keypair::generate();
    let k = key(&ns, "doc");
    let a = s
        .append(create(&k, Kind::Json), vec![change("a-0", b"x")])
        .await
        .unwrap();
    // Creating again (another process racing) appends to the same resource.
    let b = s
        .append(create(&k, Kind::Json), vec![change("b-0", b"y")])
        .await
        .unwrap();
    assert_eq!(a.resource, b.resource);
    assert_eq!(b.first_seq, 2);
    let e = s
        .append(create(&k, Kind::Text), vec![change("c-0", b"z")])
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::Conflict(_)), "{e:?}");
    // The refused append left nothing behind.
    assert_eq!(s.load(&k).await.unwrap().unwrap().changes.len(), 2);
}

async fn concurrent_appends_are_gap_free(s: Arc<dyn Storage>) {
    let ns = Keypair::generate();
    let mut ids = Vec::new();
    for r in 0..5 {
        let k = key(&ns, &format!("hot/{r}"));
        ids.push((
            k.clone(),
            s.append(create(&k, Kind::Text), vec![change("x-0", b"0")])
                .await
                .unwrap()
                .resource,
        ));
    }
    let mut tasks = Vec::new();
    for w in 0..40 {
        let s = s.clone();
        let (_, id) = ids[w % ids.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..10 {
                let a = s
                    .append(
                        super::Target::Existing(id),
                        vec![
                            change(&format!("w{w}-{i}"), b"d"),
                            change(&format!("w{w}-{i}b"), b"e"),
                        ],
                    )
                    .await
                    .unwrap();
                assert_eq!(a.last_seq, a.first_seq + 1);
                seqs.push(a.first_seq);
            }
            seqs
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for (k, _) in &ids {
        let l = s.load(k).await.unwrap().unwrap();
        let seqs: Vec<i64> = l.changes.iter().map(|c| c.seq).collect();
        assert_eq!(seqs, (1..=l.row.head_seq).collect::<Vec<_>>(), "{k}");
        assert_eq!(l.row.head_seq, 1 + 8 * 10 * 2);
    }
}

async fn snapshots_fold_the_log(s: Arc<dyn Storage>) {
    let ns = Keypair::generate();
    let k = key(&ns, "snap");
    let a = s
        .append(
            create(&k, Kind::Text),
            vec![change("a-0", b"1"), change("a-1", b"2"), change("a-2", b"3")],
        )
        .await
        .unwrap();
    s.save_snapshot(a.resource, 2, Bytes::from_static(b"SNAP"))
        .await
        .unwrap();
    let l = s.load(&k).await.unwrap().unwrap();
    assert_eq!(l.snapshot, Some((2, Bytes::from_static(b"SNAP"))));
    assert_eq!(l.changes.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![3]);
    // An older snapshot never replaces a newer one.
    s.save_snapshot(a.resource, 1, Bytes::from_static(b"OLD"))
        .await
        .unwrap();
    assert_eq!(
        s.load(&k).await.unwrap().unwrap().snapshot.unwrap().1,
        Bytes::from_static(b"SNAP")
    );
    // Appends continue after the compacted seqs.
    let b = s
        .append(super::Target::Existing(a.resource), vec![change("a-3", b"4")])
        .await
        .unwrap();
    assert_eq!(b.first_seq, 4);
}

async fn a_resource_can_start_from_a_snapshot(s: Arc<dyn Storage>) {
    let ns = Keypair::generate();
    let k = key(&ns, "seeded");
    let id = s
        .create_from_snapshot(&k, Kind::Json, "application/json", Bytes::from_static(b"SEED"))
        .await
        .unwrap()
        .expect("created");
    let l = s.load(&k).await.unwrap().unwrap();
    assert_eq!(l.row.id, id);
    assert_eq!(l.row.kind, Kind::Json);
    assert_eq!(l.snapshot, Some((0, Bytes::from_static(b"SEED"))));
    assert!(l.changes.is_empty());
    assert!(s.namespace_bytes(&ns.identity()).await.unwrap() >= 4);
    // A second seed changes nothing; changes then start at seq 1.
    let again = s
        .create_from_snapshot(&k, Kind::Json, "application/json", Bytes::from_static(b"OTHER"))
        .await
        .unwrap();
    assert_eq!(again, None);
    let a = s
        .append(Target::Existing(id), vec![change("a-0", b"1")])
        .await
        .unwrap();
    assert_eq!((a.first_seq, a.last_seq), (1, 1));
    let l = s.load(&k).await.unwrap().unwrap();
    assert_eq!(l.snapshot.unwrap().1, Bytes::from_static(b"SEED"));
    assert_eq!(l.changes.len(), 1);
}

async fn bytes_values_and_collection(s: Arc<dyn Storage>) {
    let ns = Keypair::generate();
    let k = key(&ns, "img");
    let value = |v: &[u8], mt: &str| {
        let mut c = change("b-0", blake3::hash(v).as_bytes());
        c.meta = Some(mt.to_string());
        c.blob = Some(Bytes::copy_from_slice(v));
        c
    };
    let a = s
        .append(create(&k, Kind::Bytes), vec![value(b"first", "image/png")])
        .await
        .unwrap();
    s.append(
        super::Target::Existing(a.resource),
        vec![value(b"second", "image/jpeg")],
    )
    .await
    .unwrap();
    let l = s.load(&k).await.unwrap().unwrap();
    assert_eq!(l.blob, Some(Bytes::from_static(b"second")));
    assert_eq!(l.changes.last().unwrap().meta.as_deref(), Some("image/jpeg"));
    s.drop_changes_before(a.resource, 2).await.unwrap();
    let l = s.load(&k).await.unwrap().unwrap();
    assert_eq!(l.changes.len(), 1);
    assert_eq!(l.blob, Some(Bytes::from_static(b"second")));
    // The same value under another resource shares the blob; deleting one keeps it for the other.
    let k2 = key(&ns, "img2");
    s.append(create(&k2, Kind::Bytes), vec![value(b"second", "image/jpeg")])
        .await
        .unwrap();
    assert!(s.delete(&k).await.unwrap());
    assert_eq!(
        s.load(&k2).await.unwrap().unwrap().blob,
        Some(Bytes::from_static(b"second"))
    );
}

async fn deletes_remove_everything(s: Arc<dyn Storage>) {
    let ns = Keypair::generate();
    let k = key(&ns, "gone");
    let a = s
        .append(create(&k, Kind::Text), vec![change("a-0", b"1")])
        .await
        .unwrap();
    s.save_snapshot(a.resource, 1, Bytes::from_static(b"S"))
        .await
        .unwrap();
    assert!(s.delete(&k).await.unwrap());
    assert!(s.load(&k).await.unwrap().is_none());
    assert!(!s.delete(&k).await.unwrap());
    let e = s
        .append(super::Target::Existing(a.resource), vec![change("a-1", b"2")])
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::Gone), "{e:?}");
    assert!(matches!(
        s.save_snapshot(a.resource, 1, Bytes::new()).await,
        Err(StorageError::Gone)
    ));
    // Re-creating starts a new log.
    let b = s
        .append(create(&k, Kind::Json), vec![change("z-0", b"{}")])
        .await
        .unwrap();
    assert_ne!(a.resource, b.resource);
    assert_eq!(b.first_seq, 1);
}

async fn listing_by_prefix(s: Arc<dyn Storage>) {
    let ns = Keypair::generate();
    let other = Keypair::generate();
    for p in ["a/1", "a/2", "a/3", "ab", "b/1"] {
        s.append(create(&key(&ns, p), Kind::Text), vec![change("x-0", b"")])
            .await
            .unwrap();
    }
    s.append(create(&key(&other, "a/9"), Kind::Text), vec![change("x-0", b"")])
        .await
        .unwrap();
    let paths = |v: Vec<super::ResourceSummary>| {
        v.into_iter()
            .map(|r| r.path.as_str().to_string())
            .collect::<Vec<_>>()
    };
    let id = ns.identity();
    assert_eq!(
        paths(s.list(&id, "a/", None, 10).await.unwrap()),
        vec!["a/1", "a/2", "a/3"]
    );
    assert_eq!(
        paths(s.list(&id, "a/", Some("a/1"), 10).await.unwrap()),
        vec!["a/2", "a/3"]
    );
    assert_eq!(
        paths(s.list(&id, "a/", None, 2).await.unwrap()),
        vec!["a/1", "a/2"]
    );
    assert_eq!(
        paths(s.list(&id, "", None, 10).await.unwrap()),
        vec!["a/1", "a/2", "a/3", "ab", "b/1"]
    );
    assert_eq!(paths(s.list(&id, "", Some("ab"), 10).await.unwrap()), vec!["b/1"]);
    let first = s.list(&id, "b/", None, 1).await.unwrap().remove(0);
    assert_eq!((first.kind, first.head_seq), (Kind::Text, 1));
}

async fn settings_and_namespaces(s: Arc<dyn Storage>) {
    assert_eq!(s.get_setting("owner").await.unwrap(), None);
    s.put_setting("owner", "x").await.unwrap();
    s.put_setting("owner", "y").await.unwrap();
    assert_eq!(s.get_setting("owner").await.unwrap().as_deref(), Some("y"));
    let (a, b) = (Keypair::generate(), Keypair::generate());
    s.append(create(&key(&a, "same"), Kind::Text), vec![change("a-0", b"A")])
        .await
        .unwrap();
    s.append(create(&key(&b, "same"), Kind::Json), vec![change("b-0", b"B")])
        .await
        .unwrap();
    assert_eq!(
        s.load(&key(&a, "same")).await.unwrap().unwrap().row.kind,
        Kind::Text
    );
    assert_eq!(
        s.load(&key(&b, "same")).await.unwrap().unwrap().row.kind,
        Kind::Json
    );
}
