//! One Statebus websocket connection.
//!
//! The connection speaks the dialect of its first message. It is bound to a client id by
//! its intro (`set current_user {client}`); a client id with a stored session is logged in.
//! Each `get` starts a task that forwards the resource's updates as whole states (echoes of
//! this connection's own writes are suppressed by the engine: the connection writes and
//! subscribes under one peer name). Frames go out through a bounded outbox: a client that
//! reads slowly makes its forwarding tasks wait, their subscriptions fall behind, and they
//! catch up with the latest state — memory stays bounded.
//!
//! Refusals (bad frames, forbidden keys, writes the viewer may not make) are answered with
//! an `{error, about}` frame; a refused read or write is also answered with the key's
//! current state, so the client's cache never waits or keeps a value the server refused.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use axum::extract::ws::{Message, WebSocket};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::access::{self, Access, AccessError, Resolved, Viewer};
use super::keys::StatebusKey;
use super::wire::{self, ClientMessage, Dialect};
use crate::accounts::{Account, AccountError};
use crate::engine::{Delivery, Write, Writer};
use crate::http::App;
use crate::model::ResourceKey;
use crate::update::{Patch, Range, UpdateBody, WriteBody};

/// Frames waiting to be sent to one connection.
const OUTBOX: usize = 1024;
/// How deep nested keyed objects are followed when a state is sent.
const MAX_LINK_DEPTH: usize = 4;

