//! Braid multiplexing: many responses over one long-lived stream, as braid-http's
//! browser client (1.3.80 and 1.4.x) and its `braidify` server speak it
//! (`Multiplex-Version: 1.0`).
//!
//! A page opens a *multiplexer* with `POST /.well-known/multiplexer/<mux>` (or the older
//! `MULTIPLEX /<mux>`): a `200` whose body stays open. Each later request names it in
//! `Multiplex-Through: /.well-known/multiplexer/<mux>/<request>`; it is answered `293
//! Responded via multiplexer` at once, and its real response — status line, headers and
//! body, exactly as the route made it — is written into the multiplexer's stream:
//!
//! ```text
//! start response <request>\r\n
//! <N> bytes for response <request>\r\n<N bytes>      (the head, then each body chunk)
//! close response <request>\r\n                        (the body ended)
//! ```
//!
//! `DELETE /.well-known/multiplexer/<mux>/<request>` cancels a request (its response
//! ends, no `close` is written). A request naming an unknown multiplexer gets `424`
//! (after waiting `limits.multiplexer_wait_ms` for a `POST` still on its way), a request
//! id already open in it `409`; the client then makes a new multiplexer or id. When the
//! multiplexer's stream ends (the client went away, the server shuts down) every request
//! through it ends; after a restart the ids are unknown (`424`), and the client makes a
//! new one. A request without `Multiplex-Version: 1.0` is served as a plain request.
//!
//! This is a layer around the whole router: a multiplexed request goes through the same
//! routes as a plain one (same authentication by its own headers and cookies, access
//! checks and limits); only where its response's bytes go changes. A refusal is written
//! through the multiplexer too, so a client sees the same status either way.
//!
//! Ownership: a multiplexer carries no credential (the client opens it without the
//! application's headers) and every request through it is authenticated on its own. It
//! is bound to the client address that opened it (`Peer`, which believes only trusted
//! proxies): a request or a cancellation from another address is answered as if the
//! multiplexer did not exist. Its id (72 random bits from the client) is known only to
//! that client, so another client at the same address cannot find it either.
//!
//! Limits: `limits.max_multiplexers_per_address` multiplexers open per client address
//! (`429` past it: the client falls back to plain requests) and
//! `limits.max_requests_per_multiplexer` requests open through one (`429` with
//! `Retry-After`, written through the multiplexer, past it).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::middleware::Next;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use super::{App, Peer};
use crate::address::AddressKey;
use crate::config::Limits;

/// The protocol version this server speaks (`Multiplex-Version`).
pub const VERSION: &str = "1.0";
/// Where multiplexers live.
pub const PREFIX: &str = "/.well-known/multiplexer/";
/// The method braid-http 1.3 tries before `POST` (`MULTIPLEX /<mux>`).
pub const METHOD: &str = "MULTIPLEX";
/// Longest multiplexer or request id accepted.
const MAX_ID_LEN: usize = 64;
/// Frames queued for one multiplexer's stream before its requests wait for the client
/// to read (their subscriptions then fall behind and are coalesced, as plain ones are).
const QUEUE_FRAMES: usize = 64;
/// Headers a page may read on this module's responses.
const EXPOSE: &str = "Multiplex-Version, Multiplex-Through, Bad-Multiplexer, Bad-Request, Plait-Error";
/// `Retry-After` of a request refused because its multiplexer is full.
const RETRY_AFTER_SECS: u64 = 1;

/// What a client can get wrong about multiplexing; `http::error` gives each its status.
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    #[error("Multiplex-Version must be {VERSION}")]
    BadVersion,
    #[error(
        "malformed multiplexer path {0:?}: /.well-known/multiplexer/<mux>[/<request>], ids of [A-Za-z0-9_-]"
    )]
    BadPath(String),
    #[error("Cannot create duplicate multiplexer with ID '{0}'")]
    DuplicateMultiplexer(String),
    #[error("Cannot multiplex request with duplicate ID '{request}' for multiplexer '{mux}'")]
    DuplicateRequest { mux: String, request: String },
    /// A request names a multiplexer that is not open (`424`).
    #[error("multiplexer {0} does not exist")]
    NotOpen(String),
    /// A cancellation names a multiplexer that is not open (`404`, `Bad-Multiplexer`).
    #[error("multiplexer {0} does not exist")]
    NoMultiplexer(String),
    /// A cancellation names a request that is not open (`404`, `Bad-Request`).
    #[error("request {0} does not exist")]
    NoRequest(String),
    #[error("{0} multiplexers are open from this address (limits.max_multiplexers_per_address)")]
    TooManyMultiplexers(usize),
    #[error("{0} requests are open through this multiplexer (limits.max_requests_per_multiplexer)")]
    Full(usize),
    #[error("allowed methods: POST (open), DELETE (cancel a request), OPTIONS")]
    Method,
}

