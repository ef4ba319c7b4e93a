//! Braid request headers (`Version`, `Parents`, `Subscribe`, `Peer`, `Merge-Type`,
//! `Heartbeats`, `Repr-Digest`) as hyper hands them to `BraidHeaders::parse`, and version
//! lists on their own. Input: header lines, `Name: value`.
//!
//! Beyond not panicking: a version that parses is written back by `format_version` in a
//! form that parses to the same version (the server answers with what it read).

#![no_main]

use libfuzzer_sys::fuzz_target;
use plait_server::braid::headers::{BraidHeaders, format_version, parse_string_list, parse_version};
use plait_server::model::Version;

fn round_trips(v: &Version) {
    let text = format_version(v);
    assert_eq!(parse_version(&text).as_ref(), Ok(v), "{text}");
}

fuzz_target!(|data: &[u8]| {
    let headers = plait_fuzz::header_map(data);
    if let Ok(b) = BraidHeaders::parse(&headers) {
        for v in [&b.version, &b.parents].into_iter().flatten() {
            round_trips(v);
        }
        if let Some(h) = b.heartbeats {
            assert!(
                (plait_server::braid::headers::MIN_HEARTBEAT..=plait_server::braid::headers::MAX_HEARTBEAT)
                    .contains(&h)
            );
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(v) = parse_version(s) {
            round_trips(&v);
        }
        let _ = parse_string_list(s);
    }
});
