//! HTTPS on the `--listen` listener (`[tls]`, `--tls-cert`, `--tls-key`), and the plain
//! listener that sends browsers there (`tls.redirect_listen`).
//!
//! * **Certificates.** [`Certificates`] is rustls' certificate resolver: it hands every
//!   handshake the `Arc<CertifiedKey>` it holds, and swaps in a new one when the PEM files
//!   change (their modification time or size, checked every `tls.reload_interval_secs`,
//!   and at once on SIGHUP). A new pair that does not load (unreadable, not PEM, a key that
//!   does not match the certificate, a pair caught half-written) is logged as an error and
//!   the old certificate stays in use; the next change is tried again.
//! * **Handshakes.** [`Tls::handshake`] runs inside the connection's slot (the socket it
//!   wraps is already `conn::Held`), so half-finished handshakes count against the
//!   connection caps like any other connection, and each one has
//!   `limits.tls_handshake_timeout_secs` to finish. A failed or timed-out handshake is a
//!   [`HandshakeError`], counted as a refusal by the accept loop, and ends only its
//!   connection.
//! * **Protocols.** ALPN offers `h2` then `http/1.1`; hyper's automatic builder then reads
//!   the preface, so a client without ALPN gets HTTP/1.1.
//! * **Redirects.** [`redirect_router`] answers every request with `308 Permanent Redirect`
//!   to the same path on the HTTPS origin, except ACME HTTP-01 challenges
//!   (`/.well-known/acme-challenge/TOKEN`), answered from `http::acme`'s open orders.
//! * **ACME.** With `tls.acme_domains` the certificate is not read from files:
//!   [`Certificates::fixed`] holds it and `http::acme` swaps in each new one
//!   ([`Certificates::set`]).
//!
//! Knows nothing of routes, Braid or the engine; the accept loop (`http::serve`) decides
//! what runs on the connection once the handshake is done.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// Why a certificate and key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("the key in {key} does not fit the certificate in {cert}: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// Why a TLS handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("no TLS handshake within {0:?} (limits.tls_handshake_timeout_secs)")]
    TimedOut(Duration),
    #[error("TLS handshake failed: {0}")]
    Failed(io::Error),
}

impl HandshakeError {
    /// The refusal's code in the tally at `/.well-known/plait`.
    pub fn code(&self) -> &'static str {
        match self {
            HandshakeError::TimedOut(_) => "tls-handshake-timeout",
            HandshakeError::Failed(_) => "tls-handshake-failed",
        }
    }
}

/// The files' identity as last seen: modification time and length of the certificate,
/// then of the key. A change of either makes a reload.
type Stamp = [(Option<SystemTime>, u64); 2];

/// The server's certificate chain and key: reloaded when their files change, or set by
/// the ACME task (`http::acme`).
pub struct Certificates {
    /// `None` when the certificate is not read from files (ACME sets it).
    files: Option<Files>,
    current: ArcSwap<CertifiedKey>,
}

/// The certificate and key files given by `tls.cert` and `tls.key`.
struct Files {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    /// The files as they were when last loaded or tried; a failed try is not repeated
    /// until they change again (so a bad file is logged once, not every tick).
    seen: Mutex<Stamp>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("cert", &self.files.as_ref().map(|f| &f.cert))
            .field("key", &self.files.as_ref().map(|f| &f.key))
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn stamp(path: &Path) -> (Option<SystemTime>, u64) {
    match std::fs::metadata(path) {
        Ok(m) => (m.modified().ok(), m.len()),
        Err(_) => (None, 0),
    }
}

/// The crypto provider of every TLS listener (aws-lc-rs: the libp2p node's QUIC already
/// builds it, so it costs nothing more).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl Certificates {
    /// Loads the certificate chain (PEM, leaf first) and private key (PEM: PKCS#8, PKCS#1
    /// or SEC1).
    pub fn load(cert: &Path, key: &Path, provider: Arc<CryptoProvider>) -> Result<Self, CertError> {
        let seen = [stamp(cert), stamp(key)];
        let loaded = read_pair(cert, key, &provider)?;
        Ok(Certificates {
            files: Some(Files {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                provider,
                seen: Mutex::new(seen),
            }),
            current: ArcSwap::from_pointee(loaded),
        })
    }

