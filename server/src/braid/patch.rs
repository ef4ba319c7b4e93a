//! PUT bodies: a whole representation, one patch (`Content-Range` header), or `Patches: N`
//! patch blocks in the body (braid-http-04 §3), parsed into typed [`Patch`]es.
//!
//! The body is untrusted bytes: every length is checked against what is actually there, and
//! a malformed block is an error naming the block, never a panic or a partial result.

use bytes::Bytes;
use http::HeaderMap;

use super::BraidError;
use crate::update::{JsonStep, Patch, Range, WriteBody};

/// Most patches accepted in one request.
pub const MAX_PATCHES: usize = 10_000;

/// Reads a PUT's body as a whole representation or as patches.
pub fn parse_write_body(headers: &HeaderMap, body: Bytes) -> Result<WriteBody, BraidError> {
    let media_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let patches_header = match headers.get("patches") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| BraidError::header("Patches", "is not a count"))?,
        ),
        None => media_type.as_deref().and_then(http_patches_count),
    };
    if let Some(n) = patches_header {
        if headers.contains_key(http::header::CONTENT_RANGE) {
            return Err(BraidError::Patch(
                "a request has either Content-Range or Patches, not both".into(),
            ));
        }
        return parse_patch_blocks(&body, n).map(WriteBody::Patches);
    }
    if let Some(range) = headers.get(http::header::CONTENT_RANGE) {
        let range = range
            .to_str()
            .map_err(|_| BraidError::header("Content-Range", "is not visible ASCII"))?;
        let range = parse_content_range(range)?;
        return Ok(WriteBody::Patches(vec![Patch { range, content: body }]));
    }
    Ok(WriteBody::Full { media_type, body })
}

/// braid-http 1.4 sends `Content-Type: application/http-patches; count=N` for multi-patch.
fn http_patches_count(media_type: &str) -> Option<usize> {
    let mut parts = media_type.split(';');
    let essence = parts.next()?.trim();
    if !essence.eq_ignore_ascii_case("application/http-patches") {
        return None;
    }
    parts.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k.trim().eq_ignore_ascii_case("count"))
            .then(|| v.trim().parse().ok())
            .flatten()
    })
}

/// Parses `n` patch blocks: headers (`Content-Length`, `Content-Range`, case-insensitive),
/// a blank line, then exactly `Content-Length` bytes; blocks separated by blank lines.
pub fn parse_patch_blocks(body: &[u8], n: usize) -> Result<Vec<Patch>, BraidError> {
    if n > MAX_PATCHES {
        return Err(BraidError::Patch(format!(
            "{n} patches in one request; the limit is {MAX_PATCHES}"
        )));
    }
    let mut patches = Vec::with_capacity(n);
    let mut at = 0usize;
    for i in 1..=n {
        while at < body.len() && (body[at] == b'\r' || body[at] == b'\n') {
            at += 1;
        }
        let (len, range, content_start) = parse_block_head(body, at, i)?;
        let end = content_start
            .checked_add(len)
            .filter(|&e| e <= body.len())
            .ok_or_else(|| {
                BraidError::Patch(format!(
                    "patch {i} says Content-Length: {len} but only {} bytes follow",
                    body.len() - content_start
                ))
            })?;
        patches.push(Patch {
            range,
            content: Bytes::copy_from_slice(&body[content_start..end]),
        });
        at = end;
    }
    if body[at..].iter().any(|&b| b != b'\r' && b != b'\n') {
        return Err(BraidError::Patch(format!(
            "unexpected bytes after the last of {n} patches"
        )));
    }
    Ok(patches)
}

/// Reads one block's header lines; returns (content length, range, offset of content).
fn parse_block_head(body: &[u8], start: usize, i: usize) -> Result<(usize, Range, usize), BraidError> {
    let mut len = None;
    let mut range = None;
    let mut at = start;
    loop {
        let line_end = body[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|p| at + p)
            .ok_or_else(|| BraidError::Patch(format!("patch {i} is cut off in its headers")))?;
        let line = &body[at..line_end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        at = line_end + 1;
        if line.is_empty() {
            break;
        }
        let line = std::str::from_utf8(line)
            .map_err(|_| BraidError::Patch(format!("patch {i} has a header that is not UTF-8")))?;
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| BraidError::Patch(format!("patch {i} has a malformed header line {line:?}")))?;
        let value = value.trim();
        if name.trim().eq_ignore_ascii_case("content-length") {
            len =
                Some(value.parse::<usize>().map_err(|_| {
                    BraidError::Patch(format!("patch {i} has a bad Content-Length {value:?}"))
                })?);
        } else if name.trim().eq_ignore_ascii_case("content-range") {
            range = Some(parse_content_range(value)?);
        }
    }
    let len = len.ok_or_else(|| BraidError::Patch(format!("patch {i} has no Content-Length")))?;
    let range = range.ok_or_else(|| BraidError::Patch(format!("patch {i} has no Content-Range")))?;
    Ok((len, range, at))
}

