//! Accounts and sessions (Statebus `current_user`).
//!
//! Account records and sessions are JSON resources in the instance's *master* namespace:
//! an identity derived from the instance key whose namespace no client request can address
//! (the HTTP layer refuses it, and the Statebus layer never maps a key to it). So they get
//! the storage's durability, every backend, and several processes on one Postgres see the
//! same accounts, with no tables of their own.
//!
//! * `accounts/<handle>` — `{"id", "name", "email", "pass", "created_ms"}`; the handle is
//!   the lower-cased name, so names are unique without regard to case.
//! * `sessions/<SHA-256 of the session secret>` — `{"account", "epoch", "expires_ms"}`
//!   while that session is logged in. The secret is a Statebus client id (the websocket's
//!   intro) or the `plait_session` cookie the server mints at an HTTP login; only its hash
//!   is stored, and nothing else anyone reads (versions, logs) is derived from it.
//!
//! Each account is a namespace partition of its own (DESIGN.md §2): an identity derived
//! from the instance key and the account's id. Its public profile (the `@name` object) is the
//! root resource of that namespace; its `@name/...` keys are the paths below it.
//!
//! Passwords: argon2id for new accounts; bcrypt (`$2a$`, `$2b$`, `$2y$`) hashes, as the
//! statebus reference server wrote them, verify, so imported accounts keep working.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use plait_bridge::{Identity, Keypair};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, Semaphore};

use crate::address::AddressKey;
use crate::engine::{Engine, EngineError, Write, Writer};
use crate::model::{ResourceKey, ResourcePath};

/// What the reference server says when a login fails (apps show these strings).
pub const LOGIN_FAILED: &str = "Cannot log in with that information";
pub const NAME_TAKEN: &str =
    "Cannot create that account because there is already a user with that login or name";
pub const BAD_FIELDS: &str = "Cannot create that account because invalid name, login, pass, or email";
pub const NO_NAME: &str = "Cannot create that account because no login or name";

/// Longest account name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// An account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Stable id (the namespace identity is derived from it).
    pub id: String,
    /// The name as created (case kept); `@name` in Statebus.
    pub name: String,
    pub email: Option<String>,
    /// The account's namespace.
    pub identity: Identity,
}

impl Account {
    /// The lower-cased name that identifies the account.
    pub fn handle(&self) -> String {
        handle(&self.name)
    }
}

/// The lower-cased form of a name.
pub fn handle(name: &str) -> String {
    name.to_lowercase()
}

/// A stored account record.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    id: String,
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    email: Option<String>,
    pass: String,
    #[serde(default)]
    created_ms: i64,
    /// Raised to end every session of the account.
    #[serde(default)]
    epoch: u64,
}

/// Why an account operation was refused. The messages are the reference server's, and
/// say the same whether the name exists or the password is wrong.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AccountError {
    #[error("{0}")]
    Refused(&'static str),
    /// Too many logins or account creations: a client address or an account was limited.
    #[error("too many attempts ({limit}); try again in {} s", retry_after.as_secs().max(1))]
    TooMany {
        limit: &'static str,
        retry_after: Duration,
    },
    /// Every password-hashing slot stayed taken for `access.password_hash_queue_ms`.
    #[error("the server is busy hashing passwords; try again")]
    Busy,
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Rate limits on logins and account creation, and the slots password hashing runs in.
struct Guards {
    by_address: DefaultKeyedRateLimiter<AddressKey>,
    failures_by_account: DefaultKeyedRateLimiter<String>,
    /// Accounts whose failures ran out, until when.
    locked: std::sync::Mutex<HashMap<String, Instant>>,
    creations_by_address: DefaultKeyedRateLimiter<AddressKey>,
    hashing: Semaphore,
    hash_queue: Duration,
    session_lifetime: Duration,
}

fn quota(n: u32, per: Duration) -> Quota {
    let n = NonZeroU32::new(n.max(1)).expect("at least one");
    Quota::with_period(per / n.get())
        .expect("a non-zero period")
        .allow_burst(n)
}

fn retry_after(e: &governor::NotUntil<governor::clock::QuantaInstant>) -> Duration {
    e.wait_time_from(governor::clock::DefaultClock::default().now())
}

/// Accounts and sessions of one instance. Cheap to clone.
#[derive(Clone)]
pub struct Accounts {
    engine: Engine,
    instance: Arc<Keypair>,
    master: Identity,
    /// Account creation is check-then-write; one at a time in this process.
    creating: Arc<Mutex<()>>,
    guards: Arc<Guards>,
}

fn key(ns: Identity, path: &str) -> ResourceKey {
    ResourceKey::new(ns, ResourcePath::new(path).expect("account paths are valid"))
}

/// Whether a path segment is safe to use as an account handle in a path.
fn path_safe(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.contains('/')
        && s != "."
        && s != ".."
        && !s.chars().any(char::is_control)
}

/// Where a session is stored: named by the SHA-256 of its secret, so nothing stored or
/// shown holds a secret a session can be taken over with.
fn session_path(secret: &str) -> Option<String> {
    (!secret.is_empty() && secret.len() <= 256).then(|| {
        format!(
            "sessions/{}",
            data_encoding::HEXLOWER.encode(&Sha256::digest(secret.as_bytes()))
        )
    })
}

/// A stored session.
#[derive(Debug, Serialize, Deserialize)]
struct Session {
    account: String,
    /// The account's session epoch when it began: a password change or "log out
    /// everywhere" raises the account's, ending every older session.
    #[serde(default)]
    epoch: u64,
    /// Unix ms after which the session is over (0: from before sessions expired).
    #[serde(default)]
    expires_ms: i64,
}

/// A password hash to verify against when the name is unknown, so that an unknown name
/// and a wrong password take the same time.
static DUMMY_HASH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| hash_password("not a password"));

