//! What the fuzz targets share: turning fuzzer bytes into the typed inputs Plait's parsers
//! take (header maps, requests), in text forms a seed corpus can spell as real examples.
//!
//! Nothing here checks or bypasses anything: it only builds what a client could send.

use http::{HeaderMap, HeaderName, HeaderValue};

/// Splits `data` at its first blank line (`\n\n` or `\r\n\r\n`): an HTTP head and a body.
/// Without a blank line everything is the head.
pub fn split_head(data: &[u8]) -> (&[u8], &[u8]) {
    let crlf = find(data, b"\r\n\r\n").map(|i| (i, i + 4));
    let lf = find(data, b"\n\n").map(|i| (i, i + 2));
    match (crlf, lf) {
        (Some(a), Some(b)) => {
            let (end, start) = if a.0 <= b.0 { a } else { b };
            (&data[..end], &data[start..])
        }
        (Some((end, start)), None) | (None, Some((end, start))) => (&data[..end], &data[start..]),
        (None, None) => (data, &[]),
    }
}

/// Header lines (`Name: value`, one a line) as a header map, as hyper would hand them over:
/// lines that are not a valid name and value are left out, repeated names are appended.
pub fn header_map(head: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in head.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = trim(&line[..colon]);
        let value = trim(&line[colon + 1..]);
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            map.append(n, v);
        }
    }
    map
}

/// Splits `data` on lines that are exactly `sep`; each part loses the line end before the
/// separator.
pub fn split_on_line<'a>(data: &'a [u8], sep: &[u8]) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut at = 0;
    loop {
        let end = data[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(data.len(), |p| at + p);
        let line = &data[at..end];
        if line.strip_suffix(b"\r").unwrap_or(line) == sep {
            let part = &data[start..at];
            let part = part.strip_suffix(b"\n").unwrap_or(part);
            parts.push(part.strip_suffix(b"\r").unwrap_or(part));
            start = (end + 1).min(data.len());
        }
        if end >= data.len() {
            break;
        }
        at = end + 1;
    }
    parts.push(&data[start..]);
    parts
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end.max(start)]
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_bodies_and_headers() {
        let (head, body) = split_head(b"Version: \"a-1\"\r\nPatches: 1\r\n\r\nbody\n\nmore");
        assert_eq!(body, b"body\n\nmore");
        let h = header_map(head);
        assert_eq!(h.get("version").unwrap(), "\"a-1\"");
        assert_eq!(h.get("patches").unwrap(), "1");
        assert_eq!(split_head(b"a: b"), (&b"a: b"[..], &b""[..]));
    }

    #[test]
    fn separator_lines() {
        assert_eq!(
            split_on_line(b"one\n---\ntwo\r\n---\nthree", b"---"),
            vec![&b"one"[..], &b"two"[..], &b"three"[..]]
        );
        assert_eq!(split_on_line(b"only", b"---"), vec![&b"only"[..]]);
    }
}
