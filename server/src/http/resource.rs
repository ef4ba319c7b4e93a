//! Braid-HTTP on resources: GET, HEAD, PUT/PATCH, DELETE, OPTIONS, and `Subscribe`.
//!
//! The request is parsed into typed values here (path → [`ResourceKey`], headers →
//! [`BraidHeaders`], body → [`WriteBody`]); the engine does the work; the answer is
//! written with [`crate::braid::frame`]. This module is the only one that sees both HTTP
//! and the engine.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use percent_encoding::percent_decode_str;
use tokio_util::sync::CancellationToken;

use super::App;
use super::error::ApiError;
use crate::access::accounts::AccountError;
use crate::access::{Caller, Op};
use crate::braid::{BraidHeaders, format_version, frame};
use crate::engine::{Delivery, Subscription, Write, Writer};
use crate::model::{Kind, PathError, ResourceKey, ResourcePath, Version};
use crate::statebus::access::{self, Resolved, Target};
use crate::statebus::keys::{KeyError, StatebusKey};
use crate::update::{Update, UpdateBody};

/// Methods a resource answers.
pub const ALLOW: &str = "GET, HEAD, PUT, PATCH, DELETE, OPTIONS";

/// Headers clients may send and read (browsers need them listed for CORS).
const BRAID_HEADERS: &str = "Version, Parents, Current-Version, Subscribe, Heartbeats, Merge-Type, Patches, Peer, \
     Content-Range, Repr-Digest, Accept-Subscribe, Editable, Plait-Error, Plait-Replica";

/// Headers browsers may send (listed when a preflight does not say which it wants).
const REQUEST_HEADERS: &str = "subscribe, peer, version, parents, merge-type, content-type, content-range, \
     patches, heartbeats, repr-digest, cache-control, put-order, accept, multiplex-through, multiplex-version";

/// Handles a request for a resource.
pub async fn handle(app: App, req: Request<Body>) -> Response<Body> {
    let origin = req.headers().get(http::header::ORIGIN).cloned();
    let mut res = match route(&app, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    add_common_headers(res.headers_mut(), &app, origin.as_ref());
    res
}

fn add_common_headers(h: &mut HeaderMap, app: &App, origin: Option<&HeaderValue>) {
    allow_origin(h, app, origin);
    h.insert(
        "access-control-expose-headers",
        HeaderValue::from_static(BRAID_HEADERS),
    );
    h.insert(
        "range-request-allow-methods",
        HeaderValue::from_static("PATCH, PUT"),
    );
    h.insert(
        "range-request-allow-units",
        HeaderValue::from_static("text, json, bytes"),
    );
    // State written through the API is never active content on this origin: an HTML or
    // SVG state opened in a browser runs in a sandbox, without this origin's cookies or
    // storage.
    h.insert("content-security-policy", HeaderValue::from_static("sandbox"));
}

/// CORS: any page may read; only listed origins (`access.cors_credential_origins`) may
/// send credentials (cookies).
pub(crate) fn allow_origin(h: &mut HeaderMap, app: &App, origin: Option<&HeaderValue>) {
    let credentialed = origin.filter(|o| {
        o.to_str().is_ok_and(|o| {
            app.access
                .settings()
                .cors_credential_origins
                .iter()
                .any(|allowed| allowed == o)
        })
    });
    match credentialed {
        Some(o) => {
            h.insert("access-control-allow-origin", o.clone());
            h.insert(
                "access-control-allow-credentials",
                HeaderValue::from_static("true"),
            );
            h.append("vary", HeaderValue::from_static("Origin"));
        }
        None => {
            h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
        }
    }
}

/// Name of the cookie holding an HTTP login session's secret.
pub const SESSION_COOKIE: &str = "plait_session";

/// Name of the cookie holding an owner session's secret (the dashboard's login; sent
/// under `/.well-known/plait` only).
pub const OWNER_COOKIE: &str = "plait_owner";

/// The value of the cookie named `name`, if the request has a well-formed one.
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(name)?.strip_prefix('='))
        .find(|v| ok(v))
}