impl Accounts {
    pub fn new(engine: Engine, instance: Arc<Keypair>, settings: &super::AccessSettings) -> Accounts {
        let master = master_identity(&instance);
        let hour = Duration::from_secs(3600);
        let slots = match settings.password_hash_concurrency {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        Accounts {
            engine,
            instance,
            master,
            creating: Arc::new(Mutex::new(())),
            guards: Arc::new(Guards {
                by_address: RateLimiter::keyed(quota(
                    settings.logins_per_minute_per_address,
                    Duration::from_secs(60),
                )),
                failures_by_account: RateLimiter::keyed(quota(
                    settings.login_failures_per_hour_per_account,
                    hour,
                )),
                locked: Default::default(),
                creations_by_address: RateLimiter::keyed(quota(
                    settings.account_creations_per_hour_per_address,
                    hour,
                )),
                hashing: Semaphore::new(slots),
                hash_queue: Duration::from_millis(settings.password_hash_queue_ms),
                session_lifetime: Duration::from_secs(settings.session_lifetime_secs.max(60)),
            }),
        }
    }

    /// The instance's identity (the owner).
    pub fn instance(&self) -> Identity {
        self.instance.identity()
    }

    /// The namespace no client may address.
    pub fn master(&self) -> Identity {
        self.master
    }

    /// How long a session lasts after its last use.
    pub fn session_lifetime(&self) -> Duration {
        self.guards.session_lifetime
    }

    /// The namespace of the account with this id.
    pub fn identity_for(&self, id: &str) -> Identity {
        self.instance.derive(&format!("plait/account/{id}")).identity()
    }

    async fn read_json(&self, k: &ResourceKey) -> Result<Option<Value>, EngineError> {
        let state = self.engine.read(k).await?;
        if !state.exists() {
            return Ok(None);
        }
        Ok(serde_json::from_slice(&state.body).ok())
    }

    async fn record(&self, name: &str) -> Result<Option<Record>, EngineError> {
        let h = handle(name);
        if !path_safe(&h) {
            return Ok(None);
        }
        Ok(self
            .read_json(&key(self.master, &format!("accounts/{h}")))
            .await?
            .and_then(|v| serde_json::from_value(v).ok()))
    }

    async fn store_record(&self, r: &Record) -> Result<(), EngineError> {
        self.engine
            .write(
                &key(self.master, &format!("accounts/{}", handle(&r.name))),
                Write::internal_json(&serde_json::to_value(r).expect("record")),
            )
            .await?;
        Ok(())
    }

    fn account(&self, r: &Record) -> Account {
        Account {
            id: r.id.clone(),
            name: r.name.clone(),
            email: r.email.clone(),
            identity: self.identity_for(&r.id),
        }
    }

    /// The account with this name (any case).
    pub async fn find(&self, name: &str) -> Result<Option<Account>, EngineError> {
        Ok(self.record(name).await?.map(|r| self.account(&r)))
    }

    /// Runs password hashing in one of the slots, off the async workers and at lower CPU
    /// priority ([`crate::cpu::heavy`]).
    async fn hashing<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AccountError> {
        let _slot = tokio::time::timeout(self.guards.hash_queue, self.guards.hashing.acquire())
            .await
            .map_err(|_| AccountError::Busy)?
            .map_err(|_| AccountError::Busy)?;
        tokio::task::spawn_blocking(move || crate::cpu::heavy(crate::cpu::Heavy::Password, f))
            .await
            .map_err(|_| AccountError::Busy)
    }

    /// Creates an account with an argon2id password hash and an empty public profile.
    /// `from`: the client's address, limited to `access.account_creations_per_hour_per_address`.
    pub async fn create(
        &self,
        name: &str,
        pass: &str,
        email: Option<&str>,
        from: Option<IpAddr>,
    ) -> Result<Account, AccountError> {
        if let Some(ip) = from
            && let Err(e) = self.guards.creations_by_address.check_key(&AddressKey::of(ip))
        {
            return Err(AccountError::TooMany {
                limit: "access.account_creations_per_hour_per_address",
                retry_after: retry_after(&e),
            });
        }
        if name.is_empty() {
            return Err(AccountError::Refused(NO_NAME));
        }
        if name.len() > MAX_NAME_BYTES || !path_safe(name) || name.starts_with('@') || pass.is_empty() {
            return Err(AccountError::Refused(BAD_FIELDS));
        }
        let pass = pass.to_string();
        let hash = self.hashing(move || hash_password(&pass)).await?;
        self.store_new(name, &hash, email).await
    }

    async fn store_new(&self, name: &str, hash: &str, email: Option<&str>) -> Result<Account, AccountError> {
        let _one_at_a_time = self.creating.lock().await;
        if self.record(name).await?.is_some() {
            return Err(AccountError::Refused(NAME_TAKEN));
        }
        let record = Record {
            id: format!("{:032x}", rand::random::<u128>()),
            name: name.to_string(),
            email: email.map(str::to_string),
            pass: hash.to_string(),
            created_ms: now_ms(),
            epoch: 0,
        };
        self.store_record(&record).await?;
        let account = self.account(&record);
        self.engine
            .write(
                &key(account.identity, ""),
                Write::internal_json(&serde_json::json!({ "name": name })),
            )
            .await?;
        Ok(account)
    }

    /// Adds an account with an existing password hash (bcrypt from a statebus store), or
    /// updates the hash and email of the account of that name. Returns whether it was new.
    pub async fn import(&self, name: &str, hash: &str, email: Option<&str>) -> Result<bool, AccountError> {
        if name.is_empty() || name.len() > MAX_NAME_BYTES || !path_safe(name) {
            return Err(AccountError::Refused(BAD_FIELDS));
        }
        match self.record(name).await? {
            None => self.store_new(name, hash, email).await.map(|_| true),
            Some(mut r) => {
                r.pass = hash.to_string();
                if email.is_some() {
                    r.email = email.map(str::to_string);
                }
                self.store_record(&r).await?;
                Ok(false)
            }
        }
    }

    /// Checks a name and password, within the login limits: `from` is limited to
    /// `access.logins_per_minute_per_address` attempts, and an account to
    /// `access.login_failures_per_hour_per_account` failures. An unknown name and a wrong
    /// password get the same answer after the same work.
    pub async fn login(&self, name: &str, pass: &str, from: Option<IpAddr>) -> Result<Account, AccountError> {
        if let Some(ip) = from
            && let Err(e) = self.guards.by_address.check_key(&AddressKey::of(ip))
        {
            return Err(AccountError::TooMany {
                limit: "access.logins_per_minute_per_address",
                retry_after: retry_after(&e),
            });
        }
        let h = handle(name);
        let locked_until = self
            .guards
            .locked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&h)
            .copied();
        if let Some(until) = locked_until.filter(|u| *u > Instant::now()) {
            return Err(AccountError::TooMany {
                limit: "access.login_failures_per_hour_per_account",
                retry_after: until - Instant::now(),
            });
        }
        let record = self.record(name).await?;
        let hash = record
            .as_ref()
            .map_or_else(|| DUMMY_HASH.clone(), |r| r.pass.clone());
        let pass = pass.to_string();
        let ok = self.hashing(move || verify_password(&pass, &hash)).await?;
        match record {
            Some(r) if ok => Ok(self.account(&r)),
            _ => {
                if let Err(e) = self.guards.failures_by_account.check_key(&h) {
                    let mut locked = self.guards.locked.lock().unwrap_or_else(|e| e.into_inner());
                    locked.retain(|_, u| *u > Instant::now());
                    locked.insert(h, Instant::now() + retry_after(&e));
                }
                Err(AccountError::Refused(LOGIN_FAILED))
            }
        }
    }

