//! `plait import statebus PATH`: loads the store of a statebus server.
//!
//! Three layouts are read: the `file_store` JSON file (`db`: `{key: state}`), the sqlite
//! store (`cache(key text, obj text)`) and the Postgres store (`store(key text, value jsonb)`,
//! given as a `postgres://` URL). States are v7 (`{key, val}`) or v6 (flat `{key, …}`);
//! nested states kept as `{_key: …}` pointers (pg_store) become links.
//!
//! * Accounts (`@name` in v7, `user/name` in v6, with hashes from `users/passwords` when
//!   the user object has none) become Plait accounts keeping their bcrypt hashes, so their
//!   passwords keep working; the rest of the user object is the public profile.
//! * `logged_in_clients` become sessions, so logged-in browsers stay logged in.
//! * `@name/...` keys go to the account's namespace; everything else to the instance's.
//! * Derived or per-connection keys (`users`, `current_user`, `connections`, …) are skipped.
//!
//! Every write goes through the engine, so importing twice is safe: unchanged values are
//! not new versions, accounts are updated in place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::Value;

use super::keys::StatebusKey;
use crate::access::accounts::{self, Accounts};
use crate::engine::{Engine, Write};
use crate::model::{ResourceKey, ResourcePath};

/// Where a statebus store is.
#[derive(Debug, Clone)]
pub enum Source {
    FileStore(PathBuf),
    Sqlite(PathBuf),
    Postgres(String),
}

impl Source {
    /// A `postgres://` URL, a sqlite file (by its header), or a file_store JSON file.
    pub fn detect(arg: &str) -> anyhow::Result<Source> {
        if arg.starts_with("postgres://") || arg.starts_with("postgresql://") {
            return Ok(Source::Postgres(arg.to_string()));
        }
        let path = Path::new(arg);
        let mut head = [0u8; 16];
        let n = std::io::Read::read(
            &mut std::fs::File::open(path).with_context(|| format!("opening {arg}"))?,
            &mut head,
        )?;
        if n == 16 && &head == b"SQLite format 3\0" {
            Ok(Source::Sqlite(path.to_path_buf()))
        } else {
            Ok(Source::FileStore(path.to_path_buf()))
        }
    }

    /// Every `(key, state)` in the store.
    pub async fn entries(&self) -> anyhow::Result<Vec<(String, Value)>> {
        match self {
            Source::FileStore(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                let v: Value = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a statebus db (JSON)", p.display()))?;
                let Value::Object(m) = v else {
                    bail!("{} is not a statebus db: not a JSON object", p.display())
                };
                Ok(m.into_iter().collect())
            }
            Source::Sqlite(p) => {
                let conn =
                    rusqlite::Connection::open_with_flags(p, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
                let mut stmt = conn
                    .prepare("SELECT key, obj FROM cache")
                    .context("reading table cache(key, obj)")?;
                let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
                let mut out = Vec::new();
                for row in rows {
                    let (k, obj) = row?;
                    out.push((
                        k.clone(),
                        serde_json::from_str(&obj).with_context(|| format!("key {k}: obj is not JSON"))?,
                    ));
                }
                Ok(out)
            }
            Source::Postgres(url) => {
                let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .context("connecting to the statebus database")?;
                tokio::spawn(conn);
                let rows = client
                    .query("SELECT key, value::text FROM store", &[])
                    .await
                    .context("reading table store(key, value)")?;
                rows.iter()
                    .map(|r| {
                        let k: String = r.get(0);
                        let v: String = r.get(1);
                        Ok((
                            k.clone(),
                            serde_json::from_str(&v)
                                .with_context(|| format!("key {k}: value is not JSON"))?,
                        ))
                    })
                    .collect()
            }
        }
    }
}

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Values written (new or changed).
    pub written: usize,
    /// Values already there as they are.
    pub unchanged: usize,
    pub accounts_created: usize,
    pub accounts_updated: usize,
    pub sessions: usize,
    /// Keys passed over, with why.
    pub skipped: Vec<(String, String)>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} values written, {} unchanged, {} accounts created, {} updated, {} sessions, {} keys skipped",
            self.written,
            self.unchanged,
            self.accounts_created,
            self.accounts_updated,
            self.sessions,
            self.skipped.len()
        )
    }
}

/// The value of a state: v7 `val`, or a v6 flat state whole, `key` included (as a v6 save
/// over the websocket stores it). `None`: no value.
fn value_of(state: &Value) -> Option<Value> {
    let Value::Object(m) = state else {
        return Some(state.clone());
    };
    if let Some(v) = m.get("val")
        && m.keys().all(|k| k == "key" || k == "val")
    {
        return Some(v.clone());
    }
    m.keys().any(|k| k != "key").then(|| Value::Object(m.clone()))
}

/// pg_store keeps nested states as `{_key: k}`; Plait links are `{key: k}`.
fn unpointer(v: Value) -> Value {
    match v {
        Value::Object(m) if m.len() == 1 && m.get("_key").is_some_and(Value::is_string) => {
            serde_json::json!({ "key": m["_key"] })
        }
        Value::Object(m) => Value::Object(m.into_iter().map(|(k, x)| (k, unpointer(x))).collect()),
        Value::Array(a) => Value::Array(a.into_iter().map(unpointer).collect()),
        other => other,
    }
}

/// Keys that are derived, per connection, or the server's own bookkeeping.
fn skip_reason(key: &str) -> Option<&'static str> {
    match key {
        "users" => Some("the user list is derived from the accounts"),
        "current_user" | "connection" | "connections" => Some("per-connection state"),
        k if k.starts_with("connection/") => Some("per-connection state"),
        _ => None,
    }
}

