//! Errors a client can cause, and the one place they become HTTP responses.
//!
//! Every error response has a one-line `text/plain` reason and a machine-readable
//! `Plait-Error` header naming what went wrong.

use axum::body::Body;
use http::{HeaderValue, Response, StatusCode};

use crate::braid::{BraidError, format_version};
use crate::doc::DocError;
use crate::engine::EngineError;
use crate::model::{PathError, Version};
use crate::storage::StorageError;

/// `309 Version Unknown Here`: what braid-text answers and braid-http clients handle
/// (the 2026 versions draft names `432 Version Not Found`; no client handles it yet).
pub const VERSION_UNKNOWN: u16 = 309;

/// An HTTP error with its status, a machine-readable code and a one-line reason.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub reason: String,
    headers: Vec<(&'static str, String)>,
    phrase: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, reason: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::from_u16(status).expect("valid status"),
            code,
            reason: reason.into(),
            headers: Vec::new(),
            phrase: None,
        }
    }

    pub fn bad_request(reason: impl Into<String>) -> Self {
        Self::new(400, "bad-request", reason)
    }

    pub fn forbidden(reason: impl Into<String>) -> Self {
        Self::new(403, "forbidden", reason)
    }

    pub fn not_found(reason: impl Into<String>) -> Self {
        Self::new(404, "not-found", reason)
    }

    pub fn method_not_allowed(allow: &'static str) -> Self {
        Self::new(405, "method-not-allowed", format!("allowed methods: {allow}"))
            .with_header("allow", allow.to_string())
    }

    pub fn too_large(size: Option<u64>, limit: usize) -> Self {
        let what = size.map_or_else(
            || "the body is".to_string(),
            |s| format!("the body is {s} bytes;"),
        );
        Self::new(
            413,
            "body-too-large",
            format!("{what} over the limit limits.max_body_bytes = {limit}"),
        )
    }

    pub fn unknown_version(ids: &[crate::model::VersionId]) -> Self {
        let v = format_version(&Version::new(ids.to_vec()));
        let mut e = Self::new(VERSION_UNKNOWN, "version-unknown", format!("unknown version {v}"))
            .with_header("version", v);
        e.phrase = Some("Version Unknown Here");
        e
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn into_response(self) -> Response<Body> {
        let mut res = Response::new(Body::from(format!("{}\n", self.reason)));
        *res.status_mut() = self.status;
        let h = res.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert("plait-error", HeaderValue::from_static(self.code));
        for (k, v) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.append(k, v);
            }
        }
        if let Some(p) = self.phrase {
            res.extensions_mut()
                .insert(hyper::ext::ReasonPhrase::from_static(p.as_bytes()));
        }
        res
    }
}

impl From<BraidError> for ApiError {
    fn from(e: BraidError) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

impl From<PathError> for ApiError {
    fn from(e: PathError) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

impl From<DocError> for ApiError {
    fn from(e: DocError) -> Self {
        match &e {
            DocError::UnknownVersion(ids) => ApiError::unknown_version(ids),
            DocError::NotUtf8 | DocError::BadJson(_) | DocError::BadPatch(_) | DocError::WrongUnit { .. } => {
                ApiError::new(400, "bad-patch", e.to_string())
            }
            DocError::OutOfRange(_) => ApiError::new(416, "range-not-satisfiable", e.to_string()),
            DocError::MediaType { .. } => ApiError::new(415, "wrong-media-type", e.to_string()),
            DocError::Conflict(_) => ApiError::new(409, "conflict", e.to_string()),
            DocError::TooDeep { .. } => ApiError::new(413, "too-deep", e.to_string()),
            // braid-text answers 550, and its simpleton client does not retry on it (it
            // retries other errors); a 4xx here would make it resend forever.
            DocError::DigestMismatch => {
                let mut err = ApiError::new(550, "digest-mismatch", e.to_string());
                err.phrase = Some("Repr-Digest Mismatch");
                err
            }
            DocError::Corrupt(_) => {
                tracing::error!(error = %e, "damaged document");
                ApiError::new(500, "internal", e.to_string())
            }
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match &e {
            StorageError::Unavailable(_) => ApiError::new(503, "storage-unavailable", e.to_string())
                .with_header("retry-after", "1".into()),
            // Other processes kept appending while this write was being made again.
            StorageError::Behind => {
                ApiError::new(503, "busy", e.to_string()).with_header("retry-after", "1".into())
            }
            StorageError::Gone => ApiError::new(409, "conflict", e.to_string()),
            StorageError::Corrupt(_) | StorageError::Failed(_) => {
                tracing::error!(error = %e, "storage failure");
                ApiError::new(500, "internal", e.to_string())
            }
        }
    }
}

impl From<crate::statebus::access::AccessError> for ApiError {
    fn from(e: crate::statebus::access::AccessError) -> Self {
        use crate::statebus::access::AccessError;
        match e {
            AccessError::Forbidden(m) => ApiError::forbidden(m),
            AccessError::Key(k) => ApiError::bad_request(k.to_string()),
            AccessError::Path(p) => p.into(),
            AccessError::Engine(e) => e.into(),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Doc(d) => d.into(),
            EngineError::Storage(s) => s.into(),
            EngineError::CannotCreate(m) => ApiError::new(409, "conflict", m),
            EngineError::ShuttingDown => ApiError::new(503, "shutting-down", "the server is shutting down")
                .with_header("retry-after", "1".into()),
            EngineError::RateLimited { retry_after } => {
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                ApiError::new(
                    429,
                    "rate-limited",
                    format!(
                        "too many writes from this client (limits.writes_per_second); retry in {} ms",
                        retry_after.as_millis().max(1)
                    ),
                )
                .with_header("retry-after", secs.max(1).to_string())
            }
            e @ EngineError::QuotaExceeded { .. } => ApiError::new(413, "quota-exceeded", e.to_string()),
            e @ EngineError::TooManyPatches { .. } => ApiError::new(413, "too-many-patches", e.to_string()),
        }
    }
}
