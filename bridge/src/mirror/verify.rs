//! What a mirror checks before it stores a segment, without decrypting it, and the typed
//! refusals it answers with.
//!
//! The checks run cheapest first, so a push that fails early costs no hashing: grant,
//! descriptor signature, sequence (replayed or skipped), chain (the previous descriptor's
//! hash), length, quota, and last the BLAKE3 of the ciphertext.

use super::checkpoint::{CHECKPOINT_LEN, Checkpoint};
use super::descriptor::{ChainHead, DESCRIPTOR_LEN, Descriptor, Digest};
use crate::identity::Identity;

/// Why a mirror refused a segment. [`Refusal::reason`] is the machine-readable word sent
/// on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The mirror's operator has not granted this namespace storage.
    #[error("no grant for this namespace on this mirror")]
    NoGrant,
    /// Storing the segment would pass the grant's quota. `len` is what it would occupy:
    /// its descriptor and its ciphertext.
    #[error("over quota: {used} of {quota} bytes used, the segment needs {len}")]
    OverQuota { quota: u64, used: u64, len: u64 },
    /// The descriptor's signature is not the namespace's.
    #[error("the descriptor's signature is not the namespace's")]
    BadSignature,
    /// The descriptor's seq is at or before what the mirror holds.
    #[error("segment {seq} is old: the mirror holds up to {head}")]
    Replayed { seq: u64, head: u64 },
    /// The descriptor does not follow the mirror's last one (a seq skipped, or a `prev`
    /// that is not the last descriptor's hash).
    #[error("segment {seq} does not follow segment {head} held by the mirror")]
    BrokenChain { seq: u64, head: u64 },
    /// The ciphertext is not as long as its descriptor says.
    #[error("the ciphertext is {got} bytes, its descriptor says {len}")]
    LengthMismatch { len: u64, got: u64 },
    /// The ciphertext's BLAKE3 is not its descriptor's.
    #[error("the ciphertext does not match its descriptor's hash")]
    HashMismatch,
    /// The segment is larger than the protocol carries; it was not read.
    #[error("the segment is {len} bytes, more than the {max} a push may carry")]
    TooLarge { len: u64, max: u64 },
    /// The mirror could not store it now (storage down); the owner may retry.
    #[error("the mirror cannot store now: {0}")]
    Unavailable(String),
    /// A checkpoint that supersedes no more than the one the mirror holds (replayed or
    /// rolled back).
    #[error("checkpoint through {upto} is stale: the mirror holds one through {held}")]
    StaleCheckpoint { upto: u64, held: u64 },
    /// No device bundle waits at this address: never kept, taken already, or expired.
    #[error("no device bundle here: the link was used already, has expired or is unknown")]
    NoBundle,
    /// A device's push whose certificate is not its owner's signature over this device,
    /// or has expired.
    #[error("the device certificate is not valid for this segment's chain")]
    BadCertificate,
    /// The owner has as many device bundles waiting on this mirror as it keeps for one
    /// owner (`mirror.device_bundles_per_owner`).
    #[error("{held} device bundles wait here already, the most this mirror keeps for one owner is {max}")]
    TooManyBundles { held: u64, max: u64 },
    /// A device bundle asked to be kept longer than this mirror keeps one
    /// (`mirror.device_link_max_ttl_ms`).
    #[error("a device link for {ttl_ms} ms: this mirror keeps a bundle for {max_ms} ms at most")]
    LinkTooLong { ttl_ms: u64, max_ms: u64 },
    /// A device's push whose owner told this mirror the device is revoked: its
    /// certificate no longer counts here.
    #[error("the device was revoked by its owner")]
    Revoked,
}

impl Refusal {
    /// The word a refusal is known by on the wire and in logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoGrant => "no-grant",
            Refusal::OverQuota { .. } => "over-quota",
            Refusal::BadSignature => "bad-signature",
            Refusal::Replayed { .. } => "replayed",
            Refusal::BrokenChain { .. } => "broken-chain",
            Refusal::LengthMismatch { .. } => "length-mismatch",
            Refusal::HashMismatch => "hash-mismatch",
            Refusal::TooLarge { .. } => "too-large",
            Refusal::Unavailable(_) => "unavailable",
            Refusal::StaleCheckpoint { .. } => "stale-checkpoint",
            Refusal::NoBundle => "no-bundle",
            Refusal::BadCertificate => "bad-certificate",
            Refusal::TooManyBundles { .. } => "too-many-bundles",
            Refusal::LinkTooLong { .. } => "link-too-long",
            Refusal::Revoked => "revoked",
        }
    }
}

/// A namespace's storage on a mirror: what its grant allows and what it uses
/// (descriptors and ciphertexts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    pub quota: u64,
    pub used: u64,
}

