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

use super::Services;
use super::access::{self, AccessError, Resolved, Target};
use super::connections::{Registered, View};
use super::keys::StatebusKey;
use super::wire::{self, ClientMessage, Dialect};
use crate::access::accounts::{Account, AccountError};
use crate::access::{Caller, Op, Refusal};
use crate::engine::{Delivery, Write};
use crate::metrics::Protocol;
use crate::model::ResourceKey;
use crate::update::{Patch, Range, UpdateBody, WriteBody};

/// Frames waiting to be sent to one connection.
const OUTBOX: usize = 1024;
/// How deep nested keyed objects are followed when a state is sent.
const MAX_LINK_DEPTH: usize = 4;

/// Serves one websocket until it closes, goes quiet or the server shuts down. `caller` is
/// who the upgrade request proved to be; `session`, its login session cookie, if any (a
/// browser logged in over HTTP is logged in here too).
///
/// The server pings every `limits.ping_interval_secs`; a connection from which nothing
/// (not even a pong) arrives for that long plus `limits.ping_timeout_secs` is closed.
pub async fn run(socket: WebSocket, svc: Services, ip: IpAddr, caller: Caller, session: Option<String>) {
    let (mut sink, mut stream) = socket.split();
    let (out, mut outbox) = mpsc::channel::<String>(OUTBOX);
    let ping_every = std::time::Duration::from_secs(svc.limits.ping_interval_secs.max(1));
    let quiet_limit = ping_every + std::time::Duration::from_secs(svc.limits.ping_timeout_secs.max(1));
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
    let shutdown = svc.shutdown.clone();
    // Ends when the writer has: the peer is gone (a write failed), so the messages it
    // left in the socket's buffer are not worth reading.
    let peer_gone = out.clone();
    let mut s = Session::new(svc, ip, out, caller);
    if let Some(secret) = session {
        s.bind_client(secret).await;
    }
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = peer_gone.closed() => break,
            m = tokio::time::timeout(quiet_limit, stream.next()) => match m {
                Ok(m) => m,
                Err(_) => {
                    tracing::debug!(%ip, "closing a websocket that answers no pings");
                    break;
                }
            },
        };
        match msg {
            Some(Ok(Message::Text(t))) => {
                s.svc.messages.ready(ip).await;
                s.handle(t.as_str()).await
            }
            Some(Ok(Message::Binary(_))) => s.error("binary frames are not Statebus messages", None).await,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
        }
    }
    s.close();
    // The last senders: the writer sees the end of its queue and closes the socket.
    drop((s, peer_gone));
    // A client that stopped reading could keep the writer (and the socket) forever.
    if tokio::time::timeout(quiet_limit, &mut writer).await.is_err() {
        writer.abort();
    }
}

struct Session {
    svc: Services,
    ip: IpAddr,
    out: mpsc::Sender<String>,
    dialect: Option<Dialect>,
    /// Names this connection's writes and subscriptions (echo suppression).
    peer: String,
    /// The session secret: the login session cookie of the upgrade, or the client id of
    /// the intro (Statebus binds logins to it).
    client: Option<String>,
    /// Who the upgrade request proved to be; the caller while no account is logged in.
    base: Caller,
    viewer: Arc<RwLock<Caller>>,
    subs: HashMap<String, JoinHandle<()>>,
    fetched: HashSet<String>,
    /// Follows the client's session, so a login elsewhere reaches this connection too.
    follower: Option<JoinHandle<()>>,
    /// This connection in the registry of open connections, for as long as it is open.
    registered: Registered,
}

