//! Static files (`--web-dir DIR`): the web app Plait fronts, served beside its state.
//!
//! A GET or HEAD whose path names a file in the directory (or a directory with an
//! `index.html`) is answered with that file, streamed, with its content type and an `ETag`
//! (length and modification time); `If-None-Match` gets 304. Requests that speak Braid
//! (`Subscribe`, `Version`, `Parents`) and paths naming no file go on to the state.
//! Nothing outside the directory is ever served: `.`/`..` segments are refused and the
//! resolved path must stay inside the canonical directory (symlinks out are refused too).
//! Dot-files and dot-directories (`/.env`, `/.git/config`, `/a/.hidden/x`) are never
//! served, whether the request names them or a symlink leads to one: such paths go on to
//! the state like any path naming no file.

use std::path::{Component, Path, PathBuf};

use axum::body::Body;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use percent_encoding::percent_decode_str;

use super::error::ApiError;

/// A directory of static files.
pub struct StaticFiles {
    root: PathBuf,
}

impl StaticFiles {
    pub fn new(dir: &Path) -> Result<StaticFiles, String> {
        let root = dir
            .canonicalize()
            .map_err(|e| format!("web dir {}: {e}", dir.display()))?;
        if !root.is_dir() {
            return Err(format!("web dir {} is not a directory", dir.display()));
        }
        Ok(StaticFiles { root })
    }

    /// The file a request names, if this directory has it; errors for paths that try to
    /// leave the directory.
    fn resolve(&self, raw_path: &str) -> Result<Option<PathBuf>, ApiError> {
        let decoded = percent_decode_str(raw_path)
            .decode_utf8()
            .map_err(|_| ApiError::bad_request("path is not valid percent-encoded UTF-8"))?;
        let rel = Path::new(decoded.trim_start_matches('/'));
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) || decoded.contains('\0') {
            return Err(ApiError::bad_request("path leaves the web directory"));
        }
        if is_hidden(rel) {
            return Ok(None);
        }
        let mut path = self.root.join(rel);
        if path.is_dir() {
            path = path.join("index.html");
        }
        let Ok(real) = path.canonicalize() else {
            return Ok(None);
        };
        let Ok(inside) = real.strip_prefix(&self.root) else {
            return Err(ApiError::forbidden("path leaves the web directory"));
        };
        // A symlink to a dot-file is not a way to it.
        if is_hidden(inside) {
            return Ok(None);
        }
        Ok(real.is_file().then_some(real))
    }

    /// Answers `req` from the directory, or `None` to let the state answer it.
    pub async fn serve(
        &self,
        method: &Method,
        uri_path: &str,
        headers: &HeaderMap,
    ) -> Option<Response<Body>> {
        if !matches!(*method, Method::GET | Method::HEAD) || is_braid(headers) {
            return None;
        }
        let path = match self.resolve(uri_path) {
            Ok(Some(p)) => p,
            Ok(None) => return None,
            Err(e) => return Some(e.into_response()),
        };
        let meta = tokio::fs::metadata(&path).await.ok()?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let etag = format!("\"{:x}-{:x}\"", meta.len(), mtime);
        let mut res = if headers
            .get(http::header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
        {
            let mut r = Response::new(Body::empty());
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            r
        } else if method == Method::HEAD {
            let mut r = Response::new(Body::empty());
            r.headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(meta.len()));
            r
        } else {
            let file = tokio::fs::File::open(&path).await.ok()?;
            let mut r = Response::new(Body::from_stream(tokio_util::io::ReaderStream::new(file)));
            r.headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(meta.len()));
            r
        };
        let mime = mime_guess::from_path(&path).first_or_octet_stream();
        let h = res.headers_mut();
        if let Ok(v) = HeaderValue::from_str(mime.essence_str()) {
            let v =
                if mime.type_() == mime_guess::mime::TEXT || mime.essence_str() == "application/javascript" {
                    HeaderValue::from_str(&format!("{}; charset=utf-8", mime.essence_str())).unwrap_or(v)
                } else {
                    v
                };
            h.insert(http::header::CONTENT_TYPE, v);
        }
        if let Ok(v) = HeaderValue::from_str(&etag) {
            h.insert(http::header::ETAG, v);
        }
        h.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        Some(res)
    }
}

/// Whether a path (relative to the web dir) names a dot-file or goes through a
/// dot-directory: `.env`, `.git/config`, `a/.hidden/x`.
fn is_hidden(rel: &Path) -> bool {
    rel.components()
        .any(|c| c.as_os_str().as_encoded_bytes().first() == Some(&b'.'))
}

/// Whether a request speaks Braid (and so is for the state, not for a file).
fn is_braid(h: &HeaderMap) -> bool {
    h.contains_key("subscribe") || h.contains_key("version") || h.contains_key("parents")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_files_and_directories_are_hidden() {
        for p in [".env", ".git/config", "a/.hidden/x", "a/b/.x"] {
            assert!(is_hidden(Path::new(p)), "{p}");
        }
        for p in ["index.html", "a/b.c/x", "a/x.", ""] {
            assert!(!is_hidden(Path::new(p)), "{p}");
        }
    }
}
