//! What one TCP connection may hold and for how long: the connection caps, the idle
//! watchdog, and the timeout between pieces of a request body.
//!
//! * **Caps.** A connection holds a [`Slot`]: a permit of `limits.max_connections` and a
//!   count under its address (`limits.max_connections_per_address`; connections from
//!   `trusted_proxies` are not counted, everyone behind a proxy shares its address). The
//!   slot lives inside the connection's IO ([`Held`]), so a connection upgraded to a
//!   websocket (Statebus, or tunnelled by the proxy) keeps it until the socket closes.
//!   Past a cap the connection is answered at once with `503` and `Retry-After`
//!   ([`refuse`]) instead of waiting unanswered in the accept queue.
//! * **Idle.** [`Activity`] counts a connection's requests in flight (a request is in
//!   flight until its response body is dropped, so an open subscription is never idle);
//!   a connection with none for `limits.idle_timeout_secs` — a keep-alive HTTP/1.1
//!   connection, an HTTP/2 connection without streams, a socket that never finished its
//!   first request line or HTTP/2 preface — is shut down.
//! * **Slow bodies.** [`TimedBody`] fails a request body whose next piece takes longer than
//!   `limits.body_read_timeout_secs`, so a body that never ends does not hold its request.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::address::AddressKey;

/// Connections being refused at once; past this a refused connection is just closed
/// (each one holds a socket for up to [`REFUSAL_LINGER`]).
const MAX_REFUSALS: usize = 256;
/// How long a refused connection is kept for its answer (a TLS handshake, then `503` to
/// whatever it asks), so that closing it does not cut the client off before it read it.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// The connection caps of one listener.
pub struct Gate {
    permits: Arc<Semaphore>,
    max_per_address: usize,
    per_address: Mutex<HashMap<AddressKey, usize>>,
    refusals: Arc<Semaphore>,
    trusted: Arc<crate::http::forwarded::TrustedProxies>,
    /// Connections open (the metric), moved by each [`Slot`].
    open: metrics::Gauge,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `limits.max_connections` connections are open.
    Server,
    /// `limits.max_connections_per_address` connections are open from this address.
    Address,
}

impl Full {
    /// The machine-readable code of the refusal (`Plait-Error`).
    pub fn code(self) -> &'static str {
        match self {
            Full::Server => "too-many-connections",
            Full::Address => "too-many-connections-from-address",
        }
    }
}

impl Gate {
    pub fn new(
        max_connections: usize,
        max_per_address: usize,
        trusted: Arc<crate::http::forwarded::TrustedProxies>,
        open: metrics::Gauge,
    ) -> Arc<Gate> {
        Arc::new(Gate {
            permits: Arc::new(Semaphore::new(max_connections)),
            max_per_address,
            per_address: Mutex::new(HashMap::new()),
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS)),
            trusted,
            open,
        })
    }

    /// A slot for a new connection from `ip`, or why there is none.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Full> {
        // An IPv4 client on a dual-stack listener shows as an IPv4-mapped IPv6 address.
        let counted = !self.trusted.contains(ip.to_canonical());
        let key = AddressKey::of(ip);
        if counted {
            let mut map = self.per_address.lock().expect("per-address counts");
            let n = map.entry(key).or_insert(0);
            if *n >= self.max_per_address {
                return Err(Full::Address);
            }
            *n += 1;
        }
        // Made before the permit is taken, so a refusal gives the address count back.
        let mut slot = Slot {
            permit: None,
            address: counted.then(|| (self.clone(), key)),
            open: None,
        };
        slot.permit = Some(
            self.permits
                .clone()
                .try_acquire_owned()
                .map_err(|_| Full::Server)?,
        );
        self.open.increment(1.0);
        slot.open = Some(self.open.clone());
        Ok(slot)
    }
}

/// A connection's place under the caps; given back when dropped.
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    address: Option<(Arc<Gate>, AddressKey)>,
    /// The open-connections gauge, once the slot is taken.
    open: Option<metrics::Gauge>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(open) = self.open.take() {
            open.decrement(1.0);
        }
        if let Some((gate, ip)) = self.address.take() {
            let mut map = gate.per_address.lock().expect("per-address counts");
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
        drop(self.permit.take());
    }
}

/// A connection's socket together with its [`Slot`]: the slot is given back when the
/// socket closes, whoever holds it last (hyper, or a websocket after an upgrade).
pub struct Held<S> {
    io: S,
    _slot: Slot,
}

