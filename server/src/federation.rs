//! Federation: members of one network read each other's resources live.
//!
//! * **Home** ([`Home`]): this instance answers other members' fetches for resources in its
//!   own namespace with the automerge changes they lack, given the heads they hold. A fetch
//!   may wait (long poll, up to `wait_ms`) until there is something new.
//! * **Replica** ([`Federation`]): a local client that reads `/~<B>/path`, where B is a
//!   member, gets it from a local replica. While anyone subscribes, one task per resource
//!   keeps the replica live: it fetches from B with its heads, imports what comes into the
//!   engine (stored and announced like any write, so local subscribers get the usual Braid
//!   updates) and fetches again. When B cannot be reached the replica is served as it is,
//!   marked `Plait-Replica: offline`, and fetching resumes from the same heads when B
//!   returns, so nothing is missed.
//!
//! Fetch frames: the request is JSON ([`PullRequest`]); the answer is a JSON header line
//! ([`PullHeader`]) followed by the changes' bytes back to back (lengths in the header).
//!
//! Text and JSON resources travel as automerge changes — or, to a replica that holds
//! nothing of a long history, as the whole compact document, stored as its first snapshot;
//! a bytes resource travels as its value, sent when the replica's digest differs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use plait_bridge::Identity;
use plait_bridge::node::Node;
use plait_bridge::types::Serve;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::engine::Engine;
use crate::model::{Kind, ResourceKey, ResourcePath};

/// Longest a home holds a fetch open waiting for news.
const MAX_WAIT: Duration = Duration::from_secs(25);
/// Most change bytes in one answer; a replica that is further behind fetches again at once.
const MAX_ANSWER_BYTES: usize = 8 << 20;
/// A replica nobody subscribes to stops being kept live after this long.
const REPLICA_GRACE: Duration = Duration::from_secs(5);
/// How long a plain GET waits for a fresh sync before serving the replica as it is.
const GET_SYNC_WAIT: Duration = Duration::from_secs(5);

/// What a replica asks its home.
#[derive(Debug, Serialize, Deserialize)]
pub struct PullRequest {
    /// The replica's automerge heads (hex).
    pub have: Vec<String>,
    /// Wait up to this long for something new (0: answer at once).
    pub wait_ms: u64,
    /// For bytes resources: the digest of the value the replica holds.
    #[serde(default)]
    pub digest: Option<String>,
}

/// The header of a home's answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct PullHeader {
    pub exists: bool,
    pub kind: Option<Kind>,
    pub media_type: String,
    /// Lengths of the changes that follow the header line.
    pub lens: Vec<usize>,
    /// More changes remain (the answer was cut at its size limit).
    pub more: bool,
    /// For bytes resources: the value's digest (the one "change" is the value).
    #[serde(default)]
    pub digest: Option<String>,
    /// The one "change" is the whole document (for a replica that held nothing).
    #[serde(default)]
    pub snapshot: bool,
}

/// This instance as the home of its resources.
pub struct Home {
    pub engine: Engine,
    pub identity: Identity,
    /// A member asks as itself (its libp2p connection proves who it is); the rules say
    /// what it may read.
    pub access: crate::access::Access,
}

