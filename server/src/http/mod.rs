//! The HTTP server: accepting connections, routing, and shutting down gracefully.
//!
//! Every connection is accepted at once; one past `limits.max_connections` (or past
//! `limits.max_connections_per_address` for its address) is answered `503` with
//! `Retry-After` and closed, instead of waiting unanswered in the kernel's accept queue.
//! A connection keeps its place until its socket closes, also as a websocket. Idle
//! connections, stalled bodies and peers that stop answering pings are let go
//! (`conn` has the details). Each connection speaks HTTP/1.1 or HTTP/2 (many
//! subscriptions on one connection): cleartext, or over TLS when `[tls]` is set (`tls`
//! has the details; the handshake happens inside the connection's slot).
//!
//! On shutdown the listener stops, every open subscription ends its response cleanly,
//! in-flight requests get `limits.shutdown_grace_secs` to finish, and then the process
//! exits.

pub mod acme;
pub mod conn;
pub mod dashboard;
pub mod error;
pub mod forwarded;
pub mod hold;
pub mod mirror;
pub mod multiplex;
pub mod resource;
pub mod static_files;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::routing::get;
use http::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use plait_bridge::Identity;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Limits;
use crate::engine::Engine;

/// Most bytes buffered per HTTP/1.1 connection (hyper's read and write buffers each).
const MAX_CONNECTION_BUFFER: usize = 64 * 1024;
/// `Retry-After` of a connection refused at a connection cap.
const RETRY_AFTER_SECS: u64 = 5;

/// What every request handler can reach: one shared [`AppParts`]. Cloned for every
/// request (the router's state), so a clone is one reference count, not one per part.
#[derive(Clone)]
pub struct App(Arc<AppParts>);

impl App {
    pub fn new(parts: AppParts) -> App {
        App(Arc::new(parts))
    }
}

impl std::ops::Deref for App {
    type Target = AppParts;

    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// The parts of [`App`].
pub struct AppParts {
    pub engine: Engine,
    /// The instance's identity: whose namespace `/` is.
    pub identity: Identity,
    pub limits: Arc<Limits>,
    /// Who may do what: callers, accounts and sessions, tokens, the rules.
    pub access: crate::access::Access,
    /// Routes to upstream origins, if any are configured.
    pub proxy: Option<Arc<crate::proxy::Proxy>>,
    /// Static files, if a web dir is configured.
    pub web: Option<Arc<static_files::StaticFiles>>,
    /// The peer-to-peer node, unless it is off.
    pub p2p: Option<Arc<crate::p2p::P2p>>,
    /// Replicas of other members' resources (with the p2p node).
    pub federation: Option<Arc<crate::federation::Federation>>,
    /// `[mirror]`: how changes are batched into sealed segments (published).
    pub mirror: crate::mirror::MirrorSettings,
    /// The server is reached over HTTPS (`public_url`): cookies are `Secure`, signed requests name `https:` URIs.
    pub https: bool,
    /// Cancelled when the server begins to shut down; open subscriptions end on it.
    pub shutdown: CancellationToken,
    pub started: Instant,
    /// `trusted_proxies`: whose forwarding headers are believed.
    pub trusted_proxies: Arc<forwarded::TrustedProxies>,
    /// Refusals since start, by code (published at `/.well-known/plait`).
    pub refusals: Arc<crate::refusals::Refusals>,
    /// Statebus messages per client address (`limits.statebus_messages_per_second_per_address`).
    pub statebus_messages: Arc<crate::statebus::MessageRate>,
    /// Which answers wait before they are sent (429s, repeated bad requests).
    pub holds: Arc<hold::Holds>,
    /// The open Statebus connections (the v6 `connections` state).
    pub statebus_connections: Arc<crate::statebus::connections::Registry>,
    /// Connections, subscriptions, deliveries: what `[metrics] path` shows.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// `[metrics]`: where metrics are served.
    pub metrics_settings: crate::config::MetricsSettings,
    /// The owner's status resources, which the admin dashboard follows.
    pub status: Arc<crate::status::Status>,
    /// Open Braid multiplexers (`multiplex`).
    pub multiplexers: Arc<multiplex::Multiplexers>,
}

/// The routes: well-known resources and `[metrics] path`, then every other path is a
/// Braid resource.
pub fn router(app: App) -> Router {
    let mut router = Router::new()
        .route("/.well-known/plait", get(well_known))
        // GET for HTTP/1.1, CONNECT for HTTP/2 (RFC 8441).
        .route(
            "/_connect_to_statebus_/websocket",
            get(statebus_websocket).connect(statebus_websocket),
        )
        .route("/.well-known/plait/join", axum::routing::post(join))
        .merge(dashboard::routes())
        .merge(mirror::routes())
        .route(
            "/.well-known/multiplexer/{*ids}",
            axum::routing::any(multiplex::endpoint),
        );
    if !app.metrics_settings.path.is_empty() {
        router = router.route(&app.metrics_settings.path, get(metrics_for_owner));
    }
    router
        .fallback(dispatch)
        .layer(axum::middleware::map_response(no_sniffing))
        .layer(axum::middleware::from_fn_with_state(
            app.holds.clone(),
            hold::answers,
        ))
        .layer(axum::middleware::from_fn_with_state(
            app.refusals.clone(),
            count_refusal,
        ))
        // Outermost: a multiplexed request's response, refusals and all, is what the
        // layers inside made of it.
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            multiplex::through,
        ))
        .with_state(app)
}