/// Who sent a request: a bearer token, a signed request, a login session, or nobody.
/// A credential that does not check out is refused (401), never taken as anonymous.
pub(crate) async fn authenticate(
    app: &App,
    method: &Method,
    uri: &http::Uri,
    h: &HeaderMap,
) -> Result<Authenticated, ApiError> {
    use crate::access::signature;
    if h.contains_key(signature::SIGNATURE) || h.contains_key(signature::SIGNATURE_INPUT) {
        let scheme = if app.https { "https" } else { "http" };
        let target = signature::target_uri(scheme, h, uri);
        let v = app
            .access
            .verify_signature(method, &target, h)
            .map_err(ApiError::from)?;
        let member = app.p2p.as_ref().is_some_and(|p| p.node.is_member(&v.identity));
        return Ok(Authenticated {
            caller: app.access.identity(v.identity, member),
            session: None,
            signed: v.covers_digest,
        });
    }
    if let Some(auth) = h.get(http::header::AUTHORIZATION) {
        let token = auth
            .to_str()
            .ok()
            .and_then(|a| a.strip_prefix("Bearer ").or_else(|| a.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or_else(|| ApiError::unauthenticated("only Bearer tokens are accepted in Authorization"))?;
        let caller = app
            .access
            .bearer(token)
            .map_err(|e| ApiError::unauthenticated(e.to_string()).invalid_token())?;
        return Ok(Authenticated {
            caller,
            session: None,
            signed: false,
        });
    }
    if let Some(secret) = cookie(h, OWNER_COOKIE) {
        let caller = app.access.owner_session(secret).await.map_err(ApiError::from)?;
        return Ok(Authenticated {
            caller,
            session: None,
            signed: false,
        });
    }
    if let Some(session) = cookie(h, SESSION_COOKIE) {
        let account = app.access.accounts().session(session).await?;
        return Ok(Authenticated {
            caller: account.map_or(Caller::Anonymous, Caller::from),
            session: Some(session.to_string()),
            signed: false,
        });
    }
    Ok(Authenticated {
        caller: Caller::Anonymous,
        session: None,
        signed: false,
    })
}

/// The outcome of [`authenticate`].
pub(crate) struct Authenticated {
    pub caller: Caller,
    /// The request's login session secret (from its cookie), logged in or not.
    pub session: Option<String>,
    /// The caller proved itself with a message signature: a body must match its
    /// `Content-Digest`.
    pub signed: bool,
}

async fn route(app: &App, req: Request<Body>) -> Result<Response<Body>, ApiError> {
    if req.method() == Method::OPTIONS {
        return Ok(options(req.headers()));
    }
    let braid = BraidHeaders::parse(req.headers())?;
    let auth = authenticate(app, req.method(), req.uri(), req.headers()).await?;
    let target = resolve_path(app, req.uri().path()).await?;
    let method = req.method().clone();
    let new_peer = cookie(req.headers(), "peer").is_none();
    let mut res = match (target, method) {
        (Resolved::CurrentUser, _) => current_user(app, auth, braid, req).await?,
        (Resolved::Resource(target), Method::GET | Method::HEAD) => {
            let Some(key) = target.key else {
                return Err(ApiError::not_found("there is no such account"));
            };
            app.access.check(&auth.caller, &key, Op::Read)?;
            let reader = Reader {
                caller: auth.caller,
                watch: app.access.watch(),
            };
            match app.federation.as_ref().filter(|f| f.is_remote(&key)) {
                Some(fed) => get_replica(app, fed, key, braid, req, reader).await?,
                None => get(app, key, braid, req, reader).await?,
            }
        }
        (Resolved::Resource(target), Method::PUT | Method::PATCH | Method::DELETE) => {
            let Some(key) = target.key else {
                return Err(ApiError::forbidden("there is no such account"));
            };
            if req.method() == Method::DELETE {
                app.access.check(&auth.caller, &key, Op::Delete)?;
                let ip = req.extensions().get::<super::Peer>().map(|p| p.0.ip());
                delete(app, key, auth.caller.writer(app.identity, ip)).await?
            } else {
                // Refused before the body is read.
                app.access.check(&auth.caller, &key, Op::Write)?;
                put(app, key, braid, req, &auth).await?
            }
        }
        _ => return Err(ApiError::method_not_allowed(ALLOW)),
    };
    if new_peer {
        // The reference server's client id cookie (apps look for it). It carries no
        // rights: sessions are the `plait_session` cookie's alone.
        let cookie = format!(
            "peer={:024x}; Path=/; Max-Age={}; SameSite=Lax; HttpOnly",
            rand::random::<u128>() >> 32,
            app.access.accounts().session_lifetime().as_secs()
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            res.headers_mut().append(http::header::SET_COOKIE, v);
        }
    }
    Ok(res)
}

/// A reader of a resource, kept with its subscription so that the subscription ends when
/// the rules take the reader's right away.
pub(crate) struct Reader {
    caller: Caller,
    watch: crate::access::RightWatch,
}

/// Maps a URL path to what it names: `/<key>` a Statebus key in the instance's namespace
/// (plain state, `@name` accounts, `current_user`, the access rules), `/~<id>/<path>`
/// another namespace.
async fn resolve_path(app: &App, raw_path: &str) -> Result<Resolved, ApiError> {
    let decoded = percent_decode_str(raw_path)
        .decode_utf8()
        .map_err(|_| ApiError::from(PathError::Encoding))?;
    let path = decoded.strip_prefix('/').unwrap_or(&decoded);
    if let Some(rest) = path.strip_prefix('~') {
        let (id, inner) = rest.split_once('/').unwrap_or((rest, ""));
        let ns = id.parse().map_err(|e: plait_bridge::IdentityError| {
            PathError::BadNamespace(id.to_string(), e.to_string())
        })?;
        return Ok(Resolved::Resource(Target {
            key: Some(ResourceKey::new(ns, ResourcePath::new(inner)?)),
            profile: None,
        }));
    }
    let key = match StatebusKey::parse(path) {
        Ok(k) => k,
        // `/` is the resource with the empty path.
        Err(KeyError::Empty) => StatebusKey::Plain(String::new()),
        Err(e) => return Err(ApiError::bad_request(e.to_string())),
    };
    Ok(access::resolve(&app.access, &key).await?)
}

fn options(req: &HeaderMap) -> Response<Body> {
    let mut res = Response::new(Body::empty());
    let h = res.headers_mut();
    h.insert("allow", HeaderValue::from_static(ALLOW));
    h.insert("access-control-allow-methods", HeaderValue::from_static(ALLOW));
    let asked = req
        .get("access-control-request-headers")
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static(REQUEST_HEADERS));
    h.insert("access-control-allow-headers", asked);
    h.insert("access-control-max-age", HeaderValue::from_static("86400"));
    res
}

/// Whether the client asked for JSON (then a missing resource is a 404, not empty text).
fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json") || a.contains("+json"))
}

