//! What a sealed segment holds once opened: a batch of the owner's changes.
//!
//! Each entry is one resource's change as stored (an automerge change for text and JSON),
//! a snapshot standing for changes already folded away, or a bytes resource's value. The
//! encoding (big-endian, length-prefixed) is pinned by a test below:
//!
//! ```text
//! batch   = "PSB2" count:u32 entry*
//! entry   = what:u8 kind:u8 seq:u64 at_ms:u64 path:str16 media_type:str16
//!           version:id parents:u16 id* data:bytes32
//! what    = 1 change (data: the automerge change) | 2 snapshot through seq (data: the
//!           document; version: none, no parents) | 3 value of a bytes resource at seq
//!           (data: the value)
//! id      = agent:str8 seq:u64     (none: an empty agent and seq 0)
//! strN    = len:uN UTF-8 bytes;  bytesN = len:uN bytes
//! ```
//!
//! Versions are typed here as everywhere past the protocol edge: an id is its agent and
//! seq, not Braid header text. Batches written before (`"PSB1"`: `version:str16` and
//! `parents:str32` as header text, the rest alike) are still read, so segments a mirror
//! held from then restore.
//!
//! The mirror never sees this: it is the plaintext that age encrypts. Knows nothing of
//! documents beyond their kinds.

use bytes::Bytes;

use crate::model::{Kind, ResourcePath, Version, VersionId};

const MAGIC: &[u8; 4] = b"PSB2";
/// Batches written before versions were typed.
const MAGIC_V1: &[u8; 4] = b"PSB1";

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
    /// The change's or the value's version id; `None` for a snapshot.
    pub version: Option<VersionId>,
    /// The version it was made on.
    pub parents: Version,
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
            + id_len(self.version.as_ref())
            + 2
            + self.parents.ids().iter().map(|p| id_len(Some(p))).sum::<usize>()
            + 4
            + self.data.len()
    }
}

fn id_len(id: Option<&VersionId>) -> usize {
    1 + id.map_or(0, |id| id.agent().len()) + 8
}

/// Why bytes are not a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a batch of changes: {0}")]
pub struct BatchError(&'static str);

/// Bytes of an empty batch.
pub const BATCH_HEADER_LEN: usize = 8;

fn put_str16(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len().min(u16::MAX as usize) as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_id(out: &mut Vec<u8>, id: Option<&VersionId>) {
    let (agent, seq) = id.map_or(("", 0), |id| (id.agent(), id.seq()));
    // An agent is under MAX_AGENT_BYTES (50): its length fits the byte.
    out.push(agent.len() as u8);
    out.extend_from_slice(agent.as_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
}

/// Encodes entries. Strings longer than their length field allows do not occur (paths and
/// media types are bounded well below 64 KiB by the server, a version's parents are the
/// heads of one document: a handful).
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
        put_str16(&mut out, e.path.as_str());
        put_str16(&mut out, &e.media_type);
        put_id(&mut out, e.version.as_ref());
        let parents = e.parents.ids();
        out.extend_from_slice(&(parents.len().min(u16::MAX as usize) as u16).to_be_bytes());
        for p in parents.iter().take(u16::MAX as usize) {
            put_id(&mut out, Some(p));
        }
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
    fn id(&mut self) -> Result<Option<VersionId>, BatchError> {
        let n = self.u8()? as usize;
        let agent = self.str(n)?;
        let seq = u64::from_be_bytes(self.take(8)?.try_into().expect("8"));
        match (agent.is_empty(), seq) {
            (true, 0) => Ok(None),
            (true, _) => Err(BatchError("a version with no agent")),
            (false, _) => VersionId::new(agent, seq)
                .map(Some)
                .map_err(|_| BatchError("a bad version")),
        }
    }
    /// `PSB1`: the version and its parents as Braid header text.
    fn versions_v1(&mut self) -> Result<(Option<VersionId>, Version), BatchError> {
        let n = self.u16()?;
        let version = self.str(n)?;
        let n = self.u32()?;
        let parents = self.str(n)?;
        let version = match version.as_str() {
            "" => None,
            v => Some(VersionId::parse(v).map_err(|_| BatchError("a bad version"))?),
        };
        let parents = crate::braid::parse_version(&parents).map_err(|_| BatchError("bad parents"))?;
        Ok((version, parents))
    }
    fn versions(&mut self) -> Result<(Option<VersionId>, Version), BatchError> {
        let version = self.id()?;
        let n = self.u16()?;
        let mut parents = Vec::with_capacity(n.min(self.0.len() / 9));
        for _ in 0..n {
            let p = self.id()?.ok_or(BatchError("a parent with no agent"))?;
            // One way to write a set: in order, once each.
            if parents.last().is_some_and(|last| *last >= p) {
                return Err(BatchError("parents out of order"));
            }
            parents.push(p);
        }
        Ok((version, Version::new(parents)))
    }
    fn str(&mut self, n: usize) -> Result<String, BatchError> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| BatchError("a string is not UTF-8"))
    }
}

