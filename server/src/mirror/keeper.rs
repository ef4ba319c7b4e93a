//! The mirror side: keeps other owners' sealed segments it cannot read.
//!
//! A push is checked ([`plait_bridge::mirror::check`]: grant, signature, replay, chain,
//! length, quota, BLAKE3 — nothing is decrypted) against the chain as stored, then stored
//! through [`Storage::put_segment`]. Pushes for one namespace are taken one at a time, so
//! the chain head and usage a check sees are the ones its store lands on. Segments are
//! served by namespace and sequence range, to anyone the node lets ask (members), and
//! followed: [`Keeper::follow`] wakes when a namespace's chain grows in this process
//! (`http::mirror` streams it over Braid-HTTP). A device's chain (its writes to its
//! owner's namespace, [`Keeper::push_device`]) is taken when its certificate is its
//! owner's, under the owner's grant: the owner's segments and all its devices' chains
//! held here count against one quota (the devices seen are kept in the
//! `mirror_device_owners` setting, once a push of theirs passed its checks: signed by
//! the device's own key). A device's chain is checkpointed by that owner
//! ([`Keeper::checkpoint`]); a granted namespace only by itself. An owner tells the
//! mirror which of its devices it revoked ([`Keeper::set_revoked`], the
//! `mirror_revoked_devices` setting); their pushes are refused from then on (`revoked`),
//! whatever certificate they carry. Knows nothing of what segments hold.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use plait_bridge::Identity;
use plait_bridge::mirror::wire::{self, Request, Response};
use plait_bridge::mirror::{
    Allowance, ChainHead, Checkpoint, CheckpointHead, Descriptor, Held, Refusal, SealedCheckpoint,
    SealedSegment, SegmentHead,
};

use plait_bridge::mirror::device::DeviceCert;

use super::bundles::Bundles;
use super::grants::Grants;
use crate::storage::{Storage, StorageError, Take};

/// The mirror service of one server.
pub struct Keeper {
    storage: Arc<dyn Storage>,
    grants: Grants,
    /// Devices' sealed key bundles, waiting for their links.
    bundles: Bundles,
    /// One lock per namespace, held from check to store.
    locks: Mutex<HashMap<Identity, Arc<tokio::sync::Mutex<()>>>>,
    /// Bumped when a namespace's chain grows or is checkpointed here; subscribers wait on it.
    grown: tokio::sync::watch::Sender<u64>,
    /// Held from reading one of the keeper's settings to writing it back.
    settings_lock: tokio::sync::Mutex<()>,
}

/// The setting keeping which owner each device that pushed here speaks for.
const DEVICE_OWNERS_SETTING: &str = "mirror_device_owners";
/// The setting keeping each owner's revoked devices, as the owner last told them.
const REVOKED_SETTING: &str = "mirror_revoked_devices";

type Revoked = std::collections::BTreeMap<Identity, std::collections::BTreeSet<Identity>>;

/// A stored segment's descriptor, parsed (bytes that do not parse are a corrupt store).
fn stored_descriptor(row: &crate::storage::StoredSegment) -> Result<Descriptor, StorageError> {
    Descriptor::from_bytes(&row.descriptor).map_err(|e| StorageError::Corrupt(e.to_string()))
}

fn unavailable(e: StorageError) -> Refusal {
    Refusal::Unavailable(e.to_string())
}