async fn get(
    app: &App,
    key: ResourceKey,
    braid: BraidHeaders,
    req: Request<Body>,
    reader: Reader,
) -> Result<Response<Body>, ApiError> {
    let head = req.method() == Method::HEAD;
    let json = wants_json(req.headers());
    // Who the document work of reading past versions is charged to, as writes are.
    let ip = req.extensions().get::<super::Peer>().map(|p| p.0.ip());
    let who = reader.caller.writer(app.identity, ip);
    if braid.subscribe.is_some() {
        if braid.version.is_some() {
            return Err(ApiError::bad_request(
                "Version is not allowed with Subscribe; use Parents to resume from a version",
            ));
        }
        return subscribe(app, key, braid, json, head, reader, who).await;
    }
    if let Some(version) = braid.version {
        let (body, current) = app.engine.read_at(&key, version.clone(), who).await?;
        let state = app.engine.read(&key).await?;
        let mut res = representation(
            if head { Bytes::new() } else { body },
            &state.media_type,
            Some(&version),
        );
        set(res.headers_mut(), "current-version", &format_version(&current));
        return Ok(res);
    }
    if let Some(parents) = braid.parents {
        return history(app, key, parents, head, who).await;
    }
    let state = app.engine.read(&key).await?;
    if !state.exists() && json {
        return Err(ApiError::not_found(format!("{} does not exist", key.path)));
    }
    let mut res = representation(
        if head { Bytes::new() } else { state.body.clone() },
        &state.media_type,
        Some(&state.version),
    );
    if head {
        set(res.headers_mut(), "content-length", &state.body.len().to_string());
    }
    set(res.headers_mut(), "repr-digest", state.digest());
    if state.kind == Some(Kind::Text) || !state.exists() {
        set(res.headers_mut(), "merge-type", "simpleton");
    }
    Ok(res)
}

