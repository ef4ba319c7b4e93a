//! A small HTTP/1.1 client that shows the bytes: plain requests, and Braid subscriptions
//! parsed block by block with a parser independent of the server's codec.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A complete response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The value of the cookie `name` among the response's `Set-Cookie` headers.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
            .find_map(|(_, v)| {
                let first = v.split(';').next()?.trim();
                first.strip_prefix(name)?.strip_prefix('=').map(str::to_string)
            })
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn build(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    close: bool,
) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || matches!(method, "PUT" | "POST" | "PATCH") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    if close {
        req.push_str("Connection: close\r\n");
    }
    req.push_str("\r\n");
    let mut out = req.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Sends one request and reads the whole response.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    send_raw(addr, &build(addr, method, path, headers, body, true)).await
}

/// Sends raw bytes and reads until the server closes. Reading runs while writing, so a
/// server that answers early (413) and closes is seen as it is, not as a broken pipe.
pub async fn send_raw(addr: SocketAddr, raw: &[u8]) -> Response {
    let s = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    let raw = raw.to_vec();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&raw).await;
        wr
    });
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 65536];
    let read = async {
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                // A reset after the response arrived (the server closed with unread input).
                Err(_) if parse_head(&buf).is_some() => break,
                Err(e) => panic!("read response: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("response within 20 s");
    drop(writer.await);
    let (status, headers, rest) = parse_head(&buf).expect("a response head");
    let body = if header(&headers, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut d = Dechunker::default();
        d.feed(rest);
        d.out
    } else {
        rest.to_vec()
    };
    Response {
        status,
        headers,
        body,
    }
}

/// Header lines as (name, value).
pub type Headers = Vec<(String, String)>;

fn parse_head(buf: &[u8]) -> Option<(u16, Headers, &[u8])> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    Some((status, headers, &buf[end + 4..]))
}

/// Incremental `Transfer-Encoding: chunked` decoder.
#[derive(Default)]
struct Dechunker {
    raw: Vec<u8>,
    out: Vec<u8>,
    done: bool,
}

impl Dechunker {
    fn feed(&mut self, bytes: &[u8]) {
        self.raw.extend_from_slice(bytes);
        loop {
            let Some(nl) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size_line = std::str::from_utf8(&self.raw[..nl]).unwrap_or("0");
            let size =
                usize::from_str_radix(size_line.split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
            if size == 0 {
                self.done = true;
                return;
            }
            if self.raw.len() < nl + 2 + size + 2 {
                return;
            }
            self.out.extend_from_slice(&self.raw[nl + 2..nl + 2 + size]);
            self.raw.drain(..nl + 2 + size + 2);
        }
    }
}

/// One update block from a subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub status: Option<u16>,
    pub headers: Vec<(String, String)>,
    /// The body, for a block with `Content-Length`.
    pub body: Option<Vec<u8>>,
    /// `(Content-Range, content)` for a block with `Patches: N`.
    pub patches: Vec<(String, Vec<u8>)>,
}

impl Block {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(self.body.as_deref().unwrap_or_default()).into_owned()
    }
}

/// An open subscription.
pub struct Subscription {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    stream: TcpStream,
    dechunk: Dechunker,
    /// Parsed position in `dechunk.out`.
    at: usize,
}

/// Opens `GET path` with the given headers and reads the response head.
pub async fn subscribe(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Subscription {
    open(addr, "GET", path, headers).await
}

/// Sends `method path` (no body) and reads the response head, leaving its body to read as
/// it comes (a subscription, a Braid multiplexer).
pub async fn open(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Subscription {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(&build(addr, method, path, headers, b"", false))
        .await
        .expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut chunk))
            .await
            .expect("response head within 20 s")
            .expect("read");
        assert!(n > 0, "connection closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
        if let Some((status, headers, rest)) = parse_head(&buf) {
            let mut dechunk = Dechunker::default();
            dechunk.feed(rest);
            return Subscription {
                status,
                headers,
                stream,
                dechunk,
                at: 0,
            };
        }
    }
}

