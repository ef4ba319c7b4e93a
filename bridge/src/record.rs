//! Signed address records: the DHT as DNS.
//!
//! An [`AddressRecord`] maps an identity to its current network addresses in one named DHT.
//! It is signed by that identity, carries a sequence number (a newer record replaces an
//! older one, never the reverse) and an expiry, and is small (≤ [`MAX_RECORD_BYTES`]).
//! It may name the identity's *holders* (at most [`MAX_HOLDERS`], distinct, not itself):
//! the mirrors that keep its sealed segments, so that a peer looking it up while it is
//! offline finds where its data is. A record without holders has the same bytes (and
//! signature) as before holders existed.
//! Kademlia's own records are unsigned, so nodes run Kademlia with record filtering and
//! store only what [`AddressRecord::check`] accepts.

use serde::{Deserialize, Serialize};

use crate::identity::{Identity, Keypair};
use crate::sign::{self, SignError};

/// Largest encoded record accepted.
pub const MAX_RECORD_BYTES: usize = 1024;
/// Longest lifetime a record may claim (so a leaked old record cannot live forever).
pub const MAX_RECORD_TTL_SECS: u64 = 48 * 3600;

/// Most holders one record names.
pub const MAX_HOLDERS: usize = 8;

/// What a record says, without its signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Body {
    id: Identity,
    dht: String,
    seq: u64,
    expires_at: u64,
    addrs: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    holders: Vec<Identity>,
}

/// An identity's addresses, signed by it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressRecord {
    pub id: Identity,
    pub dht: String,
    /// Higher replaces lower.
    pub seq: u64,
    /// Unix seconds.
    pub expires_at: u64,
    /// Multiaddrs (text form) the identity listens on.
    pub addrs: Vec<String>,
    /// Mirrors that hold the identity's sealed segments (ask them when it is offline).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<Identity>,
    pub sig: String,
}

/// Why a record is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record is {0} bytes; at most {MAX_RECORD_BYTES}")]
    TooLarge(usize),
    #[error("record is not valid JSON: {0}")]
    Malformed(String),
    #[error("record is stored under another identity's key")]
    WrongKey,
    #[error("record is for DHT {0:?}")]
    WrongDht(String),
    #[error("record has expired")]
    Expired,
    #[error("record claims to live longer than {MAX_RECORD_TTL_SECS} s")]
    TooLong,
    #[error("record names {0} holders; at most {MAX_HOLDERS}")]
    TooManyHolders(usize),
    #[error("record names a holder twice, or itself")]
    BadHolders,
    #[error("record is older (seq {got}) than the one held (seq {held})")]
    Stale { got: u64, held: u64 },
    #[error(transparent)]
    Signature(#[from] SignError),
}

impl AddressRecord {
    /// A record for `keys`' identity, valid for `ttl_secs` from `now`.
    pub fn new(
        keys: &Keypair,
        dht: &str,
        seq: u64,
        addrs: Vec<String>,
        now: u64,
        ttl_secs: u64,
    ) -> AddressRecord {
        AddressRecord::with_holders(keys, dht, seq, addrs, Vec::new(), now, ttl_secs)
    }

    /// A record for `keys`' identity naming its `holders` (mirrors), valid for `ttl_secs`
    /// from `now`. Checks refuse it past [`MAX_HOLDERS`], with a holder twice or itself.
    pub fn with_holders(
        keys: &Keypair,
        dht: &str,
        seq: u64,
        addrs: Vec<String>,
        holders: Vec<Identity>,
        now: u64,
        ttl_secs: u64,
    ) -> AddressRecord {
        let body = Body {
            id: keys.identity(),
            dht: dht.to_string(),
            seq,
            expires_at: now.saturating_add(ttl_secs),
            addrs,
            holders,
        };
        let sig = sign::sign(keys, "plait-address-record-v1", &body);
        AddressRecord {
            id: body.id,
            dht: body.dht,
            seq,
            expires_at: body.expires_at,
            addrs: body.addrs,
            holders: body.holders,
            sig,
        }
    }

    /// The DHT key of `id`'s record in `dht`.
    pub fn key_for(dht: &str, id: &Identity) -> Vec<u8> {
        format!("/plait/{dht}/addr/{id}").into_bytes()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("records serialize")
    }

