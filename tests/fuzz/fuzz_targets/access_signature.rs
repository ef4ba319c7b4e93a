//! Signed requests (HTTP Message Signatures, RFC 9421, with `Content-Digest`, RFC 9530):
//! the `Signature-Input`, `Signature` and `Content-Digest` structured fields through
//! `verify_request` and `check_content_digest`, and the `@target-uri` the server builds.
//! Input: a request line (`METHOD target-uri`), header lines, a blank line, the body.
//!
//! Beyond not panicking: bytes nobody signed never verify as the fuzz key, and the same
//! request signed with `sign_request` (whatever other headers it carries) verifies as that
//! key, its body matching the digest it covers.

#![no_main]

use http::{Method, Uri};
use libfuzzer_sys::fuzz_target;
use plait_bridge::Keypair;
use plait_server::access::signature::{
    carries_body, check_content_digest, sign_request, target_uri, verify_request,
};

const NOW: u64 = 1_800_000_000;
const SKEW: u64 = 300;

fuzz_target!(|data: &[u8]| {
    let (head, body) = plait_fuzz::split_head(data);
    let (line, fields) = match head.iter().position(|&b| b == b'\n') {
        Some(i) => (&head[..i], &head[i + 1..]),
        None => (head, &[][..]),
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return;
    };
    let (method, target) = line.trim().split_once(' ').unwrap_or(("GET", line.trim()));
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let headers = plait_fuzz::header_map(fields);
    let key = Keypair::from_secret_bytes(&[9; 32]);

    if let Ok(v) = verify_request(&method, target, &headers, NOW, SKEW) {
        assert_ne!(v.identity, key.identity(), "a signature nobody made verified");
    }
    let _ = check_content_digest(&headers, body);
    if let Ok(uri) = target.parse::<Uri>() {
        let _ = target_uri("http", &headers, &uri);
    }

    let mut signed = headers.clone();
    let with_body = (!body.is_empty() || carries_body(&method, &headers)).then_some(body);
    let ttl = (data.len() as u64) % 400;
    if sign_request(&key, &method, target, &mut signed, with_body, NOW, ttl).is_ok() {
        let v = verify_request(&method, target, &signed, NOW, SKEW)
            .unwrap_or_else(|e| panic!("its own signature does not verify: {e}"));
        assert_eq!(v.identity, key.identity());
        assert_eq!(v.expires, NOW + ttl);
        if v.covers_digest {
            check_content_digest(&signed, body).expect("the body matches the digest it was signed with");
        }
    }
});
