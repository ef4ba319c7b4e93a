//! What a Statebus key names.
//!
//! Wire keys are the client's keys without the leading `/` of its mount. Most keys are
//! plain state in the instance's namespace; a few are special: `current_user` (the
//! connection's login), the reference server's master keys (never for clients), account
//! objects (`@name` in v7, `user/name` in v6) and account "closets" (`@name/...`).

/// Names JavaScript objects already have; the reference server throws on them, so no client
/// relies on them, and they stay refused here.
const FORBIDDEN: &[&str] = &[
    "__proto__",
    "constructor",
    "prototype",
    "hasOwnProperty",
    "isPrototypeOf",
    "propertyIsEnumerable",
    "toLocaleString",
    "toString",
    "valueOf",
    "__defineGetter__",
    "__defineSetter__",
    "__lookupGetter__",
    "__lookupSetter__",
];

/// Keys the reference server keeps for itself (user list, password hashes, sessions).
const MASTER: &[&str] = &["users", "users/passwords", "logged_in_clients"];

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatebusKey {
    /// The connection's own login state.
    CurrentUser,
    /// A master key: never readable or writable by a client.
    Master(String),
    /// An account object: `@name` (v7) or `user/name` (v6).
    User(String),
    /// A key in an account's closet: `@name/rest`.
    Closet { name: String, rest: String },
    /// State in the instance's namespace.
    Plain(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the empty key is not a key")]
    Empty,
    #[error("{0:?} is a reserved name")]
    Forbidden(String),
    #[error("key is over {MAX_KEY_BYTES} bytes")]
    TooLong,
}

impl StatebusKey {
    /// Classifies a wire key.
    pub fn parse(wire: &str) -> Result<StatebusKey, KeyError> {
        let key = wire.strip_prefix('/').unwrap_or(wire);
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(KeyError::TooLong);
        }
        if key.split('/').any(|seg| FORBIDDEN.contains(&seg)) {
            return Err(KeyError::Forbidden(key.to_string()));
        }
        if key == "current_user" {
            return Ok(StatebusKey::CurrentUser);
        }
        if MASTER
            .iter()
            .any(|m| key == *m || key.starts_with(&format!("{m}/")))
        {
            return Ok(StatebusKey::Master(key.to_string()));
        }
        if let Some(rest) = key.strip_prefix('@') {
            return Ok(match rest.split_once('/') {
                None => StatebusKey::User(rest.to_string()),
                Some((name, rest)) => StatebusKey::Closet {
                    name: name.to_string(),
                    rest: rest.to_string(),
                },
            });
        }
        if let Some(name) = key.strip_prefix("user/")
            && !name.is_empty()
            && !name.contains('/')
        {
            return Ok(StatebusKey::User(name.to_string()));
        }
        Ok(StatebusKey::Plain(key.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_classify() {
        use StatebusKey::*;
        assert_eq!(StatebusKey::parse("chat").unwrap(), Plain("chat".into()));
        assert_eq!(StatebusKey::parse("/chat/1").unwrap(), Plain("chat/1".into()));
        assert_eq!(StatebusKey::parse("current_user").unwrap(), CurrentUser);
        assert_eq!(StatebusKey::parse("@bob").unwrap(), User("bob".into()));
        assert_eq!(StatebusKey::parse("user/bob").unwrap(), User("bob".into()));
        assert_eq!(
            StatebusKey::parse("@bob/private/x").unwrap(),
            Closet {
                name: "bob".into(),
                rest: "private/x".into()
            }
        );
        assert_eq!(
            StatebusKey::parse("users/passwords").unwrap(),
            Master("users/passwords".into())
        );
        assert_eq!(
            StatebusKey::parse("logged_in_clients").unwrap(),
            Master("logged_in_clients".into())
        );
        assert_eq!(
            StatebusKey::parse("usersettings").unwrap(),
            Plain("usersettings".into())
        );
        assert_eq!(
            StatebusKey::parse("__proto__"),
            Err(KeyError::Forbidden("__proto__".into()))
        );
        assert_eq!(
            StatebusKey::parse("a/constructor"),
            Err(KeyError::Forbidden("a/constructor".into()))
        );
        assert_eq!(StatebusKey::parse(""), Err(KeyError::Empty));
        assert_eq!(StatebusKey::parse("/"), Err(KeyError::Empty));
    }
}
