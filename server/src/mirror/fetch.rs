//! Fetching an owner's chain from a mirror: its checkpoint's snapshot and the segments
//! after it, each checked against the owner's signature and chain (and its ciphertext
//! against its descriptor), opened and applied through the engine as federation applies
//! its home's changes (replicas of `/~<owner>/…`): a segment's resources at once (each
//! resource's entries in order), so that the store commits them together.
//!
//! A device restoring needs every segment ([`Opening::Every`]: ranges of whole segments,
//! the next fetched while one is applied, and a segment started while the one before is
//! still being applied when the two hold no resource in common; with progress). A reader of a shared part, or a
//! device following, needs only what is sealed to it ([`Opening::Ours`]): it asks for
//! the heads first (descriptors and the age headers of the ciphertexts) and fetches whole
//! only the snapshot and segments that open with its keys, so a reader of a small part of
//! a big namespace downloads about its part.
//!
//! Knows nothing of HTTP or of where a device's or reader's position is kept.

use anyhow::{Context, bail};
use plait_bridge::Identity;
use plait_bridge::mirror::wire::{Request, Response};
use plait_bridge::mirror::{ChainHead, Checkpoint, SealKey, SealedSegment};
use plait_bridge::node::Node;

use super::batch::{self, What};
use crate::engine::{Engine, Start};
use crate::model::{ResourceKey, ResourcePath};
use crate::progress::Progress;

async fn ask(node: &Node, mirror: Identity, req: Request) -> anyhow::Result<Response> {
    let r = node
        .mirror(mirror, req)
        .await
        .map_err(|e| anyhow::anyhow!("asking the mirror {mirror}: {e}"))?;
    if let Response::Refused(r) = &r {
        bail!("the mirror refused ({}): {r}", r.reason());
    }
    Ok(r)
}

/// Which of a chain's segments must open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// Every one (a device holds the owner's keys), with progress shown.
    Every,
    /// Those sealed to the keys given; the others are checked and passed over (a reader
    /// of a shared part), quietly.
    Ours,
}

/// What [`fetch_chain`] did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fetched {
    /// Resources written.
    pub resources: usize,
    /// Where the chain stands now.
    pub head: ChainHead,
    /// Segments (and snapshots) opened.
    pub opened: u64,
    /// Ciphertext bytes received: segments, snapshots and heads.
    pub bytes: u64,
}

/// Fetches `owner`'s chain from `mirror` after `from` — its checkpoint's snapshot first
/// when the checkpoint is past `from` (the segments before it are gone) — checks each
/// segment against the owner's signature and chain, opens it with `keys` and applies it
/// to replicas of `/~<owner>/…` in `engine`. With [`Opening::Ours`] only what is sealed
/// to `keys` is fetched whole ([`ours`]).
pub async fn fetch_chain(
    node: &Node,
    mirror: Identity,
    owner: Identity,
    keys: &[&SealKey],
    engine: &Engine,
    from: ChainHead,
    opening: Opening,
) -> anyhow::Result<Fetched> {
    let head = match ask(node, mirror, Request::Head { namespace: owner }).await? {
        Response::Head(h) => h,
        other => bail!("the mirror answered {other:?}"),
    };
    if head.seq <= from.seq {
        return Ok(Fetched {
            head: from,
            ..Fetched::default()
        });
    }
    let chain = Chain {
        node,
        mirror,
        owner,
        keys,
        engine,
        head,
    };
    match opening {
        Opening::Every => every(chain, from).await,
        Opening::Ours => ours(chain, from).await,
    }
}

/// The chain being fetched: from which mirror, whose, opened with what, into what, and
/// where the mirror's copy ends.
#[derive(Clone, Copy)]
struct Chain<'a> {
    node: &'a Node,
    mirror: Identity,
    owner: Identity,
    keys: &'a [&'a SealKey],
    engine: &'a Engine,
    head: ChainHead,
}

