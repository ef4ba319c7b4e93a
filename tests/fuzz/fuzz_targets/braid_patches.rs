//! PUT bodies: a whole representation, one `Content-Range` patch or `Patches: N` blocks
//! (also `Content-Type: application/http-patches; count=N`), through `parse_write_body`,
//! and the range and JSON-path parsers on their own. Input: a request head, a blank line,
//! the body.
//!
//! Beyond not panicking: what parses is well-formed (text ranges do not end before they
//! start, byte ranges are not empty, no more than `MAX_PATCHES` patches, each patch's
//! content is bytes of the body).

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use plait_server::braid::patch::{
    MAX_PATCHES, parse_content_range, parse_json_path, parse_patch_blocks, parse_write_body,
};
use plait_server::update::{Patch, Range, WriteBody};

fn well_formed(patches: &[Patch], body: &[u8]) {
    assert!(patches.len() <= MAX_PATCHES);
    let total: usize = patches.iter().map(|p| p.content.len()).sum();
    assert!(total <= body.len());
    for p in patches {
        match p.range {
            Range::Text { start, end } => assert!(start <= end),
            Range::Bytes {
                start,
                end: Some(end),
            } => assert!(start < end),
            Range::Bytes { end: None, .. } | Range::Json(_) => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (head, body) = plait_fuzz::split_head(data);
    let headers = plait_fuzz::header_map(head);
    match parse_write_body(&headers, Bytes::copy_from_slice(body)) {
        Ok(WriteBody::Patches(ps)) => well_formed(&ps, body),
        Ok(WriteBody::Full { body: b, .. }) => assert_eq!(&b[..], body),
        Err(_) => {}
    }
    // The blocks alone, with a count taken from the head's length.
    if let Ok(ps) = parse_patch_blocks(body, head.len() % 8) {
        well_formed(&ps, body);
    }
    if let Ok(s) = std::str::from_utf8(head) {
        for line in s.lines() {
            if let Ok(r) = parse_content_range(line) {
                well_formed(
                    &[Patch {
                        range: r,
                        content: Bytes::new(),
                    }],
                    &[],
                );
            }
            let _ = parse_json_path(line);
        }
    }
});
