//! The embedded store: one SQLite file in the data dir.
//!
//! SQLite (bundled through rusqlite) was chosen over pure-Rust engines because it is the
//! most widely deployed and tested embedded database there is, its file format is stable
//! and documented, its durability under power loss is specified, and the same library
//! reads statebus' sqlite stores for import.
//!
//! All writes go through one writer thread that owns the only writing connection. It takes
//! every request waiting in its queue, runs them in one `BEGIN IMMEDIATE` transaction (each
//! in a savepoint, so one bad request fails alone) and commits once: with WAL and
//! `synchronous=FULL`, that commit is the fsync every waiting caller was waiting for.
//! Reads use separate connections, which WAL lets run beside the writer.

mod dump;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, params};
use tokio::sync::{mpsc, oneshot};

use super::{
    Appended, CommitLimits, First, LoadedResource, NewChange, NewResource, ResourceId, ResourceRow,
    ResourceSummary, Seq, Storage, StorageError, StoredChange, StoredCheckpoint, StoredSegment, Take, Target,
    columns, identity_from_bytes, key_from_row, kind_from_code, now_ms, prefix_upper_bound,
};
use crate::model::{Kind, Namespace, ResourceKey, ResourcePath};

mod embedded {
    refinery::embed_migrations!("src/storage/sqlite_migrations");
}

/// Statements each connection keeps prepared.
const STATEMENT_CACHE: usize = 32;

/// Most idle read connections kept open.
const MAX_IDLE_READERS: usize = 4;

/// The embedded store.
pub struct SqliteStorage {
    path: PathBuf,
    writes: mpsc::UnboundedSender<WriteJob>,
    readers: Arc<Mutex<Vec<Connection>>>,
}

type Reply<T> = oneshot::Sender<Result<T, StorageError>>;

/// A request to the writer thread.
enum WriteJob {
    Append {
        target: Target,
        changes: Vec<NewChange>,
        reply: Reply<Appended>,
    },
    Snapshot {
        id: ResourceId,
        upto: Seq,
        data: Bytes,
        reply: Reply<()>,
    },
    DropBefore {
        id: ResourceId,
        keep_from: Seq,
        reply: Reply<()>,
    },
    Delete {
        key: ResourceKey,
        reply: Reply<bool>,
    },
    PutSetting {
        name: String,
        value: String,
        reply: Reply<()>,
    },
    PutSegment {
        namespace: Namespace,
        seq: Seq,
        descriptor: Bytes,
        ciphertext: Bytes,
        reply: Reply<()>,
    },
    PutCheckpoint {
        namespace: Namespace,
        upto: Seq,
        checkpoint: Bytes,
        snapshot: Bytes,
        reply: Reply<()>,
    },
    Create {
        items: Vec<NewResource>,
        reply: Reply<Vec<Option<ResourceId>>>,
    },
}

impl WriteJob {
    fn weight(&self) -> (usize, usize) {
        match self {
            WriteJob::Append { changes, .. } => {
                (changes.len(), changes.iter().map(NewChange::stored_bytes).sum())
            }
            WriteJob::Snapshot { data, .. } => (1, data.len()),
            WriteJob::Create { items, .. } => (items.len(), items.iter().map(NewResource::bytes).sum()),
            WriteJob::PutSegment { ciphertext, .. } => (1, ciphertext.len()),
            WriteJob::PutCheckpoint { snapshot, .. } => (1, snapshot.len()),
            _ => (1, 0),
        }
    }
}

fn sql_err(e: rusqlite::Error) -> StorageError {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                rusqlite::ErrorCode::DiskFull
                    | rusqlite::ErrorCode::CannotOpen
                    | rusqlite::ErrorCode::DatabaseBusy
                    | rusqlite::ErrorCode::DatabaseLocked
                    | rusqlite::ErrorCode::ReadOnly
                    | rusqlite::ErrorCode::SystemIoFailure
            ) =>
        {
            StorageError::Unavailable(e.to_string())
        }
        other => StorageError::Failed(other.to_string()),
    }
}