/// Tallies (and logs) every refusal the HTTP layer sends: a client error or an
/// unavailable server, by its `Plait-Error` code (or its status when it has none, such as
/// a 404), with the reason it gave.
async fn count_refusal(
    State(refusals): State<Arc<crate::refusals::Refusals>>,
    req: Request<Body>,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let client = req.extensions().get::<Peer>().map(|p| p.0.ip());
    let res = next.run(req).await;
    let status = res.status();
    if status.is_client_error() || status.is_server_error() {
        let code = res.headers().get("plait-error").and_then(|v| v.to_str().ok());
        let reason = match res.extensions().get::<crate::refusals::Reason>() {
            Some(r) => r.0.as_str(),
            None => status.canonical_reason().unwrap_or("no reason given"),
        };
        refusals.count(
            code.unwrap_or(status.as_str()),
            reason,
            client,
            format_args!("{method} {} ({})", uri.path(), status.as_u16()),
        );
    }
    res
}

/// `GET` of `[metrics] path` on the public listener: the Prometheus text, for the owner
/// only (a token, the owner's signature or session), as other owner-only figures are.
async fn metrics_for_owner(
    State(app): State<App>,
    method: http::Method,
    uri: http::Uri,
    headers: http::HeaderMap,
) -> axum::response::Response {
    match owner_only(&app, &method, &uri, &headers, "metrics are the owner's only").await {
        Ok(()) => metrics_text(&app).await,
        Err(e) => e.into_response(),
    }
}

/// The one check of what is the owner's alone (metrics, the status resources): the
/// request's credential must make it the owner; 401 without one, 403 with another.
pub(crate) async fn owner_only(
    app: &App,
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    what: &str,
) -> Result<(), error::ApiError> {
    let auth = resource::authenticate(app, method, uri, headers).await?;
    match auth.caller {
        crate::access::Caller::Owner => Ok(()),
        c if c.is_anonymous() => Err(error::ApiError::unauthenticated(what)),
        _ => Err(error::ApiError::forbidden(what)),
    }
}

/// The Prometheus text of this server.
async fn metrics_text(app: &App) -> axum::response::Response {
    let text = app
        .metrics
        .render(crate::metrics::Sources {
            engine: &app.engine,
            refusals: &app.refusals,
            p2p: app.p2p.as_deref(),
        })
        .await;
    let mut res = axum::response::Response::new(Body::from(text));
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    res
}

