//! HTTP Message Signatures ([RFC 9421]) made with ed25519 keys, and `Content-Digest`
//! ([RFC 9530]): how a client proves which identity sends a request.
//!
//! A signed request carries three fields:
//!
//! ```text
//! Content-Digest: sha-256=:<base64 of the body's SHA-256>:
//! Signature-Input: sig1=("@method" "@target-uri" "content-digest");created=1700000000
//!   ;expires=1700000060;nonce="<random>";keyid="<identity>";alg="ed25519"
//! Signature: sig1=:<base64 of the 64-byte ed25519 signature>:
//! ```
//!
//! `keyid` is the signer's [`Identity`] in its one text form (52 z-base-32 characters), so
//! the key needed to verify comes with the request and no key registry is consulted.
//!
//! What this module checks ([`verify_request`]): both fields parse as Structured Field
//! Values (the `sfv` crate); the signature labelled `sig1` is used, or the first one when no
//! label is `sig1`; `created`, `expires`, `nonce` and `keyid` are present, `alg` (optional)
//! is `ed25519`; `created` is at most `max_skew_secs` ahead of the server's clock, `expires`
//! is not past, and a signature lives at most [`MAX_LIFETIME_SECS`]; the covered components
//! include `@method` and `@target-uri` always, and `content-digest` whenever the request may
//! carry a body (see [`carries_body`]); the signature base is rebuilt exactly as RFC 9421
//! §2.5 says and the ed25519 signature verifies with the `keyid`'s key.
//!
//! What the caller must still do, in this order: read the body and, when
//! [`Verified::covers_digest`], check it with [`check_content_digest`]; remember the nonce
//! with [`NonceCache::check_and_insert`] — only *after* the signature verified, so that
//! unsigned garbage cannot fill the cache.
//!
//! What it does not know: accounts, rules, namespaces, the engine. It answers "this request
//! was signed by identity X, for this method and URI, and is fresh"; whether X may do it is
//! the access layer's question.
//!
//! [RFC 9421]: https://www.rfc-editor.org/rfc/rfc9421
//! [RFC 9530]: https://www.rfc-editor.org/rfc/rfc9530

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Mutex;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http::header::{CONTENT_LENGTH, HOST, HeaderName, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Method, Uri};
use plait_bridge::{Identity, Keypair};
use rand::RngCore as _;
use sfv::{BareItem, Dictionary, InnerList, Item, Key, ListEntry, ListSerializer, Parameters, Parser};
use sha2::{Digest, Sha256, Sha512};

/// The label [`sign_request`] gives its signature, and the one [`verify_request`] looks for
/// first.
pub const LABEL: &str = "sig1";

/// The longest a signature may live (`expires - created`), in seconds. It bounds how long a
/// captured request can be replayed and so how long a [`NonceCache`] must remember a nonce
/// (at most this plus the allowed clock skew).
pub const MAX_LIFETIME_SECS: u64 = 300;

/// The longest nonce accepted, in bytes: nonces are held in memory until they expire.
pub const MAX_NONCE_LEN: usize = 128;

/// A [`NonceCache`]'s default capacity: live (identity, nonce) pairs remembered at once.
pub const DEFAULT_NONCE_CAPACITY: usize = 100_000;

/// The only signature algorithm accepted, as `alg` spells it.
pub const ALGORITHM: &str = "ed25519";

/// The `Content-Digest` field (RFC 9530); `http` has no constant for it.
pub const CONTENT_DIGEST: HeaderName = HeaderName::from_static("content-digest");
/// The `Signature-Input` field (RFC 9421 §4.1).
pub const SIGNATURE_INPUT: HeaderName = HeaderName::from_static("signature-input");
/// The `Signature` field (RFC 9421 §4.2).
pub const SIGNATURE: HeaderName = HeaderName::from_static("signature");

/// Why a request's signature or digest was refused. Each reason has a stable
/// machine-readable [`code`](SignatureError::code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Neither `Signature-Input` nor `Signature` is present: the request is anonymous.
    #[error("the request is not signed (no Signature-Input and Signature fields)")]
    Missing,
    /// A field does not parse, or holds something of the wrong type or shape.
    #[error("malformed signature: {0}")]
    Malformed(String),
    /// A required signature parameter is absent.
    #[error("the signature parameters lack `{0}`")]
    MissingParameter(&'static str),
    /// `keyid` is not an identity's text form.
    #[error("keyid {0:?} is not a Plait identity (52 z-base-32 characters)")]
    BadKeyId(String),
    /// `alg` names something other than ed25519.
    #[error("signature algorithm {0:?} is not supported (only ed25519 is)")]
    UnknownAlgorithm(String),
    /// A component this server requires is not covered by the signature.
    #[error("the signature does not cover `{0}`")]
    MissingComponent(&'static str),
    /// A covered component this module cannot compute (an unknown derived component, or a
    /// component identifier with parameters such as `;sf` or `;req`).
    #[error("covered component {0} is not supported")]
    UnsupportedComponent(String),
    /// A covered header field is absent from the request.
    #[error("the signature covers the field `{0}`, which the request lacks")]
    AbsentField(String),
    /// `expires` is in the past.
    #[error("the signature has expired")]
    Expired,
    /// `created` is further in the future than the allowed clock skew.
    #[error("the signature was created in the future (check the client's clock)")]
    FromTheFuture,
    /// `expires - created` is longer than [`MAX_LIFETIME_SECS`].
    #[error("the signature lives longer than {MAX_LIFETIME_SECS} s")]
    TooLong,
    /// This identity already used this nonce in a signature that has not expired.
    #[error("this nonce was already used by this identity (replayed request)")]
    Replayed,
    /// The nonce cache is full of unexpired entries; the request may be retried shortly.
    #[error("too many signed requests are live at once; retry shortly")]
    NonceCacheFull,
    /// A body must be checked but the request has no `Content-Digest`.
    #[error("the request has no Content-Digest")]
    DigestMissing,
    /// `Content-Digest` names neither sha-256 nor sha-512.
    #[error("Content-Digest names no supported algorithm (sha-256, sha-512)")]
    UnsupportedDigest,
    /// The body does not match its `Content-Digest`.
    #[error("the body does not match its Content-Digest")]
    DigestMismatch,
    /// The ed25519 signature does not verify over the signature base.
    #[error("the signature does not verify")]
    BadSignature,
}

impl SignatureError {
    /// A stable machine-readable name for this reason, for error bodies and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            SignatureError::Missing => "signature-missing",
            SignatureError::Malformed(_) => "signature-malformed",
            SignatureError::MissingParameter(_) => "signature-missing-parameter",
            SignatureError::BadKeyId(_) => "signature-bad-keyid",
            SignatureError::UnknownAlgorithm(_) => "signature-unknown-algorithm",
            SignatureError::MissingComponent(_) => "signature-missing-component",
            SignatureError::UnsupportedComponent(_) => "signature-unsupported-component",
            SignatureError::AbsentField(_) => "signature-absent-field",
            SignatureError::Expired => "signature-expired",
            SignatureError::FromTheFuture => "signature-from-the-future",
            SignatureError::TooLong => "signature-too-long",
            SignatureError::Replayed => "signature-replayed",
            SignatureError::NonceCacheFull => "signature-nonce-cache-full",
            SignatureError::DigestMissing => "content-digest-missing",
            SignatureError::UnsupportedDigest => "content-digest-unsupported",
            SignatureError::DigestMismatch => "content-digest-mismatch",
            SignatureError::BadSignature => "signature-invalid",
        }
    }
}

/// What a verified signature establishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Who signed: the `keyid`, whose key the signature verified with.
    pub identity: Identity,
    /// The signer's nonce, for [`NonceCache::check_and_insert`].
    pub nonce: String,
    /// When the signature stops being valid (unix seconds): how long to remember the nonce.
    pub expires: u64,
    /// The signature covers `content-digest`: the caller must check the body with
    /// [`check_content_digest`] before trusting it.
    pub covers_digest: bool,
}