fn open(path: &Path, write: bool) -> Result<Connection, StorageError> {
    let flags = if write {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags).map_err(sql_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(sql_err)?;
    conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA synchronous = FULL;")
        .map_err(sql_err)?;
    // Every statement of the write path is prepared once per connection (`prepare_cached`):
    // room for all of them and the readers', beyond rusqlite's default of 16.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

impl SqliteStorage {
    /// Opens (creating if needed) the store at `path` and applies its migrations.
    pub fn open(path: &Path, limits: CommitLimits) -> Result<Self, StorageError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StorageError::Unavailable(format!("{}: {e}", dir.display())))?;
        }
        let mut conn = open(path, true)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(sql_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StorageError::Unavailable(format!(
                "cannot use WAL mode (got {mode})"
            )));
        }
        embedded::migrations::runner()
            .run(&mut conn)
            .map_err(|e| StorageError::Corrupt(format!("migrations: {e}")))?;
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("plait-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, limits))
            .map_err(|e| StorageError::Unavailable(e.to_string()))?;
        Ok(SqliteStorage {
            path: path.to_path_buf(),
            writes: tx,
            readers: Arc::new(Mutex::new(Vec::new())),
        })
    }

    async fn write<T>(&self, job: impl FnOnce(Reply<T>) -> WriteJob) -> Result<T, StorageError> {
        send_write(&self.writes, job).await
    }

    async fn read<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StorageError> + Send + 'static,
    {
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = readers.lock().expect("reader pool").pop();
            let mut conn = match pooled {
                Some(c) => c,
                None => open(&path, false)?,
            };
            let out = f(&mut conn);
            let mut pool = readers.lock().expect("reader pool");
            if pool.len() < MAX_IDLE_READERS {
                pool.push(conn);
            }
            out
        })
        .await
        .map_err(|e| StorageError::Unavailable(format!("reader task: {e}")))?
    }
}

/// The writer thread: batch what is queued, one transaction, one commit.
fn writer_loop(mut conn: Connection, mut rx: mpsc::UnboundedReceiver<WriteJob>, limits: CommitLimits) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        let (mut n, mut bytes) = batch[0].weight();
        while n < limits.max_changes && bytes < limits.max_bytes {
            match rx.try_recv() {
                Ok(job) => {
                    let (dn, db) = job.weight();
                    n += dn;
                    bytes += db;
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        run_batch(&mut conn, batch);
    }
}

/// Results computed inside the transaction, delivered only after it commits.
enum Done {
    Appended(Reply<Appended>, Result<Appended, StorageError>),
    Unit(Reply<()>, Result<(), StorageError>),
    Bool(Reply<bool>, Result<bool, StorageError>),
    Ids(
        Reply<Vec<Option<ResourceId>>>,
        Result<Vec<Option<ResourceId>>, StorageError>,
    ),
}

fn run_batch(conn: &mut Connection, batch: Vec<WriteJob>) {
    let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return fail_all(batch, sql_err(e)),
    };
    let mut done = Vec::with_capacity(batch.len());
    let mut tx = tx;
    for job in batch {
        done.push(run_in_savepoint(&mut tx, job));
    }
    match tx.commit() {
        Ok(()) => {
            for d in done {
                match d {
                    Done::Appended(r, v) => drop(r.send(v)),
                    Done::Unit(r, v) => drop(r.send(v)),
                    Done::Bool(r, v) => drop(r.send(v)),
                    Done::Ids(r, v) => drop(r.send(v)),
                }
            }
        }
        Err(e) => {
            let e = sql_err(e);
            for d in done {
                match d {
                    Done::Appended(r, _) => drop(r.send(Err(e.clone()))),
                    Done::Unit(r, _) => drop(r.send(Err(e.clone()))),
                    Done::Bool(r, _) => drop(r.send(Err(e.clone()))),
                    Done::Ids(r, _) => drop(r.send(Err(e.clone()))),
                }
            }
        }
    }
}

fn fail_all(batch: Vec<WriteJob>, e: StorageError) {
    for job in batch {
        match job {
            WriteJob::Append { reply, .. } => drop(reply.send(Err(e.clone()))),
            WriteJob::Snapshot { reply, .. }
            | WriteJob::DropBefore { reply, .. }
            | WriteJob::PutSetting { reply, .. }
            | WriteJob::PutSegment { reply, .. }
            | WriteJob::PutCheckpoint { reply, .. } => drop(reply.send(Err(e.clone()))),
            WriteJob::Delete { reply, .. } => drop(reply.send(Err(e.clone()))),
            WriteJob::Create { reply, .. } => drop(reply.send(Err(e.clone()))),
        }
    }
}