/// Checks a segment for a mirror whose chain for the namespace stands at `head`, under
/// `allowance` (`None`: no grant). Decrypts nothing.
pub fn check(
    descriptor: &Descriptor,
    ciphertext: &[u8],
    head: ChainHead,
    allowance: Option<Allowance>,
) -> Result<(), Refusal> {
    let allowance = allowance.ok_or(Refusal::NoGrant)?;
    if !descriptor.verify_signature() {
        return Err(Refusal::BadSignature);
    }
    if descriptor.seq <= head.seq {
        return Err(Refusal::Replayed {
            seq: descriptor.seq,
            head: head.seq,
        });
    }
    if descriptor.seq != head.seq + 1 || descriptor.prev != head.hash {
        return Err(Refusal::BrokenChain {
            seq: descriptor.seq,
            head: head.seq,
        });
    }
    let got = ciphertext.len() as u64;
    if got != descriptor.len {
        return Err(Refusal::LengthMismatch {
            len: descriptor.len,
            got,
        });
    }
    let needs = descriptor.len.saturating_add(DESCRIPTOR_LEN as u64);
    if allowance.used.saturating_add(needs) > allowance.quota {
        return Err(Refusal::OverQuota {
            quota: allowance.quota,
            used: allowance.used,
            len: needs,
        });
    }
    if blake3::hash(ciphertext).as_bytes() != &descriptor.hash {
        return Err(Refusal::HashMismatch);
    }
    Ok(())
}

/// What a mirror holds of a namespace, as far as a checkpoint is checked against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Held {
    /// Where its chain stands (its last segment, or its checkpoint's head).
    pub head: ChainHead,
    /// The `upto` of the checkpoint it holds (0: none).
    pub checkpoint: u64,
    /// The digest of its descriptor of the segment the new checkpoint names as `upto`,
    /// when it holds that segment (`None` when `upto` is past its head).
    pub at_upto: Option<Digest>,
}