impl Chain<'_> {
    async fn ask(&self, req: Request) -> anyhow::Result<Response> {
        ask(self.node, self.mirror, req).await
    }

    /// Segments `from..=to` of the chain (at least one, at most about a range answer's
    /// bytes).
    async fn range(&self, from: u64, to: u64) -> anyhow::Result<Vec<SealedSegment>> {
        let req = Request::Range {
            namespace: self.owner,
            from,
            to,
        };
        match self.ask(req).await? {
            Response::Segments(l) if l.is_empty() => bail!(
                "the mirror holds no segment {from} though its chain ends at {}",
                self.head.seq
            ),
            Response::Segments(l) => Ok(l),
            other => bail!("the mirror answered {other:?}"),
        }
    }

    /// The heads of segments `from..=to` (at least one, at most a heads answer's count).
    async fn heads(&self, from: u64, to: u64) -> anyhow::Result<Vec<plait_bridge::mirror::SegmentHead>> {
        let req = Request::Heads {
            namespace: self.owner,
            from,
            to,
        };
        match self.ask(req).await? {
            Response::Heads(l) if l.is_empty() => bail!(
                "the mirror holds no segment {from} though its chain ends at {}",
                self.head.seq
            ),
            Response::Heads(l) => Ok(l),
            other => bail!("the mirror answered {other:?}"),
        }
    }

    /// Opens and applies one sealed batch (see [`apply`]).
    async fn apply(
        &self,
        ciphertext: &[u8],
        opening: Opening,
        touched: &mut std::collections::BTreeSet<String>,
    ) -> anyhow::Result<bool> {
        apply(self.engine, self.owner, ciphertext, self.keys, opening, touched).await
    }
}

/// Checks a checkpoint held with `snapshot` against the owner's signature.
fn check_snapshot(owner: Identity, ck: &Checkpoint, snapshot: &[u8]) -> anyhow::Result<()> {
    if ck.namespace != owner
        || !ck.verify_signature()
        || ck.len != snapshot.len() as u64
        || &ck.hash != blake3::hash(snapshot).as_bytes()
    {
        bail!("the mirror's checkpoint is not the owner's");
    }
    Ok(())
}

/// Every segment: each one must open (a device restoring), with progress.
async fn every(c: Chain<'_>, from: ChainHead) -> anyhow::Result<Fetched> {
    let mut done = Fetched {
        head: from,
        ..Fetched::default()
    };
    let mut progress = Progress::counting("restoring from the mirror", "segments", c.head.seq);
    let mut touched = std::collections::BTreeSet::new();
    let mut chain = from;
    if let Response::Checkpoint(Some(sealed)) = c.ask(Request::GetCheckpoint { namespace: c.owner }).await?
        && sealed.checkpoint.upto > from.seq
    {
        let ck = &sealed.checkpoint;
        check_snapshot(c.owner, ck, &sealed.snapshot)?;
        if c.apply(&sealed.snapshot, Opening::Every, &mut touched).await? {
            done.opened += 1;
        }
        chain = Checkpoint::chain_head(ck);
        done.bytes += sealed.snapshot.len() as u64;
        progress.update(ck.upto, done.bytes);
    }
    // Ranges are fetched ahead while earlier ones are applied, a few at a time: the link
    // stays busy, and what is left to apply once the last bytes are in is one small range.
    let (tx, rx) = tokio::sync::mpsc::channel::<anyhow::Result<Vec<SealedSegment>>>(RESTORE_RANGES_AHEAD);
    let fetching = async move {
        let mut next = chain.seq + 1;
        while next <= c.head.seq {
            let to = next.saturating_add(RESTORE_RANGE_SEGMENTS - 1).min(c.head.seq);
            let got = c.range(next, to).await;
            let last = got.as_ref().ok().and_then(|l| l.last()).map(|s| s.descriptor.seq);
            if tx.send(got).await.is_err() {
                return; // the applier stopped
            }
            match last {
                Some(l) => next = l + 1,
                None => return, // the error was sent
            }
        }
    };
    // Segments are applied in the chain's order, and the next one starts while earlier
    // ones are still being applied when it holds none of their resources (each resource's
    // entries apply in the chain's order): the store's commits of one segment overlap the
    // next one's document work. `chain` moves only past segments applied, in order.
    let applying = async {
        use futures::StreamExt;
        let mut rx = rx; // owned here: dropped when applying stops, which stops the fetcher
        let mut received: std::collections::VecDeque<SealedSegment> = std::collections::VecDeque::new();
        let mut fetched_all = false;
        // Opened, not started yet: where the chain stands after it, its size, its batch.
        let mut next: Option<(ChainHead, u64, Opened)> = None;
        let mut opened_to = chain;
        // Started, oldest first: the resources each holds, and its application, which
        // answers with where the chain stands after it and its size.
        let mut started: std::collections::VecDeque<std::collections::HashSet<ResourcePath>> =
            std::collections::VecDeque::new();
        let mut applications = futures::stream::FuturesOrdered::new();
        loop {
            if next.is_none()
                && let Some(s) = received.pop_front()
            {
                if !s.follows(c.owner, opened_to) {
                    bail!(
                        "segment {} from the mirror does not follow the owner's chain",
                        s.descriptor.seq
                    );
                }
                opened_to = ChainHead::of(&s.descriptor);
                let opened = open_batch(&s.ciphertext, c.keys, Opening::Every)?
                    .context("a segment is not sealed to this device")?;
                next = Some((opened_to, s.ciphertext.len() as u64, opened));
            }
            if let Some((_, _, opened)) = &next
                && started.len() < RESTORE_SEGMENTS_AT_ONCE
                && started
                    .iter()
                    .all(|paths| opened.iter().all(|(p, _)| !paths.contains(p)))
            {
                let (head, bytes, opened) = next.take().expect("there is a next one");
                let paths: std::collections::HashSet<ResourcePath> =
                    opened.iter().map(|(p, _)| p.clone()).collect();
                touched.extend(paths.iter().map(|p| p.as_str().to_string()));
                started.push_back(paths);
                let application = apply_opened(c.engine, c.owner, opened);
                applications.push_back(async move { application.await.map(|()| (head, bytes)) });
                continue;
            }
            if started.is_empty() && next.is_none() && received.is_empty() && fetched_all {
                return Ok(());
            }
            tokio::select! {
                Some(applied) = applications.next(), if !started.is_empty() => {
                    let (head, bytes) = applied?;
                    started.pop_front();
                    done.opened += 1;
                    chain = head;
                    done.head = chain;
                    done.bytes += bytes;
                    progress.update(chain.seq, done.bytes);
                }
                got = rx.recv(), if !fetched_all && received.is_empty() => match got {
                    Some(list) => received.extend(list?),
                    None => fetched_all = true,
                },
            }
        }
    };
    let ((), applied) = tokio::join!(fetching, applying);
    applied?;
    progress.finish();
    done.head = chain;
    done.resources = touched.len();
    Ok(done)
}

