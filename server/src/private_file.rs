//! Files in the data dir that only this user may read (keys, grants, lists of mirrors,
//! devices, shares and follows): written whole, mode 0600, to a temporary file beside the
//! target that is synced and renamed over it, so that a reader (or a crash) sees the old
//! file or the new one, never half of one; read with a missing file as the empty default.
//!
//! Knows nothing of what the files hold beyond "JSON of some type".

use std::path::Path;

use anyhow::Context;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Writes `bytes` to `path`, mode 0600, by rename.
pub fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    // `tempfile` creates it 0600.
    let mut tmp =
        tempfile::NamedTempFile::new_in(dir).with_context(|| format!("writing in {}", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// Writes `value` to `path` as pretty JSON, mode 0600, by rename.
pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> anyhow::Result<()> {
    write(path, &serde_json::to_vec_pretty(value)?)
}

/// Reads the JSON at `path`; a missing file reads as `T::default()`.
pub fn read_json<T: DeserializeOwned + Default>(path: &Path) -> anyhow::Result<T> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_0600_by_rename_and_reads_missing_as_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("list.json");
        let empty: Vec<String> = read_json(&path).unwrap();
        assert!(empty.is_empty());
        // An older, looser file is replaced, not rewritten in place.
        std::fs::write(&path, b"[\"old\"]").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_json(&path, &["a", "b"]).unwrap();
        let back: Vec<String> = read_json(&path).unwrap();
        assert_eq!(back, ["a", "b"]);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Nothing is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        std::fs::write(&path, b"{not json").unwrap();
        assert!(read_json::<Vec<String>>(&path).is_err());
    }
}
