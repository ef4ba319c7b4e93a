//! Statebus keys (`current_user`, master keys, `@name`, `user/name`, `@name/...` closets,
//! plain keys) through `StatebusKey::parse`, and the resource paths and version ids they
//! become. Input: one key.
//!
//! Beyond not panicking: an accepted key is not empty, not over `MAX_KEY_BYTES`, and names
//! no reserved JavaScript property as a segment; a master key is never classified as
//! anything else.

#![no_main]

use libfuzzer_sys::fuzz_target;
use plait_server::model::{ResourcePath, VersionId};
use plait_server::statebus::keys::{MAX_KEY_BYTES, StatebusKey};

fuzz_target!(|data: &[u8]| {
    let Ok(wire) = std::str::from_utf8(data) else {
        return;
    };
    let bare = wire.strip_prefix('/').unwrap_or(wire);
    match StatebusKey::parse(wire) {
        Ok(k) => {
            assert!(!bare.is_empty() && bare.len() <= MAX_KEY_BYTES);
            assert!(!bare.split('/').any(|s| s == "__proto__" || s == "constructor"));
            let master = ["users", "users/passwords", "logged_in_clients"]
                .iter()
                .any(|m| bare == *m || bare.starts_with(&format!("{m}/")));
            assert_eq!(master, matches!(k, StatebusKey::Master(_)), "{wire:?} → {k:?}");
            if let StatebusKey::Plain(p) = k {
                let _ = ResourcePath::new(p);
            }
        }
        Err(_) => {}
    }
    if let Ok(p) = ResourcePath::new(bare) {
        assert!(!p.as_str().split('/').any(|s| s == "." || s == ".."));
        assert!(!p.as_str().chars().any(char::is_control));
    }
    if let Ok(id) = VersionId::parse(wire) {
        assert_eq!(VersionId::parse(&id.to_string()), Ok(id));
    }
});