    /// Sets a new password (argon2id) or email for an account. A new password ends every
    /// session of the account.
    pub async fn update(
        &self,
        name: &str,
        pass: Option<&str>,
        email: Option<&str>,
    ) -> Result<(), AccountError> {
        let Some(mut r) = self.record(name).await? else {
            return Err(AccountError::Refused(LOGIN_FAILED));
        };
        if let Some(p) = pass {
            if p.is_empty() {
                return Err(AccountError::Refused(BAD_FIELDS));
            }
            let p = p.to_string();
            r.pass = self.hashing(move || hash_password(&p)).await?;
            r.epoch += 1;
        }
        if let Some(e) = email {
            r.email = Some(e.to_string());
        }
        self.store_record(&r).await?;
        Ok(())
    }

    /// Ends every session of an account ("log out everywhere").
    pub async fn end_sessions(&self, account: &Account) -> Result<(), EngineError> {
        if let Some(mut r) = self.record(&account.name).await? {
            r.epoch += 1;
            self.store_record(&r).await?;
        }
        Ok(())
    }

    /// The resource holding a session (subscribe to it to follow logins and logouts).
    pub fn session_key(&self, secret: &str) -> Option<ResourceKey> {
        session_path(secret).map(|p| key(self.master, &p))
    }

    /// The account a session secret is logged in as. A session used more than a day after
    /// it was last extended is extended again (sliding lifetime).
    pub async fn session(&self, secret: &str) -> Result<Option<Account>, EngineError> {
        let Some(k) = self.session_key(secret) else {
            return Ok(None);
        };
        let value = self.read_json(&k).await?;
        let Some((account, session)) = self.live_session(value.as_ref()).await? else {
            return Ok(None);
        };
        let lifetime = self.guards.session_lifetime.as_millis() as i64;
        if session.expires_ms - now_ms() < lifetime - 24 * 3600 * 1000 {
            self.write_session(&k, &account, session.epoch).await?;
        }
        Ok(Some(account))
    }

