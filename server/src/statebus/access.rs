//! Which resource a Statebus key names — for both the websocket and Braid-HTTP, which
//! address the same keys. Who may read or write it is the access layer's to say
//! ([`crate::access::Access::check`]); this module only maps keys:
//!
//! * Plain keys are paths in the instance's namespace; `.well-known/plait/access` is the
//!   rules document.
//! * `@name` is the account's public profile (the root of its namespace). Its email is
//!   shown to the account alone; the password hash is never in it (it lives in the master
//!   namespace).
//! * `@name/...` is the account's closet: paths in its namespace (the account writes;
//!   `@name/private...` only it reads).
//! * Master keys (`users`, `users/passwords`, `logged_in_clients`) are refused to
//!   everyone, with an answer.

use serde_json::Value;

use super::keys::{KeyError, StatebusKey};
use crate::access::{Access, Account, Caller, Refusal};
use crate::engine::EngineError;
use crate::model::{ResourceKey, ResourcePath};

/// What a key resolves to.
// Made once per request or message and matched at once; boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Resolved {
    /// The connection's login state.
    CurrentUser,
    Resource(Target),
}

/// The resource a key names.
#[derive(Debug, Clone)]
pub struct Target {
    /// `None`: the key names nothing (an account that does not exist).
    pub key: Option<ResourceKey>,
    /// When the resource is an account's profile: whose.
    pub profile: Option<Account>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AccessError {
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Path(#[from] crate::model::PathError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

fn path(p: &str) -> Result<ResourcePath, AccessError> {
    Ok(ResourcePath::new(p)?)
}

/// Resolves a Statebus key.
pub async fn resolve(access: &Access, key: &StatebusKey) -> Result<Resolved, AccessError> {
    let accounts = access.accounts();
    let target = |key, profile| Ok(Resolved::Resource(Target { key, profile }));
    match key {
        StatebusKey::CurrentUser => Ok(Resolved::CurrentUser),
        StatebusKey::Master(k) => Err(AccessError::Forbidden(format!(
            "{k} is kept by the server and never shown to clients"
        ))),
        StatebusKey::Plain(p) if p == crate::access::RULES_URL_PATH => {
            target(Some(access.rules_key().clone()), None)
        }
        StatebusKey::Plain(p) => target(Some(ResourceKey::new(access.owner(), path(p)?)), None),
        StatebusKey::User(name) => match accounts.find(name).await? {
            None => target(None, None),
            Some(a) => target(Some(ResourceKey::new(a.identity, path("")?)), Some(a)),
        },
        StatebusKey::Closet { name, rest } => match accounts.find(name).await? {
            None => target(None, None),
            Some(a) => target(Some(ResourceKey::new(a.identity, path(rest)?)), None),
        },
    }
}

/// A profile as `caller` may see it: the email for its owner only, never a password.
pub fn view_profile(value: Value, profile: &Account, caller: &Caller) -> Value {
    let Value::Object(mut m) = value else { return value };
    m.remove("pass");
    m.remove("login");
    m.remove("email");
    if caller.account().is_some_and(|a| a.identity == profile.identity)
        && let Some(e) = &profile.email
    {
        m.insert("email".into(), Value::String(e.clone()));
    }
    Value::Object(m)
}
