//! Where the load goes and how it gets there: a [`Target`] is a server's address and, for an
//! `https://` URL, the TLS client configuration (the CA named by `--ca`, ALPN `http/1.1` or
//! `h2`); [`Conn`] is a keep-alive HTTP/1.1 client over any stream, raw on the wire so the
//! tool's own cost stays small; [`request`] and [`server_status`] are the one-off requests
//! every workload makes; [`Waves`] paces subscriptions opened on one HTTP/2 connection. Knows
//! nothing of workloads.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A byte stream to a server: plain TCP or TLS over it.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
pub type BoxStream = Pin<Box<dyn Stream>>;

/// The CA `https://` targets are verified against (`--ca`), set once at start.
static TRUST: OnceLock<rustls::RootCertStore> = OnceLock::new();

/// Trusts the CA certificate(s) in the PEM file `ca` for every `https://` target.
pub fn trust(ca: &Path) -> anyhow::Result<()> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))? {
        roots.add(cert?)?;
    }
    TRUST
        .set(roots)
        .map_err(|_| anyhow::anyhow!("the trusted CA is set once"))
}

/// A client configuration offering `alpn`, trusting the `--ca` certificate.
fn client_config(alpn: &[u8]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let roots = TRUST
        .get()
        .context("an https:// URL needs --ca FILE (the CA that issued the server's certificate)")?;
    let mut config = rustls::ClientConfig::builder_with_provider(plait_server::http::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// A server to load: its address and, over TLS, the client configurations for HTTP/1.1
/// and HTTP/2.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    tls: Option<Tls>,
}

#[derive(Clone)]
struct Tls {
    h1: tokio_rustls::TlsConnector,
    h2: tokio_rustls::TlsConnector,
}

impl Target {
    /// `http://IP:PORT` or `https://IP:PORT` (the certificate must name the IP).
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        let (tls, rest) = match url.split_once("://") {
            Some(("http", rest)) => (false, rest),
            Some(("https", rest)) => (true, rest),
            _ => bail!("{url}: only http:// and https:// URLs"),
        };
        let host = rest.split('/').next().unwrap_or(rest);
        let addr = host.parse().with_context(|| format!("{host} is not IP:PORT"))?;
        let tls = if tls {
            Some(Tls {
                h1: client_config(b"http/1.1")?.into(),
                h2: client_config(b"h2")?.into(),
            })
        } else {
            None
        };
        Ok(Target { addr, tls })
    }

    /// A plain `http://` target.
    pub fn plain(addr: SocketAddr) -> Target {
        Target { addr, tls: None }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// A connection for HTTP/1.1 (over TLS: handshake done, `http/1.1` agreed).
    pub async fn connect(&self) -> anyhow::Result<BoxStream> {
        self.open(|t| &t.h1).await
    }

    /// A connection for HTTP/2 (over TLS: `h2` agreed; plain: prior knowledge, h2c).
    pub async fn connect_h2(&self) -> anyhow::Result<BoxStream> {
        self.open(|t| &t.h2).await
    }

    async fn open(&self, which: impl Fn(&Tls) -> &tokio_rustls::TlsConnector) -> anyhow::Result<BoxStream> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let Some(tls) = &self.tls else {
            return Ok(Box::pin(tcp));
        };
        let name = ServerName::IpAddress(self.addr.ip().into());
        let stream = which(tls).connect(name, tcp).await.context("TLS handshake")?;
        Ok(Box::pin(stream))
    }
}

/// `IP:PORT` of an `http://` URL (the workloads that speak only plain HTTP).
pub fn addr_of(url: &str) -> anyhow::Result<SocketAddr> {
    let t = Target::parse(url)?;
    if t.is_tls() {
        bail!("{url}: this workload speaks plain http:// only");
    }
    Ok(t.addr)
}

/// The server's status resource.
pub async fn server_status(target: &Target) -> anyhow::Result<serde_json::Value> {
    let (status, body) = request(target, "GET", "/.well-known/plait", &[], b"").await?;
    if status != 200 {
        bail!("status resource answered {status}");
    }
    Ok(serde_json::from_slice(&body)?)
}

/// The server's resident memory, from its status resource.
pub async fn server_rss(target: &Target) -> anyhow::Result<u64> {
    server_status(target).await?["rss_bytes"]
        .as_u64()
        .context("no rss_bytes in /.well-known/plait")
}

/// One request on a fresh connection; returns status and body.
pub async fn request(
    target: &Target,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut s = target.connect().await?;
    let mut c = Conn::default();
    c.send(&mut s, method, path, headers, body).await?;
    c.recv(&mut s).await
}

/// A keep-alive HTTP/1.1 client connection's read buffer.
#[derive(Default)]
pub struct Conn {
    buf: Vec<u8>,
}

impl Conn {
    pub async fn send<S: AsyncWrite + Unpin>(
        &mut self,
        s: &mut S,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<()> {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: load\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(k);
            req.push_str(": ");
            req.push_str(v);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        let mut out = req.into_bytes();
        out.extend_from_slice(body);
        s.write_all(&out).await?;
        s.flush().await?;
        Ok(())
    }

    /// Reads one response with a `Content-Length` body (what PUT and GET answers have).
    pub async fn recv<S: AsyncRead + Unpin>(&mut self, s: &mut S) -> anyhow::Result<(u16, Vec<u8>)> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end])?.to_string();
                let status: u16 = head.split(' ').nth(1).context("status line")?.parse()?;
                let len = content_length(&head);
                while self.buf.len() < end + 4 + len {
                    self.fill(s).await?;
                }
                let body = self.buf[end + 4..end + 4 + len].to_vec();
                self.buf.drain(..end + 4 + len);
                return Ok((status, body));
            }
            self.fill(s).await?;
        }
    }

    async fn fill<S: AsyncRead + Unpin>(&mut self, s: &mut S) -> anyhow::Result<()> {
        let mut chunk = [0u8; 16384];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// The `Content-Length` of a message head (0 without one).
pub fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0)
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Paces the subscriptions opened on one HTTP/2 connection: in waves of [`Waves::SIZE`],
/// each waiting for the previous wave's first updates (h2 refuses to buffer many small
/// unread frames on one connection). Cloned into each subscription's reader, which calls
/// [`Waves::arrived`] once its first update is in.
#[derive(Clone, Default)]
pub struct Waves(Arc<AtomicUsize>);

impl Waves {
    /// Subscriptions per wave.
    pub const SIZE: usize = 50;

    /// Waits, before opening the `k`th subscription, until its wave may start.
    pub async fn turn(&self, k: usize) {
        if k.is_multiple_of(Self::SIZE) {
            self.all(k).await;
        }
    }

    /// Waits until `n` subscriptions have had their first update.
    pub async fn all(&self, n: usize) {
        while self.0.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// One subscription has had its first update.
    pub fn arrived(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}
