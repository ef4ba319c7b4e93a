//! The admin dashboard over HTTP: its pages, the owner's login, and the status resources.
//!
//! * `/.well-known/plait/dashboard/` — the static app in `web/dashboard/`, embedded in
//!   the binary at compile time (`rust-embed`), so an installed server needs no web dir.
//!   The pages hold no data: everything they show comes from the status resources.
//! * `POST /.well-known/plait/dashboard/login` — a one-time link's secret (the body) is
//!   redeemed for an owner session: the `plait_owner` cookie (`HttpOnly`,
//!   `SameSite=Strict`, sent under `/.well-known/plait` only). `…/logout` ends it.
//! * `POST /.well-known/plait/dashboard/invite` — the owner makes an invite link to this
//!   server's network (`{"uses": N, "ttl_secs": S}`), as `plait invite` does.
//! * `/.well-known/plait/status/<section>` — the status resources (`crate::status`), for
//!   the owner only ([`super::owner_only`], the same check as metrics). A GET is the
//!   current JSON with its `Version`; with `Subscribe` it is a Braid subscription (`209`)
//!   that sends the whole document as a new version whenever it changes (at most one per
//!   `dashboard.status_interval_ms`), and ends when the caller is no longer the owner
//!   (a token revoked, a session ended) or the server shuts down.
//!
//! Knows nothing of how the figures are gathered.

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri};

use super::App;
use super::error::ApiError;
use crate::braid::{BraidHeaders, frame};
use crate::model::{Version, VersionId};
use crate::update::{Update, UpdateBody};

/// Where the dashboard's pages are served.
pub const DASHBOARD_PATH: &str = "/.well-known/plait/dashboard/";
/// Where the status resources are, each `<STATUS_PATH><section>`.
pub const STATUS_PATH: &str = "/.well-known/plait/status/";
/// Where the owner session cookie is sent: the dashboard, the status resources and the
/// access rules, nothing else of this origin.
const COOKIE_PATH: &str = "/.well-known/plait";
/// Longest login or invite request body (a secret is 43 characters).
const MAX_FORM_BYTES: usize = 1024;
/// The pages load their scripts and styles from here only, and talk to this origin only.
const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The dashboard's files, from `web/dashboard/` at build time.
#[derive(rust_embed::RustEmbed)]
#[folder = "../web/dashboard/"]
struct Assets;

/// The dashboard's routes.
pub fn routes() -> Router<App> {
    Router::new()
        .route(
            "/.well-known/plait/dashboard",
            get(|| async { redirect(DASHBOARD_PATH) }),
        )
        .route(
            "/.well-known/plait/dashboard/",
            get(|| async { asset("index.html") }),
        )
        .route(
            "/.well-known/plait/dashboard/{*file}",
            get(|Path(file): Path<String>| async move { asset(&file) }),
        )
        .route("/.well-known/plait/dashboard/login", post(login))
        .route("/.well-known/plait/dashboard/logout", post(logout))
        .route("/.well-known/plait/dashboard/invite", post(invite))
        .route("/.well-known/plait/status/{section}", get(status))
}

fn redirect(to: &'static str) -> Response<Body> {
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::PERMANENT_REDIRECT;
    res.headers_mut()
        .insert(http::header::LOCATION, HeaderValue::from_static(to));
    res
}

/// One of the dashboard's files, with its type and an ETag.
fn asset(path: &str) -> Response<Body> {
    let Some(file) = Assets::get(path) else {
        return ApiError::not_found(format!("the dashboard has no file {path}")).into_response();
    };
    let etag = format!(
        "\"{}\"",
        data_encoding::HEXLOWER.encode(&file.metadata.sha256_hash()[..12])
    );
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    let mut res = Response::new(Body::from(Bytes::from(file.data.into_owned())));
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(mime.as_ref()) {
        h.insert(http::header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(http::header::ETAG, v);
    }
    h.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("content-security-policy", HeaderValue::from_static(PAGE_CSP));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    res
}

fn owner_cookie(app: &App, value: &str, max_age: u64) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!(
        "{}={value}; Path={COOKIE_PATH}; Max-Age={max_age}; SameSite=Strict; HttpOnly{}",
        super::resource::OWNER_COOKIE,
        if app.https { "; Secure" } else { "" }
    ))
    .ok()
}

