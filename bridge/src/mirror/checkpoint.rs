//! Checkpoints: the owner's signed word that a sealed snapshot supersedes the segments up
//! to a sequence, so a mirror compacts a log it cannot read.
//!
//! A checkpoint says "segments 1..=`upto` of `namespace` are superseded by the snapshot
//! whose ciphertext is `len` bytes hashing to `hash`; the chain goes on after the
//! descriptor hashing to `head` (segment `upto`'s)", signed by the namespace's ed25519
//! key under a domain of its own (a descriptor's signature never passes for a
//! checkpoint's). The snapshot is sealed as a segment is (age, the same recipients); its
//! plaintext is a batch of every resource's current state.
//!
//! **A device's chain** (its writes to its owner's namespace, see [`super::device`]) is
//! checkpointed by its owner, not by the device: once the owner merged the chain up to a
//! segment into its own chain, it signs a checkpoint whose namespace is the device's,
//! with no snapshot (`len` 0, `hash` BLAKE3 of nothing: what the segments held is in the
//! owner's chain now), with its own key ([`Checkpoint::sign_merged`]). A mirror checks
//! it against the owner the device pushed for ([`Checkpoint::verify_signature_by`]); a
//! device cannot drop its own writes before its owner merged them.
//!
//! The chain is not re-linked: segment `upto + 1` still names segment `upto`'s digest as
//! its `prev`, which the checkpoint carries as `head`, so a mirror that dropped segment
//! `upto` still checks the next one. Its bytes are fixed-size (188), big-endian, pinned by
//! a test below:
//!
//! ```text
//! offset size
//!      0    4  magic "PCK1" (Plait ChecKpoint, version 1)
//!      4   32  namespace: the owner's ed25519 public key
//!     36    8  upto: u64, the last segment the snapshot supersedes (at least 1)
//!     44   32  head: BLAKE3 of segment `upto`'s 188-byte descriptor
//!     76   32  hash: BLAKE3 of the snapshot's ciphertext
//!    108    8  len: u64, the snapshot ciphertext's length in bytes
//!    116    8  at_ms: u64, milliseconds since the Unix epoch
//!    124   64  ed25519 signature of SIGNING_DOMAIN || bytes 0..124
//! ```

use std::io::Write;

use super::descriptor::{ChainHead, DescriptorError, Digest};
use super::segment::SealError;
use crate::identity::{Identity, Keypair};

/// Length of an encoded checkpoint.
pub const CHECKPOINT_LEN: usize = 188;
const SIGNED_LEN: usize = 124;
const MAGIC: &[u8; 4] = b"PCK1";
/// Prefixed to the signed bytes, so a checkpoint signature means nothing elsewhere.
const SIGNING_DOMAIN: &[u8] = b"plait/mirror/checkpoint/1\n";

/// A signed checkpoint (see the module doc for its bytes).
#[derive(Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub namespace: Identity,
    pub upto: u64,
    pub head: Digest,
    pub hash: Digest,
    pub len: u64,
    pub at_ms: u64,
    signature: [u8; 64],
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("namespace", &self.namespace)
            .field("upto", &self.upto)
            .field("len", &self.len)
            .field("at_ms", &self.at_ms)
            .finish_non_exhaustive()
    }
}

impl Checkpoint {
    /// Makes and signs the checkpoint of a snapshot ciphertext that supersedes the chain
    /// up to `head` (segment `head.seq`) in `keys`'s namespace.
    pub fn sign(keys: &Keypair, head: ChainHead, snapshot: &[u8], at_ms: u64) -> Checkpoint {
        let mut c = Checkpoint {
            namespace: keys.identity(),
            upto: head.seq,
            head: head.hash,
            hash: *blake3::hash(snapshot).as_bytes(),
            len: snapshot.len() as u64,
            at_ms,
            signature: [0; 64],
        };
        c.signature = keys.sign(&signed_message(&c.signed_bytes()));
        c
    }

    /// The owner's checkpoint of its device's chain, merged up to `head` (see the module
    /// doc): no snapshot, signed by `owner`.
    pub fn sign_merged(owner: &Keypair, device: Identity, head: ChainHead, at_ms: u64) -> Checkpoint {
        let mut c = Checkpoint {
            namespace: device,
            upto: head.seq,
            head: head.hash,
            hash: *blake3::hash(&[]).as_bytes(),
            len: 0,
            at_ms,
            signature: [0; 64],
        };
        c.signature = owner.sign(&signed_message(&c.signed_bytes()));
        c
    }

