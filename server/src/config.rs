//! Settings: defaults, then a TOML file (`--config`), then `PLAIT_*` environment
//! variables, then command-line flags — each overriding the one before.
//!
//! Every limit is a named setting with a default, and is published at
//! `/.well-known/plait`. Nested settings are set from the environment with `__`, e.g.
//! `PLAIT_LIMITS__MAX_BODY_BYTES=1048576`. `DATABASE_URL` is honoured too, below
//! `PLAIT_DATABASE_URL`.
//!
//! ```toml
//! listen = "127.0.0.1:7524"
//! data_dir = "/var/lib/plait"
//! database_url = "postgres://plait@localhost/plait"
//!
//! [limits]
//! max_body_bytes = 10485760
//! max_connections = 10000
//! idle_timeout_secs = 60
//!
//! [tls]
//! cert = "/etc/plait/fullchain.pem"
//! key = "/etc/plait/privkey.pem"
//! redirect_listen = "0.0.0.0:80"
//! ```

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The port `plait serve` listens on by default ("plait" on a phone keypad starts 7-5-2-4).
pub const DEFAULT_PORT: u16 = 7524;

/// All settings of `plait serve`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on; port 0 picks a free port.
    pub listen: String,
    /// Where the identity key and the embedded store live. Default: the platform's data
    /// directory (`~/.local/share/plait` on Linux).
    pub data_dir: Option<PathBuf>,
    /// Postgres to store everything in; without it the embedded store is used.
    pub database_url: Option<String>,
    /// Postgres connections in the pool.
    pub database_pool: usize,
    /// `text` or `json` log lines.
    pub log_format: LogFormat,
    /// What is logged: a level (`error`, `warn`, `info`, `debug`, `trace`) or `tracing`
    /// directives (`info,plait_server::http=debug`). `RUST_LOG`, when set, wins.
    pub log_level: String,
    /// Prometheus metrics (`[metrics]`): their path, and a listener of their own.
    pub metrics: MetricsSettings,
    pub limits: Limits,
    pub engine: EngineSettings,
    /// Path prefixes served by other servers (`[[proxy]]` tables; `--proxy PREFIX=URL`).
    pub proxy: Vec<ProxyRoute>,
    /// A directory of static files served at `/` (for paths that name a file in it).
    pub web_dir: Option<PathBuf>,
    /// The URL other machines reach this server's HTTP at (put in invite links); default:
    /// the address it listens on.
    pub public_url: Option<String>,
    /// The peer-to-peer node (`[p2p]`): listen addresses, DHT name, connection limits.
    pub p2p: plait_bridge::types::NodeSettings,
    /// Who may do what (`[access]`): public writes, sessions, login limits, signatures, CORS.
    pub access: crate::access::AccessSettings,
    /// The E2EE mirror (`[mirror]`): how changes are batched into sealed segments.
    pub mirror: crate::mirror::MirrorSettings,
    /// The admin dashboard's status resources (`[dashboard]`): how often they change.
    pub dashboard: crate::status::DashboardSettings,
    /// Reverse proxies in front of this server (IP addresses or CIDR networks): only their
    /// `Forwarded` / `X-Forwarded-*` headers are believed, and connections from them are
    /// not counted per address. Default: none.
    pub trusted_proxies: Vec<String>,
    /// HTTPS on `listen` (`[tls]`): certificate and key files, the redirect listener.
    pub tls: TlsSettings,
}

