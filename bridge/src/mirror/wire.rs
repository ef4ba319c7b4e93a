//! The mirror protocol's bytes (`/plait/mirror/1.0.0`, libp2p request-response): an
//! owner pushes segments one per request and asks where the mirror's chain stands;
//! anyone the mirror serves asks for a namespace's segments by sequence range.
//!
//! ```text
//! request  = 0x01 descriptor(188) ciphertext(descriptor.len)      push one segment
//!          | 0x02 namespace(32) from:u64 to:u64                    segments from..=to
//!          | 0x03 namespace(32)                                    where the chain stands
//!          | 0x04 checkpoint(188) snapshot(checkpoint.len)         push a checkpoint
//!          | 0x05 namespace(32)                                    the checkpoint held
//!          | 0x06 address(32) expires_ms:u64 len:u32 sealed(len)   keep a device's bundle
//!          | 0x07 address(32)                                      take a device's bundle
//!          | 0x08 ttl_secs:u64                                     an invite for a device
//!          | 0x09 cert(148) descriptor(188) ciphertext(len)        a device pushes one segment
//!          | 0x0a count:u16 device(32)*                            the asker's revoked devices
//!          | 0x0b namespace(32) from:u64 to:u64                    heads of segments from..=to
//!          | 0x0c namespace(32)                                    the checkpoint and its head
//! response = 0x00 seq:u64                                          stored (acknowledged)
//!          | 0x01 code:u8 a:u64 b:u64 c:u64 detail_len:u16 detail refused (see below)
//!          | 0x02 count:u32 (descriptor(188) ciphertext(len))*     segments, in seq order
//!          | 0x03 seq:u64 hash(32)                                 the chain's head
//!          | 0x04 0x00                                             no checkpoint held
//!          | 0x04 0x01 checkpoint(188) snapshot(checkpoint.len)    the checkpoint held
//!          | 0x05 len:u32 sealed(len)                              the bundle (now gone)
//!          | 0x06 len:u16 link(len)                                an invite link (UTF-8)
//!          | 0x07 count:u32 (descriptor(188) len:u16 head(len))*   segment heads, in seq order
//!          | 0x08 0x00                                             no checkpoint held
//!          | 0x08 0x01 checkpoint(188) len:u16 head(len)           the checkpoint, its head
//! ```
//!
//! A stored checkpoint is acknowledged `0x00 upto`. A reader restores a namespace with
//! `0x05` (the snapshot), then `0x02` from `upto + 1` (the segments after it). A
//! device's chain is checkpointed with `0x04` too, by its owner: the checkpoint names the
//! device's namespace, carries no snapshot and the owner's signature
//! ([`Checkpoint::sign_merged`]).
//!
//! A reader that can open only some segments (one a prefix was shared with) asks for
//! *heads* first: `0x0b` answers the descriptors of a range (at most [`MAX_HEADS`]) with
//! the first [`SEGMENT_HEAD_BYTES`] of each ciphertext — all of it when it is shorter —
//! and `0x0c` the checkpoint with the head of its snapshot. An age header (recipients'
//! stanzas, MAC, nonce) fits in a head, so the reader tells which segments are sealed to
//! it ([`super::sealed_to`]) and fetches only those with `0x02`, checking each against
//! its descriptor. The mirror still decrypts nothing, and learns only which segments a
//! reader fetched whole.
//!
//! All integers are big-endian. A refusal's `code` is its reason (1 `no-grant`,
//! 2 `over-quota` a=quota b=used c=len, 3 `bad-signature`, 4 `replayed` a=seq b=head,
//! 5 `broken-chain` a=seq b=head, 6 `length-mismatch` a=len b=got, 7 `hash-mismatch`,
//! 8 `too-large` a=len b=max, 9 `unavailable` with a detail, 10 `stale-checkpoint`
//! a=upto b=held, 11 `no-bundle`, 12 `bad-certificate`, 13 `too-many-bundles` a=held
//! b=max, 14 `link-too-long` a=ttl_ms b=max_ms, 15 `revoked`).
//!
//! A device's key bundle (see [`super::device`]) is kept with `0x06` by an owner the
//! mirror granted storage, answered `0x00 0`, and given once, to whoever names its
//! address, with `0x07`; a bundle larger than [`MAX_BUNDLE_BYTES`] is not read. With
//! `0x08` such an owner asks for a one-use invite to the mirror's network, valid at most
//! [`MAX_INVITE_TTL_SECS`], which its device link carries.
//!
//! A device pushes its own chain (its writes to its owner's namespace, signed by the
//! device's key) with `0x09`: the segment as in `0x01`, preceded by the device's
//! certificate ([`DeviceCert`], signed by the owner), so the mirror stores it under the
//! owner's grant; `bad-certificate` when the certificate is not the owner's for this
//! chain or has expired, `no-grant` when the owner holds no grant, `revoked` when the
//! owner told the mirror the device is revoked. An owner tells its mirrors with `0x0a`:
//! the whole list of its revoked devices (at most [`MAX_REVOKED_DEVICES`], the latest
//! revoked; a longer list is not read), which replaces the list the mirror held for it
//! and is answered `0x00 count`. The asker is the owner: the list is about the devices
//! whose certificates it signed.
//!
//! **A push is cut at the first limit.** The descriptor comes first; when it declares
//! more than [`MAX_SEGMENT_BYTES`] the ciphertext is never read (the request becomes
//! [`Request::Oversize`] and is refused `too-large`), so no push makes the mirror buffer
//! more than one bounded segment; an owner pushes segment after segment and stops at the
//! first refusal. A checkpoint's snapshot is cut the same way at [`MAX_SNAPSHOT_BYTES`].
//! Answers to range requests stop before [`MAX_RANGE_BYTES`].

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::checkpoint::{CHECKPOINT_LEN, Checkpoint, CheckpointHead, SealedCheckpoint};
use super::descriptor::{ChainHead, DESCRIPTOR_LEN, Descriptor};
use super::device::{CERT_LEN, DeviceCert, MAX_BUNDLE_BYTES};
use super::segment::{SealedSegment, SegmentHead};
use super::verify::Refusal;
use crate::identity::Identity;

