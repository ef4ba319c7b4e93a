//! Braid request headers parsed into typed values, and version lists written back.
//!
//! Both client generations must be accepted (BRAID.md §3.10): `Subscribe: true`, `?1` or
//! empty; `Peer: alice` or `Peer: "alice"`; version lists as comma-separated JSON strings.

use std::time::Duration;

use http::HeaderMap;

use super::BraidError;
use crate::model::{Version, VersionId};

/// Shortest heartbeat interval honoured; shorter requests are raised to it.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(500);
/// Longest heartbeat interval honoured.
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);

/// How the server merges and what it sends to this client (`Merge-Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeType {
    /// braid-text's default for thin clients: the server rebases, and each subscriber gets
    /// patches from the version it last saw.
    Simpleton,
}

/// The Braid-specific parts of a request, typed.
#[derive(Debug, Clone, Default)]
pub struct BraidHeaders {
    /// `Some(value as sent)` when the client asked to subscribe; echoed on the 209.
    pub subscribe: Option<String>,
    pub version: Option<Version>,
    pub parents: Option<Version>,
    pub peer: Option<String>,
    pub merge_type: Option<MergeType>,
    pub heartbeats: Option<Duration>,
    /// The SHA-256 the client says the representation has after its write
    /// (`Repr-Digest: sha-256=:<base64>:`; other algorithms are ignored).
    pub repr_digest: Option<[u8; 32]>,
}

impl BraidHeaders {
    pub fn parse(headers: &HeaderMap) -> Result<Self, BraidError> {
        let text = |name: &'static str| -> Result<Option<&str>, BraidError> {
            match headers.get(name) {
                None => Ok(None),
                Some(v) => v
                    .to_str()
                    .map(|s| Some(s.trim()))
                    .map_err(|_| BraidError::header(name, "is not visible ASCII")),
            }
        };
        let subscribe = text("subscribe")?.and_then(|v| {
            let off = v.eq_ignore_ascii_case("false") || v == "?0";
            (!off).then(|| v.to_string())
        });
        let version = text("version")?
            .map(|v| parse_version(v).map_err(|e| BraidError::header("Version", &e)))
            .transpose()?;
        let parents = text("parents")?
            .map(|v| parse_version(v).map_err(|e| BraidError::header("Parents", &e)))
            .transpose()?;
        let peer = text("peer")?
            .map(|v| parse_peer(v).map_err(|e| BraidError::header("Peer", &e)))
            .transpose()?
            .filter(|p| !p.is_empty());
        let merge_type = text("merge-type")?.map(parse_merge_type).transpose()?;
        let heartbeats = text("heartbeats")?
            .map(|v| parse_heartbeats(v).map_err(|e| BraidError::header("Heartbeats", &e)))
            .transpose()?;
        let repr_digest = text("repr-digest")?
            .map(|v| parse_repr_digest(v).map_err(|e| BraidError::header("Repr-Digest", &e)))
            .transpose()?
            .flatten();
        Ok(BraidHeaders {
            subscribe,
            version,
            parents,
            peer,
            merge_type,
            heartbeats,
            repr_digest,
        })
    }
}

/// Parses a version list: `"a-1", "b-2"`, JSON string syntax, empty = the root.
pub fn parse_version(value: &str) -> Result<Version, String> {
    let strings = parse_string_list(value)?;
    let ids = strings
        .iter()
        .map(|s| VersionId::parse(s).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Version::new(ids))
}

/// Parses comma-separated JSON strings the way clients produce them
/// (`JSON.parse('[' + value + ']')`).
pub fn parse_string_list(value: &str) -> Result<Vec<String>, String> {
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str::<Vec<String>>(&format!("[{value}]"))
        .map_err(|_| format!("{value:?} is not a list of quoted strings"))
}

/// Writes a version list as clients parse it: JSON strings joined by `, `, printable ASCII
/// only (everything else `\uXXXX`-escaped), the empty list as an empty value.
pub fn format_version(version: &Version) -> String {
    let mut out = String::new();
    for (i, id) in version.ids().iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        push_json_string(&mut out, &id.to_string());
    }
    out
}

fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            _ => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
}

/// The `sha-256` member of a `Repr-Digest` dictionary (RFC 9530), if there is one.
fn parse_repr_digest(value: &str) -> Result<Option<[u8; 32]>, String> {
    use base64::Engine as _;
    for member in value.split(',') {
        let Some((alg, v)) = member.trim().split_once('=') else {
            return Err(format!("{value:?} is not a digest dictionary"));
        };
        if !alg.trim().eq_ignore_ascii_case("sha-256") {
            continue;
        }
        let b64 = v
            .trim()
            .strip_prefix(':')
            .and_then(|v| v.strip_suffix(':'))
            .ok_or_else(|| format!("sha-256 value {v:?} is not :base64:"))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| format!("sha-256 value {v:?} is not base64"))?;
        return bytes
            .try_into()
            .map(Some)
            .map_err(|_| "a sha-256 digest is 32 bytes".to_string());
    }
    Ok(None)
}

/// `Peer: alice` (braid-http 1.3) or `Peer: "alice"` (1.4, a structured-field string).
fn parse_peer(value: &str) -> Result<String, String> {
    if let Some(inner) = value.strip_prefix('"') {
        let inner = inner
            .strip_suffix('"')
            .ok_or_else(|| format!("{value:?} has an unterminated quote"))?;
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(e @ ('"' | '\\')) => out.push(e),
                    _ => return Err(format!("{value:?} has a bad escape")),
                },
                '"' => return Err(format!("{value:?} has a stray quote")),
                c => out.push(c),
            }
        }
        Ok(out)
    } else {
        Ok(value.to_string())
    }
}

