//! Access: who is asking, and what they may do — the one layer every way in calls
//! (Braid-HTTP, the Statebus websocket, federation over libp2p, the caching proxy).
//!
//! The instance identity is the owner. A caller ([`Caller`]) is anonymous, a logged-in
//! account, an ed25519 identity that proved itself (an HTTP message signature, or a libp2p
//! member connection), a bearer token the owner issued ([`tokens`]), or the owner. What a
//! caller may do to a resource is decided by [`Access::check`], in this order:
//!
//! 1. The rules document (`/.well-known/plait/access`) is the owner's alone, and the
//!    *master* namespace (accounts, sessions) nobody's.
//! 2. An account does anything in its own namespace; in other namespaces than the
//!    instance's, `private…` paths are their account's alone, and nobody else writes there
//!    (another instance's replica only grows by its home's changes) — except on a
//!    device of that identity (`plait device join`), whose owner writes there too.
//! 3. The owner does anything else; a limited token does what its prefixes allow.
//! 4. Otherwise the rules decide ([`rules`]): deny entries win; the longest matching rule
//!    listing the operation says who may. Without a rule, other namespaces are readable,
//!    and the instance's namespace is the owner's. `--public-writes` (`access.public_writes`)
//!    lets everyone write and delete in the instance's namespace where no deny entry says
//!    otherwise, as the reference servers do.
//!
//! The rules are state: a JSON resource kept in the master namespace, read, written and
//! subscribed to like any other by the owner. Every change is parsed and swapped in at
//! once, and [`Access::changes`] wakes open subscriptions, which check again and end when
//! their reader lost the right. Knows nothing of HTTP or Statebus bytes.

pub mod accounts;
pub mod owner_login;
pub mod rules;
pub mod signature;
pub mod tokens;

use std::sync::Arc;

use arc_swap::ArcSwap;
use plait_bridge::Identity;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use self::accounts::{Account, Accounts};
pub use self::rules::Op;
use self::rules::{Rules, Subject, Verdict};
use self::tokens::{Grant, Tokens};
use crate::engine::{Engine, EngineError, Write, Writer};
use crate::model::{ResourceKey, ResourcePath};
use crate::update::{UpdateBody, WriteBody};

/// The URL path of the rules document.
pub const RULES_URL_PATH: &str = ".well-known/plait/access";
/// Where a mirror serves what it keeps for each namespace (`<this>/<namespace>/…`).
pub const MIRROR_URL_PATH: &str = ".well-known/plait/mirror";

/// Settings of the access layer (`[access]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AccessSettings {
    /// Everyone may write and delete in the instance's namespace (where no deny rule says
    /// otherwise), as the Braid and Statebus reference servers let them: for apps written
    /// for those. Off by default: only the owner writes.
    pub public_writes: bool,
    /// How far a signed request's `created` may be ahead of this server's clock.
    pub signature_max_skew_secs: u64,
    /// Signed-request nonces remembered (until their signature expires) against replays.
    pub signature_nonce_cache: usize,
    /// A login session lasts this long after its last use (sliding).
    pub session_lifetime_secs: u64,
    /// Login attempts per minute from one client address (also the burst).
    pub logins_per_minute_per_address: u32,
    /// Failed logins per hour for one account (also the burst).
    pub login_failures_per_hour_per_account: u32,
    /// Accounts one client address may create per hour (also the burst).
    pub account_creations_per_hour_per_address: u32,
    /// Password hashes (argon2, bcrypt) computed at once; 0 = the number of cores.
    pub password_hash_concurrency: usize,
    /// How long a login waits for a hashing slot before it is refused as busy.
    pub password_hash_queue_ms: u64,
    /// Origins whose pages may make credentialed requests (cookies) to this server. Any
    /// origin may read without credentials.
    pub cors_credential_origins: Vec<String>,
    /// An owner session begun with a one-time link (`plait dashboard`) lasts this long
    /// (not sliding).
    pub owner_session_lifetime_secs: u64,
}

