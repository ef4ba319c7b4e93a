//! Live legacy routes: subscriptions to an upstream that does not speak Braid.
//!
//! One poller per upstream URL serves every local subscriber. It asks the upstream at the
//! route's interval with conditional requests (`If-None-Match`, `If-Modified-Since`), so an
//! unchanged resource costs a 304; each changed representation becomes a Braid update with a
//! new version (`<poller>-<n>`, parents the previous one). A 404 becomes a "missing" update.
//! The poller stops when nobody has subscribed for `proxy_subscription_grace_ms`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use tokio::sync::{broadcast, watch};

use super::Proxy;
use crate::braid::frame::encode_update;
use crate::http::error::ApiError;
use crate::model::{Version, VersionId};
use crate::update::{Update, UpdateBody};

/// Largest representation a poller reads.
const MAX_REPRESENTATION: usize = 16 << 20;

/// Why a live route cannot be subscribed to: status, code and reason for the answer.
type Refusal = (u16, &'static str, String);

/// The poller of one upstream URL.
pub struct Poller {
    url: Uri,
    /// The latest update (the current representation) and its media type.
    current: Mutex<Option<(Bytes, HeaderValue)>>,
    /// Whether the first poll worked (`Err` holds the refusal for waiting subscribers).
    ready: watch::Sender<Option<Result<(), Refusal>>>,
    tx: broadcast::Sender<Bytes>,
    locals: super::Locals,
}

impl super::Shared for Poller {
    fn locals(&self) -> &super::Locals {
        &self.locals
    }
}

type Local = super::Local<Poller>;

/// Serves a local subscription to a live route.
pub async fn subscribe(
    proxy: &Arc<Proxy>,
    url: Uri,
    interval: Duration,
    req: Request<Body>,
) -> Response<Body> {
    let local = {
        let mut map = proxy.pollers.lock().expect("pollers");
        let key = url.to_string();
        let p = match map.get(&key).and_then(std::sync::Weak::upgrade) {
            Some(p) => p,
            None => {
                let (ready, _) = watch::channel(None);
                let (tx, _) = broadcast::channel(256);
                let p = Arc::new(Poller {
                    url: url.clone(),
                    current: Mutex::new(None),
                    ready,
                    tx,
                    locals: super::Locals::default(),
                });
                map.insert(key.clone(), Arc::downgrade(&p));
                tokio::spawn(run(proxy.clone(), p.clone(), key, interval));
                p
            }
        };
        Local::join(p)
    };
    let p = local.0.clone();
    let mut ready = p.ready.subscribe();
    // The watch's read guard must not live across awaits.
    let outcome = {
        let waited =
            tokio::time::timeout(proxy.settings.response_timeout, ready.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(r)) => r.clone(),
            _ => None,
        }
    };
    match outcome {
        Some(Ok(())) => {}
        Some(Err((status, code, why))) => return ApiError::new(status, code, why).into_response(),
        None => {
            return ApiError::new(
                504,
                "upstream-timeout",
                "the live route's upstream did not answer in time",
            )
            .into_response();
        }
    }
    let (first, media_type, rx) = {
        let current = p.current.lock().expect("current");
        let (first, media_type) = current.clone().unzip();
        (first, media_type, p.tx.subscribe())
    };
    let shutdown = proxy.shutdown.clone();
    let body = futures::stream::unfold(
        (local, first, rx, shutdown),
        |(local, first, mut rx, shutdown)| async move {
            if let Some(b) = first {
                return Some((Ok::<_, std::io::Error>(b), (local, None, rx, shutdown)));
            }
            let b = tokio::select! {
                _ = shutdown.cancelled() => return None,
                r = rx.recv() => match r {
                    Ok(b) => b,
                    // Behind: the current representation says all there is to say.
                    Err(broadcast::error::RecvError::Lagged(_)) => local.0.current.lock().expect("current").clone()?.0,
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            };
            Some((Ok(b), (local, None, rx, shutdown)))
        },
    );
    let mut res = Response::new(Body::from_stream(body));
    *res.status_mut() = StatusCode::from_u16(209).expect("209");
    let h = res.headers_mut();
    h.insert(
        "subscribe",
        req.headers()
            .get("subscribe")
            .cloned()
            .unwrap_or(HeaderValue::from_static("true")),
    );
    h.insert(
        "cache-control",
        HeaderValue::from_static("no-cache, no-transform, no-store"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Some(m) = media_type {
        h.insert(http::header::CONTENT_TYPE, m);
    }
    res
}

/// Polls until nobody has subscribed for the grace period.
async fn run(proxy: Arc<Proxy>, p: Arc<Poller>, key: String, interval: Duration) {
    let agent = format!("poll{:08x}", rand::random::<u32>());
    let mut n = 0u64;
    let mut version = Version::root();
    let (mut etag, mut last_modified): (Option<HeaderValue>, Option<HeaderValue>) = (None, None);
    let mut last_body: Option<blake3::Hash> = None;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Since when nobody has subscribed (the grace period counts from there).
    let mut idle_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = p.locals.emptied() => {}
            _ = proxy.shutdown.cancelled() => return,
        }
        if p.locals.count() == 0 {
            let since = *idle_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() >= proxy.settings.grace {
                // Under the map's lock, so no new subscriber can join a poller that is leaving.
                let mut map = proxy.pollers.lock().expect("pollers");
                if p.locals.count() == 0 {
                    map.remove(&key);
                    return;
                }
            }
            continue;
        }
        idle_since = None;
        let mut req = Request::new(Body::empty());
        *req.uri_mut() = p.url.clone();
        if let Some(e) = &etag {
            req.headers_mut().insert(http::header::IF_NONE_MATCH, e.clone());
        }
        if let Some(m) = &last_modified {
            req.headers_mut()
                .insert(http::header::IF_MODIFIED_SINCE, m.clone());
        }
        let resp =
            match tokio::time::timeout(proxy.settings.response_timeout, proxy.client.request(req)).await {
                Ok(Ok(r)) => r,
                failed => {
                    tracing::debug!(url = %p.url, "live route poll failed");
                    if p.ready.borrow().is_none() {
                        let why = match failed {
                            Err(_) => (
                                504,
                                "upstream-timeout",
                                format!("{} did not answer in time", p.url),
                            ),
                            _ => (
                                502,
                                "upstream-unreachable",
                                format!("{} cannot be reached", p.url),
                            ),
                        };
                        p.ready.send_replace(Some(Err(why)));
                        proxy.pollers.lock().expect("pollers").remove(&key);
                        return;
                    }
                    continue;
                }
            };
        let status = resp.status();
        if status == StatusCode::NOT_MODIFIED {
            continue;
        }
        etag = resp.headers().get(http::header::ETAG).cloned();
        last_modified = resp.headers().get(http::header::LAST_MODIFIED).cloned();
        let media_type = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .cloned()
            .unwrap_or(HeaderValue::from_static("application/octet-stream"));
        let body = match http_body_util::Limited::new(resp.into_body(), MAX_REPRESENTATION)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => continue,
        };
        let (update_body, hash) = if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
            (UpdateBody::Missing, blake3::hash(b"\0missing"))
        } else if status.is_success() {
            let h = blake3::hash(&body);
            (UpdateBody::Snapshot(body), h)
        } else {
            // A server error says nothing about the resource: keep what subscribers have.
            if p.ready.borrow().is_none() {
                p.ready.send_replace(Some(Err((
                    502,
                    "upstream-failed",
                    format!("{} answered {status}", p.url),
                ))));
                proxy.pollers.lock().expect("pollers").remove(&key);
                return;
            }
            continue;
        };
        if last_body == Some(hash) {
            continue;
        }
        last_body = Some(hash);
        let parents = version.clone();
        version = Version::one(VersionId::new(agent.clone(), n).expect("poller agent is valid"));
        n += 1;
        let block = encode_update(&Update {
            version: version.clone(),
            parents,
            body: update_body,
            media_type: String::new(),
            digest: None,
        });
        *p.current.lock().expect("current") = Some((block.clone(), media_type));
        let _ = p.tx.send(block);
        if p.ready.borrow().is_none() {
            p.ready.send_replace(Some(Ok(())));
        }
    }
}