/// The protocol's name.
pub const PROTOCOL: &str = "/plait/mirror/1.0.0";
/// The largest ciphertext one push may carry.
pub const MAX_SEGMENT_BYTES: u64 = 16 << 20;
/// The largest snapshot ciphertext one checkpoint push may carry.
pub const MAX_SNAPSHOT_BYTES: u64 = 64 << 20;
/// A range answer holds segments up to about this many bytes (at least one segment).
pub const MAX_RANGE_BYTES: u64 = 32 << 20;
/// The longest an invite asked with [`Request::Invite`] is valid.
pub const MAX_INVITE_TTL_SECS: u64 = 30 * 24 * 3600;
/// The most of a ciphertext a head carries (`0x07`, `0x08`).
pub const SEGMENT_HEAD_BYTES: usize = 4096;
/// The most segment heads one answer carries.
pub const MAX_HEADS: usize = 1024;
/// The most revoked devices an owner's `0x0a` names.
pub const MAX_REVOKED_DEVICES: usize = 1024;
/// The longest invite link answered.
const MAX_INVITE_LINK: usize = 4096;
/// Largest response read: a range answer plus one segment of slack.
const MAX_RESPONSE_BYTES: u64 = MAX_RANGE_BYTES + MAX_SEGMENT_BYTES + (1 << 20);

/// A request to a mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Store this segment.
    Push(SealedSegment),
    /// A push whose descriptor declared more than [`MAX_SEGMENT_BYTES`]: its ciphertext
    /// was not read. Never sent; only made by the reader.
    Oversize(Descriptor),
    /// The segments of `namespace` with `from <= seq <= to` the mirror holds.
    Range { namespace: Identity, from: u64, to: u64 },
    /// Where the mirror's chain of `namespace` stands.
    Head { namespace: Identity },
    /// Store this checkpoint and drop the segments it supersedes.
    Checkpoint(SealedCheckpoint),
    /// A checkpoint push whose snapshot is larger than [`MAX_SNAPSHOT_BYTES`]: not read
    /// past the checkpoint. Never sent; only made by the reader.
    OversizeCheckpoint(Checkpoint),
    /// The checkpoint the mirror holds for `namespace`, with its snapshot.
    GetCheckpoint { namespace: Identity },
    /// Keep a device's sealed key bundle at `address` until it is taken or `expires_ms`.
    PutBundle {
        address: [u8; 32],
        expires_ms: u64,
        sealed: Vec<u8>,
    },
    /// Give (and forget) the bundle at `address`.
    TakeBundle { address: [u8; 32] },
    /// A one-use invite to the mirror's network, for a device of the asking owner.
    Invite { ttl_secs: u64 },
    /// Store this segment of a device's chain, under the grant of the owner that
    /// certified the device.
    DevicePush {
        /// Boxed: it is large beside the other requests.
        cert: Box<DeviceCert>,
        segment: SealedSegment,
    },
    /// A device's push whose descriptor declared more than [`MAX_SEGMENT_BYTES`]: its
    /// ciphertext was not read. Never sent; only made by the reader.
    OversizeDevicePush(Descriptor),
    /// The asking owner's revoked devices, all of them (at most
    /// [`MAX_REVOKED_DEVICES`]): their pushes are refused from now on.
    RevokedDevices(Vec<Identity>),
    /// The heads of `namespace`'s segments with `from <= seq <= to` (at most
    /// [`MAX_HEADS`]).
    Heads { namespace: Identity, from: u64, to: u64 },
    /// The checkpoint held for `namespace`, with the head of its snapshot.
    CheckpointHead { namespace: Identity },
}

/// A mirror's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The segment is stored; the chain now ends at `seq`.
    Stored {
        seq: u64,
    },
    Refused(Refusal),
    Segments(Vec<SealedSegment>),
    Head(ChainHead),
    /// The checkpoint held, if any (boxed: it is large beside the other answers).
    Checkpoint(Option<Box<SealedCheckpoint>>),
    /// A device's sealed key bundle, no longer held by the mirror.
    Bundle(Vec<u8>),
    /// An invite link to the mirror's network.
    Invite(String),
    /// Segments' descriptors with the heads of their ciphertexts, in seq order.
    Heads(Vec<SegmentHead>),
    /// The checkpoint held, if any, with the head of its snapshot (boxed: it is large
    /// beside the other answers).
    CheckpointHead(Option<Box<CheckpointHead>>),
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

async fn read_u8<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<u8> {
    let mut b = [0u8; 1];
    io.read_exact(&mut b).await?;
    Ok(b[0])
}

async fn read_u64<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<u64> {
    let mut b = [0u8; 8];
    io.read_exact(&mut b).await?;
    Ok(u64::from_be_bytes(b))
}

async fn read_namespace<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<Identity> {
    let mut b = [0u8; 32];
    io.read_exact(&mut b).await?;
    Identity::from_bytes(&b).map_err(|_| bad("not a namespace"))
}

async fn read_descriptor<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<Descriptor> {
    let mut b = [0u8; DESCRIPTOR_LEN];
    io.read_exact(&mut b).await?;
    Descriptor::from_bytes(&b).map_err(|e| bad(&e.to_string()))
}