/// Serves `[metrics] path` alone, to whoever reaches `listener` (`[metrics] listen`: an
/// address only the operator's Prometheus can reach), until shutdown.
pub async fn serve_metrics(listener: TcpListener, app: App) {
    let path = app.metrics_settings.listener_path().to_string();
    let shutdown = app.shutdown.clone();
    let router = Router::new()
        .route(
            &path,
            get(|State(app): State<App>| async move { metrics_text(&app).await }),
        )
        .layer(axum::middleware::map_response(no_sniffing))
        .with_state(app);
    let served = axum::serve(listener, router).with_graceful_shutdown(async move {
        shutdown.cancelled().await;
    });
    if let Err(e) = served.await {
        tracing::warn!(error = %e, "the metrics listener failed");
    }
}

/// Every response's type is what it says: browsers never guess one (a state written as
/// text is never run as a script or page).
async fn no_sniffing(mut res: axum::response::Response) -> axum::response::Response {
    res.headers_mut().insert(
        "x-content-type-options",
        http::HeaderValue::from_static("nosniff"),
    );
    res
}

/// Decides who answers a request that is not a well-known route: a proxy route (longest
/// prefix), then a static file, then the state. Requests that would make this server an
/// open proxy are refused first.
async fn dispatch(State(app): State<App>, req: Request<Body>) -> axum::response::Response {
    if req.method().as_str() == multiplex::METHOD {
        return multiplex::multiplex_method(app, req).await;
    }
    // A websocket over HTTP/2 (extended CONNECT) names a path here, not a host to reach:
    // it may go to a proxy route, nowhere else.
    let h2_websocket = crate::proxy::forward::is_h2_websocket(&req);
    let proxied = app
        .proxy
        .as_ref()
        .is_some_and(|p| p.route_for(req.uri().path()).is_some());
    if req.method() == http::Method::CONNECT && !(h2_websocket && proxied) {
        return error::ApiError::new(
            405,
            "not-a-proxy",
            "CONNECT is refused: this server is not an open proxy",
        )
        .into_response();
    }
    // An HTTP/1 request naming another host (absolute form); HTTP/2 always names one.
    if req.version() < http::Version::HTTP_2 && req.uri().authority().is_some() {
        return error::ApiError::bad_request(
            "absolute-form requests are refused: this server is not an open proxy",
        )
        .into_response();
    }
    if let Some(proxy) = &app.proxy
        && let Some(route) = proxy.route_for(req.uri().path())
    {
        let route = route.clone();
        // Reads through the proxy, and the caching proxy's shared subscriptions above
        // all, are served by this server: the rules say who may read them. What the
        // proxied app lets its clients write is its own affair.
        if (h2_websocket || matches!(*req.method(), http::Method::GET | http::Method::HEAD))
            && let Err(e) = proxied_read_allowed(&app, req.method(), req.uri(), req.headers()).await
        {
            return e.into_response();
        }
        let from = req
            .extensions()
            .get::<forwarded::Remote>()
            .copied()
            .unwrap_or(forwarded::Remote {
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                trusted: false,
                https: false,
            });
        return proxy.handle(&route, req, from).await;
    }
    if let Some(web) = &app.web
        && let Some(res) = web.serve(req.method(), req.uri().path(), req.headers()).await
    {
        return res;
    }
    resource::handle(app, req).await
}

/// Whether the caller of a GET through the proxy may read its path (as a path of this
/// instance's namespace).
async fn proxied_read_allowed(
    app: &App,
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
) -> Result<(), error::ApiError> {
    let auth = resource::authenticate(app, method, uri, headers).await?;
    let path = percent_encoding::percent_decode_str(uri.path())
        .decode_utf8()
        .map_err(|_| error::ApiError::bad_request("the path is not UTF-8"))?;
    let path = crate::model::ResourcePath::new(path.trim_start_matches('/'))?;
    let key = crate::model::ResourceKey::new(app.identity, path);
    app.access.check(&auth.caller, &key, crate::access::Op::Read)?;
    Ok(())
}