/// What a reader does with one segment, told from its head.
enum Need {
    /// Its head is all of it: here already.
    Have,
    /// Not sealed to our keys: passed over, its descriptor checked.
    Skip,
    /// Sealed to our keys, or its head cannot tell: fetched whole.
    Fetch,
}

/// Only what is sealed to `keys` (a reader of a shared part, a device following): the
/// checkpoint's and segments' heads first, then only the snapshot and segments that open
/// with `keys` (or whose heads cannot tell), each checked against what its head
/// described. What is passed over is still checked as a link in the owner's chain.
async fn ours(c: Chain<'_>, from: ChainHead) -> anyhow::Result<Fetched> {
    let mut done = Fetched {
        head: from,
        ..Fetched::default()
    };
    let mut touched = std::collections::BTreeSet::new();
    let mut chain = from;
    if let Response::CheckpointHead(Some(ckh)) = c.ask(Request::CheckpointHead { namespace: c.owner }).await?
        && ckh.checkpoint.upto > from.seq
    {
        let ck = &ckh.checkpoint;
        if ck.namespace != c.owner || !ck.verify_signature() {
            bail!("the mirror's checkpoint is not the owner's");
        }
        done.bytes += ckh.head.len() as u64;
        if plait_bridge::mirror::sealed_to(c.keys, &ckh.head) != Some(false) {
            let Response::Checkpoint(Some(sealed)) =
                c.ask(Request::GetCheckpoint { namespace: c.owner }).await?
            else {
                bail!("the mirror's checkpoint went away");
            };
            if sealed.checkpoint != *ck {
                bail!("the mirror's checkpoint changed while it was fetched");
            }
            check_snapshot(c.owner, ck, &sealed.snapshot)?;
            done.bytes += sealed.snapshot.len() as u64;
            if c.apply(&sealed.snapshot, Opening::Ours, &mut touched).await? {
                done.opened += 1;
            }
        }
        chain = Checkpoint::chain_head(ck);
        done.head = chain;
    }
    while chain.seq < c.head.seq {
        let heads = c.heads(chain.seq + 1, c.head.seq).await?;
        let mut at = chain;
        for h in &heads {
            if !h.descriptor.follows(c.owner, at) {
                bail!(
                    "segment {} from the mirror does not follow the owner's chain",
                    h.descriptor.seq
                );
            }
            at = ChainHead::of(&h.descriptor);
        }
        let needs: Vec<Need> = heads
            .iter()
            .map(|h| {
                if h.head.len() as u64 == h.descriptor.len {
                    Need::Have
                } else if plait_bridge::mirror::sealed_to(c.keys, &h.head) == Some(false) {
                    Need::Skip
                } else {
                    Need::Fetch
                }
            })
            .collect();
        done.bytes += heads.iter().map(|h| h.head.len() as u64).sum::<u64>();
        let mut fetched = std::collections::VecDeque::new();
        for (i, (h, need)) in heads.iter().zip(needs.iter()).enumerate() {
            let d = &h.descriptor;
            let segment = match need {
                Need::Skip => None,
                Need::Have => h.whole(),
                Need::Fetch => {
                    if fetched
                        .front()
                        .is_none_or(|s: &SealedSegment| s.descriptor.seq != d.seq)
                    {
                        // The run of segments to fetch from here, in one range.
                        let run = needs[i..].iter().take_while(|n| matches!(n, Need::Fetch)).count();
                        let to = heads[i + run - 1].descriptor.seq;
                        let got = c.range(d.seq, to).await?;
                        done.bytes += got.iter().map(|s| s.ciphertext.len() as u64).sum::<u64>();
                        fetched = got.into();
                    }
                    fetched.pop_front()
                }
            };
            if let Some(s) = segment {
                if s.descriptor != *d || !d.matches(&s.ciphertext) {
                    bail!("the mirror's segment {} is not the one its head described", d.seq);
                }
                if c.apply(&s.ciphertext, Opening::Ours, &mut touched).await? {
                    done.opened += 1;
                }
            }
            // Only once applied: a failure is fetched again from here.
            chain = ChainHead::of(d);
            done.head = chain;
        }
    }
    done.resources = touched.len();
    Ok(done)
}