/// HTTPS: with `cert` and `key`, `listen` serves HTTPS only (HTTP/2 and HTTP/1.1 by ALPN).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// The certificate chain, PEM, the server's certificate first (`fullchain.pem`).
    pub cert: Option<PathBuf>,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// How often the two files are checked for changes (a new pair is loaded without a
    /// restart; SIGHUP loads it at once).
    pub reload_interval_secs: u64,
    /// A plain-HTTP listener (e.g. `0.0.0.0:80`) that answers every request with a 308
    /// redirect to the same path over HTTPS. Default: none. With ACME it also answers the
    /// HTTP-01 challenges, so ACME needs it (on port 80 for a public CA).
    pub redirect_listen: Option<String>,
    /// Domains to get a certificate for by ACME (`--acme`), instead of `cert` and `key`.
    /// One certificate covers them all. Default: none.
    pub acme_domains: Vec<String>,
    /// The ACME directory URL. Default: Let's Encrypt production.
    pub acme_directory: String,
    /// A contact address given to the CA with the account (expiry warnings). Default: none.
    pub acme_email: Option<String>,
    /// A PEM root certificate to verify the ACME server's own HTTPS with, instead of the
    /// usual web roots (a test CA such as pebble). Default: none.
    pub acme_ca_file: Option<PathBuf>,
    /// A new certificate is ordered when the kept one expires within this many days.
    pub acme_renew_before_days: u64,
    /// How often the certificate's expiry is checked (and a failed order retried).
    pub acme_check_interval_secs: u64,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            cert: None,
            key: None,
            reload_interval_secs: 60,
            redirect_listen: None,
            acme_domains: Vec::new(),
            acme_directory: "https://acme-v02.api.letsencrypt.org/directory".into(),
            acme_email: None,
            acme_ca_file: None,
            acme_renew_before_days: 30,
            acme_check_interval_secs: 12 * 3600,
        }
    }
}

impl TlsSettings {
    /// Whether HTTPS is on.
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.acme()
    }

    /// Whether the certificate comes from ACME.
    pub fn acme(&self) -> bool {
        !self.acme_domains.is_empty()
    }
}

/// A path prefix forwarded to an upstream origin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyRoute {
    /// Requests whose path starts with this go upstream (the longest matching prefix wins).
    pub prefix: String,
    /// `http://host:port`; the request's path and query are kept as they are.
    pub upstream: String,
    /// The upstream does not speak Braid: Plait polls it for subscribers.
    #[serde(default)]
    pub live: bool,
    /// How often a live route is polled, while anyone subscribes.
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
}

fn default_poll_ms() -> u64 {
    1000
}

impl std::str::FromStr for ProxyRoute {
    type Err = String;

    /// `PREFIX=URL` (the command line form).
    fn from_str(s: &str) -> Result<Self, String> {
        let (prefix, upstream) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: a route is PREFIX=URL"))?;
        Ok(ProxyRoute {
            prefix: prefix.to_string(),
            upstream: upstream.to_string(),
            live: false,
            poll_interval_ms: default_poll_ms(),
        })
    }
}

