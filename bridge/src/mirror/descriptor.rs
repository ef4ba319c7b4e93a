//! The signed descriptor of a sealed segment: what a mirror checks without decrypting.
//!
//! A descriptor says "segment `seq` of namespace `namespace` follows the segment whose
//! descriptor hashes to `prev`, its ciphertext is `len` bytes hashing to `hash`, sealed at
//! `at_ms`", signed by the namespace's ed25519 key. Its byte encoding is fixed-size (188
//! bytes), big-endian, and pinned by a test below:
//!
//! ```text
//! offset size
//!      0    4  magic "PSD1" (Plait Segment Descriptor, version 1)
//!      4   32  namespace: the owner's ed25519 public key
//!     36    8  seq: u64, 1 for the first segment
//!     44   32  prev: BLAKE3 of the previous descriptor's 188 bytes (zeros for seq 1)
//!     76   32  hash: BLAKE3 of the ciphertext
//!    108    8  len: u64, the ciphertext's length in bytes
//!    116    8  at_ms: u64, milliseconds since the Unix epoch
//!    124   64  ed25519 signature of SIGNING_DOMAIN || bytes 0..124
//! ```
//!
//! The descriptor's own hash (what the next one names as `prev`) covers the signature too,
//! so the chain pins signed descriptors, not merely their contents.

use crate::identity::{Identity, Keypair};

/// Length of an encoded descriptor.
pub const DESCRIPTOR_LEN: usize = 188;
/// Length of the signed part (everything before the signature).
const SIGNED_LEN: usize = 124;
const MAGIC: &[u8; 4] = b"PSD1";
/// Prefixed to the signed bytes, so a descriptor signature means nothing elsewhere.
const SIGNING_DOMAIN: &[u8] = b"plait/mirror/descriptor/1\n";

/// A BLAKE3 digest (of a ciphertext or of a descriptor).
pub type Digest = [u8; 32];

/// A segment descriptor (see the module doc for its bytes).
#[derive(Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub namespace: Identity,
    pub seq: u64,
    pub prev: Digest,
    pub hash: Digest,
    pub len: u64,
    pub at_ms: u64,
    signature: [u8; 64],
}

impl std::fmt::Debug for Descriptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Descriptor")
            .field("namespace", &self.namespace)
            .field("seq", &self.seq)
            .field("len", &self.len)
            .field("at_ms", &self.at_ms)
            .finish_non_exhaustive()
    }
}

/// Why bytes are not a descriptor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    #[error("a descriptor is {DESCRIPTOR_LEN} bytes, not {0}")]
    Length(usize),
    #[error("not a version 1 segment descriptor")]
    Magic,
    #[error("the namespace is not an ed25519 public key")]
    Namespace,
}

/// Where a chain stands: the last descriptor's seq and hash (seq 0, zero hash: empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: Digest,
}

impl ChainHead {
    /// The head after `d`.
    pub fn of(d: &Descriptor) -> ChainHead {
        ChainHead {
            seq: d.seq,
            hash: d.digest(),
        }
    }
}

impl Descriptor {
    /// Makes and signs the descriptor of a ciphertext that follows `prev` in `keys`'s
    /// namespace.
    pub fn sign(keys: &Keypair, prev: ChainHead, ciphertext: &[u8], at_ms: u64) -> Descriptor {
        let mut d = Descriptor {
            namespace: keys.identity(),
            seq: prev.seq + 1,
            prev: prev.hash,
            hash: *blake3::hash(ciphertext).as_bytes(),
            len: ciphertext.len() as u64,
            at_ms,
            signature: [0; 64],
        };
        d.signature = keys.sign(&signed_message(&d.signed_bytes()));
        d
    }

    /// Whether it is the next in `namespace`'s chain after `chain`, signed by the
    /// namespace: what a reader checks of a segment before it has the ciphertext (whose
    /// length and BLAKE3 are then checked against it).
    pub fn follows(&self, namespace: Identity, chain: ChainHead) -> bool {
        self.namespace == namespace
            && self.seq == chain.seq + 1
            && self.prev == chain.hash
            && self.verify_signature()
    }

    /// Checks the signature against the namespace's key.
    pub fn verify_signature(&self) -> bool {
        self.namespace
            .verify(&signed_message(&self.signed_bytes()), &self.signature)
            .is_ok()
    }

    /// The 64-byte signature.
    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }

    fn signed_bytes(&self) -> [u8; SIGNED_LEN] {
        let mut b = [0u8; SIGNED_LEN];
        b[0..4].copy_from_slice(MAGIC);
        b[4..36].copy_from_slice(self.namespace.as_bytes());
        b[36..44].copy_from_slice(&self.seq.to_be_bytes());
        b[44..76].copy_from_slice(&self.prev);
        b[76..108].copy_from_slice(&self.hash);
        b[108..116].copy_from_slice(&self.len.to_be_bytes());
        b[116..124].copy_from_slice(&self.at_ms.to_be_bytes());
        b
    }

    /// The 188 bytes.
    pub fn to_bytes(&self) -> [u8; DESCRIPTOR_LEN] {
        let mut b = [0u8; DESCRIPTOR_LEN];
        b[..SIGNED_LEN].copy_from_slice(&self.signed_bytes());
        b[SIGNED_LEN..].copy_from_slice(&self.signature);
        b
    }

    /// Parses 188 bytes. The signature is not checked here (see
    /// [`Descriptor::verify_signature`]).
    pub fn from_bytes(b: &[u8]) -> Result<Descriptor, DescriptorError> {
        if b.len() != DESCRIPTOR_LEN {
            return Err(DescriptorError::Length(b.len()));
        }
        if &b[0..4] != MAGIC {
            return Err(DescriptorError::Magic);
        }
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let d32 = |i: usize| -> Digest { b[i..i + 32].try_into().expect("32 bytes") };
        Ok(Descriptor {
            namespace: Identity::from_bytes(&b[4..36]).map_err(|_| DescriptorError::Namespace)?,
            seq: u64_at(36),
            prev: d32(44),
            hash: d32(76),
            len: u64_at(108),
            at_ms: u64_at(116),
            signature: b[SIGNED_LEN..].try_into().expect("64 bytes"),
        })
    }

    /// Whether `ciphertext` is the one it describes (its length and BLAKE3).
    pub fn matches(&self, ciphertext: &[u8]) -> bool {
        self.len == ciphertext.len() as u64 && &self.hash == blake3::hash(ciphertext).as_bytes()
    }

    /// BLAKE3 of the encoded descriptor: what the next descriptor names as `prev`.
    pub fn digest(&self) -> Digest {
        *blake3::hash(&self.to_bytes()).as_bytes()
    }
}