/// Signs a request as `key`: sets `Signature-Input` and `Signature` (label [`LABEL`]), and
/// `Content-Digest` (sha-256) when the signature covers the body.
///
/// The body is covered when one is given (`Some`, even empty) and always for PUT, PATCH and
/// POST (a missing body then counts as empty), since [`verify_request`] demands it for them.
/// `target_uri` must be the URI exactly as it will be sent (`http://host:port/path?query`),
/// `now` is the signing time in unix seconds, and the signature expires `ttl_secs` later.
///
/// Fails only when `ttl_secs` exceeds [`MAX_LIFETIME_SECS`] (the verifier would refuse the
/// signature), or `now` is beyond what a Structured Field integer holds.
pub fn sign_request(
    key: &Keypair,
    method: &Method,
    target_uri: &str,
    headers: &mut HeaderMap,
    body: Option<&[u8]>,
    now: u64,
    ttl_secs: u64,
) -> Result<(), SignatureError> {
    if ttl_secs > MAX_LIFETIME_SECS {
        return Err(SignatureError::TooLong);
    }
    let body = match body {
        Some(b) => Some(b),
        None if is_body_method(method) => Some(&[][..]),
        None => None,
    };
    let mut components = vec![Component::Method, Component::TargetUri];
    if let Some(body) = body {
        let digest = STANDARD.encode(Sha256::digest(body));
        let value = HeaderValue::from_str(&format!("sha-256=:{digest}:"))
            .map_err(|e| SignatureError::Malformed(e.to_string()))?;
        headers.insert(CONTENT_DIGEST, value);
        components.push(Component::Field(CONTENT_DIGEST.as_str().to_owned()));
    }
    let mut nonce = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let nonce = URL_SAFE_NO_PAD.encode(nonce);
    let expires = now
        .checked_add(ttl_secs)
        .ok_or_else(|| SignatureError::Malformed("time out of range".into()))?;
    let params = Params {
        created: Some(now),
        expires: Some(expires),
        nonce: Some(nonce),
        keyid: Some(key.identity().to_string()),
        alg: Some(ALGORITHM.to_owned()),
    };
    let serialized = serialize_inner_list(&params.to_inner_list(&components)?);
    let base = signature_base(method, target_uri, headers, &components, &serialized)?;
    let signature = STANDARD.encode(key.sign(base.as_bytes()));
    let input = HeaderValue::from_str(&format!("{LABEL}={serialized}"))
        .map_err(|e| SignatureError::Malformed(e.to_string()))?;
    let sig = HeaderValue::from_str(&format!("{LABEL}=:{signature}:"))
        .map_err(|e| SignatureError::Malformed(e.to_string()))?;
    headers.insert(SIGNATURE_INPUT, input);
    headers.insert(SIGNATURE, sig);
    Ok(())
}

/// Signs an outgoing `http::Request` whose URI is absolute (`http://host/path`), as
/// [`sign_request`] does; an empty body counts as no body except for PUT, PATCH and POST.
pub fn sign_http_request<B: AsRef<[u8]>>(
    key: &Keypair,
    request: &mut http::Request<B>,
    now: u64,
    ttl_secs: u64,
) -> Result<(), SignatureError> {
    let uri = request.uri();
    if uri.scheme().is_none() || uri.authority().is_none() {
        return Err(SignatureError::Malformed(format!(
            "a request to sign needs an absolute URI, not {uri}"
        )));
    }
    let target = uri.to_string();
    let method = request.method().clone();
    let body = request.body().as_ref().to_vec();
    let body = (!body.is_empty()).then_some(&body[..]);
    sign_request(key, &method, &target, request.headers_mut(), body, now, ttl_secs)
}

/// Whether a request to be verified may carry a body, and so must have its body covered by
/// the signature (through `content-digest`): PUT, PATCH and POST always; any other method
/// when it has a `Content-Digest`, a `Transfer-Encoding`, or a `Content-Length` other than 0.
pub fn carries_body(method: &Method, headers: &HeaderMap) -> bool {
    is_body_method(method)
        || headers.contains_key(CONTENT_DIGEST)
        || headers.contains_key(TRANSFER_ENCODING)
        || headers
            .get_all(CONTENT_LENGTH)
            .iter()
            .any(|v| v.as_bytes().trim_ascii() != b"0")
}

fn is_body_method(method: &Method) -> bool {
    *method == Method::PUT || *method == Method::PATCH || *method == Method::POST
}

/// Verifies a request's signature (see the module documentation for every check).
///
/// `target_uri` is the request's full URI as the client sent it (see [`target_uri`]), `now`
/// the server's clock in unix seconds, and `max_skew_secs` how far ahead of it a client's
/// clock may be. `expires` gets no such allowance: a signature is never used past the
/// expiry its signer chose.
///
/// Returns [`SignatureError::Missing`] for an unsigned request, so the caller can treat it
/// as anonymous; any other error means a signature was present and is refused.
pub fn verify_request(
    method: &Method,
    target_uri: &str,
    headers: &HeaderMap,
    now: u64,
    max_skew_secs: u64,
) -> Result<Verified, SignatureError> {
    let received = Received::parse(headers)?;
    let params = &received.params;

    if let Some(alg) = &params.alg
        && alg != ALGORITHM
    {
        return Err(SignatureError::UnknownAlgorithm(alg.clone()));
    }
    let created = params
        .created
        .ok_or(SignatureError::MissingParameter("created"))?;
    let expires = params
        .expires
        .ok_or(SignatureError::MissingParameter("expires"))?;
    let nonce = params
        .nonce
        .clone()
        .ok_or(SignatureError::MissingParameter("nonce"))?;
    let keyid = params
        .keyid
        .as_deref()
        .ok_or(SignatureError::MissingParameter("keyid"))?;
    let identity: Identity = keyid
        .parse()
        .map_err(|_| SignatureError::BadKeyId(keyid.chars().take(80).collect()))?;

    if nonce.is_empty() || nonce.len() > MAX_NONCE_LEN {
        return Err(SignatureError::Malformed(format!(
            "a nonce is 1 to {MAX_NONCE_LEN} characters"
        )));
    }
    let lifetime = expires
        .checked_sub(created)
        .ok_or_else(|| SignatureError::Malformed("expires is before created".into()))?;
    if lifetime > MAX_LIFETIME_SECS {
        return Err(SignatureError::TooLong);
    }
    if created > now.saturating_add(max_skew_secs) {
        return Err(SignatureError::FromTheFuture);
    }
    if expires < now {
        return Err(SignatureError::Expired);
    }

    let covers = |c: &Component| received.components.contains(c);
    if !covers(&Component::Method) {
        return Err(SignatureError::MissingComponent("@method"));
    }
    if !covers(&Component::TargetUri) {
        return Err(SignatureError::MissingComponent("@target-uri"));
    }
    let covers_digest = covers(&Component::Field(CONTENT_DIGEST.as_str().to_owned()));
    if !covers_digest && carries_body(method, headers) {
        return Err(SignatureError::MissingComponent("content-digest"));
    }

    let base = signature_base(
        method,
        target_uri,
        headers,
        &received.components,
        &received.serialized_params,
    )?;
    identity
        .verify(base.as_bytes(), &received.signature)
        .map_err(|_| SignatureError::BadSignature)?;

    Ok(Verified {
        identity,
        nonce,
        expires,
        covers_digest,
    })
}