/// Limits on what clients may do ("speed bumps").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request body accepted (413 above it).
    pub max_body_bytes: usize,
    /// Connections served at once (websockets included); past it a new connection is
    /// answered 503 with Retry-After. 0 (the default): from the open-files limit, see
    /// [`connections_for_open_files`].
    pub max_connections: usize,
    /// Requests (subscriptions) one HTTP/2 connection may have open at once; an HTTP/1.1
    /// connection has one at a time.
    pub max_streams_per_connection: u32,
    /// Time a client has to send its request headers.
    pub header_read_timeout_secs: u64,
    /// On SIGTERM, how long open requests get to finish before the server exits.
    pub shutdown_grace_secs: u64,
    /// Time to connect to an upstream before answering 502.
    pub proxy_connect_timeout_ms: u64,
    /// Time for an upstream to start its answer before answering 504.
    pub proxy_response_timeout_ms: u64,
    /// Idle upstream connections are kept this long for reuse.
    pub proxy_idle_timeout_secs: u64,
    /// Largest request body forwarded to an upstream (413 above it).
    pub max_proxy_body_bytes: u64,
    /// After the last local subscriber leaves, the shared upstream subscription (or poller)
    /// stays this long, for subscribers that come right back.
    pub proxy_subscription_grace_ms: u64,
    /// Sustained writes per second per writer (an identity, or a client address);
    /// 0 = unlimited. Over it: 429 with Retry-After.
    pub writes_per_second: u32,
    /// Writes a writer may make at once above the sustained rate.
    pub write_burst: u32,
    /// Sustained bytes written per second per writer (the owner aside); 0 = unlimited.
    /// Over it: 429 with Retry-After.
    pub write_bytes_per_second: u64,
    /// Bytes a writer may write at once above that rate; no one write may be larger (413).
    /// At least `max_body_bytes` while `write_bytes_per_second` is on.
    pub write_bytes_burst: u64,
    /// CPU milliseconds per second that applying a writer's writes may cost on average
    /// (the owner aside; measured per write, charged after it); 0 = unlimited. A writer
    /// owing more than `document_work_burst_ms` gets 429 with Retry-After until paid off.
    pub document_work_ms_per_second: u32,
    /// Milliseconds of document work a writer may owe and still write.
    pub document_work_burst_ms: u32,
    /// Bytes one namespace (an identity's tree of state) may occupy in storage; 0 =
    /// unlimited. Over it: 507.
    pub max_stored_bytes_per_namespace: u64,
    /// Bytes the resources one account or identity created may occupy in storage (history
    /// included); the owner has none; 0 = unlimited. Over it: 507.
    pub max_stored_bytes_per_identity: u64,
    /// Deepest nesting of the JSON a write builds: a whole body, or what its patches
    /// (Braid `Patches: N`, `Content-Range: json`, Statebus patches) make of the value.
    /// At most 128 (serde_json's parser limit). Over it: 413, nothing stored.
    pub max_json_depth: usize,
    /// Most patches in one write (Braid `Patches: N`, a Statebus `patches` list). Over it:
    /// 413. At most 10,000 (the Braid codec's own bound).
    pub max_patches_per_request: usize,
    /// Connections one client address may hold at once (websockets included). Over it a
    /// new connection is answered 503 with Retry-After.
    pub max_connections_per_address: usize,
    /// A connection with no request in flight for this long is closed: an idle keep-alive
    /// HTTP/1.1 connection, an HTTP/2 connection without streams, a socket that never sent
    /// a whole request (or HTTP/2 preface). An open subscription is a request in flight.
    pub idle_timeout_secs: u64,
    /// Longest wait for the next piece of a request body; a body that stalls longer fails
    /// its request.
    pub body_read_timeout_secs: u64,
    /// HTTP/2 connections and websockets are pinged this often, so a peer that vanished
    /// is noticed even while its subscriptions are open.
    pub ping_interval_secs: u64,
    /// A ping not answered within this (a websocket: nothing received for the interval
    /// plus this) closes the connection.
    pub ping_timeout_secs: u64,
    /// Keys one Statebus websocket may follow at once (each `get` of a new key holds a
    /// subscription until `forget` or close); past it a `get` is refused with a reason.
    pub max_statebus_subscriptions: usize,
    /// An HTTP request refused for going too fast (429), and a connection past
    /// `max_connections_per_address` (503), is answered this long after it was refused,
    /// so a client that ignores `Retry-After` and asks again at once costs a waiting task,
    /// not a request's (or a connection's) work, each time; 0 = at once.
    pub rate_limited_delay_ms: u64,
    /// Malformed or oversized requests (400, 413, 414, 431) one client address is answered
    /// at once in a second; past it their answers wait `rate_limited_delay_ms`; 0 = never.
    pub bad_requests_per_second_per_address: u32,
    /// Statebus messages read per second from one client address, over all its websockets
    /// (a burst of two seconds' worth is allowed at once); past it the server reads that
    /// address's messages more slowly (TCP pushes back on the client); 0 = unlimited.
    pub statebus_messages_per_second_per_address: u32,
    /// Time a new connection has to finish its TLS handshake (HTTPS only); a connection
    /// holds its place under the connection caps meanwhile.
    pub tls_handshake_timeout_secs: u64,
    /// Requests one Braid multiplexer may carry at once (a browser page's subscriptions
    /// share one); past it a request is answered 429 with Retry-After through it.
    pub max_requests_per_multiplexer: usize,
    /// Braid multiplexers one client address may hold open at once (about one per open
    /// page); past it opening one is answered 429 and the client uses plain requests.
    pub max_multiplexers_per_address: usize,
    /// How long a request naming a multiplexer not yet open waits for it (the client
    /// sends its first request without waiting for the `POST`) before it is answered 424.
    pub multiplexer_wait_ms: u64,
    /// Work that may hold a core for long (password hashing; document work on writes and
    /// loads over 256 KiB) runs this many nice steps below requests, so that a flood of it
    /// slows itself rather than everyone; 0 runs it at the requests' priority. 0 to 19.
    pub heavy_work_nice: i32,
    /// Heavy document work (not password hashing) also runs under Linux's `SCHED_IDLE`
    /// policy: a request's thread that wakes takes its core at once, and that work runs
    /// on what requests leave.
    pub heavy_work_idle: bool,
}

