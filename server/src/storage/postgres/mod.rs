//! Postgres storage: tokio-postgres with a deadpool pool.
//!
//! The schema is the numbered SQL in `migrations/`, embedded at build time and applied at
//! start-up by refinery under an advisory lock, so several processes starting at once
//! migrate once.
//!
//! Appends are group-committed: callers queue their appends; [`COMMITTERS`] worker tasks
//! each take everything queued (up to [`CommitLimits`]) and write it in one transaction of
//! five statements whatever the batch size (create new resources, lock the resource rows
//! in id order and read their `head_seq` to check what each append was made on, advance
//! `head_seq`, insert all changes, insert all blobs). If a batch fails, its appends are
//! retried one by one so a bad one fails alone.
//! `synchronous_commit` is left on: the commit returns after the WAL is flushed. The
//! statements are prepared once per pooled connection ([`cached`]), and the notice other
//! processes wait for is sent in one round trip after the commit.

mod dump;
pub mod tls;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_postgres::NoTls;

use super::{
    Appended, CommitLimits, First, LoadedResource, NewChange, NewResource, Notice, ResourceId, ResourceRow,
    ResourceSummary, Seq, Storage, StorageError, StoredChange, StoredCheckpoint, StoredSegment, Take, Target,
    columns, identity_from_bytes, key_from_row, kind_from_code, now_ms, prefix_upper_bound,
};
use crate::model::{Kind, Namespace, ResourceKey, ResourcePath};

mod embedded {
    refinery::embed_migrations!("../migrations");
}

/// Concurrent group-commit workers (each holds one pooled connection while committing).
pub const COMMITTERS: usize = 3;

/// Key of the advisory lock taken while migrating.
const MIGRATION_LOCK: i64 = 0x706c_6169_745f_6d69;

/// The channel processes sharing a database wake each other on.
const CHANNEL: &str = "plait_changes";
/// Postgres refuses NOTIFY payloads of 8000 bytes or more.
const MAX_PAYLOAD: usize = 7_800;
/// How long to wait for a pooled connection, or for a new one, before answering 503.
const POOL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The Postgres backend.
pub struct PostgresStorage {
    pool: Pool,
    appends: mpsc::UnboundedSender<AppendJob>,
    /// Names this process in its notices, so it can ignore its own.
    origin: Arc<str>,
    config: tokio_postgres::Config,
    /// The TLS connector for connections of its own (the notice listener), as the pool's.
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    notices_taken: std::sync::atomic::AtomicBool,
}

struct AppendJob {
    target: Target,
    changes: Vec<NewChange>,
    reply: oneshot::Sender<Result<Appended, StorageError>>,
}

fn pg_err(e: tokio_postgres::Error) -> StorageError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        if code == "23503" {
            return StorageError::Gone;
        }
        if code.starts_with("08") || code.starts_with("57P") || code.starts_with("53") {
            return StorageError::Unavailable(db.message().to_string());
        }
        return StorageError::Failed(format!("{}: {}", code, db.message()));
    }
    // With its causes: "error performing TLS handshake: invalid peer certificate: …".
    let mut msg = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        msg.push_str(&format!(": {c}"));
        cause = c.source();
    }
    StorageError::Unavailable(msg)
}

fn pool_err(e: deadpool_postgres::PoolError) -> StorageError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_err(e),
        other => StorageError::Unavailable(other.to_string()),
    }
}

