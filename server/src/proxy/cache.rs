//! The Braid-aware caching proxy (braid-http-04 §6.2.3, "dynamic proxies and caches").
//!
//! The first local subscription to an upstream resource opens ONE upstream subscription;
//! every later local subscriber shares it. Plait keeps the upstream's updates since its
//! last snapshot, so a new local subscriber gets the current state at once (the snapshot
//! and the updates after it, exactly as the upstream framed them), then every update as it
//! comes. When the upstream drops, Plait reconnects with `Parents: <last version>` and the
//! upstream sends only what is missing: local subscribers see no gap. When the last local
//! subscriber leaves, the upstream subscription closes after `proxy_subscription_grace_ms`.
//!
//! An upstream that does not answer a subscription with 209 does not speak Braid: the local
//! request is then forwarded as a plain GET.
//!
//! Slow local subscribers read from a bounded broadcast queue; one that falls behind is sent
//! the cached state again (a snapshot and what follows), never slowing the others.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http::header::HeaderMap;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use tokio::sync::{broadcast, watch};

use super::{Proxy, Route, forward};
use crate::braid::format_version;
use crate::braid::frame::{Decoder, RawBlock, encode_update};
use crate::http::error::ApiError;
use crate::model::Version;
use crate::update::{Update, UpdateBody};

/// Updates a local subscriber may fall behind before it is sent the cached state again.
const LOCAL_QUEUE: usize = 1024;
/// Past this many cached blocks (or bytes), Plait asks the upstream for a fresh snapshot.
const CACHE_BLOCKS: usize = 256;
const CACHE_BYTES: usize = 4 << 20;

/// How the upstream answered the first subscription.
#[derive(Debug, Clone)]
enum Answer {
    /// 209: the headers of its answer.
    Braid(HeaderMap),
    /// Not 209: it does not speak Braid for this resource.
    NotBraid,
    /// It could not be reached, or did not answer in time.
    Failed(u16, &'static str, String),
}

/// The cached state: blocks since the last snapshot, each with the version it reaches.
#[derive(Default)]
struct Cache {
    blocks: Vec<Bytes>,
    versions: Vec<Option<Version>>,
    bytes: usize,
    last_version: Option<Version>,
}

impl Cache {
    fn push(&mut self, b: &RawBlock) -> Bytes {
        let framed = b.framed();
        if b.snapshot || b.status == Some(404) {
            self.blocks.clear();
            self.versions.clear();
            self.bytes = 0;
        }
        self.bytes += framed.len();
        self.blocks.push(framed.clone());
        self.versions.push(b.version.clone());
        if b.version.is_some() {
            self.last_version = b.version.clone();
        }
        framed
    }

    fn joined(&self) -> Bytes {
        self.joined_from(0)
    }

    fn joined_from(&self, start: usize) -> Bytes {
        let mut out = BytesMut::with_capacity(self.bytes);
        for b in &self.blocks[start.min(self.blocks.len())..] {
            out.extend_from_slice(b);
        }
        out.freeze()
    }

