//! The server's side of the peer-to-peer node: joining over HTTP and the admin socket.
//!
//! * Invites name the inviter's join endpoint (`POST /.well-known/plait/join`, served by
//!   `http`): the invitee's server posts a [`JoinRequest`] there and gets a [`JoinGrant`]
//!   (member certs and the inviter's addresses), then connects over libp2p as a member.
//! * The admin socket (`admin.sock` in the data dir, mode 0600, so file permissions guard
//!   it) is how `plait invite`, `plait join`, `plait status`, `plait members` (and
//!   `members remove`), `plait resolve` and `plait connect` reach the running server: one
//!   JSON request line, one JSON answer line.
//!
//! What the network does lives in `plait_bridge::node`; this module only carries requests
//! to it. Its errors are typed ([`JoinError`]); `http::error` alone turns them into statuses.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use plait_bridge::invite::{Invite, JoinRequest};
use plait_bridge::node::Node;
use plait_bridge::types::{JoinGrant, NodeError};
use plait_bridge::{Identity, Keypair};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// The admin socket's file name in the data dir.
pub const ADMIN_SOCKET: &str = "admin.sock";
/// Largest join request accepted over HTTP.
pub const MAX_JOIN_BYTES: usize = 64 * 1024;
/// Longest admin request line.
const MAX_ADMIN_LINE: usize = 64 * 1024;

/// A command on the admin socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum AdminRequest {
    Invite {
        #[serde(default)]
        dht: Option<String>,
        uses: u32,
        ttl_secs: u64,
    },
    Join {
        link: String,
    },
    Status,
    Members,
    Remove {
        id: String,
        #[serde(default)]
        dht: Option<String>,
    },
    Resolve {
        id: String,
    },
    Connect {
        addr: String,
    },
    /// `plait mirror add`: push this server's sealed segments to the inviter of `link`,
    /// joining its network first if need be.
    MirrorAdd {
        link: String,
    },
    /// What `plait mirror list` shows of the running server: each mirror's acknowledged
    /// seq, each granted namespace's usage.
    MirrorStatus,
    /// `plait device link`: make a device of this owner and leave its sealed keys with
    /// the mirrors for `ttl_secs`; `invite` (a mirror's invite link) goes in the link.
    DeviceLink {
        ttl_secs: u64,
        #[serde(default)]
        invite: Option<String>,
    },
    /// `plait device revoke`: nothing sealed from now on is sealed to device `id`.
    DeviceRevoke {
        id: String,
    },
    /// `plait mirror follow`: follow `owner`'s chain on the inviter of `link` (joining its
    /// network first if need be), or on the mirrors its DHT record names.
    MirrorFollow {
        owner: String,
        #[serde(default)]
        link: Option<String>,
    },
}

/// The answer to an admin command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminResponse {
    pub ok: bool,
    #[serde(default)]
    pub result: serde_json::Value,
    #[serde(default)]
    pub error: Option<String>,
}

/// Why an invitee's join request is refused at `POST /.well-known/plait/join`.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("not a join request: {0}")]
    Malformed(String),
    /// Expired, used up, not ours, another DHT, a bad signature, a removed member: the
    /// reason says which.
    #[error(transparent)]
    Refused(NodeError),
    #[error("the p2p node has stopped")]
    Stopped,
}

/// The node's state (members, peers, records held) kept as a setting in the store, so it
/// lives with the rest of the instance's data (and is shared by processes on one Postgres).
pub struct StoredState(pub Arc<dyn crate::storage::Storage>);

const STATE_SETTING: &str = "p2p_state";