fn representation(body: Bytes, media_type: &str, version: Option<&Version>) -> Response<Body> {
    let mut res = Response::new(Body::from(body));
    let h = res.headers_mut();
    set(h, "content-type", media_type);
    if let Some(v) = version {
        set(h, "version", &format_version(v));
    }
    h.insert("accept-subscribe", HeaderValue::from_static("true"));
    h.insert("editable", HeaderValue::from_static("true"));
    h.insert(
        "vary",
        HeaderValue::from_static("Version, Parents, Subscribe, Accept"),
    );
    res
}

fn set(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

/// `GET` with `Parents` and no `Subscribe`: the updates since then, as a finished 209.
async fn history(
    app: &App,
    key: ResourceKey,
    parents: Version,
    head: bool,
    who: Writer,
) -> Result<Response<Body>, ApiError> {
    let updates = app.engine.history(&key, parents, who).await?;
    let state = app.engine.read(&key).await?;
    let mut body = Vec::new();
    for u in &updates {
        body.extend_from_slice(&frame::encode_update(u));
    }
    let mut res = Response::new(if head { Body::empty() } else { Body::from(body) });
    *res.status_mut() = StatusCode::from_u16(209).expect("209");
    res.extensions_mut()
        .insert(hyper::ext::ReasonPhrase::from_static(b"Multiresponse"));
    let h = res.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("application/http-history"),
    );
    set(h, "repr-type", &state.media_type);
    set(h, "current-version", &format_version(&state.version));
    Ok(res)
}

/// A read of another member's resource: served from the local replica, which is synced
/// first (a plain read) or kept live for as long as the subscription lasts.
/// `Plait-Replica` says how the replica stands: `live`, `syncing` or `offline` (its home
/// cannot be reached; this is the last state synced).
async fn get_replica(
    app: &App,
    fed: &std::sync::Arc<crate::federation::Federation>,
    key: ResourceKey,
    braid: BraidHeaders,
    req: Request<Body>,
    reader: Reader,
) -> Result<Response<Body>, ApiError> {
    if braid.subscribe.is_some() {
        let attached = fed.attach(&key).await;
        let state = attached.state();
        let res = get(app, key, braid, req, reader).await?;
        let (mut parts, body) = res.into_parts();
        set(&mut parts.headers, "plait-replica", state.header());
        // The replica stays live while this response is being streamed.
        let body = Body::from_stream(futures::StreamExt::map(body.into_data_stream(), move |chunk| {
            let _keep = &attached;
            chunk
        }));
        return Ok(Response::from_parts(parts, body));
    }
    let state = fed.sync_once(&key).await;
    let mut res = get(app, key, braid, req, reader).await?;
    set(res.headers_mut(), "plait-replica", state.header());
    Ok(res)
}