impl Keeper {
    pub fn new(storage: Arc<dyn Storage>, grants: Grants, settings: &super::MirrorSettings) -> Keeper {
        Keeper {
            bundles: Bundles::new(storage.clone(), settings),
            storage,
            grants,
            locks: Mutex::new(HashMap::new()),
            grown: tokio::sync::watch::channel(0).0,
            settings_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// A receiver that changes whenever a chain held here grows (a push or a checkpoint
    /// stored by this process).
    pub fn follow(&self) -> tokio::sync::watch::Receiver<u64> {
        self.grown.subscribe()
    }

    /// At most `limit` descriptors of `namespace` from `from` on, in order.
    pub async fn descriptors(
        &self,
        namespace: &Identity,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Descriptor>, StorageError> {
        let rows = self
            .storage
            .descriptors(namespace, from.min(i64::MAX as u64) as i64, limit, Take::NOTHING)
            .await?;
        rows.into_iter().map(|r| stored_descriptor(&r)).collect()
    }

    /// Segment `seq` of `namespace`, if it is held.
    pub async fn segment(
        &self,
        namespace: &Identity,
        seq: u64,
    ) -> Result<Option<SealedSegment>, StorageError> {
        Ok(self
            .range(namespace, seq, seq)
            .await?
            .into_iter()
            .find(|s| s.descriptor.seq == seq))
    }

    /// Bytes `namespace`'s segments occupy here, with the chains of the devices that
    /// pushed under its grant (what its quota counts).
    pub async fn used(&self, namespace: &Identity) -> Result<u64, StorageError> {
        let mut used = self.storage.segment_bytes(namespace).await?;
        for (device, o) in self.device_owners().await? {
            if o == *namespace {
                used += self.storage.segment_bytes(&device).await?;
            }
        }
        Ok(used)
    }

    /// Where the stored chain of `namespace` stands (its last segment, or its checkpoint).
    pub async fn head(&self, namespace: &Identity) -> Result<ChainHead, StorageError> {
        super::chain_head(self.storage.as_ref(), namespace).await
    }

    fn lock(&self, ns: Identity) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("namespace locks")
            .entry(ns)
            .or_default()
            .clone()
    }

    /// Checks and stores a checkpoint, dropping the segments it supersedes; answers with
    /// its `upto`.
    pub async fn checkpoint(&self, c: SealedCheckpoint) -> Result<u64, Refusal> {
        let ns = c.checkpoint.namespace;
        let lock = self.lock(ns);
        let _held = lock.lock().await;
        // A device's chain is checkpointed by the owner it pushed for, under that owner's
        // grant; an owner's chain (a granted namespace) by the owner, whatever else it
        // was ever said to be.
        let (owner, grant) = match self.grant(&ns)? {
            Some(g) => (ns, Some(g)),
            None => match self.device_owners().await.map_err(unavailable)?.get(&ns).copied() {
                Some(o) => (o, self.grant(&o)?),
                None => (ns, None),
            },
        };
        let upto = c.checkpoint.upto;
        let seq = upto.min(i64::MAX as u64) as i64;
        let allowance = match grant {
            None => None,
            Some(g) => Some(Allowance {
                quota: g.quota,
                used: self
                    .storage
                    .segment_bytes_after(&ns, seq)
                    .await
                    .map_err(unavailable)?,
            }),
        };
        let head = self.head(&ns).await.map_err(unavailable)?;
        let held_upto = self
            .storage
            .checkpoint(&ns, Take::NOTHING)
            .await
            .map_err(unavailable)?
            .map_or(0, |h| h.upto as u64);
        let at_upto = if upto == head.seq {
            Some(head.hash)
        } else if upto < head.seq && upto > held_upto {
            let rows = self
                .storage
                .segments(&ns, seq, seq, 0)
                .await
                .map_err(unavailable)?;
            rows.first()
                .filter(|r| r.seq == seq)
                .and_then(|r| Descriptor::from_bytes(&r.descriptor).ok())
                .map(|d| d.digest())
        } else {
            None
        };
        let held = Held {
            head,
            checkpoint: held_upto,
            at_upto,
        };
        plait_bridge::mirror::check_checkpoint(&c.checkpoint, &c.snapshot, &owner, held, allowance)?;
        match self
            .storage
            .put_checkpoint(
                &ns,
                seq,
                Bytes::copy_from_slice(&c.checkpoint.to_bytes()),
                Bytes::from(c.snapshot),
            )
            .await
        {
            Ok(()) => {
                self.grown.send_modify(|n| *n += 1);
                Ok(upto)
            }
            Err(StorageError::Behind) => Err(Refusal::StaleCheckpoint {
                upto,
                held: held_upto,
            }),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The `upto` of the checkpoint held for `namespace`, if any.
    pub async fn checkpoint_upto(&self, namespace: &Identity) -> Result<Option<u64>, StorageError> {
        Ok(self
            .storage
            .checkpoint(namespace, Take::NOTHING)
            .await?
            .map(|c| c.upto.max(0) as u64))
    }

    /// The checkpoint held for `namespace`, with its snapshot.
    pub async fn get_checkpoint(
        &self,
        namespace: &Identity,
    ) -> Result<Option<SealedCheckpoint>, StorageError> {
        Ok(self
            .stored_checkpoint(namespace, Take::ALL)
            .await?
            .map(|(checkpoint, snapshot)| SealedCheckpoint { checkpoint, snapshot }))
    }

    /// The checkpoint held for `namespace`, with the head of its snapshot.
    pub async fn checkpoint_head(
        &self,
        namespace: &Identity,
    ) -> Result<Option<CheckpointHead>, StorageError> {
        Ok(self
            .stored_checkpoint(namespace, Take::head(wire::SEGMENT_HEAD_BYTES))
            .await?
            .map(|(checkpoint, head)| CheckpointHead { checkpoint, head }))
    }

    /// The checkpoint held for `namespace`, parsed, with as much of its snapshot as `take`.
    async fn stored_checkpoint(
        &self,
        namespace: &Identity,
        take: Take,
    ) -> Result<Option<(Checkpoint, Vec<u8>)>, StorageError> {
        let Some(c) = self.storage.checkpoint(namespace, take).await? else {
            return Ok(None);
        };
        let checkpoint =
            Checkpoint::from_bytes(&c.checkpoint).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        Ok(Some((checkpoint, c.snapshot.to_vec())))
    }

    /// The heads of `namespace`'s segments with `from <= seq <= to`, in order (at most
    /// [`wire::MAX_HEADS`]).
    pub async fn heads(
        &self,
        namespace: &Identity,
        from: u64,
        to: u64,
    ) -> Result<Vec<SegmentHead>, StorageError> {
        if to < from {
            return Ok(Vec::new());
        }
        let limit = (to - from).saturating_add(1).min(wire::MAX_HEADS as u64) as usize;
        let rows = self
            .storage
            .descriptors(
                namespace,
                from.min(i64::MAX as u64) as i64,
                limit,
                Take::head(wire::SEGMENT_HEAD_BYTES),
            )
            .await?;
        rows.into_iter()
            .filter(|r| r.seq as u64 <= to)
            .map(|r| {
                Ok(SegmentHead {
                    descriptor: stored_descriptor(&r)?,
                    head: r.ciphertext.to_vec(),
                })
            })
            .collect()
    }

    /// The devices that pushed here, each with the owner it speaks for.
    async fn device_owners(&self) -> Result<std::collections::BTreeMap<Identity, Identity>, StorageError> {
        self.json_setting(DEVICE_OWNERS_SETTING).await
    }

    /// Each owner's revoked devices, as it last told them.
    async fn revoked(&self) -> Result<Revoked, StorageError> {
        self.json_setting(REVOKED_SETTING).await
    }

    async fn json_setting<T: serde::de::DeserializeOwned + Default>(
        &self,
        name: &str,
    ) -> Result<T, StorageError> {
        match self.storage.get_setting(name).await? {
            Some(s) => serde_json::from_str(&s)
                .map_err(|e| StorageError::Corrupt(format!("the {name} setting: {e}"))),
            None => Ok(T::default()),
        }
    }

    async fn put_json_setting<T: serde::Serialize>(&self, name: &str, value: &T) -> Result<(), Refusal> {
        let json = serde_json::to_string(value).map_err(|e| Refusal::Unavailable(e.to_string()))?;
        self.storage.put_setting(name, &json).await.map_err(unavailable)
    }

    /// Replaces what `owner` told this mirror of its revoked devices with `devices` (the
    /// whole list); answers how many are kept. Only a granted owner is heard, so what is
    /// kept is bounded by the grants and [`wire::MAX_REVOKED_DEVICES`].
    pub async fn set_revoked(&self, owner: Identity, devices: Vec<Identity>) -> Result<u64, Refusal> {
        if !self.granted(&owner)? {
            return Err(Refusal::NoGrant);
        }
        let devices: std::collections::BTreeSet<Identity> =
            devices.into_iter().take(wire::MAX_REVOKED_DEVICES).collect();
        let kept = devices.len() as u64;
        let _held = self.settings_lock.lock().await;
        let mut all = self.revoked().await.map_err(unavailable)?;
        if devices.is_empty() {
            all.remove(&owner);
        } else {
            all.insert(owner, devices);
        }
        self.put_json_setting(REVOKED_SETTING, &all).await?;
        Ok(kept)
    }

    /// Checks and stores one segment; answers with the seq the chain now ends at.
    pub async fn push(&self, segment: SealedSegment) -> Result<u64, Refusal> {
        let ns = segment.descriptor.namespace;
        let lock = self.lock(ns);
        let _held = lock.lock().await;
        let allowance = self.allowance(&ns).await?;
        self.store(segment, allowance).await
    }

    /// Checks and stores one segment of a device's chain, under the grant of the owner
    /// whose certificate it carries; answers with the seq the chain now ends at.
    pub async fn push_device(&self, cert: DeviceCert, segment: SealedSegment) -> Result<u64, Refusal> {
        let ns = segment.descriptor.namespace;
        if cert.device != ns || !cert.check(super::now_ms()) {
            return Err(Refusal::BadCertificate);
        }
        let revoked = self.revoked().await.map_err(unavailable)?;
        if revoked.get(&cert.owner).is_some_and(|r| r.contains(&ns)) {
            return Err(Refusal::Revoked);
        }
        let lock = self.lock(ns);
        let _held = lock.lock().await;
        let allowance = self.allowance(&cert.owner).await?;
        let granted = allowance.is_some();
        let stored = self.store(segment, allowance).await?;
        // Only once the segment passed its checks (signed by the device's own key): the
        // owner it speaks for then checkpoints its chain here, so a certificate alone,
        // for a key its signer does not hold, must not make that owner's.
        if granted {
            let _held = self.settings_lock.lock().await;
            let mut owners = self.device_owners().await.map_err(unavailable)?;
            if owners.get(&ns) != Some(&cert.owner) {
                owners.insert(ns, cert.owner);
                self.put_json_setting(DEVICE_OWNERS_SETTING, &owners).await?;
            }
        }
        Ok(stored)
    }

    /// Checks a segment against the chain held and `allowance`, then stores it. The
    /// caller holds the chain's lock.
    async fn store(&self, segment: SealedSegment, allowance: Option<Allowance>) -> Result<u64, Refusal> {
        let ns = segment.descriptor.namespace;
        let head = self.head(&ns).await.map_err(unavailable)?;
        plait_bridge::mirror::check(&segment.descriptor, &segment.ciphertext, head, allowance)?;
        let seq = segment.descriptor.seq;
        match self
            .storage
            .put_segment(
                &ns,
                seq as i64,
                Bytes::copy_from_slice(&segment.descriptor.to_bytes()),
                Bytes::from(segment.ciphertext),
            )
            .await
        {
            Ok(()) => {
                self.grown.send_modify(|n| *n += 1);
                Ok(seq)
            }
            // Another process on the same database stored one first.
            Err(StorageError::Behind) => Err(Refusal::BrokenChain { seq, head: head.seq }),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// `id`'s grant here, if it holds one.
    fn grant(&self, id: &Identity) -> Result<Option<super::grants::Grant>, Refusal> {
        self.grants
            .of(id)
            .map_err(|e| Refusal::Unavailable(format!("the grant file: {e:#}")))
    }

    /// What `owner` may still store here under its grant: `None` without one.
    async fn allowance(&self, owner: &Identity) -> Result<Option<Allowance>, Refusal> {
        Ok(match self.grant(owner)? {
            None => None,
            Some(g) => Some(Allowance {
                quota: g.quota,
                used: self.used(owner).await.map_err(unavailable)?,
            }),
        })
    }

    /// Whether `owner` holds a grant here (an invite for its device is made only then).
    pub fn granted(&self, owner: &Identity) -> Result<bool, Refusal> {
        self.grant(owner).map(|g| g.is_some())
    }

    /// Keeps a device's sealed key bundle for `owner`, counted against its grant.
    pub async fn put_bundle(
        &self,
        owner: Identity,
        address: [u8; 32],
        expires_ms: u64,
        sealed: Vec<u8>,
    ) -> Result<(), Refusal> {
        let grant = self.grant(&owner)?;
        let allowance = match grant {
            None => None,
            Some(g) => Some((g.quota, self.used(&owner).await.map_err(unavailable)?)),
        };
        self.bundles
            .put(owner, address, expires_ms, sealed, allowance, super::now_ms())
            .await
    }

    /// Segments of `namespace` from `from` to `to` (at most about [`wire::MAX_RANGE_BYTES`]).
    pub async fn range(
        &self,
        namespace: &Identity,
        from: u64,
        to: u64,
    ) -> Result<Vec<SealedSegment>, StorageError> {
        let rows = self
            .storage
            .segments(
                namespace,
                from.min(i64::MAX as u64) as i64,
                to.min(i64::MAX as u64) as i64,
                wire::MAX_RANGE_BYTES,
            )
            .await?;
        rows.into_iter()
            .map(|r| {
                Ok(SealedSegment {
                    descriptor: stored_descriptor(&r)?,
                    ciphertext: r.ciphertext.to_vec(),
                })
            })
            .collect()
    }

    /// Answers one request of the mirror protocol.
    pub async fn answer(&self, from: Identity, req: Request) -> Response {
        match req {
            Request::Push(s) => {
                let (ns, seq) = (s.descriptor.namespace, s.descriptor.seq);
                match self.push(s).await {
                    Ok(seq) => Response::Stored { seq },
                    Err(r) => {
                        tracing::info!(%from, namespace = %ns, seq, reason = r.reason(), "mirror push refused: {r}");
                        Response::Refused(r)
                    }
                }
            }
            Request::DevicePush { cert, segment } => {
                let (owner, ns, seq) = (cert.owner, segment.descriptor.namespace, segment.descriptor.seq);
                match self.push_device(*cert, segment).await {
                    Ok(seq) => Response::Stored { seq },
                    Err(r) => {
                        tracing::info!(%from, %owner, device = %ns, seq, reason = r.reason(), "device push refused: {r}");
                        Response::Refused(r)
                    }
                }
            }
            Request::RevokedDevices(devices) => match self.set_revoked(from, devices).await {
                Ok(kept) => {
                    tracing::info!(owner = %from, revoked = kept, "an owner's revoked devices");
                    Response::Stored { seq: kept }
                }
                Err(r) => {
                    tracing::info!(%from, reason = r.reason(), "revoked devices refused: {r}");
                    Response::Refused(r)
                }
            },
            Request::Oversize(d) | Request::OversizeDevicePush(d) => Response::Refused(Refusal::TooLarge {
                len: d.len,
                max: wire::MAX_SEGMENT_BYTES,
            }),
            Request::Range {
                namespace,
                from: a,
                to: b,
            } => match self.range(&namespace, a, b).await {
                Ok(list) => Response::Segments(list),
                Err(e) => Response::Refused(unavailable(e)),
            },
            Request::Head { namespace } => match self.head(&namespace).await {
                Ok(h) => Response::Head(h),
                Err(e) => Response::Refused(unavailable(e)),
            },
            Request::Checkpoint(c) => {
                let (ns, upto) = (c.checkpoint.namespace, c.checkpoint.upto);
                match self.checkpoint(c).await {
                    Ok(upto) => Response::Stored { seq: upto },
                    Err(r) => {
                        tracing::info!(%from, namespace = %ns, upto, reason = r.reason(), "mirror checkpoint refused: {r}");
                        Response::Refused(r)
                    }
                }
            }
            Request::OversizeCheckpoint(c) => Response::Refused(Refusal::TooLarge {
                len: c.len,
                max: wire::MAX_SNAPSHOT_BYTES,
            }),
            Request::Heads {
                namespace,
                from: a,
                to: b,
            } => match self.heads(&namespace, a, b).await {
                Ok(list) => Response::Heads(list),
                Err(e) => Response::Refused(unavailable(e)),
            },
            Request::CheckpointHead { namespace } => match self.checkpoint_head(&namespace).await {
                Ok(c) => Response::CheckpointHead(c.map(Box::new)),
                Err(e) => Response::Refused(unavailable(e)),
            },
            Request::GetCheckpoint { namespace } => match self.get_checkpoint(&namespace).await {
                Ok(c) => Response::Checkpoint(c.map(Box::new)),
                Err(e) => Response::Refused(unavailable(e)),
            },
            Request::PutBundle {
                address,
                expires_ms,
                sealed,
            } => match self.put_bundle(from, address, expires_ms, sealed).await {
                Ok(()) => Response::Stored { seq: 0 },
                Err(r) => {
                    tracing::info!(%from, reason = r.reason(), "device bundle refused: {r}");
                    Response::Refused(r)
                }
            },
            // Invites are the node's: `serve` answers them before asking the keeper.
            Request::Invite { .. } => {
                Response::Refused(Refusal::Unavailable("this node makes no invites".into()))
            }
            Request::TakeBundle { address } => match self.bundles.take(address, super::now_ms()).await {
                Ok(sealed) => Response::Bundle(sealed),
                Err(r) => {
                    tracing::info!(%from, reason = r.reason(), "device bundle not given: {r}");
                    Response::Refused(r)
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::CommitLimits;
    use crate::storage::sqlite::SqliteStorage;
    use plait_bridge::Keypair;
    use plait_bridge::mirror::{SealKey, seal};

    /// A keeper on a fresh embedded store, its grants in the same temporary directory.
    fn fresh() -> (tempfile::TempDir, Arc<dyn Storage>, Keeper) {
        let dir = tempfile::tempdir().unwrap();
        let s: Arc<dyn Storage> =
            Arc::new(SqliteStorage::open(&dir.path().join("m.db"), CommitLimits::default()).unwrap());
        let keeper = Keeper::new(s.clone(), Grants::new(dir.path()), &Default::default());
        (dir, s, keeper)
    }

    #[tokio::test]
    async fn checks_then_stores_and_serves() {
        let (dir, _, keeper) = fresh();
        let owner = Keypair::generate();
        let ns = owner.identity();
        let to = [SealKey::generate().recipient()];
        let s1 = seal(&owner, &to, ChainHead::default(), b"one", 1).unwrap();
        let s2 = seal(&owner, &to, ChainHead::of(&s1.descriptor), b"two", 2).unwrap();

        assert_eq!(keeper.push(s1.clone()).await, Err(Refusal::NoGrant));
        let quota = (188 + s1.ciphertext.len() as u64) + (188 + s2.ciphertext.len() as u64) + 10;
        Grants::new(dir.path()).grant(ns, quota).unwrap();
        assert_eq!(keeper.push(s1.clone()).await, Ok(1));
        assert!(matches!(
            keeper.push(s1.clone()).await,
            Err(Refusal::Replayed { seq: 1, head: 1 })
        ));
        assert_eq!(keeper.push(s2.clone()).await, Ok(2));
        let s3 = seal(&owner, &to, ChainHead::of(&s2.descriptor), &[0; 100], 3).unwrap();
        assert!(matches!(keeper.push(s3).await, Err(Refusal::OverQuota { .. })));
        assert_eq!(keeper.head(&ns).await.unwrap(), ChainHead::of(&s2.descriptor));
        assert_eq!(keeper.range(&ns, 2, 9).await.unwrap(), vec![s2.clone()]);
        assert_eq!(
            keeper.used(&ns).await.unwrap(),
            2 * 188 + (s1.ciphertext.len() + s2.ciphertext.len()) as u64
        );
        assert_eq!(
            keeper
                .answer(
                    ns,
                    Request::Oversize(Descriptor::sign(&owner, ChainHead::default(), &[], 1))
                )
                .await,
            Response::Refused(Refusal::TooLarge {
                len: 0,
                max: wire::MAX_SEGMENT_BYTES
            })
        );
    }

    #[tokio::test]
    async fn a_device_chain_is_taken_under_its_owners_grant_and_certificate() {
        let (dir, _, keeper) = fresh();
        let owner = Keypair::generate();
        let device = Keypair::generate();
        let stranger = Keypair::generate();
        let to = [SealKey::generate().recipient()];
        let cert = DeviceCert::sign(&owner, device.identity(), 1, 0);
        let s1 = seal(&device, &to, ChainHead::default(), b"device write", 1).unwrap();

        // No grant for the owner; a plain push of a device's chain has none either.
        assert_eq!(
            keeper.push_device(cert.clone(), s1.clone()).await,
            Err(Refusal::NoGrant)
        );
        assert_eq!(keeper.push(s1.clone()).await, Err(Refusal::NoGrant));
        let o_seg = seal(&owner, &to, ChainHead::default(), &[1; 300], 1).unwrap();
        let quota = 188 + o_seg.ciphertext.len() as u64 + 188 + s1.ciphertext.len() as u64;
        Grants::new(dir.path()).grant(owner.identity(), quota).unwrap();
        // Certificates that are not the owner's for this chain.
        let other = DeviceCert::sign(&owner, stranger.identity(), 1, 0);
        assert_eq!(
            keeper.push_device(other, s1.clone()).await,
            Err(Refusal::BadCertificate)
        );
        let forged = DeviceCert::sign(&stranger, device.identity(), 1, 0);
        assert_eq!(
            keeper.push_device(forged, s1.clone()).await,
            Err(Refusal::NoGrant)
        );
        let expired = DeviceCert::sign(&owner, device.identity(), 1, 2);
        assert_eq!(
            keeper.push_device(expired, s1.clone()).await,
            Err(Refusal::BadCertificate)
        );
        let mut bytes = cert.to_bytes();
        bytes[100] ^= 1;
        let tampered = DeviceCert::from_bytes(&bytes).unwrap();
        assert_eq!(
            keeper.push_device(tampered, s1.clone()).await,
            Err(Refusal::BadCertificate)
        );

        assert_eq!(keeper.push_device(cert.clone(), s1.clone()).await, Ok(1));
        assert_eq!(
            keeper.range(&device.identity(), 1, 9).await.unwrap(),
            vec![s1.clone()]
        );
        // One quota: the owner's segment fits beside the device's chain, then nothing more.
        assert_eq!(keeper.push(o_seg.clone()).await, Ok(1));
        assert_eq!(
            keeper.used(&owner.identity()).await.unwrap(),
            quota,
            "both counted"
        );
        let s2 = seal(&device, &to, ChainHead::of(&s1.descriptor), b"x", 2).unwrap();
        assert!(matches!(
            keeper.push_device(cert, s2).await,
            Err(Refusal::OverQuota { .. })
        ));
    }

    #[tokio::test]
    async fn the_owner_checkpoints_what_it_merged_of_a_device_chain() {
        let (dir, _, keeper) = fresh();
        let (owner, device, stranger) = (Keypair::generate(), Keypair::generate(), Keypair::generate());
        Grants::new(dir.path()).grant(owner.identity(), 1 << 20).unwrap();
        let to = [SealKey::generate().recipient()];
        let cert = DeviceCert::sign(&owner, device.identity(), 1, 0);
        let mut chain = ChainHead::default();
        let mut segs = Vec::new();
        for i in 1..=3u64 {
            let seg = seal(&device, &to, chain, &[i as u8; 1000], i).unwrap();
            chain = ChainHead::of(&seg.descriptor);
            assert_eq!(keeper.push_device(cert.clone(), seg.clone()).await, Ok(i));
            segs.push(seg);
        }
        let used = keeper.used(&owner.identity()).await.unwrap();
        let merged = |by: &Keypair, upto: usize| SealedCheckpoint {
            checkpoint: Checkpoint::sign_merged(
                by,
                device.identity(),
                ChainHead::of(&segs[upto - 1].descriptor),
                9,
            ),
            snapshot: Vec::new(),
        };
        // Neither the device itself nor a stranger may drop the device's writes.
        let own = SealedCheckpoint {
            checkpoint: Checkpoint::sign(&device, ChainHead::of(&segs[1].descriptor), b"", 9),
            snapshot: Vec::new(),
        };
        assert_eq!(keeper.checkpoint(own).await, Err(Refusal::BadSignature));
        assert_eq!(
            keeper.checkpoint(merged(&stranger, 2)).await,
            Err(Refusal::BadSignature)
        );
        // The owner merged two: they are dropped, the third stays and the chain goes on.
        assert_eq!(keeper.checkpoint(merged(&owner, 2)).await, Ok(2));
        assert_eq!(
            keeper.range(&device.identity(), 1, 9).await.unwrap(),
            vec![segs[2].clone()]
        );
        let after = keeper.used(&owner.identity()).await.unwrap();
        assert!(after < used - 2 * 1000, "{after} bytes used, {used} before");
        let s4 = seal(&device, &to, chain, b"after", 4).unwrap();
        assert_eq!(keeper.push_device(cert.clone(), s4).await, Ok(4));
        // Not again, nor back; then all of it (a revoked device's chain, once merged).
        assert!(matches!(
            keeper.checkpoint(merged(&owner, 2)).await,
            Err(Refusal::StaleCheckpoint { upto: 2, held: 2 })
        ));
        let whole = keeper.head(&device.identity()).await.unwrap();
        let all = SealedCheckpoint {
            checkpoint: Checkpoint::sign_merged(&owner, device.identity(), whole, 9),
            snapshot: Vec::new(),
        };
        assert_eq!(keeper.checkpoint(all).await, Ok(4));
        assert!(keeper.range(&device.identity(), 1, 9).await.unwrap().is_empty());
        assert_eq!(keeper.head(&device.identity()).await.unwrap(), whole);
    }

    #[tokio::test]
    async fn an_owner_cannot_checkpoint_another_owners_chain_as_its_device() {
        let (dir, _, keeper) = fresh();
        let (victim, attacker) = (Keypair::generate(), Keypair::generate());
        for k in [&victim, &attacker] {
            Grants::new(dir.path()).grant(k.identity(), 1 << 20).unwrap();
        }
        let to = [SealKey::generate().recipient()];
        let v1 = seal(&victim, &to, ChainHead::default(), b"victim's", 1).unwrap();
        assert_eq!(keeper.push(v1.clone()).await, Ok(1));
        // The attacker certifies the victim's key as its device and pushes a segment
        // claiming the victim's namespace: refused, and it makes the attacker nothing.
        let cert = DeviceCert::sign(&attacker, victim.identity(), 1, 0);
        let mut forged = seal(&attacker, &to, ChainHead::of(&v1.descriptor), b"x", 2).unwrap();
        let mut d = forged.descriptor.to_bytes();
        d[4..36].copy_from_slice(victim.identity().as_bytes());
        forged.descriptor = plait_bridge::mirror::Descriptor::from_bytes(&d).unwrap();
        assert_eq!(keeper.push_device(cert, forged).await, Err(Refusal::BadSignature));
        assert!(keeper.device_owners().await.unwrap().is_empty());
        let dropped = SealedCheckpoint {
            checkpoint: Checkpoint::sign_merged(
                &attacker,
                victim.identity(),
                ChainHead::of(&v1.descriptor),
                9,
            ),
            snapshot: Vec::new(),
        };
        assert_eq!(
            keeper.checkpoint(dropped.clone()).await,
            Err(Refusal::BadSignature)
        );
        // Even a mapping from before (a granted namespace is its own owner's).
        keeper
            .put_json_setting(
                DEVICE_OWNERS_SETTING,
                &std::collections::BTreeMap::from([(victim.identity(), attacker.identity())]),
            )
            .await
            .unwrap();
        assert_eq!(keeper.checkpoint(dropped).await, Err(Refusal::BadSignature));
        assert_eq!(keeper.range(&victim.identity(), 1, 9).await.unwrap(), vec![v1]);
    }

    #[tokio::test]
    async fn a_device_its_owner_revoked_is_refused_from_then_on() {
        let (dir, s, keeper) = fresh();
        let owner = Keypair::generate();
        let (device, other) = (Keypair::generate(), Keypair::generate());
        let stranger = Keypair::generate();
        let to = [SealKey::generate().recipient()];
        let cert = DeviceCert::sign(&owner, device.identity(), 1, 0);
        let other_cert = DeviceCert::sign(&owner, other.identity(), 1, 0);
        let s1 = seal(&device, &to, ChainHead::default(), b"before", 1).unwrap();
        let s2 = seal(&device, &to, ChainHead::of(&s1.descriptor), b"after", 2).unwrap();
        let o1 = seal(&other, &to, ChainHead::default(), b"other", 1).unwrap();
        let revoke = |from: &Keypair, list: Vec<Identity>| {
            keeper.answer(from.identity(), Request::RevokedDevices(list))
        };

        // Only a granted owner is heard.
        assert_eq!(
            revoke(&owner, vec![device.identity()]).await,
            Response::Refused(Refusal::NoGrant)
        );
        Grants::new(dir.path()).grant(owner.identity(), 1 << 20).unwrap();
        assert_eq!(keeper.push_device(cert.clone(), s1.clone()).await, Ok(1));
        assert_eq!(
            revoke(&owner, vec![device.identity(), device.identity()]).await,
            Response::Stored { seq: 1 }
        );
        assert_eq!(
            keeper.push_device(cert.clone(), s2.clone()).await,
            Err(Refusal::Revoked)
        );
        // Its other devices push on; what the revoked one stored before stays.
        assert_eq!(keeper.push_device(other_cert, o1).await, Ok(1));
        assert_eq!(keeper.head(&device.identity()).await.unwrap().seq, 1);

        // A stranger's list, granted or not, touches nothing of the owner's.
        Grants::new(dir.path())
            .grant(stranger.identity(), 1 << 20)
            .unwrap();
        assert_eq!(revoke(&stranger, vec![]).await, Response::Stored { seq: 0 });
        assert_eq!(
            keeper.push_device(cert.clone(), s2.clone()).await,
            Err(Refusal::Revoked),
            "kept across what others send, and read from storage by a new keeper"
        );
        let again = Keeper::new(s.clone(), Grants::new(dir.path()), &Default::default());
        assert_eq!(
            again.push_device(cert.clone(), s2.clone()).await,
            Err(Refusal::Revoked)
        );

        // The owner's list replaces the last one.
        assert_eq!(revoke(&owner, vec![]).await, Response::Stored { seq: 0 });
        assert_eq!(keeper.push_device(cert, s2).await, Ok(2));
    }
}