/// Reads a descriptor and its ciphertext, refusing (as an error) more than `max` bytes.
async fn read_segment<T: AsyncRead + Unpin>(io: &mut T, max: u64) -> io::Result<SealedSegment> {
    let descriptor = read_descriptor(io).await?;
    if descriptor.len > max {
        return Err(bad("segment too large"));
    }
    let mut ciphertext = vec![0u8; descriptor.len as usize];
    io.read_exact(&mut ciphertext).await?;
    Ok(SealedSegment {
        descriptor,
        ciphertext,
    })
}

async fn read_checkpoint<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<Checkpoint> {
    let mut b = [0u8; CHECKPOINT_LEN];
    io.read_exact(&mut b).await?;
    Checkpoint::from_bytes(&b).map_err(|e| bad(&e.to_string()))
}

async fn read_array<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<[u8; 32]> {
    let mut b = [0u8; 32];
    io.read_exact(&mut b).await?;
    Ok(b)
}

/// A bundle's length and bytes; one larger than a bundle may be is not read.
async fn read_bundle<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<Vec<u8>> {
    let mut n = [0u8; 4];
    io.read_exact(&mut n).await?;
    let len = u32::from_be_bytes(n) as u64;
    if len > MAX_BUNDLE_BYTES {
        return Err(bad("bundle too large"));
    }
    read_bytes(io, len).await
}

async fn read_bytes<T: AsyncRead + Unpin>(io: &mut T, len: u64) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; len as usize];
    io.read_exact(&mut b).await?;
    Ok(b)
}

/// Reads a request (see the module doc: an oversize push is not read past its descriptor).
pub async fn read_request<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<Request> {
    match read_u8(io).await? {
        1 => {
            let descriptor = read_descriptor(io).await?;
            if descriptor.len > MAX_SEGMENT_BYTES {
                return Ok(Request::Oversize(descriptor));
            }
            let mut ciphertext = vec![0u8; descriptor.len as usize];
            io.read_exact(&mut ciphertext).await?;
            Ok(Request::Push(SealedSegment {
                descriptor,
                ciphertext,
            }))
        }
        2 => Ok(Request::Range {
            namespace: read_namespace(io).await?,
            from: read_u64(io).await?,
            to: read_u64(io).await?,
        }),
        3 => Ok(Request::Head {
            namespace: read_namespace(io).await?,
        }),
        4 => {
            let checkpoint = read_checkpoint(io).await?;
            if checkpoint.len > MAX_SNAPSHOT_BYTES {
                return Ok(Request::OversizeCheckpoint(checkpoint));
            }
            let snapshot = read_bytes(io, checkpoint.len).await?;
            Ok(Request::Checkpoint(SealedCheckpoint { checkpoint, snapshot }))
        }
        5 => Ok(Request::GetCheckpoint {
            namespace: read_namespace(io).await?,
        }),
        6 => {
            let address = read_array(io).await?;
            let expires_ms = read_u64(io).await?;
            let sealed = read_bundle(io).await?;
            Ok(Request::PutBundle {
                address,
                expires_ms,
                sealed,
            })
        }
        7 => Ok(Request::TakeBundle {
            address: read_array(io).await?,
        }),
        8 => Ok(Request::Invite {
            ttl_secs: read_u64(io).await?,
        }),
        9 => {
            let mut c = [0u8; CERT_LEN];
            io.read_exact(&mut c).await?;
            let cert = Box::new(DeviceCert::from_bytes(&c).map_err(|e| bad(&e.to_string()))?);
            let descriptor = read_descriptor(io).await?;
            if descriptor.len > MAX_SEGMENT_BYTES {
                return Ok(Request::OversizeDevicePush(descriptor));
            }
            let ciphertext = read_bytes(io, descriptor.len).await?;
            Ok(Request::DevicePush {
                cert,
                segment: SealedSegment {
                    descriptor,
                    ciphertext,
                },
            })
        }
        10 => {
            let mut n = [0u8; 2];
            io.read_exact(&mut n).await?;
            let count = u16::from_be_bytes(n) as usize;
            if count > MAX_REVOKED_DEVICES {
                return Err(bad("too many revoked devices"));
            }
            let mut devices = Vec::with_capacity(count);
            for _ in 0..count {
                devices.push(read_namespace(io).await?);
            }
            Ok(Request::RevokedDevices(devices))
        }
        11 => Ok(Request::Heads {
            namespace: read_namespace(io).await?,
            from: read_u64(io).await?,
            to: read_u64(io).await?,
        }),
        12 => Ok(Request::CheckpointHead {
            namespace: read_namespace(io).await?,
        }),
        _ => Err(bad("unknown mirror request")),
    }
}

