//! The end-to-end-encrypted mirror, as the server runs it (DESIGN.md §4).
//!
//! * [`batch`]: what a segment holds once opened — the owner's changes (pinned bytes).
//! * [`owner`]: sealing this instance's changes into segments and pushing them to the
//!   mirrors it chose (`plait mirror add`, `mirrors.json`).
//! * [`keeper`]: the mirror side — checking pushes without decrypting, storing them,
//!   serving them by range.
//! * [`bundles`]: devices' sealed key bundles a mirror keeps until their link is used.
//! * [`devices`]: the owner making a device link (`plait device link`).
//! * [`join`]: a device joining with a link and restoring the owner's namespace.
//! * [`device_writes`]: a device sealing its writes to the owner's namespace, the owner
//!   merging them.
//! * [`grants`]: the mirror operator's consent (`plait mirror grant|revoke|list`).
//! * [`holders`]: naming the mirrors that hold this owner's segments in its DHT record.
//! * [`shares`]: the parts of its namespace the owner seals to readers (`plait mirror share`).
//! * [`reader`]: a reader following another owner's chain on a mirror (`plait mirror follow`).
//!
//! Segments, descriptors, sealing and the protocol's bytes are the bridge's
//! (`plait_bridge::mirror`); this module decides what is sealed, where it is stored
//! (the `Storage` trait) and who may store.

pub mod batch;
pub mod bundles;
pub mod device_writes;
pub mod devices;
pub mod fetch;
pub mod grants;
pub mod holders;
pub mod join;
pub mod keeper;
pub mod owner;
pub mod reader;
pub mod shares;

use plait_bridge::Identity;
use plait_bridge::mirror::{ChainHead, Checkpoint, Descriptor};
use serde::{Deserialize, Serialize};

use crate::storage::{Storage, StorageError, Take};

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where a stored chain stands: its last segment, or its checkpoint's head when the
/// checkpoint superseded every segment held.
pub async fn chain_head(storage: &dyn Storage, namespace: &Identity) -> Result<ChainHead, StorageError> {
    let corrupt = |e: plait_bridge::mirror::DescriptorError| StorageError::Corrupt(e.to_string());
    let last = storage.last_segment(namespace).await?;
    let ck = storage.checkpoint(namespace, Take::NOTHING).await?;
    match (last, ck) {
        (Some(s), Some(c)) if c.upto >= s.seq => Ok(Checkpoint::from_bytes(&c.checkpoint)
            .map_err(corrupt)?
            .chain_head()),
        (Some(s), _) => Ok(ChainHead::of(
            &Descriptor::from_bytes(&s.descriptor).map_err(corrupt)?,
        )),
        (None, Some(c)) => Ok(Checkpoint::from_bytes(&c.checkpoint)
            .map_err(corrupt)?
            .chain_head()),
        (None, None) => Ok(ChainHead::default()),
    }
}

/// `[mirror]` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MirrorSettings {
    /// Plaintext bytes batched into one segment, at most (a single larger change makes a
    /// segment of its own). age adds about 200 bytes per segment, so small segments cost
    /// space; at most [`MAX_SEGMENT_MAX_BYTES`].
    pub segment_max_bytes: u64,
    /// How long a change may wait before it is sealed (and pushed).
    pub segment_max_delay_ms: u64,
    /// The owner makes a checkpoint (a sealed snapshot of every resource's current state
    /// that supersedes the segments before it) once the segments since the last one
    /// occupy more than this many times the namespace's stored size…
    pub checkpoint_ratio: u64,
    /// …and more than this many bytes (so a small namespace is not snapshotted at every
    /// segment). 0 with `checkpoint_ratio` 0: after every segment.
    pub checkpoint_min_bytes: u64,
    /// Descriptors in one answer over HTTP (`GET /.well-known/plait/mirror/<id>/segments`,
    /// and each batch of a subscription's catch-up), at most.
    pub http_max_descriptors: usize,
    /// How often a reader asks a mirror whether the chains it follows grew
    /// (`plait mirror follow`).
    pub follow_interval_ms: u64,
    /// How often the owner looks for its devices' writes on its mirrors and merges them
    /// (it does at start too).
    pub device_merge_interval_ms: u64,
    /// On a mirror: device bundles (`plait device link`) kept waiting for one owner at
    /// once, at most; more are refused `too-many-bundles` (each counts against the
    /// owner's quota too).
    pub device_bundles_per_owner: u64,
    /// On a mirror: how long a device bundle is kept at most; a link asking for longer is
    /// refused `link-too-long`.
    pub device_link_max_ttl_ms: u64,
}

/// The largest `segment_max_bytes`: a segment must fit one push
/// (`plait_bridge::mirror::wire::MAX_SEGMENT_BYTES`, less age's overhead).
pub const MAX_SEGMENT_MAX_BYTES: u64 = 15 << 20;

impl Default for MirrorSettings {
    fn default() -> Self {
        MirrorSettings {
            segment_max_bytes: 1 << 20,
            segment_max_delay_ms: 1000,
            checkpoint_ratio: 4,
            checkpoint_min_bytes: 4 << 20,
            http_max_descriptors: 1000,
            follow_interval_ms: 1000,
            device_merge_interval_ms: 5000,
            device_bundles_per_owner: 16,
            device_link_max_ttl_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

impl MirrorSettings {
    pub fn check(&self) -> Result<(), String> {
        if self.segment_max_bytes == 0 || self.segment_max_bytes > MAX_SEGMENT_MAX_BYTES {
            return Err(format!(
                "mirror.segment_max_bytes must be between 1 and {MAX_SEGMENT_MAX_BYTES}"
            ));
        }
        if self.http_max_descriptors == 0 {
            return Err("mirror.http_max_descriptors must be at least 1".into());
        }
        if self.follow_interval_ms == 0 {
            return Err("mirror.follow_interval_ms must be at least 1".into());
        }
        if self.device_merge_interval_ms == 0 {
            return Err("mirror.device_merge_interval_ms must be at least 1".into());
        }
        if self.segment_max_delay_ms == 0 {
            return Err("mirror.segment_max_delay_ms must be at least 1".into());
        }
        Ok(())
    }
}
