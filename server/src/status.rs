//! The owner's status resources: what the admin dashboard shows, as JSON documents
//! published under `/.well-known/plait/status/<section>` (see [`SECTIONS`]).
//!
//! Each section is a live document with versions: [`Status::subscribe`] hands out a
//! `watch` receiver that sees a new [`Published`] whenever the section's JSON changed.
//! One task recomputes, every `dashboard.status_interval_ms`, the sections someone is
//! subscribed to, and publishes those that changed, so a subscriber gets at most one
//! version per interval however busy the server is (changes in between are coalesced);
//! nothing is computed while nobody watches. The same task samples the live figures every
//! `dashboard.history_interval_secs` into a bounded history (`dashboard.history_points`)
//! for the dashboard's graphs.
//!
//! The figures come from where they are already kept: live connections, subscriptions and
//! deliveries from `metrics`, resources in memory and their subscribers from the engine,
//! stored bytes from storage, refusals from `refusals`, p2p status and members from the
//! node, mirrors and grants from the data dir and the mirror's two sides, tokens from
//! `access::tokens` (never their hashes). Knows nothing of HTTP, Braid bytes or who may
//! read a section: `http::dashboard` serves them to the owner only.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use plait_bridge::Identity;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;

/// The sections, each a status resource of its own. `all` holds every other section
/// under its name: a browser page follows it with one connection, since an HTTP/1.1 page
/// gets only six per origin and a subscription holds one.
pub const SECTIONS: &[&str] = &[
    "overview", "live", "storage", "network", "mirrors", "tokens", "refusals", "all",
];

/// `[dashboard]`: how the status resources are published.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DashboardSettings {
    /// A subscribed section is recomputed this often, and gets at most one new version
    /// per interval (changes in between are coalesced).
    pub status_interval_ms: u64,
    /// The live figures are sampled this often for the graphs.
    pub history_interval_secs: u64,
    /// Samples kept for the graphs.
    pub history_points: usize,
    /// Resources listed in the `live` section (the most subscribed first).
    pub max_resources_listed: usize,
}

impl Default for DashboardSettings {
    fn default() -> Self {
        DashboardSettings {
            status_interval_ms: 250,
            history_interval_secs: 2,
            history_points: 300,
            max_resources_listed: 50,
        }
    }
}

/// One version of a section.
#[derive(Debug, Clone)]
pub struct Published {
    /// From 1, per section and process (0: nothing published yet).
    pub seq: u64,
    /// The JSON document.
    pub body: Bytes,
}

/// Where the figures are read from.
pub struct Sources {
    pub engine: Engine,
    pub identity: Identity,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub refusals: Arc<crate::refusals::Refusals>,
    pub p2p: Option<Arc<crate::p2p::P2p>>,
    pub access: crate::access::Access,
    pub data_dir: PathBuf,
    pub public_url: Option<String>,
}

/// One sample of the live figures.
#[derive(Debug, Clone, Copy, Serialize)]
struct Sample {
    /// Unix time, ms.
    t: u64,
    connections: i64,
    subscriptions: i64,
    /// Deliveries since start (the graph shows the rate between samples).
    deliveries: u64,
}

/// The status resources of one server.
pub struct Status {
    sources: Sources,
    settings: DashboardSettings,
    sections: BTreeMap<&'static str, watch::Sender<Published>>,
    history: Mutex<VecDeque<Sample>>,
    started_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Status {
    pub fn new(sources: Sources, settings: DashboardSettings) -> Arc<Status> {
        let sections = SECTIONS
            .iter()
            .map(|s| {
                let empty = Published {
                    seq: 0,
                    body: Bytes::new(),
                };
                (*s, watch::channel(empty).0)
            })
            .collect();
        Arc::new(Status {
            sources,
            settings,
            sections,
            history: Mutex::new(VecDeque::new()),
            started_ms: now_ms(),
        })
    }

    /// `[dashboard]` (published at `/.well-known/plait`).
    pub fn settings(&self) -> &DashboardSettings {
        &self.settings
    }

    /// When this process started (unix ms): version ids carry it, so versions of two runs
    /// never look alike.
    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }

    /// Runs the publishing task until `shutdown`.
    pub fn start(self: &Arc<Self>, shutdown: CancellationToken) {
        let me = Arc::downgrade(self);
        let every = Duration::from_millis(self.settings.status_interval_ms.max(10));
        let sample_every = Duration::from_secs(self.settings.history_interval_secs.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sample = tokio::time::interval(sample_every);
            sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let sampling = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => false,
                    _ = sample.tick() => true,
                };
                let Some(me) = me.upgrade() else { return };
                if sampling {
                    me.sample();
                    continue;
                }
                for (name, tx) in &me.sections {
                    if tx.receiver_count() > 0 {
                        me.refresh(name).await;
                    }
                }
            }
        });
    }

    fn sample(&self) {
        let live = self.sources.metrics.live();
        let s = Sample {
            t: now_ms(),
            connections: live.connections,
            subscriptions: live.braid_subscriptions + live.statebus_subscriptions,
            deliveries: live.braid_deliveries + live.statebus_deliveries,
        };
        let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        while h.len() >= self.settings.history_points.max(1) {
            h.pop_front();
        }
        h.push_back(s);
    }

    /// Follows a section; `None` for a section that does not exist.
    pub fn subscribe(&self, section: &str) -> Option<watch::Receiver<Published>> {
        self.sections.get(section).map(watch::Sender::subscribe)
    }

    /// Computes a section now and publishes it if it changed; returns its current version.
    pub async fn refresh(&self, section: &str) -> Option<Published> {
        let tx = self.sections.get(section)?;
        let value = self.compute(section).await;
        let body = Bytes::from(serde_json::to_vec(&value).expect("JSON serializes"));
        tx.send_if_modified(|p| {
            if p.seq > 0 && p.body == body {
                return false;
            }
            p.seq += 1;
            p.body = body;
            true
        });
        Some(tx.borrow().clone())
    }

    async fn compute(&self, section: &str) -> Value {
        if section == "all" {
            let mut all = serde_json::Map::new();
            for name in SECTIONS.iter().filter(|n| **n != "all") {
                all.insert((*name).to_string(), Box::pin(self.compute(name)).await);
            }
            return Value::Object(all);
        }
        let s = &self.sources;
        match section {
            "overview" => json!({
                "id": s.identity.to_string(),
                "version": env!("CARGO_PKG_VERSION"),
                "store": s.engine.storage().backend(),
                "started_ms": self.started_ms,
                "public_url": s.public_url,
                // Rounded so the document does not change with every allocation.
                "rss_mib": crate::http::rss_bytes().map(|b| b / (1 << 20)),
                "p2p": s.p2p.is_some(),
                "sections": SECTIONS.iter().map(|n| format!("/.well-known/plait/status/{n}")).collect::<Vec<_>>(),
                "access_rules": format!("/{}", crate::access::RULES_URL_PATH),
                "invite": s.p2p.as_ref().map(|p| invite_help(p, &s.data_dir)),
            }),
            "live" => self.live(),
            "storage" => self.storage().await,
            "network" => match &s.p2p {
                None => json!({ "enabled": false }),
                Some(p) => {
                    let members = match p.node.members().await {
                        Ok(m) => json!(m),
                        Err(e) => json!({ "error": e.to_string() }),
                    };
                    json!({ "enabled": true, "status": p.node.status(), "members": members })
                }
            },
            "mirrors" => self.mirrors().await,
            "tokens" => match s.access.tokens().list() {
                Ok(list) => json!({
                    "tokens": list.into_iter().map(|t| json!({
                        "id": t.id,
                        "label": t.label,
                        "owner": t.is_owner(),
                        "read": t.read,
                        "write": t.write,
                        "created_secs": t.created_secs,
                        "expires_secs": t.expires_secs,
                    })).collect::<Vec<_>>(),
                }),
                Err(e) => json!({ "error": format!("{e:#}") }),
            },
            "refusals" => json!({
                "counts": s.refusals.snapshot(),
                "recent": s.refusals.recent(),
            }),
            _ => Value::Null,
        }
    }

    fn live(&self) -> Value {
        let s = &self.sources;
        let master = Some(s.access.accounts().master());
        let resources: Vec<Value> = s
            .engine
            .resources_outside(master)
            .into_iter()
            .take(self.settings.max_resources_listed)
            .map(|(k, n)| json!({ "path": s.access.url_path(&k), "subscriptions": n }))
            .collect();
        let history: Vec<Sample> = self
            .history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        json!({
            "figures": s.metrics.live(),
            "client_subscriptions": s.engine.subscriptions_outside(master),
            "resources_in_memory": s.engine.live_resources(),
            "resources": resources,
            "history_interval_secs": self.settings.history_interval_secs.max(1),
            "history": history,
        })
    }

    async fn storage(&self) -> Value {
        let s = &self.sources;
        let storage = s.engine.storage();
        let err = |e: crate::storage::StorageError| json!({ "error": e.to_string() });
        let stored = storage.stored_bytes().await.map_or_else(err, |n| json!(n));
        let own = storage
            .namespace_bytes(&s.identity)
            .await
            .map_or_else(err, |n| json!(n));
        let limits = s.engine.write_limits();
        json!({
            "backend": storage.backend(),
            "stored_bytes": stored,
            "instance_namespace_bytes": own,
            "max_stored_bytes_per_namespace": limits.max_stored_bytes_per_namespace,
            "max_stored_bytes_per_identity": limits.max_stored_bytes_per_identity,
            "pool": storage.pool_status().map(|p| json!({
                "max_size": p.max_size, "size": p.size, "available": p.available, "waiting": p.waiting,
            })),
        })
    }

    async fn mirrors(&self) -> Value {
        let s = &self.sources;
        let mirrors = crate::mirror::owner::mirrors(&s.data_dir)
            .map_or_else(|e| json!({ "error": format!("{e:#}") }), |m| json!(m));
        let grants = crate::mirror::grants::Grants::new(&s.data_dir)
            .list()
            .map_or_else(|e| json!({ "error": format!("{e:#}") }), |g| json!(g));
        let running = match &s.p2p {
            Some(p) => p.mirror_status().await.unwrap_or_else(|e| json!({ "error": e })),
            None => Value::Null,
        };
        json!({ "mirrors": mirrors, "grants": grants, "running": running })
    }
}

/// How to make an invite link, with this server's data dir filled in.
fn invite_help(p: &crate::p2p::P2p, data_dir: &std::path::Path) -> Value {
    json!({
        "command": format!("plait invite --data-dir {}", data_dir.display()),
        "networks": p.node.status().dhts.iter().filter_map(|d| d.dht.clone()).collect::<Vec<_>>(),
    })
}