impl plait_bridge::state::StateStore for StoredState {
    fn load(&self) -> futures::future::BoxFuture<'static, Result<Option<Vec<u8>>, String>> {
        let storage = self.0.clone();
        Box::pin(async move {
            let v = storage
                .get_setting(STATE_SETTING)
                .await
                .map_err(|e| e.to_string())?;
            Ok(v.map(String::into_bytes))
        })
    }

    fn save(&self, bytes: Vec<u8>) -> futures::future::BoxFuture<'static, Result<(), String>> {
        let storage = self.0.clone();
        Box::pin(async move {
            let text = String::from_utf8(bytes).map_err(|e| e.to_string())?;
            storage
                .put_setting(STATE_SETTING, &text)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// The running node and what joining needs.
pub struct P2p {
    pub node: Node,
    keys: Arc<Keypair>,
    /// Where invitees post join requests (in the invites this server makes).
    join_url: String,
    client: Client<HttpConnector, Full<Bytes>>,
    /// The mirror's two sides, once the server has set them up.
    mirror: Option<Mirror>,
}

/// The mirror's two sides, as the admin socket reaches them.
pub struct Mirror {
    pub data_dir: PathBuf,
    pub owner: Arc<crate::mirror::owner::Owner>,
    pub keeper: Arc<crate::mirror::keeper::Keeper>,
    pub reader: Arc<crate::mirror::reader::Reader>,
    /// On a device: what seals and pushes its own writes to its owner's namespace.
    pub device: Option<Arc<crate::mirror::owner::Owner>>,
}

impl P2p {
    pub fn new(node: Node, keys: Arc<Keypair>, public_url: &str) -> P2p {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(std::time::Duration::from_secs(10)));
        P2p {
            node,
            keys,
            join_url: format!("{}/.well-known/plait/join", public_url.trim_end_matches('/')),
            client: Client::builder(TokioExecutor::new()).build(connector),
            mirror: None,
        }
    }

    /// How far each mirror is behind this instance's sealed chain (the mirrors its pushers
    /// have reached so far); `None` without a mirror setup.
    pub fn mirror_lag(&self) -> Option<crate::metrics::MirrorLag> {
        let owner = &self.mirror.as_ref()?.owner;
        let sealed = owner.sealed_seq();
        let pending = owner
            .push_status()
            .into_iter()
            .map(|(id, s)| (id, sealed.saturating_sub(s.acked)))
            .collect();
        Some(crate::metrics::MirrorLag { sealed, pending })
    }

    /// Lets the admin socket add mirrors and report on them.
    pub fn with_mirror(mut self, mirror: Mirror) -> P2p {
        self.mirror = Some(mirror);
        self
    }

    /// The mirror side (what this server keeps for others), once set up.
    pub fn keeper(&self) -> Option<&Arc<crate::mirror::keeper::Keeper>> {
        self.mirror.as_ref().map(|m| &m.keeper)
    }

    /// `plait mirror add`: joins the network of the link's inviter unless it is a member
    /// already (then the link is not used), and adds it to this server's mirrors.
    async fn add_mirror(&self, link: &str) -> Result<serde_json::Value, String> {
        let m = self.mirror.as_ref().ok_or("this server runs no mirror")?;
        let invite = Invite::from_link(link).map_err(|e| e.to_string())?;
        let joined = if self.node.is_member(&invite.inviter) {
            false
        } else {
            self.join(link).await?;
            true
        };
        crate::mirror::owner::add_mirror(&m.data_dir, invite.inviter, &invite.dht)
            .map_err(|e| format!("{e:#}"))?;
        // An owner without mirrors sealed nothing: seal what there is now, so that the
        // answer's `sealed_seq` is what the first sync carries.
        m.owner.seal_pending().await.map_err(|e| format!("{e:#}"))?;
        m.owner.wake();
        Ok(serde_json::json!({
            "mirror": invite.inviter,
            "dht": invite.dht,
            "joined": joined,
            "sealed_seq": m.owner.sealed_seq(),
        }))
    }

    /// The mirror's side of `plait status` and `/.well-known/plait` (owner only): as an
    /// owner, each mirror's lag (segments sealed past what it acknowledged) and health
    /// (the last error, the last success); as a mirror, each grant's use against its
    /// quota. `None` without a mirror setup.
    pub async fn mirror_health(&self) -> Option<serde_json::Value> {
        let m = self.mirror.as_ref()?;
        let sealed = m.owner.sealed_seq();
        let pushed = m.owner.push_status();
        let mirrors: Vec<_> = crate::mirror::owner::mirrors(&m.data_dir)
            .unwrap_or_default()
            .into_keys()
            .map(|id| {
                let s = pushed.get(&id);
                serde_json::json!({
                    "id": id,
                    "acked": s.map(|s| s.acked),
                    "lag": s.map(|s| sealed.saturating_sub(s.acked)),
                    "checkpoint": s.map(|s| s.checkpoint),
                    "error": s.and_then(|s| s.error.clone()),
                    "last_ok_ms": s.and_then(|s| s.last_ok_ms),
                    "revoked_acked": s.map(|s| s.revoked_acked),
                })
            })
            .collect();
        let mut grants = Vec::new();
        let list = crate::mirror::grants::Grants::new(&m.data_dir)
            .list()
            .unwrap_or_default();
        for (id, g) in list {
            grants.push(serde_json::json!({
                "id": id,
                "quota": g.quota,
                "used": m.keeper.used(&id).await.ok(),
            }));
        }
        Some(serde_json::json!({
            "sealed_seq": sealed,
            "mirrors": mirrors,
            "grants": grants,
        }))
    }

    pub(crate) async fn mirror_status(&self) -> Result<serde_json::Value, String> {
        let m = self.mirror.as_ref().ok_or("this server runs no mirror")?;
        let grants = crate::mirror::grants::Grants::new(&m.data_dir)
            .list()
            .map_err(|e| format!("{e:#}"))?;
        let mut used = serde_json::Map::new();
        for id in grants.keys() {
            let bytes = m.keeper.used(id).await.map_err(|e| e.to_string())?;
            used.insert(id.to_string(), serde_json::json!(bytes));
        }
        Ok(serde_json::json!({
            "sealed_seq": m.owner.sealed_seq(),
            "mirrors": m.owner.push_status(),
            "used": used,
            "following": m.reader.status(),
            "device_pushes": m.device.as_ref().map(|d| d.push_status()),
        }))
    }

    /// Inviter side of `POST /.well-known/plait/join`.
    pub async fn admit(&self, body: &[u8]) -> Result<JoinGrant, JoinError> {
        let req: JoinRequest =
            serde_json::from_slice(body).map_err(|e| JoinError::Malformed(e.to_string()))?;
        self.node.admit(req).await.map_err(|e| match e {
            NodeError::Stopped => JoinError::Stopped,
            refused => JoinError::Refused(refused),
        })
    }

    /// `plait device join`: joins the network of `link`'s inviter.
    pub(crate) async fn join_link(&self, link: &str) -> Result<serde_json::Value, String> {
        self.join(link).await
    }

    /// Invitee side: presents `link` to the inviter and takes what it grants. A link not
    /// signed by the inviter it names is refused before anything is sent or kept; so is a
    /// grant that is not that inviter's (`JoinGrant::check`), and the node then dials that
    /// inviter's identity only.
    async fn join(&self, link: &str) -> Result<serde_json::Value, String> {
        let invite = Invite::from_link(link).map_err(|e| e.to_string())?;
        let req = self
            .node
            .join_request(&self.keys, invite.clone())
            .await
            .map_err(|e| e.to_string())?;
        let uri: http::Uri = invite
            .join_url
            .parse()
            .map_err(|e| format!("the invite's join URL: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("the invite's join URL {uri} is not http://"));
        }
        let mut http_req = http::Request::new(Full::new(Bytes::from(
            serde_json::to_vec(&req).expect("serializes"),
        )));
        *http_req.method_mut() = http::Method::POST;
        *http_req.uri_mut() = uri.clone();
        http_req.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        let resp = tokio::time::timeout(std::time::Duration::from_secs(20), self.client.request(http_req))
            .await
            .map_err(|_| format!("{uri} did not answer in time"))?
            .map_err(|e| format!("cannot reach the inviter at {uri}: {e}"))?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), 4 << 20)
            .collect()
            .await
            .map_err(|e| format!("reading the inviter's answer: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "the inviter refused: {} {}",
                status.as_u16(),
                String::from_utf8_lossy(&body).trim()
            ));
        }
        let grant: JoinGrant =
            serde_json::from_slice(&body).map_err(|e| format!("the inviter's answer: {e}"))?;
        let (dht, inviter) = (grant.dht.clone(), grant.inviter);
        self.node
            .joined(&invite, grant)
            .await
            .map_err(|e| e.to_string())?;
        Ok(serde_json::json!({ "dht": dht, "inviter": inviter }))
    }

    /// `plait mirror follow`: joins the network of the link's inviter unless it is a
    /// member already, and follows `owner`'s chain there (without a link: on the mirrors
    /// its record names).
    async fn follow(&self, owner: &str, link: Option<&str>) -> Result<serde_json::Value, String> {
        let m = self.mirror.as_ref().ok_or("this server runs no mirror")?;
        let owner: Identity = owner
            .parse()
            .map_err(|e| format!("{owner:?} is not an identity: {e}"))?;
        if owner == self.keys.identity() {
            return Err("this server is that owner: it reads its own namespace".into());
        }
        let mirror = match link {
            Some(link) => {
                let invite = Invite::from_link(link).map_err(|e| e.to_string())?;
                if !self.node.is_member(&invite.inviter) {
                    self.join(link).await?;
                }
                Some(invite.inviter)
            }
            None => None,
        };
        crate::mirror::reader::add_follow(&m.data_dir, owner, mirror).map_err(|e| format!("{e:#}"))?;
        m.reader.wake();
        Ok(serde_json::json!({
            "owner": owner,
            "mirror": mirror,
            "recipient": m.owner.seal().current.recipient().to_string(),
        }))
    }

    /// Carries out one admin request (the admin socket's, or the owner's dashboard's).
    pub(crate) async fn handle(&self, req: AdminRequest) -> Result<serde_json::Value, String> {
        match req {
            AdminRequest::Invite { dht, uses, ttl_secs } => {
                if uses == 0 {
                    return Err("an invite needs at least one use".into());
                }
                let inv = self
                    .node
                    .invite(dht, self.join_url.clone(), ttl_secs, uses)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(
                    serde_json::json!({ "link": inv.to_link(), "dht": inv.dht, "expires_at": inv.expires_at, "uses": uses }),
                )
            }
            AdminRequest::Join { link } => self.join(&link).await,
            AdminRequest::MirrorAdd { link } => self.add_mirror(&link).await,
            AdminRequest::MirrorStatus => self.mirror_status().await,
            AdminRequest::MirrorFollow { owner, link } => self.follow(&owner, link.as_deref()).await,
            AdminRequest::DeviceRevoke { id } => {
                let m = self.mirror.as_ref().ok_or("this server runs no mirror")?;
                let device = id
                    .parse()
                    .map_err(|e| format!("{id:?} is not an identity: {e}"))?;
                let show = |e: anyhow::Error| format!("{e:#}");
                let rotated = crate::mirror::devices::revoke(&m.data_dir, device, crate::mirror::now_ms())
                    .map_err(show)?;
                m.owner
                    .set_seal(crate::mirror::devices::load_seal(&m.data_dir).map_err(show)?);
                // Told now, so that the mirrors refuse the device's next push; the pushers
                // tell those that could not be reached when they answer again.
                let (mut told, mut not_told) = (Vec::new(), Vec::new());
                let devices = crate::mirror::devices::devices(&m.data_dir).map_err(show)?;
                for mirror in crate::mirror::owner::mirrors(&m.data_dir)
                    .map_err(show)?
                    .into_keys()
                {
                    match m.owner.tell_revoked(&self.node, &devices, mirror, true).await {
                        Ok(_) => told.push(mirror),
                        Err(e) => not_told.push(serde_json::json!({ "id": mirror, "error": e })),
                    }
                }
                Ok(
                    serde_json::json!({ "revoked": id, "rotated": rotated, "mirrors_told": told, "mirrors_not_told": not_told }),
                )
            }
            AdminRequest::DeviceLink { ttl_secs, invite } => {
                let m = self.mirror.as_ref().ok_or("this server runs no mirror")?;
                let mirrors = crate::mirror::owner::mirrors(&m.data_dir)
                    .map_err(|e| format!("{e:#}"))?
                    .into_keys()
                    .collect();
                let l = crate::mirror::devices::link(
                    &self.node,
                    &self.keys,
                    &m.owner.seal_key(),
                    mirrors,
                    ttl_secs,
                    invite,
                    crate::mirror::now_ms(),
                )
                .await?;
                let reload = |e: anyhow::Error| format!("{e:#}");
                crate::mirror::devices::register(&m.data_dir, l.device, l.entry.clone()).map_err(reload)?;
                m.owner
                    .set_seal(crate::mirror::devices::load_seal(&m.data_dir).map_err(reload)?);
                Ok(serde_json::json!({
                    "link": l.link.to_string(),
                    "device": l.device,
                    "expires_ms": l.link.expires_ms,
                    "kept_by": l.kept_by,
                    "refused": l.refused.iter().map(|(m, r)| serde_json::json!({"id": m, "error": r})).collect::<Vec<_>>(),
                }))
            }
            AdminRequest::Status => {
                let mut v = serde_json::to_value(self.node.status()).expect("serializes");
                if let (Some(o), Some(h)) = (v.as_object_mut(), self.mirror_health().await) {
                    o.insert("mirror".into(), h);
                }
                Ok(v)
            }
            AdminRequest::Members => {
                let all = self.node.members().await.map_err(|e| e.to_string())?;
                Ok(serde_json::json!({ "dhts": all }))
            }
            AdminRequest::Remove { id, dht } => {
                let member = id
                    .parse()
                    .map_err(|e| format!("{id:?} is not an identity: {e}"))?;
                let from = self.node.remove(member, dht).await.map_err(|e| e.to_string())?;
                Ok(serde_json::json!({ "removed": id, "from": from }))
            }
            AdminRequest::Resolve { id } => {
                let id = id
                    .parse()
                    .map_err(|e| format!("{id:?} is not an identity: {e}"))?;
                let r = self.node.resolve(id).await.map_err(|e| e.to_string())?;
                Ok(serde_json::to_value(r).expect("serializes"))
            }
            AdminRequest::Connect { addr } => {
                let a = addr
                    .parse()
                    .map_err(|e| format!("{addr:?} is not a multiaddr: {e}"))?;
                let id = self.node.connect(a).await.map_err(|e| e.to_string())?;
                Ok(serde_json::json!({ "connected": id }))
            }
        }
    }
}