/// Runs one job in a savepoint: on error only that job's work is undone.
fn run_in_savepoint(tx: &mut Transaction<'_>, job: WriteJob) -> Done {
    fn scoped<T>(
        tx: &mut Transaction<'_>,
        f: impl FnOnce(&Connection) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let sp = tx.savepoint().map_err(sql_err)?;
        match f(&sp) {
            Ok(v) => {
                sp.commit().map_err(sql_err)?;
                Ok(v)
            }
            Err(e) => {
                drop(sp); // rolls back
                Err(e)
            }
        }
    }
    match job {
        WriteJob::Append {
            target,
            changes,
            reply,
        } => Done::Appended(reply, scoped(tx, |t| append(t, target, &changes))),
        WriteJob::Snapshot {
            id,
            upto,
            data,
            reply,
        } => Done::Unit(reply, scoped(tx, |t| snapshot(t, id, upto, &data))),
        WriteJob::DropBefore { id, keep_from, reply } => {
            Done::Unit(reply, scoped(tx, |t| drop_before(t, id, keep_from)))
        }
        WriteJob::Delete { key, reply } => Done::Bool(reply, scoped(tx, |t| delete(t, &key))),
        WriteJob::Create { items, reply } => Done::Ids(reply, scoped(tx, |t| create(t, &items))),
        WriteJob::PutSetting { name, value, reply } => Done::Unit(
            reply,
            scoped(tx, |t| {
                t.execute(
                    "INSERT INTO settings (name, value) VALUES (?1, ?2)
                     ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    params![name, value],
                )
                .map(|_| ())
                .map_err(sql_err)
            }),
        ),
        WriteJob::PutSegment {
            namespace,
            seq,
            descriptor,
            ciphertext,
            reply,
        } => Done::Unit(
            reply,
            scoped(tx, |t| put_segment(t, &namespace, seq, &descriptor, &ciphertext)),
        ),
        WriteJob::PutCheckpoint {
            namespace,
            upto,
            checkpoint,
            snapshot,
            reply,
        } => Done::Unit(
            reply,
            scoped(tx, |t| {
                put_checkpoint(t, &namespace, upto, &checkpoint, &snapshot)
            }),
        ),
    }
}

/// Replaces a namespace's checkpoint with a later one and drops what it supersedes.
fn put_checkpoint(
    t: &Connection,
    namespace: &Namespace,
    upto: Seq,
    checkpoint: &[u8],
    snapshot: &[u8],
) -> Result<(), StorageError> {
    let ns = namespace.as_bytes().as_slice();
    let held: i64 = t
        .query_row(
            "SELECT COALESCE(MAX(upto), 0) FROM mirror_checkpoints WHERE namespace = ?1",
            [ns],
            |r| r.get(0),
        )
        .map_err(sql_err)?;
    if upto <= held {
        return Err(StorageError::Behind);
    }
    t.execute(
        "INSERT INTO mirror_checkpoints (namespace, upto, checkpoint, snapshot) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (namespace) DO UPDATE SET upto = excluded.upto,
           checkpoint = excluded.checkpoint, snapshot = excluded.snapshot",
        params![ns, upto, checkpoint, snapshot],
    )
    .map_err(sql_err)?;
    t.execute(
        "DELETE FROM mirror_segments WHERE namespace = ?1 AND seq <= ?2",
        params![ns, upto],
    )
    .map(|_| ())
    .map_err(sql_err)
}

/// Appends a segment to its namespace's chain if the chain ends right before it.
fn put_segment(
    t: &Connection,
    namespace: &Namespace,
    seq: Seq,
    descriptor: &[u8],
    ciphertext: &[u8],
) -> Result<(), StorageError> {
    let ns = namespace.as_bytes().as_slice();
    let last: i64 = t
        .query_row(
            "SELECT MAX((SELECT COALESCE(MAX(seq), 0) FROM mirror_segments WHERE namespace = ?1),
                        (SELECT COALESCE(MAX(upto), 0) FROM mirror_checkpoints WHERE namespace = ?1))",
            [ns],
            |r| r.get(0),
        )
        .map_err(sql_err)?;
    if last != seq - 1 {
        return Err(StorageError::Behind);
    }
    t.execute(
        "INSERT INTO mirror_segments (namespace, seq, descriptor, ciphertext) VALUES (?1, ?2, ?3, ?4)",
        params![ns, seq, descriptor, ciphertext],
    )
    .map(|_| ())
    .map_err(sql_err)
}

/// Hands a job to the writer thread and waits for its result.
async fn send_write<T>(
    writes: &mpsc::UnboundedSender<WriteJob>,
    job: impl FnOnce(Reply<T>) -> WriteJob,
) -> Result<T, StorageError> {
    let (tx, rx) = oneshot::channel();
    writes
        .send(job(tx))
        .map_err(|_| StorageError::Unavailable("the writer thread has stopped".into()))?;
    rx.await
        .map_err(|_| StorageError::Unavailable("the writer thread has stopped".into()))?
}

/// A held resource. Only this process opens the file, and in it only the resource's
/// actor appends to it, so holding needs no lock: the append is checked like any other.
struct SqliteHold {
    writes: mpsc::UnboundedSender<WriteJob>,
    id: ResourceId,
}

#[async_trait]
impl super::Hold for SqliteHold {
    fn resource(&self) -> ResourceId {
        self.id
    }

    async fn append(self: Box<Self>, after: Seq, changes: Vec<NewChange>) -> Result<Appended, StorageError> {
        let target = Target::Existing { id: self.id, after };
        send_write(&self.writes, |reply| WriteJob::Append {
            target,
            changes,
            reply,
        })
        .await
    }
}

/// One row of `sql`, prepared once per connection (`prepare_cached`).
fn cached_row<T, P: rusqlite::Params>(
    t: &Connection,
    sql: &str,
    p: P,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    t.prepare_cached(sql)?.query_row(p, f)
}