/// Parses `<unit> <range>`: `text [5:5]`, `json .a[2]`, `bytes 0-99`.
pub fn parse_content_range(value: &str) -> Result<Range, BraidError> {
    let value = value.trim();
    let (unit, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    let bad = |why: &str| BraidError::Range(format!("Content-Range {value:?}: {why}"));
    match unit.to_ascii_lowercase().as_str() {
        "text" => {
            let inner = rest
                .strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .ok_or_else(|| bad("a text range is [start:end]"))?;
            let (a, b) = inner
                .split_once(':')
                .ok_or_else(|| bad("a text range is [start:end]"))?;
            let start = a.trim().parse().map_err(|_| bad("start is not a number"))?;
            let end = b.trim().parse().map_err(|_| bad("end is not a number"))?;
            if end < start {
                return Err(bad("end is before start"));
            }
            Ok(Range::Text { start, end })
        }
        "json" => parse_json_path(rest).map(Range::Json).map_err(|e| bad(&e)),
        "bytes" => {
            let (a, b) = rest
                .split_once('-')
                .ok_or_else(|| bad("a byte range is first-last"))?;
            let start: u64 = a.trim().parse().map_err(|_| bad("first is not a number"))?;
            let end = if b.trim().is_empty() {
                None
            } else {
                let last: u64 = b.trim().parse().map_err(|_| bad("last is not a number"))?;
                if last < start {
                    return Err(bad("last is before first"));
                }
                // Held as an exclusive end: the largest `last` has none.
                Some(
                    last.checked_add(1)
                        .ok_or_else(|| bad("last is past the largest offset"))?,
                )
            };
            Ok(Range::Bytes { start, end })
        }
        "" => Err(bad("no range unit")),
        other => Err(BraidError::Range(format!(
            "range unit {other:?} is not supported (text, json and bytes are)"
        ))),
    }
}

/// Parses a JSON range path: `.a.b`, `[3]`, `[-1]`, `[1:4]`, `["key with spaces"]`.
/// The empty path is the whole value.
pub fn parse_json_path(path: &str) -> Result<Vec<JsonStep>, String> {
    let b = path.as_bytes();
    let mut steps = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'.' => {
                let start = i + 1;
                let mut j = start;
                while j < b.len() && b[j] != b'.' && b[j] != b'[' {
                    j += 1;
                }
                if j == start {
                    return Err("empty field name after `.`".into());
                }
                steps.push(JsonStep::Key(path[start..j].to_string()));
                i = j;
            }
            b'[' => {
                let close = find_bracket_end(path, i)?;
                let inner = path[i + 1..close].trim();
                if inner.starts_with('"') {
                    let key: String =
                        serde_json::from_str(inner).map_err(|_| format!("bad quoted field {inner}"))?;
                    steps.push(JsonStep::Key(key));
                } else if let Some((a, c)) = inner.split_once(':') {
                    let a = a.trim().parse().map_err(|_| format!("bad slice [{inner}]"))?;
                    let c = c.trim().parse().map_err(|_| format!("bad slice [{inner}]"))?;
                    steps.push(JsonStep::Slice(a, c));
                } else {
                    let n = inner.parse().map_err(|_| format!("bad index [{inner}]"))?;
                    steps.push(JsonStep::Index(n));
                }
                i = close + 1;
            }
            _ => {
                return Err(format!(
                    "unexpected {:?} at byte {i}",
                    path[i..].chars().next().unwrap_or('?')
                ));
            }
        }
    }
    Ok(steps)
}