    /// The account a stored session value names, if the session is still live.
    pub async fn account_of_session(&self, value: Option<&Value>) -> Result<Option<Account>, EngineError> {
        Ok(self.live_session(value).await?.map(|(a, _)| a))
    }

    async fn live_session(&self, value: Option<&Value>) -> Result<Option<(Account, Session)>, EngineError> {
        let Some(s) = value.and_then(|v| serde_json::from_value::<Session>(v.clone()).ok()) else {
            return Ok(None);
        };
        if s.expires_ms <= now_ms() {
            return Ok(None);
        }
        match self.record(&s.account).await? {
            Some(r) if r.epoch == s.epoch => Ok(Some((self.account(&r), s))),
            _ => Ok(None),
        }
    }

    async fn write_session(&self, k: &ResourceKey, account: &Account, epoch: u64) -> Result<(), EngineError> {
        let expires_ms = now_ms() + self.guards.session_lifetime.as_millis() as i64;
        self.engine
            .write(
                k,
                Write::internal_json(&serde_json::json!({
                    "account": account.handle(),
                    "epoch": epoch,
                    "expires_ms": expires_ms,
                })),
            )
            .await?;
        Ok(())
    }

    /// Logs a session in (it survives restarts, for `access.session_lifetime_secs` after
    /// its last use).
    pub async fn bind(&self, secret: &str, account: &Account) -> Result<(), EngineError> {
        let Some(k) = self.session_key(secret) else {
            return Ok(());
        };
        let epoch = self.record(&account.name).await?.map_or(0, |r| r.epoch);
        self.write_session(&k, account, epoch).await
    }

    /// Logs a session out.
    pub async fn unbind(&self, secret: &str) -> Result<(), EngineError> {
        if let Some(k) = self.session_key(secret) {
            self.engine.delete(&k, &Writer::Internal).await?;
        }
        Ok(())
    }
}

/// A new session secret (for the session cookie).
pub fn new_session_secret() -> String {
    data_encoding::BASE64URL_NOPAD.encode(&rand::random::<[u8; 32]>())
}

/// The identity of the master namespace.
pub fn master_identity(instance: &Keypair) -> Identity {
    instance.derive("plait/master").identity()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An argon2id hash (PHC string).
pub fn hash_password(pass: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(pass.as_bytes(), &salt)
        .expect("argon2 hashes")
        .to_string()
}

/// Checks a password against an argon2 PHC string or a bcrypt hash.
pub fn verify_password(pass: &str, hash: &str) -> bool {
    if hash.starts_with("$2") {
        return bcrypt::verify(pass, hash).unwrap_or(false);
    }
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(hash).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(pass.as_bytes(), &h)
            .is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2_and_bcrypt_hashes_verify() {
        let h = hash_password("pw");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("pw", &h));
        assert!(!verify_password("PW", &h));
        // bcrypt-nodejs writes `$2a$`.
        let b = bcrypt::hash_with_result("secret", 4)
            .unwrap()
            .format_for_version(bcrypt::Version::TwoA);
        assert!(b.starts_with("$2a$"));
        assert!(verify_password("secret", &b));
        assert!(!verify_password("nope", &b));
        assert!(!verify_password("pw", "garbage"));
    }
}
