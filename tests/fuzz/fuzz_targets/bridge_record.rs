//! DHT address records as a peer stores them or a lookup finds them, through
//! `AddressRecord::check` (the filter every record passes). Input: the record's bytes; the
//! same bytes also choose the fields of a record the identity signs itself.
//!
//! Beyond not panicking: bytes that were not signed by the identity never check out; a
//! record the identity signed checks out exactly when it is small enough, names at most
//! `MAX_HOLDERS` distinct holders other than itself, is unexpired, not too long-lived and
//! not older than the one held.

#![no_main]

use libfuzzer_sys::fuzz_target;
use plait_bridge::Keypair;
use plait_bridge::record::{AddressRecord, MAX_HOLDERS, MAX_RECORD_BYTES, MAX_RECORD_TTL_SECS, RecordError};

const NOW: u64 = 1_800_000_000;
const DHT: &str = "net";

fuzz_target!(|data: &[u8]| {
    let keys = Keypair::from_secret_bytes(&[7; 32]);
    let id = keys.identity();

    // Bytes from a peer, under this identity's key and under the key they claim.
    let key = AddressRecord::key_for(DHT, &id);
    if let Ok(r) = AddressRecord::check(data, &key, DHT, NOW, None) {
        assert_eq!(r.id, id);
        assert_eq!(r.dht, DHT);
        assert!(r.expires_at > NOW && r.expires_at <= NOW + MAX_RECORD_TTL_SECS);
        assert!(r.holders.len() <= MAX_HOLDERS && !r.holders.contains(&id));
    }
    if let Ok(r) = serde_json::from_slice::<AddressRecord>(data) {
        let claimed = AddressRecord::key_for(&r.dht, &r.id);
        let _ = AddressRecord::check(data, &claimed, &r.dht, NOW, Some(r.seq));
    }

    // A record the identity signs, with fields the input chooses: byte 17 the number of
    // holders (up to twice the most allowed), then one byte each choosing its key (7 is
    // the identity's own; a byte twice is a holder twice).
    if data.len() < 18 {
        return;
    }
    let seq = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let ttl = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes")) % (2 * MAX_RECORD_TTL_SECS);
    let held = (data[16] & 1 == 1).then(|| seq.wrapping_add(u64::from(data[16] >> 1)) & !(1 << 63));
    let n = (data[17] as usize) % (2 * MAX_HOLDERS + 1);
    let Some(seeds) = data.get(18..18 + n) else {
        return;
    };
    let holders: Vec<_> = seeds
        .iter()
        .map(|&b| Keypair::from_secret_bytes(&[b; 32]).identity())
        .collect();
    let text = String::from_utf8_lossy(&data[18 + n..]);
    let mut lines = text.lines();
    let dht = lines.next().unwrap_or(DHT).to_string();
    let addrs: Vec<String> = lines.map(str::to_string).collect();
    let r = AddressRecord::with_holders(&keys, &dht, seq, addrs, holders.clone(), NOW, ttl);
    let bytes = r.encode();
    let mut distinct = holders.clone();
    distinct.push(id);
    distinct.sort_by_key(|h| *h.as_bytes());
    distinct.dedup();
    let got = AddressRecord::check(&bytes, &AddressRecord::key_for(&dht, &id), &dht, NOW, held);
    let want = if bytes.len() > MAX_RECORD_BYTES {
        Err(RecordError::TooLarge(bytes.len()))
    } else if holders.len() > MAX_HOLDERS {
        Err(RecordError::TooManyHolders(holders.len()))
    } else if distinct.len() != holders.len() + 1 {
        Err(RecordError::BadHolders)
    } else if ttl == 0 {
        Err(RecordError::Expired)
    } else if ttl > MAX_RECORD_TTL_SECS {
        Err(RecordError::TooLong)
    } else if let Some(h) = held.filter(|&h| seq < h) {
        Err(RecordError::Stale { got: seq, held: h })
    } else {
        Ok(r)
    };
    assert_eq!(got, want);
});
