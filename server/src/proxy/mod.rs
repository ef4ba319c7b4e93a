//! The reverse proxy: Plait in front of an existing web app.
//!
//! Configured routes send path prefixes to upstream origins (the longest prefix wins);
//! everything else is Plait's own. Only configured upstreams are ever contacted: the
//! upstream of a request comes from the route table, never from the request.
//!
//! * [`forward`]: plain forwarding, streaming both ways, websocket upgrades passed through.
//! * [`cache`]: the Braid-aware caching proxy — one upstream subscription per resource,
//!   fanned out to every local subscriber (braid-http-04 §6.2.3).
//! * [`poll`]: live legacy routes — an upstream that does not speak Braid, polled with
//!   conditional requests on behalf of all its subscribers.
//!
//! This module knows nothing of documents or storage.

pub mod cache;
pub mod forward;
pub mod poll;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::body::Body;
use http::{Request, Response, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use crate::config::{Limits, ProxyRoute};

/// The local subscribers of something shared (an upstream subscription, a poller): how
/// many there are, and a wake-up for its task when the last one leaves. Joining happens
/// under the owner's map lock, so a task that sees none under that lock can end.
#[derive(Default)]
pub(crate) struct Locals {
    count: std::sync::atomic::AtomicUsize,
    emptied: tokio::sync::Notify,
}

impl Locals {
    pub(crate) fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves after the last subscriber has left (at once if that happened unobserved).
    pub(crate) async fn emptied(&self) {
        self.emptied.notified().await;
    }
}

/// Something local subscribers share.
pub(crate) trait Shared {
    fn locals(&self) -> &Locals;
}

/// One local subscriber of `T`, counted for as long as it lives.
pub(crate) struct Local<T: Shared>(pub(crate) Arc<T>);

impl<T: Shared> Local<T> {
    pub(crate) fn join(shared: Arc<T>) -> Local<T> {
        shared
            .locals()
            .count
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Local(shared)
    }
}

impl<T: Shared> Drop for Local<T> {
    fn drop(&mut self) {
        let l = self.0.locals();
        if l.count.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            l.emptied.notify_one();
        }
    }
}

/// A route: a path prefix and its upstream.
#[derive(Debug, Clone)]
pub struct Route {
    pub prefix: String,
    /// Scheme and authority of the upstream.
    pub upstream: Uri,
    /// For live routes: how often to poll.
    pub live: Option<Duration>,
}

/// Timeouts and limits of forwarding (from `config::Limits`).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub max_body_bytes: u64,
    pub grace: Duration,
}

impl Settings {
    pub fn from_limits(l: &Limits) -> Settings {
        Settings {
            connect_timeout: Duration::from_millis(l.proxy_connect_timeout_ms),
            response_timeout: Duration::from_millis(l.proxy_response_timeout_ms),
            max_body_bytes: l.max_proxy_body_bytes,
            grace: Duration::from_millis(l.proxy_subscription_grace_ms),
        }
    }
}

/// The proxy: routes, a pooled client, and the shared upstream subscriptions.
pub struct Proxy {
    routes: Vec<Route>,
    client: Client<HttpConnector, Body>,
    settings: Settings,
    shutdown: CancellationToken,
    /// Shared upstream subscriptions by upstream URL.
    subscriptions: Mutex<HashMap<String, Weak<cache::Upstream>>>,
    /// Pollers of live routes by upstream URL.
    pollers: Mutex<HashMap<String, Weak<poll::Poller>>>,
}