/// Checks `body` against the request's `Content-Digest` (RFC 9530). sha-256 and sha-512 are
/// understood, other algorithms ignored; every understood digest present must match, and at
/// least one must be present.
pub fn check_content_digest(headers: &HeaderMap, body: &[u8]) -> Result<(), SignatureError> {
    let dict = parse_dictionary(headers, &CONTENT_DIGEST)?.ok_or(SignatureError::DigestMissing)?;
    let mut checked = false;
    for (name, entry) in &dict {
        let computed: Vec<u8> = match name.as_str() {
            "sha-256" => Sha256::digest(body).to_vec(),
            "sha-512" => Sha512::digest(body).to_vec(),
            _ => continue,
        };
        let given = match entry {
            ListEntry::Item(Item {
                bare_item: BareItem::ByteSequence(bytes),
                ..
            }) => bytes,
            _ => {
                return Err(SignatureError::Malformed(format!(
                    "Content-Digest {} is not a byte sequence",
                    name.as_str()
                )));
            }
        };
        if *given != computed {
            return Err(SignatureError::DigestMismatch);
        }
        checked = true;
    }
    if checked {
        Ok(())
    } else {
        Err(SignatureError::UnsupportedDigest)
    }
}

/// The request's `@target-uri` as the server sees it: `<scheme>://<authority><path?query>`.
///
/// The authority is the URI's own (HTTP/2's `:authority`, or an absolute-form request
/// line), else the `Host` field; a request with neither gets an empty authority, which no
/// honest signature covers. `scheme` is the one the client used: behind a proxy that
/// terminates TLS the caller passes `https` as its configuration says. Nothing is
/// normalised: clients sign the URI they send (browsers and Node send a lower-case host and
/// omit a default port).
pub fn target_uri(scheme: &str, headers: &HeaderMap, uri: &Uri) -> String {
    let host = headers.get(HOST).and_then(|h| h.to_str().ok());
    let authority = uri.authority().map(|a| a.as_str()).or(host).unwrap_or("");
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    format!("{scheme}://{authority}{path}")
}

/// Remembers the (identity, nonce) pairs of live signatures, so that each signature is
/// accepted once.
///
/// A pair is kept until its signature's `expires` has passed (afterwards the signature is
/// refused as expired anyway), then evicted. The cache holds at most `capacity` pairs: when
/// it is full of unexpired ones it refuses new signatures with
/// [`SignatureError::NonceCacheFull`] rather than grow or forget a live nonce, since
/// forgetting would let that request be replayed. Since signatures live at most
/// [`MAX_LIFETIME_SECS`], the cache needs room for the signed requests of about that long;
/// rate limits (which the caller applies first) keep one identity from filling it alone.
pub struct NonceCache {
    /// Most pairs held at once.
    capacity: usize,
    inner: Mutex<NonceState>,
}

#[derive(Default)]
struct NonceState {
    /// Live pairs and their expiry.
    seen: HashMap<(Identity, String), u64>,
    /// The same pairs, soonest expiry first, so eviction never scans the map.
    by_expiry: BinaryHeap<Reverse<(u64, Identity, String)>>,
}

impl NonceCache {
    /// An empty cache holding at most `capacity` live pairs.
    pub fn new(capacity: usize) -> Self {
        NonceCache {
            capacity,
            inner: Mutex::new(NonceState::default()),
        }
    }

    /// The most pairs this cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Pairs held now (some may have expired but not been evicted yet).
    pub fn len(&self) -> usize {
        self.lock().seen.len()
    }

    /// Whether no pair is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Accepts `nonce` from `identity` once: remembers it until `expires` and refuses it
    /// ([`SignatureError::Replayed`]) if it is already remembered. Evicts pairs that have
    /// expired by `now` first.
    pub fn check_and_insert(
        &self,
        identity: &Identity,
        nonce: &str,
        expires: u64,
        now: u64,
    ) -> Result<(), SignatureError> {
        if nonce.len() > MAX_NONCE_LEN {
            return Err(SignatureError::Malformed(format!(
                "a nonce is at most {MAX_NONCE_LEN} characters"
            )));
        }
        if expires < now {
            return Err(SignatureError::Expired);
        }
        let mut state = self.lock();
        let NonceState { seen, by_expiry } = &mut *state;
        while let Some(Reverse((when, ..))) = by_expiry.peek()
            && *when < now
        {
            if let Some(Reverse((_, id, n))) = by_expiry.pop() {
                seen.remove(&(id, n));
            }
        }
        let key = (*identity, nonce.to_owned());
        if seen.contains_key(&key) {
            return Err(SignatureError::Replayed);
        }
        if seen.len() >= self.capacity {
            return Err(SignatureError::NonceCacheFull);
        }
        by_expiry.push(Reverse((expires, key.0, key.1.clone())));
        seen.insert(key, expires);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NonceState> {
        // The state is consistent after every statement that could panic, so a poisoned
        // lock is still usable.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for NonceCache {
    fn default() -> Self {
        NonceCache::new(DEFAULT_NONCE_CAPACITY)
    }
}

/// A covered component this module can compute.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Component {
    Method,
    TargetUri,
    Authority,
    Scheme,
    RequestTarget,
    Path,
    Query,
    /// A header field, by its lower-case name.
    Field(String),
}

impl Component {
    /// The component from its identifier in `Signature-Input` (an sf-string, no parameters).
    fn from_name(name: &str) -> Result<Self, SignatureError> {
        Ok(match name {
            "@method" => Component::Method,
            "@target-uri" => Component::TargetUri,
            "@authority" => Component::Authority,
            "@scheme" => Component::Scheme,
            "@request-target" => Component::RequestTarget,
            "@path" => Component::Path,
            "@query" => Component::Query,
            "@signature-params" => {
                return Err(SignatureError::Malformed(
                    "@signature-params cannot be a covered component".into(),
                ));
            }
            n if n.starts_with('@') => {
                return Err(SignatureError::UnsupportedComponent(n.to_owned()));
            }
            n => {
                if n.bytes().any(|b| b.is_ascii_uppercase()) || HeaderName::from_bytes(n.as_bytes()).is_err()
                {
                    return Err(SignatureError::Malformed(format!(
                        "{n:?} is not a lower-case field name"
                    )));
                }
                Component::Field(n.to_owned())
            }
        })
    }

    fn name(&self) -> &str {
        match self {
            Component::Method => "@method",
            Component::TargetUri => "@target-uri",
            Component::Authority => "@authority",
            Component::Scheme => "@scheme",
            Component::RequestTarget => "@request-target",
            Component::Path => "@path",
            Component::Query => "@query",
            Component::Field(name) => name,
        }
    }

    /// The component's value in this request (RFC 9421 §2.1 and §2.2).
    fn value(
        &self,
        method: &Method,
        target_uri: &str,
        headers: &HeaderMap,
    ) -> Result<String, SignatureError> {
        let parsed = || {
            target_uri
                .parse::<Uri>()
                .map_err(|e| SignatureError::Malformed(format!("target URI: {e}")))
        };
        Ok(match self {
            Component::Method => method.as_str().to_owned(),
            Component::TargetUri => {
                if !target_uri.bytes().all(|b| (0x21..0x7f).contains(&b)) {
                    return Err(SignatureError::Malformed(
                        "the target URI has characters a URI cannot".into(),
                    ));
                }
                target_uri.to_owned()
            }
            Component::Authority => parsed()?
                .authority()
                .map(|a| a.as_str().to_ascii_lowercase())
                .ok_or_else(|| SignatureError::Malformed("target URI has no authority".into()))?,
            Component::Scheme => parsed()?
                .scheme_str()
                .map(str::to_ascii_lowercase)
                .ok_or_else(|| SignatureError::Malformed("target URI has no scheme".into()))?,
            Component::RequestTarget => parsed()?
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "/".to_owned()),
            Component::Path => {
                let uri = parsed()?;
                match uri.path() {
                    "" => "/".to_owned(),
                    p => p.to_owned(),
                }
            }
            Component::Query => format!("?{}", parsed()?.query().unwrap_or("")),
            Component::Field(name) => {
                let mut values = headers.get_all(name.as_str()).iter().peekable();
                if values.peek().is_none() {
                    return Err(SignatureError::AbsentField(name.clone()));
                }
                let mut joined = Vec::new();
                for v in values {
                    let v = v.to_str().map_err(|_| {
                        SignatureError::Malformed(format!("field {name} is not visible ASCII"))
                    })?;
                    joined.push(v.trim_matches([' ', '\t']));
                }
                joined.join(", ")
            }
        })
    }
}

