//! The embedded store's [`Dump`]: export reads one WAL snapshot on a read-only connection
//! of its own (so it runs beside a live server, which holds the only writing connection);
//! import writes in one `BEGIN IMMEDIATE` transaction on a connection of its own (the
//! target is a store nobody serves yet).

use async_trait::async_trait;
use rusqlite::{Connection, params};
use tokio::sync::mpsc;

use super::{SqliteStorage, open, sql_err};
use crate::storage::StorageError;
use crate::storage::dump::{Dump, Row, TABLES};

/// Each table's export query, in [`TABLES`] order; BLOB and `TEXT` keys compare byte-wise
/// in SQLite, as the Postgres export orders them.
const EXPORTS: [&str; 7] = [
    "SELECT name, value FROM settings ORDER BY name",
    "SELECT hash, data, size FROM blobs ORDER BY hash",
    "SELECT id, namespace, path, kind, media_type, head_seq, bytes, created_ms, updated_ms, created_by
     FROM resources ORDER BY id",
    "SELECT resource_id, upto_seq, data, at_ms FROM snapshots ORDER BY resource_id",
    "SELECT resource_id, seq, version, parents, author, at_ms, data, meta FROM changes
     ORDER BY resource_id, seq",
    "SELECT namespace, seq, descriptor, ciphertext FROM mirror_segments ORDER BY namespace, seq",
    "SELECT namespace, upto, checkpoint, snapshot FROM mirror_checkpoints ORDER BY namespace",
];

fn row_of(table: usize, r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(match table {
        0 => Row::Setting {
            name: r.get(0)?,
            value: r.get(1)?,
        },
        1 => Row::Blob {
            hash: r.get(0)?,
            data: r.get(1)?,
            size: r.get(2)?,
        },
        2 => Row::Resource {
            id: r.get(0)?,
            namespace: r.get(1)?,
            path: r.get(2)?,
            kind: r.get(3)?,
            media_type: r.get(4)?,
            head_seq: r.get(5)?,
            bytes: r.get(6)?,
            created_ms: r.get(7)?,
            updated_ms: r.get(8)?,
            created_by: r.get(9)?,
        },
        3 => Row::Snapshot {
            resource_id: r.get(0)?,
            upto_seq: r.get(1)?,
            data: r.get(2)?,
            at_ms: r.get(3)?,
        },
        4 => Row::Change {
            resource_id: r.get(0)?,
            seq: r.get(1)?,
            version: r.get(2)?,
            parents: r.get(3)?,
            author: r.get(4)?,
            at_ms: r.get(5)?,
            data: r.get(6)?,
            meta: r.get(7)?,
        },
        6 => Row::Checkpoint {
            namespace: r.get(0)?,
            upto: r.get(1)?,
            checkpoint: r.get(2)?,
            snapshot: r.get(3)?,
        },
        _ => Row::Segment {
            namespace: r.get(0)?,
            seq: r.get(1)?,
            descriptor: r.get(2)?,
            ciphertext: r.get(3)?,
        },
    })
}

fn insert(tx: &rusqlite::Transaction<'_>, row: &Row) -> rusqlite::Result<usize> {
    match row {
        Row::Setting { name, value } => tx
            .prepare_cached("INSERT INTO settings (name, value) VALUES (?1, ?2)")?
            .execute(params![name, value]),
        Row::Blob { hash, data, size } => tx
            .prepare_cached("INSERT INTO blobs (hash, data, size) VALUES (?1, ?2, ?3)")?
            .execute(params![hash, data, size]),
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
        } => tx
            .prepare_cached(
                "INSERT INTO resources (id, namespace, path, kind, media_type, head_seq, bytes,
                     created_ms, updated_ms, created_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                id, namespace, path, kind, media_type, head_seq, bytes, created_ms, updated_ms, created_by
            ]),
        Row::Snapshot {
            resource_id,
            upto_seq,
            data,
            at_ms,
        } => tx
            .prepare_cached("INSERT INTO snapshots (resource_id, upto_seq, data, at_ms) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![resource_id, upto_seq, data, at_ms]),
        Row::Change {
            resource_id,
            seq,
            version,
            parents,
            author,
            at_ms,
            data,
            meta,
        } => tx
            .prepare_cached(
                "INSERT INTO changes (resource_id, seq, version, parents, author, at_ms, data, meta)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![resource_id, seq, version, parents, author, at_ms, data, meta]),
        Row::Segment {
            namespace,
            seq,
            descriptor,
            ciphertext,
        } => tx
            .prepare_cached(
                "INSERT INTO mirror_segments (namespace, seq, descriptor, ciphertext) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![namespace, seq, descriptor, ciphertext]),
        Row::Checkpoint {
            namespace,
            upto,
            checkpoint,
            snapshot,
        } => tx
            .prepare_cached(
                "INSERT INTO mirror_checkpoints (namespace, upto, checkpoint, snapshot) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![namespace, upto, checkpoint, snapshot]),
    }
}

fn counts(conn: &Connection) -> Result<[u64; 7], StorageError> {
    let mut out = [0u64; 7];
    for (i, table) in TABLES.iter().enumerate() {
        let n: i64 = conn
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .map_err(sql_err)?;
        out[i] = n.max(0) as u64;
    }
    Ok(out)
}

#[async_trait]
impl Dump for SqliteStorage {
    async fn export(&self, out: mpsc::Sender<Row>) -> Result<(), StorageError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = open(&path, false)?;
            // A deferred transaction's first read fixes its WAL snapshot.
            let tx = conn.transaction().map_err(sql_err)?;
            for (table, sql) in EXPORTS.iter().enumerate() {
                let mut stmt = tx.prepare(sql).map_err(sql_err)?;
                let mut rows = stmt.query([]).map_err(sql_err)?;
                while let Some(r) = rows.next().map_err(sql_err)? {
                    let row = row_of(table, r).map_err(sql_err)?;
                    if out.blocking_send(row).is_err() {
                        return Ok(());
                    }
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| StorageError::Unavailable(format!("export task: {e}")))?
    }

    async fn import(&self, mut rows: mpsc::Receiver<Row>) -> Result<(), StorageError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = open(&path, true)?;
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(sql_err)?;
            if counts(&tx)?.iter().any(|&n| n > 0) {
                return Err(StorageError::Failed(format!(
                    "{} already holds data: restore or move only into an empty store",
                    path.display()
                )));
            }
            while let Some(row) = rows.blocking_recv() {
                insert(&tx, &row).map_err(sql_err)?;
            }
            tx.commit().map_err(sql_err)
        })
        .await
        .map_err(|e| StorageError::Unavailable(format!("import task: {e}")))?
    }

    async fn count(&self) -> Result<[u64; 7], StorageError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || counts(&open(&path, false)?))
            .await
            .map_err(|e| StorageError::Unavailable(format!("count task: {e}")))?
    }
}

impl SqliteStorage {
    /// Moves everything in the write-ahead log of the store at `path` into its main file,
    /// so the file alone is the whole store (to copy it elsewhere). Call once nothing
    /// writes to it.
    pub fn checkpoint(path: &std::path::Path) -> Result<(), StorageError> {
        let conn = open(path, true)?;
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get::<_, i64>(0))
            .map_err(sql_err)
            .and_then(|busy| match busy {
                0 => Ok(()),
                _ => Err(StorageError::Unavailable(format!(
                    "{}: still in use",
                    path.display()
                ))),
            })
    }
}
