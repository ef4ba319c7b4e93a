//! The Postgres store's [`Dump`]: export streams every table inside one `REPEATABLE READ
//! READ ONLY` transaction (one snapshot, beside a live server's writes); import writes in
//! one transaction and then moves the resource id sequence past the ids it kept.

use async_trait::async_trait;
use futures::{StreamExt, pin_mut};
use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;

use super::{PostgresStorage, pg_err};
use crate::storage::StorageError;
use crate::storage::dump::{Dump, Row, TABLES};

/// Each table's export query, in [`TABLES`] order, keys compared byte-wise (`COLLATE "C"`
/// for text, as SQLite compares), times as whole milliseconds.
const EXPORTS: [&str; 7] = [
    r#"SELECT name, value FROM settings ORDER BY name COLLATE "C""#,
    "SELECT hash, data, size FROM blobs ORDER BY hash",
    "SELECT id, namespace, path, kind, media_type, head_seq, bytes,
            floor(extract(epoch FROM created_at) * 1000)::int8,
            floor(extract(epoch FROM updated_at) * 1000)::int8, created_by
     FROM resources ORDER BY id",
    "SELECT resource_id, upto_seq, data, at_ms FROM snapshots ORDER BY resource_id",
    "SELECT resource_id, seq, version, parents, author, at_ms, data, meta FROM changes
     ORDER BY resource_id, seq",
    "SELECT namespace, seq, descriptor, ciphertext FROM mirror_segments ORDER BY namespace, seq",
    "SELECT namespace, upto, checkpoint, snapshot FROM mirror_checkpoints ORDER BY namespace",
];

fn row_of(table: usize, r: &tokio_postgres::Row) -> Result<Row, tokio_postgres::Error> {
    Ok(match table {
        0 => Row::Setting {
            name: r.try_get(0)?,
            value: r.try_get(1)?,
        },
        1 => Row::Blob {
            hash: r.try_get(0)?,
            data: r.try_get(1)?,
            size: r.try_get(2)?,
        },
        2 => Row::Resource {
            id: r.try_get(0)?,
            namespace: r.try_get(1)?,
            path: r.try_get(2)?,
            kind: r.try_get(3)?,
            media_type: r.try_get(4)?,
            head_seq: r.try_get(5)?,
            bytes: r.try_get(6)?,
            created_ms: r.try_get(7)?,
            updated_ms: r.try_get(8)?,
            created_by: r.try_get(9)?,
        },
        3 => Row::Snapshot {
            resource_id: r.try_get(0)?,
            upto_seq: r.try_get(1)?,
            data: r.try_get(2)?,
            at_ms: r.try_get(3)?,
        },
        4 => Row::Change {
            resource_id: r.try_get(0)?,
            seq: r.try_get(1)?,
            version: r.try_get(2)?,
            parents: r.try_get(3)?,
            author: r.try_get(4)?,
            at_ms: r.try_get(5)?,
            data: r.try_get(6)?,
            meta: r.try_get(7)?,
        },
        6 => Row::Checkpoint {
            namespace: r.try_get(0)?,
            upto: r.try_get(1)?,
            checkpoint: r.try_get(2)?,
            snapshot: r.try_get(3)?,
        },
        _ => Row::Segment {
            namespace: r.try_get(0)?,
            seq: r.try_get(1)?,
            descriptor: r.try_get(2)?,
            ciphertext: r.try_get(3)?,
        },
    })
}

/// The insert for each table, in [`TABLES`] order; times from milliseconds exactly
/// (interval arithmetic, no floating point).
const INSERTS: [&str; 7] = [
    "INSERT INTO settings (name, value) VALUES ($1, $2)",
    "INSERT INTO blobs (hash, data, size) VALUES ($1, $2, $3)",
    "INSERT INTO resources (id, namespace, path, kind, media_type, head_seq, bytes,
         created_at, updated_at, created_by)
     VALUES ($1, $2, $3, $4, $5, $6, $7, 'epoch'::timestamptz + $8::int8 * interval '1 millisecond',
         'epoch'::timestamptz + $9::int8 * interval '1 millisecond', $10)",
    "INSERT INTO snapshots (resource_id, upto_seq, data, at_ms) VALUES ($1, $2, $3, $4)",
    "INSERT INTO changes (resource_id, seq, version, parents, author, at_ms, data, meta)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    "INSERT INTO mirror_segments (namespace, seq, descriptor, ciphertext) VALUES ($1, $2, $3, $4)",
    "INSERT INTO mirror_checkpoints (namespace, upto, checkpoint, snapshot) VALUES ($1, $2, $3, $4)",
];