async fn subscribe(
    app: &App,
    key: ResourceKey,
    braid: BraidHeaders,
    json: bool,
    head: bool,
    reader: Reader,
    who: Writer,
) -> Result<Response<Body>, ApiError> {
    let sub = app
        .engine
        .subscribe(&key, braid.parents.clone().map(|p| (p, who)), braid.peer.clone())
        .await?;
    let state = app.engine.read(&key).await?;
    let media_type = if state.exists() {
        state.media_type.clone()
    } else if json {
        Kind::Json.default_media_type().to_string()
    } else {
        Kind::Text.default_media_type().to_string()
    };
    let mut res = Response::new(if head {
        Body::empty()
    } else {
        Body::from_stream(updates(
            sub,
            json,
            braid.heartbeats,
            app.shutdown.clone(),
            reader,
            app.metrics.clone(),
        ))
    });
    *res.status_mut() = StatusCode::from_u16(209).expect("209");
    res.extensions_mut()
        .insert(hyper::ext::ReasonPhrase::from_static(b"Multiresponse"));
    let h = res.headers_mut();
    set(h, "subscribe", braid.subscribe.as_deref().unwrap_or("true"));
    h.insert(
        "cache-control",
        HeaderValue::from_static("no-cache, no-transform, no-store"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    set(h, "content-type", &media_type);
    set(h, "current-version", &format_version(&state.version));
    if state.kind == Some(Kind::Text) || (!state.exists() && !json) {
        h.insert("merge-type", HeaderValue::from_static("simpleton"));
    }
    h.insert("editable", HeaderValue::from_static("true"));
    h.insert("accept-subscribe", HeaderValue::from_static("true"));
    if let Some(hb) = braid.heartbeats {
        set(h, "heartbeats", &crate::braid::headers::format_heartbeats(hb));
    }
    Ok(res)
}

/// The body of a 209: update blocks as they come, blank lines as heartbeats; it ends when
/// the server shuts down, or when a rule change takes the reader's right away.
fn updates(
    sub: Subscription,
    json: bool,
    heartbeats: Option<Duration>,
    shutdown: CancellationToken,
    reader: Reader,
    metrics: Arc<crate::metrics::Metrics>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    use crate::metrics::Protocol::Braid;
    struct St {
        sub: Subscription,
        json: bool,
        beat: Option<tokio::time::Interval>,
        /// Completes when the stream must end: the server shuts down, or a rule change
        /// takes the reader's right away (the access layer is asked at every rule
        /// change). Made and registered once for the whole stream, not once per update
        /// (this is a hot path: every subscriber polls it for every update).
        ended: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
        metrics: Arc<crate::metrics::Metrics>,
        /// Counts the subscription as open while the stream lives.
        _open: crate::metrics::Subscribed,
    }
    let beat = heartbeats.map(crate::braid::headers::heartbeat_timer);
    // `reader` is mutated in place by the block that owns it: a `let mut reader = reader`
    // inside would keep a second copy of it in the future (a `Reader` holds a `Caller`
    // and the rules' watch), and this future lives as long as the subscription.
    let mut reader = reader;
    // The subscription's own handle names the resource: no second copy of its key.
    let resource = sub.resource();
    let ended = Box::pin(async move {
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = reader.watch.changed() => {
                    if let Err(refusal) = reader.watch.check(&reader.caller, &resource.key) {
                        tracing::info!(path = %refusal.path, caller = %reader.caller.describe(), "a subscription ends: {refusal}");
                        return;
                    }
                }
            }
        }
    });
    futures::stream::unfold(
        St {
            sub,
            json,
            beat,
            ended,
            _open: metrics.subscribed(Braid),
            metrics,
        },
        |mut st| async move {
            let bytes = tokio::select! {
                biased;
                _ = st.ended.as_mut() => return None,
                d = st.sub.next() => match d? {
                    Delivery::Shared(ev) => {
                        let bytes = ev.wire.get_or_init(|| frame::encode_update(&ev.update())).clone();
                        st.metrics.delivered(Braid, Some(ev.committed));
                        bytes
                    }
                    Delivery::Own(u) => {
                        st.metrics.delivered(Braid, None);
                        encode_for(&u, st.json)
                    }
                },
                _ = async { st.beat.as_mut().expect("guarded").tick().await }, if st.beat.is_some() => {
                    Bytes::from_static(frame::HEARTBEAT)
                }
            };
            Some((Ok(bytes), st))
        },
    )
    .boxed()
}

/// A subscriber's own update. A text client asking about a resource that does not exist
/// sees an empty text document (braid-text's model); a JSON client sees a 404 block.
fn encode_for(u: &Update, json: bool) -> Bytes {
    if matches!(u.body, UpdateBody::Missing) && !json && u.parents.is_root() {
        return frame::encode_update(&Update {
            body: UpdateBody::Snapshot(Bytes::new()),
            ..u.clone()
        });
    }
    frame::encode_update(u)
}

async fn put(
    app: &App,
    key: ResourceKey,
    braid: BraidHeaders,
    req: Request<Body>,
    auth: &Authenticated,
) -> Result<Response<Body>, ApiError> {
    let ip = req.extensions().get::<super::Peer>().map(|p| p.0.ip());
    let (parts, body) = req.into_parts();
    let body = read_body(body, &parts.headers, app.limits.max_body_bytes).await?;
    if auth.signed {
        crate::access::signature::check_content_digest(&parts.headers, &body)?;
    }
    let write_body = crate::braid::patch::parse_write_body(&parts.headers, body)?;
    app.access.check_write(&auth.caller, &key, &write_body)?;
    let writer = auth.caller.writer(app.identity, ip);
    let author = auth.caller.author(app.identity);
    let version = match braid.version {
        None => None,
        Some(v) => match v.ids() {
            [] => None,
            [one] => Some(one.clone()),
            _ => return Err(ApiError::bad_request("a PUT names one version id")),
        },
    };
    let result = app
        .engine
        .write(
            &key,
            Write {
                body: write_body,
                version,
                parents: braid.parents,
                peer: braid.peer,
                author,
                digest: braid.repr_digest,
                writer,
            },
        )
        .await?;
    app.access.written(&app.engine, &key).await;
    let mut res = Response::new(Body::empty());
    set(res.headers_mut(), "version", &format_version(&result.version));
    Ok(res)
}