impl MuxError {
    /// `Retry-After` for the refusals a client may retry.
    pub fn retry_after(&self) -> Option<u64> {
        matches!(self, MuxError::Full(_) | MuxError::TooManyMultiplexers(_)).then_some(RETRY_AFTER_SECS)
    }
}

/// The open multiplexers of this server.
pub struct Multiplexers {
    max_requests: usize,
    max_per_address: usize,
    wait: Duration,
    open: Mutex<Open>,
    /// Woken whenever a multiplexer opens, for requests that raced ahead of it.
    opened: tokio::sync::Notify,
}

#[derive(Default)]
struct Open {
    by_id: HashMap<String, Arc<Mux>>,
    per_address: HashMap<AddressKey, usize>,
}

/// One open multiplexer.
struct Mux {
    id: String,
    /// The client address that opened it: the only one that may use it.
    owner: IpAddr,
    frames: mpsc::Sender<Bytes>,
    /// Open requests by id, each with a serial (so a finished request never removes a
    /// later one of the same id) and the token that cancels it.
    requests: Mutex<HashMap<String, (u64, CancellationToken)>>,
    serial: std::sync::atomic::AtomicU64,
    /// Cancelled when the stream ends: every request through it ends.
    closed: CancellationToken,
}

impl Multiplexers {
    pub fn new(limits: &Limits) -> Self {
        Multiplexers {
            max_requests: limits.max_requests_per_multiplexer,
            max_per_address: limits.max_multiplexers_per_address,
            wait: Duration::from_millis(limits.multiplexer_wait_ms),
            open: Mutex::default(),
            opened: tokio::sync::Notify::new(),
        }
    }

    /// Multiplexers open now.
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open(&self, owner: IpAddr, id: &str) -> Result<(Arc<Mux>, mpsc::Receiver<Bytes>), MuxError> {
        let mut open = self.lock();
        if open.by_id.contains_key(id) {
            return Err(MuxError::DuplicateMultiplexer(id.to_string()));
        }
        let n = open.per_address.entry(AddressKey::of(owner)).or_default();
        if *n >= self.max_per_address {
            return Err(MuxError::TooManyMultiplexers(self.max_per_address));
        }
        *n += 1;
        let (frames, rx) = mpsc::channel(QUEUE_FRAMES);
        let mux = Arc::new(Mux {
            id: id.to_string(),
            owner,
            frames,
            requests: Mutex::default(),
            serial: std::sync::atomic::AtomicU64::new(0),
            closed: CancellationToken::new(),
        });
        open.by_id.insert(id.to_string(), mux.clone());
        drop(open);
        self.opened.notify_waiters();
        Ok((mux, rx))
    }

    fn close(&self, mux: &Arc<Mux>) {
        mux.closed.cancel();
        let mut open = self.lock();
        if open.by_id.get(&mux.id).is_some_and(|m| Arc::ptr_eq(m, mux)) {
            open.by_id.remove(&mux.id);
            if let Some(n) = open.per_address.get_mut(&AddressKey::of(mux.owner)) {
                *n -= 1;
                if *n == 0 {
                    open.per_address.remove(&AddressKey::of(mux.owner));
                }
            }
        }
    }

    /// The multiplexer `id` if `owner` opened it.
    fn find(&self, owner: IpAddr, id: &str) -> Option<Arc<Mux>> {
        self.lock().by_id.get(id).filter(|m| m.owner == owner).cloned()
    }

