//! The live Statebus connections, as the statebus 6 server shows them to its clients:
//! `connections` (every open connection, under `all`), `connection` (the asking
//! connection's own record) and `connection/<id>` (one record).
//!
//! A record is `{key: "connection/<id>", id, client, user?}`. `id` is the connection's own
//! random id, made when it opened; `client` repeats it, as statebus 6.1 does (its
//! `client` field is deprecated there): the client id a connection sends in its intro is
//! its login secret here, so it is never shown. `user` is `{key: "user/<name>", name}` for
//! a connection logged in as an account — and only where the access layer lets the asker
//! read that account's profile (the root of its namespace); the asker's own account also
//! shows its email, as its profile would.
//!
//! Who may read the list, or another connection's record, is the access layer's to say:
//! the same read right as the instance's key `connections` (`/connections` over HTTP),
//! so the rules that open or close the instance's state to strangers open or close this
//! too. Its own record is always shown to a connection.
//!
//! The [`Registry`] holds the live sessions only: a session registers when it opens and
//! its [`Registered`] guard takes it out when it closes, so it is bounded by the server's
//! connection limits. Each change (a connection opened, closed, logged in or out) bumps one
//! watch counter; followers re-render on it, and a slow follower skips to the latest
//! list. Knows nothing of websockets or frames; [`super::session`] serves the states.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::access::{Access, Account, Caller, Op, Refusal};
use crate::model::{ResourceKey, ResourcePath};

/// The key whose read right decides who sees other connections.
pub const LIST_KEY: &str = "connections";

/// Every open Statebus connection of this process.
pub struct Registry {
    /// Connection id → who the connection is now (its session's viewer, shared).
    live: Mutex<BTreeMap<String, Arc<RwLock<Caller>>>>,
    /// Bumped on every change, so followers re-render.
    changed: watch::Sender<u64>,
}

/// A connection's place in the registry; dropping it takes the connection out.
pub struct Registered {
    registry: Arc<Registry>,
    id: String,
}

impl Registered {
    /// The connection's id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.live.lock().expect("registry").remove(&self.id);
        self.registry.touch();
    }
}

/// Which state a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// `connections`: everyone.
    All,
    /// `connection`: the asker's own record.
    Own,
    /// `connection/<id>`: one record.
    One(String),
}

impl View {
    /// The view a (v6) wire key names, if it names one.
    pub fn of_key(key: &str) -> Option<View> {
        let key = key.strip_prefix('/').unwrap_or(key);
        match key {
            "connections" => Some(View::All),
            "connection" => Some(View::Own),
            _ => key
                .strip_prefix("connection/")
                .filter(|id| !id.is_empty() && !id.contains('/'))
                .map(|id| View::One(id.to_string())),
        }
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            live: Mutex::new(BTreeMap::new()),
            changed: watch::Sender::new(0),
        }
    }
}

impl Registry {
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    /// Adds an opening connection, who is `viewer` (and stays so as it logs in and out:
    /// call [`Registry::touch`] when it does).
    pub fn register(self: &Arc<Self>, viewer: Arc<RwLock<Caller>>) -> Registered {
        let id = format!("{:016x}", rand::random::<u64>());
        self.live.lock().expect("registry").insert(id.clone(), viewer);
        self.touch();
        Registered {
            registry: self.clone(),
            id,
        }
    }

    /// Tells followers that a connection changed (logged in or out).
    pub fn touch(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Wakes on every change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// How many connections are open.
    pub fn len(&self) -> usize {
        self.live.lock().expect("registry").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each open connection's id and account, in id order.
    fn records(&self) -> Vec<(String, Option<Account>)> {
        let live = self.live.lock().expect("registry");
        live.iter()
            .map(|(id, v)| (id.clone(), v.read().expect("viewer").account().cloned()))
            .collect()
    }

    /// `view` as `asker` (the connection `own_id`) may see it, or why not.
    pub fn render(
        &self,
        view: &View,
        access: &Access,
        asker: &Caller,
        own_id: &str,
    ) -> Result<Value, Refusal> {
        let list_key = ResourceKey::new(access.owner(), ResourcePath::new(LIST_KEY).expect("a valid path"));
        match view {
            View::Own => {
                let account = self
                    .records()
                    .into_iter()
                    .find(|(id, _)| id == own_id)
                    .and_then(|(_, a)| a);
                let mut r = record(own_id, account.as_ref(), access, asker);
                r.remove("key");
                Ok(Value::Object(r))
            }
            View::All => {
                access.check(asker, &list_key, Op::Read)?;
                let all: Vec<Value> = self
                    .records()
                    .iter()
                    .map(|(id, a)| Value::Object(record(id, a.as_ref(), access, asker)))
                    .collect();
                Ok(json!({ "all": all }))
            }
            View::One(id) => {
                if id != own_id {
                    access.check(asker, &list_key, Op::Read)?;
                }
                Ok(match self.records().into_iter().find(|(i, _)| i == id) {
                    Some((id, a)) => {
                        let mut r = record(&id, a.as_ref(), access, asker);
                        r.remove("key");
                        Value::Object(r)
                    }
                    None => json!({ "error": format!("connection {id} does not exist") }),
                })
            }
        }
    }
}

/// One connection's record as `asker` sees it.
fn record(id: &str, account: Option<&Account>, access: &Access, asker: &Caller) -> Map<String, Value> {
    let mut r = Map::new();
    r.insert("key".into(), Value::String(format!("connection/{id}")));
    r.insert("id".into(), Value::String(id.to_string()));
    r.insert("client".into(), Value::String(id.to_string()));
    if let Some(a) = account {
        let own = asker.account().is_some_and(|me| me.identity == a.identity);
        let profile = ResourceKey::new(a.identity, ResourcePath::new("").expect("the root path"));
        if own || access.check(asker, &profile, Op::Read).is_ok() {
            let mut u = json!({ "key": format!("user/{}", a.name), "name": a.name });
            if own && let Some(e) = &a.email {
                u["email"] = Value::String(e.clone());
            }
            r.insert("user".into(), u);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_of_keys() {
        assert_eq!(View::of_key("connections"), Some(View::All));
        assert_eq!(View::of_key("/connection"), Some(View::Own));
        assert_eq!(View::of_key("connection/ab12"), Some(View::One("ab12".into())));
        assert_eq!(View::of_key("connection/"), None);
        assert_eq!(View::of_key("connection/a/b"), None);
        assert_eq!(View::of_key("connectionsx"), None);
    }

    #[test]
    fn the_registry_holds_live_connections_only() {
        let r = Registry::new();
        let mut changes = r.changes();
        changes.mark_unchanged();
        let a = r.register(Arc::new(RwLock::new(Caller::Anonymous)));
        let b = r.register(Arc::new(RwLock::new(Caller::Anonymous)));
        assert_ne!(a.id(), b.id());
        assert_eq!(r.len(), 2);
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        drop(a);
        assert_eq!(r.len(), 1);
        assert!(changes.has_changed().unwrap());
        assert_eq!(r.records()[0].0, b.id());
        drop(b);
        assert!(r.is_empty());
    }
}