/// The Statebus websocket (both dialects), at the path statebus clients use.
/// The upgrade request's credential (a bearer token, a signature, a login session cookie)
/// is the connection's caller until it logs in as an account.
async fn statebus_websocket(
    State(app): State<App>,
    axum::Extension(Peer(peer)): axum::Extension<Peer>,
    activity: Option<axum::Extension<conn::Activity>>,
    method: http::Method,
    uri: http::Uri,
    headers: http::HeaderMap,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let auth = match resource::authenticate(&app, &method, &uri, &headers).await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let max = app.limits.max_body_bytes;
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            // Over HTTP/2 the websocket is a stream of a connection that must not be
            // closed as idle while it is open.
            let in_flight = activity.map(|a| a.begin());
            let services = crate::statebus::Services {
                engine: app.engine.clone(),
                identity: app.identity,
                access: app.access.clone(),
                limits: app.limits.clone(),
                shutdown: app.shutdown.clone(),
                refusals: app.refusals.clone(),
                messages: app.statebus_messages.clone(),
                metrics: app.metrics.clone(),
                connections: app.statebus_connections.clone(),
            };
            let session =
                crate::statebus::session::run(socket, services, peer.ip(), auth.caller, auth.session);
            async move {
                session.await;
                drop(in_flight);
            }
        })
        .into_response()
}

/// `GET /.well-known/plait`: who this server is and the limits it applies. The p2p node's
/// addresses, members and peers are shown to the owner only.
async fn well_known(
    State(app): State<App>,
    method: http::Method,
    uri: http::Uri,
    headers: http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let owner = match resource::authenticate(&app, &method, &uri, &headers).await {
        Ok(a) => matches!(a.caller, crate::access::Caller::Owner),
        Err(e) => return e.into_response(),
    };
    let access = app.access.settings();
    axum::Json(serde_json::json!({
        "name": "plait",
        "version": env!("CARGO_PKG_VERSION"),
        "id": app.identity.to_string(),
        "store": app.engine.storage().backend(),
        "uptime_secs": app.started.elapsed().as_secs(),
        "resources_in_memory": app.engine.live_resources(),
        // Clients' subscriptions: not the server's own followers of the rules and sessions.
        "subscriptions": app.engine.subscriptions_outside(Some(app.access.accounts().master())),
        // Braid multiplexers open (each carries some of those subscriptions).
        "multiplexers": app.multiplexers.len(),
        "rss_bytes": rss_bytes(),
        // Refusals since start by code, as relays publish theirs: which limits bite.
        "refusals": app.refusals.snapshot(),
        "limits": published_limits(&app),
        // The owner's admin dashboard, and the status resources it follows (owner only).
        "dashboard": dashboard::DASHBOARD_PATH,
        "status": crate::status::SECTIONS.iter().map(|s| format!("{}{s}", dashboard::STATUS_PATH)).collect::<Vec<_>>(),
        "dashboard_settings": app.status.settings(),
        "access": {
            "public_writes": access.public_writes,
            "rules": format!("/{}", crate::access::RULES_URL_PATH),
            "credentials": ["Bearer (plait token)", "HTTP Message Signatures (RFC 9421, ed25519)", "login session (current_user)"],
            "signature_max_skew_secs": access.signature_max_skew_secs,
            "session_lifetime_secs": access.session_lifetime_secs,
            "owner_session_lifetime_secs": access.owner_session_lifetime_secs,
            "logins_per_minute_per_address": access.logins_per_minute_per_address,
            "login_failures_per_hour_per_account": access.login_failures_per_hour_per_account,
            "account_creations_per_hour_per_address": access.account_creations_per_hour_per_address,
        },
        "mirror": {
            "segment_max_bytes": app.mirror.segment_max_bytes,
            "segment_max_delay_ms": app.mirror.segment_max_delay_ms,
            "checkpoint_ratio": app.mirror.checkpoint_ratio,
            "checkpoint_min_bytes": app.mirror.checkpoint_min_bytes,
            "http_max_descriptors": app.mirror.http_max_descriptors,
            "follow_interval_ms": app.mirror.follow_interval_ms,
            "max_push_bytes": plait_bridge::mirror::wire::MAX_SEGMENT_BYTES,
            "max_snapshot_bytes": plait_bridge::mirror::wire::MAX_SNAPSHOT_BYTES,
        },
        "p2p": match &app.p2p {
            Some(p) if owner => serde_json::json!({
                "enabled": true,
                "status": p.node.status(),
                "mirror": p.mirror_health().await,
            }),
            Some(_) => serde_json::json!({ "enabled": true }),
            None => serde_json::json!({ "enabled": false }),
        },
    }))
    .into_response()
}