impl Default for AccessSettings {
    fn default() -> Self {
        AccessSettings {
            public_writes: false,
            signature_max_skew_secs: 60,
            signature_nonce_cache: 100_000,
            session_lifetime_secs: 30 * 24 * 3600,
            logins_per_minute_per_address: 10,
            login_failures_per_hour_per_account: 30,
            account_creations_per_hour_per_address: 10,
            password_hash_concurrency: 0,
            password_hash_queue_ms: 5_000,
            cors_credential_origins: Vec::new(),
            owner_session_lifetime_secs: 12 * 3600,
        }
    }
}

/// Who is asking.
#[derive(Debug, Clone, Default)]
pub enum Caller {
    #[default]
    Anonymous,
    /// A logged-in account (a browser session, Statebus `current_user`). Shared: every
    /// open subscription keeps its caller, and an account is about 100 bytes.
    Account(Arc<Account>),
    /// An identity that proved itself: a signed request, or a libp2p connection of a
    /// member instance (`member`).
    Identity {
        id: Identity,
        member: bool,
    },
    /// A bearer token limited to prefixes (a full owner token is [`Caller::Owner`]).
    Token(Arc<Grant>),
    Owner,
}

// Every open subscription keeps its caller: an identity and a flag, at most.
const _: () = assert!(size_of::<Caller>() <= 40);

impl From<Account> for Caller {
    fn from(a: Account) -> Caller {
        Caller::Account(Arc::new(a))
    }
}

impl Caller {
    pub fn account(&self) -> Option<&Account> {
        match self {
            Caller::Account(a) => Some(a),
            _ => None,
        }
    }

    /// The identity writes are attributed to and rate-limited by.
    pub fn author(&self, owner: Identity) -> Option<Identity> {
        match self {
            Caller::Account(a) => Some(a.identity),
            Caller::Identity { id, .. } => Some(*id),
            Caller::Owner | Caller::Token(_) => Some(owner),
            Caller::Anonymous => None,
        }
    }

    pub fn is_anonymous(&self) -> bool {
        matches!(self, Caller::Anonymous)
    }

    /// The writer a write by this caller is limited as (`ip`: where it came from).
    pub fn writer(&self, owner: Identity, ip: Option<std::net::IpAddr>) -> Writer {
        match (self.author(owner), ip) {
            (Some(id), _) => Writer::Identity(id),
            (None, Some(ip)) => Writer::Address(crate::address::AddressKey::of(ip)),
            (None, None) => Writer::Internal,
        }
    }

    /// Says who, for refusals and logs (no secrets).
    pub fn describe(&self) -> String {
        match self {
            Caller::Anonymous => "an anonymous client".into(),
            Caller::Account(a) => format!("account {}", a.name),
            Caller::Identity { id, member: true } => format!("member {id}"),
            Caller::Identity { id, .. } => format!("identity {id}"),
            Caller::Token(g) => format!("token {}", g.id),
            Caller::Owner => "the owner".into(),
        }
    }
}

impl Subject for Caller {
    fn is_owner(&self) -> bool {
        matches!(self, Caller::Owner)
    }
    fn account_handle(&self) -> Option<String> {
        Caller::account(self).map(Account::handle)
    }
    fn identity(&self) -> Option<Identity> {
        match self {
            Caller::Identity { id, .. } => Some(*id),
            _ => None,
        }
    }
    fn is_member(&self) -> bool {
        matches!(self, Caller::Identity { member: true, .. })
    }
}

/// Why an operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    pub op: Op,
    /// The resource, as a URL path.
    pub path: String,
    /// The rule that decided, as the owner wrote its path.
    pub rule: Option<String>,
    pub reason: String,
    /// No credential came: the caller may still prove who it is (401 rather than 403).
    pub anonymous: bool,
}

impl Refusal {
    /// The machine-readable form sent with a 403 (and on the Statebus websocket).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": if self.anonymous { "unauthenticated" } else { "forbidden" },
            "op": self.op.name(),
            "path": self.path,
            "rule": self.rule,
            "reason": self.reason,
        })
    }
}

/// Why a write was refused before it was made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteRefused {
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// A write to the rules that would leave a document that does not parse.
    #[error("{0}")]
    InvalidRules(String),
}

/// The access layer of one instance. Cheap to clone.
#[derive(Clone)]
pub struct Access {
    inner: Arc<Inner>,
}