impl Proxy {
    /// A proxy for `routes`; `None` when there are none.
    pub fn new(
        routes: &[ProxyRoute],
        limits: &Limits,
        shutdown: CancellationToken,
    ) -> Result<Option<Arc<Proxy>>, String> {
        if routes.is_empty() {
            return Ok(None);
        }
        let mut table = Vec::new();
        for r in routes {
            let upstream: Uri = r
                .upstream
                .parse()
                .map_err(|e| format!("proxy upstream {:?}: {e}", r.upstream))?;
            table.push(Route {
                prefix: r.prefix.clone(),
                upstream,
                live: r.live.then(|| Duration::from_millis(r.poll_interval_ms.max(50))),
            });
        }
        table.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        let settings = Settings::from_limits(limits);
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(limits.proxy_idle_timeout_secs))
            .build(connector);
        Ok(Some(Arc::new(Proxy {
            routes: table,
            client,
            settings,
            shutdown,
            subscriptions: Mutex::new(HashMap::new()),
            pollers: Mutex::new(HashMap::new()),
        })))
    }

    /// The route a path belongs to: the longest prefix that matches whole segments
    /// (`/api` takes `/api` and `/api/x`, not `/apiary`).
    pub fn route_for(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| prefix_matches(&r.prefix, path))
    }

    /// Serves a request that belongs to `route`.
    pub async fn handle(
        self: &Arc<Self>,
        route: &Route,
        req: Request<Body>,
        from: crate::http::forwarded::Remote,
    ) -> Response<Body> {
        if has_dot_segments(req.uri().path()) {
            return crate::http::error::ApiError::bad_request(
                "paths with . or .. segments are not forwarded",
            )
            .into_response();
        }
        let subscribe = req.method() == http::Method::GET
            && req
                .headers()
                .get("subscribe")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v != "false" && v != "?0");
        if subscribe {
            let url = upstream_url(route, req.uri());
            if let Some(interval) = route.live {
                return poll::subscribe(self, url, interval, req).await;
            }
            return cache::subscribe(self, route, url, req, from).await;
        }
        forward::forward(self, route, req, from).await
    }
}

/// Whether `prefix` covers `path` on a segment boundary.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'))
}

/// Whether a path has `.` or `..` segments (plain or percent-encoded): such paths are
/// refused rather than forwarded, so a prefix never reaches outside itself upstream.
pub fn has_dot_segments(path: &str) -> bool {
    path.split('/').any(|seg| {
        let seg = seg.to_ascii_lowercase().replace("%2e", ".");
        seg == "." || seg == ".."
    })
}

/// The upstream URL for a request: the route's origin with the request's path and query.
pub fn upstream_url(route: &Route, uri: &Uri) -> Uri {
    let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut parts = route.upstream.clone().into_parts();
    parts.path_and_query = pq.parse().ok();
    Uri::from_parts(parts).unwrap_or_else(|_| route.upstream.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(prefixes: &[&str]) -> Arc<Proxy> {
        let routes: Vec<ProxyRoute> = prefixes
            .iter()
            .map(|p| format!("{p}=http://127.0.0.1:9").parse().unwrap())
            .collect();
        Proxy::new(&routes, &Limits::default(), CancellationToken::new())
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn longest_prefix_on_segment_boundaries() {
        let p = proxy(&["/api", "/api/v2", "/static/"]);
        assert_eq!(p.route_for("/api").unwrap().prefix, "/api");
        assert_eq!(p.route_for("/api/x").unwrap().prefix, "/api");
        assert_eq!(p.route_for("/api/v2/x").unwrap().prefix, "/api/v2");
        assert_eq!(p.route_for("/api/v2").unwrap().prefix, "/api/v2");
        assert_eq!(p.route_for("/api/v20").unwrap().prefix, "/api");
        assert!(p.route_for("/apiary").is_none());
        assert_eq!(p.route_for("/static/a.css").unwrap().prefix, "/static/");
        assert!(p.route_for("/").is_none());
    }

    #[test]
    fn dot_segments() {
        assert!(has_dot_segments("/api/../x"));
        assert!(has_dot_segments("/api/%2E%2e/x"));
        assert!(has_dot_segments("/api/./x"));
        assert!(!has_dot_segments("/api/..x/y"));
        assert!(!has_dot_segments("/api/file.txt"));
    }

    #[test]
    fn upstream_url_keeps_path_and_query() {
        let route = Route {
            prefix: "/api".into(),
            upstream: "http://127.0.0.1:9".parse().unwrap(),
            live: None,
        };
        let u = upstream_url(&route, &"/api/x?y=1".parse().unwrap());
        assert_eq!(u.to_string(), "http://127.0.0.1:9/api/x?y=1");
    }
}