/// Segments asked for in one range while restoring (a range answer also stops at
/// [`plait_bridge::mirror::wire::MAX_RANGE_BYTES`]): at the default segment size a few
/// MiB, so the last range, applied after the link has gone quiet, is short.
const RESTORE_RANGE_SEGMENTS: u64 = 4;
/// Ranges fetched ahead of the one being applied and held meanwhile (with the one being
/// fetched and the one being applied: four ranges in memory at most, 16 MiB at the
/// default segment size, 128 MiB if every segment were as large as a push may carry).
const RESTORE_RANGES_AHEAD: usize = 2;

/// Segments being applied at once while restoring: the next starts while the last one's
/// commits finish, if the two hold no resource in common.
const RESTORE_SEGMENTS_AT_ONCE: usize = 2;

/// Resources of one segment restored at once through their actors. The store commits what
/// is waiting together, so a segment of many small resources costs a few commits, not
/// one each.
const RESTORE_CONCURRENCY: usize = 64;

/// Resources created in one transaction when a batch starts them (a segment at the
/// default size starts about a hundred of 10 KB each; a checkpoint's snapshot may start a
/// whole namespace, created a few thousand at a time).
const RESTORE_CREATE_AT_ONCE: usize = 1024;

/// One sealed batch opened: each resource's entries, in the batch's order.
type Opened = Vec<(ResourcePath, Vec<batch::Entry>)>;