/// The bytes of a request.
pub fn encode_request(req: &Request) -> Vec<u8> {
    let mut b = Vec::new();
    match req {
        Request::Push(s) => {
            b.push(1);
            b.extend_from_slice(&s.descriptor.to_bytes());
            b.extend_from_slice(&s.ciphertext);
        }
        Request::Oversize(d) => {
            b.push(1);
            b.extend_from_slice(&d.to_bytes());
        }
        Request::Range { namespace, from, to } => {
            b.push(2);
            b.extend_from_slice(namespace.as_bytes());
            b.extend_from_slice(&from.to_be_bytes());
            b.extend_from_slice(&to.to_be_bytes());
        }
        Request::Head { namespace } => {
            b.push(3);
            b.extend_from_slice(namespace.as_bytes());
        }
        Request::Checkpoint(c) => {
            b.push(4);
            b.extend_from_slice(&c.checkpoint.to_bytes());
            b.extend_from_slice(&c.snapshot);
        }
        Request::OversizeCheckpoint(c) => {
            b.push(4);
            b.extend_from_slice(&c.to_bytes());
        }
        Request::GetCheckpoint { namespace } => {
            b.push(5);
            b.extend_from_slice(namespace.as_bytes());
        }
        Request::PutBundle {
            address,
            expires_ms,
            sealed,
        } => {
            b.push(6);
            b.extend_from_slice(address);
            b.extend_from_slice(&expires_ms.to_be_bytes());
            b.extend_from_slice(&(sealed.len() as u32).to_be_bytes());
            b.extend_from_slice(sealed);
        }
        Request::TakeBundle { address } => {
            b.push(7);
            b.extend_from_slice(address);
        }
        Request::Invite { ttl_secs } => {
            b.push(8);
            b.extend_from_slice(&ttl_secs.to_be_bytes());
        }
        Request::DevicePush { cert, segment } => {
            b.push(9);
            b.extend_from_slice(&cert.to_bytes());
            b.extend_from_slice(&segment.descriptor.to_bytes());
            b.extend_from_slice(&segment.ciphertext);
        }
        // Only the tag and descriptor: what a reader keeps of an oversize device push
        // (the certificate is not kept, so it is not sent; never sent anyway).
        Request::OversizeDevicePush(d) => {
            b.push(1);
            b.extend_from_slice(&d.to_bytes());
        }
        Request::RevokedDevices(devices) => {
            b.push(10);
            b.extend_from_slice(&(devices.len() as u16).to_be_bytes());
            for d in devices {
                b.extend_from_slice(d.as_bytes());
            }
        }
        Request::Heads { namespace, from, to } => {
            b.push(11);
            b.extend_from_slice(namespace.as_bytes());
            b.extend_from_slice(&from.to_be_bytes());
            b.extend_from_slice(&to.to_be_bytes());
        }
        Request::CheckpointHead { namespace } => {
            b.push(12);
            b.extend_from_slice(namespace.as_bytes());
        }
    }
    b
}

fn refusal_fields(r: &Refusal) -> (u8, u64, u64, u64, &str) {
    match r {
        Refusal::NoGrant => (1, 0, 0, 0, ""),
        Refusal::OverQuota { quota, used, len } => (2, *quota, *used, *len, ""),
        Refusal::BadSignature => (3, 0, 0, 0, ""),
        Refusal::Replayed { seq, head } => (4, *seq, *head, 0, ""),
        Refusal::BrokenChain { seq, head } => (5, *seq, *head, 0, ""),
        Refusal::LengthMismatch { len, got } => (6, *len, *got, 0, ""),
        Refusal::HashMismatch => (7, 0, 0, 0, ""),
        Refusal::TooLarge { len, max } => (8, *len, *max, 0, ""),
        Refusal::Unavailable(why) => (9, 0, 0, 0, why.as_str()),
        Refusal::StaleCheckpoint { upto, held } => (10, *upto, *held, 0, ""),
        Refusal::NoBundle => (11, 0, 0, 0, ""),
        Refusal::BadCertificate => (12, 0, 0, 0, ""),
        Refusal::TooManyBundles { held, max } => (13, *held, *max, 0, ""),
        Refusal::LinkTooLong { ttl_ms, max_ms } => (14, *ttl_ms, *max_ms, 0, ""),
        Refusal::Revoked => (15, 0, 0, 0, ""),
    }
}

fn refusal_from(code: u8, a: u64, b: u64, c: u64, detail: String) -> io::Result<Refusal> {
    Ok(match code {
        1 => Refusal::NoGrant,
        2 => Refusal::OverQuota {
            quota: a,
            used: b,
            len: c,
        },
        3 => Refusal::BadSignature,
        4 => Refusal::Replayed { seq: a, head: b },
        5 => Refusal::BrokenChain { seq: a, head: b },
        6 => Refusal::LengthMismatch { len: a, got: b },
        7 => Refusal::HashMismatch,
        8 => Refusal::TooLarge { len: a, max: b },
        9 => Refusal::Unavailable(detail),
        10 => Refusal::StaleCheckpoint { upto: a, held: b },
        11 => Refusal::NoBundle,
        12 => Refusal::BadCertificate,
        13 => Refusal::TooManyBundles { held: a, max: b },
        14 => Refusal::LinkTooLong { ttl_ms: a, max_ms: b },
        15 => Refusal::Revoked,
        _ => return Err(bad("unknown refusal")),
    })
}

/// The bytes of a response.
pub fn encode_response(res: &Response) -> Vec<u8> {
    let mut b = Vec::new();
    match res {
        Response::Stored { seq } => {
            b.push(0);
            b.extend_from_slice(&seq.to_be_bytes());
        }
        Response::Refused(r) => {
            let (code, x, y, z, detail) = refusal_fields(r);
            let detail = &detail.as_bytes()[..detail.len().min(u16::MAX as usize)];
            b.push(1);
            b.push(code);
            for n in [x, y, z] {
                b.extend_from_slice(&n.to_be_bytes());
            }
            b.extend_from_slice(&(detail.len() as u16).to_be_bytes());
            b.extend_from_slice(detail);
        }
        Response::Segments(list) => {
            b.push(2);
            b.extend_from_slice(&(list.len() as u32).to_be_bytes());
            for s in list {
                b.extend_from_slice(&s.descriptor.to_bytes());
                b.extend_from_slice(&s.ciphertext);
            }
        }
        Response::Head(h) => {
            b.push(3);
            b.extend_from_slice(&h.seq.to_be_bytes());
            b.extend_from_slice(&h.hash);
        }
        Response::Checkpoint(None) => b.extend_from_slice(&[4, 0]),
        Response::Checkpoint(Some(c)) => {
            b.extend_from_slice(&[4, 1]);
            b.extend_from_slice(&c.checkpoint.to_bytes());
            b.extend_from_slice(&c.snapshot);
        }
        Response::Bundle(sealed) => {
            b.push(5);
            b.extend_from_slice(&(sealed.len() as u32).to_be_bytes());
            b.extend_from_slice(sealed);
        }
        Response::Invite(link) => {
            let link = &link.as_bytes()[..link.len().min(MAX_INVITE_LINK)];
            b.push(6);
            b.extend_from_slice(&(link.len() as u16).to_be_bytes());
            b.extend_from_slice(link);
        }
        Response::Heads(list) => {
            let list = &list[..list.len().min(MAX_HEADS)];
            b.push(7);
            b.extend_from_slice(&(list.len() as u32).to_be_bytes());
            for h in list {
                b.extend_from_slice(&h.descriptor.to_bytes());
                put_head(&mut b, &h.head);
            }
        }
        Response::CheckpointHead(None) => b.extend_from_slice(&[8, 0]),
        Response::CheckpointHead(Some(c)) => {
            b.extend_from_slice(&[8, 1]);
            b.extend_from_slice(&c.checkpoint.to_bytes());
            put_head(&mut b, &c.head);
        }
    }
    b
}