struct Inner {
    owner: Identity,
    accounts: Accounts,
    tokens: Tokens,
    owner_logins: owner_login::OwnerLogins,
    settings: AccessSettings,
    rules_key: ResourceKey,
    rules: ArcSwap<Rules>,
    /// Bumped on every rule change; subscriptions wait on it.
    changed: watch::Sender<u64>,
    /// Nonces of signed requests, until their signatures expire.
    nonces: signature::NonceCache,
    /// The parts of the namespace the owner shares with readers (`plait mirror share`):
    /// each lets its reader read its prefix, as a rule listing it would.
    shares: crate::mirror::shares::Shares,
    /// On a device (`plait device join`): the owner whose namespace this instance's
    /// owner writes too.
    device_of: std::sync::OnceLock<Identity>,
}

fn is_private(path: &ResourcePath) -> bool {
    path.as_str().starts_with("private")
}

impl Access {
    /// The access layer, with the rules stored in the master namespace (the defaults
    /// until [`Access::start`] loaded them).
    pub fn new(
        accounts: Accounts,
        tokens: Tokens,
        owner_logins: owner_login::OwnerLogins,
        shares: crate::mirror::shares::Shares,
        settings: AccessSettings,
    ) -> Access {
        let rules_key = ResourceKey::new(
            accounts.master(),
            ResourcePath::new("access").expect("a valid path"),
        );
        let defaults = Rules::parse(&serde_json::to_vec(&Rules::default_document()).expect("JSON"))
            .expect("the default rules parse");
        Access {
            inner: Arc::new(Inner {
                owner: accounts.instance(),
                accounts,
                tokens,
                owner_logins,
                rules_key,
                rules: ArcSwap::from_pointee(defaults),
                changed: watch::channel(0).0,
                nonces: signature::NonceCache::new(settings.signature_nonce_cache.max(1)),
                shares,
                device_of: std::sync::OnceLock::new(),
                settings,
            }),
        }
    }

    /// Loads the rules (storing the defaults in a new data dir) and follows their changes,
    /// from this process or another on the same database.
    pub async fn start(&self, engine: &Engine) -> Result<(), EngineError> {
        let key = self.inner.rules_key.clone();
        if !engine.read(&key).await?.exists() {
            engine
                .write(&key, Write::internal_json(&Rules::default_document()))
                .await?;
        }
        self.reload(engine).await;
        let mut sub = engine.subscribe(&key, None, None).await?;
        let (this, engine) = (self.clone(), engine.clone());
        tokio::spawn(async move {
            while let Some(d) = sub.next().await {
                let missing = matches!(
                    &d,
                    crate::engine::Delivery::Shared(ev) if matches!(ev.body, UpdateBody::Missing)
                );
                if !missing {
                    this.reload(&engine).await;
                }
            }
        });
        Ok(())
    }

    /// Call after a write to `key` was acknowledged: a write to the rules takes effect
    /// before the writer hears of it (so its next write already meets them), not only when
    /// the follower task gets to it.
    pub async fn written(&self, engine: &Engine, key: &ResourceKey) {
        if *key == self.inner.rules_key {
            self.reload(engine).await;
        }
    }

    async fn reload(&self, engine: &Engine) {
        let Ok(state) = engine.read(&self.inner.rules_key).await else {
            return;
        };
        match Rules::parse(&state.body) {
            Ok(r) => {
                if **self.inner.rules.load() != r {
                    self.inner.rules.store(Arc::new(r));
                    self.inner.changed.send_modify(|n| *n += 1);
                    tracing::info!("access rules changed");
                }
            }
            // Only checked documents are stored; this is a damaged or foreign one.
            Err(e) => {
                tracing::warn!(error = %e, "the stored access rules do not parse; keeping the previous ones")
            }
        }
    }