fn append(t: &Connection, target: Target, changes: &[NewChange]) -> Result<Appended, StorageError> {
    let now = now_ms();
    let (id, head) = match target {
        Target::Existing { id, after } => {
            let head: Option<Seq> =
                cached_row(t, "SELECT head_seq FROM resources WHERE id = ?1", [id], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(sql_err)?;
            match head {
                None => return Err(StorageError::Gone),
                Some(head) if head != after => return Err(StorageError::Behind),
                Some(head) => (id, head),
            }
        }
        Target::Create {
            key,
            kind,
            media_type,
        } => {
            let by = changes.first().and_then(|c| c.author.as_ref());
            match insert_resource(t, &key, kind, &media_type, now, by, 0)? {
                Some(id) => (id, 0),
                None => return Err(StorageError::Behind),
            }
        }
    };
    let mut insert = t
        .prepare_cached(
            "INSERT INTO changes (resource_id, seq, version, parents, author, at_ms, data, meta)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .map_err(sql_err)?;
    let mut blob = t
        .prepare_cached(
            "INSERT INTO blobs (hash, data, size) VALUES (?1, ?2, ?3) ON CONFLICT (hash) DO NOTHING",
        )
        .map_err(sql_err)?;
    let mut seq = head;
    let mut added: i64 = 0;
    for c in changes {
        seq += 1;
        added += c.stored_bytes() as i64;
        insert
            .execute(params![
                id,
                seq,
                columns::version_text(&c.version),
                columns::parents_text(&c.parents),
                c.author.as_ref().map(|a| a.as_bytes().to_vec()),
                c.at_ms,
                c.data.as_ref(),
                c.meta
            ])
            .map_err(sql_err)?;
        if let Some(b) = &c.blob {
            blob.execute(params![c.data.as_ref(), b.as_ref(), b.len() as i64])
                .map_err(sql_err)?;
        }
    }
    t.prepare_cached("UPDATE resources SET head_seq = ?2, updated_ms = ?3, bytes = bytes + ?4 WHERE id = ?1")
        .and_then(|mut q| q.execute(params![id, seq, now, added]))
        .map_err(sql_err)?;
    Ok(Appended {
        resource: id,
        first_seq: head + 1,
        last_seq: seq,
    })
}

/// A new resource's row, holding `bytes` so far; `None` if the resource exists.
fn insert_resource(
    t: &Connection,
    key: &ResourceKey,
    kind: Kind,
    media_type: &str,
    now: i64,
    created_by: Option<&plait_bridge::Identity>,
    bytes: i64,
) -> Result<Option<ResourceId>, StorageError> {
    let made = t
        .prepare_cached(
            "INSERT INTO resources (namespace, path, kind, media_type, head_seq, created_ms, updated_ms, created_by, bytes)
             VALUES (?1, ?2, ?3, ?4, 0, ?5, ?5, ?6, ?7) ON CONFLICT (namespace, path) DO NOTHING",
        )
        .and_then(|mut q| {
            q.execute(params![
                key.namespace.as_bytes().as_slice(),
                key.path.as_str(),
                kind.code(),
                media_type,
                now,
                created_by.map(|a| a.as_bytes().as_slice()),
                bytes
            ])
        })
        .map_err(sql_err)?;
    Ok((made == 1).then(|| t.last_insert_rowid()))
}

/// Creates the resources of `items` that do not exist yet, each with its first content
/// (see [`Storage::create`]).
fn create(t: &Connection, items: &[NewResource]) -> Result<Vec<Option<ResourceId>>, StorageError> {
    let now = now_ms();
    let mut ids = Vec::with_capacity(items.len());
    for r in items {
        let id = match &r.first {
            First::Changes(changes) => {
                let target = Target::Create {
                    key: r.key.clone(),
                    kind: r.kind,
                    media_type: r.media_type.clone(),
                };
                match append(t, target, changes) {
                    Ok(a) => Some(a.resource),
                    Err(StorageError::Behind) => None,
                    Err(e) => return Err(e),
                }
            }
            First::Snapshot(data) => {
                let id = insert_resource(t, &r.key, r.kind, &r.media_type, now, None, data.len() as i64)?;
                if let Some(id) = id {
                    t.prepare_cached(
                        "INSERT INTO snapshots (resource_id, upto_seq, data, at_ms) VALUES (?1, 0, ?2, ?3)",
                    )
                    .and_then(|mut q| q.execute(params![id, data.as_ref(), now]))
                    .map_err(sql_err)?;
                }
                id
            }
        };
        ids.push(id);
    }
    Ok(ids)
}

fn snapshot(t: &Connection, id: ResourceId, upto: Seq, data: &[u8]) -> Result<(), StorageError> {
    let exists: bool = t
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM resources WHERE id = ?1)",
            [id],
            |r| r.get(0),
        )
        .map_err(sql_err)?;
    if !exists {
        return Err(StorageError::Gone);
    }
    t.execute(
        "INSERT INTO snapshots (resource_id, upto_seq, data, at_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (resource_id) DO UPDATE SET upto_seq = excluded.upto_seq, data = excluded.data, at_ms = excluded.at_ms
         WHERE excluded.upto_seq >= snapshots.upto_seq",
        params![id, upto, data, now_ms()],
    )
    .map_err(sql_err)?;
    t.execute(
        "DELETE FROM changes WHERE resource_id = ?1 AND seq <= ?2",
        params![id, upto],
    )
    .map_err(sql_err)?;
    recount(t, id)
}

