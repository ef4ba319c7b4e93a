//! Bearer token strings (`Authorization: Bearer plait_<id>_<secret>`) through
//! `Tokens::verify`, against a token file holding an owner token and a limited one.
//! Input: the token as the client sent it.
//!
//! Beyond not panicking: only the exact tokens issued are accepted, each with its own
//! grant.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use plait_server::access::tokens::Tokens;

struct Issued {
    _dir: tempfile::TempDir,
    tokens: Tokens,
    owner: String,
    limited: String,
}

fn issued() -> &'static Issued {
    static ISSUED: OnceLock<Issued> = OnceLock::new();
    ISSUED.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let tokens = Tokens::new(dir.path());
        let (_, owner) = tokens.issue(&[], &[], None, None).expect("issue");
        let (_, limited) = tokens
            .issue(&["/drafts".into()], &["/notes".into()], None, Some("app".into()))
            .expect("issue");
        Issued {
            _dir: dir,
            tokens,
            owner,
            limited,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let t = issued();
    if let Ok(grant) = t.tokens.verify(token) {
        assert!(token == t.owner || token == t.limited, "{token:?} was accepted");
        assert_eq!(grant.owner, token == t.owner);
    }
    // The issued tokens themselves, with the input's bytes appended, are other tokens.
    if !token.is_empty() {
        for real in [&t.owner, &t.limited] {
            assert!(t.tokens.verify(&format!("{real}{token}")).is_err());
        }
    }
});
