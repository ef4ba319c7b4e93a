//! The behaviour every [`Storage`] backend must show, as one async test suite.
//!
//! The embedded backend runs it in its unit tests; the Postgres backend runs it from the
//! workspace tests against a throwaway cluster. `make` returns a fresh, empty store.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use plait_bridge::Keypair;

use super::{First, NewChange, NewResource, Storage, StorageError, Take, Target};
use crate::model::{Kind, ResourceKey, ResourcePath, Version, VersionId};

fn change(v: &str, data: &[u8]) -> NewChange {
    NewChange {
        version: VersionId::parse(v).unwrap(),
        parents: Version::root(),
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

/// An append made on resource `id` as stored through `after`.
fn on(id: super::ResourceId, after: super::Seq) -> Target {
    Target::Existing { id, after }
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
    appends_made_on_an_older_state_are_refused(make().await).await;
    a_held_resource_takes_one_append(make().await).await;
    concurrent_appends_are_gap_free(make().await).await;
    snapshots_fold_the_log(make().await).await;
    a_resource_can_start_from_a_snapshot(make().await).await;
    many_resources_are_created_at_once(make().await).await;
    bytes_values_and_collection(make().await).await;
    deletes_remove_everything(make().await).await;
    listing_by_prefix(make().await).await;
    settings_and_namespaces(make().await).await;
    namespace_bytes_follow_the_log(make().await).await;
    segments_form_one_gap_free_chain_per_namespace(make().await).await;
    a_checkpoint_drops_what_it_supersedes(make().await).await;
}

async fn a_checkpoint_drops_what_it_supersedes(s: Arc<dyn Storage>) {
    let a = Keypair::generate().identity();
    let seg = |n: u8| (Bytes::from(vec![n; 188]), Bytes::from(vec![n; 1000]));
    for n in 1..=4u8 {
        let (d, c) = seg(n);
        s.put_segment(&a, n as i64, d, c).await.unwrap();
    }
    assert_eq!(s.checkpoint(&a, Take::ALL).await.unwrap(), None);
    let ck = |n: u8, len: usize| (Bytes::from(vec![100 + n; 188]), Bytes::from(vec![n; len]));
    let (c, snap) = ck(3, 500);
    s.put_checkpoint(&a, 3, c.clone(), snap.clone()).await.unwrap();
    let got = s.checkpoint(&a, Take::ALL).await.unwrap().unwrap();
    assert_eq!((got.upto, &got.checkpoint, &got.snapshot), (3, &c, &snap));
    let none = s.checkpoint(&a, Take::NOTHING).await.unwrap().unwrap();
    assert_eq!((none.upto, &none.checkpoint), (3, &c));
    assert!(none.snapshot.is_empty());
    let head = s.checkpoint(&a, Take::head(16)).await.unwrap().unwrap();
    assert_eq!(head.snapshot, snap.slice(..16));
    let left = s.segments(&a, 1, 9, 1 << 20).await.unwrap();
    assert_eq!(left.iter().map(|x| x.seq).collect::<Vec<_>>(), [4]);
    assert_eq!(s.segment_bytes(&a).await.unwrap(), 188 + 1000 + 188 + 500);
    assert_eq!(s.segment_bytes_after(&a, 3).await.unwrap(), 188 + 1000);
    assert_eq!(s.segment_bytes_after(&a, 4).await.unwrap(), 0);
    // Not older, not the same again.
    assert!(matches!(
        s.put_checkpoint(&a, 3, c.clone(), snap.clone()).await,
        Err(StorageError::Behind)
    ));
    assert!(matches!(
        s.put_checkpoint(&a, 2, c, snap).await,
        Err(StorageError::Behind)
    ));
    // A checkpoint at the chain's end leaves no segment; the chain goes on after it.
    let (c, snap) = ck(4, 10);
    s.put_checkpoint(&a, 4, c, snap).await.unwrap();
    assert_eq!(s.last_segment(&a).await.unwrap(), None);
    assert_eq!(s.segment_bytes(&a).await.unwrap(), 188 + 10);
    let (d, c) = seg(4);
    assert!(matches!(
        s.put_segment(&a, 4, d, c).await,
        Err(StorageError::Behind)
    ));
    let (d, c) = seg(5);
    s.put_segment(&a, 5, d, c).await.unwrap();
    // Past the chain's end: a mirror that was away jumps to it.
    let (c, snap) = ck(9, 10);
    s.put_checkpoint(&a, 9, c, snap).await.unwrap();
    assert!(s.segments(&a, 1, 20, 1 << 20).await.unwrap().is_empty());
    let (d, c) = seg(10);
    s.put_segment(&a, 10, d, c).await.unwrap();
    // A checkpoint may carry no snapshot (a device's chain, merged by its owner).
    let (c, _) = ck(10, 0);
    s.put_checkpoint(&a, 10, c.clone(), Bytes::new()).await.unwrap();
    for take in [Take::NOTHING, Take::head(4096), Take::ALL] {
        let held = s.checkpoint(&a, take).await.unwrap().unwrap();
        assert_eq!((held.upto, &held.checkpoint, held.snapshot.len()), (10, &c, 0));
    }
    assert_eq!(s.segment_bytes(&a).await.unwrap(), 188);
}

async fn segments_form_one_gap_free_chain_per_namespace(s: Arc<dyn Storage>) {
    let a = Keypair::generate().identity();
    let b = Keypair::generate().identity();
    let seg = |n: u8, len: usize| (Bytes::from(vec![n; 188]), Bytes::from(vec![n; len]));
    assert_eq!(s.last_segment(&a).await.unwrap(), None);
    assert_eq!(s.segment_bytes(&a).await.unwrap(), 0);
    assert!(s.segments(&a, 1, 100, 1 << 20).await.unwrap().is_empty());

    // Only seq 1 starts a chain; then only the next seq.
    let (d, c) = seg(1, 1000);
    assert!(matches!(
        s.put_segment(&a, 2, d.clone(), c.clone()).await,
        Err(StorageError::Behind)
    ));
    s.put_segment(&a, 1, d.clone(), c.clone()).await.unwrap();
    assert!(matches!(
        s.put_segment(&a, 1, d.clone(), c.clone()).await,
        Err(StorageError::Behind)
    ));
    assert!(matches!(
        s.put_segment(&a, 3, d.clone(), c.clone()).await,
        Err(StorageError::Behind)
    ));
    for n in 2..=5u8 {
        let (d, c) = seg(n, 1000 * n as usize);
        s.put_segment(&a, n as i64, d, c).await.unwrap();
    }
    // Another namespace has its own chain.
    let (d, c) = seg(9, 10);
    s.put_segment(&b, 1, d, c).await.unwrap();

    let last = s.last_segment(&a).await.unwrap().unwrap();
    assert_eq!((last.seq, last.descriptor.as_ref()), (5, &[5u8; 188][..]));
    assert_eq!(
        s.segment_bytes(&a).await.unwrap(),
        5 * 188 + (1 + 2 + 3 + 4 + 5) * 1000
    );
    assert_eq!(s.segment_bytes(&b).await.unwrap(), 188 + 10);

    let all = s.segments(&a, 1, 5, 1 << 20).await.unwrap();
    assert_eq!(all.iter().map(|x| x.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    assert_eq!(all[2].ciphertext, Bytes::from(vec![3u8; 3000]));
    assert_eq!(all[2].descriptor, Bytes::from(vec![3u8; 188]));
    let mid = s.segments(&a, 2, 3, 1 << 20).await.unwrap();
    assert_eq!(mid.iter().map(|x| x.seq).collect::<Vec<_>>(), [2, 3]);
    // A byte budget stops the answer early, but never before the first segment.
    let some = s.segments(&a, 2, 5, 188 * 2 + 2000 + 3000).await.unwrap();
    assert_eq!(some.iter().map(|x| x.seq).collect::<Vec<_>>(), [2, 3]);
    let one = s.segments(&a, 4, 5, 10).await.unwrap();
    assert_eq!(one.iter().map(|x| x.seq).collect::<Vec<_>>(), [4]);
    assert!(s.segments(&a, 6, 9, 1 << 20).await.unwrap().is_empty());
    // Descriptors alone, from a seq, at most `limit`.
    let ds = s.descriptors(&a, 2, 3, Take::NOTHING).await.unwrap();
    assert_eq!(ds.iter().map(|x| x.seq).collect::<Vec<_>>(), [2, 3, 4]);
    assert_eq!(ds[1].descriptor, Bytes::from(vec![3u8; 188]));
    assert!(ds.iter().all(|x| x.ciphertext.is_empty()));
    assert_eq!(s.descriptors(&b, 1, 10, Take::NOTHING).await.unwrap().len(), 1);
    assert!(s.descriptors(&a, 6, 10, Take::NOTHING).await.unwrap().is_empty());
    // With the heads of their ciphertexts, or all of them.
    let heads = s.descriptors(&a, 1, 9, Take::head(2500)).await.unwrap();
    let lens: Vec<usize> = heads.iter().map(|x| x.ciphertext.len()).collect();
    assert_eq!(lens, [1000, 2000, 2500, 2500, 2500]);
    assert_eq!(heads[2].ciphertext, Bytes::from(vec![3u8; 2500]));
    let whole = s.descriptors(&a, 3, 1, Take::ALL).await.unwrap();
    assert_eq!(whole[0].ciphertext, Bytes::from(vec![3u8; 3000]));
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
    let other = Keypair::generate();
    s.append(
        create(&key(&other, "o"), Kind::Text),
        vec![change("c-0", &[3; 7])],
    )
    .await
    .unwrap();
    // The store's total is every namespace's.
    assert_eq!(s.stored_bytes().await.unwrap(), 150 + 32 + 1000 + 7);
    // A snapshot replaces the changes it folds.
    s.save_snapshot(a.resource, 2, Bytes::from_static(&[0; 20]))
        .await
        .unwrap();
    assert_eq!(s.namespace_bytes(&id).await.unwrap(), 20 + 32 + 1000);
    s.drop_changes_before(b.resource, 1).await.unwrap();
    assert_eq!(s.namespace_bytes(&id).await.unwrap(), 20 + 32 + 1000);
    assert!(s.delete(&key(&ns, "img")).await.unwrap());
    assert_eq!(s.namespace_bytes(&id).await.unwrap(), 20);
    assert_eq!(s.stored_bytes().await.unwrap(), 20 + 7);
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
    let mut c2 = change("bob-5", b"two");
    c2.parents = Version::new(vec![
        VersionId::parse("alice-4").unwrap(),
        VersionId::parse("x-1").unwrap(),
    ]);
    let c2_parents = c2.parents.clone();
    let a = s.append(create(&k, Kind::Text), vec![c1, c2]).await.unwrap();
    assert_eq!((a.first_seq, a.last_seq), (1, 2));
    let b = s
        .append(on(a.resource, 2), vec![change("carol-2", b"three")])
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
        .map(|c| (c.seq, c.version.to_string(), &c.data[..]))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, "alice-4".to_string(), &b"one"[..]),
            (2, "bob-5".to_string(), &b"two"[..]),
            (3, "carol-2".to_string(), &b"three"[..])
        ]
    );
    assert_eq!(l.changes[0].author, Some(author));
    assert_eq!(l.changes[0].parents, Version::root());
    assert_eq!(l.changes[1].parents, c2_parents);
    assert_eq!(l.changes[0].at_ms, 1_700_000_000_000);
    let after = s.changes_after(a.resource, 1).await.unwrap();
    assert_eq!(after.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![2, 3]);
}

async fn refused_as_behind(s: &Arc<dyn Storage>, target: Target, c: NewChange) {
    let e = s.append(target, vec![c]).await.unwrap_err();
    assert!(matches!(e, StorageError::Behind), "{e:?}");
}

async fn appends_made_on_an_older_state_are_refused(s: Arc<dyn Storage>) {
    let ns = Keypair::generate();
    let k = key(&ns, "doc");
    let a = s
        .append(create(&k, Kind::Json), vec![change("a-0", b"x")])
        .await
        .unwrap();
    // Creating again (another process racing) was made on nothing, but "doc" holds a change.
    for kind in [Kind::Json, Kind::Text] {
        refused_as_behind(&s, create(&k, kind), change("b-0", b"y")).await;
    }
    s.append(on(a.resource, 1), vec![change("a-1", b"z")])
        .await
        .unwrap();
    // Made on seq 1, but the log now ends at 2.
    refused_as_behind(&s, on(a.resource, 1), change("c-0", b"w")).await;
    // Made on more than is stored.
    refused_as_behind(&s, on(a.resource, 5), change("c-0", b"w")).await;
    // The refused appends left nothing behind.
    let l = s.load(&k).await.unwrap().unwrap();
    assert_eq!(l.row.head_seq, 2);
    assert_eq!(
        l.changes
            .iter()
            .map(|c| c.version.to_string())
            .collect::<Vec<_>>(),
        vec!["a-0", "a-1"]
    );
}

async fn a_held_resource_takes_one_append(s: Arc<dyn Storage>) {
    let ns = Keypair::generate();
    let k = key(&ns, "held");
    let a = s
        .append(create(&k, Kind::Text), vec![change("a-0", b"1")])
        .await
        .unwrap();
    assert!(matches!(s.hold(a.resource + 1000).await, Err(StorageError::Gone)));
    // A hold dropped stores nothing and lets other writers on.
    drop(s.hold(a.resource).await.unwrap());
    let b = s
        .append(on(a.resource, 1), vec![change("a-1", b"2")])
        .await
        .unwrap();
    assert_eq!(b.first_seq, 2);
    // A hold's append is checked like any other.
    let h = s.hold(a.resource).await.unwrap();
    assert_eq!(h.resource(), a.resource);
    let e = h.append(1, vec![change("x-0", b"x")]).await.unwrap_err();
    assert!(matches!(e, StorageError::Behind), "{e:?}");
    let c = s
        .hold(a.resource)
        .await
        .unwrap()
        .append(2, vec![change("a-2", b"3"), change("a-3", b"4")])
        .await
        .unwrap();
    assert_eq!((c.first_seq, c.last_seq), (3, 4));
    let l = s.load(&k).await.unwrap().unwrap();
    assert_eq!(
        l.changes
            .iter()
            .map(|c| c.version.to_string())
            .collect::<Vec<_>>(),
        vec!["a-0", "a-1", "a-2", "a-3"]
    );
    // Appends go on after a hold.
    s.append(on(a.resource, 4), vec![change("a-4", b"5")])
        .await
        .unwrap();
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
    // Eight writers per resource, each appending on what it last read and reading again
    // when another got there first (what an engine in another process does).
    let mut tasks = Vec::new();
    for w in 0..40 {
        let s = s.clone();
        let (k, id) = ids[w % ids.len()].clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                loop {
                    let after = s.load(&k).await.unwrap().unwrap().row.head_seq;
                    let r = s
                        .append(
                            on(id, after),
                            vec![
                                change(&format!("w{w}-{i}"), b"d"),
                                change(&format!("w{w}b-{i}"), b"e"),
                            ],
                        )
                        .await;
                    match r {
                        Ok(a) => {
                            assert_eq!((a.first_seq, a.last_seq), (after + 1, after + 2));
                            break;
                        }
                        Err(StorageError::Behind) => continue,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
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
        // Every append landed once.
        let mut versions: Vec<String> = l.changes.iter().map(|c| c.version.to_string()).collect();
        versions.sort_unstable();
        versions.dedup();
        assert_eq!(versions.len(), l.changes.len());
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
        .append(on(a.resource, 3), vec![change("a-3", b"4")])
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
    let a = s.append(on(id, 0), vec![change("a-0", b"1")]).await.unwrap();
    assert_eq!((a.first_seq, a.last_seq), (1, 1));
    let l = s.load(&k).await.unwrap().unwrap();
    assert_eq!(l.snapshot.unwrap().1, Bytes::from_static(b"SEED"));
    assert_eq!(l.changes.len(), 1);
}

/// `create`: many resources in one call, each from a snapshot or its first changes; those
/// that exist (or whose key came earlier in the call) are left as they were.
async fn many_resources_are_created_at_once(s: Arc<dyn Storage>) {
    let ns = Keypair::generate();
    let new = |path: &str, kind: Kind, first: First| NewResource {
        key: key(&ns, path),
        kind,
        media_type: kind.default_media_type().to_string(),
        first,
    };
    let snapshot = |d: &'static [u8]| First::Snapshot(Bytes::from_static(d));
    let mut value = change("b-0", blake3::hash(b"PNG").as_bytes());
    value.meta = Some("image/png".into());
    value.blob = Some(Bytes::from_static(b"PNG"));
    let there = s
        .append(create(&key(&ns, "there"), Kind::Text), vec![change("a-0", b"1")])
        .await
        .unwrap();
    let ids = s
        .create(vec![
            new("doc", Kind::Json, snapshot(b"SNAPSHOT")),
            new("img", Kind::Bytes, First::Changes(vec![value.clone()])),
            new("there", Kind::Text, snapshot(b"NOT TAKEN")),
            new(
                "notes",
                Kind::Text,
                First::Changes(vec![change("n-0", b"1"), change("n-1", b"2")]),
            ),
            new("doc", Kind::Json, snapshot(b"SECOND")),
        ])
        .await
        .unwrap();
    assert_eq!(ids.len(), 5);
    assert!(ids[0].is_some() && ids[1].is_some() && ids[3].is_some());
    assert_eq!((ids[2], ids[4]), (None, None));
    let doc = s.load(&key(&ns, "doc")).await.unwrap().unwrap();
    assert_eq!((doc.row.id, doc.row.kind), (ids[0].unwrap(), Kind::Json));
    assert_eq!(doc.snapshot, Some((0, Bytes::from_static(b"SNAPSHOT"))));
    assert!(doc.changes.is_empty());
    let img = s.load(&key(&ns, "img")).await.unwrap().unwrap();
    assert_eq!(img.blob, Some(Bytes::from_static(b"PNG")));
    assert_eq!(img.changes.last().unwrap().meta.as_deref(), Some("image/png"));
    let notes = s.load(&key(&ns, "notes")).await.unwrap().unwrap();
    assert_eq!(notes.changes.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2]);
    let kept = s.load(&key(&ns, "there")).await.unwrap().unwrap();
    assert_eq!(
        (kept.row.id, kept.snapshot, kept.changes.len()),
        (there.resource, None, 1)
    );
    // Counted as the single paths count them: the snapshot, the hash and value, the two
    // changes, and the resource that was there already.
    let expected = 8 + (32 + 3) + 2 + 1;
    assert_eq!(s.namespace_bytes(&ns.identity()).await.unwrap(), expected);
    // The logs go on where the first content ends.
    let a = s
        .append(on(ids[0].unwrap(), 0), vec![change("d-0", b"x")])
        .await
        .unwrap();
    assert_eq!((a.first_seq, a.last_seq), (1, 1));
    let a = s
        .append(on(ids[3].unwrap(), 2), vec![change("n-2", b"3")])
        .await
        .unwrap();
    assert_eq!(a.first_seq, 3);
    assert!(s.create(Vec::new()).await.unwrap().is_empty());
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
    s.append(on(a.resource, 1), vec![value(b"second", "image/jpeg")])
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
        .append(on(a.resource, 1), vec![change("a-1", b"2")])
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
