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
    /// A machine-readable body (sent as JSON instead of the one-line reason).
    json: Option<Box<serde_json::Value>>,
}

/// What a client without a credential is told it may use.
const CHALLENGE: &str = r#"Bearer realm="plait""#;
/// The signatures this server accepts (RFC 9421 §5.1).
const ACCEPT_SIGNATURE: &str = r#"sig1=("@method" "@target-uri" "content-digest");alg="ed25519";keyid="<your identity>";created;expires;nonce"#;

impl ApiError {
    pub fn new(status: u16, code: &'static str, reason: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::from_u16(status).expect("valid status"),
            code,
            reason: reason.into(),
            headers: Vec::new(),
            phrase: None,
            json: None,
        }
    }

    /// 401: the request carries no credential that checks out. Names the accepted schemes.
    pub fn unauthenticated(reason: impl Into<String>) -> Self {
        Self::new(401, "unauthenticated", reason)
            .with_header("www-authenticate", CHALLENGE.into())
            .with_header("accept-signature", ACCEPT_SIGNATURE.into())
    }

    /// Marks a 401 as caused by a bad bearer token (RFC 6750 `invalid_token`).
    pub fn invalid_token(mut self) -> Self {
        self.headers.retain(|(k, _)| *k != "www-authenticate");
        let reason = self.reason.replace('"', "'");
        self.with_header(
            "www-authenticate",
            format!(r#"{CHALLENGE}, error="invalid_token", error_description="{reason}""#),
        )
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

    /// The machine-readable code (`Plait-Error`), also what refusals are tallied by.
    pub fn code(&self) -> &'static str {
        self.code
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn into_response(self) -> Response<Body> {
        let (body, media_type) = match &self.json {
            Some(v) => (format!("{v}\n"), "application/json"),
            None => (format!("{}\n", self.reason), "text/plain; charset=utf-8"),
        };
        let mut res = Response::new(Body::from(body));
        *res.status_mut() = self.status;
        let h = res.headers_mut();
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(media_type));
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
        // For the refusal's log line (`refusals`), which does not read bodies.
        res.extensions_mut().insert(crate::refusals::Reason(self.reason));
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

impl From<crate::access::Refusal> for ApiError {
    /// 401 when no credential came (the caller may still prove who it is), else 403; the
    /// body names the rule.
    fn from(r: crate::access::Refusal) -> Self {
        let mut e = if r.anonymous {
            ApiError::unauthenticated(r.reason.clone())
        } else {
            ApiError::forbidden(r.reason.clone())
        };
        e.json = Some(Box::new(r.to_json()));
        e
    }
}

impl From<crate::access::signature::SignatureError> for ApiError {
    /// A signature that does not check out is no credential: 401, with its reason's code.
    fn from(e: crate::access::signature::SignatureError) -> Self {
        let mut err = ApiError::unauthenticated(e.to_string());
        err.code = e.code();
        err
    }
}

impl From<crate::access::WriteRefused> for ApiError {
    fn from(e: crate::access::WriteRefused) -> Self {
        match e {
            crate::access::WriteRefused::Refused(r) => r.into(),
            crate::access::WriteRefused::InvalidRules(m) => ApiError::new(400, "invalid-rules", m),
        }
    }
}

impl From<crate::access::accounts::AccountError> for ApiError {
    fn from(e: crate::access::accounts::AccountError) -> Self {
        use crate::access::accounts::AccountError;
        match e {
            AccountError::Refused(m) => ApiError::forbidden(m),
            AccountError::TooMany { limit, retry_after } => {
                ApiError::new(429, "rate-limited", format!("too many attempts ({limit})"))
                    .with_header("retry-after", retry_after.as_secs().max(1).to_string())
            }
            AccountError::Busy => {
                ApiError::new(503, "busy", e.to_string()).with_header("retry-after", "1".into())
            }
            AccountError::Engine(e) => e.into(),
        }
    }
}

impl From<crate::access::owner_login::OwnerLoginError> for ApiError {
    fn from(e: crate::access::owner_login::OwnerLoginError) -> Self {
        use crate::access::owner_login::OwnerLoginError;
        match e {
            OwnerLoginError::Unknown | OwnerLoginError::NoSession => ApiError::unauthenticated(e.to_string()),
            OwnerLoginError::Engine(e) => e.into(),
            OwnerLoginError::Io(e) => ApiError::new(503, "unavailable", format!("the login links: {e}")),
        }
    }
}

impl From<super::multiplex::MuxError> for ApiError {
    /// braid-http reads these: a `409`'s JSON `error`, `424`, `Bad-Multiplexer` and
    /// `Bad-Request` on a `404` (so it opens a new multiplexer or picks a new id).
    fn from(e: super::multiplex::MuxError) -> Self {
        use super::multiplex::MuxError;
        let reason = e.to_string();
        let retry = e.retry_after();
        let mut err = match &e {
            MuxError::BadVersion => {
                let mut err = ApiError::new(400, "multiplex-version", reason);
                err.phrase = Some("Bad Multiplexer Version");
                err
            }
            MuxError::BadPath(_) => ApiError::bad_request(reason),
            MuxError::DuplicateMultiplexer(_) | MuxError::DuplicateRequest { .. } => {
                let (code, error) = match &e {
                    MuxError::DuplicateMultiplexer(_) => ("multiplexer-exists", "Multiplexer already exists"),
                    _ => ("request-multiplexed", "Request already multiplexed"),
                };
                let mut err = ApiError::new(409, code, reason.clone());
                err.json = Some(Box::new(serde_json::json!({ "error": error, "details": reason })));
                err
            }
            MuxError::NotOpen(id) => {
                let mut err =
                    ApiError::new(424, "no-multiplexer", reason).with_header("bad-multiplexer", id.clone());
                err.phrase = Some("Multiplexer not found");
                err
            }
            MuxError::NoMultiplexer(id) => {
                ApiError::new(404, "no-multiplexer", reason).with_header("bad-multiplexer", id.clone())
            }
            MuxError::NoRequest(id) => {
                ApiError::new(404, "no-multiplexed-request", reason).with_header("bad-request", id.clone())
            }
            MuxError::TooManyMultiplexers(_) => ApiError::new(429, "too-many-multiplexers", reason),
            MuxError::Full(_) => ApiError::new(429, "multiplexer-full", reason),
            MuxError::Method => ApiError::new(405, "method-not-allowed", reason)
                .with_header("allow", "POST, DELETE, OPTIONS".into()),
        };
        if let Some(secs) = retry {
            err = err.with_header("retry-after", secs.to_string());
        }
        err
    }
}

impl From<crate::p2p::JoinError> for ApiError {
    fn from(e: crate::p2p::JoinError) -> Self {
        use crate::p2p::JoinError;
        match e {
            JoinError::Malformed(_) => ApiError::bad_request(e.to_string()),
            JoinError::Refused(_) => ApiError::new(403, "invite-refused", e.to_string()),
            JoinError::Stopped => ApiError::new(503, "p2p-stopped", e.to_string()),
        }
    }
}

impl From<crate::statebus::access::AccessError> for ApiError {
    fn from(e: crate::statebus::access::AccessError) -> Self {
        use crate::statebus::access::AccessError;
        match e {
            AccessError::Forbidden(m) => ApiError::forbidden(m),
            AccessError::Refused(r) => r.into(),
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
            EngineError::RateLimited { retry_after, limit } => {
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                let what = if limit == "writes_per_second" {
                    "writes"
                } else {
                    "bytes written"
                };
                ApiError::new(
                    429,
                    "rate-limited",
                    format!(
                        "too many {what} from this client (limits.{limit}); retry in {} ms",
                        retry_after.as_millis().max(1)
                    ),
                )
                .with_header("retry-after", secs.max(1).to_string())
            }
            // 507 Insufficient Storage: the server will not store more for this writer.
            e @ EngineError::QuotaExceeded { .. } => ApiError::new(507, "quota-exceeded", e.to_string()),
            e @ EngineError::IdentityQuotaExceeded { .. } => {
                ApiError::new(507, "identity-quota-exceeded", e.to_string())
            }
            e @ EngineError::TooManyPatches { .. } => ApiError::new(413, "too-many-patches", e.to_string()),
            e @ EngineError::WriteTooLarge { .. } => ApiError::new(413, "write-too-large", e.to_string()),
        }
    }
}