/// Imports `entries` (from [`Source::entries`]).
pub async fn import(
    engine: &Engine,
    accounts: &Accounts,
    instance: crate::model::Namespace,
    entries: Vec<(String, Value)>,
    mut progress: impl FnMut(u64, u64),
) -> anyhow::Result<Report> {
    let mut report = Report::default();
    let entries: BTreeMap<String, Value> = entries
        .into_iter()
        .map(|(k, v)| (k.strip_prefix('/').map(str::to_string).unwrap_or(k), v))
        .collect();
    // Hashes by login from `users/passwords` ({login: {user, pass}}), for user objects
    // that do not carry their own.
    let mut hashes: BTreeMap<String, String> = BTreeMap::new();
    if let Some(Value::Object(m)) = entries.get("users/passwords").and_then(value_of) {
        for (login, rec) in m {
            let user = rec.get("user").and_then(Value::as_str).unwrap_or(&login);
            let name = user
                .trim_start_matches('@')
                .trim_start_matches("user/")
                .to_string();
            if let Some(h) = rec.get("pass").and_then(Value::as_str) {
                hashes.insert(accounts::handle(&name), h.to_string());
            }
        }
    }
    // Accounts first: closet keys and sessions need them.
    for (key, state) in &entries {
        let Ok(StatebusKey::User(name)) = StatebusKey::parse(key) else {
            continue;
        };
        let Some(Value::Object(mut profile)) = value_of(state) else {
            report
                .skipped
                .push((key.clone(), "a user object without fields".into()));
            continue;
        };
        let name = profile
            .get("name")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or(name);
        let hash = profile
            .remove("pass")
            .and_then(|p| p.as_str().map(str::to_string))
            .or_else(|| hashes.get(&accounts::handle(&name)).cloned());
        let Some(hash) = hash.filter(|h| h.starts_with("$2")) else {
            report
                .skipped
                .push((key.clone(), "no bcrypt password hash for this user".into()));
            continue;
        };
        let email = profile
            .remove("email")
            .and_then(|e| e.as_str().map(str::to_string));
        profile.remove("login");
        profile.insert("name".into(), Value::String(name.clone()));
        match accounts.import(&name, &hash, email.as_deref()).await {
            Ok(true) => report.accounts_created += 1,
            Ok(false) => report.accounts_updated += 1,
            Err(e) => {
                report.skipped.push((key.clone(), e.to_string()));
                continue;
            }
        }
        let account = accounts.find(&name).await?.context("the account just imported")?;
        let r = engine
            .write(
                &ResourceKey::new(account.identity, ResourcePath::new("")?),
                Write::internal_json(&Value::Object(profile)),
            )
            .await?;
        if r.changed {
            report.written += 1
        } else {
            report.unchanged += 1
        }
    }
    // Sessions: {client: {link: "@name"}} (v7) or {client: "user/name" or a user object} (v6).
    if let Some(Value::Object(m)) = entries.get("logged_in_clients").and_then(value_of) {
        for (client, who) in m {
            let user = who
                .get("link")
                .or_else(|| who.get("key"))
                .and_then(Value::as_str)
                .or_else(|| who.as_str())
                .unwrap_or("");
            let name = user
                .trim_start_matches('/')
                .trim_start_matches('@')
                .trim_start_matches("user/");
            if let Some(account) = accounts.find(name).await? {
                accounts.bind(&client, &account).await?;
                report.sessions += 1;
            }
        }
    }
    for (done, (key, state)) in entries.iter().enumerate() {
        progress(done as u64, key.len() as u64 + 64);
        if let Some(why) = skip_reason(key) {
            report.skipped.push((key.clone(), why.into()));
            continue;
        }
        let target = match StatebusKey::parse(key) {
            Ok(StatebusKey::Plain(p)) => ResourcePath::new(p)
                .map(|p| ResourceKey::new(instance, p))
                .map_err(|e| e.to_string()),
            Ok(StatebusKey::Closet { name, rest }) => match accounts.find(&name).await? {
                Some(a) => ResourcePath::new(rest)
                    .map(|p| ResourceKey::new(a.identity, p))
                    .map_err(|e| e.to_string()),
                None => Err(format!("no account {name}")),
            },
            Ok(StatebusKey::User(_)) => continue,
            Ok(StatebusKey::Master(_)) => continue,
            Ok(StatebusKey::CurrentUser) => continue,
            Err(e) => Err(e.to_string()),
        };
        let k = match target {
            Ok(k) => k,
            Err(why) => {
                report.skipped.push((key.clone(), why));
                continue;
            }
        };
        let Some(value) = value_of(state) else {
            report.skipped.push((key.clone(), "no value".into()));
            continue;
        };
        match engine.write(&k, Write::internal_json(&unpointer(value))).await {
            Ok(r) if r.changed => report.written += 1,
            Ok(_) => report.unchanged += 1,
            Err(e) => report.skipped.push((key.clone(), e.to_string())),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_of_both_dialects() {
        assert_eq!(
            value_of(&json!({"key": "k", "val": {"n": 1}})),
            Some(json!({"n": 1}))
        );
        assert_eq!(
            value_of(&json!({"key": "k", "n": 1, "s": "x"})),
            Some(json!({"key": "k", "n": 1, "s": "x"}))
        );
        assert_eq!(value_of(&json!({"key": "k"})), None);
        assert_eq!(
            unpointer(json!({"a": {"_key": "b"}, "l": [{"_key": "c"}]})),
            json!({"a": {"key": "b"}, "l": [{"key": "c"}]})
        );
    }
}
