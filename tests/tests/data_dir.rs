//! The data dir is its server's alone, against the real `plait` binary: made 0700 with
//! files 0600, and a data dir (or store) left readable by others is tightened at start
//! with a warning.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use plait_tests::plait::{Plait, Store};
use plait_tests::wire;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn the_data_dir_and_its_files_are_private() {
    let mut p = Plait::start(Store::Embedded);
    let parent = tempfile::tempdir().unwrap();
    // A data dir someone made readable by all, with a store left the same.
    let loose = parent.path().join("loose");
    std::fs::create_dir(&loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(loose.join("plait.db"), b"").unwrap();
    std::fs::set_permissions(loose.join("plait.db"), std::fs::Permissions::from_mode(0o644)).unwrap();
    p.use_data_dir(&loose);
    p.restart();
    let r = wire::send(p.addr, "PUT", "/x", &[("Content-Type", "application/json")], b"1").await;
    assert_eq!(r.status, 200);
    assert_eq!(mode(&loose), 0o700);
    for f in ["plait.db", "plait.lock", "identity.pem"] {
        assert_eq!(mode(&loose.join(f)), 0o600, "{f}");
    }
    for f in ["plait.db-wal", "plait.db-shm"] {
        let path = loose.join(f);
        if path.exists() {
            assert_eq!(mode(&path), 0o600, "{f}");
        }
    }
    assert!(p.log().contains("tightened permissions"), "{}", p.log());
    // A data dir that does not exist yet is made private.
    let fresh = parent.path().join("a/b/fresh");
    p.use_data_dir(&fresh);
    p.restart();
    let r = wire::send(p.addr, "GET", "/x", &[], b"").await;
    assert_eq!((r.status, r.text().as_str()), (200, ""), "a new, empty store");
    assert_eq!(mode(&fresh), 0o700);
    for f in ["plait.db", "plait.lock", "identity.pem"] {
        assert_eq!(mode(&fresh.join(f)), 0o600, "{f}");
    }
}