/// `current_user` over HTTP, for the login session of the `plait_session` cookie (made
/// here when the request has none): GET reads it, PUT `{"login_as": {name, pass}}` /
/// `{"logout": true}` / `{"logout_everywhere": true}` / `{"create_account": {name, pass,
/// email}}` acts on it (answered with the new value; a refusal is in its `error` field, as
/// Statebus clients expect; too many attempts are a 429), Subscribe follows it.
async fn current_user(
    app: &App,
    auth: Authenticated,
    braid: BraidHeaders,
    req: Request<Body>,
) -> Result<Response<Body>, ApiError> {
    use crate::statebus::session::current_user_value;
    use crate::statebus::wire::Dialect;
    let json = |v: &serde_json::Value| Bytes::from(serde_json::to_vec(v).expect("JSON serializes"));
    let accounts = app.access.accounts().clone();
    let (session, new_session) = match auth.session.clone() {
        Some(s) => (s, false),
        None => (crate::access::accounts::new_session_secret(), true),
    };
    let ip = req.extensions().get::<super::Peer>().map(|p| p.0.ip());
    let mut res = match *req.method() {
        Method::GET | Method::HEAD if braid.subscribe.is_some() => {
            let key = accounts
                .session_key(&session)
                .ok_or_else(|| ApiError::bad_request("bad session"))?;
            let sub = app.engine.subscribe(&key, None, None).await?;
            let shutdown = app.shutdown.clone();
            let stream = futures::stream::unfold(
                (sub, accounts.clone(), shutdown),
                move |(mut sub, accounts, shutdown)| async move {
                    let d = tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        d = sub.next() => d?,
                    };
                    let body = match &d {
                        Delivery::Shared(ev) => ev.body.clone(),
                        Delivery::Own(u) => u.body.clone(),
                    };
                    let value = match body {
                        UpdateBody::Snapshot(b) => serde_json::from_slice(&b).ok(),
                        _ => None,
                    };
                    let account = accounts.account_of_session(value.as_ref()).await.ok().flatten();
                    let caller = account.map_or(Caller::Anonymous, Caller::from);
                    let v = current_user_value(Dialect::V7, &caller, None);
                    let update = Update {
                        version: Version::root(),
                        parents: Version::root(),
                        body: UpdateBody::Snapshot(Bytes::from(
                            serde_json::to_vec(&v).expect("JSON serializes"),
                        )),
                        media_type: "application/json".into(),
                        digest: None,
                    };
                    Some((
                        Ok::<_, std::io::Error>(frame::encode_update(&update)),
                        (sub, accounts, shutdown),
                    ))
                },
            );
            let mut res = Response::new(Body::from_stream(stream));
            *res.status_mut() = StatusCode::from_u16(209).expect("209");
            let h = res.headers_mut();
            set(h, "subscribe", braid.subscribe.as_deref().unwrap_or("true"));
            h.insert(
                "cache-control",
                HeaderValue::from_static("no-cache, no-transform, no-store"),
            );
            h.insert("x-accel-buffering", HeaderValue::from_static("no"));
            h.insert("content-type", HeaderValue::from_static("application/json"));
            res
        }
        Method::GET | Method::HEAD => {
            let mut res = Response::new(Body::from(json(&current_user_value(
                Dialect::V7,
                &auth.caller,
                None,
            ))));
            res.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            res
        }
        Method::PUT => {
            let (parts, body) = req.into_parts();
            let body = read_body(body, &parts.headers, app.limits.max_body_bytes).await?;
            let cmd: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| ApiError::bad_request(format!("current_user takes a JSON command: {e}")))?;
            // Accept the statebus state shape too: {"key": "current_user", "val": {...}}.
            let cmd = cmd.get("val").cloned().unwrap_or(cmd);
            let mut caller = auth.caller.clone();
            let mut error = None;
            let name_of = |c: &serde_json::Value| {
                c.get("name")
                    .or_else(|| c.get("login"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string()
            };
            if let Some(c) = cmd.get("create_account") {
                match c.get("pass").and_then(|v| v.as_str()) {
                    Some(pass) => {
                        let email = c.get("email").and_then(|v| v.as_str());
                        if let Err(e) = accounts.create(&name_of(c), pass, email, ip).await {
                            error = Some(e);
                        }
                    }
                    None => error = Some(AccountError::Refused(crate::access::accounts::BAD_FIELDS)),
                }
            }
            if let Some(c) = cmd.get("login_as") {
                let pass = c.get("pass").and_then(|v| v.as_str()).unwrap_or("");
                match accounts.login(&name_of(c), pass, ip).await {
                    Ok(a) => {
                        accounts.bind(&session, &a).await?;
                        caller = Caller::from(a);
                    }
                    Err(e) => error = Some(e),
                }
            }
            let truthy = |k: &str| {
                cmd.get(k)
                    .is_some_and(|v| v.as_bool() != Some(false) && !v.is_null())
            };
            if truthy("logout_everywhere")
                && let Some(a) = caller.account()
            {
                accounts.end_sessions(a).await?;
                caller = Caller::Anonymous;
            }
            if truthy("logout") {
                accounts.unbind(&session).await?;
                caller = Caller::Anonymous;
            }
            if let Some(AccountError::TooMany { limit, retry_after }) = &error {
                return Err(ApiError::new(
                    429,
                    "rate-limited",
                    format!("{} ({limit})", error.as_ref().expect("matched")),
                )
                .with_header("retry-after", retry_after.as_secs().max(1).to_string()));
            }
            if let Some(AccountError::Busy) = &error {
                return Err(
                    ApiError::new(503, "busy", "the server is busy hashing passwords; try again")
                        .with_header("retry-after", "1".into()),
                );
            }
            let error = error.map(|e| e.to_string());
            let v = current_user_value(Dialect::V7, &caller, error.as_deref());
            let mut res = Response::new(Body::from(json(&v)));
            res.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            if error.is_some() {
                res.headers_mut()
                    .insert("plait-error", HeaderValue::from_static("refused"));
            }
            res
        }
        _ => return Err(ApiError::method_not_allowed("GET, HEAD, PUT, OPTIONS")),
    };
    if new_session || auth.caller.account().is_some() {
        // Made here, or extended (the session's lifetime slides with use).
        let cookie = format!(
            "{SESSION_COOKIE}={session}; Path=/; Max-Age={}; SameSite=Lax; HttpOnly{}",
            accounts.session_lifetime().as_secs(),
            if app.https { "; Secure" } else { "" }
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            res.headers_mut().append(http::header::SET_COOKIE, v);
        }
    }
    Ok(res)
}

/// Reads a body up to `limit` bytes; 413 beyond, decided from `Content-Length` when given.
async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(declared, limit));
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(ApiError::too_large(None, limit))
        }
        Err(e) if stalled(&*e) => Err(ApiError::new(
            408,
            "body-timeout",
            format!("the body stalled: {e} (limits.body_read_timeout_secs)"),
        )
        .with_header("connection", "close".into())),
        Err(e) => Err(ApiError::bad_request(format!("could not read the body: {e}"))),
    }
}

/// Whether a body failed because its next piece did not come in time
/// ([`conn::BodyTimeout`](super::conn::BodyTimeout), somewhere in the error's causes).
fn stalled(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<super::conn::BodyTimeout>() {
            return true;
        }
        cause = c.source();
    }
    false
}

async fn delete(
    app: &App,
    key: ResourceKey,
    writer: crate::engine::Writer,
) -> Result<Response<Body>, ApiError> {
    if app.engine.delete(&key, &writer).await? {
        let mut res = Response::new(Body::empty());
        *res.status_mut() = StatusCode::NO_CONTENT;
        Ok(res)
    } else {
        Err(ApiError::not_found(format!("{} does not exist", key.path)))
    }
}