impl Subscription {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// Reads until a whole update block is there (skipping blank separator lines).
    pub async fn next_block(&mut self, within: Duration) -> Option<Block> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some((block, used)) = parse_block(&self.dechunk.out[self.at..]) {
                self.at += used;
                return Some(block);
            }
            if self.dechunk.done {
                return None;
            }
            let mut chunk = [0u8; 8192];
            let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) => n,
                _ => return None,
            };
            if n == 0 {
                return None;
            }
            self.dechunk.feed(&chunk[..n]);
        }
    }

    /// Everything received (de-chunked) during `dur`, from the start of the body.
    pub async fn raw_for(&mut self, dur: Duration) -> Vec<u8> {
        let deadline = tokio::time::Instant::now() + dur;
        let mut chunk = [0u8; 8192];
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
            if n == 0 {
                break;
            }
            self.dechunk.feed(&chunk[..n]);
        }
        self.dechunk.out.clone()
    }

    /// Whether the server ended the response (terminating chunk or close) within `dur`.
    pub async fn ended_within(&mut self, dur: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + dur;
        let mut chunk = [0u8; 8192];
        loop {
            if self.dechunk.done {
                return true;
            }
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(n)) => self.dechunk.feed(&chunk[..n]),
                Err(_) => return false,
            }
        }
    }
}

/// Parses one block at the start of `buf`; returns it and the bytes used.
pub fn parse_block(buf: &[u8]) -> Option<(Block, usize)> {
    let mut i = 0;
    while i < buf.len() && (buf[i] == b'\r' || buf[i] == b'\n') {
        i += 1;
    }
    let head_end = i + buf[i..].windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[i..head_end]).ok()?;
    let mut lines = head.split("\r\n").peekable();
    let mut status = None;
    if let Some(first) = lines.peek()
        && (first.starts_with("HTTP") || first.chars().take(3).all(|c| c.is_ascii_digit()))
        && !first.contains(':')
    {
        status = first.split(' ').find_map(|w| w.parse::<u16>().ok());
        lines.next();
    }
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header line in update block: {l:?}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let mut at = head_end + 4;
    if let Some(n) = header(&headers, "content-length") {
        let n: usize = n.parse().expect("Content-Length is a number");
        if buf.len() < at + n {
            return None;
        }
        let body = buf[at..at + n].to_vec();
        return Some((
            Block {
                status,
                headers,
                body: Some(body),
                patches: vec![],
            },
            at + n,
        ));
    }
    let np: usize = header(&headers, "patches")
        .unwrap_or_else(|| panic!("update block without Content-Length or Patches: {headers:?}"))
        .parse()
        .unwrap();
    let mut patches = Vec::new();
    for _ in 0..np {
        while at < buf.len() && (buf[at] == b'\r' || buf[at] == b'\n') {
            at += 1;
        }
        let pe = at + buf[at..].windows(4).position(|w| w == b"\r\n\r\n")?;
        let ph = std::str::from_utf8(&buf[at..pe]).ok()?;
        let mut len = None;
        let mut range = None;
        for l in ph.split("\r\n") {
            let (k, v) = l.split_once(':').expect("patch header");
            if k.trim().eq_ignore_ascii_case("content-length") {
                len = Some(v.trim().parse::<usize>().unwrap());
            } else if k.trim().eq_ignore_ascii_case("content-range") {
                range = Some(v.trim().to_string());
            }
        }
        let len = len.expect("patch has Content-Length");
        if buf.len() < pe + 4 + len {
            return None;
        }
        patches.push((
            range.expect("patch has Content-Range"),
            buf[pe + 4..pe + 4 + len].to_vec(),
        ));
        at = pe + 4 + len;
    }
    Some((
        Block {
            status,
            headers,
            body: None,
            patches,
        },
        at,
    ))
}
