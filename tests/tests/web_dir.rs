//! `--web-dir` serves what is meant to be public, against the real `plait` binary:
//! dot-files and dot-directories are never served (neither named nor through a symlink),
//! nor anything a symlink leads to outside the directory. Such paths are the state's.

use plait_tests::plait::{Plait, Store};
use plait_tests::wire;

#[tokio::test]
async fn dot_files_and_symlinks_out_are_not_served() {
    let web = tempfile::tempdir().unwrap();
    let w = web.path();
    std::fs::write(w.join("index.html"), "page").unwrap();
    std::fs::write(w.join(".env"), "SECRET=env").unwrap();
    std::fs::create_dir_all(w.join(".git")).unwrap();
    std::fs::write(w.join(".git/config"), "SECRET=git").unwrap();
    std::fs::create_dir_all(w.join("a/.hidden")).unwrap();
    std::fs::write(w.join("a/.hidden/x"), "SECRET=hidden").unwrap();
    std::fs::create_dir_all(w.join(".well")).unwrap();
    std::fs::write(w.join(".well/index.html"), "SECRET=index").unwrap();
    // Symlinks with innocent names: to a dot-file inside, to a file and a directory outside.
    std::os::unix::fs::symlink(w.join(".env"), w.join("env.txt")).unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "SECRET=outside").unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), w.join("leak")).unwrap();
    std::os::unix::fs::symlink(outside.path(), w.join("out")).unwrap();
    let p = Plait::start_with(Store::Embedded, &["--web-dir", w.to_str().unwrap()]);
    assert_eq!(wire::send(p.addr, "GET", "/", &[], b"").await.text(), "page");
    for path in [
        "/.env",
        "/.git/config",
        "/a/.hidden/x",
        "/.well/",
        "/.well",
        "/%2Eenv",
        "/env.txt",
        "/leak",
        "/out/secret",
    ] {
        for method in ["GET", "HEAD"] {
            let r = wire::send(p.addr, method, path, &[], b"").await;
            // Refused, or left to the state (whose answers carry a Version header).
            assert!(
                matches!(r.status, 400 | 403 | 404) || r.header("version").is_some(),
                "{method} {path}: {} {:?}",
                r.status,
                r.headers
            );
            assert!(!r.text().contains("SECRET"), "{method} {path}: {}", r.text());
        }
    }
}
