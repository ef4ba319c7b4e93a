//! The owner's shares: which parts of its namespace it seals to which readers
//! (`plait mirror share|unshare|shares`).
//!
//! A share is a path prefix, a reader's identity and the reader's age recipient
//! (`plait mirror recipient` on the reader prints it). The owner's sealer
//! ([`super::owner`]) seals the changes of a resource to its usual recipients plus the
//! recipients of every share whose prefix covers the resource's path, so a reader opens
//! the segments of its part of the namespace and no others; when a share is new, and after
//! each checkpoint, it also seals the part's current state to that share's readers. The
//! list is `mirror-shares.json` in the data dir (mode 0600, replaced whole by rename),
//! read by a running server at each sealing tick, so these commands work whether or not
//! the server runs. An unshared reader is left out of what is sealed from then on; what it
//! opened before stays with it.
//!
//! The owner's own server lets a reader read its shared prefix too: the access layer asks
//! [`Shares::grants_read`] (`Access::check`). Knows nothing of HTTP or storage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::Context;
use plait_bridge::Identity;
use plait_bridge::mirror::SealRecipient;
use serde::{Deserialize, Serialize};

use crate::model::ResourcePath;

/// File name of the owner's shares in the data dir.
pub const SHARES_FILE: &str = "mirror-shares.json";

/// One share: `prefix` of the owner's namespace sealed to `reader`'s `recipient`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// The part of the namespace, without leading or trailing `/` (empty: all of it).
    pub prefix: String,
    pub reader: Identity,
    /// The reader's age recipient (`age1…`).
    pub recipient: String,
    pub added_ms: u64,
}

impl Share {
    /// The recipient, parsed (checked when the share was made).
    pub fn seal_recipient(&self) -> anyhow::Result<SealRecipient> {
        SealRecipient::from_str(&self.recipient)
            .map_err(|e| anyhow::anyhow!("{:?} is not an age recipient: {e}", self.recipient))
    }

    /// Whether the share covers `path` (on segment boundaries: `shared` covers `shared`
    /// and `shared/a`, not `sharedx`).
    pub fn covers(&self, path: &str) -> bool {
        covers(&self.prefix, path)
    }
}

