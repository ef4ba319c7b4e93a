//! What a mirror keeps for others, over Braid-HTTP: `/.well-known/plait/mirror/<id>/…`.
//!
//! * `GET …/<id>` — where the chain stands: `{"namespace", "head", "checkpoint"}`
//!   (`head`: the last sequence held; `checkpoint`: the `upto` of the checkpoint held, or
//!   `null`).
//! * `GET …/<id>/segments?from=N` — the descriptors held from sequence N (default 1), at
//!   most `mirror.http_max_descriptors`, as JSON (`seq`, `prev`, `hash`, `len`, `at_ms`,
//!   and `descriptor`: the signed 188 bytes, base64url). With `Subscribe: true`, a `209`
//!   stream of one update per descriptor (`Version: "seg-N"`, `Parents: "seg-(N-1)"`, the
//!   same JSON as body), from after the request's `Parents` (`"seg-N"`; none: from the
//!   start), and then each one as the mirror stores it; with `Heartbeats`, a blank line
//!   when nothing else was sent for that long.
//! * `GET …/<id>/segments/<N>` — segment N's ciphertext (`application/octet-stream`),
//!   with its descriptor in `Plait-Descriptor` (base64url).
//! * `GET …/<id>/checkpoint` — the sealed snapshot, with the signed checkpoint in
//!   `Plait-Checkpoint` (base64url).
//!
//! The mirror's own namespace lives at `/`, and other members' replicas at `/~<id>/…`:
//! a mirrored namespace is neither (its segments are not resources), so it has a path of
//! its own. Who may read is the access layer's ([`Access::check_mirror_read`]); a
//! subscription asks again before each update, so a member removed meanwhile gets no
//! more. Knows nothing of what segments hold, or how they are stored.
//!
//! [`Access::check_mirror_read`]: crate::access::Access::check_mirror_read

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::response::IntoResponse as _;
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri};
use plait_bridge::Identity;
use plait_bridge::mirror::Descriptor;
use serde::Deserialize;

use super::App;
use super::error::ApiError;
use crate::access::Caller;
use crate::braid::{BraidHeaders, frame};
use crate::mirror::keeper::Keeper;
use crate::model::{Version, VersionId};
use crate::update::{Update, UpdateBody};

/// The agent of a mirrored chain's Braid versions: segment N is `seg-N`.
const AGENT: &str = "seg";

pub fn routes() -> Router<App> {
    Router::new()
        .route("/.well-known/plait/mirror/{id}", get(summary))
        .route("/.well-known/plait/mirror/{id}/segments", get(segments))
        .route("/.well-known/plait/mirror/{id}/segments/{seq}", get(segment))
        .route("/.well-known/plait/mirror/{id}/checkpoint", get(checkpoint))
}