/// Opens one sealed batch; `None` if it is not sealed to `keys` and need not be
/// ([`Opening::Ours`]).
fn open_batch(ciphertext: &[u8], keys: &[&SealKey], opening: Opening) -> anyhow::Result<Option<Opened>> {
    let plain = match plait_bridge::mirror::open_with(keys, ciphertext) {
        Ok(p) => p,
        Err(plait_bridge::mirror::SealError::NotSealedToUs) if opening == Opening::Ours => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let entries = batch::decode(&plain).map_err(|e| anyhow::anyhow!("a sealed batch: {e}"))?;
    let mut per_resource: Opened = Vec::new();
    let mut at = std::collections::HashMap::new();
    for e in entries {
        let i = *at.entry(e.path.clone()).or_insert_with(|| {
            per_resource.push((e.path.clone(), Vec::new()));
            per_resource.len() - 1
        });
        per_resource[i].1.push(e);
    }
    Ok(Some(per_resource))
}

/// Opens one sealed batch and applies its entries to replicas of the owner's resources;
/// `false` if it is not sealed to `keys` and need not be ([`Opening::Ours`]). It returns
/// once all of them are applied (or one failed).
async fn apply(
    engine: &Engine,
    owner: Identity,
    ciphertext: &[u8],
    keys: &[&SealKey],
    opening: Opening,
    touched: &mut std::collections::BTreeSet<String>,
) -> anyhow::Result<bool> {
    let Some(opened) = open_batch(ciphertext, keys, opening)? else {
        return Ok(false);
    };
    for (path, _) in &opened {
        touched.insert(path.as_str().to_string());
    }
    apply_opened(engine, owner, opened).await?;
    Ok(true)
}

/// Applies an opened batch. The resources it starts that are not here yet (its first
/// entry for them a snapshot or a value) are created together, up to
/// [`RESTORE_CREATE_AT_ONCE`] in one transaction, outside their actors; then the entries
/// left, each resource's in their order, different resources at once (up to
/// [`RESTORE_CONCURRENCY`]).
async fn apply_opened(engine: &Engine, owner: Identity, opened: Opened) -> anyhow::Result<()> {
    use futures::{StreamExt, TryStreamExt};
    let (at, starts): (Vec<usize>, Vec<(ResourceKey, Start)>) = opened
        .iter()
        .enumerate()
        .filter_map(|(i, (path, entries))| {
            let start = start_of(entries.first()?)?;
            Some((i, (ResourceKey::new(owner, path.clone()), start)))
        })
        .unzip();
    let mut done = vec![0usize; opened.len()];
    for (at, starts) in at
        .chunks(RESTORE_CREATE_AT_ONCE)
        .zip(starts.chunks(RESTORE_CREATE_AT_ONCE))
    {
        let created = engine.create_many(starts).await.with_context(|| {
            format!(
                "restoring {} resources from {}",
                starts.len(),
                starts[0].0.path.as_str()
            )
        })?;
        for (&i, created) in at.iter().zip(created) {
            done[i] = usize::from(created);
        }
    }
    // Owned futures (an engine handle and the entries each), so the stream is `Send`.
    let restores = opened
        .into_iter()
        .zip(done)
        .filter(|((_, entries), done)| entries.len() > *done)
        .map(|((path, entries), done)| {
            let engine = engine.clone();
            async move {
                apply_resource(&engine, ResourceKey::new(owner, path.clone()), &entries[done..])
                    .await
                    .with_context(|| format!("restoring {}", path.as_str()))
            }
        });
    futures::stream::iter(restores)
        .buffer_unordered(RESTORE_CONCURRENCY)
        .try_collect::<()>()
        .await
}

/// What a resource starts with when its first entry in a batch can start it: a snapshot
/// of a document, or a value.
fn start_of(e: &batch::Entry) -> Option<Start> {
    match e.what {
        What::Snapshot if e.kind != crate::model::Kind::Bytes => Some(Start::Snapshot {
            kind: e.kind,
            media_type: e.media_type.clone(),
            data: e.data.clone(),
        }),
        What::Value => Some(Start::Value {
            media_type: e.media_type.clone(),
            body: e.data.clone(),
        }),
        What::Snapshot | What::Change => None,
    }
}

/// Applies one resource's entries of a batch, in order: consecutive changes are imported
/// together, a snapshot starts an empty replica (or adds what it lacks), a bytes value
/// is written.
async fn apply_resource(engine: &Engine, rkey: ResourceKey, entries: &[batch::Entry]) -> anyhow::Result<()> {
    let mut i = 0;
    while i < entries.len() {
        let e = &entries[i];
        match e.what {
            What::Change => {
                let mut changes = Vec::new();
                while i < entries.len() && entries[i].what == What::Change {
                    changes.push(entries[i].data.clone());
                    i += 1;
                }
                engine
                    .import(&rkey, e.kind, e.media_type.clone(), changes)
                    .await?;
                continue;
            }
            What::Snapshot => {
                let started = engine
                    .import_snapshot(
                        &rkey,
                        e.kind,
                        e.media_type.clone(),
                        e.data.clone(),
                        crate::engine::SnapshotLoad::AtFirstUse,
                    )
                    .await?;
                if !started {
                    // The replica exists: what the snapshot holds that it lacks goes in
                    // as changes (those it holds apply once).
                    let changes = crate::doc::Document::load_automerge(
                        e.kind,
                        Some(e.data.as_ref()),
                        std::iter::empty::<&[u8]>(),
                    )?
                    .export(&[])
                    .into_iter()
                    .map(|c| bytes::Bytes::from(c.bytes))
                    .collect();
                    engine
                        .import(&rkey, e.kind, e.media_type.clone(), changes)
                        .await?;
                }
            }
            What::Value => {
                engine
                    .write(
                        &rkey,
                        crate::engine::Write::internal_value(e.media_type.clone(), e.data.clone()),
                    )
                    .await?;
            }
        }
        i += 1;
    }
    Ok(())
}