fn signed_message(signed: &[u8; SIGNED_LEN]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_DOMAIN.len() + SIGNED_LEN);
    m.extend_from_slice(SIGNING_DOMAIN);
    m.extend_from_slice(signed);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed key, so the bytes below are the same on every run (ed25519 is
    /// deterministic).
    pub(crate) fn test_keys() -> Keypair {
        Keypair::from_secret_bytes(&[7; 32])
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn the_encoding_is_pinned() {
        let keys = test_keys();
        let first = Descriptor::sign(&keys, ChainHead::default(), b"ciphertext", 1_700_000_000_000);
        let b = first.to_bytes();
        // 0000  50534431                          "PSD1"
        assert_eq!(hex(&b[0..4]), "50534431");
        // 0004  ea4a6c63...                       namespace (the public key of [7; 32])
        assert_eq!(&b[4..36], keys.identity().as_bytes());
        assert_eq!(
            hex(&b[4..36]),
            "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c"
        );
        // 0024  0000000000000001                  seq 1
        assert_eq!(hex(&b[36..44]), "0000000000000001");
        // 002c  00 * 32                           prev: none
        assert_eq!(b[44..76], [0; 32]);
        // 004c  blake3("ciphertext")
        assert_eq!(&b[76..108], blake3::hash(b"ciphertext").as_bytes());
        // 006c  000000000000000a                  len 10
        assert_eq!(hex(&b[108..116]), "000000000000000a");
        // 0074  0000018bcfe56800                  at_ms 1700000000000
        assert_eq!(hex(&b[116..124]), "0000018bcfe56800");
        // 007c  64-byte ed25519 signature over "plait/mirror/descriptor/1\n" || 0000..007b
        let mut signed = SIGNING_DOMAIN.to_vec();
        signed.extend_from_slice(&b[..124]);
        assert!(keys.identity().verify(&signed, &b[124..]).is_ok());
        assert_eq!(
            hex(&b[124..]),
            PINNED_SIGNATURE,
            "the signature (and so the signed bytes) changed"
        );
        assert_eq!(Descriptor::from_bytes(&b).unwrap(), first);
        // The whole test vector, 188 bytes.
        assert_eq!(hex(&b), FULL);

        // The second names the first's digest, BLAKE3 over all 188 bytes.
        let second = Descriptor::sign(&keys, ChainHead::of(&first), b"more", 1_700_000_000_001);
        assert_eq!(second.seq, 2);
        assert_eq!(second.prev, *blake3::hash(&b).as_bytes());
    }

    /// Descriptor 1 of the namespace of secret key [7; 32], over the ciphertext
    /// "ciphertext", at 1700000000000 ms, as a hexdump:
    const FULL: &str = concat!(
        "50534431",                                                         // 0000 "PSD1"
        "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c", // 0004 namespace
        "0000000000000001",                                                 // 0024 seq 1
        "0000000000000000000000000000000000000000000000000000000000000000", // 002c prev: none
        "c12f1481789d50a4c549e15c42bda1759277bc954d2f4b62c0f4531937f2e990", // 004c blake3(ct)
        "000000000000000a",                                                 // 006c len 10
        "0000018bcfe56800",                                                 // 0074 at_ms
        "101365377d90518aa6960793f1246549f83f8a0a27bdcb65558da11c32ce098e", // 007c signature
        "588036b36d70c2d300f644400e398e2cafba6fde045dc5691c8c8bc4d85a4603", //      (64 bytes)
    );

    const PINNED_SIGNATURE: &str = "101365377d90518aa6960793f1246549f83f8a0a27bdcb65558da11c32ce098e588036b36d70c2d300f644400e398e2cafba6fde045dc5691c8c8bc4d85a4603";

    #[test]
    fn tampering_breaks_the_signature() {
        let keys = test_keys();
        let d = Descriptor::sign(&keys, ChainHead::default(), b"x", 5);
        assert!(d.verify_signature());
        for i in [4usize, 40, 50, 80, 110, 120, 130] {
            let mut b = d.to_bytes();
            b[i] ^= 1;
            match Descriptor::from_bytes(&b) {
                Ok(t) => assert!(!t.verify_signature(), "byte {i}"),
                Err(e) => assert_eq!(e, DescriptorError::Namespace, "byte {i}"),
            }
        }
        let other = Keypair::generate();
        let mut b = d.to_bytes();
        b[4..36].copy_from_slice(other.identity().as_bytes());
        assert!(!Descriptor::from_bytes(&b).unwrap().verify_signature());
        assert_eq!(Descriptor::from_bytes(&b[1..]), Err(DescriptorError::Length(187)));
        b[0] = b'X';
        assert_eq!(Descriptor::from_bytes(&b), Err(DescriptorError::Magic));
    }
}