/// The caller, the namespace and the keeper of a request the access layer lets read.
async fn admit(
    app: &App,
    id: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(Caller, Identity, Arc<Keeper>), ApiError> {
    let namespace: Identity = id
        .parse()
        .map_err(|e| ApiError::bad_request(format!("{id:?} is not an identity: {e}")))?;
    let auth = super::resource::authenticate(app, method, uri, headers).await?;
    app.access.check_mirror_read(&auth.caller, &namespace)?;
    let keeper = app
        .p2p
        .as_ref()
        .and_then(|p| p.keeper())
        .ok_or_else(|| ApiError::not_found("this server keeps no mirror (its p2p node is off)"))?;
    Ok((auth.caller, namespace, keeper.clone()))
}

fn descriptor_json(d: &Descriptor) -> serde_json::Value {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    serde_json::json!({
        "seq": d.seq,
        "prev": hex(&d.prev),
        "hash": hex(&d.hash),
        "len": d.len,
        "at_ms": d.at_ms,
        "descriptor": URL_SAFE_NO_PAD.encode(d.to_bytes()),
    })
}

fn version(seq: u64) -> Version {
    if seq == 0 {
        return Version::root();
    }
    VersionId::new(AGENT, seq).map_or_else(|_| Version::root(), Version::one)
}

/// The sequence a `Parents` names (`seg-N`), or a 400.
fn parents_seq(parents: &Version) -> Result<u64, ApiError> {
    match parents.ids() {
        [] => Ok(0),
        [v] if v.agent() == AGENT => Ok(v.seq()),
        _ => Err(ApiError::bad_request(format!(
            "a mirrored chain's versions are \"{AGENT}-N\" (one of them), not {parents:?}"
        ))),
    }
}

fn json_response(v: serde_json::Value) -> Response<Body> {
    let mut res = axum::Json(v).into_response();
    res.headers_mut()
        .insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

async fn summary(
    State(app): State<App>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response<Body> {
    let run = async {
        let (_, ns, keeper) = admit(&app, &id, &method, &uri, &headers).await?;
        let head = keeper.head(&ns).await?;
        let ck = keeper.checkpoint_upto(&ns).await?;
        Ok::<_, ApiError>(json_response(serde_json::json!({
            "namespace": ns,
            "head": head.seq,
            "checkpoint": ck,
        })))
    };
    run.await.unwrap_or_else(|e| e.into_response())
}

#[derive(Deserialize)]
struct From {
    from: Option<u64>,
}

async fn segments(
    State(app): State<App>,
    Path(id): Path<String>,
    Query(q): Query<From>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response<Body> {
    let run = async {
        let braid = BraidHeaders::parse(&headers)?;
        let (caller, ns, keeper) = admit(&app, &id, &method, &uri, &headers).await?;
        let limit = app.mirror.http_max_descriptors;
        let Some(subscribe) = braid.subscribe else {
            let from = q.from.unwrap_or(1).max(1);
            let list = keeper.descriptors(&ns, from, limit).await?;
            let head = keeper.head(&ns).await?;
            return Ok(json_response(serde_json::json!({
                "namespace": ns,
                "head": head.seq,
                "descriptors": list.iter().map(descriptor_json).collect::<Vec<_>>(),
            })));
        };
        let after = match &braid.parents {
            Some(p) => parents_seq(p)?,
            None => q.from.unwrap_or(1).saturating_sub(1),
        };
        let mut grown = keeper.follow();
        grown.mark_changed();
        let beat = braid.heartbeats.map(crate::braid::headers::heartbeat_timer);
        let follow = Follow {
            app,
            caller,
            ns,
            keeper,
            sent: after,
            limit,
            grown,
            beat,
        };
        let stream = futures::stream::unfold(follow, |mut f| async move {
            let b = f.next().await?;
            Some((Ok::<_, std::io::Error>(b), f))
        });
        let mut res = Response::new(Body::from_stream(stream));
        *res.status_mut() = StatusCode::from_u16(209).expect("209");
        let h = res.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&subscribe) {
            h.insert("subscribe", v);
        }
        if let Some(hb) = braid.heartbeats
            && let Ok(v) = HeaderValue::from_str(&crate::braid::headers::format_heartbeats(hb))
        {
            h.insert("heartbeats", v);
        }
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store, no-transform"),
        );
        Ok::<_, ApiError>(res)
    };
    run.await.unwrap_or_else(|e| e.into_response())
}

/// A subscription to one mirrored chain.
struct Follow {
    app: App,
    caller: Caller,
    ns: Identity,
    keeper: Arc<Keeper>,
    /// The last sequence sent (or the subscriber's `Parents`).
    sent: u64,
    limit: usize,
    /// Wakes when a chain held here grows.
    grown: tokio::sync::watch::Receiver<u64>,
    /// The subscriber's `Heartbeats`: a blank line when nothing else was sent for that
    /// long (proxies and clients then know the stream is alive).
    beat: Option<tokio::time::Interval>,
}

impl Follow {
    /// The next chunk of update blocks; `None` ends the subscription.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            tokio::select! {
                _ = self.app.shutdown.cancelled() => return None,
                r = self.grown.changed() => r.ok()?,
                _ = async { self.beat.as_mut().expect("guarded").tick().await }, if self.beat.is_some() => {
                    return Some(Bytes::from_static(frame::HEARTBEAT));
                }
            }
            let list = self
                .keeper
                .descriptors(&self.ns, self.sent + 1, self.limit)
                .await
                .ok()?;
            if list.is_empty() {
                continue;
            }
            // Asked again before each batch: a member removed meanwhile reads no more.
            self.still_allowed()?;
            if list.len() == self.limit {
                // More may be waiting: look again without waiting for a push.
                self.grown.mark_changed();
            }
            let mut out = Vec::new();
            for d in &list {
                let body = serde_json::to_vec(&descriptor_json(d)).ok()?;
                out.extend_from_slice(&frame::encode_update(&Update {
                    version: version(d.seq),
                    parents: version(d.seq - 1),
                    body: UpdateBody::Snapshot(Bytes::from(body)),
                    media_type: "application/json".into(),
                    digest: None,
                }));
                self.sent = d.seq;
            }
            if let Some(b) = self.beat.as_mut() {
                // Something was sent: the next heartbeat is a whole interval away.
                b.reset();
            }
            return Some(Bytes::from(out));
        }
    }

    fn still_allowed(&self) -> Option<()> {
        let caller = match &self.caller {
            Caller::Identity { id, .. } => {
                let member = self.app.p2p.as_ref().is_some_and(|p| p.node.is_member(id));
                self.app.access.identity(*id, member)
            }
            c => c.clone(),
        };
        self.app.access.check_mirror_read(&caller, &self.ns).ok()
    }
}

fn octets(body: Vec<u8>, header: &'static str, signed: &[u8]) -> Response<Body> {
    let mut res = Response::new(Body::from(body));
    let h = res.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&URL_SAFE_NO_PAD.encode(signed)) {
        h.insert(header, v);
    }
    res
}

async fn segment(
    State(app): State<App>,
    Path((id, seq)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response<Body> {
    let run = async {
        let (_, ns, keeper) = admit(&app, &id, &method, &uri, &headers).await?;
        let n: u64 = seq
            .parse()
            .map_err(|_| ApiError::bad_request(format!("{seq:?} is not a sequence number")))?;
        let s = keeper
            .segment(&ns, n)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("this mirror holds no segment {n} of {ns}")))?;
        Ok::<_, ApiError>(octets(s.ciphertext, "plait-descriptor", &s.descriptor.to_bytes()))
    };
    run.await.unwrap_or_else(|e| e.into_response())
}

async fn checkpoint(
    State(app): State<App>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response<Body> {
    let run = async {
        let (_, ns, keeper) = admit(&app, &id, &method, &uri, &headers).await?;
        let c = keeper
            .get_checkpoint(&ns)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("this mirror holds no checkpoint of {ns}")))?;
        Ok::<_, ApiError>(octets(c.snapshot, "plait-checkpoint", &c.checkpoint.to_bytes()))
    };
    run.await.unwrap_or_else(|e| e.into_response())
}