/// Memory and batching of live documents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSettings {
    /// Events a subscriber may fall behind before it gets one coalesced update instead.
    pub subscriber_queue: usize,
    /// Documents kept in memory while unused.
    pub warm_resources: usize,
    /// Changes after which a document is snapshotted and its change log compacted (once
    /// their bytes also reach the last snapshot's size: see `engine::actor::compaction`).
    pub snapshot_every: usize,
    /// Milliseconds the correction to a simpleton client's own edit waits, so the client
    /// has its PUT's answer first (braid-text's server waits likewise).
    pub correction_delay_ms: u64,
}

/// Where the Prometheus text is served.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Its path on the HTTP listener, where only the owner may read it (a state resource
    /// of that path is then out of reach over HTTP); `""` serves no metrics there.
    pub path: String,
    /// An address of its own (`127.0.0.1:9464`) serving the same path to anyone who can
    /// reach it, for a Prometheus without the owner's token. Default: none.
    pub listen: Option<String>,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            path: "/metrics".into(),
            listen: None,
        }
    }
}

impl MetricsSettings {
    /// The path on the separate listener: `path`, or `/metrics` when the HTTP listener
    /// serves none.
    pub fn listener_path(&self) -> &str {
        match self.path.as_str() {
            "" => "/metrics",
            p => p,
        }
    }
}

/// Paths the server routes itself, which `[metrics] path` may not take.
const ROUTED_PATHS: &[&str] = &[
    "/",
    "/.well-known/plait",
    "/.well-known/plait/join",
    "/_connect_to_statebus_/websocket",
];

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: format!("127.0.0.1:{DEFAULT_PORT}"),
            data_dir: None,
            database_url: None,
            database_pool: 16,
            log_format: LogFormat::Text,
            log_level: "info".into(),
            metrics: MetricsSettings::default(),
            limits: Limits::default(),
            engine: EngineSettings::default(),
            proxy: Vec::new(),
            web_dir: None,
            public_url: None,
            p2p: plait_bridge::types::NodeSettings::default(),
            access: crate::access::AccessSettings::default(),
            mirror: crate::mirror::MirrorSettings::default(),
            dashboard: crate::status::DashboardSettings::default(),
            trusted_proxies: Vec::new(),
            tls: TlsSettings::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 10 << 20,
            max_connections: 0,
            max_streams_per_connection: 256,
            header_read_timeout_secs: 30,
            shutdown_grace_secs: 10,
            proxy_connect_timeout_ms: 5_000,
            proxy_response_timeout_ms: 30_000,
            proxy_idle_timeout_secs: 90,
            max_proxy_body_bytes: 100 << 20,
            proxy_subscription_grace_ms: 5_000,
            writes_per_second: crate::engine::WriteLimits::default().writes_per_second,
            write_burst: crate::engine::WriteLimits::default().write_burst,
            write_bytes_per_second: crate::engine::WriteLimits::default().write_bytes_per_second,
            write_bytes_burst: crate::engine::WriteLimits::default().write_bytes_burst,
            document_work_ms_per_second: crate::engine::WriteLimits::default().document_work_ms_per_second,
            document_work_burst_ms: crate::engine::WriteLimits::default().document_work_burst_ms,
            max_stored_bytes_per_namespace: crate::engine::WriteLimits::default()
                .max_stored_bytes_per_namespace,
            max_stored_bytes_per_identity: crate::engine::WriteLimits::default()
                .max_stored_bytes_per_identity,
            max_json_depth: crate::engine::WriteLimits::default().max_json_depth,
            max_patches_per_request: crate::engine::WriteLimits::default().max_patches_per_request,
            max_connections_per_address: 256,
            idle_timeout_secs: 60,
            body_read_timeout_secs: 30,
            ping_interval_secs: 30,
            ping_timeout_secs: 20,
            max_statebus_subscriptions: 10_000,
            rate_limited_delay_ms: 1_000,
            bad_requests_per_second_per_address: 10,
            statebus_messages_per_second_per_address: 1_000,
            tls_handshake_timeout_secs: 10,
            max_requests_per_multiplexer: 1_000,
            max_multiplexers_per_address: 32,
            multiplexer_wait_ms: 10,
            heavy_work_nice: crate::cpu::DEFAULT_NICE,
            heavy_work_idle: true,
        }
    }
}