impl Home {
    async fn answer(
        engine: Engine,
        identity: Identity,
        caller: crate::access::Caller,
        access: crate::access::Access,
        path: String,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        let req: PullRequest = serde_json::from_slice(&body).map_err(|e| format!("bad pull request: {e}"))?;
        let path = ResourcePath::new(path).map_err(|e| e.to_string())?;
        if path.as_str().starts_with("private") {
            return Err("private resources are their owner's only".into());
        }
        let key = ResourceKey::new(identity, path);
        if let Err(r) = access.check(&caller, &key, crate::access::Op::Read) {
            tracing::info!(caller = %caller.describe(), path = %r.path, "a member's fetch refused: {r}");
            return Err(r.to_string());
        }
        let have = req
            .have
            .iter()
            .map(|h| {
                h.parse::<automerge::ChangeHash>()
                    .map_err(|e| format!("bad head {h:?}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let wait = Duration::from_millis(req.wait_ms).min(MAX_WAIT);
        // Subscribe before looking, so a change between the look and the wait is not missed.
        let mut sub = if wait.is_zero() {
            None
        } else {
            Some(
                engine
                    .subscribe(&key, None, None)
                    .await
                    .map_err(|e| e.to_string())?,
            )
        };
        if let Some(s) = &mut sub {
            // The first delivery is the current state.
            let _ = tokio::time::timeout(Duration::from_secs(5), s.next()).await;
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let t = std::time::Instant::now();
            let export = engine
                .export(&key, have.clone())
                .await
                .map_err(|e| e.to_string())?;
            let n = export.as_ref().map_or(0, |e| e.changes.len());
            tracing::debug!(%key, changes = n, ms = t.elapsed().as_millis() as u64, "exported");
            // Bytes resources travel by value, compared by digest.
            let mut value = None;
            if let Some(e) = &export
                && e.kind == Kind::Bytes
            {
                let state = engine.read(&key).await.map_err(|e| e.to_string())?;
                value = Some((
                    state.body.clone(),
                    state.media_type.clone(),
                    state.digest().to_string(),
                ));
            }
            let news = match (&export, &value) {
                (_, Some((_, _, digest))) => req.digest.as_deref() != Some(digest.as_str()),
                (Some(e), None) => !e.changes.is_empty(),
                (None, _) => !have.is_empty() || req.digest.is_some(),
            };
            let waiting = sub
                .as_mut()
                .filter(|_| !news && tokio::time::Instant::now() < deadline);
            if let Some(s) = waiting
                && let Ok(Some(_)) = tokio::time::timeout_at(deadline, s.next()).await
            {
                continue;
            }
            if let Some((body, media_type, digest)) = value {
                let header = PullHeader {
                    exists: true,
                    kind: Some(Kind::Bytes),
                    media_type,
                    lens: vec![body.len()],
                    more: false,
                    digest: Some(digest),
                    snapshot: false,
                };
                let mut out = serde_json::to_vec(&header).expect("serializes");
                out.push(b'\n');
                out.extend_from_slice(&body);
                return Ok(out);
            }
            return Ok(encode_answer(export));
        }
    }
}

fn encode_answer(export: Option<crate::engine::Export>) -> Vec<u8> {
    let (header, changes) = match export {
        None => (
            PullHeader {
                exists: false,
                kind: None,
                media_type: String::new(),
                lens: Vec::new(),
                more: false,
                digest: None,
                snapshot: false,
            },
            Vec::new(),
        ),
        Some(crate::engine::Export {
            kind,
            media_type,
            snapshot: Some(doc),
            ..
        }) => (
            PullHeader {
                exists: true,
                kind: Some(kind),
                media_type,
                lens: vec![doc.len()],
                more: false,
                digest: None,
                snapshot: true,
            },
            vec![doc],
        ),
        Some(e) => {
            let mut size = 0;
            let mut taken = Vec::new();
            for c in &e.changes {
                if size + c.len() > MAX_ANSWER_BYTES && !taken.is_empty() {
                    break;
                }
                size += c.len();
                taken.push(c.clone());
            }
            let more = taken.len() < e.changes.len();
            (
                PullHeader {
                    exists: true,
                    kind: Some(e.kind),
                    media_type: e.media_type,
                    lens: taken.iter().map(Bytes::len).collect(),
                    more,
                    digest: None,
                    snapshot: false,
                },
                taken,
            )
        }
    };
    let mut out = serde_json::to_vec(&header).expect("serializes");
    out.push(b'\n');
    for c in changes {
        out.extend_from_slice(&c);
    }
    out
}

fn decode_answer(bytes: &[u8]) -> Result<(PullHeader, Vec<Bytes>), String> {
    let nl = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or("answer has no header")?;
    let header: PullHeader =
        serde_json::from_slice(&bytes[..nl]).map_err(|e| format!("bad answer header: {e}"))?;
    let mut rest = &bytes[nl + 1..];
    let mut changes = Vec::with_capacity(header.lens.len());
    for &n in &header.lens {
        if rest.len() < n {
            return Err("answer is shorter than its header says".into());
        }
        changes.push(Bytes::copy_from_slice(&rest[..n]));
        rest = &rest[n..];
    }
    Ok((header, changes))
}

impl Serve for Home {
    fn fetch(
        &self,
        from: Identity,
        path: String,
        body: Vec<u8>,
    ) -> futures::future::BoxFuture<'static, Result<Vec<u8>, String>> {
        // Only members hold a connection (the node's gate), so the asker is a member.
        let caller = self.access.identity(from, true);
        Box::pin(Home::answer(
            self.engine.clone(),
            self.identity,
            caller,
            self.access.clone(),
            path,
            body,
        ))
    }
}

/// How a replica stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// No fetch has finished yet.
    Syncing,
    /// In step with its home.
    Live,
    /// Its home cannot be reached: served as it was last synced.
    Offline,
}

impl ReplicaState {
    pub fn header(self) -> &'static str {
        match self {
            ReplicaState::Syncing => "syncing",
            ReplicaState::Live => "live",
            ReplicaState::Offline => "offline",
        }
    }
}

/// One replicated resource.
pub struct Replica {
    key: ResourceKey,
    state: watch::Sender<ReplicaState>,
    locals: AtomicUsize,
}

/// Keeps a replica live for as long as it lives (a subscription holds one).
pub struct Attached(Arc<Replica>);

impl Attached {
    pub fn state(&self) -> ReplicaState {
        *self.0.state.borrow()
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.0.locals.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Replicas of other members' resources.
pub struct Federation {
    engine: Engine,
    node: Node,
    replicas: Mutex<HashMap<ResourceKey, Weak<Replica>>>,
}

impl Federation {
    pub fn new(engine: Engine, node: Node) -> Federation {
        Federation {
            engine,
            node,
            replicas: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `key` lives on another member (and so is read from a replica here).
    pub fn is_remote(&self, key: &ResourceKey) -> bool {
        key.namespace != self.node.identity() && self.node.is_member(&key.namespace)
    }

    /// Attaches to the replica of `key`, starting its sync task if need be, and waits a
    /// little for its first fetch so the first read is not needlessly empty.
    pub async fn attach(self: &Arc<Self>, key: &ResourceKey) -> Attached {
        let replica = {
            let mut map = self.replicas.lock().expect("replicas");
            let r = match map.get(key).and_then(Weak::upgrade) {
                Some(r) => r,
                None => {
                    let (state, _) = watch::channel(ReplicaState::Syncing);
                    let r = Arc::new(Replica {
                        key: key.clone(),
                        state,
                        locals: AtomicUsize::new(0),
                    });
                    map.insert(key.clone(), Arc::downgrade(&r));
                    tokio::spawn(self.clone().keep_live(r.clone()));
                    r
                }
            };
            r.locals.fetch_add(1, Ordering::AcqRel);
            r
        };
        let mut rx = replica.state.subscribe();
        let _ = tokio::time::timeout(GET_SYNC_WAIT, rx.wait_for(|s| *s != ReplicaState::Syncing)).await;
        Attached(replica)
    }

    /// One fetch for a plain read: `Live` if the replica is now in step, else `Offline`.
    pub async fn sync_once(&self, key: &ResourceKey) -> ReplicaState {
        match tokio::time::timeout(GET_SYNC_WAIT, self.pull(key, Duration::ZERO)).await {
            Ok(Ok(_)) => ReplicaState::Live,
            Ok(Err(e)) => {
                tracing::info!(%key, error = %e, "serving the replica as it is");
                ReplicaState::Offline
            }
            Err(_) => ReplicaState::Offline,
        }
    }

    /// Fetches once from the home (waiting up to `wait` for news) and imports the answer;
    /// `true` if more is waiting at the home.
    async fn pull(&self, key: &ResourceKey, wait: Duration) -> Result<bool, String> {
        let have: Vec<String> = self
            .engine
            .heads(key)
            .await
            .map_err(|e| e.to_string())?
            .iter()
            .map(|h| h.to_string())
            .collect();
        let local = self.engine.read(key).await.map_err(|e| e.to_string())?;
        let digest = (local.kind == Some(Kind::Bytes)).then(|| local.digest().to_string());
        let req = PullRequest {
            have,
            wait_ms: wait.as_millis() as u64,
            digest,
        };
        let t = std::time::Instant::now();
        let answer = self
            .node
            .fetch(
                key.namespace,
                key.path.as_str().to_string(),
                serde_json::to_vec(&req).expect("serializes"),
            )
            .await
            .map_err(|e| e.to_string())?;
        let fetched_ms = t.elapsed().as_millis() as u64;
        let (header, changes) = decode_answer(&answer)?;
        let n = changes.len();
        match header.kind {
            Some(kind) if header.exists && header.snapshot && changes.len() == 1 => {
                let doc = changes.into_iter().next().expect("one document");
                let t = std::time::Instant::now();
                let took = self
                    .engine
                    .import_snapshot(
                        key,
                        kind,
                        header.media_type,
                        doc,
                        crate::engine::SnapshotLoad::Now,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                let import_ms = t.elapsed().as_millis() as u64;
                tracing::debug!(%key, bytes = answer.len(), fetched_ms, import_ms, took, "imported a snapshot");
                // Not taken (the replica was not empty after all): fetch changes at once.
                return Ok(!took);
            }
            Some(Kind::Bytes) if header.exists && changes.len() == 1 => {
                let write = crate::engine::Write::internal_value(
                    header.media_type,
                    changes.into_iter().next().expect("one value"),
                );
                self.engine.write(key, write).await.map_err(|e| e.to_string())?;
            }
            Some(kind) if header.exists && !changes.is_empty() => {
                let t = std::time::Instant::now();
                self.engine
                    .import(key, kind, header.media_type, changes)
                    .await
                    .map_err(|e| e.to_string())?;
                let import_ms = t.elapsed().as_millis() as u64;
                tracing::debug!(%key, changes = n, bytes = answer.len(), fetched_ms, import_ms, "imported");
            }
            _ => {}
        }
        Ok(header.more)
    }

    /// The sync task of one replica: long-polls the home while anyone is attached.
    async fn keep_live(self: Arc<Self>, r: Arc<Replica>) {
        let mut backoff = Duration::from_millis(200);
        let mut idle_since: Option<tokio::time::Instant> = None;
        let mut wait = Duration::ZERO;
        loop {
            if r.locals.load(Ordering::Acquire) == 0 {
                let since = *idle_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= REPLICA_GRACE {
                    let mut map = self.replicas.lock().expect("replicas");
                    if r.locals.load(Ordering::Acquire) == 0 {
                        map.remove(&r.key);
                        return;
                    }
                }
                // Nobody attached: no long poll, just a short pause.
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            idle_since = None;
            match self.pull(&r.key, wait).await {
                Ok(more) => {
                    backoff = Duration::from_millis(200);
                    r.state.send_replace(ReplicaState::Live);
                    wait = if more { Duration::ZERO } else { MAX_WAIT };
                }
                Err(e) => {
                    if *r.state.borrow() != ReplicaState::Offline {
                        tracing::info!(key = %r.key, error = %e, "replica's home unreachable; serving it as it is");
                    }
                    r.state.send_replace(ReplicaState::Offline);
                    wait = Duration::ZERO;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip_and_short_ones_are_refused() {
        let e = crate::engine::Export {
            kind: Kind::Text,
            media_type: "text/plain".into(),
            changes: vec![Bytes::from_static(b"abc"), Bytes::from_static(b"\n\nde")],
            snapshot: None,
            heads: Vec::new(),
        };
        let bytes = encode_answer(Some(e));
        let (h, c) = decode_answer(&bytes).unwrap();
        assert!(h.exists && !h.more);
        assert_eq!(c, vec![Bytes::from_static(b"abc"), Bytes::from_static(b"\n\nde")]);
        assert!(decode_answer(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_answer(b"garbage").is_err());
        let (h, c) = decode_answer(&encode_answer(None)).unwrap();
        assert!(!h.exists && c.is_empty());
    }
}