/// The signature base (RFC 9421 §2.5): one line per covered component, then the
/// `@signature-params` line, with no newline after it.
fn signature_base(
    method: &Method,
    target_uri: &str,
    headers: &HeaderMap,
    components: &[Component],
    serialized_params: &str,
) -> Result<String, SignatureError> {
    let mut base = String::new();
    for component in components {
        let value = component.value(method, target_uri, headers)?;
        base.push('"');
        base.push_str(component.name());
        base.push_str("\": ");
        base.push_str(&value);
        base.push('\n');
    }
    base.push_str("\"@signature-params\": ");
    base.push_str(serialized_params);
    Ok(base)
}

/// The signature parameters this module reads; others are kept in the serialization (and
/// so signed) but ignored.
#[derive(Debug, Default)]
struct Params {
    created: Option<u64>,
    expires: Option<u64>,
    nonce: Option<String>,
    keyid: Option<String>,
    alg: Option<String>,
}

impl Params {
    fn from_sfv(params: &Parameters) -> Result<Self, SignatureError> {
        let mut out = Params::default();
        let wrong = |name: &str, what: &str| {
            SignatureError::Malformed(format!("signature parameter {name} must be {what}"))
        };
        for (name, value) in params {
            let name = name.as_str();
            match name {
                "created" | "expires" => {
                    let t = value
                        .as_integer()
                        .and_then(|i| u64::try_from(i).ok())
                        .ok_or_else(|| wrong(name, "a non-negative integer"))?;
                    if name == "created" {
                        out.created = Some(t);
                    } else {
                        out.expires = Some(t);
                    }
                }
                "nonce" | "keyid" | "alg" => {
                    let s = value
                        .as_string()
                        .map(|s| s.as_str().to_owned())
                        .ok_or_else(|| wrong(name, "a string"))?;
                    match name {
                        "nonce" => out.nonce = Some(s),
                        "keyid" => out.keyid = Some(s),
                        _ => out.alg = Some(s),
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// The `Signature-Input` member for these parameters covering `components`.
    fn to_inner_list(&self, components: &[Component]) -> Result<InnerList, SignatureError> {
        let sf_string = |s: &str| {
            sfv::String::from_string(s.to_owned())
                .map(BareItem::String)
                .map_err(|(e, _)| SignatureError::Malformed(e.to_string()))
        };
        let sf_int = |t: u64| {
            sfv::Integer::try_from(t)
                .map(BareItem::Integer)
                .map_err(|_| SignatureError::Malformed("time out of range".into()))
        };
        let key = |k: &str| {
            Key::from_string(k.to_owned()).map_err(|(e, _)| SignatureError::Malformed(e.to_string()))
        };
        let items = components
            .iter()
            .map(|c| sf_string(c.name()).map(Item::new))
            .collect::<Result<Vec<_>, _>>()?;
        let mut params = Parameters::new();
        if let Some(t) = self.created {
            params.insert(key("created")?, sf_int(t)?);
        }
        if let Some(t) = self.expires {
            params.insert(key("expires")?, sf_int(t)?);
        }
        for (name, value) in [("nonce", &self.nonce), ("keyid", &self.keyid), ("alg", &self.alg)] {
            if let Some(v) = value {
                params.insert(key(name)?, sf_string(v)?);
            }
        }
        Ok(InnerList::with_params(items, params))
    }
}

/// The canonical serialization (RFC 8941 §4.1.1) of one `Signature-Input` member: the
/// `@signature-params` value. A conforming signer sends exactly this text, and the signer
/// signed exactly this text, so a verifier serializes what it parsed rather than slicing
/// the field.
fn serialize_inner_list(list: &InnerList) -> String {
    let mut ser = ListSerializer::new();
    ser.members(std::iter::once(&ListEntry::InnerList(list.clone())));
    ser.finish().unwrap_or_default()
}

/// One signature as received: its covered components, parameters and bytes.
#[derive(Debug)]
struct Received {
    components: Vec<Component>,
    params: Params,
    /// The `@signature-params` value.
    serialized_params: String,
    signature: Vec<u8>,
}

impl Received {
    /// Reads the signature labelled [`LABEL`], or the first one if none has that label.
    fn parse(headers: &HeaderMap) -> Result<Self, SignatureError> {
        let inputs = parse_dictionary(headers, &SIGNATURE_INPUT)?;
        let signatures = parse_dictionary(headers, &SIGNATURE)?;
        let (inputs, signatures) = match (inputs, signatures) {
            (None, None) => return Err(SignatureError::Missing),
            (Some(i), Some(s)) => (i, s),
            (Some(_), None) => {
                return Err(SignatureError::Malformed(
                    "Signature-Input without Signature".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(SignatureError::Malformed(
                    "Signature without Signature-Input".into(),
                ));
            }
        };
        let (label, input) = match inputs.get_key_value(LABEL) {
            Some(found) => found,
            None => inputs
                .first()
                .ok_or_else(|| SignatureError::Malformed("Signature-Input has no signature".into()))?,
        };
        let input = match input {
            ListEntry::InnerList(list) => list,
            ListEntry::Item(_) => {
                return Err(SignatureError::Malformed(format!(
                    "Signature-Input {} is not an inner list",
                    label.as_str()
                )));
            }
        };
        let signature = match signatures.get(label.as_str()) {
            Some(ListEntry::Item(Item {
                bare_item: BareItem::ByteSequence(bytes),
                ..
            })) => bytes.clone(),
            Some(_) => {
                return Err(SignatureError::Malformed(format!(
                    "Signature {} is not a byte sequence",
                    label.as_str()
                )));
            }
            None => {
                return Err(SignatureError::Malformed(format!(
                    "no Signature labelled {}",
                    label.as_str()
                )));
            }
        };

        let mut components = Vec::with_capacity(input.items.len());
        for item in &input.items {
            let name = item
                .bare_item
                .as_string()
                .ok_or_else(|| SignatureError::Malformed("a component identifier is a string".into()))?;
            if !item.params.is_empty() {
                return Err(SignatureError::UnsupportedComponent(format!(
                    "{:?} with parameters",
                    name.as_str()
                )));
            }
            let component = Component::from_name(name.as_str())?;
            if components.contains(&component) {
                return Err(SignatureError::Malformed(format!(
                    "component {:?} is covered twice",
                    name.as_str()
                )));
            }
            components.push(component);
        }
        Ok(Received {
            components,
            params: Params::from_sfv(&input.params)?,
            serialized_params: serialize_inner_list(input),
            signature,
        })
    }
}

/// The field `name` parsed as a Dictionary, its lines combined as RFC 9110 §5.3 says;
/// `None` when absent.
fn parse_dictionary(headers: &HeaderMap, name: &HeaderName) -> Result<Option<Dictionary>, SignatureError> {
    let mut lines = headers.get_all(name).iter().peekable();
    if lines.peek().is_none() {
        return Ok(None);
    }
    let mut joined = Vec::new();
    for (i, line) in lines.enumerate() {
        if i > 0 {
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(line.as_bytes());
    }
    Parser::new(&joined)
        .parse::<Dictionary>()
        .map(Some)
        .map_err(|e| SignatureError::Malformed(format!("{name}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 9421 Appendix B.1.4, "test-key-ed25519": the public key as SPKI DER and the
    // private key as PKCS#8 DER, both base64 (the PEM bodies).
    const RFC_PUBLIC_SPKI: &str = "MCowBQYDK2VwAyEAJrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs=";
    const RFC_PRIVATE_PKCS8: &str = "MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF";
    // The DER before the raw 32 key bytes in each.
    const SPKI_PREFIX: [u8; 12] = [
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    const PKCS8_PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
    ];

    fn rfc_public() -> Identity {
        let der = STANDARD.decode(RFC_PUBLIC_SPKI).expect("RFC key is base64");
        assert_eq!(der[..12], SPKI_PREFIX);
        Identity::from_bytes(&der[12..]).expect("RFC key is an ed25519 key")
    }

    fn rfc_keypair() -> Keypair {
        let der = STANDARD.decode(RFC_PRIVATE_PKCS8).expect("RFC key is base64");
        assert_eq!(der[..16], PKCS8_PREFIX);
        let seed: [u8; 32] = der[16..].try_into().expect("32-byte seed");
        Keypair::from_secret_bytes(&seed)
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("test header name"),
                HeaderValue::from_str(value).expect("test header value"),
            );
        }
        map
    }

    /// RFC 9421 Appendix B.2.6, "Signing a Request Using ed25519": the test request, its
    /// signature base, and the signature the RFC gives.
    #[test]
    fn rfc9421_b26_ed25519_vector() {
        let request = headers(&[
            ("host", "example.com"),
            ("date", "Tue, 20 Apr 2021 02:07:55 GMT"),
            ("content-type", "application/json"),
            (
                "content-digest",
                "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:",
            ),
            ("content-length", "18"),
            (
                "signature-input",
                "sig-b26=(\"date\" \"@method\" \"@path\" \"@authority\" \"content-type\" \"content-length\");created=1618884473;keyid=\"test-key-ed25519\"",
            ),
            (
                "signature",
                "sig-b26=:wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1u02Gb04v9EDgwUPiu4A0w6vuQv5lIp5WPpBKRCw==:",
            ),
        ]);
        let body = br#"{"hello": "world"}"#;
        let target = "https://example.com/foo?param=Value&Pet=dog";
        let expected_base = concat!(
            "\"date\": Tue, 20 Apr 2021 02:07:55 GMT\n",
            "\"@method\": POST\n",
            "\"@path\": /foo\n",
            "\"@authority\": example.com\n",
            "\"content-type\": application/json\n",
            "\"content-length\": 18\n",
            "\"@signature-params\": (\"date\" \"@method\" \"@path\" \"@authority\" ",
            "\"content-type\" \"content-length\");created=1618884473",
            ";keyid=\"test-key-ed25519\"",
        );

        let received = Received::parse(&request).expect("RFC fields parse");
        assert_eq!(received.params.created, Some(1618884473));
        assert_eq!(received.params.keyid.as_deref(), Some("test-key-ed25519"));
        let base = signature_base(
            &Method::POST,
            target,
            &request,
            &received.components,
            &received.serialized_params,
        )
        .expect("base");
        assert_eq!(base, expected_base);
        rfc_public()
            .verify(base.as_bytes(), &received.signature)
            .expect("the RFC's signature verifies over the rebuilt base");

        // ed25519 is deterministic: the RFC's private key signs the base to the same bytes.
        let keypair = rfc_keypair();
        assert_eq!(keypair.identity(), rfc_public());
        assert_eq!(keypair.sign(base.as_bytes())[..], received.signature[..]);

        // The RFC's own digest of its body checks, and a changed body does not.
        check_content_digest(&request, body).expect("RFC digest matches");
        assert_eq!(
            check_content_digest(&request, br#"{"hello": "World"}"#),
            Err(SignatureError::DigestMismatch)
        );

        // A changed method breaks the signature.
        let base = signature_base(
            &Method::PUT,
            target,
            &request,
            &received.components,
            &received.serialized_params,
        )
        .expect("base");
        assert!(rfc_public().verify(base.as_bytes(), &received.signature).is_err());

        // This server's policy refuses the vector: its keyid names no identity and it lacks
        // `expires` and `nonce`.
        assert_eq!(
            verify_request(&Method::POST, target, &request, 1618884473, 60),
            Err(SignatureError::MissingParameter("expires"))
        );
    }

    const NOW: u64 = 1_700_000_000;
    const SKEW: u64 = 60;
    const URI: &str = "http://localhost:8080/~abc/notes?x=1";

    fn signed(key: &Keypair, method: Method, body: Option<&[u8]>) -> HeaderMap {
        let mut map = headers(&[("host", "localhost:8080")]);
        sign_request(key, &method, URI, &mut map, body, NOW, 60).expect("signs");
        map
    }

    #[test]
    fn round_trip_with_body() {
        let key = Keypair::generate();
        let map = signed(&key, Method::PUT, Some(b"hello"));
        let input = map[SIGNATURE_INPUT].to_str().expect("ascii");
        assert!(
            input.starts_with(r#"sig1=("@method" "@target-uri" "content-digest");created=1700000000;expires=1700000060;nonce=""#),
            "{input}"
        );
        assert!(input.ends_with(&format!(r#";keyid="{}";alg="ed25519""#, key.identity())));
        let v = verify_request(&Method::PUT, URI, &map, NOW + 5, SKEW).expect("verifies");
        assert_eq!(v.identity, key.identity());
        assert_eq!(v.expires, NOW + 60);
        assert!(v.covers_digest);
        assert_eq!(v.nonce.len(), 22);
        check_content_digest(&map, b"hello").expect("digest");
        assert_eq!(
            check_content_digest(&map, b"hellO"),
            Err(SignatureError::DigestMismatch)
        );
    }

    #[test]
    fn round_trip_without_body() {
        let key = Keypair::generate();
        let map = signed(&key, Method::GET, None);
        assert!(!map.contains_key(CONTENT_DIGEST));
        let v = verify_request(&Method::GET, URI, &map, NOW, SKEW).expect("verifies");
        assert!(!v.covers_digest);
        // PUT without a body still covers the (empty) body.
        let map = signed(&key, Method::PUT, None);
        let v = verify_request(&Method::PUT, URI, &map, NOW, SKEW).expect("verifies");
        assert!(v.covers_digest);
        check_content_digest(&map, b"").expect("empty body digest");
        assert_eq!(
            check_content_digest(&map, b"x"),
            Err(SignatureError::DigestMismatch)
        );
    }

    #[test]
    fn nonces_differ_between_signatures() {
        let key = Keypair::generate();
        let a = verify_request(&Method::GET, URI, &signed(&key, Method::GET, None), NOW, 0);
        let b = verify_request(&Method::GET, URI, &signed(&key, Method::GET, None), NOW, 0);
        assert_ne!(a.expect("a").nonce, b.expect("b").nonce);
    }

    #[test]
    fn http_request_convenience() {
        let key = Keypair::generate();
        let mut request = http::Request::put(URI)
            .header("host", "localhost:8080")
            .body(b"body".to_vec())
            .expect("request");
        sign_http_request(&key, &mut request, NOW, 30).expect("signs");
        let server_side = target_uri(
            "http",
            request.headers(),
            &"/~abc/notes?x=1".parse().expect("uri"),
        );
        assert_eq!(server_side, URI);
        let v = verify_request(&Method::PUT, &server_side, request.headers(), NOW, SKEW).expect("verifies");
        assert!(v.covers_digest);
        check_content_digest(request.headers(), request.body()).expect("digest");

        let mut relative = http::Request::get("/x").body(Vec::new()).expect("request");
        assert!(matches!(
            sign_http_request(&key, &mut relative, NOW, 30),
            Err(SignatureError::Malformed(_))
        ));
    }

    #[test]
    fn target_uri_from_host_or_authority() {
        let map = headers(&[("host", "example.org:81")]);
        let uri: Uri = "/a/b?c=d".parse().expect("uri");
        assert_eq!(target_uri("http", &map, &uri), "http://example.org:81/a/b?c=d");
        // HTTP/2: the URI carries the authority.
        let uri: Uri = "https://h2.example/p".parse().expect("uri");
        assert_eq!(
            target_uri("https", &HeaderMap::new(), &uri),
            "https://h2.example/p"
        );
        let uri: Uri = "/p".parse().expect("uri");
        assert_eq!(target_uri("http", &HeaderMap::new(), &uri), "http:///p");
    }

    #[test]
    fn tampered_method_uri_or_body_is_refused() {
        let key = Keypair::generate();
        let map = signed(&key, Method::PUT, Some(b"hello"));
        assert_eq!(
            verify_request(&Method::POST, URI, &map, NOW, SKEW),
            Err(SignatureError::BadSignature)
        );
        assert_eq!(
            verify_request(
                &Method::PUT,
                "http://localhost:8080/~abc/notes?x=2",
                &map,
                NOW,
                SKEW
            ),
            Err(SignatureError::BadSignature)
        );
        // A body swapped together with its digest: the digest is signed.
        let mut swapped = map.clone();
        let other = format!("sha-256=:{}:", STANDARD.encode(Sha256::digest(b"evil")));
        swapped.insert(CONTENT_DIGEST, HeaderValue::from_str(&other).expect("value"));
        assert_eq!(
            verify_request(&Method::PUT, URI, &swapped, NOW, SKEW),
            Err(SignatureError::BadSignature)
        );
        check_content_digest(&swapped, b"evil").expect("the forged digest matches its body");
        // The body swapped alone: the signature holds, the digest check catches it.
        verify_request(&Method::PUT, URI, &map, NOW, SKEW).expect("headers untouched");
        assert_eq!(
            check_content_digest(&map, b"evil"),
            Err(SignatureError::DigestMismatch)
        );
    }

    #[test]
    fn times_are_checked() {
        let key = Keypair::generate();
        let map = signed(&key, Method::GET, None);
        // Exactly at expiry still holds; one second later it does not.
        verify_request(&Method::GET, URI, &map, NOW + 60, SKEW).expect("at expiry");
        assert_eq!(
            verify_request(&Method::GET, URI, &map, NOW + 61, SKEW),
            Err(SignatureError::Expired)
        );
        // The client's clock may run ahead by the skew, no more.
        verify_request(&Method::GET, URI, &map, NOW - SKEW, SKEW).expect("within skew");
        assert_eq!(
            verify_request(&Method::GET, URI, &map, NOW - SKEW - 1, SKEW),
            Err(SignatureError::FromTheFuture)
        );
        let mut map = headers(&[]);
        assert_eq!(
            sign_request(&key, &Method::GET, URI, &mut map, None, NOW, 301),
            Err(SignatureError::TooLong)
        );
    }

    /// Signs a hand-written `Signature-Input` member (without the label) for GET `URI`.
    fn sign_raw(key: &Keypair, components: &[Component], params: &str) -> HeaderMap {
        let mut map = headers(&[("host", "localhost:8080")]);
        let input = format!("{LABEL}={params}");
        map.insert(SIGNATURE_INPUT, HeaderValue::from_str(&input).expect("value"));
        let base = signature_base(&Method::GET, URI, &map, components, params).expect("base");
        let sig = format!("{LABEL}=:{}:", STANDARD.encode(key.sign(base.as_bytes())));
        map.insert(SIGNATURE, HeaderValue::from_str(&sig).expect("value"));
        map
    }

    fn params(key: &Keypair, comps: &str, created: u64, expires: u64, extra: &str) -> String {
        format!(
            r#"({comps});created={created};expires={expires};nonce="n1";keyid="{}"{extra}"#,
            key.identity()
        )
    }

    #[test]
    fn hand_made_signatures_are_judged_by_policy() {
        let key = Keypair::generate();
        let both = [Component::Method, Component::TargetUri];
        let ok = params(&key, r#""@method" "@target-uri""#, NOW, NOW + 60, "");
        verify_request(&Method::GET, URI, &sign_raw(&key, &both, &ok), NOW, SKEW).expect("well made");

        let lifetime = params(&key, r#""@method" "@target-uri""#, NOW, NOW + 301, "");
        assert_eq!(
            verify_request(&Method::GET, URI, &sign_raw(&key, &both, &lifetime), NOW, SKEW),
            Err(SignatureError::TooLong)
        );
        let backwards = params(&key, r#""@method" "@target-uri""#, NOW, NOW - 1, "");
        assert!(matches!(
            verify_request(&Method::GET, URI, &sign_raw(&key, &both, &backwards), NOW, SKEW),
            Err(SignatureError::Malformed(_))
        ));
        let rsa = params(
            &key,
            r#""@method" "@target-uri""#,
            NOW,
            NOW + 60,
            r#";alg="rsa-pss-sha512""#,
        );
        assert_eq!(
            verify_request(&Method::GET, URI, &sign_raw(&key, &both, &rsa), NOW, SKEW),
            Err(SignatureError::UnknownAlgorithm("rsa-pss-sha512".into()))
        );

        let no_uri = params(&key, r#""@method""#, NOW, NOW + 60, "");
        assert_eq!(
            verify_request(&Method::GET, URI, &sign_raw(&key, &both[..1], &no_uri), NOW, SKEW),
            Err(SignatureError::MissingComponent("@target-uri"))
        );
        let no_method = params(&key, r#""@target-uri""#, NOW, NOW + 60, "");
        assert_eq!(
            verify_request(
                &Method::GET,
                URI,
                &sign_raw(&key, &both[1..], &no_method),
                NOW,
                SKEW
            ),
            Err(SignatureError::MissingComponent("@method"))
        );
        // PUT, PATCH and POST must cover a digest, even without any body header (the
        // check comes before the signature's).
        for method in [Method::PUT, Method::PATCH, Method::POST] {
            assert_eq!(
                verify_request(&method, URI, &sign_raw(&key, &both, &ok), NOW, SKEW),
                Err(SignatureError::MissingComponent("content-digest"))
            );
        }
        // So must any request with a Content-Digest or a chunked body.
        let mut with_digest = sign_raw(&key, &both, &ok);
        with_digest.insert(CONTENT_DIGEST, HeaderValue::from_static("sha-256=:AAAA:"));
        assert_eq!(
            verify_request(&Method::GET, URI, &with_digest, NOW, SKEW),
            Err(SignatureError::MissingComponent("content-digest"))
        );
        let mut chunked = sign_raw(&key, &both, &ok);
        chunked.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        assert_eq!(
            verify_request(&Method::DELETE, URI, &chunked, NOW, SKEW),
            Err(SignatureError::MissingComponent("content-digest"))
        );
        // A GET that announces a body must cover its digest.
        let mut with_length = sign_raw(&key, &both, &ok);
        with_length.insert(CONTENT_LENGTH, HeaderValue::from_static("5"));
        assert_eq!(
            verify_request(&Method::GET, URI, &with_length, NOW, SKEW),
            Err(SignatureError::MissingComponent("content-digest"))
        );

        let no_nonce = format!(
            r#"("@method" "@target-uri");created={NOW};expires={};keyid="{}""#,
            NOW + 60,
            key.identity()
        );
        assert_eq!(
            verify_request(&Method::GET, URI, &sign_raw(&key, &both, &no_nonce), NOW, SKEW),
            Err(SignatureError::MissingParameter("nonce"))
        );
        let no_keyid = format!(
            r#"("@method" "@target-uri");created={NOW};expires={};nonce="n""#,
            NOW + 60
        );
        assert_eq!(
            verify_request(&Method::GET, URI, &sign_raw(&key, &both, &no_keyid), NOW, SKEW),
            Err(SignatureError::MissingParameter("keyid"))
        );
        let no_created = format!(
            r#"("@method" "@target-uri");expires={};nonce="n";keyid="{}""#,
            NOW + 60,
            key.identity()
        );
        assert_eq!(
            verify_request(&Method::GET, URI, &sign_raw(&key, &both, &no_created), NOW, SKEW),
            Err(SignatureError::MissingParameter("created"))
        );
        // Extra components (a derived one, a header) are fine when present.
        let more = [
            Component::Method,
            Component::TargetUri,
            Component::Authority,
            Component::Field("host".into()),
        ];
        let more_params = params(
            &key,
            r#""@method" "@target-uri" "@authority" "host""#,
            NOW,
            NOW + 60,
            "",
        );
        verify_request(&Method::GET, URI, &sign_raw(&key, &more, &more_params), NOW, SKEW)
            .expect("extra components");
        // A covered field the request lacks. (Signed over a base without the `date` line,
        // which the verifier never reaches: it needs the field first.)
        let absent_params = params(&key, r#""@method" "@target-uri" "date""#, NOW, NOW + 60, "");
        let mut map = sign_raw(&key, &both, &absent_params);
        assert_eq!(
            verify_request(&Method::GET, URI, &map, NOW, SKEW),
            Err(SignatureError::AbsentField("date".into()))
        );
        // With the field present, the base has a `date` line the signer did not sign.
        map.insert("date", HeaderValue::from_static("today"));
        assert_eq!(
            verify_request(&Method::GET, URI, &map, NOW, SKEW),
            Err(SignatureError::BadSignature)
        );
    }

    #[test]
    fn unsupported_or_odd_components_are_refused() {
        let key = Keypair::generate();
        let id = key.identity();
        type Expected = fn(&SignatureError) -> bool;
        let cases: [(&str, Expected); 5] = [
            (r#""@method" "@target-uri" "@status""#, |e| {
                matches!(e, SignatureError::UnsupportedComponent(_))
            }),
            (r#""@method" "@target-uri" "host";sf"#, |e| {
                matches!(e, SignatureError::UnsupportedComponent(_))
            }),
            (r#""@method" "@target-uri" "@method""#, |e| {
                matches!(e, SignatureError::Malformed(_))
            }),
            (r#""@method" "@target-uri" "Host""#, |e| {
                matches!(e, SignatureError::Malformed(_))
            }),
            (r#""@method" "@target-uri" "@signature-params""#, |e| {
                matches!(e, SignatureError::Malformed(_))
            }),
        ];
        for (comps, expected) in cases {
            let mut map = headers(&[("host", "localhost:8080")]);
            let input = format!(
                r#"sig1=({comps});created={NOW};expires={};nonce="n";keyid="{id}""#,
                NOW + 60
            );
            map.insert(SIGNATURE_INPUT, HeaderValue::from_str(&input).expect("value"));
            map.insert(SIGNATURE, HeaderValue::from_static("sig1=:AAAA:"));
            let err = verify_request(&Method::GET, URI, &map, NOW, SKEW).expect_err(comps);
            assert!(expected(&err), "{comps}: {err:?}");
        }
    }

    #[test]
    fn wrong_keyid_is_refused() {
        let key = Keypair::generate();
        let other = Keypair::generate();
        let map = signed(&key, Method::PUT, Some(b"x"));
        let input = map[SIGNATURE_INPUT].to_str().expect("ascii");
        let forged = input.replace(&key.identity().to_string(), &other.identity().to_string());
        let mut forged_map = map.clone();
        forged_map.insert(SIGNATURE_INPUT, HeaderValue::from_str(&forged).expect("value"));
        assert_eq!(
            verify_request(&Method::PUT, URI, &forged_map, NOW, SKEW),
            Err(SignatureError::BadSignature)
        );
        let not_an_identity = input.replace(&key.identity().to_string(), "alice");
        forged_map.insert(
            SIGNATURE_INPUT,
            HeaderValue::from_str(&not_an_identity).expect("value"),
        );
        assert_eq!(
            verify_request(&Method::PUT, URI, &forged_map, NOW, SKEW),
            Err(SignatureError::BadKeyId("alice".into()))
        );
    }

    #[test]
    fn label_choice_and_missing_fields() {
        let key = Keypair::generate();
        let map = signed(&key, Method::GET, None);
        assert_eq!(
            verify_request(&Method::GET, URI, &headers(&[]), NOW, SKEW),
            Err(SignatureError::Missing)
        );
        let mut only_input = map.clone();
        only_input.remove(SIGNATURE);
        assert!(matches!(
            verify_request(&Method::GET, URI, &only_input, NOW, SKEW),
            Err(SignatureError::Malformed(_))
        ));
        // Another signature listed first: sig1 is still the one used.
        let mut two = map.clone();
        let input = map[SIGNATURE_INPUT].to_str().expect("ascii");
        let sig = map[SIGNATURE].to_str().expect("ascii");
        two.insert(
            SIGNATURE_INPUT,
            HeaderValue::from_str(&format!(r#"other=("@method");created=1, {input}"#)).expect("value"),
        );
        two.insert(
            SIGNATURE,
            HeaderValue::from_str(&format!("other=:AAAA:, {sig}")).expect("value"),
        );
        verify_request(&Method::GET, URI, &two, NOW, SKEW).expect("sig1 chosen");
        // Split over two field lines, as proxies may do.
        let mut split = map.clone();
        split.insert(
            SIGNATURE_INPUT,
            HeaderValue::from_static(r#"other=("@method");created=1"#),
        );
        split.append(SIGNATURE_INPUT, HeaderValue::from_str(input).expect("value"));
        verify_request(&Method::GET, URI, &split, NOW, SKEW).expect("combined lines");
        // A label without its signature.
        let mut renamed = map.clone();
        renamed.insert(
            SIGNATURE,
            HeaderValue::from_str(&sig.replacen("sig1", "sig2", 1)).expect("value"),
        );
        assert!(matches!(
            verify_request(&Method::GET, URI, &renamed, NOW, SKEW),
            Err(SignatureError::Malformed(_))
        ));
    }

    #[test]
    fn content_digest_forms() {
        let body = b"abc";
        let sha256 = STANDARD.encode(Sha256::digest(body));
        let sha512 = STANDARD.encode(Sha512::digest(body));
        let map = headers(&[("content-digest", format!("sha-512=:{sha512}:").as_str())]);
        check_content_digest(&map, body).expect("sha-512");
        let both = format!("md5=:AAAA:, sha-256=:{sha256}:, sha-512=:{sha512}:");
        let map = headers(&[("content-digest", both.as_str())]);
        check_content_digest(&map, body).expect("both, unknown ignored");
        let wrong = format!("sha-256=:{sha256}:, sha-512=:{sha256}:");
        let map = headers(&[("content-digest", wrong.as_str())]);
        assert_eq!(
            check_content_digest(&map, body),
            Err(SignatureError::DigestMismatch)
        );
        let map = headers(&[("content-digest", "md5=:AAAA:")]);
        assert_eq!(
            check_content_digest(&map, body),
            Err(SignatureError::UnsupportedDigest)
        );
        let map = headers(&[("content-digest", "sha-256=abc")]);
        assert!(matches!(
            check_content_digest(&map, body),
            Err(SignatureError::Malformed(_))
        ));
        let map = headers(&[("content-digest", "sha-256=:not base64 ~:")]);
        assert!(matches!(
            check_content_digest(&map, body),
            Err(SignatureError::Malformed(_))
        ));
        assert_eq!(
            check_content_digest(&HeaderMap::new(), body),
            Err(SignatureError::DigestMissing)
        );
    }

    #[test]
    fn nonce_cache_refuses_replays_and_evicts() {
        let cache = NonceCache::new(2);
        let a = Keypair::generate().identity();
        let b = Keypair::generate().identity();
        cache.check_and_insert(&a, "n1", NOW + 10, NOW).expect("first");
        assert_eq!(
            cache.check_and_insert(&a, "n1", NOW + 10, NOW + 5),
            Err(SignatureError::Replayed)
        );
        // The same nonce from another identity is another pair.
        cache
            .check_and_insert(&b, "n1", NOW + 20, NOW)
            .expect("other identity");
        assert_eq!(cache.len(), 2);
        // Full of live pairs: refused, not grown.
        assert_eq!(
            cache.check_and_insert(&a, "n2", NOW + 10, NOW + 10),
            Err(SignatureError::NonceCacheFull)
        );
        assert_eq!(cache.len(), 2);
        // Once a's pair has expired it is evicted and room is made.
        cache
            .check_and_insert(&a, "n2", NOW + 30, NOW + 11)
            .expect("room again");
        assert_eq!(cache.len(), 2);
        // Still remembered while live, even at its expiry second.
        assert_eq!(
            cache.check_and_insert(&b, "n1", NOW + 20, NOW + 20),
            Err(SignatureError::Replayed)
        );
        assert_eq!(
            cache.check_and_insert(&a, "n3", NOW, NOW + 1),
            Err(SignatureError::Expired)
        );
    }

    #[test]
    fn nonce_cache_is_shared_between_threads() {
        let cache = std::sync::Arc::new(NonceCache::new(1000));
        let id = Keypair::generate().identity();
        let accepted: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let cache = cache.clone();
                    s.spawn(move || {
                        (0..100)
                            .filter(|i| {
                                cache
                                    .check_and_insert(&id, &format!("n{i}"), NOW + 60, NOW)
                                    .is_ok()
                            })
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("thread")).sum()
        });
        assert_eq!(accepted, 100, "each nonce accepted exactly once");
    }

    #[test]
    fn codes_are_distinct() {
        let all = [
            SignatureError::Missing,
            SignatureError::Malformed(String::new()),
            SignatureError::MissingParameter("x"),
            SignatureError::BadKeyId(String::new()),
            SignatureError::UnknownAlgorithm(String::new()),
            SignatureError::MissingComponent("x"),
            SignatureError::UnsupportedComponent(String::new()),
            SignatureError::AbsentField(String::new()),
            SignatureError::Expired,
            SignatureError::FromTheFuture,
            SignatureError::TooLong,
            SignatureError::Replayed,
            SignatureError::NonceCacheFull,
            SignatureError::DigestMissing,
            SignatureError::UnsupportedDigest,
            SignatureError::DigestMismatch,
            SignatureError::BadSignature,
        ];
        let codes: std::collections::HashSet<_> = all.iter().map(|e| e.code()).collect();
        assert_eq!(codes.len(), all.len());
    }

    #[test]
    fn garbage_never_panics() {
        let key = Keypair::generate();
        let id = key.identity();
        let garbage = [
            "",
            "sig1",
            "sig1=",
            "sig1=()",
            "sig1=(\"@method\"",
            "sig1=:",
            "sig1=?1",
            "sig1=(1 2 3);created=-5",
            "sig1=(\"@method\" \"@target-uri\");created=99999999999999999999",
            "sig1=(\"@method\" \"@target-uri\");created=1.5;expires=2",
            "sig1=(\"\" \"@\");nonce=x",
            "=,=,=",
            "sig1=(\"@method\"), sig1=(\"@path\")",
            "\u{7f}",
        ];
        for input in garbage {
            for sig in ["", "sig1=:AAAA:", "sig1=(\"@method\")", "sig1=:!!:", "sig1=?0"] {
                let mut map = headers(&[("host", "h")]);
                if let Ok(v) = HeaderValue::from_str(input) {
                    map.insert(SIGNATURE_INPUT, v);
                }
                if let Ok(v) = HeaderValue::from_str(sig) {
                    map.insert(SIGNATURE, v);
                }
                map.insert(CONTENT_DIGEST, HeaderValue::from_static("sha-256=:AAAA:"));
                assert!(verify_request(&Method::PUT, URI, &map, NOW, u64::MAX).is_err());
                assert!(verify_request(&Method::PUT, "\u{0}bad", &map, u64::MAX, u64::MAX).is_err());
                assert!(check_content_digest(&map, b"x").is_err());
            }
        }
        // Huge times do not overflow.
        let huge = format!(
            r#"sig1=("@method" "@target-uri");created=999999999999999;expires=999999999999999;nonce="n";keyid="{id}""#
        );
        let mut map = headers(&[]);
        map.insert(SIGNATURE_INPUT, HeaderValue::from_str(&huge).expect("value"));
        map.insert(SIGNATURE, HeaderValue::from_static("sig1=:AAAA:"));
        assert!(verify_request(&Method::GET, URI, &map, u64::MAX, u64::MAX).is_err());
        let mut map = headers(&[]);
        assert!(sign_request(&key, &Method::GET, URI, &mut map, None, u64::MAX, 1).is_err());
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// Bytes that look like Structured Fields often enough to reach deep into parsing.
        fn sfvish() -> impl Strategy<Value = Vec<u8>> {
            let pieces = prop_oneof![
                Just(&b"sig1="[..]),
                Just(&b"("[..]),
                Just(&b")"[..]),
                Just(&b"\"@method\" "[..]),
                Just(&b"\"@target-uri\" "[..]),
                Just(&b"\"content-digest\""[..]),
                Just(&b";created=1700000000"[..]),
                Just(&b";expires=1700000060"[..]),
                Just(&b";nonce=\"n\""[..]),
                Just(&b";keyid=\""[..]),
                Just(&b"\""[..]),
                Just(&b":AAAA:"[..]),
                Just(&b", "[..]),
                Just(&b";alg=\"ed25519\""[..]),
            ];
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..300),
                proptest::collection::vec(pieces, 0..20).prop_map(|ps| ps.concat()),
            ]
        }

        fn insert_raw(map: &mut HeaderMap, name: HeaderName, bytes: &[u8]) {
            if let Ok(v) = HeaderValue::from_bytes(bytes) {
                map.append(name, v);
            }
        }

        proptest! {
            #[test]
            fn arbitrary_fields_never_panic(
                input in sfvish(),
                sig in sfvish(),
                digest in sfvish(),
                host in sfvish(),
                uri in "[ -~]{0,80}",
                now in any::<u64>(),
                skew in any::<u64>(),
            ) {
                let mut map = HeaderMap::new();
                insert_raw(&mut map, SIGNATURE_INPUT, &input);
                insert_raw(&mut map, SIGNATURE, &sig);
                insert_raw(&mut map, CONTENT_DIGEST, &digest);
                insert_raw(&mut map, HOST, &host);
                let _ = verify_request(&Method::PUT, &uri, &map, now, skew);
                let _ = check_content_digest(&map, &input);
                if let Ok(parsed) = "/p?q".parse::<Uri>() {
                    let _ = target_uri("http", &map, &parsed);
                }
            }

            #[test]
            fn a_changed_signature_input_byte_is_refused(
                pos in any::<prop::sample::Index>(),
                flip in 1u8..=255,
            ) {
                let key = Keypair::from_secret_bytes(&[7; 32]);
                let map = signed(&key, Method::PUT, Some(b"body"));
                let mut bytes = map[SIGNATURE_INPUT].as_bytes().to_vec();
                let i = pos.index(bytes.len());
                bytes[i] ^= flip;
                let mut tampered = map.clone();
                if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                    tampered.insert(SIGNATURE_INPUT, v);
                    prop_assert!(verify_request(&Method::PUT, URI, &tampered, NOW, SKEW).is_err());
                }
            }

            #[test]
            fn a_changed_signature_byte_never_panics(
                pos in any::<prop::sample::Index>(),
                flip in 1u8..=255,
            ) {
                let key = Keypair::from_secret_bytes(&[7; 32]);
                let map = signed(&key, Method::PUT, Some(b"body"));
                let mut bytes = map[SIGNATURE].as_bytes().to_vec();
                let i = pos.index(bytes.len());
                bytes[i] ^= flip;
                let mut tampered = map.clone();
                if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                    tampered.insert(SIGNATURE, v);
                    let result = verify_request(&Method::PUT, URI, &tampered, NOW, SKEW);
                    // Only a change the base64 decoder ignores (padding bits) may still pass.
                    if result.is_ok() {
                        let same = Received::parse(&tampered).map(|r| r.signature)
                            == Received::parse(&map).map(|r| r.signature);
                        prop_assert!(same);
                    }
                }
            }
        }
    }
}
