//! Update blocks in a `209` subscription body, byte for byte as braid-http 1.3 and 1.4
//! clients parse them (BRAID.md §3.3):
//!
//! ```text
//! HTTP 200 OK\r\n
//! Version: "bob-5"\r\n
//! Parents: "ty0wi-4"\r\n
//! Repr-Digest: sha-256=:...:\r\n
//! Patches: 1\r\n
//! \r\n
//! Content-Length: 6\r\n
//! Content-Range: text [5:5]\r\n
//! \r\n
//!  world\r\n
//! \r\n
//! ```
//!
//! Multi-patch updates always use `Patches: N` (1.3 clients do not know the
//! `application/http-patches` form). Blocks end with two CRLFs, as the reference writes.

use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};

use super::headers::format_version;
use crate::update::{Update, UpdateBody};

/// A heartbeat: one blank line between blocks, which clients skip.
pub const HEARTBEAT: &[u8] = b"\r\n";

/// Encodes one update block.
pub fn encode_update(update: &Update) -> Bytes {
    let mut head = String::with_capacity(128);
    match &update.body {
        UpdateBody::Missing => {
            head.push_str("HTTP 404 Not Found\r\n");
        }
        _ => {
            head.push_str("HTTP 200 OK\r\n");
            let _ = write!(head, "Version: {}\r\n", format_version(&update.version));
            let _ = write!(head, "Parents: {}\r\n", format_version(&update.parents));
            if let Some(d) = &update.digest {
                let _ = write!(head, "Repr-Digest: {d}\r\n");
            }
        }
    }
    match &update.body {
        UpdateBody::Missing => {
            head.push_str("Content-Length: 0\r\n\r\n\r\n\r\n");
            Bytes::from(head)
        }
        UpdateBody::Snapshot(body) => {
            let _ = write!(head, "Content-Length: {}\r\n\r\n", body.len());
            let mut out = BytesMut::with_capacity(head.len() + body.len() + 4);
            out.put_slice(head.as_bytes());
            out.put_slice(body);
            out.put_slice(b"\r\n\r\n");
            out.freeze()
        }
        UpdateBody::Text(patches) => {
            let _ = write!(head, "Patches: {}\r\n\r\n", patches.len());
            for p in patches {
                let _ = write!(
                    head,
                    "Content-Length: {}\r\nContent-Range: text [{}:{}]\r\n\r\n{}\r\n",
                    p.content.len(),
                    p.start,
                    p.end,
                    p.content
                );
            }
            head.push_str("\r\n");
            Bytes::from(head)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Version, VersionId};
    use crate::update::TextPatch;

    fn v(s: &str) -> Version {
        Version::one(VersionId::parse(s).unwrap())
    }

    #[test]
    fn patch_update_bytes() {
        // The capture in BRAID.md §3.3, with our header capitalisation.
        let u = Update {
            version: v("1gxlb-5"),
            parents: v("ty0wi-4"),
            body: UpdateBody::Text(vec![TextPatch {
                start: 5,
                end: 5,
                content: " world".into(),
            }]),
            media_type: "text/plain".into(),
            digest: Some("sha-256=:uU0nuZNNPgilLlLX2n2r+sSE7+N6U4DukIj3rOLvzek=:".into()),
        };
        assert_eq!(
            std::str::from_utf8(&encode_update(&u)).unwrap(),
            "HTTP 200 OK\r\n\
             Version: \"1gxlb-5\"\r\n\
             Parents: \"ty0wi-4\"\r\n\
             Repr-Digest: sha-256=:uU0nuZNNPgilLlLX2n2r+sSE7+N6U4DukIj3rOLvzek=:\r\n\
             Patches: 1\r\n\
             \r\n\
             Content-Length: 6\r\n\
             Content-Range: text [5:5]\r\n\
             \r\n \
             world\r\n\
             \r\n"
        );
    }

    #[test]
    fn snapshot_and_missing_bytes() {
        let u = Update {
            version: Version::root(),
            parents: Version::root(),
            body: UpdateBody::Snapshot(Bytes::from_static(b"")),
            media_type: "text/plain".into(),
            digest: None,
        };
        assert_eq!(
            &encode_update(&u)[..],
            b"HTTP 200 OK\r\nVersion: \r\nParents: \r\nContent-Length: 0\r\n\r\n\r\n\r\n"
        );
        let m = Update {
            body: UpdateBody::Missing,
            ..u
        };
        assert_eq!(
            &encode_update(&m)[..],
            b"HTTP 404 Not Found\r\nContent-Length: 0\r\n\r\n\r\n\r\n"
        );
    }

    #[test]
    fn multibyte_content_lengths_are_bytes() {
        let u = Update {
            version: v("a-1"),
            parents: Version::root(),
            body: UpdateBody::Text(vec![TextPatch {
                start: 0,
                end: 0,
                content: "é😀".into(),
            }]),
            media_type: "text/plain".into(),
            digest: None,
        };
        let s = String::from_utf8(encode_update(&u).to_vec()).unwrap();
        assert!(s.contains("Content-Length: 6\r\n"), "{s}");
    }
}

/// Most bytes one update block from an upstream may take.
pub const MAX_BLOCK_BYTES: usize = 16 << 20;

/// An update block read from a subscription stream, kept as its bytes so it can be relayed
/// exactly as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawBlock {
    /// The block from its first header line to the end of its body.
    pub raw: Bytes,
    pub status: Option<u16>,
    pub version: Option<crate::model::Version>,
    pub parents: Option<crate::model::Version>,
    /// A whole representation (`Content-Length` and no `Content-Range`), not patches.
    pub snapshot: bool,
}