/// The limits `/.well-known/plait` publishes, each under its setting's name.
fn published_limits(app: &App) -> serde_json::Value {
    serde_json::json!({
        "max_body_bytes": app.limits.max_body_bytes,
        "max_connections": app.limits.max_connections,
        "max_streams_per_connection": app.limits.max_streams_per_connection,
        "header_read_timeout_secs": app.limits.header_read_timeout_secs,
        "subscriber_queue": app.engine.config().subscriber_queue,
        "correction_delay_ms": app.engine.config().correction_delay.as_millis() as u64,
        "writes_per_second": app.engine.write_limits().writes_per_second,
        "write_burst": app.engine.write_limits().write_burst,
        "write_bytes_per_second": app.engine.write_limits().write_bytes_per_second,
        "write_bytes_burst": app.engine.write_limits().write_bytes_burst,
        "document_work_ms_per_second": app.engine.write_limits().document_work_ms_per_second,
        "document_work_burst_ms": app.engine.write_limits().document_work_burst_ms,
        "max_stored_bytes_per_namespace": app.engine.write_limits().max_stored_bytes_per_namespace,
        "max_stored_bytes_per_identity": app.engine.write_limits().max_stored_bytes_per_identity,
        "min_heartbeat_ms": crate::braid::headers::MIN_HEARTBEAT.as_millis() as u64,
        "proxy_connect_timeout_ms": app.limits.proxy_connect_timeout_ms,
        "proxy_response_timeout_ms": app.limits.proxy_response_timeout_ms,
        "proxy_idle_timeout_secs": app.limits.proxy_idle_timeout_secs,
        "max_proxy_body_bytes": app.limits.max_proxy_body_bytes,
        "proxy_subscription_grace_ms": app.limits.proxy_subscription_grace_ms,
        "max_json_depth": app.engine.write_limits().max_json_depth,
        "max_patches_per_request": app.engine.write_limits().max_patches_per_request,
        "max_connections_per_address": app.limits.max_connections_per_address,
        "idle_timeout_secs": app.limits.idle_timeout_secs,
        "body_read_timeout_secs": app.limits.body_read_timeout_secs,
        "ping_interval_secs": app.limits.ping_interval_secs,
        "ping_timeout_secs": app.limits.ping_timeout_secs,
        "max_statebus_subscriptions": app.limits.max_statebus_subscriptions,
        "rate_limited_delay_ms": app.limits.rate_limited_delay_ms,
        "bad_requests_per_second_per_address": app.limits.bad_requests_per_second_per_address,
        "statebus_messages_per_second_per_address": app.limits.statebus_messages_per_second_per_address,
        "tls_handshake_timeout_secs": app.limits.tls_handshake_timeout_secs,
        "max_requests_per_multiplexer": app.limits.max_requests_per_multiplexer,
        "max_multiplexers_per_address": app.limits.max_multiplexers_per_address,
        "multiplexer_wait_ms": app.limits.multiplexer_wait_ms,
    })
}