    /// What takes a client at `parents` to the cached state: the blocks after the one that
    /// reached `parents` (nothing if it is the last), or `None` when the cache does not
    /// hold that version.
    fn since(&self, parents: &Version) -> Option<Bytes> {
        let i = self.versions.iter().rposition(|v| v.as_ref() == Some(parents))?;
        Some(self.joined_from(i + 1))
    }
}

/// One shared upstream subscription.
pub struct Upstream {
    url: Uri,
    answer: watch::Sender<Option<Answer>>,
    cache: Mutex<Cache>,
    tx: broadcast::Sender<Bytes>,
    /// Local subscribers; joined only under the proxy's subscription map lock.
    locals: super::Locals,
}

impl super::Shared for Upstream {
    fn locals(&self) -> &super::Locals {
        &self.locals
    }
}

type Local = super::Local<Upstream>;

/// Serves a local subscription to `url` through the shared upstream subscription.
pub async fn subscribe(
    proxy: &Arc<Proxy>,
    route: &Route,
    url: Uri,
    req: Request<Body>,
    from: crate::http::forwarded::Remote,
) -> Response<Body> {
    let local = {
        let mut map = proxy.subscriptions.lock().expect("subscriptions");
        let key = url.to_string();
        let up = match map.get(&key).and_then(std::sync::Weak::upgrade) {
            Some(up) => up,
            None => {
                let (answer, _) = watch::channel(None);
                let (tx, _) = broadcast::channel(LOCAL_QUEUE);
                let up = Arc::new(Upstream {
                    url: url.clone(),
                    answer,
                    cache: Mutex::new(Cache::default()),
                    tx,
                    locals: super::Locals::default(),
                });
                map.insert(key.clone(), Arc::downgrade(&up));
                let accept = req.headers().get(http::header::ACCEPT).cloned();
                tokio::spawn(run(proxy.clone(), route.clone(), up.clone(), key, accept));
                up
            }
        };
        Local::join(up)
    };
    let up = local.0.clone();
    let mut answers = up.answer.subscribe();
    // The watch's read guard must not live across the awaits below.
    let answer = {
        let waited =
            tokio::time::timeout(proxy.settings.response_timeout, answers.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(a)) => a.clone(),
            _ => None,
        }
    };
    let Some(answer) = answer else {
        return forward::timeout_error(route, proxy.settings.response_timeout).into_response();
    };
    let head = match answer {
        Answer::Braid(h) => h,
        Answer::NotBraid => {
            drop(local);
            return forward::forward(proxy, route, req, from).await;
        }
        Answer::Failed(status, code, why) => return ApiError::new(status, code, why).into_response(),
    };
    // A client resuming from `Parents` gets what it lacks from the cache; when the cache
    // does not hold its version, it gets its own upstream request, which can answer it.
    let braid = crate::braid::headers::BraidHeaders::parse(req.headers()).ok();
    let parents = braid.as_ref().and_then(|b| b.parents.clone());
    let heartbeats = braid.as_ref().and_then(|b| b.heartbeats);
    // Subscribe to the queue and read the cache under one lock: nothing falls between.
    let (initial, rx) = {
        let cache = up.cache.lock().expect("cache");
        let initial = match &parents {
            None => Some(cache.joined()),
            Some(p) => cache.since(p),
        };
        (initial, up.tx.subscribe())
    };
    let Some(initial) = initial else {
        drop(local);
        return forward::forward(proxy, route, req, from).await;
    };
    let body = stream(local, initial, rx, heartbeats, proxy.shutdown.clone());
    let mut res = Response::new(Body::from_stream(body));
    *res.status_mut() = StatusCode::from_u16(209).expect("209");
    let h = res.headers_mut();
    for (k, v) in forward::end_to_end(&head, false) {
        if let Some(k) = k
            && k != http::header::CONTENT_LENGTH
        {
            h.append(k, v);
        }
    }
    let echo = req
        .headers()
        .get("subscribe")
        .cloned()
        .unwrap_or(HeaderValue::from_static("true"));
    h.insert("subscribe", echo);
    h.insert(
        "cache-control",
        HeaderValue::from_static("no-cache, no-transform, no-store"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    // Heartbeats are between Plait and this client (the upstream's are Plait's own).
    h.remove("heartbeats");
    if let Some(hb) = heartbeats
        && let Ok(v) = HeaderValue::from_str(&format!("{}s", hb.as_secs_f64()))
    {
        h.insert("heartbeats", v);
    }
    res
}

/// A local subscriber's body: the cached state, then each update, and blank-line
/// heartbeats at the rate the client asked for.
fn stream(
    local: Local,
    initial: Bytes,
    rx: broadcast::Receiver<Bytes>,
    heartbeats: Option<Duration>,
    shutdown: tokio_util::sync::CancellationToken,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    struct St {
        local: Local,
        first: Option<Bytes>,
        rx: broadcast::Receiver<Bytes>,
        beat: Option<tokio::time::Interval>,
        shutdown: tokio_util::sync::CancellationToken,
    }
    let beat = heartbeats.map(crate::braid::headers::heartbeat_timer);
    let first = (!initial.is_empty()).then_some(initial);
    let st = St {
        local,
        first,
        rx,
        beat,
        shutdown,
    };
    futures::stream::unfold(st, |mut st| async move {
        if let Some(b) = st.first.take() {
            return Some((Ok(b), st));
        }
        let b = tokio::select! {
            _ = st.shutdown.cancelled() => return None,
            _ = async { st.beat.as_mut().expect("guarded").tick().await }, if st.beat.is_some() => {
                Bytes::from_static(crate::braid::frame::HEARTBEAT)
            }
            r = st.rx.recv() => match r {
                Ok(b) => b,
                // Fell behind: start again from the cached snapshot.
                Err(broadcast::error::RecvError::Lagged(_)) => st.local.0.cache.lock().expect("cache").joined(),
                Err(broadcast::error::RecvError::Closed) => return None,
            },
        };
        Some((Ok(b), st))
    })
}

/// Waits until there has been no local subscriber for `grace`.
async fn idle_for(up: &Upstream, grace: Duration) {
    loop {
        if up.locals.count() == 0 {
            tokio::time::sleep(grace).await;
            if up.locals.count() == 0 {
                return;
            }
        } else {
            up.locals.emptied().await;
        }
    }
}

/// A future that completes once nobody has subscribed locally for the grace period; it
/// lives across reconnections and frames, so a steady stream of updates cannot keep
/// postponing it.
type Idle<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// Keeps the upstream subscription open while anyone subscribes locally.
async fn run(proxy: Arc<Proxy>, route: Route, up: Arc<Upstream>, key: String, accept: Option<HeaderValue>) {
    let mut failures = 0u32;
    let mut answered = false;
    let mut idle: Idle<'_> = Box::pin(idle_for(&up, proxy.settings.grace));
    loop {
        let parents = up.cache.lock().expect("cache").last_version.clone();
        let mut req = Request::new(Body::empty());
        *req.uri_mut() = up.url.clone();
        let h = req.headers_mut();
        h.insert("subscribe", HeaderValue::from_static("true"));
        h.insert("heartbeats", HeaderValue::from_static("30s"));
        if let Some(a) = &accept {
            h.insert(http::header::ACCEPT, a.clone());
        }
        if let Some(p) = &parents
            && let Ok(v) = HeaderValue::from_str(&format_version(p))
        {
            h.insert("parents", v);
        }
        let sent = tokio::time::timeout(proxy.settings.response_timeout, proxy.client.request(req)).await;
        match sent {
            Ok(Ok(resp)) if resp.status().as_u16() == 209 => {
                failures = 0;
                if !answered {
                    answered = true;
                    up.answer
                        .send_replace(Some(Answer::Braid(resp.headers().clone())));
                }
                tracing::debug!(url = %up.url, resumed = parents.is_some(), "upstream subscription open");
                if relay(&proxy, &up, resp, &mut idle).await {
                    break;
                }
            }
            Ok(Ok(resp)) => {
                if !answered {
                    up.answer.send_replace(Some(Answer::NotBraid));
                    break;
                }
                // The upstream no longer knows our version (it lost data, or it is another
                // server now): start over from its current state.
                tracing::warn!(url = %up.url, status = %resp.status(), "upstream refused to resume; starting over");
                up.cache.lock().expect("cache").last_version = None;
            }
            Ok(Err(e)) if !answered => {
                let err = forward::upstream_error(&route, &e);
                up.answer
                    .send_replace(Some(Answer::Failed(err.status.as_u16(), err.code, err.reason)));
                break;
            }
            Err(_) if !answered => {
                let err = forward::timeout_error(&route, proxy.settings.response_timeout);
                up.answer
                    .send_replace(Some(Answer::Failed(err.status.as_u16(), err.code, err.reason)));
                break;
            }
            _ => {}
        }
        // Reconnect with back-off, unless everyone has gone.
        failures += 1;
        let backoff = Duration::from_millis((100u64 << failures.min(6)).min(5_000));
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = &mut idle => {
                let map = proxy.subscriptions.lock().expect("subscriptions");
                if up.locals.count() == 0 {
                    drop(map);
                    break;
                }
                drop(map);
                idle = Box::pin(idle_for(&up, proxy.settings.grace));
            }
            _ = proxy.shutdown.cancelled() => break,
        }
        if proxy.shutdown.is_cancelled() {
            break;
        }
    }
    let mut map = proxy.subscriptions.lock().expect("subscriptions");
    if map.get(&key).is_some_and(|w| w.as_ptr() == Arc::as_ptr(&up)) {
        map.remove(&key);
    }
    // Local subscribers still attached end with the queue.
    drop(map);
}

/// Relays one upstream subscription until it ends; `true` when it should not be reopened
/// (nobody subscribes any more, or the server is shutting down).
async fn relay<'a>(
    proxy: &Arc<Proxy>,
    up: &'a Arc<Upstream>,
    resp: Response<hyper::body::Incoming>,
    idle: &mut Idle<'a>,
) -> bool {
    let mut body = resp.into_body();
    let mut decoder = Decoder::default();
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = &mut *idle => {
                // Close only if still nobody, checked under the map lock new subscribers take.
                let map = proxy.subscriptions.lock().expect("subscriptions");
                if up.locals.count() == 0 {
                    drop(map);
                    tracing::debug!(url = %up.url, "no local subscribers; closing the upstream subscription");
                    return true;
                }
                drop(map);
                *idle = Box::pin(idle_for(up, proxy.settings.grace));
                continue;
            }
            _ = proxy.shutdown.cancelled() => return true,
        };
        let data = match frame {
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
            Some(Err(e)) => {
                tracing::info!(url = %up.url, error = %e, "upstream subscription dropped; resuming");
                return false;
            }
            None => {
                tracing::info!(url = %up.url, "upstream subscription ended; resuming");
                return false;
            }
        };
        decoder.push(&data);
        loop {
            match decoder.next_block() {
                Ok(Some(block)) => {
                    let (framed, refresh) = {
                        let mut cache = up.cache.lock().expect("cache");
                        let framed = cache.push(&block);
                        (
                            framed,
                            cache.blocks.len() > CACHE_BLOCKS || cache.bytes > CACHE_BYTES,
                        )
                    };
                    let _ = up.tx.send(framed);
                    if refresh {
                        refresh_snapshot(proxy, up).await;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(url = %up.url, error = %e, "unreadable upstream update; resuming");
                    return false;
                }
            }
        }
    }
}

