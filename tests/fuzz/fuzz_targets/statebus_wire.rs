//! Statebus websocket frames, both dialects (v7 `get`/`set`/`forget`/`delete` with
//! patches, v6 `fetch`/`save`), through `statebus::wire::parse`; the key each names goes
//! on to `StatebusKey::parse` and each patch's range to the JSON-path parser, as the
//! session does. Input: one text frame.
//!
//! Beyond not panicking: a state the server sends back for a `set` (`wire::state`, in the
//! client's dialect) parses as the same key and value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use plait_server::braid::patch::parse_json_path;
use plait_server::statebus::keys::StatebusKey;
use plait_server::statebus::wire::{self, ClientMessage};

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((dialect, msg)) = wire::parse(frame) else {
        return;
    };
    let key = match &msg {
        ClientMessage::Get { key }
        | ClientMessage::Set { key, .. }
        | ClientMessage::Patch { key, .. }
        | ClientMessage::Forget { key }
        | ClientMessage::Delete { key } => key,
    };
    let _ = StatebusKey::parse(key);
    match &msg {
        ClientMessage::Patch { patches, .. } => {
            for (range, _) in patches {
                let _ = parse_json_path(range);
            }
        }
        ClientMessage::Set { key, val } => {
            let echo = wire::state(dialect, key, val.as_ref());
            match wire::parse(&echo) {
                Ok((d, ClientMessage::Set { key: k, val: v })) => {
                    assert_eq!(d, dialect);
                    assert_eq!(&k, key);
                    assert_eq!(&v, val, "{echo}");
                }
                other => panic!("the state sent for {frame:?} reads back as {other:?}"),
            }
        }
        _ => {}
    }
});
