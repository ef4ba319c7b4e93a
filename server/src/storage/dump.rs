//! A store's every row, in one consistent snapshot, in an order both stores agree on: what
//! backups, restores and moves between the embedded store and Postgres copy.
//!
//! [`Dump::export`] sends the rows of one read snapshot (settings, blobs, resources,
//! snapshots, changes, mirror segments; each table ordered by its key, byte-wise), and
//! [`Dump::import`] writes such a stream into an *empty* store in one transaction, keeping
//! resource ids. [`copy`] runs both at once and then exports the target again: the two
//! [`Summary`]s (rows per table and a BLAKE3 hash of every row's canonical encoding) must
//! be equal, or the copy is reported as failed.
//!
//! Knows the tables' columns, not what the values mean (documents, grants, memberships).

use std::fmt;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::StorageError;

/// One row of one table, as both stores hold it (times in milliseconds since the epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Row {
    Setting {
        name: String,
        value: String,
    },
    Blob {
        hash: Vec<u8>,
        data: Vec<u8>,
        size: i64,
    },
    Resource {
        id: i64,
        namespace: Vec<u8>,
        path: String,
        kind: i16,
        media_type: String,
        head_seq: i64,
        /// Stored bytes counted against quotas.
        bytes: i64,
        created_ms: i64,
        updated_ms: i64,
        created_by: Option<Vec<u8>>,
    },
    Snapshot {
        resource_id: i64,
        upto_seq: i64,
        data: Vec<u8>,
        at_ms: i64,
    },
    Change {
        resource_id: i64,
        seq: i64,
        version: String,
        parents: String,
        author: Option<Vec<u8>>,
        at_ms: i64,
        data: Vec<u8>,
        meta: Option<String>,
    },
    Segment {
        namespace: Vec<u8>,
        seq: i64,
        descriptor: Vec<u8>,
        ciphertext: Vec<u8>,
    },
    Checkpoint {
        namespace: Vec<u8>,
        upto: i64,
        checkpoint: Vec<u8>,
        snapshot: Vec<u8>,
    },
}

/// The tables, in the order they are exported and imported (a row only refers to rows of
/// tables before it).
pub const TABLES: [&str; 7] = [
    "settings",
    "blobs",
    "resources",
    "snapshots",
    "changes",
    "mirror_segments",
    "mirror_checkpoints",
];

impl Row {
    /// Index of this row's table in [`TABLES`].
    pub fn table(&self) -> usize {
        match self {
            Row::Setting { .. } => 0,
            Row::Blob { .. } => 1,
            Row::Resource { .. } => 2,
            Row::Snapshot { .. } => 3,
            Row::Change { .. } => 4,
            Row::Segment { .. } => 5,
            Row::Checkpoint { .. } => 6,
        }
    }

    /// Bytes this row carries (for progress).
    pub fn weight(&self) -> usize {
        match self {
            Row::Setting { name, value } => name.len() + value.len(),
            Row::Blob { data, .. } | Row::Snapshot { data, .. } | Row::Change { data, .. } => data.len() + 64,
            Row::Resource { path, .. } => path.len() + 64,
            Row::Segment { ciphertext, .. } => ciphertext.len() + 188,
            Row::Checkpoint { snapshot, .. } => snapshot.len() + 188,
        }
    }

    /// Feeds the row's canonical encoding to `h`: its table, then every column, each
    /// length-prefixed (so no two different rows encode alike).
    fn feed(&self, h: &mut blake3::Hasher) {
        fn bytes(h: &mut blake3::Hasher, b: &[u8]) {
            h.update(&(b.len() as u64).to_le_bytes());
            h.update(b);
        }
        fn int(h: &mut blake3::Hasher, v: i64) {
            h.update(&v.to_le_bytes());
        }
        fn opt(h: &mut blake3::Hasher, b: Option<&[u8]>) {
            match b {
                None => {
                    h.update(&[0]);
                }
                Some(b) => {
                    h.update(&[1]);
                    bytes(h, b);
                }
            }
        }
        h.update(&[self.table() as u8]);
        match self {
            Row::Setting { name, value } => {
                bytes(h, name.as_bytes());
                bytes(h, value.as_bytes());
            }
            Row::Blob { hash, data, size } => {
                bytes(h, hash);
                bytes(h, data);
                int(h, *size);
            }
            Row::Resource {
                id,
                namespace,
                path,
                kind,
                media_type,
                head_seq,
                bytes: stored,
                created_ms,
                updated_ms,
                created_by,
            } => {
                int(h, *id);
                bytes(h, namespace);
                bytes(h, path.as_bytes());
                int(h, i64::from(*kind));
                bytes(h, media_type.as_bytes());
                int(h, *head_seq);
                int(h, *stored);
                int(h, *created_ms);
                int(h, *updated_ms);
                opt(h, created_by.as_deref());
            }
            Row::Snapshot {
                resource_id,
                upto_seq,
                data,
                at_ms,
            } => {
                int(h, *resource_id);
                int(h, *upto_seq);
                bytes(h, data);
                int(h, *at_ms);
            }
            Row::Change {
                resource_id,
                seq,
                version,
                parents,
                author,
                at_ms,
                data,
                meta,
            } => {
                int(h, *resource_id);
                int(h, *seq);
                bytes(h, version.as_bytes());
                bytes(h, parents.as_bytes());
                opt(h, author.as_deref());
                int(h, *at_ms);
                bytes(h, data);
                opt(h, meta.as_deref().map(str::as_bytes));
            }
            Row::Segment {
                namespace,
                seq,
                descriptor,
                ciphertext,
            } => {
                bytes(h, namespace);
                int(h, *seq);
                bytes(h, descriptor);
                bytes(h, ciphertext);
            }
            Row::Checkpoint {
                namespace,
                upto,
                checkpoint,
                snapshot,
            } => {
                bytes(h, namespace);
                int(h, *upto);
                bytes(h, checkpoint);
                bytes(h, snapshot);
            }
        }
    }
}