/// A head's length and bytes (at most [`SEGMENT_HEAD_BYTES`]).
fn put_head(b: &mut Vec<u8>, head: &[u8]) {
    let head = &head[..head.len().min(SEGMENT_HEAD_BYTES)];
    b.extend_from_slice(&(head.len() as u16).to_be_bytes());
    b.extend_from_slice(head);
}

async fn read_head<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<Vec<u8>> {
    let mut n = [0u8; 2];
    io.read_exact(&mut n).await?;
    let len = u16::from_be_bytes(n) as usize;
    if len > SEGMENT_HEAD_BYTES {
        return Err(bad("segment head too long"));
    }
    read_bytes(io, len as u64).await
}

/// Reads a response, refusing one larger than a range answer may be.
pub async fn read_response<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<Response> {
    match read_u8(io).await? {
        0 => Ok(Response::Stored {
            seq: read_u64(io).await?,
        }),
        1 => {
            let code = read_u8(io).await?;
            let (a, b, c) = (read_u64(io).await?, read_u64(io).await?, read_u64(io).await?);
            let mut n = [0u8; 2];
            io.read_exact(&mut n).await?;
            let mut detail = vec![0u8; u16::from_be_bytes(n) as usize];
            io.read_exact(&mut detail).await?;
            let detail = String::from_utf8(detail).map_err(|_| bad("refusal detail is not UTF-8"))?;
            Ok(Response::Refused(refusal_from(code, a, b, c, detail)?))
        }
        2 => {
            let mut n = [0u8; 4];
            io.read_exact(&mut n).await?;
            let mut list = Vec::new();
            let mut total = 0u64;
            for _ in 0..u32::from_be_bytes(n) {
                let s = read_segment(io, MAX_SEGMENT_BYTES).await?;
                total += s.descriptor.len;
                if total > MAX_RESPONSE_BYTES {
                    return Err(bad("range answer too large"));
                }
                list.push(s);
            }
            Ok(Response::Segments(list))
        }
        3 => {
            let seq = read_u64(io).await?;
            let mut hash = [0u8; 32];
            io.read_exact(&mut hash).await?;
            Ok(Response::Head(ChainHead { seq, hash }))
        }
        4 => match read_u8(io).await? {
            0 => Ok(Response::Checkpoint(None)),
            1 => {
                let checkpoint = read_checkpoint(io).await?;
                if checkpoint.len > MAX_SNAPSHOT_BYTES {
                    return Err(bad("snapshot too large"));
                }
                let snapshot = read_bytes(io, checkpoint.len).await?;
                Ok(Response::Checkpoint(Some(Box::new(SealedCheckpoint {
                    checkpoint,
                    snapshot,
                }))))
            }
            _ => Err(bad("unknown checkpoint answer")),
        },
        5 => Ok(Response::Bundle(read_bundle(io).await?)),
        6 => {
            let mut n = [0u8; 2];
            io.read_exact(&mut n).await?;
            let len = u16::from_be_bytes(n) as usize;
            if len > MAX_INVITE_LINK {
                return Err(bad("invite link too long"));
            }
            let link = read_bytes(io, len as u64).await?;
            Ok(Response::Invite(
                String::from_utf8(link).map_err(|_| bad("invite link is not UTF-8"))?,
            ))
        }
        7 => {
            let mut n = [0u8; 4];
            io.read_exact(&mut n).await?;
            let count = u32::from_be_bytes(n) as usize;
            if count > MAX_HEADS {
                return Err(bad("too many segment heads"));
            }
            let mut list = Vec::with_capacity(count);
            for _ in 0..count {
                let descriptor = read_descriptor(io).await?;
                let head = read_head(io).await?;
                list.push(SegmentHead { descriptor, head });
            }
            Ok(Response::Heads(list))
        }
        8 => match read_u8(io).await? {
            0 => Ok(Response::CheckpointHead(None)),
            1 => {
                let checkpoint = read_checkpoint(io).await?;
                let head = read_head(io).await?;
                Ok(Response::CheckpointHead(Some(Box::new(CheckpointHead {
                    checkpoint,
                    head,
                }))))
            }
            _ => Err(bad("unknown checkpoint head answer")),
        },
        _ => Err(bad("unknown mirror response")),
    }
}

/// The libp2p codec of [`PROTOCOL`].
#[derive(Debug, Clone, Default)]
pub struct Codec;