impl Default for EngineSettings {
    fn default() -> Self {
        let e = crate::engine::EngineConfig::default();
        EngineSettings {
            subscriber_queue: e.subscriber_queue,
            warm_resources: e.warm_resources,
            snapshot_every: e.snapshot_every,
            correction_delay_ms: e.correction_delay.as_millis() as u64,
        }
    }
}

impl Config {
    /// The engine's part of the settings.
    pub fn engine_config(&self) -> crate::engine::EngineConfig {
        crate::engine::EngineConfig {
            subscriber_queue: self.engine.subscriber_queue,
            warm_resources: self.engine.warm_resources,
            snapshot_every: self.engine.snapshot_every,
            correction_delay: std::time::Duration::from_millis(self.engine.correction_delay_ms),
            limits: crate::engine::WriteLimits {
                writes_per_second: self.limits.writes_per_second,
                write_burst: self.limits.write_burst,
                write_bytes_per_second: self.limits.write_bytes_per_second,
                write_bytes_burst: self.limits.write_bytes_burst,
                document_work_ms_per_second: self.limits.document_work_ms_per_second,
                document_work_burst_ms: self.limits.document_work_burst_ms,
                max_stored_bytes_per_namespace: self.limits.max_stored_bytes_per_namespace,
                max_stored_bytes_per_identity: self.limits.max_stored_bytes_per_identity,
                max_json_depth: self.limits.max_json_depth,
                max_patches_per_request: self.limits.max_patches_per_request,
            },
            ..Default::default()
        }
    }
}