    /// Like [`Self::find`], waiting up to `limits.multiplexer_wait_ms` for a multiplexer
    /// whose `POST` has not arrived yet (the client sends its first request at once).
    async fn find_waiting(&self, owner: IpAddr, id: &str) -> Option<Arc<Mux>> {
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            let opened = self.opened.notified();
            tokio::pin!(opened);
            opened.as_mut().enable();
            if let Some(m) = self.find(owner, id) {
                return Some(m);
            }
            tokio::select! {
                _ = opened => {}
                _ = tokio::time::sleep_until(deadline) => return self.find(owner, id),
            }
        }
    }
}

impl Mux {
    /// Registers request `id`: its serial and cancel token, or 409 if it is open.
    fn begin(&self, id: &str) -> Result<(u64, CancellationToken), MuxError> {
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        if requests.contains_key(id) {
            return Err(MuxError::DuplicateRequest {
                mux: self.id.clone(),
                request: id.to_string(),
            });
        }
        let serial = self.serial.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = self.closed.child_token();
        requests.insert(id.to_string(), (serial, token.clone()));
        Ok((serial, token))
    }

    fn open_requests(&self) -> usize {
        self.requests.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Removes request `id` if it is still registration `serial`.
    fn end(&self, id: &str, serial: u64) {
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        if requests.get(id).is_some_and(|(s, _)| *s == serial) {
            requests.remove(id);
        }
    }

    /// Cancels request `id` (a client's `DELETE`).
    fn cancel(&self, id: &str) -> Result<(), MuxError> {
        let removed = self.requests.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        match removed {
            Some((_, token)) => {
                token.cancel();
                Ok(())
            }
            None => Err(MuxError::NoRequest(id.to_string())),
        }
    }

    /// Queues one frame; false once the request or the multiplexer is gone.
    async fn send(&self, frame: Bytes, cancel: &CancellationToken) -> bool {
        tokio::select! {
            r = self.frames.send(frame) => r.is_ok(),
            _ = cancel.cancelled() => false,
        }
    }
}

/// An id as braid-http makes them (base64url) and parses them back (`[A-Za-z0-9_-]+`).
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `<mux>` or `<mux>/<request>` after [`PREFIX`].
fn parse_ids(rest: &str) -> Result<(&str, Option<&str>), MuxError> {
    let bad = || MuxError::BadPath(rest.to_string());
    let (mux, request) = match rest.split_once('/') {
        Some((m, r)) => (m, Some(r)),
        None => (rest, None),
    };
    if !valid_id(mux) || request.is_some_and(|r| !valid_id(r)) {
        return Err(bad());
    }
    Ok((mux, request))
}

fn version_ok(h: &HeaderMap) -> bool {
    h.get("multiplex-version")
        .is_some_and(|v| v.as_bytes() == VERSION.as_bytes())
}

fn client(req: &Request<Body>) -> IpAddr {
    req.extensions()
        .get::<Peer>()
        .map_or(IpAddr::from([127, 0, 0, 1]), |p| p.0.ip())
}

/// Headers every response of this module carries: CORS for pages on other origins (as
/// resources have), and `Multiplex-Version`.
fn common_headers(h: &mut HeaderMap, app: &App, origin: Option<&HeaderValue>) {
    super::resource::allow_origin(h, app, origin);
    h.insert("access-control-expose-headers", HeaderValue::from_static(EXPOSE));
    h.insert("multiplex-version", HeaderValue::from_static(VERSION));
    h.insert("cache-control", HeaderValue::from_static("no-store"));
}

fn refusal(app: &App, e: MuxError, origin: Option<&HeaderValue>) -> Response<Body> {
    let mut res = ApiError::from(e).into_response();
    super::resource::allow_origin(res.headers_mut(), app, origin);
    res.headers_mut()
        .insert("access-control-expose-headers", HeaderValue::from_static(EXPOSE));
    res
}

/// `/.well-known/multiplexer/<mux>[/<request>]`: open a multiplexer (`POST`), cancel a
/// request through it (`DELETE`), or a CORS preflight (`OPTIONS`).
pub async fn endpoint(State(app): State<App>, req: Request<Body>) -> Response<Body> {
    let rest = req
        .uri()
        .path()
        .strip_prefix(PREFIX)
        .unwrap_or_default()
        .to_string();
    serve_endpoint(app, req, &rest)
}

/// `MULTIPLEX /<mux>`: braid-http 1.3's first way to open one.
pub async fn multiplex_method(app: App, req: Request<Body>) -> Response<Body> {
    let rest = req.uri().path().trim_start_matches('/').to_string();
    serve_endpoint(app, req, &rest)
}

fn serve_endpoint(app: App, req: Request<Body>, rest: &str) -> Response<Body> {
    let origin = req.headers().get(http::header::ORIGIN).cloned();
    if req.method() == Method::OPTIONS {
        let mut res = Response::new(Body::empty());
        let h = res.headers_mut();
        common_headers(h, &app, origin.as_ref());
        h.insert("allow", HeaderValue::from_static("POST, DELETE, OPTIONS"));
        h.insert(
            "access-control-allow-methods",
            HeaderValue::from_static("POST, DELETE, MULTIPLEX, OPTIONS"),
        );
        let asked = req
            .headers()
            .get("access-control-request-headers")
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("multiplex-version"));
        h.insert("access-control-allow-headers", asked);
        h.insert("access-control-max-age", HeaderValue::from_static("86400"));
        return res;
    }
    let answer = || {
        if !version_ok(req.headers()) {
            return Err(MuxError::BadVersion);
        }
        let (mux_id, request) = parse_ids(rest)?;
        let owner = client(&req);
        let post = req.method() == Method::POST || req.method().as_str() == METHOD;
        match (request, post, req.method() == Method::DELETE) {
            (None, true, _) => open(&app, owner, mux_id, origin.as_ref()),
            (Some(request), _, true) => {
                let mux = app
                    .multiplexers
                    .find(owner, mux_id)
                    .ok_or_else(|| MuxError::NoMultiplexer(mux_id.to_string()))?;
                mux.cancel(request)?;
                let mut res = Response::new(Body::empty());
                common_headers(res.headers_mut(), &app, origin.as_ref());
                Ok(res)
            }
            _ => Err(MuxError::Method),
        }
    };
    match answer() {
        Ok(res) => res,
        Err(e) => refusal(&app, e, origin.as_ref()),
    }
}