/// Finds the `]` closing the `[` at `open`, skipping over a quoted string inside.
fn find_bracket_end(path: &str, open: usize) -> Result<usize, String> {
    let b = path.as_bytes();
    let mut j = open + 1;
    let mut in_str = false;
    while j < b.len() {
        match (in_str, b[j]) {
            (true, b'\\') => j += 1,
            (true, b'"') => in_str = false,
            (false, b'"') => in_str = true,
            (false, b']') => return Ok(j),
            _ => {}
        }
        j += 1;
    }
    Err("unclosed `[`".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        m
    }

    #[test]
    fn two_patches_as_braid_http_13_sends_them() {
        let body = b"content-length: 1\r\ncontent-range: text [0:1]\r\n\r\nH\r\n\r\ncontent-length: 1\r\ncontent-range: text [11:11]\r\n\r\n!\r\n";
        let w = parse_write_body(&h(&[("patches", "2")]), Bytes::from_static(body)).unwrap();
        let WriteBody::Patches(p) = w else { panic!() };
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].range, Range::Text { start: 0, end: 1 });
        assert_eq!(&p[0].content[..], b"H");
        assert_eq!(p[1].range, Range::Text { start: 11, end: 11 });
        assert_eq!(&p[1].content[..], b"!");
    }

    #[test]
    fn capitalised_headers_and_http_patches_content_type() {
        let body = b"Content-Length: 2\r\nContent-Range: text [0:0]\r\n\r\nhi";
        let w = parse_write_body(
            &h(&[("content-type", "application/http-patches; count=1")]),
            Bytes::from_static(body),
        )
        .unwrap();
        let WriteBody::Patches(p) = w else { panic!() };
        assert_eq!(&p[0].content[..], b"hi");
    }

    #[test]
    fn single_patch_in_headers() {
        let w = parse_write_body(
            &h(&[("content-range", "text [5:5]")]),
            Bytes::from_static(b" world"),
        )
        .unwrap();
        let WriteBody::Patches(p) = w else { panic!() };
        assert_eq!(
            p,
            vec![Patch {
                range: Range::Text { start: 5, end: 5 },
                content: Bytes::from_static(b" world")
            }]
        );
    }

    #[test]
    fn full_body_keeps_media_type() {
        let w = parse_write_body(&h(&[("content-type", "text/plain")]), Bytes::from_static(b"x")).unwrap();
        assert!(matches!(w, WriteBody::Full { media_type: Some(m), .. } if m == "text/plain"));
    }

    #[test]
    fn malformed_blocks_are_named_errors() {
        let cases: &[(&str, usize, &str)] = &[
            ("content-range: text [0:0]\r\n\r\nx", 1, "no Content-Length"),
            ("content-length: 1\r\n\r\nx", 1, "no Content-Range"),
            (
                "content-length: 9\r\ncontent-range: text [0:0]\r\n\r\nx",
                1,
                "only 1 bytes follow",
            ),
            (
                "content-length: x\r\ncontent-range: text [0:0]\r\n\r\nx",
                1,
                "bad Content-Length",
            ),
            (
                "content-length: 1\r\ncontent-range: text [0:0]\r\n\r\nxy",
                1,
                "unexpected bytes",
            ),
            (
                "content-length: 1\r\ncontent-range: text [0:0]\r\n\r\nx",
                2,
                "patch 2 is cut off",
            ),
            ("content-length: 1\r\ncontent-range: text [0:0]", 1, "cut off"),
            ("garbage\r\n\r\n", 1, "malformed header"),
        ];
        for (body, n, want) in cases {
            let err = parse_patch_blocks(body.as_bytes(), *n).unwrap_err().to_string();
            assert!(err.contains(want), "{body:?}: {err} (wanted {want:?})");
        }
        assert!(parse_patch_blocks(b"", MAX_PATCHES + 1).is_err());
        assert_eq!(parse_patch_blocks(b"\r\n", 0).unwrap(), vec![]);
    }

    #[test]
    fn content_ranges() {
        assert_eq!(
            parse_content_range("text [3:7]").unwrap(),
            Range::Text { start: 3, end: 7 }
        );
        assert!(parse_content_range("text [7:3]").is_err());
        assert!(parse_content_range("text 3:7").is_err());
        assert!(
            parse_content_range("lines 1-2")
                .unwrap_err()
                .to_string()
                .contains("not supported")
        );
        assert_eq!(
            parse_content_range("bytes 0-3").unwrap(),
            Range::Bytes {
                start: 0,
                end: Some(4)
            }
        );
        assert_eq!(
            parse_content_range("bytes 5-").unwrap(),
            Range::Bytes { start: 5, end: None }
        );
        assert!(parse_content_range("bytes 5-1").is_err());
        // `last + 1` overflowed (seen while writing the braid_patches fuzz target, which
        // panics on it): a panic with overflow checks, an empty range at 0 without.
        assert!(parse_content_range("bytes 0-18446744073709551615").is_err());
        assert_eq!(
            parse_content_range("bytes 0-18446744073709551614").unwrap(),
            Range::Bytes {
                start: 0,
                end: Some(u64::MAX)
            }
        );
        assert_eq!(parse_content_range("json").unwrap(), Range::Json(vec![]));
    }

    #[test]
    fn json_paths() {
        use JsonStep::*;
        assert_eq!(parse_json_path("").unwrap(), vec![]);
        assert_eq!(
            parse_json_path(".messages[1:1]").unwrap(),
            vec![Key("messages".into()), Slice(1, 1)]
        );
        assert_eq!(
            parse_json_path(r#".a["b]c"][-1].d"#).unwrap(),
            vec![Key("a".into()), Key("b]c".into()), Index(-1), Key("d".into())]
        );
        for bad in ["a", ".", "..a", "[", "[x]", "[1:x]", r#"["unterminated]"#] {
            assert!(parse_json_path(bad).is_err(), "{bad:?}");
        }
    }
}