/// Decodes a batch (the plaintext of an opened segment).
pub fn decode(bytes: &[u8]) -> Result<Vec<Entry>, BatchError> {
    let mut r = Reader(bytes);
    let v1 = match r.take(4)? {
        m if m == MAGIC => false,
        m if m == MAGIC_V1 => true,
        _ => return Err(BatchError("no PSB2 magic")),
    };
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
        let (version, parents) = if v1 { r.versions_v1()? } else { r.versions()? };
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

    fn id(s: &str) -> VersionId {
        VersionId::parse(s).unwrap()
    }

    fn change() -> Entry {
        Entry {
            what: What::Change,
            kind: Kind::Text,
            path: ResourcePath::new("notes/a").unwrap(),
            media_type: "text/plain".into(),
            seq: 2,
            version: Some(id("x-1")),
            parents: Version::new(vec![id("x-0"), id("b-7")]),
            at_ms: 1_700_000_000_000,
            data: Bytes::from_static(&[0xaa, 0xbb]),
        }
    }

    #[test]
    fn the_encoding_is_pinned() {
        let e = change();
        let b = encode(std::slice::from_ref(&e));
        let expected = [
            "50534232",             // "PSB2"
            "00000001",             // one entry
            "01",                   // a change
            "01",                   // of a text resource
            "0000000000000002",     // seq 2
            "0000018bcfe56800",     // at 1700000000000 ms
            "0007",                 // path, 7 bytes
            "6e6f7465732f61",       // "notes/a"
            "000a",                 // media type, 10 bytes
            "746578742f706c61696e", // "text/plain"
            "01",                   // version: agent, 1 byte
            "78",                   // "x"
            "0000000000000001",     // seq 1
            "0002",                 // two parents, in order
            "01",                   // agent, 1 byte
            "62",                   // "b"
            "0000000000000007",     // seq 7
            "01",                   // agent, 1 byte
            "78",                   // "x"
            "0000000000000000",     // seq 0
            "00000002",             // data, 2 bytes
            "aabb",
        ]
        .concat();
        assert_eq!(hex(&b), expected);
        assert_eq!(b.len(), BATCH_HEADER_LEN + e.encoded_len());
        assert_eq!(decode(&b).unwrap(), vec![e]);

        // A snapshot has no version and no parents.
        let snap = Entry {
            what: What::Snapshot,
            version: None,
            parents: Version::root(),
            ..change()
        };
        let b = encode(std::slice::from_ref(&snap));
        let tail = [
            "00",               // version: no agent
            "0000000000000000", // seq 0
            "0000",             // no parents
            "00000002",         // data, 2 bytes
            "aabb",
        ]
        .concat();
        assert!(hex(&b).ends_with(&tail), "{}", hex(&b));
        assert_eq!(b.len(), BATCH_HEADER_LEN + snap.encoded_len());
        assert_eq!(decode(&b).unwrap(), vec![snap]);
    }

    #[test]
    fn batches_written_before_versions_were_typed_still_read() {
        let v1 = [
            "50534231",                 // "PSB1"
            "00000002",                 // two entries
            "01",                       // a change
            "01",                       // of a text resource
            "0000000000000002",         // seq 2
            "0000018bcfe56800",         // at 1700000000000 ms
            "0007",                     // path, 7 bytes
            "6e6f7465732f61",           // "notes/a"
            "000a",                     // media type, 10 bytes
            "746578742f706c61696e",     // "text/plain"
            "0003",                     // version, 3 bytes
            "782d31",                   // "x-1"
            "0000000c",                 // parents, 12 bytes
            "22622d37222c2022782d3022", // "\"b-7\", \"x-0\""
            "00000002",                 // data, 2 bytes
            "aabb",
            "02",                   // a snapshot
            "01",                   // of a text resource
            "0000000000000002",     // through seq 2
            "0000018bcfe56800",     // at 1700000000000 ms
            "0007",                 // path, 7 bytes
            "6e6f7465732f61",       // "notes/a"
            "000a",                 // media type, 10 bytes
            "746578742f706c61696e", // "text/plain"
            "0000",                 // no version
            "00000000",             // no parents
            "00000002",             // data, 2 bytes
            "aabb",
        ]
        .concat();
        let bytes: Vec<u8> = (0..v1.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&v1[i..i + 2], 16).unwrap())
            .collect();
        let snap = Entry {
            what: What::Snapshot,
            version: None,
            parents: Version::root(),
            ..change()
        };
        assert_eq!(decode(&bytes).unwrap(), vec![change(), snap]);
    }

    #[test]
    fn damaged_batches_are_errors() {
        let e = Entry {
            what: What::Value,
            kind: Kind::Bytes,
            path: ResourcePath::new("img").unwrap(),
            media_type: "image/png".into(),
            seq: 1,
            version: Some(id("y-0")),
            parents: Version::root(),
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
        let mut no_agent = encode(&[Entry {
            version: None,
            parents: Version::one(id("z-1")),
            ..change()
        }]);
        assert!(decode(&no_agent).is_ok());
        // The parent's agent length, at the end of the entry before its seq and the data.
        let at = no_agent.len() - 6 - 8 - 1 - 1;
        assert_eq!(no_agent[at], 1);
        no_agent[at] = 0;
        no_agent.remove(at + 1);
        assert!(decode(&no_agent).is_err());
        // Parents are a set, written in order: another order is not this encoding.
        let two = encode(&[change()]);
        let mut swapped = two.clone();
        let (b, x) = (two.len() - 6 - 2 * 10, two.len() - 6 - 10);
        swapped[b..x].copy_from_slice(&two[x..x + 10]);
        swapped[x..x + 10].copy_from_slice(&two[b..x]);
        assert_eq!(decode(&swapped), Err(BatchError("parents out of order")));
        assert!(decode(&[]).is_err());
    }
}