/// Opens multiplexer `id` for `owner`: a 200 whose body carries every response sent
/// through it, until the client goes away or the server shuts down.
fn open(
    app: &App,
    owner: IpAddr,
    id: &str,
    origin: Option<&HeaderValue>,
) -> Result<Response<Body>, MuxError> {
    let (mux, rx) = app.multiplexers.open(owner, id)?;
    /// Closes the multiplexer when its stream is dropped, however it ends.
    struct Closing {
        mux: Arc<Mux>,
        registry: Arc<Multiplexers>,
    }
    impl Drop for Closing {
        fn drop(&mut self) {
            self.registry.close(&self.mux);
        }
    }
    let closing = Closing {
        mux: mux.clone(),
        registry: app.multiplexers.clone(),
    };
    let shutdown = Box::pin(app.shutdown.clone().cancelled_owned());
    // A first line break gets the headers to the client at once (as braidify does).
    let first = futures::stream::once(async { Ok::<_, std::io::Error>(Bytes::from_static(b"\r\n")) });
    let frames = futures::stream::unfold(
        (rx, closing, shutdown),
        |(mut rx, closing, mut shutdown)| async move {
            tokio::select! {
                f = rx.recv() => f.map(|f| (Ok(f), (rx, closing, shutdown))),
                _ = &mut shutdown => None,
            }
        },
    );
    let mut res = Response::new(Body::from_stream(first.chain(frames)));
    let h = res.headers_mut();
    common_headers(h, app, origin);
    h.insert("incremental", HeaderValue::from_static("?1"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(res)
}

/// The multiplexer and request a request names, if it is to be multiplexed: it has
/// `Multiplex-Through` and speaks this version, and is neither a preflight, an upgrade
/// nor a request to a multiplexer itself.
fn multiplexed(req: &Request<Body>) -> Option<Result<(String, String), MuxError>> {
    let through = req.headers().get("multiplex-through")?;
    if !version_ok(req.headers())
        || req.method() == Method::OPTIONS
        || req.method() == Method::CONNECT
        || req.headers().contains_key(http::header::UPGRADE)
        || req.uri().path().starts_with(PREFIX)
    {
        return None;
    }
    let parsed = through
        .to_str()
        .ok()
        .and_then(|t| t.strip_prefix(PREFIX))
        .and_then(|rest| match parse_ids(rest) {
            Ok((m, Some(r))) => Some((m.to_string(), r.to_string())),
            _ => None,
        });
    Some(parsed.ok_or_else(|| MuxError::BadPath(String::from_utf8_lossy(through.as_bytes()).into_owned())))
}

/// The layer: a request with `Multiplex-Through` goes through the router like any other,
/// and its response is written into the multiplexer while the request itself is answered
/// `293`.
pub async fn through(State(app): State<App>, req: Request<Body>, next: Next) -> Response<Body> {
    let Some(ids) = multiplexed(&req) else {
        return next.run(req).await;
    };
    let origin = req.headers().get(http::header::ORIGIN).cloned();
    let owner = client(&req);
    let what = format!("{} {} (multiplexed)", req.method(), req.uri().path());
    match through_mux(&app, req, next, ids).await {
        Ok(res) => res,
        Err(e) => {
            let res = refusal(&app, e, origin.as_ref());
            let code = res
                .headers()
                .get("plait-error")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let reason = res
                .extensions()
                .get::<crate::refusals::Reason>()
                .map_or("", |r| r.0.as_str());
            app.refusals
                .count(code, reason, Some(owner), format_args!("{what}"));
            res
        }
    }
}

async fn through_mux(
    app: &App,
    req: Request<Body>,
    next: Next,
    ids: Result<(String, String), MuxError>,
) -> Result<Response<Body>, MuxError> {
    let (mux_id, request_id) = ids?;
    let through = req.headers().get("multiplex-through").cloned();
    let origin = req.headers().get(http::header::ORIGIN).cloned();
    let owner = client(&req);
    let mux = app
        .multiplexers
        .find_waiting(owner, &mux_id)
        .await
        .ok_or(MuxError::NotOpen(mux_id))?;
    let full = mux.open_requests() >= app.multiplexers.max_requests;
    let (serial, cancel) = mux.begin(&request_id)?;
    if !mux.send(start_frame(&request_id), &cancel).await {
        mux.end(&request_id, serial);
        return Err(MuxError::NotOpen(mux.id.clone()));
    }
    // The same routes as a plain request; a full multiplexer's refusal goes the same way.
    let res = if full {
        refusal(
            app,
            MuxError::Full(app.multiplexers.max_requests),
            origin.as_ref(),
        )
    } else {
        next.run(req).await
    };
    tokio::spawn(forward(mux, request_id, serial, cancel, res));
    let mut ok = Response::new(Body::from("Ok."));
    *ok.status_mut() = StatusCode::from_u16(293).expect("293");
    ok.extensions_mut().insert(hyper::ext::ReasonPhrase::from_static(
        b"Responded via multiplexer",
    ));
    let h = ok.headers_mut();
    common_headers(h, app, origin.as_ref());
    if let Some(t) = through {
        h.insert("multiplex-through", t);
    }
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    Ok(ok)
}

/// Writes `res` into the multiplexer as request `id`'s response: its head, its body as
/// it comes, then `close`. A cancelled request or a closed multiplexer stops it (the
/// response body is dropped, which ends a subscription).
async fn forward(mux: Arc<Mux>, id: String, serial: u64, cancel: CancellationToken, res: Response<Body>) {
    let (parts, body) = res.into_parts();
    let mut body = body.into_data_stream();
    let head = data_frame(&id, &head(&parts));
    // Not kept for the response's life (a subscription's): its headers are on the heap.
    drop(parts);
    if !mux.send(head, &cancel).await {
        return mux.end(&id, serial);
    }
    loop {
        let chunk = tokio::select! {
            c = body.next() => c,
            _ = cancel.cancelled() => return mux.end(&id, serial),
        };
        match chunk {
            Some(Ok(b)) if b.is_empty() => {}
            Some(Ok(b)) => {
                if !mux.send(data_frame(&id, &b), &cancel).await {
                    return mux.end(&id, serial);
                }
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, request = %id, "a multiplexed response body failed");
                break;
            }
            None => break,
        }
    }
    drop(body);
    mux.end(&id, serial);
    mux.send(close_frame(&id), &cancel).await;
}

/// The status line and headers of a response, as HTTP/1.1 writes them.
fn head(parts: &http::response::Parts) -> Vec<u8> {
    let reason = parts
        .extensions
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
        .or_else(|| parts.status.canonical_reason().map(str::to_string))
        .unwrap_or_default();
    let mut out = format!("HTTP/1.1 {} {reason}\r\n", parts.status.as_u16()).into_bytes();
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn start_frame(id: &str) -> Bytes {
    Bytes::from(format!("start response {id}\r\n"))
}

fn close_frame(id: &str) -> Bytes {
    Bytes::from(format!("close response {id}\r\n"))
}

/// `<N> bytes for response <id>\r\n` and the bytes, as one frame (frames of different
/// requests never interleave inside one another).
fn data_frame(id: &str, data: &[u8]) -> Bytes {
    let header = format!("{} bytes for response {id}\r\n", data.len());
    let mut b = BytesMut::with_capacity(header.len() + data.len());
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_what_braid_http_parses() {
        assert_eq!(&start_frame("abc_-1")[..], b"start response abc_-1\r\n");
        assert_eq!(
            &data_frame("r1", b"hello")[..],
            b"5 bytes for response r1\r\nhello"
        );
        assert_eq!(
            &data_frame("r1", "é".as_bytes())[..],
            "2 bytes for response r1\r\né".as_bytes()
        );
        assert_eq!(&close_frame("r1")[..], b"close response r1\r\n");
    }

    #[test]
    fn ids_are_base64url() {
        assert_eq!(parse_ids("m1").unwrap(), ("m1", None));
        assert_eq!(parse_ids("m1/r-_2").unwrap(), ("m1", Some("r-_2")));
        for bad in ["", "m1/", "/r", "m.1", "m1/r/x", "m1/r 2", &"x".repeat(65)] {
            assert!(parse_ids(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_head_keeps_the_reason_phrase() {
        let mut res = Response::new(Body::empty());
        *res.status_mut() = StatusCode::from_u16(209).unwrap();
        res.extensions_mut()
            .insert(hyper::ext::ReasonPhrase::from_static(b"Multiresponse"));
        res.headers_mut()
            .insert("subscribe", HeaderValue::from_static("true"));
        let (parts, _) = res.into_parts();
        assert_eq!(
            head(&parts),
            b"HTTP/1.1 209 Multiresponse\r\nsubscribe: true\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_multiplexer_is_its_opener_s_alone_and_bounded_per_address() {
        let limits = Limits {
            max_multiplexers_per_address: 2,
            multiplexer_wait_ms: 0,
            ..Limits::default()
        };
        let reg = Multiplexers::new(&limits);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let (m1, _rx1) = reg.open(a, "m1").unwrap();
        assert!(matches!(
            reg.open(b, "m1"),
            Err(MuxError::DuplicateMultiplexer(_))
        ));
        assert!(reg.find(a, "m1").is_some());
        assert!(reg.find(b, "m1").is_none());
        assert!(reg.find_waiting(b, "m1").await.is_none());
        let (_m2, _rx2) = reg.open(a, "m2").unwrap();
        assert!(matches!(reg.open(a, "m3"), Err(MuxError::TooManyMultiplexers(2))));
        reg.close(&m1);
        assert!(m1.closed.is_cancelled());
        assert!(reg.find(a, "m1").is_none());
        let (_m3, _rx3) = reg.open(a, "m3").unwrap();
        assert_eq!(reg.len(), 2);
    }

    #[tokio::test]
    async fn requests_are_unique_until_they_end_and_cancel_once() {
        let reg = Multiplexers::new(&Limits::default());
        let (mux, _rx) = reg.open([10, 0, 0, 1].into(), "m").unwrap();
        let (s1, t1) = mux.begin("r").unwrap();
        assert!(matches!(mux.begin("r"), Err(MuxError::DuplicateRequest { .. })));
        mux.cancel("r").unwrap();
        assert!(t1.is_cancelled());
        assert!(matches!(mux.cancel("r"), Err(MuxError::NoRequest(_))));
        let (s2, _t2) = mux.begin("r").unwrap();
        // The first registration ending does not remove the second.
        mux.end("r", s1);
        assert_eq!(mux.open_requests(), 1);
        mux.end("r", s2);
        assert_eq!(mux.open_requests(), 0);
        // Closing the multiplexer cancels what goes through it.
        let (_s3, t3) = mux.begin("q").unwrap();
        reg.close(&mux);
        assert!(t3.is_cancelled());
    }
}