impl Session {
    fn new(svc: Services, ip: IpAddr, out: mpsc::Sender<String>, base: Caller) -> Session {
        let viewer = Arc::new(RwLock::new(base.clone()));
        let registered = svc.connections.register(viewer.clone());
        Session {
            svc,
            ip,
            out,
            dialect: None,
            peer: format!("sb{:016x}", rand::random::<u64>()),
            client: None,
            viewer,
            base,
            subs: HashMap::new(),
            fetched: HashSet::new(),
            follower: None,
            registered,
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

    fn viewer(&self) -> Caller {
        self.viewer.read().expect("viewer").clone()
    }

    /// Logs the connection in as `account`, or (None) back out to the upgrade's caller.
    fn set_account(&self, account: Option<Account>) {
        *self.viewer.write().expect("viewer") = account.map_or_else(|| self.base.clone(), Caller::from);
        self.svc.connections.touch();
    }

    /// The v6 view of the open connections that `key` names, if it names one (v7 clients
    /// have no such states: to them these are ordinary keys, as in statebus 7).
    fn connections_view(&self, key: &str) -> Option<View> {
        (self.dialect() == Dialect::V6)
            .then(|| View::of_key(key))
            .flatten()
    }

    /// Refuses a write to a connections state, answering with its state.
    async fn connections_kept(&mut self, key: &str, view: View) {
        self.refuse(
            "forbidden",
            "the connections states are kept by the server; clients read them",
            Some(key),
        )
        .await;
        let val = self
            .svc
            .connections
            .render(&view, &self.svc.access, &self.viewer(), self.registered.id())
            .ok();
        self.send(wire::state(self.dialect(), key, val.as_ref())).await;
    }

    /// `fetch` of `connections`, `connection` or `connection/<id>`: the state now, then
    /// again whenever a connection opens, closes, logs in or out, or the rules change.
    async fn get_connections(&mut self, key: String, view: View) {
        let now = self
            .svc
            .connections
            .render(&view, &self.svc.access, &self.viewer(), self.registered.id());
        let val = match now {
            Ok(v) => v,
            Err(r) => {
                self.refused(&r, &key).await;
                return self.send(wire::state(self.dialect(), &key, None)).await;
            }
        };
        if self.subs.contains_key(&key) {
            return self.send(wire::state(self.dialect(), &key, Some(&val))).await;
        }
        if !self.room_for_one_more(&key).await {
            return;
        }
        self.fetched.insert(key.clone());
        let task = tokio::spawn(follow_connections(
            self.svc.clone(),
            key.clone(),
            view,
            self.registered.id().to_string(),
            self.dialect(),
            self.viewer.clone(),
            self.out.clone(),
        ));
        self.subs.insert(key, task);
    }

    /// Whether this connection may follow one more key; if not, the client is told why
    /// (and answered with an empty state, so it does not wait).
    async fn room_for_one_more(&self, key: &str) -> bool {
        // Each followed key holds a task and a subscription until `forget` or close.
        let max = self.svc.limits.max_statebus_subscriptions;
        if self.subs.len() < max {
            return true;
        }
        self.refuse(
            "too-many-subscriptions",
            &format!(
                "this connection already follows {max} keys (limits.max_statebus_subscriptions); forget some first"
            ),
            Some(key),
        )
        .await;
        self.send(wire::state(self.dialect(), key, None)).await;
        false
    }

    /// Tells the client why, with a machine-readable refusal.
    async fn refused(&self, r: &Refusal, key: &str) {
        self.svc.refusals.count(
            crate::http::error::ApiError::from(r.clone()).code(),
            &r.reason,
            Some(self.ip),
            format_args!("statebus {} {key}", r.op.name()),
        );
        self.send(wire::refusal(r, key)).await;
    }

    /// Tells the client why the engine refused its write or delete.
    async fn engine_refused(&self, e: crate::engine::EngineError, key: &str) {
        let reason = e.to_string();
        self.svc.refusals.count(
            crate::http::error::ApiError::from(e).code(),
            &reason,
            Some(self.ip),
            format_args!("statebus write to {key}"),
        );
        self.error(&reason, Some(key)).await;
    }

    async fn send(&self, frame: String) {
        let _ = self.out.send(frame).await;
    }

    async fn error(&self, reason: &str, about: Option<&str>) {
        self.send(wire::error(reason, about)).await;
    }

    /// Tells the client why, counting the refusal under `code` (as HTTP would send it).
    async fn refuse(&self, code: &str, reason: &str, about: Option<&str>) {
        self.svc.refusals.count(
            code,
            reason,
            Some(self.ip),
            format_args!("statebus message about {}", about.unwrap_or("nothing")),
        );
        self.error(reason, about).await;
    }

    async fn handle(&mut self, text: &str) {
        let (dialect, msg) = match wire::parse(text) {
            Ok(x) => x,
            Err(e) => return self.refuse("bad-request", &e.reason, e.about.as_deref()).await,
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
        access::resolve(&self.svc.access, &k).await
    }

    /// Resolves a key and checks `op` on it; a refusal is told to the client.
    async fn target(&self, key: &str, op: Op) -> Result<Resolved, ()> {
        let resolved = match self.resolve(key).await {
            Ok(r) => r,
            Err(AccessError::Refused(r)) => {
                self.refused(&r, key).await;
                return Err(());
            }
            Err(e) => {
                self.error(&e.to_string(), Some(key)).await;
                return Err(());
            }
        };
        if let Resolved::Resource(Target { key: Some(rk), .. }) = &resolved
            && let Err(r) = self.svc.access.check(&self.viewer(), rk, op)
        {
            self.refused(&r, key).await;
            return Err(());
        }
        Ok(resolved)
    }

    async fn get(&mut self, key: String) {
        if let Some(view) = self.connections_view(&key) {
            return self.get_connections(key, view).await;
        }
        let target = match self.target(&key, Op::Read).await {
            Ok(Resolved::CurrentUser) => return self.current_user(None).await,
            Ok(Resolved::Resource(t)) => t,
            Err(()) => return self.send(wire::state(self.dialect(), &key, None)).await,
        };
        let Some(rk) = target.key.clone() else {
            return self.send(wire::state(self.dialect(), &key, None)).await;
        };
        self.fetched.insert(key.clone());
        if self.subs.contains_key(&key) {
            // Already subscribed: answer this get with the current state.
            let val = read_value(&self.svc, &rk).await;
            let val = render(&self.svc, &key, val, &target, &self.viewer()).await;
            return self.send(wire::state(self.dialect(), &key, val.as_ref())).await;
        }
        if !self.room_for_one_more(&key).await {
            return;
        }
        let task = tokio::spawn(forward(
            self.svc.clone(),
            key.clone(),
            rk,
            target,
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
            author: viewer.author(self.svc.identity),
            digest: None,
            writer: viewer.writer(self.svc.identity, Some(self.ip)),
        }
    }

    /// Writes `body` to `rk` (named `key` by the client) once the access layer allows it;
    /// a refused or failed write is told to the client and its state reverted.
    async fn write(&self, key: &str, target: &Target, rk: &ResourceKey, body: WriteBody) {
        if let Err(e) = self.svc.access.check_write(&self.viewer(), rk, &body) {
            match e {
                crate::access::WriteRefused::Refused(r) => self.refused(&r, key).await,
                crate::access::WriteRefused::InvalidRules(m) => self.error(&m, Some(key)).await,
            }
            return self.revert(key, Some(target)).await;
        }
        match self.svc.engine.write(rk, self.write_for(body)).await {
            Ok(_) => self.svc.access.written(&self.svc.engine, rk).await,
            Err(e) => {
                self.engine_refused(e, key).await;
                self.revert(key, Some(target)).await;
            }
        }
    }

    /// Who a delete from this connection is limited as.
    fn write_for_delete(&self) -> crate::engine::Writer {
        self.viewer().writer(self.svc.identity, Some(self.ip))
    }

    /// Answers a refused write with the key's current state, so the client's cache reverts.
    async fn revert(&self, key: &str, target: Option<&Target>) {
        let readable = |rk: &ResourceKey| self.svc.access.check(&self.viewer(), rk, Op::Read).is_ok();
        let val = match target.and_then(|t| t.key.clone()) {
            Some(rk) if readable(&rk) => read_value(&self.svc, &rk).await.map(|v| without_own_key(v, key)),
            _ => None,
        };
        self.send(wire::state(self.dialect(), key, val.as_ref())).await;
    }

    async fn set(&mut self, key: &str, val: Option<Value>) {
        if let Some(view) = self.connections_view(key) {
            return self.connections_kept(key, view).await;
        }
        let op = if val.is_some() { Op::Write } else { Op::Delete };
        let target = match self.target(key, op).await {
            Ok(Resolved::CurrentUser) => return self.current_user(val).await,
            Ok(Resolved::Resource(t)) => t,
            Err(()) => return self.revert(key, None).await,
        };
        let Some(rk) = target.key.clone() else {
            self.error("no such account", Some(key)).await;
            return self.revert(key, Some(&target)).await;
        };
        let Some(val) = val else {
            // A state without a value: the key has none any more.
            if let Err(e) = self.svc.engine.delete(&rk, &self.write_for_delete()).await {
                self.engine_refused(e, key).await;
            }
            return;
        };
        let val = match &target.profile {
            Some(profile) => match self.update_profile(profile, val).await {
                Ok(v) => v,
                Err(e) => return self.error(&e.to_string(), Some(key)).await,
            },
            None => val,
        };
        // Nested states with their own keys become their own keys (as statebus does),
        // leaving a link `{key}` in their place.
        let mut children = Vec::new();
        let mut val = split_nested(val, &mut children, 0);
        for (child_key, child_val) in children {
            Box::pin(self.set(&child_key, child_val)).await;
        }
        // A v6 state is the whole object, key included, as the statebus 6 server stores
        // it: that is what a plain HTTP GET of the key reads back.
        if self.dialect() == Dialect::V6
            && target.profile.is_none()
            && let Value::Object(m) = &mut val
        {
            m.insert("key".into(), Value::String(own_key(key).to_string()));
        }
        let body = WriteBody::Full {
            media_type: Some("application/json".into()),
            body: Bytes::from(serde_json::to_vec(&val).expect("JSON serializes")),
        };
        self.write(key, &target, &rk, body).await;
    }

    /// The owner edits their profile: a new `pass` or `email` goes to the account record;
    /// the rest is the public profile. The name cannot change. A new password ends the
    /// account's other sessions; this connection stays logged in.
    async fn update_profile(&self, profile: &Account, val: Value) -> Result<Value, AccountError> {
        let Value::Object(mut m) = val else {
            return Err(AccountError::Refused(crate::access::accounts::BAD_FIELDS));
        };
        let pass = m.remove("pass");
        let email = m.remove("email");
        m.remove("login");
        if m.get("name")
            .is_some_and(|n| n.as_str() != Some(profile.name.as_str()))
        {
            return Err(AccountError::Refused(crate::access::accounts::BAD_FIELDS));
        }
        m.insert("name".into(), Value::String(profile.name.clone()));
        let pass = match pass {
            Some(Value::String(p)) if !p.starts_with('$') => Some(p),
            _ => None,
        };
        let email = email.as_ref().and_then(Value::as_str);
        if pass.is_some() || email.is_some() {
            let accounts = self.svc.access.accounts();
            accounts.update(&profile.name, pass.as_deref(), email).await?;
            if pass.is_some()
                && let Some(client) = &self.client
            {
                accounts.bind(client, profile).await?;
            }
        }
        Ok(Value::Object(m))
    }

    async fn patch(&mut self, key: &str, patches: Vec<(String, String)>) {
        if let Some(view) = self.connections_view(key) {
            return self.connections_kept(key, view).await;
        }
        if !self.fetched.contains(key) {
            return self
                .error(
                    "a patch needs the key fetched first (get it, then patch it)",
                    Some(key),
                )
                .await;
        }
        let target = match self.target(key, Op::Write).await {
            Ok(Resolved::Resource(t)) if t.key.is_some() && t.profile.is_none() => t,
            Ok(_) => {
                return self
                    .error("this key cannot be patched by this client", Some(key))
                    .await;
            }
            Err(()) => return,
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
        let rk = target.key.clone().expect("checked");
        let body = WriteBody::Patches(typed);
        self.write(key, &target, &rk, body).await;
    }

    async fn delete(&mut self, key: &str) {
        if let Some(view) = self.connections_view(key) {
            return self.connections_kept(key, view).await;
        }
        match self.target(key, Op::Delete).await {
            Ok(Resolved::Resource(Target {
                key: Some(rk),
                profile: None,
            })) => {
                if let Err(e) = self.svc.engine.delete(&rk, &self.write_for_delete()).await {
                    self.engine_refused(e, key).await;
                }
            }
            Ok(_) => self.error("this client may not delete this key", Some(key)).await,
            Err(()) => {}
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
        let accounts = self.svc.access.accounts().clone();
        let mut error = None;
        let name_of = |c: &Map<String, Value>| {
            c.get("name")
                .or_else(|| c.get("login"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        if let Some(Value::Object(c)) = cmd.get("create_account") {
            let pass = c.get("pass").and_then(Value::as_str);
            let email = c.get("email").and_then(Value::as_str);
            match pass {
                None => error = Some(crate::access::accounts::BAD_FIELDS.to_string()),
                Some(pass) => {
                    if let Err(e) = accounts.create(&name_of(c), pass, email, Some(self.ip)).await {
                        error = Some(e.to_string());
                    }
                }
            }
        }
        if let Some(Value::Object(c)) = cmd.get("login_as") {
            let pass = c.get("pass").and_then(Value::as_str).unwrap_or("");
            match accounts.login(&name_of(c), pass, Some(self.ip)).await {
                Ok(account) => {
                    let client = self.client_id();
                    if let Err(e) = accounts.bind(&client, &account).await {
                        error = Some(e.to_string());
                    } else {
                        self.set_account(Some(account));
                    }
                }
                Err(e) => error = Some(e.to_string()),
            }
        }
        let truthy = |k: &str| {
            cmd.get(k)
                .is_some_and(|v| v.as_bool() != Some(false) && !v.is_null())
        };
        if truthy("logout_everywhere")
            && let Some(a) = self.viewer().account()
        {
            if let Err(e) = accounts.end_sessions(a).await {
                error = Some(e.to_string());
            }
            self.set_account(None);
        }
        if truthy("logout") {
            let client = self.client_id();
            if let Err(e) = accounts.unbind(&client).await {
                error = Some(e.to_string());
            }
            self.set_account(None);
        }
        self.push_current_user(error.as_deref()).await;
    }

    /// The client id, made up for a connection that logs in without an intro.
    fn client_id(&mut self) -> String {
        self.client
            .get_or_insert_with(crate::access::accounts::new_session_secret)
            .clone()
    }

    async fn bind_client(&mut self, client: String) {
        let accounts = self.svc.access.accounts();
        let account = accounts.session(&client).await.ok().flatten();
        self.set_account(account);
        if let Some(k) = accounts.session_key(&client) {
            self.follower = Some(tokio::spawn(follow_session(
                self.svc.clone(),
                k,
                self.dialect(),
                self.base.clone(),
                self.viewer.clone(),
                self.out.clone(),
            )));
        }
        self.client = Some(client);
    }

    async fn push_current_user(&self, error: Option<&str>) {
        let viewer = self.viewer();
        let frame = if self.client.is_none() && viewer.account().is_none() && error.is_none() {
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
pub fn current_user_value(dialect: Dialect, caller: &Caller, error: Option<&str>) -> Value {
    let mut m = Map::new();
    let user = match (caller.account(), dialect) {
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
    m.insert("logged_in".into(), Value::Bool(caller.account().is_some()));
    if let Some(e) = error {
        m.insert("error".into(), Value::String(e.to_string()));
    }
    Value::Object(m)
}

/// Pushes `current_user` whenever the client's session changes (a login or logout on
/// another connection of the same client).
async fn follow_session(
    svc: Services,
    key: ResourceKey,
    dialect: Dialect,
    base: Caller,
    viewer: Arc<RwLock<Caller>>,
    out: mpsc::Sender<String>,
) {
    let Ok(mut sub) = svc.engine.subscribe(&key, None, None).await else {
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
        let Ok(account) = svc.access.accounts().account_of_session(value.as_ref()).await else {
            continue;
        };
        let v = {
            let mut w = viewer.write().expect("viewer");
            if w.account() == account.as_ref() {
                continue;
            }
            *w = account.map_or_else(|| base.clone(), Caller::from);
            current_user_value(dialect, &w, None)
        };
        svc.connections.touch();
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

/// Forwards a resource's updates to a connection as whole states, for as long as the
/// connection's caller may read it: a rule change that takes the right away ends the
/// forwarding with a refusal.
#[allow(clippy::too_many_arguments)]
async fn forward(
    svc: Services,
    key: String,
    rk: ResourceKey,
    target: Target,
    peer: String,
    dialect: Dialect,
    viewer: Arc<RwLock<Caller>>,
    out: mpsc::Sender<String>,
) {
    let mut sub = match svc.engine.subscribe(&rk, None, Some(peer)).await {
        Ok(s) => s,
        Err(e) => {
            let _ = out.send(wire::error(&e.to_string(), Some(&key))).await;
            let _ = out.send(wire::state(dialect, &key, None)).await;
            return;
        }
    };
    let mut rules = svc.access.watch();
    let _open = svc.metrics.subscribed(Protocol::Statebus);
    loop {
        let d = tokio::select! {
            // A rule change is seen before any update that follows it.
            biased;
            _ = rules.changed() => {
                let caller = viewer.read().expect("viewer").clone();
                if let Err(r) = rules.check(&caller, &rk) {
                    let _ = out.send(wire::refusal(&r, &key)).await;
                    let _ = out.send(wire::state(dialect, &key, None)).await;
                    return;
                }
                continue;
            }
            d = sub.next() => match d {
                Some(d) => d,
                None => return,
            },
        };
        let (body, committed) = match &d {
            Delivery::Shared(ev) => (&ev.body, Some(ev.committed)),
            Delivery::Own(u) => (&u.body, None),
        };
        let val = match body {
            UpdateBody::Missing => None,
            UpdateBody::Snapshot(b) => Some(bytes_value(&svc, &rk, b).await),
            // Text arrives as patches; a Statebus client wants the whole string.
            UpdateBody::Text(_) => read_value(&svc, &rk).await,
        };
        let v = viewer.read().expect("viewer").clone();
        let val = render(&svc, &key, val, &target, &v).await;
        if out.send(wire::state(dialect, &key, val.as_ref())).await.is_err() {
            return;
        }
        svc.metrics.delivered(Protocol::Statebus, committed);
    }
}

/// A representation as a Statebus value: JSON as is, text as a string, other bytes as
/// base64.
async fn bytes_value(svc: &Services, rk: &ResourceKey, b: &Bytes) -> Value {
    if let Ok(v) = serde_json::from_slice(b) {
        return v;
    }
    match svc.engine.read(rk).await.ok().and_then(|s| s.kind) {
        Some(crate::model::Kind::Text) => Value::String(String::from_utf8_lossy(b).into_owned()),
        _ => {
            use base64::Engine as _;
            Value::String(base64::engine::general_purpose::STANDARD.encode(b))
        }
    }
}

/// The current value of a resource (`None` if it does not exist).
pub(crate) async fn read_value(svc: &Services, rk: &ResourceKey) -> Option<Value> {
    let state = svc.engine.read(rk).await.ok()?;
    if !state.exists() {
        return None;
    }
    Some(bytes_value(svc, rk, &state.body).await)
}

/// What the viewer is shown: profiles filtered, links to nested states filled in; a v6
/// state's own `key` is the frame's, not part of its value.
async fn render(
    svc: &Services,
    key: &str,
    val: Option<Value>,
    target: &Target,
    viewer: &Caller,
) -> Option<Value> {
    let val = without_own_key(val?, key);
    let val = match &target.profile {
        Some(p) => access::view_profile(val, p, viewer),
        None => val,
    };
    Some(fill_links(svc, val, viewer, 0).await)
}

/// A wire key without the leading `/` of the client's mount: the key as stored.
fn own_key(key: &str) -> &str {
    key.strip_prefix('/').unwrap_or(key)
}

/// A value without the `key` field naming its own key (v6 saves store it; see `set`).
fn without_own_key(val: Value, key: &str) -> Value {
    match val {
        Value::Object(mut m) if m.get("key").and_then(Value::as_str) == Some(own_key(key)) => {
            m.remove("key");
            Value::Object(m)
        }
        other => other,
    }
}

/// Follows the open connections for a `fetch` of one of their states (see
/// [`super::connections`]): sends the state whenever it changes for this viewer, until the
/// viewer may no longer read it.
async fn follow_connections(
    svc: Services,
    key: String,
    view: View,
    own_id: String,
    dialect: Dialect,
    viewer: Arc<RwLock<Caller>>,
    out: mpsc::Sender<String>,
) {
    let mut changes = svc.connections.changes();
    let mut rules = svc.access.changes();
    let mut last = None;
    let mut rules_open = true;
    loop {
        let caller = viewer.read().expect("viewer").clone();
        match svc.connections.render(&view, &svc.access, &caller, &own_id) {
            Ok(v) if last.as_ref() == Some(&v) => {}
            Ok(v) => {
                if out.send(wire::state(dialect, &key, Some(&v))).await.is_err() {
                    return;
                }
                last = Some(v);
            }
            Err(r) => {
                let _ = out.send(wire::refusal(&r, &key)).await;
                let _ = out.send(wire::state(dialect, &key, None)).await;
                return;
            }
        }
        tokio::select! {
            c = changes.changed() => if c.is_err() { return },
            r = rules.changed(), if rules_open => rules_open = r.is_ok(),
        }
    }
}

/// Replaces links `{key}` left by [`split_nested`] with the states they name.
fn fill_links<'a>(
    svc: &'a Services,
    v: Value,
    viewer: &'a Caller,
    depth: usize,
) -> futures::future::BoxFuture<'a, Value> {
    Box::pin(async move {
        match v {
            Value::Object(m) if m.len() == 1 && depth < MAX_LINK_DEPTH => {
                if let Some(Value::String(k)) = m.get("key") {
                    let k = k.clone();
                    if let Ok(sk) = StatebusKey::parse(&k)
                        && let Ok(Resolved::Resource(t)) = access::resolve(&svc.access, &sk).await
                        && let Some(rk) = &t.key
                        && svc.access.check(viewer, rk, Op::Read).is_ok()
                    {
                        let mut out = Map::new();
                        out.insert("key".into(), Value::String(k));
                        if let Some(child) = read_value(svc, rk).await {
                            out.insert("val".into(), fill_links(svc, child, viewer, depth + 1).await);
                        }
                        return Value::Object(out);
                    }
                    return Value::Object(m);
                }
                let mut out = Map::new();
                for (k, x) in m {
                    out.insert(k, fill_links(svc, x, viewer, depth).await);
                }
                Value::Object(out)
            }
            Value::Object(m) => {
                let mut out = Map::new();
                for (k, x) in m {
                    out.insert(k, fill_links(svc, x, viewer, depth).await);
                }
                Value::Object(out)
            }
            Value::Array(a) => {
                let mut out = Vec::with_capacity(a.len());
                for x in a {
                    out.push(fill_links(svc, x, viewer, depth).await);
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
        let v = Caller::Anonymous;
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