/// An invitee's server presents an invite (`plait join`): answered with a grant, or 403.
async fn join(State(app): State<App>, req: Request<Body>) -> axum::response::Response {
    let Some(p2p) = &app.p2p else {
        return error::ApiError::not_found("this server runs no p2p node").into_response();
    };
    let body = match axum::body::to_bytes(req.into_body(), crate::p2p::MAX_JOIN_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return error::ApiError::new(413, "body-too-large", "a join request is at most 64 KiB")
                .into_response();
        }
    };
    match p2p.admit(&body).await {
        Ok(grant) => axum::response::IntoResponse::into_response(axum::Json(grant)),
        Err(e) => error::ApiError::from(e).into_response(),
    }
}

/// Resident memory of this process (Linux: `/proc/self/statm`), for status and load tests.
pub(crate) fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system setting.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok().filter(|&p| p > 0).unwrap_or(4096))
}

/// HTTPS for the main listener, and the plain listener that redirects to it.
pub struct Https {
    pub tls: Arc<tls::Tls>,
    /// `tls.redirect_listen`: its listener and where it sends clients.
    pub redirect: Option<(TcpListener, tls::RedirectTarget)>,
    /// With ACME: the HTTP-01 answers the redirect listener gives.
    pub challenges: Option<Arc<acme::Challenges>>,
}

/// What every connection of every listener shares: the caps, the protocol settings, the
/// tracker that shutdown waits on.
struct Accepting {
    gate: Arc<conn::Gate>,
    builder: hyper_util::server::conn::auto::Builder<TokioExecutor>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    refusals: Arc<crate::refusals::Refusals>,
    trusted: Arc<forwarded::TrustedProxies>,
    idle: Duration,
    body_timeout: Duration,
    /// How long a connection past its address's cap waits for its 503
    /// (`limits.rate_limited_delay_ms`).
    refusal_hold: Duration,
}

/// Serves connections from `listener` (over TLS with `https`, and the redirect listener
/// beside it) until `app.shutdown` is cancelled, then drains.
pub async fn serve(listener: TcpListener, app: App, https: Option<Https>) {
    let limits = app.limits.clone();
    let shutdown = app.shutdown.clone();
    let trusted = app.trusted_proxies.clone();
    let refusals = app.refusals.clone();
    let gate = conn::Gate::new(
        limits.max_connections,
        limits.max_connections_per_address,
        trusted.clone(),
        app.metrics.connections(),
    );
    let router = router(app);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(limits.header_read_timeout_secs.max(1)))
        // Bounds what a connection whose client stopped reading can hold in memory.
        .max_buf_size(MAX_CONNECTION_BUFFER);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams_per_connection.max(1))
        // Websockets over HTTP/2 (RFC 8441): the Statebus websocket takes extended CONNECT.
        .enable_connect_protocol()
        // A peer that stopped answering (its subscriptions still open) is let go.
        .keep_alive_interval(Duration::from_secs(limits.ping_interval_secs.max(1)))
        .keep_alive_timeout(Duration::from_secs(limits.ping_timeout_secs.max(1)));
    let accepting = Arc::new(Accepting {
        gate,
        builder,
        tracker: TaskTracker::new(),
        shutdown,
        refusals,
        trusted,
        idle: Duration::from_secs(limits.idle_timeout_secs.max(1)),
        body_timeout: Duration::from_secs(limits.body_read_timeout_secs.max(1)),
        refusal_hold: Duration::from_millis(limits.rate_limited_delay_ms),
    });
    let (tls, redirect, challenges) = match https {
        Some(h) => (Some(h.tls), h.redirect, h.challenges),
        None => (None, None, None),
    };
    let redirecting = async {
        if let Some((listener, target)) = redirect {
            let router = tls::redirect_router(target, challenges);
            accept_loop(listener, router, None, &accepting).await;
        }
    };
    tokio::join!(accept_loop(listener, router, tls, &accepting), redirecting);
    accepting.tracker.close();
    let grace = Duration::from_secs(limits.shutdown_grace_secs);
    if tokio::time::timeout(grace, accepting.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = accepting.tracker.len(),
            "connections still open after the grace period; closing them"
        );
    }
}