/// Serves one websocket until it closes, goes quiet or the server shuts down.
///
/// The server pings every `limits.ping_interval_secs`; a connection from which nothing
/// (not even a pong) arrives for that long plus `limits.ping_timeout_secs` is closed.
pub async fn run(socket: WebSocket, app: App, ip: IpAddr) {
    let (mut sink, mut stream) = socket.split();
    let (out, mut outbox) = mpsc::channel::<String>(OUTBOX);
    let ping_every = std::time::Duration::from_secs(app.limits.ping_interval_secs.max(1));
    let quiet_limit = ping_every + std::time::Duration::from_secs(app.limits.ping_timeout_secs.max(1));
    let mut writer = tokio::spawn(async move {
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        loop {
            let msg = tokio::select! {
                frame = outbox.recv() => match frame {
                    Some(frame) => Message::Text(frame.into()),
                    None => break,
                },
                _ = ping.tick() => Message::Ping(Bytes::new()),
            };
            if sink.send(msg).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let shutdown = app.shutdown.clone();
    let mut s = Session::new(app, ip, out);
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = tokio::time::timeout(quiet_limit, stream.next()) => match m {
                Ok(m) => m,
                Err(_) => {
                    tracing::debug!(%ip, "closing a websocket that answers no pings");
                    break;
                }
            },
        };
        match msg {
            Some(Ok(Message::Text(t))) => s.handle(t.as_str()).await,
            Some(Ok(Message::Binary(_))) => s.error("binary frames are not Statebus messages", None).await,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
        }
    }
    s.close();
    drop(s);
    // A client that stopped reading could keep the writer (and the socket) forever.
    if tokio::time::timeout(quiet_limit, &mut writer).await.is_err() {
        writer.abort();
    }
}

struct Session {
    app: App,
    ip: IpAddr,
    out: mpsc::Sender<String>,
    dialect: Option<Dialect>,
    /// Names this connection's writes and subscriptions (echo suppression).
    peer: String,
    client: Option<String>,
    viewer: Arc<RwLock<Viewer>>,
    subs: HashMap<String, JoinHandle<()>>,
    fetched: HashSet<String>,
    /// Follows the client's session, so a login elsewhere reaches this connection too.
    follower: Option<JoinHandle<()>>,
}

impl Session {
    fn new(app: App, ip: IpAddr, out: mpsc::Sender<String>) -> Session {
        Session {
            app,
            ip,
            out,
            dialect: None,
            peer: format!("sb{:016x}", rand::random::<u64>()),
            client: None,
            viewer: Arc::default(),
            subs: HashMap::new(),
            fetched: HashSet::new(),
            follower: None,
        }
    }

    fn close(&mut self) {
        for (_, t) in self.subs.drain() {
            t.abort();
        }
        if let Some(f) = self.follower.take() {
            f.abort();
        }
    }

    fn dialect(&self) -> Dialect {
        self.dialect.unwrap_or(Dialect::V7)
    }

    fn viewer(&self) -> Viewer {
        self.viewer.read().expect("viewer").clone()
    }

    async fn send(&self, frame: String) {
        let _ = self.out.send(frame).await;
    }

    async fn error(&self, reason: &str, about: Option<&str>) {
        self.send(wire::error(reason, about)).await;
    }

    async fn handle(&mut self, text: &str) {
        let (dialect, msg) = match wire::parse(text) {
            Ok(x) => x,
            Err(e) => return self.error(&e.reason, e.about.as_deref()).await,
        };
        self.dialect.get_or_insert(dialect);
        match msg {
            ClientMessage::Get { key } => self.get(key).await,
            ClientMessage::Set { key, val } => self.set(&key, val).await,
            ClientMessage::Patch { key, patches } => self.patch(&key, patches).await,
            ClientMessage::Forget { key } => {
                if let Some(t) = self.subs.remove(&key) {
                    t.abort();
                }
                self.fetched.remove(&key);
            }
            ClientMessage::Delete { key } => self.delete(&key).await,
        }
    }

    async fn resolve(&self, key: &str) -> Result<Resolved, AccessError> {
        let k = StatebusKey::parse(key)?;
        access::resolve(&self.app.accounts, self.app.identity, &k, &self.viewer()).await
    }

    async fn get(&mut self, key: String) {
        let access = match self.resolve(&key).await {
            Ok(Resolved::CurrentUser) => return self.current_user(None).await,
            Ok(Resolved::Resource(a)) => a,
            Err(e) => {
                self.error(&e.to_string(), Some(&key)).await;
                return self.send(wire::state(self.dialect(), &key, None)).await;
            }
        };
        if !access.read {
            self.error("only its owner reads this key", Some(&key)).await;
            return self.send(wire::state(self.dialect(), &key, None)).await;
        }
        let Some(rk) = access.key.clone() else {
            return self.send(wire::state(self.dialect(), &key, None)).await;
        };
        self.fetched.insert(key.clone());
        if self.subs.contains_key(&key) {
            // Already subscribed: answer this get with the current state.
            let val = read_value(&self.app, &rk).await;
            let val = render(&self.app, val, &access, &self.viewer()).await;
            return self.send(wire::state(self.dialect(), &key, val.as_ref())).await;
        }
        let task = tokio::spawn(forward(
            self.app.clone(),
            key.clone(),
            rk,
            access,
            self.peer.clone(),
            self.dialect(),
            self.viewer.clone(),
            self.out.clone(),
        ));
        self.subs.insert(key, task);
    }

    fn write_for(&self, body: WriteBody) -> Write {
        let viewer = self.viewer();
        Write {
            body,
            version: None,
            parents: None,
            peer: Some(self.peer.clone()),
            author: viewer.identity(),
            digest: None,
            writer: match viewer.identity() {
                Some(id) => Writer::Identity(id),
                None => Writer::Address(self.ip),
            },
        }
    }

    /// Answers a refused write with the key's current state, so the client's cache reverts.
    async fn revert(&self, key: &str, access: Option<&Access>) {
        let val = match access.and_then(|a| a.key.clone()) {
            Some(rk) if access.is_some_and(|a| a.read) => read_value(&self.app, &rk).await,
            _ => None,
        };
        self.send(wire::state(self.dialect(), key, val.as_ref())).await;
    }

    async fn set(&mut self, key: &str, val: Option<Value>) {
        let access = match self.resolve(key).await {
            Ok(Resolved::CurrentUser) => return self.current_user(val).await,
            Ok(Resolved::Resource(a)) => a,
            Err(e) => {
                self.error(&e.to_string(), Some(key)).await;
                return self.revert(key, None).await;
            }
        };
        if !access.write || access.key.is_none() {
            let why = if access.key.is_none() {
                "no such account"
            } else {
                "only its owner writes this key"
            };
            self.error(why, Some(key)).await;
            return self.revert(key, Some(&access)).await;
        }
        let rk = access.key.clone().expect("checked");
        let Some(val) = val else {
            // A state without a value: the key has none any more.
            if let Err(e) = self.app.engine.delete(&rk).await {
                self.error(&e.to_string(), Some(key)).await;
            }
            return;
        };
        let val = match &access.profile {
            Some(profile) => match self.update_profile(profile, val).await {
                Ok(v) => v,
                Err(e) => return self.error(&e.to_string(), Some(key)).await,
            },
            None => val,
        };
        // Nested states with their own keys become their own keys (as statebus does),
        // leaving a link `{key}` in their place.
        let mut children = Vec::new();
        let val = split_nested(val, &mut children, 0);
        for (child_key, child_val) in children {
            Box::pin(self.set(&child_key, child_val)).await;
        }
        let body = WriteBody::Full {
            media_type: Some("application/json".into()),
            body: Bytes::from(serde_json::to_vec(&val).expect("JSON serializes")),
        };
        if let Err(e) = self.app.engine.write(&rk, self.write_for(body)).await {
            self.error(&e.to_string(), Some(key)).await;
            self.revert(key, Some(&access)).await;
        }
    }

    /// The owner edits their profile: a new `pass` or `email` goes to the account record;
    /// the rest is the public profile. The name cannot change.
    async fn update_profile(&self, profile: &Account, val: Value) -> Result<Value, AccountError> {
        let Value::Object(mut m) = val else {
            return Err(AccountError::Refused(crate::accounts::BAD_FIELDS));
        };
        let pass = m.remove("pass");
        let email = m.remove("email");
        m.remove("login");
        if m.get("name")
            .is_some_and(|n| n.as_str() != Some(profile.name.as_str()))
        {
            return Err(AccountError::Refused(crate::accounts::BAD_FIELDS));
        }
        m.insert("name".into(), Value::String(profile.name.clone()));
        let pass = match pass {
            Some(Value::String(p)) if !p.starts_with('$') => Some(p),
            _ => None,
        };
        let email = email.as_ref().and_then(Value::as_str);
        if pass.is_some() || email.is_some() {
            self.app
                .accounts
                .update(&profile.name, pass.as_deref(), email)
                .await?;
        }
        Ok(Value::Object(m))
    }

    async fn patch(&mut self, key: &str, patches: Vec<(String, String)>) {
        if !self.fetched.contains(key) {
            return self
                .error(
                    "a patch needs the key fetched first (get it, then patch it)",
                    Some(key),
                )
                .await;
        }
        let access = match self.resolve(key).await {
            Ok(Resolved::Resource(a)) if a.write && a.key.is_some() && a.profile.is_none() => a,
            Ok(_) => {
                return self
                    .error("this key cannot be patched by this client", Some(key))
                    .await;
            }
            Err(e) => return self.error(&e.to_string(), Some(key)).await,
        };
        let mut typed = Vec::with_capacity(patches.len());
        for (range, content) in patches {
            match crate::braid::patch::parse_json_path(&range) {
                Ok(steps) => typed.push(Patch {
                    range: Range::Json(steps),
                    content: Bytes::from(content),
                }),
                Err(e) => return self.error(&format!("bad range {range:?}: {e}"), Some(key)).await,
            }
        }
        let rk = access.key.clone().expect("checked");
        if let Err(e) = self
            .app
            .engine
            .write(&rk, self.write_for(WriteBody::Patches(typed)))
            .await
        {
            self.error(&e.to_string(), Some(key)).await;
            self.revert(key, Some(&access)).await;
        }
    }

    async fn delete(&mut self, key: &str) {
        match self.resolve(key).await {
            Ok(Resolved::Resource(a)) if a.write && a.key.is_some() && a.profile.is_none() => {
                if let Err(e) = self.app.engine.delete(a.key.as_ref().expect("checked")).await {
                    self.error(&e.to_string(), Some(key)).await;
                }
            }
            Ok(_) => self.error("this client may not delete this key", Some(key)).await,
            Err(e) => self.error(&e.to_string(), Some(key)).await,
        }
    }

    /// `get` or `set` of `current_user`: binding, login, logout, account creation.
    async fn current_user(&mut self, val: Option<Value>) {
        let Some(Value::Object(cmd)) = val else {
            return self.push_current_user(None).await;
        };
        // v7 sends the command in `val`; v6 sends it as fields of the state.
        if let Some(Value::String(client)) = cmd.get("client")
            && self.client.is_none()
        {
            self.bind_client(client.clone()).await;
        }
        let mut error = None;
        if let Some(Value::Object(c)) = cmd.get("create_account") {
            let name = c
                .get("name")
                .or_else(|| c.get("login"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let pass = c.get("pass").and_then(Value::as_str);
            let email = c.get("email").and_then(Value::as_str);
            match pass {
                None => error = Some(crate::accounts::BAD_FIELDS.to_string()),
                Some(pass) => {
                    if let Err(e) = self.app.accounts.create(name, pass, email).await {
                        error = Some(e.to_string());
                    }
                }
            }
        }
        if let Some(Value::Object(c)) = cmd.get("login_as") {
            let name = c
                .get("name")
                .or_else(|| c.get("login"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let pass = c.get("pass").and_then(Value::as_str).unwrap_or("");
            match self.app.accounts.verify(name, pass).await {
                Ok(account) => {
                    let client = self.client_id();
                    if let Err(e) = self.app.accounts.bind(&client, &account).await {
                        error = Some(e.to_string());
                    } else {
                        self.viewer.write().expect("viewer").account = Some(account);
                    }
                }
                Err(e) => error = Some(e.to_string()),
            }
        }
        if cmd
            .get("logout")
            .is_some_and(|v| v.as_bool() != Some(false) && !v.is_null())
        {
            let client = self.client_id();
            if let Err(e) = self.app.accounts.unbind(&client).await {
                error = Some(e.to_string());
            }
            self.viewer.write().expect("viewer").account = None;
        }
        self.push_current_user(error.as_deref()).await;
    }

    /// The client id, made up for a connection that logs in without an intro.
    fn client_id(&mut self) -> String {
        self.client
            .get_or_insert_with(|| format!("{:032x}", rand::random::<u128>()))
            .clone()
    }

    async fn bind_client(&mut self, client: String) {
        let account = self.app.accounts.session(&client).await.ok().flatten();
        self.viewer.write().expect("viewer").account = account;
        if let Some(k) = self.app.accounts.session_key(&client) {
            self.follower = Some(tokio::spawn(follow_session(
                self.app.clone(),
                k,
                self.dialect(),
                self.viewer.clone(),
                self.out.clone(),
            )));
        }
        self.client = Some(client);
    }

    async fn push_current_user(&self, error: Option<&str>) {
        let viewer = self.viewer();
        let frame = if self.client.is_none() && viewer.account.is_none() && error.is_none() {
            wire::state(
                self.dialect(),
                "current_user",
                Some(&serde_json::json!({ "error": "no client" })),
            )
        } else {
            wire::state(
                self.dialect(),
                "current_user",
                Some(&current_user_value(self.dialect(), &viewer, error)),
            )
        };
        self.send(frame).await;
    }
}

/// The value of `current_user` in each dialect.
pub fn current_user_value(dialect: Dialect, viewer: &Viewer, error: Option<&str>) -> Value {
    let mut m = Map::new();
    let user = match (&viewer.account, dialect) {
        (None, _) => Value::Null,
        (Some(a), Dialect::V7) => serde_json::json!({ "link": format!("@{}", a.name) }),
        (Some(a), Dialect::V6) => {
            let mut u = serde_json::json!({ "key": format!("user/{}", a.name), "name": a.name });
            if let Some(e) = &a.email {
                u["email"] = Value::String(e.clone());
            }
            u
        }
    };
    m.insert("user".into(), user);
    m.insert("logged_in".into(), Value::Bool(viewer.account.is_some()));
    if let Some(e) = error {
        m.insert("error".into(), Value::String(e.to_string()));
    }
    Value::Object(m)
}

/// Pushes `current_user` whenever the client's session changes (a login or logout on
/// another connection of the same client).
async fn follow_session(
    app: App,
    key: ResourceKey,
    dialect: Dialect,
    viewer: Arc<RwLock<Viewer>>,
    out: mpsc::Sender<String>,
) {
    let Ok(mut sub) = app.engine.subscribe(&key, None, None).await else {
        return;
    };
    let mut first = true;
    while let Some(d) = sub.next().await {
        // The first delivery is the state at binding time, already known.
        if std::mem::take(&mut first) {
            continue;
        }
        let value = match &d {
            Delivery::Shared(ev) => body_json(&ev.body),
            Delivery::Own(u) => body_json(&u.body),
        };
        let Ok(account) = app.accounts.account_of_session(value.as_ref()).await else {
            continue;
        };
        let v = {
            let mut w = viewer.write().expect("viewer");
            if w.account == account {
                continue;
            }
            w.account = account;
            current_user_value(dialect, &w, None)
        };
        if out
            .send(wire::state(dialect, "current_user", Some(&v)))
            .await
            .is_err()
        {
            return;
        }
    }
}

fn body_json(body: &UpdateBody) -> Option<Value> {
    match body {
        UpdateBody::Snapshot(b) => serde_json::from_slice(b).ok(),
        _ => None,
    }
}

/// Forwards a resource's updates to a connection as whole states.
#[allow(clippy::too_many_arguments)]
async fn forward(
    app: App,
    key: String,
    rk: ResourceKey,
    access: Access,
    peer: String,
    dialect: Dialect,
    viewer: Arc<RwLock<Viewer>>,
    out: mpsc::Sender<String>,
) {
    let mut sub = match app.engine.subscribe(&rk, None, Some(peer)).await {
        Ok(s) => s,
        Err(e) => {
            let _ = out.send(wire::error(&e.to_string(), Some(&key))).await;
            let _ = out.send(wire::state(dialect, &key, None)).await;
            return;
        }
    };
    while let Some(d) = sub.next().await {
        let body = match &d {
            Delivery::Shared(ev) => &ev.body,
            Delivery::Own(u) => &u.body,
        };
        let val = match body {
            UpdateBody::Missing => None,
            UpdateBody::Snapshot(b) => Some(bytes_value(&app, &rk, b).await),
            // Text arrives as patches; a Statebus client wants the whole string.
            UpdateBody::Text(_) => read_value(&app, &rk).await,
        };
        let v = viewer.read().expect("viewer").clone();
        let val = render(&app, val, &access, &v).await;
        if out.send(wire::state(dialect, &key, val.as_ref())).await.is_err() {
            return;
        }
    }
}

/// A representation as a Statebus value: JSON as is, text as a string, other bytes as
/// base64.
async fn bytes_value(app: &App, rk: &ResourceKey, b: &Bytes) -> Value {
    if let Ok(v) = serde_json::from_slice(b) {
        return v;
    }
    match app.engine.read(rk).await.ok().and_then(|s| s.kind) {
        Some(crate::model::Kind::Text) => Value::String(String::from_utf8_lossy(b).into_owned()),
        _ => {
            use base64::Engine as _;
            Value::String(base64::engine::general_purpose::STANDARD.encode(b))
        }
    }
}

/// The current value of a resource (`None` if it does not exist).
pub(crate) async fn read_value(app: &App, rk: &ResourceKey) -> Option<Value> {
    let state = app.engine.read(rk).await.ok()?;
    if !state.exists() {
        return None;
    }
    Some(bytes_value(app, rk, &state.body).await)
}

/// What the viewer is shown: profiles filtered, links to nested states filled in.
async fn render(app: &App, val: Option<Value>, access: &Access, viewer: &Viewer) -> Option<Value> {
    let val = val?;
    let val = match &access.profile {
        Some(p) => access::view_profile(val, p, viewer),
        None => val,
    };
    Some(fill_links(app, val, viewer, 0).await)
}

/// Replaces links `{key}` left by [`split_nested`] with the states they name.
fn fill_links<'a>(
    app: &'a App,
    v: Value,
    viewer: &'a Viewer,
    depth: usize,
) -> futures::future::BoxFuture<'a, Value> {
    Box::pin(async move {
        match v {
            Value::Object(m) if m.len() == 1 && depth < MAX_LINK_DEPTH => {
                if let Some(Value::String(k)) = m.get("key") {
                    let k = k.clone();
                    if let Ok(sk) = StatebusKey::parse(&k)
                        && let Ok(Resolved::Resource(a)) =
                            access::resolve(&app.accounts, app.identity, &sk, viewer).await
                        && a.read
                        && let Some(rk) = &a.key
                    {
                        let mut out = Map::new();
                        out.insert("key".into(), Value::String(k));
                        if let Some(child) = read_value(app, rk).await {
                            out.insert("val".into(), fill_links(app, child, viewer, depth + 1).await);
                        }
                        return Value::Object(out);
                    }
                    return Value::Object(m);
                }
                let mut out = Map::new();
                for (k, x) in m {
                    out.insert(k, fill_links(app, x, viewer, depth).await);
                }
                Value::Object(out)
            }
            Value::Object(m) => {
                let mut out = Map::new();
                for (k, x) in m {
                    out.insert(k, fill_links(app, x, viewer, depth).await);
                }
                Value::Object(out)
            }
            Value::Array(a) => {
                let mut out = Vec::with_capacity(a.len());
                for x in a {
                    out.push(fill_links(app, x, viewer, depth).await);
                }
                Value::Array(out)
            }
            other => other,
        }
    })
}

/// Takes nested states (objects with a `key` and more) out of a value, leaving `{key}`
/// links; returns them in `children` as (key, value) — v7 states carry `val`, v6 flat ones
/// their other fields.
fn split_nested(v: Value, children: &mut Vec<(String, Option<Value>)>, depth: usize) -> Value {
    match v {
        Value::Object(mut m) if depth > 0 && m.len() > 1 && m.get("key").is_some_and(Value::is_string) => {
            let key = m
                .remove("key")
                .and_then(|k| k.as_str().map(str::to_string))
                .expect("checked");
            let val = match m.remove("val") {
                Some(val) if m.is_empty() => Some(split_nested(val, children, depth + 1)),
                Some(val) => {
                    m.insert("val".into(), val);
                    Some(split_nested(Value::Object(m), children, depth + 1))
                }
                None => Some(split_nested(Value::Object(m), children, depth + 1)),
            };
            children.push((key.clone(), val));
            serde_json::json!({ "key": key })
        }
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, x)| (k, split_nested(x, children, depth + 1)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(
            a.into_iter()
                .map(|x| split_nested(x, children, depth + 1))
                .collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_states_are_split_out() {
        let mut children = Vec::new();
        let v = split_nested(
            json!({"child": {"key": "c", "val": "kid"}, "list": [{"key": "d", "val": {"key": "e", "val": 1}}], "n": 1}),
            &mut children,
            0,
        );
        assert_eq!(v, json!({"child": {"key": "c"}, "list": [{"key": "d"}], "n": 1}));
        assert_eq!(
            children,
            vec![
                ("c".to_string(), Some(json!("kid"))),
                ("e".to_string(), Some(json!(1))),
                ("d".to_string(), Some(json!({"key": "e"}))),
            ]
        );
        // A bare link is left as is.
        let mut children = Vec::new();
        assert_eq!(
            split_nested(json!({"a": {"key": "x"}}), &mut children, 0),
            json!({"a": {"key": "x"}})
        );
        assert!(children.is_empty());
    }

    #[test]
    fn current_user_shapes() {
        let v = Viewer::default();
        assert_eq!(
            current_user_value(Dialect::V7, &v, None),
            json!({"user": null, "logged_in": false})
        );
        assert_eq!(
            current_user_value(Dialect::V7, &v, Some("no")),
            json!({"user": null, "logged_in": false, "error": "no"})
        );
    }
}