fn parse_merge_type(value: &str) -> Result<MergeType, BraidError> {
    match value.to_ascii_lowercase().as_str() {
        "simpleton" => Ok(MergeType::Simpleton),
        "dt" => Err(BraidError::MergeType(
            "merge type `dt` is not supported yet; use `simpleton`".into(),
        )),
        other => Err(BraidError::MergeType(format!(
            "unknown merge type {other:?}; this server speaks `simpleton`"
        ))),
    }
}

/// The timer of a subscription's heartbeats: first after `every`, then every `every`; one
/// late is not made up in a burst.
pub fn heartbeat_timer(every: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

/// A `Heartbeats` interval as the answer's header echoes it: seconds, up to three
/// decimals, e.g. `2.5s`.
pub fn format_heartbeats(d: Duration) -> String {
    let s = format!("{:.3}", d.as_secs_f64());
    format!("{}s", s.trim_end_matches('0').trim_end_matches('.'))
}

/// `1s`, `1`, `1.5s`, `500ms` (braid-http sends `<n>s`).
fn parse_heartbeats(value: &str) -> Result<Duration, String> {
    let v = value.trim().to_ascii_lowercase();
    let (num, scale) = if let Some(n) = v.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1.0)
    } else {
        (v.as_str(), 1.0)
    };
    let secs: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not a duration like `5s`"))?;
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("{value:?} must be a positive duration"));
    }
    let d = Duration::from_secs_f64((secs * scale).min(MAX_HEARTBEAT.as_secs_f64()));
    Ok(d.clamp(MIN_HEARTBEAT, MAX_HEARTBEAT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn subscribe_in_all_spellings() {
        for v in ["true", "?1", "", "keep-alive=5"] {
            let b = BraidHeaders::parse(&headers(&[("subscribe", v)])).unwrap();
            assert_eq!(b.subscribe.as_deref(), Some(v));
        }
        for v in ["false", "?0"] {
            let b = BraidHeaders::parse(&headers(&[("subscribe", v)])).unwrap();
            assert_eq!(b.subscribe, None);
        }
        assert_eq!(BraidHeaders::parse(&HeaderMap::new()).unwrap().subscribe, None);
    }

    #[test]
    fn version_lists_round_trip() {
        let v = parse_version(r#""fred-0", "erin-0""#).unwrap();
        assert_eq!(format_version(&v), r#""erin-0", "fred-0""#);
        assert!(parse_version("").unwrap().is_root());
        assert!(parse_version("  ").unwrap().is_root());
        assert!(parse_version("fred-0").is_err());
        assert!(parse_version(r#""fred""#).is_err());
        assert!(parse_version(r#""a-1",,"#).is_err());
    }

    #[test]
    fn non_ascii_agents_are_escaped() {
        let v = Version::one(VersionId::new("zoë😀", 3).unwrap());
        let s = format_version(&v);
        assert_eq!(s, r#""zo\u00eb\ud83d\ude00-3""#);
        assert!(s.bytes().all(|b| (b' '..=b'~').contains(&b)));
        assert_eq!(parse_version(&s).unwrap(), v);
    }

    #[test]
    fn peer_quoted_or_not() {
        let b = BraidHeaders::parse(&headers(&[("peer", "alice")])).unwrap();
        assert_eq!(b.peer.as_deref(), Some("alice"));
        let b = BraidHeaders::parse(&headers(&[("peer", r#""alice""#)])).unwrap();
        assert_eq!(b.peer.as_deref(), Some("alice"));
        let b = BraidHeaders::parse(&headers(&[("peer", r#""a\"b""#)])).unwrap();
        assert_eq!(b.peer.as_deref(), Some("a\"b"));
        assert!(BraidHeaders::parse(&headers(&[("peer", r#""open"#)])).is_err());
    }

    #[test]
    fn merge_types() {
        let b = BraidHeaders::parse(&headers(&[("merge-type", "simpleton")])).unwrap();
        assert_eq!(b.merge_type, Some(MergeType::Simpleton));
        assert!(matches!(
            BraidHeaders::parse(&headers(&[("merge-type", "dt")])),
            Err(BraidError::MergeType(_))
        ));
        assert!(matches!(
            BraidHeaders::parse(&headers(&[("merge-type", "ot-json")])),
            Err(BraidError::MergeType(_))
        ));
    }

    #[test]
    fn repr_digests() {
        let d = parse_repr_digest("sha-256=:LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=:")
            .unwrap()
            .unwrap();
        assert_eq!(d[0], 0x2c);
        assert_eq!(parse_repr_digest("sha-512=:AAAA:").unwrap(), None);
        assert!(parse_repr_digest("sha-256=:AAAA:").is_err());
        assert!(parse_repr_digest("sha-256=nocolons").is_err());
        assert!(parse_repr_digest("garbage").is_err());
    }

    #[test]
    fn heartbeats_parse_and_clamp() {
        assert_eq!(parse_heartbeats("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_heartbeats("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_heartbeats("1500ms").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_heartbeats("0.01s").unwrap(), MIN_HEARTBEAT);
        assert_eq!(parse_heartbeats("1e9").unwrap(), MAX_HEARTBEAT);
        assert!(parse_heartbeats("0").is_err());
        assert!(parse_heartbeats("-1s").is_err());
        assert!(parse_heartbeats("soon").is_err());
        assert!(parse_heartbeats("NaN").is_err());
        // The echo reads back as what it says.
        for d in [
            MIN_HEARTBEAT,
            Duration::from_millis(2500),
            Duration::from_secs(10),
        ] {
            assert_eq!(parse_heartbeats(&format_heartbeats(d)).unwrap(), d);
        }
        assert_eq!(format_heartbeats(Duration::from_millis(2500)), "2.5s");
    }
}