impl PostgresStorage {
    /// Connects, migrates, and starts the committers.
    pub async fn connect(url: &str, pool_size: usize, limits: CommitLimits) -> Result<Self, StorageError> {
        let tls::Target { mut config, tls } = tls::target(url)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(POOL_TIMEOUT);
        }
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match tls.clone() {
            Some(tls) => Manager::from_config(config.clone(), tls, manager_config),
            None => Manager::from_config(config.clone(), NoTls, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(COMMITTERS + 1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .build()
            .map_err(|e| StorageError::Unavailable(e.to_string()))?;
        {
            let mut client = pool.get().await.map_err(pool_err)?;
            client
                .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(pg_err)?;
            let client: &mut tokio_postgres::Client = &mut client;
            let migrated = embedded::migrations::runner().run_async(client).await;
            client
                .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(pg_err)?;
            migrated.map_err(|e| StorageError::Failed(format!("migrations: {e}")))?;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(Mutex::new(rx));
        let origin: Arc<str> = format!("{:016x}", rand::random::<u64>()).into();
        for _ in 0..COMMITTERS {
            tokio::spawn(committer(pool.clone(), rx.clone(), limits, origin.clone()));
        }
        Ok(PostgresStorage {
            pool,
            appends: tx,
            origin,
            config,
            tls,
            notices_taken: std::sync::atomic::AtomicBool::new(false),
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StorageError> {
        self.pool.get().await.map_err(pool_err)
    }
}

/// A group-commit worker: take what is queued, commit it as one transaction.
async fn committer(
    pool: Pool,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<AppendJob>>>,
    limits: CommitLimits,
    origin: Arc<str>,
) {
    loop {
        let batch = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else { return };
            let weight = |j: &AppendJob| j.changes.iter().map(NewChange::stored_bytes).sum::<usize>();
            let (mut n, mut bytes) = (first.changes.len(), weight(&first));
            let mut batch = vec![first];
            while n < limits.max_changes && bytes < limits.max_bytes {
                match rx.try_recv() {
                    Ok(job) => {
                        n += job.changes.len();
                        bytes += weight(&job);
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
            batch
        };
        let mut client = match pool.get().await {
            Ok(c) => c,
            Err(e) => {
                let e = pool_err(e);
                for j in batch {
                    let _ = j.reply.send(Err(e.clone()));
                }
                continue;
            }
        };
        let jobs: Vec<(Target, Vec<NewChange>)> = batch
            .iter()
            .map(|j| (j.target.clone(), j.changes.clone()))
            .collect();
        match commit_batch(&mut client, &jobs).await {
            Ok(results) => {
                let entries: Vec<String> = results.iter().flatten().map(notice_entry).collect();
                for (j, r) in batch.into_iter().zip(results) {
                    let _ = j.reply.send(r);
                }
                notify(&mut client, &origin, &entries).await;
            }
            Err(e) if batch.len() == 1 => {
                let _ = batch.into_iter().next().map(|j| j.reply.send(Err(e)));
            }
            Err(StorageError::Unavailable(m)) => {
                for j in batch {
                    let _ = j.reply.send(Err(StorageError::Unavailable(m.clone())));
                }
            }
            Err(_) => {
                // Something in the batch was refused: retry each alone.
                for j in batch {
                    let one = [(j.target.clone(), j.changes.clone())];
                    let r = match commit_batch(&mut client, &one).await {
                        Ok(mut v) => v.pop().unwrap_or(Err(StorageError::Failed("no result".into()))),
                        Err(e) => Err(e),
                    };
                    let _ = j.reply.send(r);
                }
            }
        }
    }
}

/// Writes a batch of appends in one transaction. Per-append refusals that can be decided
/// without failing the transaction (a deleted resource, one that holds changes the append
/// was not made on) are per-job results.
async fn commit_batch(
    client: &mut deadpool_postgres::Object,
    jobs: &[(Target, Vec<NewChange>)],
) -> Result<Vec<Result<Appended, StorageError>>, StorageError> {
    let tx = client.transaction().await.map_err(pg_err)?;
    let out = write_batch(&tx, jobs).await?;
    tx.commit().await.map_err(pg_err)?;
    Ok(out)
}

/// A resource row to make: its key, kind, media type, who created it (the author of its
/// first change) and the bytes it holds so far.
type NewRow<'a> = (&'a ResourceKey, Kind, &'a str, Option<&'a [u8]>, i64);

/// Makes the rows of resources that do not exist yet, in one statement; the ids of those
/// made, by namespace and path (a resource that exists already has none).
async fn insert_resources<C: deadpool_postgres::GenericClient + Sync>(
    tx: &C,
    rows: &[NewRow<'_>],
) -> Result<HashMap<(Vec<u8>, String), ResourceId>, StorageError> {
    if rows.is_empty() {
        return Ok(HashMap::new());
    }
    let ns: Vec<&[u8]> = rows.iter().map(|r| r.0.namespace.as_bytes().as_slice()).collect();
    let paths: Vec<&str> = rows.iter().map(|r| r.0.path.as_str()).collect();
    let kinds: Vec<i16> = rows.iter().map(|r| r.1.code()).collect();
    let types: Vec<&str> = rows.iter().map(|r| r.2).collect();
    let by: Vec<Option<&[u8]>> = rows.iter().map(|r| r.3).collect();
    let bytes: Vec<i64> = rows.iter().map(|r| r.4).collect();
    let insert = cached(
        tx,
        "INSERT INTO resources (namespace, path, kind, media_type, created_by, bytes)
         SELECT * FROM UNNEST($1::bytea[], $2::text[], $3::int2[], $4::text[], $5::bytea[], $6::int8[])
         ON CONFLICT (namespace, path) DO NOTHING
         RETURNING id, namespace, path",
    )
    .await?;
    Ok(tx
        .query(&insert, &[&ns, &paths, &kinds, &types, &by, &bytes])
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| ((r.get::<_, Vec<u8>>(1), r.get::<_, String>(2)), r.get(0)))
        .collect())
}

/// Where a resource's row is found in what [`insert_resources`] made.
fn row_key(key: &ResourceKey) -> (Vec<u8>, String) {
    (key.namespace.as_bytes().to_vec(), key.path.as_str().to_string())
}

/// The statements of [`commit_batch`], in a transaction the caller commits.
async fn write_batch<C: deadpool_postgres::GenericClient + Sync>(
    tx: &C,
    jobs: &[(Target, Vec<NewChange>)],
) -> Result<Vec<Result<Appended, StorageError>>, StorageError> {
    let mut results: Vec<Option<Result<(ResourceId, Seq), StorageError>>> = vec![None; jobs.len()];

    // 1. Create the resources to be created; one that exists already (another writer just
    //    made it) is not what those changes were made on.
    let creates: Vec<(usize, NewRow<'_>)> = jobs
        .iter()
        .enumerate()
        .filter_map(|(i, (t, changes))| match t {
            Target::Create {
                key,
                kind,
                media_type,
            } => {
                let by = changes
                    .first()
                    .and_then(|c| c.author.as_ref())
                    .map(|a| a.as_bytes().as_slice());
                Some((i, (key, *kind, media_type.as_str(), by, 0)))
            }
            Target::Existing { .. } => None,
        })
        .collect();
    let rows: Vec<NewRow<'_>> = creates.iter().map(|c| c.1).collect();
    let made = insert_resources(tx, &rows).await?;
    for (i, (key, ..)) in &creates {
        let id = made.get(&row_key(key));
        results[*i] = Some(id.map(|id| (*id, 0)).ok_or(StorageError::Behind));
    }
    for (i, (t, _)) in jobs.iter().enumerate() {
        if let Target::Existing { id, after } = t {
            results[i] = Some(Ok((*id, *after)));
        }
    }

    // 2. Lock the rows in id order (several processes may commit at once), check that each
    //    append was made on what its resource holds, then advance each resource's
    //    head_seq by the number of changes going to it.
    let mut ids: Vec<i64> = results
        .iter()
        .filter_map(|r| r.as_ref().and_then(|r| r.as_ref().ok()).map(|(id, _)| *id))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let lock = cached(
        tx,
        "SELECT id, head_seq FROM resources WHERE id = ANY($1) ORDER BY id FOR UPDATE",
    )
    .await?;
    let mut head: HashMap<i64, i64> = tx
        .query(&lock, &[&ids])
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut counts: HashMap<i64, i64> = HashMap::new();
    let mut added: HashMap<i64, i64> = HashMap::new();
    let mut checked: Vec<Option<Result<ResourceId, StorageError>>> = Vec::with_capacity(jobs.len());
    for (i, (_, changes)) in jobs.iter().enumerate() {
        let r = match results[i].take().expect("every job has a target") {
            Err(e) => Err(e),
            Ok((id, after)) => match head.get_mut(&id) {
                None => Err(StorageError::Gone),
                Some(h) if *h != after => Err(StorageError::Behind),
                Some(h) => {
                    *h += changes.len() as i64;
                    *counts.entry(id).or_default() += changes.len() as i64;
                    *added.entry(id).or_default() +=
                        changes.iter().map(|c| c.stored_bytes() as i64).sum::<i64>();
                    Ok(id)
                }
            },
        };
        checked.push(Some(r));
    }
    let mut results = checked;
    let ids: Vec<i64> = {
        let mut v: Vec<i64> = counts.keys().copied().collect();
        v.sort_unstable();
        v
    };
    let ns: Vec<i64> = ids.iter().map(|id| counts[id]).collect();
    let bs: Vec<i64> = ids.iter().map(|id| added[id]).collect();
    let advance = cached(
        tx,
        "UPDATE resources r SET head_seq = r.head_seq + d.n, bytes = r.bytes + d.b, updated_at = now()
         FROM UNNEST($1::int8[], $2::int8[], $3::int8[]) AS d(id, n, b)
         WHERE r.id = d.id RETURNING r.id, r.head_seq",
    )
    .await?;
    let rows = tx.query(&advance, &[&ids, &ns, &bs]).await.map_err(pg_err)?;
    // Next free seq per resource, counting down from the new head in job order.
    let mut next: HashMap<i64, i64> = HashMap::new();
    for r in rows {
        let (id, head): (i64, i64) = (r.get(0), r.get(1));
        next.insert(id, head - counts[&id] + 1);
    }

    // 3. All changes and blobs in one statement each.
    let mut c_res = Vec::new();
    let mut c_seq = Vec::new();
    let mut c_ver = Vec::new();
    let mut c_par = Vec::new();
    let mut c_auth: Vec<Option<&[u8]>> = Vec::new();
    let mut c_at = Vec::new();
    let mut c_data: Vec<&[u8]> = Vec::new();
    let mut c_meta: Vec<Option<&str>> = Vec::new();
    let mut b_hash: Vec<&[u8]> = Vec::new();
    let mut b_data: Vec<&[u8]> = Vec::new();
    let mut b_size: Vec<i64> = Vec::new();
    let mut out = Vec::with_capacity(jobs.len());
    for (i, (_, changes)) in jobs.iter().enumerate() {
        let r = match results[i].take().expect("every job has a target") {
            Err(e) => Err(e),
            Ok(id) => match next.get_mut(&id) {
                None => Err(StorageError::Gone),
                Some(seq) => {
                    let first = *seq;
                    for c in changes {
                        c_res.push(id);
                        c_seq.push(*seq);
                        c_ver.push(columns::version_text(&c.version));
                        c_par.push(columns::parents_text(&c.parents));
                        c_auth.push(c.author.as_ref().map(|a| a.as_bytes().as_slice()));
                        c_at.push(c.at_ms);
                        c_data.push(c.data.as_ref());
                        c_meta.push(c.meta.as_deref());
                        if let Some(b) = &c.blob {
                            b_hash.push(c.data.as_ref());
                            b_data.push(b.as_ref());
                            b_size.push(b.len() as i64);
                        }
                        *seq += 1;
                    }
                    Ok(Appended {
                        resource: id,
                        first_seq: first,
                        last_seq: *seq - 1,
                    })
                }
            },
        };
        out.push(r);
    }
    if !c_res.is_empty() {
        let insert = cached(
            tx,
            "INSERT INTO changes (resource_id, seq, version, parents, author, at_ms, data, meta)
             SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::text[], $4::text[], $5::bytea[], $6::int8[], $7::bytea[], $8::text[])",
        )
        .await?;
        tx.execute(
            &insert,
            &[&c_res, &c_seq, &c_ver, &c_par, &c_auth, &c_at, &c_data, &c_meta],
        )
        .await
        .map_err(pg_err)?;
    }
    if !b_hash.is_empty() {
        let insert = cached(
            tx,
            "INSERT INTO blobs (hash, data, size) SELECT * FROM UNNEST($1::bytea[], $2::bytea[], $3::int8[])
             ON CONFLICT (hash) DO NOTHING",
        )
        .await?;
        tx.execute(&insert, &[&b_hash, &b_data, &b_size])
            .await
            .map_err(pg_err)?;
    }
    Ok(out)
}

/// A statement prepared once per pooled connection: a statement given as text is parsed
/// and described by the server on every call, one round trip more per statement.
async fn cached<C: deadpool_postgres::GenericClient + Sync>(
    client: &C,
    sql: &str,
) -> Result<tokio_postgres::Statement, StorageError> {
    client.prepare_cached(sql).await.map_err(pg_err)
}

/// How an append is told in a notice (see [`parse_notice`]).
fn notice_entry(a: &Appended) -> String {
    format!(
        "{}:{}{}",
        a.resource,
        a.last_seq,
        if a.first_seq == 1 { ":c" } else { "" }
    )
}

/// A resource held for one append: an open transaction on a connection of its own that
/// holds the resource's row lock, which every append takes first.
struct PgHold {
    /// `None` once committed; a hold dropped before that takes its connection out of the
    /// pool and closes it, which rolls the transaction back.
    client: Option<deadpool_postgres::Object>,
    id: ResourceId,
    origin: Arc<str>,
}

impl Drop for PgHold {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            drop(deadpool_postgres::Object::take(c));
        }
    }
}

#[async_trait]
impl super::Hold for PgHold {
    fn resource(&self) -> ResourceId {
        self.id
    }

    async fn append(
        mut self: Box<Self>,
        after: Seq,
        changes: Vec<NewChange>,
    ) -> Result<Appended, StorageError> {
        let client = self.client.as_mut().expect("held until committed");
        let jobs = [(Target::Existing { id: self.id, after }, changes)];
        let appended = write_batch(&*client, &jobs)
            .await?
            .pop()
            .expect("one result per job")?;
        client.batch_execute("COMMIT").await.map_err(pg_err)?;
        let mut client = self.client.take().expect("held until committed");
        notify(&mut client, &self.origin, &[notice_entry(&appended)]).await;
        Ok(appended)
    }
}

/// Wakes other processes: after the commit, in a transaction of its own that need not
/// wait for the disk (a lost notice only delays a follower, which reads the tables).
async fn notify(client: &mut deadpool_postgres::Object, origin: &str, entries: &[String]) {
    if entries.is_empty() {
        return;
    }
    let mut payloads = Vec::new();
    let mut cur = format!("{origin}|");
    for e in entries {
        if cur.len() + e.len() + 1 > MAX_PAYLOAD {
            payloads.push(std::mem::replace(&mut cur, format!("{origin}|")));
        }
        if !cur.ends_with('|') {
            cur.push(',');
        }
        cur.push_str(e);
    }
    payloads.push(cur);
    // One round trip: the statements as one simple query. Payloads hold only hex digits,
    // digits and `|:,cd`; quotes are doubled all the same.
    let mut sql = String::from("BEGIN; SET LOCAL synchronous_commit TO OFF;");
    for p in &payloads {
        sql.push_str(&format!(
            " SELECT pg_notify('{CHANNEL}', '{}');",
            p.replace('\'', "''")
        ));
    }
    sql.push_str(" COMMIT;");
    if let Err(e) = client.batch_execute(&sql).await {
        tracing::debug!(error = %e, "notify failed; followers will catch up on their next notice");
        // Not back to the pool inside the failed transaction.
        let _ = client.batch_execute("ROLLBACK").await;
    }
}

/// Parses a notice payload: `<origin>|<id>:<seq>[:c],…` or `<origin>|d<id>`.
fn parse_notice(payload: &str) -> Option<(&str, Vec<Notice>)> {
    let (origin, rest) = payload.split_once('|')?;
    let mut out = Vec::new();
    for e in rest.split(',').filter(|e| !e.is_empty()) {
        if let Some(id) = e.strip_prefix('d') {
            out.push(Notice::Deleted {
                resource: id.parse().ok()?,
            });
            continue;
        }
        let mut parts = e.split(':');
        let resource = parts.next()?.parse().ok()?;
        let last_seq = parts.next()?.parse().ok()?;
        let created = parts.next() == Some("c");
        out.push(Notice::Appended {
            resource,
            last_seq,
            created,
        });
    }
    Some((origin, out))
}

/// Opens a connection whose notifications' payloads arrive on the returned channel (from
/// a task driving the connection).
async fn connect_listening<T>(
    config: &tokio_postgres::Config,
    tls: T,
) -> Result<
    (
        tokio_postgres::Client,
        mpsc::UnboundedReceiver<String>,
        tokio::task::JoinHandle<()>,
    ),
    tokio_postgres::Error,
>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    use futures::StreamExt;
    let (client, mut conn) = config.connect(tls).await?;
    let (mtx, mrx) = mpsc::unbounded_channel::<String>();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m
                && mtx.send(n.payload().to_string()).is_err()
            {
                return;
            }
        }
    });
    Ok((client, mrx, driver))
}

/// Listens for other processes' notices on a connection of its own, reconnecting after
/// failures; after a reconnect it sends `Resync`, since notices may have been missed.
async fn listen(
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    origin: Arc<str>,
    tx: mpsc::UnboundedSender<Notice>,
) {
    let mut connected_before = false;
    loop {
        let connected = match &tls {
            Some(tls) => connect_listening(&config, tls.clone()).await,
            None => connect_listening(&config, NoTls).await,
        };
        match connected {
            Ok((client, mut mrx, driver)) => {
                if client.batch_execute(&format!("LISTEN {CHANNEL}")).await.is_ok() {
                    if connected_before && tx.send(Notice::Resync).is_err() {
                        driver.abort();
                        return;
                    }
                    connected_before = true;
                    while let Some(payload) = mrx.recv().await {
                        match parse_notice(&payload) {
                            Some((o, _)) if o == &*origin => {}
                            Some((_, notices)) => {
                                for n in notices {
                                    if tx.send(n).is_err() {
                                        driver.abort();
                                        return;
                                    }
                                }
                            }
                            None => tracing::warn!(payload, "unreadable notice"),
                        }
                    }
                    tracing::warn!("lost the notice connection; reconnecting");
                }
                driver.abort();
            }
            Err(e) => tracing::warn!(error = %e, "cannot open the notice connection; retrying"),
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

fn change_from_row(r: &tokio_postgres::Row) -> Result<StoredChange, StorageError> {
    Ok(StoredChange {
        seq: r.get(0),
        version: columns::version_from(r.get(1))?,
        parents: columns::parents_from(r.get(2))?,
        author: identity_from_bytes(r.get(3))?,
        at_ms: r.get(4),
        data: Bytes::from(r.get::<_, Vec<u8>>(5)),
        meta: r.get(6),
    })
}

const CHANGE_COLUMNS: &str = "seq, version, parents, author, at_ms, data, meta";

/// Recounts the bytes a resource occupies (after its log was folded or trimmed).
async fn recount(tx: &deadpool_postgres::Transaction<'_>, id: ResourceId) -> Result<(), StorageError> {
    tx.execute(
        "UPDATE resources SET bytes =
            COALESCE((SELECT octet_length(data) FROM snapshots WHERE resource_id = $1), 0)
          + COALESCE((SELECT SUM(octet_length(c.data) + COALESCE(b.size, 0)) FROM changes c
                      LEFT JOIN blobs b ON c.meta IS NOT NULL AND b.hash = c.data
                      WHERE c.resource_id = $1), 0)
         WHERE id = $1",
        &[&id],
    )
    .await
    .map_err(pg_err)?;
    Ok(())
}

/// Deletes blobs among `hashes` that no change refers to any more.
async fn collect_blobs(
    tx: &deadpool_postgres::Transaction<'_>,
    hashes: &[Vec<u8>],
) -> Result<(), StorageError> {
    if hashes.is_empty() {
        return Ok(());
    }
    tx.execute(
        "DELETE FROM blobs b WHERE b.hash = ANY($1)
         AND NOT EXISTS (SELECT 1 FROM changes c WHERE c.meta IS NOT NULL AND c.data = b.hash)",
        &[&hashes],
    )
    .await
    .map_err(pg_err)?;
    Ok(())
}

#[async_trait]
impl Storage for PostgresStorage {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn load(&self, key: &ResourceKey) -> Result<Option<LoadedResource>, StorageError> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg_err)?;
        let Some(row) = tx
            .query_opt(
                "SELECT id, kind, media_type, head_seq FROM resources WHERE namespace = $1 AND path = $2",
                &[&key.namespace.as_bytes().as_slice(), &key.path.as_str()],
            )
            .await
            .map_err(pg_err)?
        else {
            return Ok(None);
        };
        let id: i64 = row.get(0);
        let snapshot = tx
            .query_opt(
                "SELECT upto_seq, data FROM snapshots WHERE resource_id = $1",
                &[&id],
            )
            .await
            .map_err(pg_err)?
            .map(|r| (r.get::<_, i64>(0), Bytes::from(r.get::<_, Vec<u8>>(1))));
        let after = snapshot.as_ref().map_or(0, |s| s.0);
        let changes = tx
            .query(
                &format!(
                    "SELECT {CHANGE_COLUMNS} FROM changes WHERE resource_id = $1 AND seq > $2 ORDER BY seq"
                ),
                &[&id, &after],
            )
            .await
            .map_err(pg_err)?
            .iter()
            .map(change_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let blob = match changes.last() {
            Some(c) if c.meta.is_some() => Some(Bytes::from(
                tx.query_opt("SELECT data FROM blobs WHERE hash = $1", &[&c.data.as_ref()])
                    .await
                    .map_err(pg_err)?
                    .ok_or_else(|| StorageError::Corrupt("a bytes value is missing".into()))?
                    .get::<_, Vec<u8>>(0),
            )),
            _ => None,
        };
        tx.commit().await.map_err(pg_err)?;
        Ok(Some(LoadedResource {
            row: ResourceRow {
                id,
                kind: kind_from_code(row.get(1))?,
                media_type: row.get(2),
                head_seq: row.get(3),
            },
            snapshot,
            changes,
            blob,
        }))
    }

    async fn append(&self, target: Target, changes: Vec<NewChange>) -> Result<Appended, StorageError> {
        let (reply, rx) = oneshot::channel();
        self.appends
            .send(AppendJob {
                target,
                changes,
                reply,
            })
            .map_err(|_| StorageError::Unavailable("the committers have stopped".into()))?;
        rx.await
            .map_err(|_| StorageError::Unavailable("the committers have stopped".into()))?
    }

    async fn hold(&self, id: ResourceId) -> Result<Box<dyn super::Hold>, StorageError> {
        let hold = PgHold {
            client: Some(self.client().await?),
            id,
            origin: self.origin.clone(),
        };
        let client = hold.client.as_ref().expect("just taken");
        client.batch_execute("BEGIN").await.map_err(pg_err)?;
        client
            .query_opt("SELECT 1 FROM resources WHERE id = $1 FOR UPDATE", &[&id])
            .await
            .map_err(pg_err)?
            .ok_or(StorageError::Gone)?;
        Ok(Box::new(hold))
    }

    async fn changes_after(&self, id: ResourceId, after: Seq) -> Result<Vec<StoredChange>, StorageError> {
        let client = self.client().await?;
        client
            .query(
                &format!(
                    "SELECT {CHANGE_COLUMNS} FROM changes WHERE resource_id = $1 AND seq > $2 ORDER BY seq"
                ),
                &[&id, &after],
            )
            .await
            .map_err(pg_err)?
            .iter()
            .map(change_from_row)
            .collect()
    }

    async fn save_snapshot(&self, id: ResourceId, upto: Seq, data: Bytes) -> Result<(), StorageError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let exists = tx
            .query_opt("SELECT 1 FROM resources WHERE id = $1 FOR UPDATE", &[&id])
            .await
            .map_err(pg_err)?;
        if exists.is_none() {
            return Err(StorageError::Gone);
        }
        let now = now_ms();
        tx.execute(
            "INSERT INTO snapshots (resource_id, upto_seq, data, at_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (resource_id) DO UPDATE SET upto_seq = EXCLUDED.upto_seq, data = EXCLUDED.data, at_ms = EXCLUDED.at_ms
             WHERE EXCLUDED.upto_seq >= snapshots.upto_seq",
            &[&id, &upto, &data.as_ref(), &now],
        )
        .await
        .map_err(pg_err)?;
        tx.execute(
            "DELETE FROM changes WHERE resource_id = $1 AND seq <= $2",
            &[&id, &upto],
        )
        .await
        .map_err(pg_err)?;
        recount(&tx, id).await?;
        tx.commit().await.map_err(pg_err)
    }

    async fn create(&self, items: Vec<NewResource>) -> Result<Vec<Option<ResourceId>>, StorageError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids: Vec<Option<ResourceId>> = vec![None; items.len()];
        // Those that start with changes are appends that create their resource; those
        // that start with a snapshot, a row and a snapshot each. A key given twice as a
        // snapshot is created once, for its first item.
        let (mut with_changes, mut jobs) = (Vec::new(), Vec::new());
        let mut snapshots: Vec<(usize, ResourceKey, Kind, String, Bytes)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, r) in items.into_iter().enumerate() {
            match r.first {
                First::Changes(changes) => {
                    with_changes.push(i);
                    let target = Target::Create {
                        key: r.key,
                        kind: r.kind,
                        media_type: r.media_type,
                    };
                    jobs.push((target, changes));
                }
                First::Snapshot(data) if seen.insert(r.key.clone()) => {
                    snapshots.push((i, r.key, r.kind, r.media_type, data));
                }
                First::Snapshot(_) => {}
            }
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let mut told: Vec<Appended> = Vec::new();
        for (i, r) in with_changes.into_iter().zip(write_batch(&tx, &jobs).await?) {
            match r {
                Ok(a) => {
                    ids[i] = Some(a.resource);
                    told.push(a);
                }
                Err(StorageError::Behind) => {}
                Err(e) => return Err(e),
            }
        }
        let rows: Vec<NewRow<'_>> = snapshots
            .iter()
            .map(|(_, key, kind, media_type, data)| {
                (key, *kind, media_type.as_str(), None, data.len() as i64)
            })
            .collect();
        let made = insert_resources(&tx, &rows).await?;
        let (mut s_id, mut s_data) = (Vec::new(), Vec::new());
        for (i, key, _, _, data) in &snapshots {
            if let Some(&id) = made.get(&row_key(key)) {
                ids[*i] = Some(id);
                s_id.push(id);
                s_data.push(data.as_ref());
                told.push(Appended {
                    resource: id,
                    first_seq: 1,
                    last_seq: 0,
                });
            }
        }
        if !s_id.is_empty() {
            let now = now_ms();
            let insert = cached(
                &tx,
                "INSERT INTO snapshots (resource_id, upto_seq, data, at_ms)
                 SELECT id, 0, data, $3::int8 FROM UNNEST($1::int8[], $2::bytea[]) AS s(id, data)",
            )
            .await?;
            tx.execute(&insert, &[&s_id, &s_data, &now])
                .await
                .map_err(pg_err)?;
        }
        tx.commit().await.map_err(pg_err)?;
        let entries: Vec<String> = told.iter().map(notice_entry).collect();
        notify(&mut client, &self.origin, &entries).await;
        Ok(ids)
    }

    async fn drop_changes_before(&self, id: ResourceId, keep_from: Seq) -> Result<(), StorageError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let hashes: Vec<Vec<u8>> = tx
            .query(
                "DELETE FROM changes WHERE resource_id = $1 AND seq < $2 RETURNING data, meta",
                &[&id, &keep_from],
            )
            .await
            .map_err(pg_err)?
            .iter()
            .filter(|r| r.get::<_, Option<String>>(1).is_some())
            .map(|r| r.get(0))
            .collect();
        collect_blobs(&tx, &hashes).await?;
        recount(&tx, id).await?;
        tx.commit().await.map_err(pg_err)
    }

