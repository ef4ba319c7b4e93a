//! Real upstream servers for the proxy tests: a plain HTTP origin and a websocket echo
//! server, each on its own port, counting what reaches them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// What the plain origin has seen and serves.
#[derive(Default)]
pub struct OriginState {
    /// Requests received, all paths.
    pub requests: AtomicUsize,
    /// Requests to `/etag` answered 304.
    pub not_modified: AtomicUsize,
    /// The body of `/etag` (its ETag is derived from it).
    pub etag_body: Mutex<String>,
}

/// A plain HTTP/1.1 origin:
/// * `/echo` — the request's method, path and headers as JSON;
/// * `/stream` — `first`, then after 500 ms `second`;
/// * `/upload` — the number of body bytes received;
/// * `/slow` — answers after 3 s;
/// * `/etag` — `etag_body`, with an ETag, honouring `If-None-Match`;
/// * anything else — `{"from":"origin","path":…}` as JSON.
pub struct Origin {
    pub addr: SocketAddr,
    pub state: Arc<OriginState>,
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

async fn origin(req: Request<Incoming>, state: Arc<OriginState>) -> Result<Response<Body>, Infallible> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    Ok(match path.as_str() {
        p if p.ends_with("/echo") => {
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").into()))
                .collect();
            let body = serde_json::json!({"method": req.method().as_str(), "path": req.uri().to_string(), "headers": headers});
            let mut r = Response::new(full(body.to_string()));
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            r.headers_mut().insert("keep-alive", "timeout=5".parse().unwrap());
            r.headers_mut().insert("x-origin", "yes".parse().unwrap());
            r
        }
        p if p.ends_with("/stream") => {
            let s = futures::stream::unfold(0, |i| async move {
                match i {
                    0 => Some((Ok(Frame::data(Bytes::from_static(b"first"))), 1)),
                    1 => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        Some((Ok(Frame::data(Bytes::from_static(b"second"))), 2))
                    }
                    _ => None,
                }
            });
            Response::new(BodyExt::boxed(StreamBody::new(s)))
        }
        p if p.ends_with("/upload") => {
            let mut n = 0usize;
            let mut body = req.into_body();
            while let Some(Ok(f)) = body.frame().await {
                if let Ok(d) = f.into_data() {
                    n += d.len();
                }
            }
            Response::new(full(n.to_string()))
        }
        p if p.ends_with("/slow") => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Response::new(full("late"))
        }
        p if p.ends_with("/etag") => {
            let body = state.etag_body.lock().unwrap().clone();
            let etag = format!("\"{}\"", blake3::hash(body.as_bytes()).to_hex());
            if req.headers().get("if-none-match").and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
                state.not_modified.fetch_add(1, Ordering::SeqCst);
                let mut r = Response::new(full(""));
                *r.status_mut() = hyper::StatusCode::NOT_MODIFIED;
                r.headers_mut().insert("etag", etag.parse().unwrap());
                r
            } else {
                let mut r = Response::new(full(body));
                r.headers_mut().insert("etag", etag.parse().unwrap());
                r.headers_mut()
                    .insert("content-type", "text/plain".parse().unwrap());
                r
            }
        }
        _ => {
            let mut r = Response::new(full(
                serde_json::json!({"from": "origin", "path": path}).to_string(),
            ));
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            r
        }
    })
}

impl Origin {
    pub async fn start() -> Origin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(OriginState::default());
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| origin(req, st.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Origin { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A websocket server that sends every message back.
pub async fn websocket_echo() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() || m.is_binary() {
                        let _ = ws.send(m).await;
                    }
                }
            });
        }
    });
    addr
}