    /// Checks the signature against the namespace's key.
    pub fn verify_signature(&self) -> bool {
        self.verify_signature_by(&self.namespace)
    }

    /// Checks the signature against `signer`'s key: the namespace's for an owner's chain,
    /// the owner's for one of its devices' chains.
    pub fn verify_signature_by(&self, signer: &Identity) -> bool {
        signer
            .verify(&signed_message(&self.signed_bytes()), &self.signature)
            .is_ok()
    }

    /// Where the chain stands right after the segments it supersedes.
    pub fn chain_head(&self) -> ChainHead {
        ChainHead {
            seq: self.upto,
            hash: self.head,
        }
    }

    fn signed_bytes(&self) -> [u8; SIGNED_LEN] {
        let mut b = [0u8; SIGNED_LEN];
        b[0..4].copy_from_slice(MAGIC);
        b[4..36].copy_from_slice(self.namespace.as_bytes());
        b[36..44].copy_from_slice(&self.upto.to_be_bytes());
        b[44..76].copy_from_slice(&self.head);
        b[76..108].copy_from_slice(&self.hash);
        b[108..116].copy_from_slice(&self.len.to_be_bytes());
        b[116..124].copy_from_slice(&self.at_ms.to_be_bytes());
        b
    }

    /// The 188 bytes.
    pub fn to_bytes(&self) -> [u8; CHECKPOINT_LEN] {
        let mut b = [0u8; CHECKPOINT_LEN];
        b[..SIGNED_LEN].copy_from_slice(&self.signed_bytes());
        b[SIGNED_LEN..].copy_from_slice(&self.signature);
        b
    }

    /// Parses 188 bytes. The signature is not checked here.
    pub fn from_bytes(b: &[u8]) -> Result<Checkpoint, DescriptorError> {
        if b.len() != CHECKPOINT_LEN {
            return Err(DescriptorError::Length(b.len()));
        }
        if &b[0..4] != MAGIC {
            return Err(DescriptorError::Magic);
        }
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let d32 = |i: usize| -> Digest { b[i..i + 32].try_into().expect("32 bytes") };
        Ok(Checkpoint {
            namespace: Identity::from_bytes(&b[4..36]).map_err(|_| DescriptorError::Namespace)?,
            upto: u64_at(36),
            head: d32(44),
            hash: d32(76),
            len: u64_at(108),
            at_ms: u64_at(116),
            signature: b[SIGNED_LEN..].try_into().expect("64 bytes"),
        })
    }
}

fn signed_message(signed: &[u8; SIGNED_LEN]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_DOMAIN.len() + SIGNED_LEN);
    m.extend_from_slice(SIGNING_DOMAIN);
    m.extend_from_slice(signed);
    m
}

/// A checkpoint as stored and sent: the signed checkpoint and its snapshot's ciphertext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedCheckpoint {
    pub checkpoint: Checkpoint,
    pub snapshot: Vec<u8>,
}

/// A checkpoint with the first bytes of its snapshot's ciphertext: enough to tell from
/// its age header whether the snapshot is sealed to a key before fetching it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointHead {
    pub checkpoint: Checkpoint,
    pub head: Vec<u8>,
}

/// Encrypts the snapshot `plaintext` to `recipients` and signs a checkpoint superseding
/// the chain up to `head`.
pub fn seal_checkpoint(
    keys: &Keypair,
    recipients: &[age::x25519::Recipient],
    head: ChainHead,
    plaintext: &[u8],
    at_ms: u64,
) -> Result<SealedCheckpoint, SealError> {
    let snapshot = encrypt(recipients, plaintext)?;
    Ok(SealedCheckpoint {
        checkpoint: Checkpoint::sign(keys, head, &snapshot, at_ms),
        snapshot,
    })
}