impl libp2p::request_response::Codec for Codec {
    type Protocol = libp2p::StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &Self::Protocol, io: &mut T) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_request(io).await
    }

    async fn read_response<T>(&mut self, _: &Self::Protocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_response(io).await
    }

    async fn write_request<T>(&mut self, _: &Self::Protocol, io: &mut T, req: Request) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&encode_request(&req)).await?;
        io.close().await
    }

    async fn write_response<T>(&mut self, _: &Self::Protocol, io: &mut T, res: Response) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&encode_response(&res)).await?;
        io.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Keypair;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn read_req(b: &[u8]) -> io::Result<Request> {
        futures::executor::block_on(read_request(&mut &b[..]))
    }

    fn read_res(b: &[u8]) -> io::Result<Response> {
        futures::executor::block_on(read_response(&mut &b[..]))
    }

    #[test]
    fn the_wire_format_is_pinned() {
        let keys = Keypair::from_secret_bytes(&[7; 32]);
        let ns = keys.identity();
        let d = Descriptor::sign(&keys, ChainHead::default(), b"0123456789", 1_700_000_000_000);
        let push = Request::Push(SealedSegment {
            descriptor: d.clone(),
            ciphertext: b"0123456789".to_vec(),
        });
        let b = encode_request(&push);
        // 00  01                   push
        // 01  <188-byte descriptor>
        // bd  30313233343536373839 the 10 ciphertext bytes
        assert_eq!(b.len(), 1 + 188 + 10);
        assert_eq!(b[0], 1);
        assert_eq!(&b[1..189], &d.to_bytes());
        assert_eq!(&b[189..], b"0123456789");
        assert_eq!(read_req(&b).unwrap(), push);

        let range = Request::Range {
            namespace: ns,
            from: 3,
            to: 9,
        };
        let b = encode_request(&range);
        // 00  02  namespace(32)  0000000000000003  0000000000000009
        assert_eq!(hex(&b[..1]), "02");
        assert_eq!(&b[1..33], ns.as_bytes());
        assert_eq!(hex(&b[33..]), "00000000000000030000000000000009");
        assert_eq!(read_req(&b).unwrap(), range);

        let head = Request::Head { namespace: ns };
        let b = encode_request(&head);
        assert_eq!((b.len(), b[0]), (33, 3));
        assert_eq!(read_req(&b).unwrap(), head);

        // 00 0000000000000007: stored, chain ends at 7
        let stored = Response::Stored { seq: 7 };
        assert_eq!(hex(&encode_response(&stored)), "000000000000000007");
        assert_eq!(read_res(&encode_response(&stored)).unwrap(), stored);

        // 01 02 quota used len 0000: refused, over-quota
        let over = Response::Refused(Refusal::OverQuota {
            quota: 1000,
            used: 900,
            len: 200,
        });
        assert_eq!(
            hex(&encode_response(&over)),
            "0102\
             00000000000003e8\
             0000000000000384\
             00000000000000c8\
             0000"
        );
        assert_eq!(read_res(&encode_response(&over)).unwrap(), over);
        // 01 09 0.. 0.. 0.. 0004 "down": refused, unavailable, with its detail
        let down = Response::Refused(Refusal::Unavailable("down".into()));
        let b = encode_response(&down);
        assert_eq!(hex(&b[..2]), "0109");
        assert_eq!(hex(&b[26..]), format!("0004{}", hex(b"down")));
        assert_eq!(read_res(&b).unwrap(), down);

        // 02 00000001 descriptor ciphertext
        let segs = Response::Segments(vec![SealedSegment {
            descriptor: d.clone(),
            ciphertext: b"0123456789".to_vec(),
        }]);
        let b = encode_response(&segs);
        assert_eq!(hex(&b[..5]), "0200000001");
        assert_eq!(b.len(), 5 + 188 + 10);
        assert_eq!(read_res(&b).unwrap(), segs);

        // 03 seq hash
        let h = Response::Head(ChainHead::of(&d));
        let b = encode_response(&h);
        assert_eq!(hex(&b[..9]), "030000000000000001");
        assert_eq!(&b[9..], &d.digest());
        assert_eq!(read_res(&b).unwrap(), h);
    }

    #[test]
    fn every_refusal_crosses_the_wire_typed() {
        for r in [
            Refusal::NoGrant,
            Refusal::OverQuota {
                quota: 1,
                used: 2,
                len: 3,
            },
            Refusal::BadSignature,
            Refusal::Replayed { seq: 4, head: 5 },
            Refusal::BrokenChain { seq: 6, head: 7 },
            Refusal::LengthMismatch { len: 8, got: 9 },
            Refusal::HashMismatch,
            Refusal::TooLarge { len: 10, max: 11 },
            Refusal::Unavailable("disk full".into()),
            Refusal::StaleCheckpoint { upto: 12, held: 13 },
            Refusal::NoBundle,
            Refusal::BadCertificate,
            Refusal::TooManyBundles { held: 14, max: 15 },
            Refusal::LinkTooLong {
                ttl_ms: 16,
                max_ms: 17,
            },
            Refusal::Revoked,
        ] {
            let res = Response::Refused(r.clone());
            assert_eq!(read_res(&encode_response(&res)).unwrap(), res, "{}", r.reason());
        }
    }

    #[test]
    fn an_oversize_push_is_not_read_past_its_descriptor() {
        let keys = Keypair::generate();
        let big = vec![0u8; (MAX_SEGMENT_BYTES + 1) as usize];
        let d = Descriptor::sign(&keys, ChainHead::default(), &big, 1);
        // Only the tag and the descriptor are there: a reader that tried to read the
        // ciphertext would fail with an unexpected end.
        let b = encode_request(&Request::Oversize(d.clone()));
        assert_eq!(read_req(&b).unwrap(), Request::Oversize(d));
    }

    #[test]
    fn truncated_and_unknown_frames_are_errors() {
        let keys = Keypair::generate();
        let d = Descriptor::sign(&keys, ChainHead::default(), b"abc", 1);
        let mut b = encode_request(&Request::Push(SealedSegment {
            descriptor: d,
            ciphertext: b"abc".to_vec(),
        }));
        b.pop();
        assert!(read_req(&b).is_err());
        assert!(read_req(&[9]).is_err());
        assert!(read_res(&[1, 42, 0]).is_err());
        assert!(read_res(&[]).is_err());
    }

    #[test]
    fn the_checkpoint_messages_are_pinned() {
        let keys = Keypair::from_secret_bytes(&[7; 32]);
        let ns = keys.identity();
        let d = Descriptor::sign(&keys, ChainHead::default(), b"0123456789", 1_700_000_000_000);
        let c = Checkpoint::sign(&keys, ChainHead::of(&d), b"snap", 1_700_000_000_002);
        let sealed = SealedCheckpoint {
            checkpoint: c.clone(),
            snapshot: b"snap".to_vec(),
        };
        let push = Request::Checkpoint(sealed.clone());
        let b = encode_request(&push);
        // 00  04                   push a checkpoint
        // 01  <188-byte checkpoint>
        // bd  736e6170             the 4 snapshot ciphertext bytes
        assert_eq!(b.len(), 1 + 188 + 4);
        assert_eq!(b[0], 4);
        assert_eq!(&b[1..189], &c.to_bytes());
        assert_eq!(hex(&b[189..]), "736e6170");
        assert_eq!(read_req(&b).unwrap(), push);

        // 00  05  namespace(32): the checkpoint held
        let get = Request::GetCheckpoint { namespace: ns };
        let b = encode_request(&get);
        assert_eq!((b.len(), b[0]), (33, 5));
        assert_eq!(&b[1..], ns.as_bytes());
        assert_eq!(read_req(&b).unwrap(), get);

        // 04 00: none held
        let none = Response::Checkpoint(None);
        assert_eq!(hex(&encode_response(&none)), "0400");
        assert_eq!(read_res(&encode_response(&none)).unwrap(), none);
        // 04 01 checkpoint(188) snapshot
        let some = Response::Checkpoint(Some(Box::new(sealed)));
        let b = encode_response(&some);
        assert_eq!(hex(&b[..2]), "0401");
        assert_eq!(&b[2..190], &c.to_bytes());
        assert_eq!(&b[190..], b"snap");
        assert_eq!(read_res(&b).unwrap(), some);

        // 01 0a upto held 0 0000: refused, stale-checkpoint
        let stale = Response::Refused(Refusal::StaleCheckpoint { upto: 3, held: 5 });
        assert_eq!(
            hex(&encode_response(&stale)),
            "010a\
             0000000000000003\
             0000000000000005\
             0000000000000000\
             0000"
        );

        // A checkpoint declaring more than a push carries is not read past itself.
        let big = Checkpoint::sign(
            &keys,
            ChainHead::of(&d),
            &vec![0; (MAX_SNAPSHOT_BYTES + 1) as usize],
            1,
        );
        let b = encode_request(&Request::OversizeCheckpoint(big.clone()));
        assert_eq!(read_req(&b).unwrap(), Request::OversizeCheckpoint(big));
    }

    #[test]
    fn the_bundle_messages_are_pinned() {
        let put = Request::PutBundle {
            address: [0xaa; 32],
            expires_ms: 0x0102,
            sealed: b"age".to_vec(),
        };
        let b = encode_request(&put);
        // 00  06                   keep a device's bundle
        // 01  aaaa…aa              address(32)
        // 21  0000000000000102     expires_ms
        // 29  00000003 616765      len, the sealed bytes
        assert_eq!(hex(&b[..1]), "06");
        assert_eq!(&b[1..33], &[0xaa; 32]);
        assert_eq!(hex(&b[33..]), "000000000000010200000003616765");
        assert_eq!(read_req(&b).unwrap(), put);

        // 00  07  address(32): take it
        let take = Request::TakeBundle { address: [0xbb; 32] };
        let b = encode_request(&take);
        assert_eq!((b.len(), b[0]), (33, 7));
        assert_eq!(read_req(&b).unwrap(), take);

        // 05 00000003 616765: the bundle
        let got = Response::Bundle(b"age".to_vec());
        assert_eq!(hex(&encode_response(&got)), "0500000003616765");
        assert_eq!(read_res(&encode_response(&got)).unwrap(), got);

        // 01 0b 0.. 0.. 0.. 0000: refused, no-bundle
        let none = Response::Refused(Refusal::NoBundle);
        assert_eq!(hex(&encode_response(&none)[..2]), "010b");

        // 00  08  0000000000000e10: an invite valid an hour
        let inv = Request::Invite { ttl_secs: 3600 };
        assert_eq!(hex(&encode_request(&inv)), "080000000000000e10");
        assert_eq!(read_req(&encode_request(&inv)).unwrap(), inv);
        // 06 0003 6c6e6b: the link "lnk"
        let link = Response::Invite("lnk".into());
        assert_eq!(hex(&encode_response(&link)), "0600036c6e6b");
        assert_eq!(read_res(&encode_response(&link)).unwrap(), link);

        // A bundle declaring more than a bundle may be is not read.
        let mut big = vec![6u8];
        big.extend_from_slice(&[0; 40]);
        big.extend_from_slice(&((MAX_BUNDLE_BYTES + 1) as u32).to_be_bytes());
        assert!(read_req(&big).is_err());
    }

    #[test]
    fn the_device_push_is_pinned() {
        let owner = Keypair::from_secret_bytes(&[7; 32]);
        let device = Keypair::from_secret_bytes(&[8; 32]);
        let cert = DeviceCert::sign(&owner, device.identity(), 1_700_000_000_000, 0);
        let d = Descriptor::sign(&device, ChainHead::default(), b"abc", 1_700_000_000_001);
        let push = Request::DevicePush {
            cert: Box::new(cert.clone()),
            segment: SealedSegment {
                descriptor: d.clone(),
                ciphertext: b"abc".to_vec(),
            },
        };
        let b = encode_request(&push);
        // 000  09                   a device pushes one segment
        // 001  <148-byte certificate>
        // 095  <188-byte descriptor, signed by the device>
        // 151  616263               the 3 ciphertext bytes
        assert_eq!(b.len(), 1 + 148 + 188 + 3);
        assert_eq!(hex(&b[..1]), "09");
        assert_eq!(&b[1..149], &cert.to_bytes());
        assert_eq!(&b[149..337], &d.to_bytes());
        assert_eq!(hex(&b[337..]), "616263");
        assert_eq!(read_req(&b).unwrap(), push);

        // 01 0c 0.. 0.. 0.. 0000: refused, bad-certificate
        let refused = Response::Refused(Refusal::BadCertificate);
        assert_eq!(
            hex(&encode_response(&refused)),
            "010c\
             0000000000000000\
             0000000000000000\
             0000000000000000\
             0000"
        );

        // A device push declaring more than a push carries is not read past its descriptor.
        let big = vec![0u8; (MAX_SEGMENT_BYTES + 1) as usize];
        let d = Descriptor::sign(&device, ChainHead::default(), &big, 1);
        let mut b = vec![9u8];
        b.extend_from_slice(&cert.to_bytes());
        b.extend_from_slice(&d.to_bytes());
        assert_eq!(read_req(&b).unwrap(), Request::OversizeDevicePush(d));

        // 01 0f 0.. 0.. 0.. 0000: refused, revoked
        let refused = Response::Refused(Refusal::Revoked);
        assert_eq!(hex(&encode_response(&refused)[..2]), "010f");
        assert_eq!(read_res(&encode_response(&refused)).unwrap(), refused);
    }

    #[test]
    fn the_head_messages_are_pinned() {
        let keys = Keypair::from_secret_bytes(&[7; 32]);
        let ns = keys.identity();
        let req = Request::Heads {
            namespace: ns,
            from: 3,
            to: 9,
        };
        let b = encode_request(&req);
        // 00  0b  namespace(32)  0000000000000003  0000000000000009
        assert_eq!(hex(&b[..1]), "0b");
        assert_eq!(&b[1..33], ns.as_bytes());
        assert_eq!(hex(&b[33..]), "00000000000000030000000000000009");
        assert_eq!(read_req(&b).unwrap(), req);
        // 00  0c  namespace(32)
        let ck = Request::CheckpointHead { namespace: ns };
        let b = encode_request(&ck);
        assert_eq!((b.len(), b[0]), (33, 12));
        assert_eq!(read_req(&b).unwrap(), ck);

        let d = Descriptor::sign(&keys, ChainHead::default(), b"0123456789", 1_700_000_000_000);
        let heads = Response::Heads(vec![SegmentHead {
            descriptor: d.clone(),
            head: b"0123".to_vec(),
        }]);
        let b = encode_response(&heads);
        // 000  07 00000001          one head
        // 005  <188-byte descriptor>
        // 0c1  0004 30313233        the first 4 bytes of its ciphertext
        assert_eq!(hex(&b[..5]), "0700000001");
        assert_eq!(&b[5..193], &d.to_bytes());
        assert_eq!(hex(&b[193..]), "000430313233");
        assert_eq!(read_res(&b).unwrap(), heads);

        let c = Checkpoint::sign(&keys, ChainHead::of(&d), b"snap", 1_700_000_000_002);
        let some = Response::CheckpointHead(Some(Box::new(CheckpointHead {
            checkpoint: c.clone(),
            head: b"sn".to_vec(),
        })));
        let b = encode_response(&some);
        // 08 01 checkpoint(188) 0002 736e
        assert_eq!(hex(&b[..2]), "0801");
        assert_eq!(&b[2..190], &c.to_bytes());
        assert_eq!(hex(&b[190..]), "0002736e");
        assert_eq!(read_res(&b).unwrap(), some);
        assert_eq!(hex(&encode_response(&Response::CheckpointHead(None))), "0800");

        // A head longer than a head may be, or more heads than an answer carries, is not read.
        let mut long = vec![8u8, 1];
        long.extend_from_slice(&c.to_bytes());
        long.extend_from_slice(&((SEGMENT_HEAD_BYTES + 1) as u16).to_be_bytes());
        long.extend_from_slice(&vec![0; SEGMENT_HEAD_BYTES + 1]);
        assert!(read_res(&long).is_err());
        let mut many = vec![7u8];
        many.extend_from_slice(&((MAX_HEADS + 1) as u32).to_be_bytes());
        assert!(read_res(&many).is_err());
    }

    #[test]
    fn the_revoked_devices_are_pinned() {
        let a = Keypair::from_secret_bytes(&[8; 32]).identity();
        let b = Keypair::from_secret_bytes(&[9; 32]).identity();
        let req = Request::RevokedDevices(vec![a, b]);
        let bytes = encode_request(&req);
        // 00  0a                   the asker's revoked devices
        // 01  0002                 count
        // 03  device(32)           the first
        // 23  device(32)           the second
        assert_eq!(hex(&bytes[..3]), "0a0002");
        assert_eq!(&bytes[3..35], a.as_bytes());
        assert_eq!(&bytes[35..], b.as_bytes());
        assert_eq!(read_req(&bytes).unwrap(), req);
        // None revoked (an owner that revoked none, or that un-revokes by forgetting).
        assert_eq!(hex(&encode_request(&Request::RevokedDevices(vec![]))), "0a0000");

        // A longer list than an owner may send is not read; a cut one is an error.
        let mut long = vec![10u8];
        long.extend_from_slice(&((MAX_REVOKED_DEVICES + 1) as u16).to_be_bytes());
        long.extend_from_slice(&a.as_bytes().repeat(MAX_REVOKED_DEVICES + 1));
        assert!(read_req(&long).is_err());
        assert!(read_req(&bytes[..bytes.len() - 1]).is_err());
    }
}
