//! `plait backup`, `plait restore` and `plait migrate`: whole stores copied through
//! [`storage::dump`](crate::storage::dump), checked by rows and hashes.
//!
//! A backup file is a tar archive:
//! * `plait-backup.json` — the [`Manifest`]: format, the instance's identity, when, what was
//!   copied (rows per table and their BLAKE3), whether keys are inside;
//! * `plait.db` — an embedded store holding every row of the source (from the embedded
//!   store or Postgres alike), taken in one read snapshot, so a backup of a running server
//!   is consistent: every write acknowledged before the backup began is in it;
//! * `data/…` — the data dir's small files: tokens, mirror grants, the mirrors this
//!   instance pushes to, its devices (`devices.json`), and with `--keys` the identity and
//!   seal keys, the retired ones (`seal-key-retired-<ms>.txt`, which open older segments)
//!   included (the file is then as secret as the keys; it is created 0600 either way).
//!
//! A restore goes into a data dir with no store or an empty one (embedded or Postgres),
//! and checks the copy against the manifest. A move (`migrate`) copies an embedded store
//! into an empty Postgres database or back, checked the same way, and leaves the source
//! as it was.
//!
//! Knows stores only as [`Dump`]s and the data dir's files by name; not what any row means.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::progress::Progress;
use crate::serve::{EMBEDDED_FILE, IDENTITY_FILE, OWNER_SETTING, lock_data_dir};
use crate::storage::dump::{self, Dump, Summary, TABLES};
use crate::storage::postgres::PostgresStorage;
use crate::storage::sqlite::SqliteStorage;
use crate::storage::{CommitLimits, Storage};

/// The manifest's name inside a backup.
const MANIFEST: &str = "plait-backup.json";
/// What `format` says in backups this code writes and reads.
const FORMAT: &str = "plait-backup/1";
/// The data dir's files a backup carries (when present); keys only with `--keys`.
const DATA_FILES: [&str; 4] = [
    crate::access::tokens::TOKENS_FILE,
    crate::mirror::grants::GRANTS_FILE,
    crate::mirror::owner::MIRRORS_FILE,
    crate::mirror::devices::DEVICES_FILE,
];
const KEY_FILES: [&str; 2] = [IDENTITY_FILE, plait_bridge::mirror::SEAL_KEY_FILE];

/// Whether the data dir's file `name` is a key (carried only with `--keys`): the
/// identity, the seal key, a retired seal key.
fn is_key_file(name: &str) -> bool {
    KEY_FILES.contains(&name) || crate::mirror::devices::is_retired_key_file(name)
}

/// Whether a backup may carry the data dir's file `name`.
fn is_carried(name: &str) -> bool {
    DATA_FILES.contains(&name) || is_key_file(name)
}

/// What a backup holds, written beside the store in the archive.
#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    /// The instance identity (the owner) the store belongs to.
    pub identity: String,
    /// Milliseconds since the epoch when the snapshot was taken.
    pub taken_ms: u64,
    /// Rows per table, by table name.
    pub rows: std::collections::BTreeMap<String, u64>,
    /// BLAKE3 over every row (see `storage::dump`).
    pub blake3: String,
    /// Whether the keys are inside: `data/identity.pem`, `data/seal-key.txt` and the
    /// retired seal keys.
    pub keys: bool,
    pub files: Vec<String>,
}

/// Where a store is: a data dir's embedded file, or a Postgres URL.
pub enum Place<'a> {
    Embedded(&'a Path),
    Postgres(&'a str),
}

impl std::fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Embedded(p) => write!(f, "{}", p.display()),
            Place::Postgres(url) => write!(f, "{}", redact(url)),
        }
    }
}