/// Deletes blobs among `hashes` that no change refers to any more.
fn collect_blobs(t: &Connection, hashes: &[Vec<u8>]) -> Result<(), StorageError> {
    let mut stmt = t
        .prepare_cached(
            "DELETE FROM blobs WHERE hash = ?1
             AND NOT EXISTS (SELECT 1 FROM changes WHERE meta IS NOT NULL AND data = ?1)",
        )
        .map_err(sql_err)?;
    for h in hashes {
        stmt.execute([h]).map_err(sql_err)?;
    }
    Ok(())
}

fn blob_hashes(t: &Connection, sql: &str, p: impl rusqlite::Params) -> Result<Vec<Vec<u8>>, StorageError> {
    let mut stmt = t.prepare(sql).map_err(sql_err)?;
    let rows = stmt.query_map(p, |r| r.get::<_, Vec<u8>>(0)).map_err(sql_err)?;
    rows.collect::<Result<_, _>>().map_err(sql_err)
}

/// Recounts the bytes a resource occupies (after its log was folded or trimmed).
fn recount(t: &Connection, id: ResourceId) -> Result<(), StorageError> {
    t.prepare_cached(
        "UPDATE resources SET bytes =
            COALESCE((SELECT length(data) FROM snapshots WHERE resource_id = ?1), 0)
          + COALESCE((SELECT SUM(length(c.data) + COALESCE(b.size, 0)) FROM changes c
                      LEFT JOIN blobs b ON c.meta IS NOT NULL AND b.hash = c.data
                      WHERE c.resource_id = ?1), 0)
         WHERE id = ?1",
    )
    .and_then(|mut q| q.execute([id]))
    .map(|_| ())
    .map_err(sql_err)
}

fn drop_before(t: &Connection, id: ResourceId, keep_from: Seq) -> Result<(), StorageError> {
    let hashes = blob_hashes(
        t,
        "SELECT data FROM changes WHERE resource_id = ?1 AND seq < ?2 AND meta IS NOT NULL",
        params![id, keep_from],
    )?;
    t.execute(
        "DELETE FROM changes WHERE resource_id = ?1 AND seq < ?2",
        params![id, keep_from],
    )
    .map_err(sql_err)?;
    collect_blobs(t, &hashes)?;
    recount(t, id)
}

fn delete(t: &Connection, key: &ResourceKey) -> Result<bool, StorageError> {
    let ns = key.namespace.as_bytes().as_slice();
    let hashes = blob_hashes(
        t,
        "SELECT c.data FROM changes c JOIN resources r ON r.id = c.resource_id
         WHERE r.namespace = ?1 AND r.path = ?2 AND c.meta IS NOT NULL",
        params![ns, key.path.as_str()],
    )?;
    let n = t
        .execute(
            "DELETE FROM resources WHERE namespace = ?1 AND path = ?2",
            params![ns, key.path.as_str()],
        )
        .map_err(sql_err)?;
    collect_blobs(t, &hashes)?;
    Ok(n > 0)
}

fn read_changes(conn: &Connection, id: ResourceId, after: Seq) -> Result<Vec<StoredChange>, StorageError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT seq, version, parents, author, at_ms, data, meta FROM changes
             WHERE resource_id = ?1 AND seq > ?2 ORDER BY seq",
        )
        .map_err(sql_err)?;
    let rows = stmt
        .query_map(params![id, after], |r| {
            Ok((
                r.get::<_, Seq>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<Vec<u8>>>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, Vec<u8>>(5)?,
                r.get::<_, Option<String>>(6)?,
            ))
        })
        .map_err(sql_err)?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, version, parents, author, at_ms, data, meta) = row.map_err(sql_err)?;
        out.push(StoredChange {
            seq,
            version: columns::version_from(&version)?,
            parents: columns::parents_from(&parents)?,
            author: identity_from_bytes(author)?,
            at_ms,
            data: data.into(),
            meta,
        });
    }
    Ok(out)
}

