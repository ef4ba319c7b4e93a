//! The storage suite against Postgres (a throwaway cluster, or `DATABASE_URL`).

use std::sync::Arc;

use plait_server::storage::postgres::PostgresStorage;
use plait_server::storage::{CommitLimits, Storage};

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