    /// A certificate not read from files: it changes only by [`Certificates::set`].
    pub fn fixed(key: CertifiedKey) -> Self {
        Certificates {
            files: None,
            current: ArcSwap::from_pointee(key),
        }
    }

    /// Puts `key` in use for every handshake from now on.
    pub fn set(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }

    /// Loads the files again if they changed since they were last seen; with `force`
    /// (SIGHUP), even if they look the same. Returns whether a new certificate is in use.
    /// A pair that does not load leaves the current one in place (and is logged).
    /// Without files (ACME), does nothing.
    pub fn reload(&self, force: bool) -> bool {
        let Some(files) = &self.files else {
            return false;
        };
        let now = [stamp(&files.cert), stamp(&files.key)];
        {
            let mut seen = files.seen.lock().unwrap_or_else(|e| e.into_inner());
            if !force && *seen == now {
                return false;
            }
            *seen = now;
        }
        match read_pair(&files.cert, &files.key, &files.provider) {
            Ok(new) => {
                self.current.store(Arc::new(new));
                tracing::info!(cert = %files.cert.display(), "loaded a new TLS certificate");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "the TLS certificate files changed but do not load; still serving the previous certificate");
                false
            }
        }
    }
}

/// A certificate chain (PEM, leaf first) and its private key (PEM) as rustls uses them;
/// the error says what is wrong (no certificate, bad PEM, a key that does not fit).
pub fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if chain.is_empty() {
        return Err("no PEM certificate".into());
    }
    let private = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| e.to_string())?;
    CertifiedKey::from_der(chain, private, provider).map_err(|e| e.to_string())
}

fn read_pair(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, CertError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| CertError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let pem_err = |path: &Path, e: rustls::pki_types::pem::Error| CertError::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let cert_pem = read(cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(cert, e))?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate {
            path: cert.to_path_buf(),
        });
    }
    let key_pem = read(key)?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_err(key, e))?;
    // Also checks that the key is the certificate's (`keys_match`).
    CertifiedKey::from_der(chain, private, provider).map_err(|e| CertError::Mismatch {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        reason: e.to_string(),
    })
}

/// HTTPS for one listener: the acceptor, its certificates and the handshake deadline.
pub struct Tls {
    acceptor: TlsAcceptor,
    certificates: Arc<Certificates>,
    handshake_timeout: Duration,
}

impl Tls {
    /// Loads `cert` and `key` and makes the acceptor (TLS 1.2 and 1.3, ALPN `h2` and
    /// `http/1.1`).
    pub fn new(cert: &Path, key: &Path, handshake_timeout: Duration) -> Result<Tls, anyhow::Error> {
        let provider = provider();
        let certificates = Arc::new(Certificates::load(cert, key, provider.clone())?);
        Tls::with_certificates(certificates, provider, handshake_timeout)
    }

    /// The acceptor for certificates that come from elsewhere (ACME).
    pub fn with_certificates(
        certificates: Arc<Certificates>,
        provider: Arc<CryptoProvider>,
        handshake_timeout: Duration,
    ) -> Result<Tls, anyhow::Error> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(certificates.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            certificates,
            handshake_timeout,
        })
    }

    /// The certificates in use (for reloading).
    pub fn certificates(&self) -> &Arc<Certificates> {
        &self.certificates
    }

    /// Runs the server side of a handshake on `io`, within the handshake timeout.
    pub async fn handshake<IO>(&self, io: IO) -> Result<TlsStream<IO>, HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        match tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(io)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(HandshakeError::Failed(e)),
            Err(_) => Err(HandshakeError::TimedOut(self.handshake_timeout)),
        }
    }

    /// Reloads the certificate files when they change (checked every `every`) and on
    /// SIGHUP, until `shutdown`.
    pub fn watch(self: &Arc<Self>, every: Duration, shutdown: CancellationToken) {
        use tokio::signal::unix::{SignalKind, signal};
        let certificates = self.certificates.clone();
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler: certificates are reloaded on change only");
                None
            }
        };
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let force = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => false,
                    Some(()) = async {
                        match hangup.as_mut() {
                            Some(h) => h.recv().await,
                            None => std::future::pending().await,
                        }
                    } => {
                        tracing::info!("SIGHUP: reloading the TLS certificate");
                        true
                    }
                };
                // Reading two small files: off the runtime's threads all the same.
                let c = certificates.clone();
                let _ = tokio::task::spawn_blocking(move || c.reload(force)).await;
            }
        });
    }
}