fn params_of(row: &Row) -> Vec<&(dyn ToSql + Sync)> {
    match row {
        Row::Setting { name, value } => vec![name, value],
        Row::Blob { hash, data, size } => vec![hash, data, size],
        Row::Resource {
            id,
            namespace,
            path,
            kind,
            media_type,
            head_seq,
            bytes,
            created_ms,
            updated_ms,
            created_by,
        } => vec![
            id, namespace, path, kind, media_type, head_seq, bytes, created_ms, updated_ms, created_by,
        ],
        Row::Snapshot {
            resource_id,
            upto_seq,
            data,
            at_ms,
        } => vec![resource_id, upto_seq, data, at_ms],
        Row::Change {
            resource_id,
            seq,
            version,
            parents,
            author,
            at_ms,
            data,
            meta,
        } => vec![resource_id, seq, version, parents, author, at_ms, data, meta],
        Row::Segment {
            namespace,
            seq,
            descriptor,
            ciphertext,
        } => vec![namespace, seq, descriptor, ciphertext],
        Row::Checkpoint {
            namespace,
            upto,
            checkpoint,
            snapshot,
        } => vec![namespace, upto, checkpoint, snapshot],
    }
}

async fn counts<C: deadpool_postgres::GenericClient + Sync>(c: &C) -> Result<[u64; 7], StorageError> {
    let mut out = [0u64; 7];
    for (i, table) in TABLES.iter().enumerate() {
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .map_err(pg_err)?
            .get(0);
        out[i] = n.max(0) as u64;
    }
    Ok(out)
}

#[async_trait]
impl Dump for PostgresStorage {
    async fn export(&self, out: mpsc::Sender<Row>) -> Result<(), StorageError> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg_err)?;
        for (table, sql) in EXPORTS.iter().enumerate() {
            let rows = tx
                .query_raw(*sql, std::iter::empty::<&(dyn ToSql + Sync)>())
                .await
                .map_err(pg_err)?;
            pin_mut!(rows);
            while let Some(r) = rows.next().await {
                let row = row_of(table, &r.map_err(pg_err)?).map_err(pg_err)?;
                if out.send(row).await.is_err() {
                    return Ok(());
                }
            }
        }
        tx.commit().await.map_err(pg_err)
    }

    async fn import(&self, mut rows: mpsc::Receiver<Row>) -> Result<(), StorageError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        // Nobody else may write while the copy runs (it checks emptiness once).
        tx.batch_execute(&format!("LOCK TABLE {} IN EXCLUSIVE MODE", TABLES.join(", ")))
            .await
            .map_err(pg_err)?;
        if counts(&tx).await?.iter().any(|&n| n > 0) {
            return Err(StorageError::Failed(
                "the database already holds data: restore or move only into an empty one".into(),
            ));
        }
        let mut statements = Vec::with_capacity(INSERTS.len());
        for sql in INSERTS {
            statements.push(tx.prepare(sql).await.map_err(pg_err)?);
        }
        while let Some(row) = rows.recv().await {
            tx.execute(&statements[row.table()], &params_of(&row))
                .await
                .map_err(pg_err)?;
        }
        tx.batch_execute(
            "SELECT setval(pg_get_serial_sequence('resources', 'id'),
                           COALESCE((SELECT max(id) FROM resources), 0) + 1, false)",
        )
        .await
        .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)
    }

    async fn count(&self) -> Result<[u64; 7], StorageError> {
        counts(&self.client().await?).await
    }
}
