//! The storage suite against Postgres (a throwaway cluster, or `DATABASE_URL`).

use std::sync::Arc;

use plait_server::model::{Version, VersionId};
use plait_server::storage::postgres::PostgresStorage;
use plait_server::storage::{CommitLimits, NewChange, Storage, StorageError, Target};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_the_storage_suite() {
    plait_server::storage::suite::run(|| async {
        let url = plait_tests::pg::fresh_database();
        Arc::new(
            PostgresStorage::connect(&url, 8, CommitLimits::default())
                .await
                .unwrap(),
        ) as Arc<dyn Storage>
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_migrating_at_once_migrate_once() {
    let url = plait_tests::pg::fresh_database();
    let (a, b) = tokio::join!(
        PostgresStorage::connect(&url, 4, CommitLimits::default()),
        PostgresStorage::connect(&url, 4, CommitLimits::default())
    );
    a.unwrap();
    b.unwrap();
}

/// A resource one process holds takes no append from another until the hold appends (the
/// other is then refused as behind) or is dropped (the other lands); readers go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_keeps_other_processes_appends_out() {
    let url = plait_tests::pg::fresh_database();
    let a = Arc::new(
        PostgresStorage::connect(&url, 4, CommitLimits::default())
            .await
            .unwrap(),
    );
    let b = Arc::new(
        PostgresStorage::connect(&url, 4, CommitLimits::default())
            .await
            .unwrap(),
    );
    let change = |v: &str| NewChange {
        version: VersionId::parse(v).unwrap(),
        parents: Version::root(),
        author: None,
        at_ms: 0,
        data: bytes::Bytes::copy_from_slice(v.as_bytes()),
        meta: None,
        blob: None,
    };
    let key = plait_server::model::ResourceKey::new(
        plait_bridge::Keypair::generate().identity(),
        plait_server::model::ResourcePath::new("held").unwrap(),
    );
    let id = a
        .append(
            Target::Create {
                key: key.clone(),
                kind: plait_server::model::Kind::Text,
                media_type: "text/plain".into(),
            },
            vec![change("a-0")],
        )
        .await
        .unwrap()
        .resource;
    let wait = std::time::Duration::from_millis(300);
    // The other process's append, made on seq `after`, running on its own.
    let from_b = |after, c| {
        let b = b.clone();
        tokio::spawn(async move { b.append(Target::Existing { id, after }, vec![c]).await })
    };

    let hold = a.hold(id).await.unwrap();
    let other = from_b(1, change("b-0"));
    tokio::time::sleep(wait).await;
    assert!(
        !other.is_finished(),
        "another process appended to a held resource"
    );
    assert_eq!(
        b.load(&key).await.unwrap().unwrap().row.head_seq,
        1,
        "readers are not held up"
    );
    hold.append(1, vec![change("a-1")]).await.unwrap();
    let e = other.await.unwrap().unwrap_err();
    assert!(matches!(e, StorageError::Behind), "{e:?}");

    let hold = a.hold(id).await.unwrap();
    let other = from_b(2, change("b-1"));
    tokio::time::sleep(wait).await;
    assert!(!other.is_finished());
    drop(hold);
    assert_eq!(other.await.unwrap().unwrap().first_seq, 3);
    let versions: Vec<String> = a
        .load(&key)
        .await
        .unwrap()
        .unwrap()
        .changes
        .into_iter()
        .map(|c| c.version.to_string())
        .collect();
    assert_eq!(versions, ["a-0", "a-1", "b-1"]);
}