/// age-encrypts `plaintext` to `recipients` (a segment's or a snapshot's ciphertext).
pub(crate) fn encrypt(recipients: &[age::x25519::Recipient], plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
    let enc = age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
        .map_err(|e| SealError::Seal(e.to_string()))?;
    // age adds about 200 bytes of header and 16 per 64 KiB chunk.
    let mut out = Vec::with_capacity(plaintext.len() + 256 + plaintext.len() / 4096);
    let mut w = enc
        .wrap_output(&mut out)
        .map_err(|e| SealError::Seal(e.to_string()))?;
    w.write_all(plaintext)
        .and_then(|_| w.finish().map(drop))
        .map_err(|e| SealError::Seal(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::descriptor::Descriptor;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn a_device_chain_is_checkpointed_by_its_owner() {
        let owner = Keypair::from_secret_bytes(&[7; 32]);
        let device = Keypair::from_secret_bytes(&[8; 32]);
        let first = Descriptor::sign(&device, ChainHead::default(), b"ciphertext", 1_700_000_000_000);
        let c = Checkpoint::sign_merged(
            &owner,
            device.identity(),
            ChainHead::of(&first),
            1_700_000_000_002,
        );
        let back = Checkpoint::from_bytes(&c.to_bytes()).unwrap();
        assert_eq!(back, c);
        assert_eq!((back.namespace, back.upto, back.len), (device.identity(), 1, 0));
        assert_eq!(&back.hash, blake3::hash(b"").as_bytes(), "no snapshot");
        assert!(back.verify_signature_by(&owner.identity()));
        // Not the device's own signature, nor anyone else's.
        assert!(!back.verify_signature());
        assert!(!back.verify_signature_by(&Keypair::generate().identity()));
        // A device signing its own chain's checkpoint does not pass for its owner's.
        let own = Checkpoint::sign(&device, ChainHead::of(&first), b"", 1_700_000_000_002);
        assert!(!own.verify_signature_by(&owner.identity()));
    }

    #[test]
    fn the_encoding_is_pinned() {
        let keys = Keypair::from_secret_bytes(&[7; 32]);
        let first = Descriptor::sign(&keys, ChainHead::default(), b"ciphertext", 1_700_000_000_000);
        let c = Checkpoint::sign(&keys, ChainHead::of(&first), b"snapshot", 1_700_000_000_002);
        let b = c.to_bytes();
        assert_eq!(hex(&b), FULL);
        assert_eq!(&b[44..76], &first.digest());
        assert_eq!(&b[76..108], blake3::hash(b"snapshot").as_bytes());
        let mut signed = SIGNING_DOMAIN.to_vec();
        signed.extend_from_slice(&b[..124]);
        assert!(keys.identity().verify(&signed, &b[124..]).is_ok());
        assert_eq!(Checkpoint::from_bytes(&b).unwrap(), c);
        assert!(c.verify_signature());
        assert_eq!(c.chain_head(), ChainHead::of(&first));
        // A descriptor is not a checkpoint, and its signature would not pass for one.
        assert_eq!(
            Checkpoint::from_bytes(&first.to_bytes()),
            Err(DescriptorError::Magic)
        );
        let mut as_ckpt = first.to_bytes();
        as_ckpt[0..4].copy_from_slice(MAGIC);
        assert!(!Checkpoint::from_bytes(&as_ckpt).unwrap().verify_signature());
    }

    /// The checkpoint of secret key [7; 32] superseding segment 1 (the descriptor pinned in
    /// `descriptor.rs`) with the snapshot ciphertext "snapshot", at 1700000000002 ms:
    const FULL: &str = concat!(
        "50434b31",                                                         // 0000 "PCK1"
        "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c", // 0004 namespace
        "0000000000000001",                                                 // 0024 upto 1
        "bcee71f6d15cc7d42aeded8307c8b3b0b892cd83c532db0ef7f867b93fa0e33c", // 002c head: descr. 1's
        "2d168e1ff20930e41ae0c8e9b0bfc97bba39b1afb272f6bf9b52bf30716e96a5", // 004c blake3(ct)
        "0000000000000008",                                                 // 006c len 8
        "0000018bcfe56802",                                                 // 0074 at_ms
        "c23e613398dc87cba38e510f333448604b310b21bbca098554823917b6daacfc", // 007c signature
        "8c62300a475190a5fcc067d49a496a277b74e941e3cfa55be8a33e0d75857b0a", //      (64 bytes)
    );

    #[test]
    fn tampering_breaks_the_signature() {
        let keys = Keypair::generate();
        let c = Checkpoint::sign(
            &keys,
            ChainHead {
                seq: 3,
                hash: [1; 32],
            },
            b"x",
            5,
        );
        for i in [4usize, 40, 50, 80, 110, 120, 130] {
            let mut b = c.to_bytes();
            b[i] ^= 1;
            match Checkpoint::from_bytes(&b) {
                Ok(t) => assert!(!t.verify_signature(), "byte {i}"),
                Err(e) => assert_eq!(e, DescriptorError::Namespace, "byte {i}"),
            }
        }
    }
}