impl RawBlock {
    /// The block framed for relaying (with the separator the reference writes).
    pub fn framed(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.raw.len() + 4);
        b.put_slice(&self.raw);
        b.put_slice(b"\r\n\r\n");
        b.freeze()
    }
}

/// Reads update blocks out of a 209 body as its bytes arrive.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole block, `None` until one has arrived.
    pub fn next_block(&mut self) -> Result<Option<RawBlock>, super::BraidError> {
        let bad = |why: String| super::BraidError::Patch(format!("upstream update: {why}"));
        let skip = self.buf.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
        let _ = self.buf.split_to(skip);
        let Some(head_end) = find(&self.buf, b"\r\n\r\n") else {
            if self.buf.len() > MAX_BLOCK_BYTES {
                return Err(bad("headers too long".into()));
            }
            return Ok(None);
        };
        let head =
            std::str::from_utf8(&self.buf[..head_end]).map_err(|_| bad("headers are not UTF-8".into()))?;
        let mut status = None;
        let mut headers: Vec<(String, String)> = Vec::new();
        for (i, line) in head.split("\r\n").enumerate() {
            if i == 0 && !line.contains(':') {
                status = line.split(' ').find_map(|w| w.parse::<u16>().ok());
                continue;
            }
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| bad(format!("bad header line {line:?}")))?;
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        let get = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let mut end = head_end + 4;
        let snapshot;
        if let Some(n) = get("content-length") {
            let n: usize = n.parse().map_err(|_| bad(format!("bad Content-Length {n:?}")))?;
            if n > MAX_BLOCK_BYTES {
                return Err(bad(format!("a {n}-byte update is over the limit")));
            }
            if self.buf.len() < end + n {
                return Ok(None);
            }
            end += n;
            snapshot = get("content-range").is_none();
        } else if let Some(n) = get("patches") {
            let n: usize = n.parse().map_err(|_| bad(format!("bad Patches {n:?}")))?;
            for _ in 0..n {
                while end < self.buf.len() && (self.buf[end] == b'\r' || self.buf[end] == b'\n') {
                    end += 1;
                }
                let Some(pe) = find(&self.buf[end..], b"\r\n\r\n").map(|p| end + p) else {
                    return Ok(None);
                };
                let ph = std::str::from_utf8(&self.buf[end..pe])
                    .map_err(|_| bad("patch headers are not UTF-8".into()))?;
                let len = ph
                    .split("\r\n")
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.trim()
                            .eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .ok_or_else(|| bad("a patch without Content-Length".into()))?;
                if len > MAX_BLOCK_BYTES || self.buf.len() < pe + 4 + len {
                    if len > MAX_BLOCK_BYTES {
                        return Err(bad("a patch over the limit".into()));
                    }
                    return Ok(None);
                }
                end = pe + 4 + len;
            }
            snapshot = false;
        } else {
            return Err(bad("a block without Content-Length or Patches".into()));
        }
        let version = get("version")
            .map(super::parse_version)
            .transpose()
            .map_err(bad)?;
        let parents = get("parents")
            .map(super::parse_version)
            .transpose()
            .map_err(bad)?;
        let raw = self.buf.split_to(end).freeze();
        Ok(Some(RawBlock {
            raw,
            status,
            version,
            parents,
            snapshot,
        }))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod decode_tests {
    use super::*;
    use crate::model::{Version, VersionId};
    use crate::update::TextPatch;

    #[test]
    fn decodes_what_encode_writes_in_any_chunking() {
        let v = |s: &str| Version::one(VersionId::parse(s).unwrap());
        let updates = [
            Update {
                version: Version::root(),
                parents: Version::root(),
                body: UpdateBody::Snapshot(Bytes::from_static(b"hello")),
                media_type: String::new(),
                digest: None,
            },
            Update {
                version: v("b-1"),
                parents: Version::root(),
                body: UpdateBody::Text(vec![
                    TextPatch {
                        start: 0,
                        end: 0,
                        content: "x\r\n\r\ny".into(),
                    },
                    TextPatch {
                        start: 5,
                        end: 5,
                        content: "!".into(),
                    },
                ]),
                media_type: String::new(),
                digest: Some("sha-256=:AAAA:".into()),
            },
            Update {
                version: Version::root(),
                parents: v("b-1"),
                body: UpdateBody::Missing,
                media_type: String::new(),
                digest: None,
            },
        ];
        let mut stream = Vec::new();
        for u in &updates {
            stream.extend_from_slice(&encode_update(u));
            stream.extend_from_slice(HEARTBEAT);
        }
        for chunk in [1, 3, 7, 1000] {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                d.push(piece);
                while let Some(b) = d.next_block().unwrap() {
                    got.push(b);
                }
            }
            assert_eq!(got.len(), 3, "chunk {chunk}");
            assert!(got[0].snapshot && !got[1].snapshot);
            assert_eq!(got[1].version, Some(v("b-1")));
            assert_eq!(got[2].status, Some(404));
            // Relaying is byte-exact.
            let relayed: Vec<u8> = got.iter().flat_map(|b| b.framed().to_vec()).collect();
            let mut d2 = Decoder::default();
            d2.push(&relayed);
            assert_eq!(d2.next_block().unwrap().unwrap(), got[0]);
        }
    }

    #[test]
    fn refuses_garbage() {
        let mut d = Decoder::default();
        d.push(b"Version: \"a-1\"\r\n\r\nno length");
        assert!(d.next_block().is_err());
        let mut d = Decoder::default();
        d.push(b"Content-Length: 99999999999\r\n\r\n");
        assert!(d.next_block().is_err());
    }
}