/// Where the redirect listener sends clients.
#[derive(Debug, Clone)]
pub struct RedirectTarget {
    /// `public_url`'s authority when it is an `https:` URL: always redirect there.
    pub authority: Option<http::uri::Authority>,
    /// Otherwise the request's own host, with this port (left out when 443).
    pub https_port: u16,
}

impl RedirectTarget {
    /// The `Location` for a request to `uri` with `Host` header `host`, or `None` when the
    /// request names no usable host.
    pub fn location(&self, host: Option<&str>, uri: &http::Uri) -> Option<String> {
        let authority = match &self.authority {
            Some(a) => a.to_string(),
            None => {
                let asked: http::uri::Authority = host.or(uri.host())?.parse().ok()?;
                let host = asked.host();
                let host = if host.contains(':') && !host.starts_with('[') {
                    format!("[{host}]")
                } else {
                    host.to_string()
                };
                match self.https_port {
                    443 => host,
                    p => format!("{host}:{p}"),
                }
            }
        };
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        Some(format!("https://{authority}{path}"))
    }
}

/// The plain listener's routes: ACME HTTP-01 answers from `challenges` (when ACME is on)
/// at `/.well-known/acme-challenge/TOKEN`, and a `308` to HTTPS for every other request.
pub fn redirect_router(
    target: RedirectTarget,
    challenges: Option<Arc<super::acme::Challenges>>,
) -> axum::Router {
    let mut router = axum::Router::new();
    if let Some(challenges) = challenges {
        router = router.route(
            "/.well-known/acme-challenge/{token}",
            axum::routing::get(
                move |axum::extract::Path(token): axum::extract::Path<String>| async move {
                    use axum::response::IntoResponse as _;
                    match challenges.answer(&token) {
                        Some(key_authorization) => key_authorization.into_response(),
                        None => http::StatusCode::NOT_FOUND.into_response(),
                    }
                },
            ),
        );
    }
    router.fallback(move |req: http::Request<axum::body::Body>| {
        let target = target.clone();
        async move {
            use axum::response::IntoResponse as _;
            let host = req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok());
            match target.location(host, req.uri()) {
                Some(location) => (
                    http::StatusCode::PERMANENT_REDIRECT,
                    [(http::header::LOCATION, location)],
                    "this server speaks HTTPS\n",
                )
                    .into_response(),
                None => super::error::ApiError::bad_request("no Host to redirect to").into_response(),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_keep_host_path_and_query() {
        let t = RedirectTarget {
            authority: None,
            https_port: 8443,
        };
        let uri: http::Uri = "/a/b?c=d".parse().unwrap();
        assert_eq!(
            t.location(Some("example.org:8080"), &uri).as_deref(),
            Some("https://example.org:8443/a/b?c=d")
        );
        assert_eq!(
            t.location(Some("[::1]:80"), &uri).as_deref(),
            Some("https://[::1]:8443/a/b?c=d")
        );
        assert_eq!(t.location(Some("bad host/"), &uri), None);
        assert_eq!(t.location(None, &uri), None);
        let t = RedirectTarget {
            authority: None,
            https_port: 443,
        };
        assert_eq!(
            t.location(Some("example.org"), &"/".parse().unwrap()).as_deref(),
            Some("https://example.org/")
        );
        let t = RedirectTarget {
            authority: Some("plait.example".parse().unwrap()),
            https_port: 443,
        };
        assert_eq!(
            t.location(Some("evil.example"), &uri).as_deref(),
            Some("https://plait.example/a/b?c=d")
        );
    }
}