/// Replaces a long cache with a snapshot of the current state, if the upstream's plain GET
/// is at the version last streamed (otherwise it tries again later).
async fn refresh_snapshot(proxy: &Arc<Proxy>, up: &Arc<Upstream>) {
    let mut req = Request::new(Body::empty());
    *req.uri_mut() = up.url.clone();
    let Ok(Ok(resp)) = tokio::time::timeout(proxy.settings.response_timeout, proxy.client.request(req)).await
    else {
        return;
    };
    if resp.status() != StatusCode::OK {
        return;
    }
    let version = resp
        .headers()
        .get("version")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| crate::braid::parse_version(v).ok());
    let media_type = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let Ok(body) = http_body_util::Limited::new(resp.into_body(), CACHE_BYTES)
        .collect()
        .await
    else {
        return;
    };
    let mut cache = up.cache.lock().expect("cache");
    if version.is_none() || version != cache.last_version {
        return;
    }
    let update = Update {
        version: version.clone().expect("checked"),
        parents: Version::root(),
        body: UpdateBody::Snapshot(body.to_bytes()),
        media_type,
        digest: None,
    };
    let block = encode_update(&update);
    cache.blocks = vec![block.clone()];
    cache.versions = vec![Some(update.version.clone())];
    cache.bytes = block.len();
}