    /// Decodes and checks a record found under `key`, for `dht`, at time `now`, against
    /// the sequence number of a record already held (if any).
    pub fn check(
        bytes: &[u8],
        key: &[u8],
        dht: &str,
        now: u64,
        held: Option<u64>,
    ) -> Result<AddressRecord, RecordError> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge(bytes.len()));
        }
        let r: AddressRecord =
            serde_json::from_slice(bytes).map_err(|e| RecordError::Malformed(e.to_string()))?;
        if r.dht != dht {
            return Err(RecordError::WrongDht(r.dht));
        }
        if key != AddressRecord::key_for(dht, &r.id).as_slice() {
            return Err(RecordError::WrongKey);
        }
        let body = Body {
            id: r.id,
            dht: r.dht.clone(),
            seq: r.seq,
            expires_at: r.expires_at,
            addrs: r.addrs.clone(),
            holders: r.holders.clone(),
        };
        sign::verify(&r.id, "plait-address-record-v1", &body, &r.sig)?;
        if r.holders.len() > MAX_HOLDERS {
            return Err(RecordError::TooManyHolders(r.holders.len()));
        }
        let mut seen = std::collections::HashSet::with_capacity(r.holders.len() + 1);
        seen.insert(r.id);
        if !r.holders.iter().all(|h| seen.insert(*h)) {
            return Err(RecordError::BadHolders);
        }
        if r.expires_at <= now {
            return Err(RecordError::Expired);
        }
        if r.expires_at > now + MAX_RECORD_TTL_SECS {
            return Err(RecordError::TooLong);
        }
        if let Some(held) = held
            && r.seq < held
        {
            return Err(RecordError::Stale { got: r.seq, held });
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn a_signed_record_checks_and_forgeries_do_not() {
        let k = Keypair::generate();
        let r = AddressRecord::new(&k, "net", 3, vec!["/ip4/127.0.0.1/tcp/1".into()], NOW, 3600);
        let key = AddressRecord::key_for("net", &k.identity());
        assert_eq!(
            AddressRecord::check(&r.encode(), &key, "net", NOW, None).unwrap(),
            r
        );
        // Same seq again is fine (republication); lower is stale.
        assert!(AddressRecord::check(&r.encode(), &key, "net", NOW, Some(3)).is_ok());
        assert_eq!(
            AddressRecord::check(&r.encode(), &key, "net", NOW, Some(4)),
            Err(RecordError::Stale { got: 3, held: 4 })
        );
        // Changed addresses: the signature no longer matches.
        let mut forged = r.clone();
        forged.addrs = vec!["/ip4/6.6.6.6/tcp/1".into()];
        assert!(matches!(
            AddressRecord::check(&forged.encode(), &key, "net", NOW, None),
            Err(RecordError::Signature(_))
        ));
        // Signed by someone else for this identity.
        let other = Keypair::generate();
        let mut by_other = AddressRecord::new(&other, "net", 9, vec![], NOW, 3600);
        by_other.id = k.identity();
        assert!(matches!(
            AddressRecord::check(&by_other.encode(), &key, "net", NOW, None),
            Err(RecordError::Signature(_))
        ));
        // Under another identity's key, in another DHT, expired, too long, too large.
        let okey = AddressRecord::key_for("net", &other.identity());
        assert_eq!(
            AddressRecord::check(&r.encode(), &okey, "net", NOW, None),
            Err(RecordError::WrongKey)
        );
        assert!(matches!(
            AddressRecord::check(&r.encode(), &key, "other", NOW, None),
            Err(RecordError::WrongDht(_))
        ));
        assert_eq!(
            AddressRecord::check(&r.encode(), &key, "net", NOW + 3600, None),
            Err(RecordError::Expired)
        );
        let long = AddressRecord::new(&k, "net", 1, vec![], NOW, MAX_RECORD_TTL_SECS + 10);
        assert_eq!(
            AddressRecord::check(&long.encode(), &key, "net", NOW, None),
            Err(RecordError::TooLong)
        );
        let big = AddressRecord::new(&k, "net", 1, vec!["/ip4/127.0.0.1/tcp/1".repeat(60)], NOW, 60);
        assert!(matches!(
            AddressRecord::check(&big.encode(), &key, "net", NOW, None),
            Err(RecordError::TooLarge(_))
        ));
        assert!(matches!(
            AddressRecord::check(b"{", &key, "net", NOW, None),
            Err(RecordError::Malformed(_))
        ));
    }

    #[test]
    fn holders_are_signed_bounded_and_distinct() {
        let k = Keypair::generate();
        let key = AddressRecord::key_for("net", &k.identity());
        let m: Vec<Identity> = (0..=MAX_HOLDERS)
            .map(|_| Keypair::generate().identity())
            .collect();
        let r = AddressRecord::with_holders(&k, "net", 1, vec![], m[..2].to_vec(), NOW, 60);
        assert_eq!(
            AddressRecord::check(&r.encode(), &key, "net", NOW, None).unwrap(),
            r
        );
        // A holder added or dropped by someone else: the signature no longer matches.
        let mut forged = r.clone();
        forged.holders.push(m[2]);
        assert!(matches!(
            AddressRecord::check(&forged.encode(), &key, "net", NOW, None),
            Err(RecordError::Signature(_))
        ));
        let mut dropped = r.clone();
        dropped.holders.clear();
        assert!(matches!(
            AddressRecord::check(&dropped.encode(), &key, "net", NOW, None),
            Err(RecordError::Signature(_))
        ));
        let many = AddressRecord::with_holders(&k, "net", 1, vec![], m.clone(), NOW, 60);
        assert_eq!(
            AddressRecord::check(&many.encode(), &key, "net", NOW, None),
            Err(RecordError::TooManyHolders(MAX_HOLDERS + 1))
        );
        let twice = AddressRecord::with_holders(&k, "net", 1, vec![], vec![m[0], m[0]], NOW, 60);
        assert_eq!(
            AddressRecord::check(&twice.encode(), &key, "net", NOW, None),
            Err(RecordError::BadHolders)
        );
        let itself = AddressRecord::with_holders(&k, "net", 1, vec![], vec![k.identity()], NOW, 60);
        assert_eq!(
            AddressRecord::check(&itself.encode(), &key, "net", NOW, None),
            Err(RecordError::BadHolders)
        );
        // Without holders, the bytes are those of a record from before holders.
        let plain = AddressRecord::new(&k, "net", 1, vec![], NOW, 60);
        assert!(!String::from_utf8(plain.encode()).unwrap().contains("holders"));
    }
}
