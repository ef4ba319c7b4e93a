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
