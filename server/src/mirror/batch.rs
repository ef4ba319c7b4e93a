//! What a sealed segment holds once opened: a batch of the owner's changes.
//!
//! Each entry is one resource's change as stored (an automerge change for text and JSON),
//! a snapshot standing for changes already folded away, or a bytes resource's value. The
//! encoding (big-endian, length-prefixed) is pinned by a test below:
//!
//! ```text
//! batch = "PSB1" count:u32 entry*
//! entry = what:u8 kind:u8 seq:u64 at_ms:u64
//!         path:str16 media_type:str16 version:str16 parents:str32 data:bytes32
//! what  = 1 change (data: the automerge change) | 2 snapshot through seq (data: the
//!         document) | 3 value of a bytes resource at seq (data: the value)
//! strN  = len:uN UTF-8 bytes;  bytesN = len:uN bytes
//! ```
//!
//! The mirror never sees this: it is the plaintext that age encrypts. Knows nothing of
//! documents beyond their kinds.

use bytes::Bytes;

use crate::model::{Kind, ResourcePath};

const MAGIC: &[u8; 4] = b"PSB1";

/// What an entry carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    Change,
    Snapshot,
    Value,
}

/// One entry of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub what: What,
    pub kind: Kind,
    pub path: ResourcePath,
    pub media_type: String,
    /// The change's seq in its resource's log (for a snapshot: the last seq it covers).
    pub seq: i64,
    pub version: String,
    pub parents: String,
    pub at_ms: i64,
    pub data: Bytes,
}

impl Entry {
    /// Bytes this entry takes in a batch.
    pub fn encoded_len(&self) -> usize {
        1 + 1
            + 8
            + 8
            + 2
            + self.path.as_str().len()
            + 2
            + self.media_type.len()
            + 2
            + self.version.len()
            + 4
            + self.parents.len()
            + 4
            + self.data.len()
    }
}

/// Why bytes are not a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a batch of changes: {0}")]
pub struct BatchError(&'static str);

/// Bytes of an empty batch.
pub const BATCH_HEADER_LEN: usize = 8;

fn put_str(out: &mut Vec<u8>, s: &str, wide: bool) {
    if wide {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    } else {
        out.extend_from_slice(&(s.len().min(u16::MAX as usize) as u16).to_be_bytes());
    }
    out.extend_from_slice(s.as_bytes());
}

/// Encodes entries. Strings longer than their length field allows do not occur (paths,
/// media types and versions are bounded well below 64 KiB by the server).
pub fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(BATCH_HEADER_LEN + entries.iter().map(Entry::encoded_len).sum::<usize>());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for e in entries {
        out.push(match e.what {
            What::Change => 1,
            What::Snapshot => 2,
            What::Value => 3,
        });
        out.push(e.kind.code() as u8);
        out.extend_from_slice(&e.seq.to_be_bytes());
        out.extend_from_slice(&e.at_ms.to_be_bytes());
        put_str(&mut out, e.path.as_str(), false);
        put_str(&mut out, &e.media_type, false);
        put_str(&mut out, &e.version, false);
        put_str(&mut out, &e.parents, true);
        out.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
        out.extend_from_slice(&e.data);
    }
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BatchError> {
        if self.0.len() < n {
            return Err(BatchError("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, BatchError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<usize, BatchError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")) as usize)
    }
    fn u32(&mut self) -> Result<usize, BatchError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")) as usize)
    }
    fn i64(&mut self) -> Result<i64, BatchError> {
        Ok(i64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn str(&mut self, n: usize) -> Result<String, BatchError> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| BatchError("a string is not UTF-8"))
    }
}

/// Decodes a batch (the plaintext of an opened segment).
pub fn decode(bytes: &[u8]) -> Result<Vec<Entry>, BatchError> {
    let mut r = Reader(bytes);
    if r.take(4)? != MAGIC {
        return Err(BatchError("no PSB1 magic"));
    }
    let n = r.u32()?;
    let mut out = Vec::with_capacity(n.min(bytes.len() / 34));
    for _ in 0..n {
        let what = match r.u8()? {
            1 => What::Change,
            2 => What::Snapshot,
            3 => What::Value,
            _ => return Err(BatchError("unknown entry")),
        };
        let kind = Kind::from_code(r.u8()? as i16).ok_or(BatchError("unknown kind"))?;
        let seq = r.i64()?;
        let at_ms = r.i64()?;
        let n = r.u16()?;
        let path = ResourcePath::new(r.str(n)?).map_err(|_| BatchError("bad path"))?;
        let n = r.u16()?;
        let media_type = r.str(n)?;
        let n = r.u16()?;
        let version = r.str(n)?;
        let n = r.u32()?;
        let parents = r.str(n)?;
        let n = r.u32()?;
        let data = Bytes::copy_from_slice(r.take(n)?);
        out.push(Entry {
            what,
            kind,
            path,
            media_type,
            seq,
            version,
            parents,
            at_ms,
            data,
        });
    }
    if !r.0.is_empty() {
        return Err(BatchError("bytes after the last entry"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn the_encoding_is_pinned() {
        let e = Entry {
            what: What::Change,
            kind: Kind::Text,
            path: ResourcePath::new("notes/a").unwrap(),
            media_type: "text/plain".into(),
            seq: 2,
            version: "x-1".into(),
            parents: "\"x-0\"".into(),
            at_ms: 1_700_000_000_000,
            data: Bytes::from_static(&[0xaa, 0xbb]),
        };
        let b = encode(std::slice::from_ref(&e));
        let expected = [
            "50534231",             // "PSB1"
            "00000001",             // one entry
            "01",                   // a change
            "01",                   // of a text resource
            "0000000000000002",     // seq 2
            "0000018bcfe56800",     // at 1700000000000 ms
            "0007",                 // path, 7 bytes
            "6e6f7465732f61",       // "notes/a"
            "000a",                 // media type, 10 bytes
            "746578742f706c61696e", // "text/plain"
            "0003",                 // version, 3 bytes
            "782d31",               // "x-1"
            "00000005",             // parents, 5 bytes
            "22782d3022",           // "\"x-0\""
            "00000002",             // data, 2 bytes
            "aabb",
        ]
        .concat();
        assert_eq!(hex(&b), expected);
        assert_eq!(b.len(), BATCH_HEADER_LEN + e.encoded_len());
        assert_eq!(decode(&b).unwrap(), vec![e]);
    }

    #[test]
    fn damaged_batches_are_errors() {
        let e = Entry {
            what: What::Value,
            kind: Kind::Bytes,
            path: ResourcePath::new("img").unwrap(),
            media_type: "image/png".into(),
            seq: 1,
            version: "y-0".into(),
            parents: String::new(),
            at_ms: 0,
            data: Bytes::from_static(b"PNG"),
        };
        let b = encode(&[e.clone(), e]);
        assert_eq!(decode(&b).unwrap().len(), 2);
        assert!(decode(&b[..b.len() - 1]).is_err());
        let mut extra = b.clone();
        extra.push(0);
        assert!(decode(&extra).is_err());
        let mut bad = b.clone();
        bad[0] = b'X';
        assert!(decode(&bad).is_err());
        assert!(decode(&[]).is_err());
    }
}