/// Accepts connections on one listener until shutdown, each served by `router` in a
/// task of `a.tracker`, after a TLS handshake when `tls` is given.
async fn accept_loop(listener: TcpListener, router: Router, tls: Option<Arc<tls::Tls>>, a: &Arc<Accepting>) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = a.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let slot = match a.gate.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(full) => {
                let reason = match full {
                    conn::Full::Server => "limits.max_connections connections are open",
                    conn::Full::Address => {
                        "limits.max_connections_per_address connections are open from this address"
                    }
                };
                a.refusals
                    .count(full.code(), reason, Some(peer.ip()), format_args!("a connection"));
                conn::refuse(
                    &a.gate,
                    stream,
                    full,
                    RETRY_AFTER_SECS,
                    a.refusal_hold,
                    tls.clone(),
                );
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let tls = tls.clone();
        let a2 = a.clone();
        a.tracker.spawn(async move {
            // The slot travels with the socket, through the handshake and any upgrade.
            let io = conn::Held::new(stream, slot);
            match tls {
                None => serve_connection(TokioIo::new(io), peer, false, router, &a2).await,
                Some(tls) => {
                    let handshake = tokio::select! {
                        r = tls.handshake(io) => r,
                        _ = a2.shutdown.cancelled() => return,
                    };
                    match handshake {
                        Ok(io) => serve_connection(TokioIo::new(io), peer, true, router, &a2).await,
                        Err(e) => a2.refusals.count(
                            e.code(),
                            "the TLS handshake failed or did not finish in time",
                            Some(peer.ip()),
                            format_args!("a connection: {e}"),
                        ),
                    }
                }
            }
        });
    }
}

/// Serves HTTP/1.1 or HTTP/2 on one connection (`https`: over TLS) until it ends, goes
/// idle or the server shuts down.
async fn serve_connection<I>(io: TokioIo<I>, peer: SocketAddr, https: bool, router: Router, a: &Accepting)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = conn::Activity::new();
    let body_timeout = a.body_timeout;
    let svc = {
        let activity = activity.clone();
        let trusted = a.trusted.clone();
        tower::service_fn(move |req: Request<hyper::body::Incoming>| {
            let in_flight = activity.begin();
            let mut req = req.map(|b| Body::new(conn::TimedBody::new(b, body_timeout)));
            let client = forwarded::client_addr(peer, req.headers(), &trusted);
            req.extensions_mut().insert(Peer(client));
            req.extensions_mut().insert(forwarded::Remote {
                addr: peer,
                trusted: trusted.contains(peer.ip()),
                https,
            });
            // An HTTP/2 websocket outlives its request's response body: it counts itself.
            req.extensions_mut().insert(activity.clone());
            let call = tower::ServiceExt::oneshot(router.clone(), req);
            // Boxed: hyper keeps a request's future in its task for as long as the
            // response body streams (an HTTP/2 subscription's whole life), sized for the
            // largest state; boxed, the task holds a pointer and the future is freed once
            // the response is made.
            Box::pin(async move {
                let res = call.await?;
                // The request stays in flight until its response body is done with.
                Ok::<_, std::convert::Infallible>(res.map(|b| {
                    Body::new(http_body_util::BodyExt::map_frame(b, move |f| {
                        let _held = &in_flight;
                        f
                    }))
                }))
            })
        })
    };
    let svc = TowerToHyperService::new(svc);
    let conn = a.builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            return;
        }
        _ = a.shutdown.cancelled() => {}
        _ = activity.idle_for(a.idle) => {
            tracing::debug!(%peer, "closing an idle connection");
        }
    }
    conn.as_mut().graceful_shutdown();
    // A peer that does not take part in the goodbye (HTTP/2 waits for a ping's
    // answer) is cut off after a while; on shutdown the tracker's grace applies.
    let _ = tokio::time::timeout(a.idle, conn).await;
}

/// The client's address: the connection's peer, or the client a trusted proxy forwards
/// for ([`forwarded::client_addr`]). Per-address limits key on it.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);