/// Checks a checkpoint and its snapshot's ciphertext for a mirror holding `held`, under
/// `allowance`, whose `used` counts what would remain beside the new checkpoint (the
/// segments after its `upto`). Decrypts nothing. `signer` is whose signature it must
/// carry: the namespace's own key, or for a device's chain the key of the owner the
/// device pushed for.
///
/// A checkpoint must supersede more than the one held (`stale-checkpoint` otherwise: no
/// replay, no rollback). When the mirror holds segment `upto`, that descriptor's digest
/// must be the checkpoint's `head` (`broken-chain`: another history); when `upto` is past
/// what it holds (a mirror that was away, or added after the owner compacted its own
/// outbox), everything it holds is superseded and its chain jumps to the checkpoint.
pub fn check_checkpoint(
    checkpoint: &Checkpoint,
    snapshot: &[u8],
    signer: &Identity,
    held: Held,
    allowance: Option<Allowance>,
) -> Result<(), Refusal> {
    let allowance = allowance.ok_or(Refusal::NoGrant)?;
    if !checkpoint.verify_signature_by(signer) {
        return Err(Refusal::BadSignature);
    }
    if checkpoint.upto <= held.checkpoint || checkpoint.upto == 0 {
        return Err(Refusal::StaleCheckpoint {
            upto: checkpoint.upto,
            held: held.checkpoint,
        });
    }
    if checkpoint.upto <= held.head.seq && held.at_upto != Some(checkpoint.head) {
        return Err(Refusal::BrokenChain {
            seq: checkpoint.upto,
            head: held.head.seq,
        });
    }
    let got = snapshot.len() as u64;
    if got != checkpoint.len {
        return Err(Refusal::LengthMismatch {
            len: checkpoint.len,
            got,
        });
    }
    let needs = checkpoint.len.saturating_add(CHECKPOINT_LEN as u64);
    if allowance.used.saturating_add(needs) > allowance.quota {
        return Err(Refusal::OverQuota {
            quota: allowance.quota,
            used: allowance.used,
            len: needs,
        });
    }
    if blake3::hash(snapshot).as_bytes() != &checkpoint.hash {
        return Err(Refusal::HashMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Keypair;
    use crate::mirror::checkpoint::SealedCheckpoint;
    use crate::mirror::segment::{SealKey, seal};

    const PLENTY: Option<Allowance> = Some(Allowance {
        quota: 1 << 30,
        used: 0,
    });

    #[test]
    fn each_refusal_has_its_reason() {
        let keys = Keypair::generate();
        let r = [SealKey::generate().recipient()];
        let s1 = seal(&keys, &r, ChainHead::default(), b"one", 1).unwrap();
        let s2 = seal(&keys, &r, ChainHead::of(&s1.descriptor), b"two", 2).unwrap();
        let empty = ChainHead::default();
        let after1 = ChainHead::of(&s1.descriptor);
        let after2 = ChainHead::of(&s2.descriptor);

        assert_eq!(check(&s1.descriptor, &s1.ciphertext, empty, PLENTY), Ok(()));
        assert_eq!(check(&s2.descriptor, &s2.ciphertext, after1, PLENTY), Ok(()));

        let refused = |d: &Descriptor, c: &[u8], h, a| check(d, c, h, a).unwrap_err().reason();
        assert_eq!(refused(&s1.descriptor, &s1.ciphertext, empty, None), "no-grant");
        // Segment 2 where nothing is held: a gap.
        assert_eq!(
            refused(&s2.descriptor, &s2.ciphertext, empty, PLENTY),
            "broken-chain"
        );
        // Segment 1 again after 2.
        assert_eq!(
            refused(&s1.descriptor, &s1.ciphertext, after2, PLENTY),
            "replayed"
        );
        // A segment 2 chained to another segment 1.
        let other1 = seal(&keys, &r, ChainHead::default(), b"fork", 1).unwrap();
        let fork2 = seal(&keys, &r, ChainHead::of(&other1.descriptor), b"two'", 2).unwrap();
        assert_eq!(
            refused(&fork2.descriptor, &fork2.ciphertext, after1, PLENTY),
            "broken-chain"
        );
        // Someone else's key.
        let forged = seal(&Keypair::generate(), &r, ChainHead::default(), b"one", 1).unwrap();
        let mut b = forged.descriptor.to_bytes();
        b[4..36].copy_from_slice(keys.identity().as_bytes());
        let forged = Descriptor::from_bytes(&b).unwrap();
        assert_eq!(refused(&forged, &s1.ciphertext, empty, PLENTY), "bad-signature");
        // One bit of the ciphertext flipped.
        let mut tampered = s1.ciphertext.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(refused(&s1.descriptor, &tampered, empty, PLENTY), "hash-mismatch");
        assert_eq!(
            refused(&s1.descriptor, &s1.ciphertext[1..], empty, PLENTY),
            "length-mismatch"
        );
        let len = s1.descriptor.len + DESCRIPTOR_LEN as u64;
        let tight = Some(Allowance {
            quota: 1000 + len - 1,
            used: 1000,
        });
        assert_eq!(
            refused(&s1.descriptor, &s1.ciphertext, empty, tight),
            "over-quota"
        );
        let exact = Some(Allowance {
            quota: 1000 + len,
            used: 1000,
        });
        assert_eq!(check(&s1.descriptor, &s1.ciphertext, empty, exact), Ok(()));
    }

    #[test]
    fn checkpoints_are_checked() {
        use crate::mirror::checkpoint::seal_checkpoint;
        let keys = Keypair::generate();
        let r = [SealKey::generate().recipient()];
        let s1 = seal(&keys, &r, ChainHead::default(), b"one", 1).unwrap();
        let s2 = seal(&keys, &r, ChainHead::of(&s1.descriptor), b"two", 2).unwrap();
        let (h1, h2) = (ChainHead::of(&s1.descriptor), ChainHead::of(&s2.descriptor));
        let c1 = seal_checkpoint(&keys, &r, h1, b"snap1", 3).unwrap();
        let c2 = seal_checkpoint(&keys, &r, h2, b"snap2", 4).unwrap();
        let holding = |checkpoint, at_upto| Held {
            head: h2,
            checkpoint,
            at_upto,
        };
        let ok = |c: &SealedCheckpoint, h| {
            check_checkpoint(&c.checkpoint, &c.snapshot, &c.checkpoint.namespace, h, PLENTY)
        };
        let refused = |c: &SealedCheckpoint, h, a| {
            check_checkpoint(&c.checkpoint, &c.snapshot, &c.checkpoint.namespace, h, a)
                .unwrap_err()
                .reason()
        };
        assert_eq!(ok(&c1, holding(0, Some(h1.hash))), Ok(()));
        assert_eq!(ok(&c2, holding(1, Some(h2.hash))), Ok(()));
        // Past what is held: the chain jumps.
        assert_eq!(ok(&c2, Held::default()), Ok(()));
        assert_eq!(
            refused(&c1, holding(1, Some(h1.hash)), PLENTY),
            "stale-checkpoint"
        );
        assert_eq!(refused(&c1, holding(2, None), PLENTY), "stale-checkpoint");
        assert_eq!(refused(&c1, holding(0, Some([9; 32])), PLENTY), "broken-chain");
        assert_eq!(refused(&c1, holding(0, Some(h1.hash)), None), "no-grant");
        let forged = seal_checkpoint(&Keypair::generate(), &r, h1, b"snap1", 3).unwrap();
        let mut b = forged.checkpoint.to_bytes();
        b[4..36].copy_from_slice(keys.identity().as_bytes());
        let forged = SealedCheckpoint {
            checkpoint: Checkpoint::from_bytes(&b).unwrap(),
            snapshot: forged.snapshot,
        };
        assert_eq!(
            refused(&forged, holding(0, Some(h1.hash)), PLENTY),
            "bad-signature"
        );
        let mut tampered = c1.clone();
        tampered.snapshot[10] ^= 1;
        assert_eq!(
            refused(&tampered, holding(0, Some(h1.hash)), PLENTY),
            "hash-mismatch"
        );
        let tight = Some(Allowance { quota: 100, used: 0 });
        assert_eq!(refused(&c1, holding(0, Some(h1.hash)), tight), "over-quota");
    }
}