impl<S> Held<S> {
    pub fn new(io: S, slot: Slot) -> Self {
        Held { io, _slot: slot }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Held<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Held<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Answers a connection past a cap with `503 Service Unavailable` and `Retry-After`, then
/// closes it. The answer is real HTTP on the listener's terms: over TLS when the listener
/// has it (the handshake first, within its timeout), HTTP/1.1 or HTTP/2 as the client
/// speaks; every request on it is answered the same until [`REFUSAL_LINGER`] has passed.
/// At most [`MAX_REFUSALS`] are answered at once; past that a connection is closed.
///
/// A connection past its address's cap is answered after `hold`
/// (`limits.rate_limited_delay_ms`), as a 429 is: that address already holds
/// `max_connections_per_address` connections, and one that reconnects as soon as it is
/// refused would otherwise make the server accept and refuse as fast as it can connect
/// (tens of thousands a second from one abuser, the CPU everyone else's requests need).
/// Past the server's own cap the answer is at once: the client may be anyone.
pub fn refuse(
    gate: &Arc<Gate>,
    stream: TcpStream,
    why: Full,
    retry_after_secs: u64,
    hold: Duration,
    tls: Option<Arc<crate::http::tls::Tls>>,
) {
    let hold = if why == Full::Address {
        hold
    } else {
        Duration::ZERO
    };
    let Ok(permit) = gate.refusals.clone().try_acquire_owned() else {
        return; // Dropped: closed at once.
    };
    let code = why.code();
    let reason = match why {
        Full::Server => "the server holds as many connections as limits.max_connections allows",
        Full::Address => {
            "this address holds as many connections as limits.max_connections_per_address allows"
        }
    };
    let body = Bytes::from(format!("{reason}; try again in {retry_after_secs} s\n"));
    let svc = hyper::service::service_fn(move |_req| {
        let res = hyper::Response::builder()
            .status(hyper::StatusCode::SERVICE_UNAVAILABLE)
            .header(hyper::header::RETRY_AFTER, retry_after_secs)
            .header("plait-error", code)
            .header(hyper::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(http_body_util::Full::new(body.clone()));
        async move { res }
    });
    tokio::spawn(async move {
        let _permit = permit;
        tokio::time::sleep(hold).await;
        let _ = stream.set_nodelay(true);
        let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        // HTTP/1.1: one answer, then the connection closes.
        builder.http1().keep_alive(false);
        let answer = async {
            match tls {
                None => {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = builder.serve_connection(io, svc).await;
                }
                Some(tls) => {
                    if let Ok(io) = tls.handshake(stream).await {
                        let _ = builder
                            .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                            .await;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(REFUSAL_LINGER, answer).await;
    });
}

/// Requests in flight on one connection.
#[derive(Clone)]
pub struct Activity {
    in_flight: Arc<watch::Sender<usize>>,
}

/// One request in flight; dropped when its response body is done with.
pub struct InFlight {
    in_flight: Arc<watch::Sender<usize>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.in_flight.send_modify(|n| *n -= 1);
    }
}

impl Activity {
    pub fn new() -> Self {
        Activity {
            in_flight: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Counts a request until the returned guard is dropped.
    pub fn begin(&self) -> InFlight {
        self.in_flight.send_modify(|n| *n += 1);
        InFlight {
            in_flight: self.in_flight.clone(),
        }
    }

    /// Completes once no request has been in flight for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        let mut rx = self.in_flight.subscribe();
        loop {
            // Wait for nothing in flight; the sender lives in `self`, so this never ends.
            if rx.wait_for(|n| *n == 0).await.is_err() {
                return std::future::pending().await;
            }
            tokio::select! {
                _ = tokio::time::sleep(idle) => return,
                r = rx.changed() => {
                    if r.is_err() {
                        return std::future::pending().await;
                    }
                }
            }
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// A request body that fails when its next piece does not arrive within `timeout`.
pub struct TimedBody<B> {
    inner: B,
    timeout: Duration,
    /// Armed while the body is waited for; reset by every piece.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> TimedBody<B> {
    pub fn new(inner: B, timeout: Duration) -> Self {
        TimedBody {
            inner,
            timeout,
            deadline: None,
        }
    }
}

/// A request body stalled past `limits.body_read_timeout_secs`.
#[derive(Debug, thiserror::Error)]
#[error("no body data for {0:?} (limits.body_read_timeout_secs)")]
pub struct BodyTimeout(Duration);

impl<B> HttpBody for TimedBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                this.deadline = None;
                Poll::Ready(r.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let deadline = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(timeout))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