/// Serves the admin socket in `data_dir` until `shutdown`.
pub async fn serve_admin(data_dir: &Path, p2p: Arc<P2p>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let path = data_dir.join(ADMIN_SOCKET);
    if UnixStream::connect(&path).await.is_ok() {
        anyhow::bail!(
            "{} is in use: another plait serves this data dir's admin socket",
            path.display()
        );
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin socket accept failed");
                        continue;
                    }
                },
            };
            let p2p = p2p.clone();
            tokio::spawn(async move {
                if let Err(e) = admin_connection(stream, &p2p).await {
                    tracing::debug!(error = %e, "admin connection ended");
                }
            });
        }
        let _ = std::fs::remove_file(&path);
    });
    Ok(())
}

async fn admin_connection(stream: UnixStream, p2p: &P2p) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r.take(MAX_ADMIN_LINE as u64 + 1)).lines();
    while let Some(line) = lines.next_line().await? {
        let answer = match serde_json::from_str::<AdminRequest>(&line) {
            Ok(req) => match p2p.handle(req).await {
                Ok(result) => AdminResponse {
                    ok: true,
                    result,
                    error: None,
                },
                Err(e) => AdminResponse {
                    ok: false,
                    result: serde_json::Value::Null,
                    error: Some(e),
                },
            },
            Err(e) => AdminResponse {
                ok: false,
                result: serde_json::Value::Null,
                error: Some(format!("bad admin request: {e}")),
            },
        };
        let mut out = serde_json::to_vec(&answer).expect("serializes");
        out.push(b'\n');
        w.write_all(&out).await?;
    }
    Ok(())
}

/// Client side, for the CLI: sends `req` to the server running on `data_dir`.
pub async fn admin_request(data_dir: &Path, req: &AdminRequest) -> anyhow::Result<serde_json::Value> {
    let path: PathBuf = data_dir.join(ADMIN_SOCKET);
    let stream = UnixStream::connect(&path).await.with_context(|| {
        format!(
            "no running plait found at {} (start `plait serve --data-dir {}` with p2p on)",
            path.display(),
            data_dir.display()
        )
    })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let answer = BufReader::new(r)
        .lines()
        .next_line()
        .await?
        .context("the server closed the admin socket without answering")?;
    let a: AdminResponse = serde_json::from_str(&answer)?;
    if a.ok {
        Ok(a.result)
    } else {
        anyhow::bail!(a.error.unwrap_or_else(|| "failed".into()))
    }
}