    /// A receiver that changes whenever the rules do.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    pub fn owner(&self) -> Identity {
        self.inner.owner
    }

    pub fn accounts(&self) -> &Accounts {
        &self.inner.accounts
    }

    pub fn tokens(&self) -> &Tokens {
        &self.inner.tokens
    }

    /// The owner's one-time login links and browser sessions (the dashboard's login).
    pub fn owner_logins(&self) -> &owner_login::OwnerLogins {
        &self.inner.owner_logins
    }

    /// The caller an owner session cookie makes: the owner, or a refusal.
    pub async fn owner_session(&self, secret: &str) -> Result<Caller, owner_login::OwnerLoginError> {
        self.inner.owner_logins.check(secret).await?;
        Ok(Caller::Owner)
    }

    pub fn settings(&self) -> &AccessSettings {
        &self.inner.settings
    }

    /// The resource holding the rules.
    pub fn rules_key(&self) -> &ResourceKey {
        &self.inner.rules_key
    }

    /// The caller a bearer token makes.
    pub fn bearer(&self, token: &str) -> Result<Caller, tokens::TokenError> {
        let g = self.inner.tokens.verify(token)?;
        Ok(if g.owner {
            Caller::Owner
        } else {
            Caller::Token(Arc::new(g))
        })
    }

    /// Verifies a signed request (RFC 9421): the signature, its times against
    /// `access.signature_max_skew_secs`, and that its nonce was not seen before. The body,
    /// when the signature covers its digest, is checked by the caller once it is read
    /// ([`signature::check_content_digest`]).
    pub fn verify_signature(
        &self,
        method: &http::Method,
        target_uri: &str,
        headers: &http::HeaderMap,
    ) -> Result<signature::Verified, signature::SignatureError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let v = signature::verify_request(
            method,
            target_uri,
            headers,
            now,
            self.inner.settings.signature_max_skew_secs,
        )?;
        self.inner
            .nonces
            .check_and_insert(&v.identity, &v.nonce, v.expires, now)?;
        Ok(v)
    }

    /// Makes this instance a device of `owner`: its owner writes in `owner`'s namespace
    /// as in its own (the writes are sealed to the owner, who merges them).
    pub fn set_device_of(&self, owner: Identity) {
        let _ = self.inner.device_of.set(owner);
    }

    /// The caller an identity that proved itself makes (the owner's key is the owner).
    pub fn identity(&self, id: Identity, member: bool) -> Caller {
        if id == self.inner.owner {
            Caller::Owner
        } else {
            Caller::Identity { id, member }
        }
    }

    /// Whether `caller` may do `op` to `key`.
    pub fn check(&self, caller: &Caller, key: &ResourceKey, op: Op) -> Result<(), Refusal> {
        let i = &self.inner;
        let refuse = |rule: Option<String>, reason: String| Refusal {
            op,
            path: self.url_path(key),
            rule,
            reason,
            anonymous: caller.is_anonymous(),
        };
        if *key == i.rules_key {
            return match caller {
                Caller::Owner => Ok(()),
                _ => Err(refuse(None, "the access rules are the owner's only".into())),
            };
        }
        if key.namespace == i.accounts.master() {
            return Err(refuse(
                None,
                "that namespace is the server's own and is never shown to clients".into(),
            ));
        }
        if caller.account().is_some_and(|a| a.identity == key.namespace) {
            return Ok(());
        }
        if matches!(caller, Caller::Owner) && i.device_of.get() == Some(&key.namespace) {
            return Ok(());
        }
        let instance = key.namespace == i.owner;
        if !instance && is_private(&key.path) {
            return Err(refuse(
                None,
                "only its owner reads and writes this resource".into(),
            ));
        }
        if !instance && op != Op::Read {
            return Err(refuse(
                None,
                "only its owner writes another identity's namespace".into(),
            ));
        }
        match caller {
            Caller::Owner => return Ok(()),
            Caller::Token(g) => {
                let covers = |l: &[rules::Prefix]| l.iter().any(|p| p.covers(key, i.owner));
                if covers(&g.write) || (op == Op::Read && covers(&g.read)) {
                    return Ok(());
                }
            }
            _ => {}
        }
        let scope_note = match caller {
            Caller::Token(g) => format!(
                " (token {} may read {} and write {})",
                g.id,
                list(&g.read),
                list(&g.write)
            ),
            _ => String::new(),
        };
        let public = i.settings.public_writes && instance && op != Op::Read;
        // A share allows as a rule would (a deny still wins).
        let shared = || {
            op == Op::Read
                && instance
                && matches!(caller, Caller::Identity { id, .. } if i.shares.grants_read(id, key.path.as_str()))
        };
        match i.rules.load().judge(caller, key, op, i.owner) {
            Verdict::Allowed(_) => Ok(()),
            Verdict::NotListed(_) | Verdict::NoRule if shared() => Ok(()),
            Verdict::Denied(rule) => Err(refuse(
                Some(rule.clone()),
                format!(
                    "the access rule {rule} denies {} to {}{scope_note}",
                    op.name(),
                    caller.describe()
                ),
            )),
            Verdict::NotListed(_) | Verdict::NoRule if public => Ok(()),
            Verdict::NotListed(rule) => Err(refuse(
                Some(rule.clone()),
                format!(
                    "the access rule {rule} does not allow {} to {}{scope_note}",
                    op.name(),
                    caller.describe()
                ),
            )),
            Verdict::NoRule if !instance => Ok(()),
            Verdict::NoRule => Err(refuse(
                None,
                format!(
                    "no access rule allows {} here; only the owner may{scope_note}",
                    op.name()
                ),
            )),
        }
    }

    /// Whether `caller` may read what this server keeps as a mirror for `namespace` (its
    /// sealed segments' descriptors, ciphertexts and checkpoint, `/.well-known/plait/mirror/
    /// <namespace>/…`). The ciphertext is opaque, but descriptors tell sizes and times, so
    /// not everyone: this server's owner (the mirror's operator), the namespace's owner
    /// (a request signed by its key), and members of this server's network — who may read
    /// the same ranges over libp2p already. Not the access rules: they govern resources.
    pub fn check_mirror_read(&self, caller: &Caller, namespace: &Identity) -> Result<(), Refusal> {
        let allowed = match caller {
            Caller::Owner => true,
            Caller::Identity { id, member } => id == namespace || *member,
            _ => false,
        };
        if allowed {
            return Ok(());
        }
        Err(Refusal {
            op: Op::Read,
            path: format!("/{MIRROR_URL_PATH}/{namespace}"),
            rule: None,
            reason: format!(
                "what this mirror keeps for {namespace} is for that identity, this server's owner and \
                 members of its network (a request signed by one of their keys), not {}",
                caller.describe()
            ),
            anonymous: caller.is_anonymous(),
        })
    }

    /// [`Access::check`] for a write, which also checks that a write to the rules leaves
    /// a valid document: the whole document, parsed before it is stored.
    pub fn check_write(
        &self,
        caller: &Caller,
        key: &ResourceKey,
        body: &WriteBody,
    ) -> Result<(), WriteRefused> {
        self.check(caller, key, Op::Write)?;
        if *key == self.inner.rules_key {
            match body {
                WriteBody::Full { body, .. } => {
                    Rules::parse(body).map_err(WriteRefused::InvalidRules)?;
                }
                WriteBody::Patches(_) => {
                    return Err(WriteRefused::InvalidRules(
                        "the access rules are written whole (a PUT of the JSON document)".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Follows the rules for a reader, so that a subscription can end when its reader
    /// loses the right.
    pub fn watch(&self) -> RightWatch {
        let mut rx = self.changes();
        rx.mark_unchanged();
        RightWatch {
            access: self.clone(),
            rx,
        }
    }

    /// A resource as a URL path on this server.
    pub fn url_path(&self, key: &ResourceKey) -> String {
        if *key == self.inner.rules_key {
            format!("/{RULES_URL_PATH}")
        } else if key.namespace == self.inner.owner {
            format!("/{}", key.path.as_str())
        } else {
            format!("/~{}/{}", key.namespace, key.path.as_str())
        }
    }
}

/// A subscription's view of the rules: wakes on every rule change (see [`Access::watch`]).
/// It keeps no resource key: the subscription holds one already, and passes it to
/// [`RightWatch::check`].
pub struct RightWatch {
    access: Access,
    rx: watch::Receiver<u64>,
}

// Every open subscription holds one: two pointers and a version, no key.
const _: () = assert!(std::mem::size_of::<RightWatch>() <= 24);

impl RightWatch {
    /// Waits for the next rule change (forever when the access layer is gone).
    /// Cancel-safe: it can be one branch of a `select!`.
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Whether `caller` may still read `key`.
    pub fn check(&self, caller: &Caller, key: &ResourceKey) -> Result<(), Refusal> {
        self.access.check(caller, key, Op::Read)
    }
}

fn list(l: &[rules::Prefix]) -> String {
    if l.is_empty() {
        return "nothing".into();
    }
    l.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}