/// Redeems a one-time login link (its secret is the body) for an owner session cookie.
async fn login(State(app): State<App>, body: Bytes) -> Response<Body> {
    if body.len() > MAX_FORM_BYTES {
        return ApiError::too_large(Some(body.len() as u64), MAX_FORM_BYTES).into_response();
    }
    let secret = String::from_utf8_lossy(&body).trim().to_string();
    let logins = app.access.owner_logins();
    match logins.redeem(&secret).await {
        Ok(session) => {
            let mut res = Response::new(Body::empty());
            *res.status_mut() = StatusCode::NO_CONTENT;
            if let Some(v) = owner_cookie(&app, &session, logins.lifetime().as_secs()) {
                res.headers_mut().insert(http::header::SET_COOKIE, v);
            }
            res
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Ends the owner session of the request's cookie, and clears the cookie.
async fn logout(State(app): State<App>, headers: HeaderMap) -> Response<Body> {
    if let Some(secret) = super::resource::cookie(&headers, super::resource::OWNER_COOKIE)
        && let Err(e) = app.access.owner_logins().end(secret).await
    {
        return ApiError::from(e).into_response();
    }
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::NO_CONTENT;
    if let Some(v) = owner_cookie(&app, "", 0) {
        res.headers_mut().insert(http::header::SET_COOKIE, v);
    }
    res
}

/// What the dashboard asks of an invite link.
#[derive(serde::Deserialize)]
struct InviteAsk {
    uses: u32,
    ttl_secs: u64,
}

/// The owner makes an invite link to this server's network.
async fn invite(
    State(app): State<App>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    use axum::response::IntoResponse as _;
    const WHAT: &str = "invite links are the owner's to make";
    if let Err(e) = super::owner_only(&app, &method, &uri, &headers, WHAT).await {
        return e.into_response();
    }
    let Some(p2p) = &app.p2p else {
        return ApiError::not_found("this server runs no p2p node").into_response();
    };
    if body.len() > MAX_FORM_BYTES {
        return ApiError::too_large(Some(body.len() as u64), MAX_FORM_BYTES).into_response();
    }
    let ask: InviteAsk = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return ApiError::bad_request(format!("an invite takes {{\"uses\", \"ttl_secs\"}}: {e}"))
                .into_response();
        }
    };
    let req = crate::p2p::AdminRequest::Invite {
        dht: None,
        uses: ask.uses,
        ttl_secs: ask.ttl_secs,
    };
    match p2p.handle(req).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => ApiError::bad_request(e).into_response(),
    }
}

/// The version id of a section's `seq`th document in this process.
fn version(app: &App, section: &str, seq: u64) -> Version {
    VersionId::new(format!("{section}.{}", app.status.started_ms()), seq)
        .map(Version::one)
        .unwrap_or_else(|_| Version::root())
}

fn status_update(app: &App, section: &str, seq: u64, body: Bytes) -> Bytes {
    let parents = if seq > 1 {
        version(app, section, seq - 1)
    } else {
        Version::root()
    };
    frame::encode_update(&Update {
        version: version(app, section, seq),
        parents,
        body: UpdateBody::Snapshot(body),
        media_type: "application/json".into(),
        digest: None,
    })
}

/// A status resource: its current document, or (`Subscribe`) every new version of it.
async fn status(
    State(app): State<App>,
    Path(section): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response<Body> {
    const WHAT: &str = "the status resources are the owner's only";
    if let Err(e) = super::owner_only(&app, &method, &uri, &headers, WHAT).await {
        return e.into_response();
    }
    let braid = match BraidHeaders::parse(&headers) {
        Ok(b) => b,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let Some(mut rx) = app.status.subscribe(&section) else {
        return ApiError::not_found(format!("there is no status section {section}")).into_response();
    };
    let Some(now) = app.status.refresh(&section).await else {
        return ApiError::not_found(format!("there is no status section {section}")).into_response();
    };
    let mut res = match &braid.subscribe {
        None => {
            let mut res = Response::new(Body::from(now.body.clone()));
            if let Ok(v) =
                HeaderValue::from_str(&crate::braid::format_version(&version(&app, &section, now.seq)))
            {
                res.headers_mut().insert("version", v);
            }
            res
        }
        Some(subscribe) => {
            let first = status_update(&app, &section, now.seq, now.body);
            rx.borrow_and_update();
            let follow = Follow {
                first: Some(first),
                sent: now.seq,
                rx,
                app,
                section,
                method,
                uri,
                headers,
            };
            let stream = futures::stream::unfold(follow, |mut f| async move {
                let b = f.next().await?;
                Some((Ok::<_, std::io::Error>(b), f))
            });
            let mut res = Response::new(Body::from_stream(stream));
            *res.status_mut() = StatusCode::from_u16(209).expect("209");
            if let Ok(v) = HeaderValue::from_str(subscribe) {
                res.headers_mut().insert("subscribe", v);
            }
            res.headers_mut()
                .insert("x-accel-buffering", HeaderValue::from_static("no"));
            res
        }
    };
    let h = res.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-transform"),
    );
    h.insert("content-security-policy", HeaderValue::from_static("sandbox"));
    res
}

/// A subscription to one status section.
struct Follow {
    /// The current document, sent first.
    first: Option<Bytes>,
    /// The seq last sent.
    sent: u64,
    rx: tokio::sync::watch::Receiver<crate::status::Published>,
    app: App,
    section: String,
    /// The request, to check its credential again before each version.
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Follow {
    /// The next update block; `None` ends the subscription.
    async fn next(&mut self) -> Option<Bytes> {
        if let Some(b) = self.first.take() {
            return Some(b);
        }
        loop {
            tokio::select! {
                _ = self.app.shutdown.cancelled() => return None,
                r = self.rx.changed() => r.ok()?,
            }
            let p = self.rx.borrow_and_update().clone();
            if p.seq <= self.sent {
                continue;
            }
            // Each version goes to the owner only: a revoked token or an ended session
            // ends the subscription.
            let what = "the status resources are the owner's only";
            super::owner_only(&self.app, &self.method, &self.uri, &self.headers, what)
                .await
                .ok()?;
            self.sent = p.seq;
            return Some(status_update(&self.app, &self.section, p.seq, p.body));
        }
    }
}