/// What a stream of rows held: rows per table and one hash over all of them in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub rows: [u64; 7],
    pub hash: blake3::Hash,
}

/// Builds a [`Summary`] row by row.
pub struct Summing {
    rows: [u64; 7],
    hasher: blake3::Hasher,
}

impl Default for Summing {
    fn default() -> Self {
        Summing {
            rows: [0; 7],
            hasher: blake3::Hasher::new(),
        }
    }
}

impl Summing {
    pub fn add(&mut self, row: &Row) {
        self.rows[row.table()] += 1;
        row.feed(&mut self.hasher);
    }

    pub fn total(&self) -> u64 {
        self.rows.iter().sum()
    }

    pub fn finish(self) -> Summary {
        Summary {
            rows: self.rows,
            hash: self.hasher.finalize(),
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, n) in TABLES.iter().zip(self.rows) {
            write!(f, "{name} {n}, ")?;
        }
        write!(f, "blake3 {}", self.hash.to_hex())
    }
}

/// A store whose rows can be copied out and into.
#[async_trait]
pub trait Dump: Send + Sync {
    /// Sends every row of one consistent read snapshot, table by table in [`TABLES`]
    /// order, each table ordered by its key. Stops early, without error, if `out` closes.
    async fn export(&self, out: mpsc::Sender<Row>) -> Result<(), StorageError>;

    /// Writes `rows` (in [`TABLES`] order) into this store in one transaction. Refused if
    /// the store holds any row already.
    async fn import(&self, rows: mpsc::Receiver<Row>) -> Result<(), StorageError>;

    /// Rows per table now (outside any snapshot: for progress only).
    async fn count(&self) -> Result<[u64; 7], StorageError>;
}

/// Rows waiting between an export and what consumes it.
const IN_FLIGHT: usize = 256;

/// Summarises everything `store` holds (one snapshot).
pub async fn summarize(store: &dyn Dump) -> Result<Summary, StorageError> {
    let (tx, mut rx) = mpsc::channel(IN_FLIGHT);
    let sum = async {
        let mut s = Summing::default();
        while let Some(row) = rx.recv().await {
            s.add(&row);
        }
        s
    };
    let (exported, s) = tokio::join!(store.export(tx), sum);
    exported?;
    Ok(s.finish())
}

/// Why a copy failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("reading the source: {0}")]
    Source(StorageError),
    #[error("writing the target: {0}")]
    Target(StorageError),
    #[error("the copy differs from its source: read {read}; copy {copy}")]
    Differs { read: Summary, copy: Summary },
}

/// Copies every row of `from` into the empty `to`, calling `progress(rows, bytes)` as
/// rows pass, then checks the copy: `to` exported again must summarise the same as what
/// was read from `from`. Returns that summary.
pub async fn copy(
    from: &dyn Dump,
    to: &dyn Dump,
    mut progress: impl FnMut(u64, u64) + Send,
) -> Result<Summary, CopyError> {
    let (out_tx, mut out_rx) = mpsc::channel::<Row>(IN_FLIGHT);
    let (in_tx, in_rx) = mpsc::channel::<Row>(IN_FLIGHT);
    let pass = async move {
        let mut s = Summing::default();
        let mut bytes = 0u64;
        while let Some(row) = out_rx.recv().await {
            s.add(&row);
            bytes += row.weight() as u64;
            progress(s.total(), bytes);
            if in_tx.send(row).await.is_err() {
                break; // the import failed; its error is reported
            }
        }
        s
    };
    let (exported, imported, read) = tokio::join!(from.export(out_tx), to.import(in_rx), pass);
    // A failed import closes its channel, which can stop the export early: report the
    // import's error first.
    imported.map_err(CopyError::Target)?;
    exported.map_err(CopyError::Source)?;
    let source = read.finish();
    let copy = summarize(to).await.map_err(CopyError::Target)?;
    if copy != source {
        return Err(CopyError::Differs { read: source, copy });
    }
    Ok(source)
}
