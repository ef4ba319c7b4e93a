//! Arbitrary bytes against every parser of client input in the Braid codec: each must
//! answer (a value or an error), never panic. They run with every `cargo test` on stable;
//! the fuzz targets in `tests/fuzz/` (nightly) search the same parsers far longer.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;

use super::headers::{BraidHeaders, parse_string_list, parse_version};
use super::patch::{parse_content_range, parse_json_path, parse_patch_blocks, parse_write_body};

fn header_names() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "subscribe",
        "version",
        "parents",
        "peer",
        "merge-type",
        "heartbeats",
        "repr-digest",
        "patches",
        "content-range",
        "content-type",
        "content-length",
    ])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn patch_blocks_never_panic(body in prop::collection::vec(any::<u8>(), 0..400), n in 0usize..8) {
        let _ = parse_patch_blocks(&body, n);
    }

    #[test]
    fn patch_blocks_from_plausible_pieces_never_panic(
        parts in prop::collection::vec(prop_oneof![
            Just("content-length: ".to_string()), Just("Content-Range: ".to_string()),
            Just("text [".to_string()), Just("json .a".to_string()), Just("\r\n".to_string()),
            Just("\n".to_string()), Just(":".to_string()), "[0-9]{1,3}", "[a-z\\]\\[:]{0,4}",
        ], 0..40),
        n in 0usize..4,
    ) {
        let _ = parse_patch_blocks(parts.concat().as_bytes(), n);
    }

    #[test]
    fn ranges_and_paths_never_panic(s in "\\PC{0,60}") {
        let _ = parse_content_range(&s);
        let _ = parse_json_path(&s);
        let _ = parse_version(&s);
        let _ = parse_string_list(&s);
    }

    #[test]
    fn json_paths_from_plausible_pieces_never_panic(
        parts in prop::collection::vec(prop_oneof![
            Just("."), Just("["), Just("]"), Just(":"), Just("-"), Just("\""), Just("\\"), Just("a"), Just("9"),
        ], 0..30),
    ) {
        let _ = parse_json_path(&parts.concat());
    }

    #[test]
    fn headers_never_panic(pairs in prop::collection::vec((header_names(), prop::collection::vec(32u8..127, 0..40)), 0..8)) {
        let mut h = HeaderMap::new();
        for (name, value) in &pairs {
            if let Ok(v) = HeaderValue::from_bytes(value) {
                h.append(HeaderName::from_static(name), v);
            }
        }
        let _ = BraidHeaders::parse(&h);
        let _ = parse_write_body(&h, Bytes::from_static(b"content-length: 1\r\ncontent-range: text [0:0]\r\n\r\nx"));
    }
}
