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
//! * `sessions/<client id>` — `{"account": <handle>}` while that client is logged in.
//!
//! Each account is a namespace partition of its own (DESIGN.md §2): an identity derived
//! from the instance key and the account's id. Its public profile (the `@name` object) is the
//! root resource of that namespace; its `@name/...` keys are the paths below it.
//!
//! Passwords: argon2id for new accounts; bcrypt (`$2a$`, `$2b$`, `$2y$`) hashes, as the
//! statebus reference server wrote them, verify, so imported accounts keep working.

use std::sync::Arc;

use bytes::Bytes;
use plait_bridge::{Identity, Keypair};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Mutex;

use crate::engine::{Engine, EngineError, Write, Writer};
use crate::model::{ResourceKey, ResourcePath};
use crate::update::WriteBody;

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
}

/// Why an account operation was refused. The messages are the reference server's.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AccountError {
    #[error("{0}")]
    Refused(&'static str),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Accounts and sessions of one instance. Cheap to clone.
#[derive(Clone)]
pub struct Accounts {
    engine: Engine,
    instance: Arc<Keypair>,
    master: Identity,
    /// Account creation is check-then-write; one at a time in this process.
    creating: Arc<Mutex<()>>,
}

fn key(ns: Identity, path: &str) -> ResourceKey {
    ResourceKey::new(ns, ResourcePath::new(path).expect("account paths are valid"))
}

fn json_write(value: &Value) -> Write {
    Write {
        body: WriteBody::Full {
            media_type: Some("application/json".into()),
            body: Bytes::from(serde_json::to_vec(value).expect("JSON serializes")),
        },
        version: None,
        parents: None,
        peer: None,
        author: None,
        digest: None,
        writer: Writer::Internal,
    }
}

/// Whether a path segment is safe to use as an account handle or client id in a path.
fn path_safe(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.contains('/')
        && s != "."
        && s != ".."
        && !s.chars().any(char::is_control)
}

impl Accounts {
    pub fn new(engine: Engine, instance: Arc<Keypair>) -> Accounts {
        let master = master_identity(&instance);
        Accounts {
            engine,
            instance,
            master,
            creating: Arc::new(Mutex::new(())),
        }
    }

    /// The namespace no client may address.
    pub fn master(&self) -> Identity {
        self.master
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

    /// Creates an account with an argon2id password hash and an empty public profile.
    pub async fn create(&self, name: &str, pass: &str, email: Option<&str>) -> Result<Account, AccountError> {
        if name.is_empty() {
            return Err(AccountError::Refused(NO_NAME));
        }
        if name.len() > MAX_NAME_BYTES || !path_safe(name) || name.starts_with('@') || pass.is_empty() {
            return Err(AccountError::Refused(BAD_FIELDS));
        }
        let pass = pass.to_string();
        let hash = tokio::task::spawn_blocking(move || hash_password(&pass))
            .await
            .map_err(|_| AccountError::Refused(BAD_FIELDS))?;
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
        };
        self.engine
            .write(
                &key(self.master, &format!("accounts/{}", handle(name))),
                json_write(&serde_json::to_value(&record).expect("record")),
            )
            .await?;
        let account = self.account(&record);
        self.engine
            .write(
                &key(account.identity, ""),
                json_write(&serde_json::json!({ "name": name })),
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
                self.engine
                    .write(
                        &key(self.master, &format!("accounts/{}", handle(name))),
                        json_write(&serde_json::to_value(&r).expect("record")),
                    )
                    .await?;
                Ok(false)
            }
        }
    }

    /// Checks a name and password.
    pub async fn verify(&self, name: &str, pass: &str) -> Result<Account, AccountError> {
        let Some(r) = self.record(name).await? else {
            return Err(AccountError::Refused(LOGIN_FAILED));
        };
        let (hash, pass) = (r.pass.clone(), pass.to_string());
        let ok = tokio::task::spawn_blocking(move || verify_password(&pass, &hash))
            .await
            .unwrap_or(false);
        if ok {
            Ok(self.account(&r))
        } else {
            Err(AccountError::Refused(LOGIN_FAILED))
        }
    }

    /// Sets a new password (argon2id) or email for an account.
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
            r.pass = tokio::task::spawn_blocking(move || hash_password(&p))
                .await
                .map_err(|_| AccountError::Refused(BAD_FIELDS))?;
        }
        if let Some(e) = email {
            r.email = Some(e.to_string());
        }
        self.engine
            .write(
                &key(self.master, &format!("accounts/{}", handle(name))),
                json_write(&serde_json::to_value(&r).expect("record")),
            )
            .await?;
        Ok(())
    }

    /// The resource holding a client's session (subscribe to it to follow logins).
    pub fn session_key(&self, client: &str) -> Option<ResourceKey> {
        path_safe(client).then(|| key(self.master, &format!("sessions/{client}")))
    }

    /// The account a client is logged in as.
    pub async fn session(&self, client: &str) -> Result<Option<Account>, EngineError> {
        let Some(k) = self.session_key(client) else {
            return Ok(None);
        };
        let Some(v) = self.read_json(&k).await? else {
            return Ok(None);
        };
        match v.get("account").and_then(Value::as_str) {
            Some(h) => self.find(h).await,
            None => Ok(None),
        }
    }

    /// The account a session resource's value names.
    pub async fn account_of_session(&self, value: Option<&Value>) -> Result<Option<Account>, EngineError> {
        match value.and_then(|v| v.get("account")).and_then(Value::as_str) {
            Some(h) => self.find(h).await,
            None => Ok(None),
        }
    }

    /// Logs a client in (the session survives restarts).
    pub async fn bind(&self, client: &str, account: &Account) -> Result<(), EngineError> {
        if let Some(k) = self.session_key(client) {
            self.engine
                .write(
                    &k,
                    json_write(&serde_json::json!({ "account": account.handle() })),
                )
                .await?;
        }
        Ok(())
    }

    /// Logs a client out.
    pub async fn unbind(&self, client: &str) -> Result<(), EngineError> {
        if let Some(k) = self.session_key(client) {
            self.engine.delete(&k).await?;
        }
        Ok(())
    }
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
