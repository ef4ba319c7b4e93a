//! The mirror's bytes from outside: `/plait/mirror/1.0.0` requests and responses as a peer
//! sends them, segment descriptors, checkpoints, device certificates, device links, a key
//! bundle's JSON, age ciphertext a device opens (and a head of it a reader tells its own
//! segments by), and a segment's plaintext batch (which a
//! device or reader decodes after opening what a mirror served). The first byte chooses
//! the parser; the rest is its input.
//!
//! Beyond not panicking: whatever parses encodes back to what was read (requests,
//! responses, descriptors, checkpoints, certificates, links, batches); a descriptor or
//! checkpoint that was not signed by its namespace's key never verifies, and the mirror's
//! check of a segment refuses it (`bad-signature`) before looking at anything else.

#![no_main]

use libfuzzer_sys::fuzz_target;
use plait_bridge::mirror::device::{DeviceCert, DeviceLink, KeyBundle};
use plait_bridge::mirror::wire::{encode_request, encode_response, read_request, read_response};
use plait_bridge::mirror::{Allowance, ChainHead, Checkpoint, Descriptor, Refusal, SealKey, check};
use plait_server::mirror::batch;

const NOW_MS: u64 = 1_800_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((&which, input)) = data.split_first() else {
        return;
    };
    match which % 8 {
        0 => {
            if let Ok(req) = futures::executor::block_on(read_request(&mut &input[..])) {
                let again = encode_request(&req);
                let back = futures::executor::block_on(read_request(&mut &again[..])).expect("re-read");
                assert_eq!(back, req);
            }
        }
        1 => {
            if let Ok(res) = futures::executor::block_on(read_response(&mut &input[..])) {
                let again = encode_response(&res);
                let back = futures::executor::block_on(read_response(&mut &again[..])).expect("re-read");
                assert_eq!(back, res);
            }
        }
        2 => {
            if let Ok(d) = Descriptor::from_bytes(input) {
                assert_eq!(&d.to_bytes()[..], input);
                // Bytes that do not verify are refused for their signature first.
                if !d.verify_signature() {
                    let head = ChainHead::of(&d);
                    let allow = Some(Allowance {
                        quota: u64::MAX,
                        used: 0,
                    });
                    assert_eq!(check(&d, input, head, allow), Err(Refusal::BadSignature));
                }
            }
        }
        3 => {
            if let Ok(c) = Checkpoint::from_bytes(input) {
                assert_eq!(&c.to_bytes()[..], input);
                let _ = c.verify_signature();
                let _ = c.chain_head();
            }
        }
        4 => {
            if let Ok(cert) = DeviceCert::from_bytes(input) {
                assert_eq!(&cert.to_bytes()[..], input);
                let _ = cert.check(NOW_MS);
            }
        }
        5 => {
            let text = String::from_utf8_lossy(input);
            if let Ok(link) = text.parse::<DeviceLink>() {
                let again: DeviceLink = link.to_string().parse().expect("re-parse");
                assert_eq!(again, link);
            }
            if let Ok(bundle) = serde_json::from_slice::<KeyBundle>(input) {
                let _ = bundle.cert();
                let _ = bundle.device_key();
                let _ = bundle.device_seal_key();
                let _ = bundle.owner_seal_key();
            }
        }
        6 => {
            // Ciphertext a mirror served, opened by a device's key (age's parser). The key
            // is fixed so that the corpus can hold segments really sealed to it.
            let key = SealKey::from_secret(SEAL_SECRET).expect("a key");
            let opened = plait_bridge::mirror::open(&key, input);
            // A segment's head (what a reader tells its own segments by): what opens is
            // never told apart as not sealed to the key.
            if opened.is_ok() {
                assert_ne!(plait_bridge::mirror::sealed_to(&[&key], input), Some(false));
            } else {
                let _ = plait_bridge::mirror::sealed_to(&[&key], input);
            }
        }
        _ => {
            if let Ok(entries) = batch::decode(input) {
                let again = batch::encode(&entries);
                if input.starts_with(b"PSB2") {
                    assert_eq!(again, input);
                } else {
                    // A batch written before versions were typed: written anew, it is a
                    // PSB2 batch of the same entries.
                    assert_eq!(batch::decode(&again).as_ref(), Ok(&entries));
                }
            }
        }
    }
});

/// A fixed age X25519 secret, for fuzzing only: the corpus holds a segment sealed to it.
const SEAL_SECRET: &str = "AGE-SECRET-KEY-1ACZRXJRPTG0YGPA5K9TEV5JH6FZ8M74KP0XTYFQKW8H07NQN0LASC2FCYN";