#[async_trait]
impl Storage for SqliteStorage {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn load(&self, key: &ResourceKey) -> Result<Option<LoadedResource>, StorageError> {
        let key = key.clone();
        self.read(move |conn| {
            let t = conn.transaction().map_err(sql_err)?;
            // Every actor's first read: its statements are prepared once per connection.
            let row: Option<(i64, i16, String, Seq)> = cached_row(
                &t,
                "SELECT id, kind, media_type, head_seq FROM resources WHERE namespace = ?1 AND path = ?2",
                params![key.namespace.as_bytes().as_slice(), key.path.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(sql_err)?;
            let Some((id, code, media_type, head_seq)) = row else {
                return Ok(None);
            };
            let snapshot: Option<(Seq, Vec<u8>)> = cached_row(
                &t,
                "SELECT upto_seq, data FROM snapshots WHERE resource_id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql_err)?;
            let after = snapshot.as_ref().map_or(0, |s| s.0);
            let changes = read_changes(&t, id, after)?;
            let blob = match changes.last() {
                Some(c) if c.meta.is_some() => Some(
                    cached_row(
                        &t,
                        "SELECT data FROM blobs WHERE hash = ?1",
                        [c.data.as_ref()],
                        |r| r.get::<_, Vec<u8>>(0),
                    )
                    .optional()
                    .map_err(sql_err)?
                    .ok_or_else(|| StorageError::Corrupt("a bytes value is missing".into()))?
                    .into(),
                ),
                _ => None,
            };
            Ok(Some(LoadedResource {
                row: ResourceRow {
                    id,
                    kind: kind_from_code(code)?,
                    media_type,
                    head_seq,
                },
                snapshot: snapshot.map(|(s, d)| (s, d.into())),
                changes,
                blob,
            }))
        })
        .await
    }

    async fn append(&self, target: Target, changes: Vec<NewChange>) -> Result<Appended, StorageError> {
        self.write(|reply| WriteJob::Append {
            target,
            changes,
            reply,
        })
        .await
    }

    async fn hold(&self, id: ResourceId) -> Result<Box<dyn super::Hold>, StorageError> {
        let exists = self
            .read(move |conn| {
                conn.query_row("SELECT 1 FROM resources WHERE id = ?1", [id], |_| Ok(()))
                    .optional()
                    .map_err(sql_err)
            })
            .await?;
        exists.ok_or(StorageError::Gone)?;
        Ok(Box::new(SqliteHold {
            writes: self.writes.clone(),
            id,
        }))
    }

    async fn changes_after(&self, id: ResourceId, after: Seq) -> Result<Vec<StoredChange>, StorageError> {
        self.read(move |conn| read_changes(conn, id, after)).await
    }

    async fn save_snapshot(&self, id: ResourceId, upto: Seq, data: Bytes) -> Result<(), StorageError> {
        self.write(|reply| WriteJob::Snapshot {
            id,
            upto,
            data,
            reply,
        })
        .await
    }

    async fn drop_changes_before(&self, id: ResourceId, keep_from: Seq) -> Result<(), StorageError> {
        self.write(|reply| WriteJob::DropBefore { id, keep_from, reply })
            .await
    }

    async fn delete(&self, key: &ResourceKey) -> Result<bool, StorageError> {
        let key = key.clone();
        self.write(|reply| WriteJob::Delete { key, reply }).await
    }

    async fn create(&self, items: Vec<NewResource>) -> Result<Vec<Option<ResourceId>>, StorageError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        self.write(|reply| WriteJob::Create { items, reply }).await
    }

    async fn list(
        &self,
        namespace: &Namespace,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ResourceSummary>, StorageError> {
        let ns = namespace.as_bytes().to_vec();
        let lower = match after {
            Some(a) if a >= prefix => a.to_string(),
            _ => prefix.to_string(),
        };
        let strict = after.is_some_and(|a| a >= prefix);
        let upper = prefix_upper_bound(prefix);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT path, kind, media_type, head_seq FROM resources
                     WHERE namespace = ?1
                       AND (path > ?2 OR (path = ?2 AND NOT ?3))
                       AND (?4 IS NULL OR path < ?4)
                     ORDER BY path LIMIT ?5",
                )
                .map_err(sql_err)?;
            let rows = stmt
                .query_map(params![ns, lower, strict, upper, limit as i64], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i16>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Seq>(3)?,
                    ))
                })
                .map_err(sql_err)?;
            let mut out = Vec::new();
            for row in rows {
                let (path, code, media_type, head_seq) = row.map_err(sql_err)?;
                out.push(ResourceSummary {
                    path: ResourcePath::new(path).map_err(|e| StorageError::Corrupt(e.to_string()))?,
                    kind: kind_from_code(code)?,
                    media_type,
                    head_seq,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn namespace_bytes(&self, namespace: &Namespace) -> Result<u64, StorageError> {
        let ns = namespace.as_bytes().to_vec();
        self.read(move |conn| {
            conn.query_row(
                "SELECT COALESCE(SUM(bytes), 0) FROM resources WHERE namespace = ?1",
                [ns],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n.max(0) as u64)
            .map_err(sql_err)
        })
        .await
    }

    async fn stored_bytes(&self) -> Result<u64, StorageError> {
        self.read(|conn| {
            conn.query_row("SELECT COALESCE(SUM(bytes), 0) FROM resources", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n.max(0) as u64)
            .map_err(sql_err)
        })
        .await
    }

    async fn author_bytes(&self, author: &plait_bridge::Identity) -> Result<u64, StorageError> {
        let by = author.as_bytes().to_vec();
        self.read(move |conn| {
            conn.query_row(
                "SELECT COALESCE(SUM(bytes), 0) FROM resources WHERE created_by = ?1",
                [by],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n.max(0) as u64)
            .map_err(sql_err)
        })
        .await
    }

    async fn key_of(&self, id: ResourceId) -> Result<Option<ResourceKey>, StorageError> {
        self.read(move |conn| {
            let row: Option<(Vec<u8>, String)> = conn
                .query_row("SELECT namespace, path FROM resources WHERE id = ?1", [id], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
                .map_err(sql_err)?;
            row.map(|(ns, path)| key_from_row(&ns, path)).transpose()
        })
        .await
    }

    async fn put_segment(
        &self,
        namespace: &Namespace,
        seq: Seq,
        descriptor: Bytes,
        ciphertext: Bytes,
    ) -> Result<(), StorageError> {
        let namespace = *namespace;
        self.write(|reply| WriteJob::PutSegment {
            namespace,
            seq,
            descriptor,
            ciphertext,
            reply,
        })
        .await
    }

    async fn segments(
        &self,
        namespace: &Namespace,
        from: Seq,
        to: Seq,
        max_bytes: u64,
    ) -> Result<Vec<StoredSegment>, StorageError> {
        let ns = namespace.as_bytes().to_vec();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT seq, descriptor, ciphertext FROM mirror_segments
                     WHERE namespace = ?1 AND seq >= ?2 AND seq <= ?3 ORDER BY seq",
                )
                .map_err(sql_err)?;
            let mut rows = stmt.query(params![ns, from, to]).map_err(sql_err)?;
            let mut out = Vec::new();
            let mut total = 0u64;
            while let Some(r) = rows.next().map_err(sql_err)? {
                let descriptor: Vec<u8> = r.get(1).map_err(sql_err)?;
                let ciphertext: Vec<u8> = r.get(2).map_err(sql_err)?;
                total += (descriptor.len() + ciphertext.len()) as u64;
                if total > max_bytes && !out.is_empty() {
                    break;
                }
                out.push(StoredSegment {
                    seq: r.get(0).map_err(sql_err)?,
                    descriptor: descriptor.into(),
                    ciphertext: ciphertext.into(),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn descriptors(
        &self,
        namespace: &Namespace,
        from: Seq,
        limit: usize,
        take: Take,
    ) -> Result<Vec<StoredSegment>, StorageError> {
        let ns = namespace.as_bytes().to_vec();
        let limit = limit.min(i64::MAX as usize) as i64;
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT seq, descriptor, substr(ciphertext, 1, ?4) FROM mirror_segments
                     WHERE namespace = ?1 AND seq >= ?2 ORDER BY seq LIMIT ?3",
                )
                .map_err(sql_err)?;
            let rows = stmt
                .query_map(params![ns, from, limit, take.bytes()], |r| {
                    Ok(StoredSegment {
                        seq: r.get(0)?,
                        descriptor: r.get::<_, Vec<u8>>(1)?.into(),
                        ciphertext: r.get::<_, Vec<u8>>(2)?.into(),
                    })
                })
                .map_err(sql_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(sql_err)
        })
        .await
    }

    async fn last_segment(&self, namespace: &Namespace) -> Result<Option<StoredSegment>, StorageError> {
        let ns = namespace.as_bytes().to_vec();
        self.read(move |conn| {
            conn.query_row(
                "SELECT seq, descriptor FROM mirror_segments WHERE namespace = ?1 ORDER BY seq DESC LIMIT 1",
                [ns],
                |r| {
                    Ok(StoredSegment {
                        seq: r.get(0)?,
                        descriptor: r.get::<_, Vec<u8>>(1)?.into(),
                        ciphertext: Bytes::new(),
                    })
                },
            )
            .optional()
            .map_err(sql_err)
        })
        .await
    }

    async fn segment_bytes(&self, namespace: &Namespace) -> Result<u64, StorageError> {
        let ns = namespace.as_bytes().to_vec();
        self.read(move |conn| {
            conn.query_row(
                "SELECT (SELECT COALESCE(SUM(LENGTH(descriptor) + LENGTH(ciphertext)), 0)
                         FROM mirror_segments WHERE namespace = ?1)
                      + (SELECT COALESCE(SUM(LENGTH(checkpoint) + LENGTH(snapshot)), 0)
                         FROM mirror_checkpoints WHERE namespace = ?1)",
                [ns],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n.max(0) as u64)
            .map_err(sql_err)
        })
        .await
    }

    async fn segment_bytes_after(&self, namespace: &Namespace, after: Seq) -> Result<u64, StorageError> {
        let ns = namespace.as_bytes().to_vec();
        self.read(move |conn| {
            conn.query_row(
                "SELECT COALESCE(SUM(LENGTH(descriptor) + LENGTH(ciphertext)), 0)
                 FROM mirror_segments WHERE namespace = ?1 AND seq > ?2",
                params![ns, after],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n.max(0) as u64)
            .map_err(sql_err)
        })
        .await
    }

    async fn put_checkpoint(
        &self,
        namespace: &Namespace,
        upto: Seq,
        checkpoint: Bytes,
        snapshot: Bytes,
    ) -> Result<(), StorageError> {
        let namespace = *namespace;
        self.write(|reply| WriteJob::PutCheckpoint {
            namespace,
            upto,
            checkpoint,
            snapshot,
            reply,
        })
        .await
    }

    async fn checkpoint(
        &self,
        namespace: &Namespace,
        take: Take,
    ) -> Result<Option<StoredCheckpoint>, StorageError> {
        let ns = namespace.as_bytes().to_vec();
        self.read(move |conn| {
            // SQLite's substr of a zero-length blob is NULL: a device chain's checkpoint
            // has no snapshot.
            conn.query_row(
                "SELECT upto, checkpoint, coalesce(substr(snapshot, 1, ?2), x'')
                 FROM mirror_checkpoints WHERE namespace = ?1",
                params![ns, take.bytes()],
                |r| {
                    Ok(StoredCheckpoint {
                        upto: r.get(0)?,
                        checkpoint: r.get::<_, Vec<u8>>(1)?.into(),
                        snapshot: r.get::<_, Vec<u8>>(2)?.into(),
                    })
                },
            )
            .optional()
            .map_err(sql_err)
        })
        .await
    }

    async fn get_setting(&self, name: &str) -> Result<Option<String>, StorageError> {
        let name = name.to_string();
        self.read(move |conn| {
            conn.query_row("SELECT value FROM settings WHERE name = ?1", [name], |r| r.get(0))
                .optional()
                .map_err(sql_err)
        })
        .await
    }

    async fn put_setting(&self, name: &str, value: &str) -> Result<(), StorageError> {
        let (name, value) = (name.to_string(), value.to_string());
        self.write(|reply| WriteJob::PutSetting { name, value, reply })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_storage_suite() {
        let dir = tempfile::tempdir().unwrap();
        super::super::suite::run(|| {
            let path = dir.path().join(format!("{}.db", rand::random::<u64>()));
            async move {
                Arc::new(SqliteStorage::open(&path, CommitLimits::default()).unwrap()) as Arc<dyn Storage>
            }
        })
        .await;
    }

    /// A store made before V6 (bytes values in a WITHOUT ROWID table) keeps its values,
    /// moved to the table with row ids.
    #[tokio::test]
    async fn values_stored_before_blobs_had_row_ids_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let value: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let hash = blake3::hash(&value);
        let ns = plait_bridge::Keypair::generate().identity();
        {
            let mut conn = open(&path, true).unwrap();
            embedded::migrations::runner()
                .set_target(refinery::Target::Version(5))
                .run(&mut conn)
                .unwrap();
            conn.execute(
                "INSERT INTO resources (namespace, path, kind, media_type, head_seq, created_ms, updated_ms)
                 VALUES (?1, 'img', ?2, 'image/png', 1, 1, 1)",
                params![ns.as_bytes().as_slice(), Kind::Bytes.code()],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO changes (resource_id, seq, version, parents, at_ms, data, meta)
                 VALUES (1, 1, 'a-0', '', 1, ?1, 'image/png')",
                [hash.as_bytes().as_slice()],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO blobs (hash, data, size) VALUES (?1, ?2, ?3)",
                params![hash.as_bytes().as_slice(), value, value.len() as i64],
            )
            .unwrap();
        }
        let s = SqliteStorage::open(&path, CommitLimits::default()).unwrap();
        let key = ResourceKey::new(ns, ResourcePath::new("img").unwrap());
        let l = s.load(&key).await.unwrap().unwrap();
        assert_eq!(l.blob.as_deref(), Some(&value[..]));
        let sql: String = open(&path, false)
            .unwrap()
            .query_row("SELECT sql FROM sqlite_master WHERE name = 'blobs'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert!(!sql.contains("WITHOUT ROWID"), "{sql}");
    }
}
