//! Who may read and write what — the one place for both the websocket and Braid-HTTP.
//!
//! * Plain keys are the instance's state: anyone may read and write them (the reference
//!   server's default, `shadows(master)`).
//! * `@name` is the account's public profile (the root of its namespace): anyone reads it,
//!   only the account writes it. Its email is shown to the account alone; the password hash
//!   is never in it (it lives in the master namespace).
//! * `@name/...` is the account's closet: only the account writes; `@name/private...` only
//!   the account reads.
//! * Master keys (`users`, `users/passwords`, `logged_in_clients`) and the master namespace
//!   are refused to everyone, with an answer.
//! * Reached directly as `/~<id>/path`, another identity's namespace is read-only, except to
//!   the account whose namespace it is; `private...` paths there are its alone.

use plait_bridge::Identity;
use serde_json::Value;

use super::keys::{KeyError, StatebusKey};
use crate::accounts::{Account, Accounts};
use crate::engine::EngineError;
use crate::model::{ResourceKey, ResourcePath};

/// Who is asking.
#[derive(Debug, Clone, Default)]
pub struct Viewer {
    pub account: Option<Account>,
}

impl Viewer {
    fn is(&self, ns: Identity) -> bool {
        self.account.as_ref().is_some_and(|a| a.identity == ns)
    }

    /// The identity writes are attributed to, if logged in.
    pub fn identity(&self) -> Option<Identity> {
        self.account.as_ref().map(|a| a.identity)
    }
}

/// What a key resolves to.
// Made once per request or message and matched at once; boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Resolved {
    /// The connection's login state.
    CurrentUser,
    Resource(Access),
}

/// A resource and what the viewer may do with it.
#[derive(Debug, Clone)]
pub struct Access {
    /// `None`: the key names nothing (an account that does not exist).
    pub key: Option<ResourceKey>,
    pub read: bool,
    pub write: bool,
    /// When the resource is an account's profile: whose.
    pub profile: Option<Account>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AccessError {
    #[error("{0}")]
    Forbidden(String),
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

fn is_private(rest: &str) -> bool {
    rest.starts_with("private")
}

/// Resolves a Statebus key for a viewer.
pub async fn resolve(
    accounts: &Accounts,
    instance: Identity,
    key: &StatebusKey,
    viewer: &Viewer,
) -> Result<Resolved, AccessError> {
    match key {
        StatebusKey::CurrentUser => Ok(Resolved::CurrentUser),
        StatebusKey::Master(k) => Err(AccessError::Forbidden(format!(
            "{k} is kept by the server and never shown to clients"
        ))),
        StatebusKey::Plain(p) => Ok(Resolved::Resource(Access {
            key: Some(ResourceKey::new(instance, path(p)?)),
            read: true,
            write: true,
            profile: None,
        })),
        StatebusKey::User(name) => {
            let account = accounts.find(name).await?;
            Ok(Resolved::Resource(match account {
                None => Access {
                    key: None,
                    read: true,
                    write: false,
                    profile: None,
                },
                Some(a) => Access {
                    key: Some(ResourceKey::new(a.identity, path("")?)),
                    read: true,
                    write: viewer.is(a.identity),
                    profile: Some(a),
                },
            }))
        }
        StatebusKey::Closet { name, rest } => {
            let account = accounts.find(name).await?;
            Ok(Resolved::Resource(match account {
                None => Access {
                    key: None,
                    read: true,
                    write: false,
                    profile: None,
                },
                Some(a) => {
                    let owner = viewer.is(a.identity);
                    Access {
                        key: Some(ResourceKey::new(a.identity, path(rest)?)),
                        read: owner || !is_private(rest),
                        write: owner,
                        profile: None,
                    }
                }
            }))
        }
    }
}

/// Access to a resource reached by its namespace directly (`/~<id>/path`).
pub fn direct(
    accounts: &Accounts,
    instance: Identity,
    key: &ResourceKey,
    viewer: &Viewer,
) -> Result<Access, AccessError> {
    if key.namespace == accounts.master() {
        return Err(AccessError::Forbidden(
            "that namespace is the server's own and is never shown to clients".into(),
        ));
    }
    let own = key.namespace == instance || viewer.is(key.namespace);
    Ok(Access {
        key: Some(key.clone()),
        read: own || !is_private(key.path.as_str()),
        write: own,
        profile: None,
    })
}

/// A profile as `viewer` may see it: the email for its owner only, never a password.
pub fn view_profile(value: Value, profile: &Account, viewer: &Viewer) -> Value {
    let Value::Object(mut m) = value else { return value };
    m.remove("pass");
    m.remove("login");
    m.remove("email");
    if viewer.is(profile.identity)
        && let Some(e) = &profile.email
    {
        m.insert("email".into(), Value::String(e.clone()));
    }
    Value::Object(m)
}