/// Whether `prefix` (normalized) covers `path` on segment boundaries.
pub fn covers(prefix: &str, path: &str) -> bool {
    prefix.is_empty()
        || path == prefix
        || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

/// A prefix as the command line gives it (`/shared/`), normalized (`shared`) and checked.
pub fn normalize(prefix: &str) -> anyhow::Result<String> {
    let p = prefix.trim_matches('/').to_string();
    if !p.is_empty() {
        ResourcePath::new(p.clone()).map_err(|e| anyhow::anyhow!("{prefix:?} is not a path: {e}"))?;
    }
    Ok(p)
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct SharesFile {
    shares: Vec<Share>,
}

/// The file's modification time and length, and its shares, when last read.
type Cached = (Option<(SystemTime, u64)>, Vec<Share>);

/// The shares file of one data dir, with what was last read of it.
pub struct Shares {
    path: PathBuf,
    /// The file as last read.
    cached: Mutex<Cached>,
}

impl Shares {
    pub fn new(data_dir: &Path) -> Shares {
        Shares {
            path: data_dir.join(SHARES_FILE),
            cached: Mutex::new((None, Vec::new())),
        }
    }

    /// Every share, read again when the file changed.
    pub fn list(&self) -> anyhow::Result<Vec<Share>> {
        let modified = match std::fs::metadata(&self.path) {
            Ok(m) => m.modified().ok().map(|t| (t, m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                *self.cached.lock().expect("shares") = (None, Vec::new());
                return Ok(Vec::new());
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        {
            let c = self.cached.lock().expect("shares");
            if c.0.is_some() && c.0 == modified {
                return Ok(c.1.clone());
            }
        }
        let bytes = std::fs::read(&self.path).with_context(|| format!("reading {}", self.path.display()))?;
        let file: SharesFile =
            serde_json::from_slice(&bytes).with_context(|| format!("reading {}", self.path.display()))?;
        for s in &file.shares {
            s.seal_recipient()
                .with_context(|| format!("reading {}", self.path.display()))?;
        }
        *self.cached.lock().expect("shares") = (modified, file.shares.clone());
        Ok(file.shares)
    }

    /// Whether a share lets `reader` read `path` of the owner's namespace (an unreadable
    /// file grants nothing).
    pub fn grants_read(&self, reader: &Identity, path: &str) -> bool {
        match self.list() {
            Ok(all) => all.iter().any(|s| s.reader == *reader && s.covers(path)),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "the mirror shares");
                false
            }
        }
    }

    /// Shares `prefix` with `reader`, sealing to `recipient` (sharing again replaces the
    /// recipient). Answers with the normalized prefix.
    pub fn share(
        &self,
        prefix: &str,
        reader: Identity,
        recipient: &str,
        now_ms: u64,
    ) -> anyhow::Result<String> {
        let prefix = normalize(prefix)?;
        SealRecipient::from_str(recipient.trim())
            .map_err(|e| anyhow::anyhow!("{recipient:?} is not an age recipient (age1…): {e}"))?;
        let mut all = self.list()?;
        all.retain(|s| !(s.prefix == prefix && s.reader == reader));
        all.push(Share {
            prefix: prefix.clone(),
            reader,
            recipient: recipient.trim().to_string(),
            added_ms: now_ms,
        });
        self.write(all)?;
        Ok(prefix)
    }

    /// Stops sharing `prefix` with `reader`; `false` if it was not shared.
    pub fn unshare(&self, prefix: &str, reader: &Identity) -> anyhow::Result<bool> {
        let prefix = normalize(prefix)?;
        let mut all = self.list()?;
        let before = all.len();
        all.retain(|s| !(s.prefix == prefix && s.reader == *reader));
        if all.len() == before {
            return Ok(false);
        }
        self.write(all)?;
        Ok(true)
    }

    fn write(&self, shares: Vec<Share>) -> anyhow::Result<()> {
        crate::private_file::write_json(&self.path, &SharesFile { shares })?;
        // Read again at the next look, whatever the clock's granularity.
        *self.cached.lock().expect("shares") = (None, Vec::new());
        Ok(())
    }
}

/// The recipients a resource at `path` is sealed to beyond the owner's own: those of
/// every share covering it, each once, in a stable order.
pub fn readers_of(shares: &[Share], path: &str) -> BTreeMap<String, SealRecipient> {
    shares
        .iter()
        .filter(|s| s.covers(path))
        .filter_map(|s| Some((s.recipient.clone(), s.seal_recipient().ok()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_cover_on_segment_boundaries_and_the_file_round_trips() {
        assert!(covers("shared", "shared"));
        assert!(covers("shared", "shared/a/b"));
        assert!(!covers("shared", "sharedx"));
        assert!(!covers("shared", "private/shared"));
        assert!(covers("", "anything"));
        assert_eq!(normalize("/shared/").unwrap(), "shared");
        assert!(normalize("/a/../b").is_err());

        let dir = tempfile::tempdir().unwrap();
        let shares = Shares::new(dir.path());
        let reader = plait_bridge::Keypair::generate().identity();
        let key = plait_bridge::mirror::SealKey::generate();
        assert!(
            shares.share("/shared", reader, "age1nope", 1).is_err(),
            "a bad recipient"
        );
        assert!(shares.list().unwrap().is_empty(), "nothing written");
        shares
            .share("/shared", reader, &key.recipient().to_string(), 1)
            .unwrap();
        assert!(shares.grants_read(&reader, "shared/x"));
        assert!(!shares.grants_read(&reader, "private/x"));
        assert_eq!(readers_of(&shares.list().unwrap(), "shared/x").len(), 1);
        assert!(readers_of(&shares.list().unwrap(), "private/x").is_empty());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(SHARES_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(shares.unshare("shared/", &reader).unwrap());
        assert!(!shares.unshare("shared", &reader).unwrap());
        assert!(!shares.grants_read(&reader, "shared/x"));
    }
}