/// A URL with its password left out, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user = url[scheme + 3..at].split(':').next().unwrap_or("");
            format!("{}{user}@{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// A store that can be dumped and asked for its settings.
trait DumpStore: Dump + Storage {}
impl<T: Dump + Storage> DumpStore for T {}

async fn open(place: &Place<'_>, create: bool) -> anyhow::Result<Arc<dyn DumpStore>> {
    Ok(match place {
        Place::Embedded(file) => {
            if !create && !file.exists() {
                bail!("{} does not exist: no embedded store there", file.display());
            }
            Arc::new(
                SqliteStorage::open(file, CommitLimits::default())
                    .with_context(|| format!("opening {}", file.display()))?,
            )
        }
        Place::Postgres(url) => Arc::new(
            PostgresStorage::connect(url, 2, CommitLimits::default())
                .await
                .with_context(|| format!("connecting to {}", redact(url)))?,
        ),
    })
}

/// Copies `from` into the empty `to` with progress, and checks it.
async fn copy_checked(what: &str, from: &dyn DumpStore, to: &dyn DumpStore) -> anyhow::Result<Summary> {
    let total: u64 = from.count().await?.iter().sum();
    let mut progress = Progress::new(what, total);
    let summary = dump::copy(from, to, |rows, bytes| progress.update(rows, bytes)).await?;
    progress.finish();
    Ok(summary)
}

fn rows_by_table(s: &Summary) -> std::collections::BTreeMap<String, u64> {
    TABLES.iter().map(|t| t.to_string()).zip(s.rows).collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Creates `path` for writing, mode 0600, failing if it exists.
fn create_new_private(path: &Path) -> anyhow::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

/// `plait backup`: snapshots the store at `source` and the data dir's files into `file`.
pub async fn backup(data_dir: &Path, source: Place<'_>, file: &Path, keys: bool) -> anyhow::Result<Manifest> {
    let from = open(&source, false).await?;
    let identity = from
        .get_setting(OWNER_SETTING)
        .await?
        .with_context(|| format!("{source} has never been served: nothing to back up"))?;
    let scratch = tempfile::Builder::new()
        .prefix(".plait-backup")
        .tempdir_in(
            file.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        )
        .context("making a scratch dir beside the backup file")?;
    let copy_path = scratch.path().join(EMBEDDED_FILE);
    let copy = open(&Place::Embedded(&copy_path), true).await?;
    let taken_ms = now_ms();
    let summary = copy_checked("backup", &*from, &*copy).await?;
    drop(copy);
    SqliteStorage::checkpoint(&copy_path)?;

    let mut files = Vec::new();
    let wanted = DATA_FILES.iter().chain(if keys { &KEY_FILES[..] } else { &[] });
    for name in wanted {
        if data_dir.join(name).exists() {
            files.push(name.to_string());
        }
    }
    if keys {
        let mut retired = Vec::new();
        for e in std::fs::read_dir(data_dir).with_context(|| format!("reading {}", data_dir.display()))? {
            let name = e?.file_name();
            if let Some(n) = name
                .to_str()
                .filter(|n| crate::mirror::devices::is_retired_key_file(n))
            {
                retired.push(n.to_string());
            }
        }
        retired.sort();
        files.extend(retired);
    }
    if keys && !files.iter().any(|f| f == IDENTITY_FILE) {
        bail!("--keys: {} has no {IDENTITY_FILE}", data_dir.display());
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        identity,
        taken_ms,
        rows: rows_by_table(&summary),
        blake3: summary.hash.to_hex().to_string(),
        keys,
        files,
    };
    // Written beside, then renamed: a backup file is whole or absent.
    let partial = scratch.path().join("backup.tar");
    {
        let mut tar = tar::Builder::new(create_new_private(&partial)?);
        let json = serde_json::to_vec_pretty(&manifest)?;
        let mut header = tar::Header::new_gnu();
        header.set_size(json.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(taken_ms / 1000);
        header.set_cksum();
        tar.append_data(&mut header, MANIFEST, json.as_slice())?;
        tar.append_path_with_name(&copy_path, EMBEDDED_FILE)?;
        for name in &manifest.files {
            tar.append_path_with_name(data_dir.join(name), format!("data/{name}"))?;
        }
        tar.into_inner()?.sync_all()?;
    }
    if file.exists() {
        bail!("{} exists: not overwriting it", file.display());
    }
    std::fs::rename(&partial, file).with_context(|| format!("writing {}", file.display()))?;
    Ok(manifest)
}

/// `plait restore`: brings a backup back into `data_dir` (and `target`, the store it will
/// serve), which must hold no data yet.
pub async fn restore(data_dir: &Path, target: Place<'_>, file: &Path) -> anyhow::Result<Manifest> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let _lock = lock_data_dir(data_dir)?;
    let scratch = tempfile::Builder::new()
        .prefix(".plait-restore")
        .tempdir_in(data_dir)
        .context("making a scratch dir in the data dir")?;
    let mut archive =
        tar::Archive::new(File::open(file).with_context(|| format!("opening {}", file.display()))?);
    let mut manifest: Option<Manifest> = None;
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        let dest = match name.as_str() {
            MANIFEST => {
                let mut json = Vec::new();
                entry.by_ref().take(1 << 20).read_to_end(&mut json)?;
                manifest = Some(serde_json::from_slice(&json).context("reading the backup's manifest")?);
                continue;
            }
            EMBEDDED_FILE => scratch.path().join(EMBEDDED_FILE),
            other => match other.strip_prefix("data/") {
                Some(f) if is_carried(f) => scratch.path().join(f),
                _ => bail!(
                    "{}: unexpected entry {other:?}: not a plait backup",
                    file.display()
                ),
            },
        };
        let mut out = create_new_private(&dest)?;
        std::io::copy(&mut entry, &mut out)?;
        out.sync_all()?;
    }
    let manifest =
        manifest.with_context(|| format!("{}: no {MANIFEST}: not a plait backup", file.display()))?;
    if manifest.format != FORMAT {
        bail!(
            "{}: format {:?}, this plait reads {FORMAT:?}",
            file.display(),
            manifest.format
        );
    }
    // The keys: carried by the backup, or already in the data dir, and the owner's.
    let identity_file = data_dir.join(IDENTITY_FILE);
    let key_source = if manifest.keys {
        if identity_file.exists() {
            bail!(
                "{} already has an {IDENTITY_FILE}, and the backup carries its own: restore into a new data dir",
                data_dir.display()
            );
        }
        scratch.path().join(IDENTITY_FILE)
    } else {
        if !identity_file.exists() {
            bail!(
                "the backup holds no keys (taken without --keys): put the {IDENTITY_FILE} of {} into {} first",
                manifest.identity,
                data_dir.display()
            );
        }
        identity_file.clone()
    };
    let key = plait_bridge::Keypair::load(&key_source)
        .map_err(|e| anyhow::anyhow!("{}: {e}", key_source.display()))?;
    if key.identity().to_string() != manifest.identity {
        bail!(
            "{} holds the key of {}, but the backup is of {}",
            key_source.display(),
            key.identity(),
            manifest.identity
        );
    }
    if let Some(odd) = manifest.files.iter().find(|f| !is_carried(f)) {
        bail!(
            "{}: the manifest names {odd:?}, not a file a backup carries: not a plait backup",
            file.display()
        );
    }
    for name in &manifest.files {
        if !is_key_file(name) && data_dir.join(name).exists() {
            bail!(
                "{} already has {name}: restore into a new data dir",
                data_dir.display()
            );
        }
    }

    let from = open(&Place::Embedded(&scratch.path().join(EMBEDDED_FILE)), false).await?;
    let to = open(&target, true).await?;
    let summary = copy_checked("restore", &*from, &*to).await?;
    if rows_by_table(&summary) != manifest.rows || summary.hash.to_hex().as_str() != manifest.blake3 {
        bail!(
            "{}: the store inside does not match its manifest (damaged backup): {summary}",
            file.display()
        );
    }
    for name in &manifest.files {
        std::fs::rename(scratch.path().join(name), data_dir.join(name))
            .with_context(|| format!("placing {name} in {}", data_dir.display()))?;
    }
    File::open(data_dir)?.sync_all()?;
    Ok(manifest)
}

/// `plait migrate`: copies the store at `from` into the empty one at `to`, checked; the
/// source is left as it was. With an embedded source, no server may be using its data dir.
pub async fn migrate(data_dir: &Path, from: Place<'_>, to: Place<'_>) -> anyhow::Result<Summary> {
    let _lock = match from {
        Place::Embedded(_) => Some(lock_data_dir(data_dir)?),
        Place::Postgres(_) => None,
    };
    let source = open(&from, false).await?;
    if source.get_setting(OWNER_SETTING).await?.is_none() {
        bail!("{from} has never been served: nothing to move");
    }
    let target = open(&to, true).await?;
    copy_checked("migrate", &*source, &*target)
        .await
        .with_context(|| format!("moving {from} to {to}"))
}
