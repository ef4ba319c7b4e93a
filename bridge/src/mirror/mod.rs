//! The end-to-end-encrypted mirror, as far as it is peer-to-peer: sealed segments, their
//! signed descriptors, the checks a mirror makes without decrypting, and the protocol's
//! bytes.
//!
//! * [`device`]: a device's certificate, its sealed key bundle and its one-time link.
//! * [`descriptor`]: the signed, chained descriptor of a segment (188 bytes, pinned).
//! * [`checkpoint`]: the signed word that a sealed snapshot supersedes segments (pinned).
//! * [`segment`]: the owner's X25519 [`SealKey`] and sealing / opening with age.
//! * [`verify`]: a mirror's checks and its typed [`Refusal`]s.
//! * [`wire`]: `/plait/mirror/1.0.0`, pushes, range reads, the heads a reader picks its
//!   own segments by, and chain heads (pinned).
//!
//! It knows nothing of what a segment's plaintext holds (the server batches changes into
//! it), nor of where segments are stored (the server's storage) or who holds a grant (the
//! server's grant file): the node hands requests to the server's [`MirrorServe`].
//!
//! [`MirrorServe`]: crate::types::Serve::mirror

pub mod checkpoint;
pub mod descriptor;
pub mod device;
pub mod segment;
pub mod verify;
pub mod wire;

pub use checkpoint::{CHECKPOINT_LEN, Checkpoint, CheckpointHead, SealedCheckpoint, seal_checkpoint};
pub use descriptor::{ChainHead, DESCRIPTOR_LEN, Descriptor, DescriptorError, Digest};
pub use segment::{
    SEAL_KEY_FILE, SealError, SealKey, SealRecipient, SealedSegment, SegmentHead, open, open_with, seal,
    sealed_to,
};
pub use verify::{Allowance, Held, Refusal, check, check_checkpoint};