    async fn delete(&self, key: &ResourceKey) -> Result<bool, StorageError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let ns = key.namespace.as_bytes().as_slice();
        let hashes: Vec<Vec<u8>> = tx
            .query(
                "SELECT c.data FROM changes c JOIN resources r ON r.id = c.resource_id
                 WHERE r.namespace = $1 AND r.path = $2 AND c.meta IS NOT NULL",
                &[&ns, &key.path.as_str()],
            )
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let deleted = tx
            .query_opt(
                "DELETE FROM resources WHERE namespace = $1 AND path = $2 RETURNING id",
                &[&ns, &key.path.as_str()],
            )
            .await
            .map_err(pg_err)?;
        collect_blobs(&tx, &hashes).await?;
        tx.commit().await.map_err(pg_err)?;
        let Some(row) = deleted else { return Ok(false) };
        let id: i64 = row.get(0);
        notify(&mut client, &self.origin, &[format!("d{id}")]).await;
        Ok(true)
    }

    async fn namespace_bytes(&self, namespace: &Namespace) -> Result<u64, StorageError> {
        let client = self.client().await?;
        let n: i64 = client
            .query_one(
                "SELECT COALESCE(SUM(bytes), 0)::int8 FROM resources WHERE namespace = $1",
                &[&namespace.as_bytes().as_slice()],
            )
            .await
            .map_err(pg_err)?
            .get(0);
        Ok(n.max(0) as u64)
    }

    async fn stored_bytes(&self) -> Result<u64, StorageError> {
        let client = self.client().await?;
        let n: i64 = client
            .query_one("SELECT COALESCE(SUM(bytes), 0)::int8 FROM resources", &[])
            .await
            .map_err(pg_err)?
            .get(0);
        Ok(n.max(0) as u64)
    }

    fn pool_status(&self) -> Option<super::PoolStatus> {
        let s = self.pool.status();
        Some(super::PoolStatus {
            max_size: s.max_size,
            size: s.size,
            available: s.available,
            waiting: s.waiting,
        })
    }

    async fn author_bytes(&self, author: &plait_bridge::Identity) -> Result<u64, StorageError> {
        let client = self.client().await?;
        let n: i64 = client
            .query_one(
                "SELECT COALESCE(SUM(bytes), 0)::int8 FROM resources WHERE created_by = $1",
                &[&author.as_bytes().as_slice()],
            )
            .await
            .map_err(pg_err)?
            .get(0);
        Ok(n.max(0) as u64)
    }

    async fn key_of(&self, id: ResourceId) -> Result<Option<ResourceKey>, StorageError> {
        let client = self.client().await?;
        client
            .query_opt("SELECT namespace, path FROM resources WHERE id = $1", &[&id])
            .await
            .map_err(pg_err)?
            .map(|r| key_from_row(&r.get::<_, Vec<u8>>(0), r.get(1)))
            .transpose()
    }

    fn take_notices(&self) -> Option<mpsc::UnboundedReceiver<Notice>> {
        if self.notices_taken.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(listen(
            self.config.clone(),
            self.tls.clone(),
            self.origin.clone(),
            tx,
        ));
        Some(rx)
    }

    async fn list(
        &self,
        namespace: &Namespace,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ResourceSummary>, StorageError> {
        let client = self.client().await?;
        let (lower, strict) = match after {
            Some(a) if a >= prefix => (a.to_string(), true),
            _ => (prefix.to_string(), false),
        };
        let upper = prefix_upper_bound(prefix);
        let rows = client
            .query(
                "SELECT path, kind, media_type, head_seq FROM resources
                 WHERE namespace = $1
                   AND (path > $2 OR (path = $2 AND NOT $3))
                   AND ($4::text IS NULL OR path < $4)
                 ORDER BY path LIMIT $5",
                &[
                    &namespace.as_bytes().as_slice(),
                    &lower,
                    &strict,
                    &upper,
                    &(limit as i64),
                ],
            )
            .await
            .map_err(pg_err)?;
        rows.iter()
            .map(|r| {
                Ok(ResourceSummary {
                    path: ResourcePath::new(r.get::<_, String>(0))
                        .map_err(|e| StorageError::Corrupt(e.to_string()))?,
                    kind: kind_from_code(r.get(1))?,
                    media_type: r.get(2),
                    head_seq: r.get(3),
                })
            })
            .collect()
    }

    async fn put_segment(
        &self,
        namespace: &Namespace,
        seq: Seq,
        descriptor: Bytes,
        ciphertext: Bytes,
    ) -> Result<(), StorageError> {
        let client = self.client().await?;
        // Inserted only where the chain ends at seq - 1; two racing pushes of the same seq
        // both see that, and the primary key refuses the second.
        let n = client
            .execute(
                "INSERT INTO mirror_segments (namespace, seq, descriptor, ciphertext)
                 SELECT $1::bytea, $2::int8, $3::bytea, $4::bytea
                 WHERE GREATEST(
                   (SELECT COALESCE(MAX(seq), 0) FROM mirror_segments WHERE namespace = $1::bytea),
                   (SELECT COALESCE(MAX(upto), 0) FROM mirror_checkpoints WHERE namespace = $1::bytea)
                 ) = $2::int8 - 1",
                &[
                    &namespace.as_bytes().as_slice(),
                    &seq,
                    &descriptor.as_ref(),
                    &ciphertext.as_ref(),
                ],
            )
            .await
            .map_err(|e| match e.as_db_error().map(|d| d.code().code()) {
                Some("23505") => StorageError::Behind,
                _ => pg_err(e),
            })?;
        if n == 0 {
            return Err(StorageError::Behind);
        }
        Ok(())
    }

    async fn segments(
        &self,
        namespace: &Namespace,
        from: Seq,
        to: Seq,
        max_bytes: u64,
    ) -> Result<Vec<StoredSegment>, StorageError> {
        let client = self.client().await?;
        // A running total picks the rows that fit, so no more than that is read.
        let rows = client
            .query(
                "SELECT seq, descriptor, ciphertext FROM (
                   SELECT seq, descriptor, ciphertext,
                          SUM(octet_length(descriptor) + octet_length(ciphertext)) OVER (ORDER BY seq) AS upto
                   FROM mirror_segments WHERE namespace = $1 AND seq >= $2 AND seq <= $3
                 ) s WHERE upto <= $4 OR seq = (SELECT MIN(seq) FROM mirror_segments
                                               WHERE namespace = $1 AND seq >= $2 AND seq <= $3)
                 ORDER BY seq",
                &[
                    &namespace.as_bytes().as_slice(),
                    &from,
                    &to,
                    &(max_bytes.min(i64::MAX as u64) as i64),
                ],
            )
            .await
            .map_err(pg_err)?;
        Ok(rows
            .into_iter()
            .map(|r| StoredSegment {
                seq: r.get(0),
                descriptor: Bytes::from(r.get::<_, Vec<u8>>(1)),
                ciphertext: Bytes::from(r.get::<_, Vec<u8>>(2)),
            })
            .collect())
    }

    async fn descriptors(
        &self,
        namespace: &Namespace,
        from: Seq,
        limit: usize,
        take: Take,
    ) -> Result<Vec<StoredSegment>, StorageError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT seq, descriptor, substring(ciphertext from 1 for $4) FROM mirror_segments
                 WHERE namespace = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
                &[
                    &namespace.as_bytes().as_slice(),
                    &from,
                    &(limit.min(i64::MAX as usize) as i64),
                    &take.bytes(),
                ],
            )
            .await
            .map_err(pg_err)?;
        Ok(rows
            .into_iter()
            .map(|r| StoredSegment {
                seq: r.get(0),
                descriptor: Bytes::from(r.get::<_, Vec<u8>>(1)),
                ciphertext: Bytes::from(r.get::<_, Vec<u8>>(2)),
            })
            .collect())
    }

    async fn last_segment(&self, namespace: &Namespace) -> Result<Option<StoredSegment>, StorageError> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                "SELECT seq, descriptor FROM mirror_segments WHERE namespace = $1 ORDER BY seq DESC LIMIT 1",
                &[&namespace.as_bytes().as_slice()],
            )
            .await
            .map_err(pg_err)?
            .map(|r| StoredSegment {
                seq: r.get(0),
                descriptor: Bytes::from(r.get::<_, Vec<u8>>(1)),
                ciphertext: Bytes::new(),
            }))
    }

    async fn segment_bytes(&self, namespace: &Namespace) -> Result<u64, StorageError> {
        let client = self.client().await?;
        let n: i64 = client
            .query_one(
                "SELECT ((SELECT COALESCE(SUM(octet_length(descriptor) + octet_length(ciphertext)), 0)
                          FROM mirror_segments WHERE namespace = $1)
                       + (SELECT COALESCE(SUM(octet_length(checkpoint) + octet_length(snapshot)), 0)
                          FROM mirror_checkpoints WHERE namespace = $1))::int8",
                &[&namespace.as_bytes().as_slice()],
            )
            .await
            .map_err(pg_err)?
            .get(0);
        Ok(n.max(0) as u64)
    }

    async fn segment_bytes_after(&self, namespace: &Namespace, after: Seq) -> Result<u64, StorageError> {
        let client = self.client().await?;
        let n: i64 = client
            .query_one(
                "SELECT COALESCE(SUM(octet_length(descriptor) + octet_length(ciphertext)), 0)::int8
                 FROM mirror_segments WHERE namespace = $1 AND seq > $2",
                &[&namespace.as_bytes().as_slice(), &after],
            )
            .await
            .map_err(pg_err)?
            .get(0);
        Ok(n.max(0) as u64)
    }

    async fn put_checkpoint(
        &self,
        namespace: &Namespace,
        upto: Seq,
        checkpoint: Bytes,
        snapshot: Bytes,
    ) -> Result<(), StorageError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let ns = namespace.as_bytes().as_slice();
        // Replaced only by a later one; two racing ones serialize on the row (or the
        // primary key, for the first), and the later of them wins.
        let n = tx
            .execute(
                "INSERT INTO mirror_checkpoints (namespace, upto, checkpoint, snapshot)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (namespace) DO UPDATE SET upto = excluded.upto,
                   checkpoint = excluded.checkpoint, snapshot = excluded.snapshot
                 WHERE mirror_checkpoints.upto < excluded.upto",
                &[&ns, &upto, &checkpoint.as_ref(), &snapshot.as_ref()],
            )
            .await
            .map_err(pg_err)?;
        if n == 0 {
            return Err(StorageError::Behind);
        }
        tx.execute(
            "DELETE FROM mirror_segments WHERE namespace = $1 AND seq <= $2",
            &[&ns, &upto],
        )
        .await
        .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)
    }

    async fn checkpoint(
        &self,
        namespace: &Namespace,
        take: Take,
    ) -> Result<Option<StoredCheckpoint>, StorageError> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                "SELECT upto, checkpoint, substring(snapshot from 1 for $2)
                 FROM mirror_checkpoints WHERE namespace = $1",
                &[&namespace.as_bytes().as_slice(), &take.bytes()],
            )
            .await
            .map_err(pg_err)?
            .map(|r| StoredCheckpoint {
                upto: r.get(0),
                checkpoint: Bytes::from(r.get::<_, Vec<u8>>(1)),
                snapshot: Bytes::from(r.get::<_, Vec<u8>>(2)),
            }))
    }

    async fn get_setting(&self, name: &str) -> Result<Option<String>, StorageError> {
        let client = self.client().await?;
        Ok(client
            .query_opt("SELECT value FROM settings WHERE name = $1", &[&name])
            .await
            .map_err(pg_err)?
            .map(|r| r.get(0)))
    }

    async fn put_setting(&self, name: &str, value: &str) -> Result<(), StorageError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO settings (name, value) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                &[&name, &value],
            )
            .await
            .map_err(pg_err)?;
        Ok(())
    }
}