/// Settings given on the command line (only those present override).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub web_dir: Option<PathBuf>,
    /// Routes from the command line, added to those of the file.
    #[serde(skip)]
    pub proxy: Vec<ProxyRoute>,
    /// `--p2p-listen` addresses: when given, they replace the configured ones.
    #[serde(skip)]
    pub p2p_listen: Vec<String>,
    /// `--p2p-relay` addresses, added to the configured ones.
    #[serde(skip)]
    pub p2p_relays: Vec<String>,
    /// `--no-p2p`.
    #[serde(skip)]
    pub no_p2p: bool,
    /// `--public-writes`.
    #[serde(skip)]
    pub public_writes: bool,
    /// `--tls-cert`.
    #[serde(skip)]
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key`.
    #[serde(skip)]
    pub tls_key: Option<PathBuf>,
    /// `--acme` (replaces `tls.acme_domains` when given).
    #[serde(skip)]
    pub acme: Vec<String>,
    /// `--redirect-listen`.
    #[serde(skip)]
    pub redirect_listen: Option<String>,
}

/// Top-level settings the environment may set (`PLAIT_<NAME>`); nested ones use `__`.
const ENV_SETTINGS: &[&str] = &[
    "listen",
    "data_dir",
    "database_url",
    "database_pool",
    "log_format",
    "log_level",
    "public_url",
    "trusted_proxies",
];

impl Config {
    /// Loads settings from the layers described in the module docs.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, String> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(format!("config file {} does not exist", path.display()));
            }
            fig = fig.merge(Toml::file_exact(path));
        }
        fig = fig
            .merge(Env::raw().only(&["DATABASE_URL"]))
            .merge(
                Env::prefixed("PLAIT_")
                    .filter(|k| {
                        let k = k.as_str().to_ascii_lowercase();
                        ENV_SETTINGS.contains(&k.as_str())
                            || k.starts_with("limits__")
                            || k.starts_with("engine__")
                            || k.starts_with("p2p__")
                            || k.starts_with("access__")
                            || k.starts_with("tls__")
                            || k.starts_with("metrics__")
                            || k.starts_with("mirror__")
                    })
                    .split("__"),
            )
            .merge(Serialized::defaults(overrides));
        let mut cfg: Config = fig.extract().map_err(|e| format!("bad settings: {e}"))?;
        cfg.proxy.extend(overrides.proxy.iter().cloned());
        if !overrides.p2p_listen.is_empty() {
            cfg.p2p.listen = overrides.p2p_listen.clone();
        }
        cfg.p2p.relays.extend(overrides.p2p_relays.iter().cloned());
        if overrides.no_p2p {
            cfg.p2p.enabled = false;
        }
        if overrides.public_writes {
            cfg.access.public_writes = true;
        }
        if let Some(cert) = &overrides.tls_cert {
            cfg.tls.cert = Some(cert.clone());
        }
        if let Some(key) = &overrides.tls_key {
            cfg.tls.key = Some(key.clone());
        }
        if !overrides.acme.is_empty() {
            cfg.tls.acme_domains = overrides.acme.clone();
        }
        if let Some(addr) = &overrides.redirect_listen {
            cfg.tls.redirect_listen = Some(addr.clone());
        }
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), String> {
        if self.limits.max_connections_per_address == 0 {
            return Err("limits.max_connections_per_address must be at least 1".into());
        }
        let depth = crate::doc::json::MAX_JSON_DEPTH;
        if !(1..=depth).contains(&self.limits.max_json_depth) {
            return Err(format!("limits.max_json_depth must be 1 to {depth}"));
        }
        let l = &self.limits;
        if l.write_bytes_per_second > 0 && l.write_bytes_burst < l.max_body_bytes as u64 {
            return Err(format!(
                "limits.write_bytes_burst ({}) must be at least limits.max_body_bytes ({}) while \
                 limits.write_bytes_per_second is on, or no body that large could be written",
                l.write_bytes_burst, l.max_body_bytes
            ));
        }
        let patches = crate::braid::patch::MAX_PATCHES;
        if !(1..=patches).contains(&self.limits.max_patches_per_request) {
            return Err(format!("limits.max_patches_per_request must be 1 to {patches}"));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err("tls.cert and tls.key (--tls-cert, --tls-key) go together".into());
        }
        if self.tls.redirect_listen.is_some() && !self.tls.enabled() {
            return Err("tls.redirect_listen (--redirect-listen) needs HTTPS: tls.cert and tls.key, or tls.acme_domains".into());
        }
        if self.tls.acme() {
            if self.tls.cert.is_some() {
                return Err("tls.acme_domains (--acme) and tls.cert (--tls-cert) exclude each other".into());
            }
            if self.tls.redirect_listen.is_none() {
                return Err("tls.acme_domains (--acme) needs tls.redirect_listen (--redirect-listen): ACME HTTP-01 challenges are answered there".into());
            }
            if self.tls.acme_check_interval_secs == 0 {
                return Err("tls.acme_check_interval_secs must be at least 1".into());
            }
        }
        if self.limits.tls_handshake_timeout_secs == 0 {
            return Err("limits.tls_handshake_timeout_secs must be at least 1".into());
        }
        if self.engine.subscriber_queue == 0 {
            return Err("engine.subscriber_queue must be at least 1".into());
        }
        self.p2p.check()?;
        self.mirror.check()?;
        let path = self.metrics.path.as_str();
        if !path.is_empty() && (!path.starts_with('/') || ROUTED_PATHS.contains(&path)) {
            return Err(format!(
                "metrics.path {path:?} must start with / and not be one of {ROUTED_PATHS:?}"
            ));
        }
        if let Some(addr) = &self.metrics.listen
            && addr.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(format!("metrics.listen {addr:?} must be an address:port"));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return Err(format!("log_level {:?}: {e}", self.log_level));
        }
        crate::http::forwarded::TrustedProxies::parse(&self.trusted_proxies)?;
        for r in &self.proxy {
            if !r.prefix.starts_with('/') {
                return Err(format!("proxy prefix {:?} must start with /", r.prefix));
            }
            let ok = r.upstream.parse::<http::Uri>().is_ok_and(|u| {
                u.scheme_str() == Some("http") && u.authority().is_some() && matches!(u.path(), "" | "/")
            });
            if !ok {
                return Err(format!(
                    "proxy upstream {:?} must be http://host:port (no path)",
                    r.upstream
                ));
            }
        }
        Ok(())
    }

    /// `trusted_proxies`, parsed (checked when the settings were loaded).
    pub fn trusted_proxies(&self) -> crate::http::forwarded::TrustedProxies {
        crate::http::forwarded::TrustedProxies::parse(&self.trusted_proxies).unwrap_or_default()
    }

    /// The data directory: configured, or the platform default.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(default_data_dir)
    }
}

/// The default `limits.max_connections` for a process that may open `open_files`
/// descriptors: `open_files − 256 − database_pool`, halved when `proxies` (proxy routes are
/// configured), at least 16. 256 descriptors are kept for files (the embedded store and its
/// journal, the lock, static files being sent, logs), the p2p node and the admin socket,
/// `database_pool` for Postgres; a proxied request or a websocket tunnel holds a second
/// socket upstream, so with proxy routes only half of the rest are clients'.
pub fn connections_for_open_files(open_files: u64, database_pool: usize, proxies: bool) -> usize {
    let spare = open_files.saturating_sub(256 + database_pool as u64);
    let spare = if proxies { spare / 2 } else { spare };
    usize::try_from(spare).unwrap_or(usize::MAX).max(16)
}

/// `~/.local/share/plait` on Linux (XDG), the platform's equivalent elsewhere.
pub fn default_data_dir() -> PathBuf {
    directories::ProjectDirs::from("", "", "plait")
        .map(|d| d.data_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from(".plait"))
}

#[cfg(test)]
// figment's test jail returns its own large error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn relays_come_from_file_and_flags_and_must_name_their_peer() {
        figment::Jail::expect_with(|jail| {
            let peer = "12D3KooWAbbZPU3PYGnAqFhDZXEBTv2rYXnYfQqNGozJUkcLiSty";
            jail.create_file(
                "plait.toml",
                &format!("[p2p]\nrelays = [\"/ip4/10.0.0.1/tcp/7525/p2p/{peer}\"]\n"),
            )?;
            let o = Overrides {
                p2p_relays: vec![format!("/dns4/relay.example/udp/7525/quic-v1/p2p/{peer}")],
                ..Default::default()
            };
            let c = Config::load(Some(Path::new("plait.toml")), &o).unwrap();
            assert_eq!(c.p2p.relays.len(), 2);
            let o = Overrides {
                p2p_relays: vec!["/ip4/10.0.0.1/tcp/7525".into()],
                ..Default::default()
            };
            let e = Config::load(None, &o).unwrap_err();
            assert!(e.contains("must be a multiaddr ending in /p2p/<peer id>"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn layers_override_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "plait.toml",
                "listen = \"127.0.0.1:1\"\n[limits]\nmax_body_bytes = 5\nmax_connections = 7\n",
            )?;
            jail.set_env("PLAIT_LIMITS__MAX_CONNECTIONS", "9");
            jail.set_env("DATABASE_URL", "postgres://low/db");
            jail.set_env("PLAIT_BIN", "/not/a/setting");
            let c = Config::load(Some(Path::new("plait.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.listen, "127.0.0.1:1");
            assert_eq!(c.limits.max_body_bytes, 5);
            assert_eq!(c.limits.max_connections, 9);
            assert_eq!(c.database_url.as_deref(), Some("postgres://low/db"));
            jail.set_env("PLAIT_DATABASE_URL", "postgres://high/db");
            let o = Overrides {
                listen: Some("127.0.0.1:2".into()),
                ..Default::default()
            };
            let c = Config::load(Some(Path::new("plait.toml")), &o).unwrap();
            assert_eq!(c.listen, "127.0.0.1:2");
            assert_eq!(c.database_url.as_deref(), Some("postgres://high/db"));
            Ok(())
        });
    }

    #[test]
    fn tls_comes_from_file_or_flags_and_needs_both_files() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "plait.toml",
                "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nredirect_listen = \"127.0.0.1:80\"\n",
            )?;
            let c = Config::load(Some(Path::new("plait.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.tls.cert.as_deref(), Some(Path::new("c.pem")));
            assert_eq!(c.tls.redirect_listen.as_deref(), Some("127.0.0.1:80"));
            let o = Overrides {
                tls_cert: Some("other.pem".into()),
                ..Default::default()
            };
            let c = Config::load(Some(Path::new("plait.toml")), &o).unwrap();
            assert_eq!(c.tls.cert.as_deref(), Some(Path::new("other.pem")));
            let e = Config::load(None, &o).unwrap_err();
            assert!(e.contains("go together"), "{e}");
            let o = Overrides {
                redirect_listen: Some("127.0.0.1:80".into()),
                ..Default::default()
            };
            let e = Config::load(None, &o).unwrap_err();
            assert!(e.contains("needs HTTPS"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn acme_needs_the_redirect_listener_and_excludes_certificate_files() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "plait.toml",
                "[tls]\nacme_domains = [\"a.example\"]\nacme_renew_before_days = 10\nredirect_listen = \"0.0.0.0:80\"\n",
            )?;
            let c = Config::load(Some(Path::new("plait.toml")), &Overrides::default()).unwrap();
            assert!(c.tls.enabled() && c.tls.acme());
            assert_eq!(c.tls.acme_renew_before_days, 10);
            assert!(c.tls.acme_directory.contains("letsencrypt.org"));
            let o = Overrides {
                acme: vec!["b.example".into()],
                ..Default::default()
            };
            let c = Config::load(Some(Path::new("plait.toml")), &o).unwrap();
            assert_eq!(c.tls.acme_domains, ["b.example"]);
            let e = Config::load(None, &o).unwrap_err();
            assert!(e.contains("needs tls.redirect_listen"), "{e}");
            let o = Overrides {
                acme: vec!["b.example".into()],
                tls_cert: Some("c.pem".into()),
                tls_key: Some("k.pem".into()),
                redirect_listen: Some("127.0.0.1:80".into()),
                ..Default::default()
            };
            let e = Config::load(None, &o).unwrap_err();
            assert!(e.contains("exclude each other"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn typos_in_the_file_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("plait.toml", "[limits]\nmax_body_byte = 5\n")?;
            let e = Config::load(Some(Path::new("plait.toml")), &Overrides::default()).unwrap_err();
            assert!(e.contains("max_body_byte"), "{e}");
            assert!(Config::load(Some(Path::new("missing.toml")), &Overrides::default()).is_err());
            Ok(())
        });
    }

    #[test]
    fn connections_leave_room_for_files_and_postgres() {
        assert_eq!(connections_for_open_files(1024, 16, true), 376);
        assert_eq!(connections_for_open_files(1024, 16, false), 752);
        assert_eq!(connections_for_open_files(1 << 20, 16, true), 524_152);
        // This machine's hard limit: room for 10,000 subscribers and their writer.
        assert_eq!(connections_for_open_files(20_000, 16, false), 19_728);
        assert_eq!(connections_for_open_files(100, 16, false), 16);
    }

    #[test]
    fn metrics_and_log_settings_are_checked() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "plait.toml",
                "log_level = \"debug\"\n[metrics]\npath = \"/m\"\nlisten = \"127.0.0.1:9464\"\n",
            )?;
            let c = Config::load(Some(Path::new("plait.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.metrics.path, "/m");
            assert_eq!(c.metrics.listen.as_deref(), Some("127.0.0.1:9464"));
            assert_eq!(c.log_level, "debug");
            jail.set_env("PLAIT_METRICS__PATH", "/.well-known/plait");
            let e = Config::load(Some(Path::new("plait.toml")), &Overrides::default()).unwrap_err();
            assert!(e.contains("metrics.path"), "{e}");
            jail.set_env("PLAIT_METRICS__PATH", "/metrics");
            jail.set_env("PLAIT_LOG_LEVEL", "info,=[");
            let e = Config::load(Some(Path::new("plait.toml")), &Overrides::default()).unwrap_err();
            assert!(e.contains("log_level"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn defaults_are_sane() {
        let c = Config::default();
        assert_eq!(c.limits.max_body_bytes, 10 * 1024 * 1024);
        assert!(c.listen.starts_with("127.0.0.1:"));
        assert!(c.database_url.is_none());
    }
}
