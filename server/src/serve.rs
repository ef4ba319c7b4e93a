//! `plait serve`: puts the parts together — data dir, identity, storage, engine, HTTP —
//! and runs until SIGINT or SIGTERM.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use fs4::fs_std::FileExt;
use plait_bridge::Keypair;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::Engine;
use crate::http::{self, App};
use crate::storage::postgres::PostgresStorage;
use crate::storage::sqlite::SqliteStorage;
use crate::storage::{CommitLimits, Storage};

/// File name of the instance key in the data dir.
pub const IDENTITY_FILE: &str = "identity.pem";
/// File name of the embedded store in the data dir.
pub const EMBEDDED_FILE: &str = "plait.db";
/// Setting naming the identity a database belongs to.
pub const OWNER_SETTING: &str = "instance_identity";

/// File name of the embedded store's lock in the data dir.
const LOCK_FILE: &str = "plait.lock";

/// Creates the data dir (mode 0700) or tightens an existing one, and loads or makes the
/// instance key (mode 0600; a key file others may read is refused).
pub fn open_identity(data_dir: &Path) -> anyhow::Result<(Keypair, bool)> {
    if !data_dir.exists() {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    }
    tighten(data_dir, 0o700)?;
    Ok(Keypair::load_or_create(&data_dir.join(IDENTITY_FILE))?)
}

/// Takes away from `path` (if it exists) any permission `mode` does not grant, with a
/// warning: the data dir holds the instance key, the store and the admin socket, which
/// are nobody else's to read.
fn tighten(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let have = meta.permissions().mode() & 0o777;
    if have & !mode != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(have & mode))
            .with_context(|| format!("restricting the permissions of {}", path.display()))?;
        tracing::warn!(
            path = %path.display(),
            was = format!("{have:o}"),
            now = format!("{:o}", have & mode),
            "tightened permissions: only this server's user may use the data dir"
        );
    }
    Ok(())
}

/// Creates `path` with mode 0600 if it does not exist, so it is never readable by others,
/// even for a moment; tightens it if it exists.
fn create_private(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    tighten(path, 0o600)?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

/// Takes the data dir's lock, which keeps a second process from serving (or restoring
/// into, or moving) an embedded store while one uses it; held while the file lives.
pub fn lock_data_dir(data_dir: &Path) -> anyhow::Result<std::fs::File> {
    let file = create_private(&data_dir.join(LOCK_FILE))?;
    if !file.try_lock_exclusive().unwrap_or(false) {
        bail!(
            "another plait server is using {} (its embedded store takes one process)",
            data_dir.display()
        );
    }
    Ok(file)
}

/// An opened instance: its key, its storage, and (embedded store) the lock that keeps other
/// processes out of the data dir for as long as this value lives.
pub struct Instance {
    pub keys: Arc<Keypair>,
    pub storage: Arc<dyn Storage>,
    pub data_dir: std::path::PathBuf,
    _lock: Option<std::fs::File>,
}

/// Opens the data dir, the identity and the store named by `cfg`, and checks that the
/// store belongs to this identity.
pub async fn open_instance(cfg: &Config) -> anyhow::Result<Instance> {
    let data_dir = cfg.data_dir();
    let (keys, created) = open_identity(&data_dir)?;
    let identity = keys.identity();
    if created {
        tracing::info!(%identity, path = %data_dir.join(IDENTITY_FILE).display(), "created a new instance identity");
    }
    let mut lock = None;
    let storage: Arc<dyn Storage> = match &cfg.database_url {
        Some(url) => Arc::new(
            PostgresStorage::connect(url, cfg.database_pool, CommitLimits::default())
                .await
                .context("connecting to Postgres")?,
        ),
        None => {
            lock = Some(lock_data_dir(&data_dir)?);
            // SQLite makes its journal files (-wal, -shm) with the store's own mode.
            let db = data_dir.join(EMBEDDED_FILE);
            drop(create_private(&db)?);
            for journal in ["-wal", "-shm"] {
                tighten(&data_dir.join(format!("{EMBEDDED_FILE}{journal}")), 0o600)?;
            }
            Arc::new(SqliteStorage::open(&db, CommitLimits::default()).context("opening the embedded store")?)
        }
    };
    match storage.get_setting(OWNER_SETTING).await? {
        None => storage.put_setting(OWNER_SETTING, &identity.to_string()).await?,
        Some(owner) if owner == identity.to_string() => {}
        Some(owner) => bail!(
            "this database belongs to instance {owner}, but {} holds the key of {identity}",
            data_dir.join(IDENTITY_FILE).display()
        ),
    }
    Ok(Instance {
        keys: Arc::new(keys),
        storage,
        data_dir,
        _lock: lock,
    })
}

/// Raises the soft limit on open files to the hard one (a server's connections are
/// files); returns the limit in force.
fn raise_open_files_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    // Linux refuses an unlimited soft limit for open files; 2^20 is its usual ceiling.
    let want = if lim.rlim_max == libc::RLIM_INFINITY {
        1 << 20
    } else {
        lim.rlim_max
    };
    if lim.rlim_cur < want {
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = want;
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not everywhere
    let open_files = lim.rlim_cur as u64;
    Some(open_files)
}

/// Runs the server until a signal arrives.
/// `reload` reads the settings again on SIGHUP (see [`crate::service`]).
pub async fn run(mut cfg: Config, reload: Option<crate::service::Reload>) -> anyhow::Result<()> {
    // Whatever this process creates (the store, its journals, the admin socket, files of
    // its libraries) is its user's alone.
    // SAFETY: umask only sets the process's file-creation mask.
    unsafe { libc::umask(0o077) };
    let open_files = raise_open_files_limit();
    crate::cpu::set_nice(cfg.limits.heavy_work_nice);
    crate::cpu::set_idle(cfg.limits.heavy_work_idle);
    if cfg.limits.max_connections == 0 {
        cfg.limits.max_connections = crate::config::connections_for_open_files(
            open_files.unwrap_or(1024),
            cfg.database_pool,
            !cfg.proxy.is_empty(),
        );
    }
    tracing::info!(
        open_files,
        max_connections = cfg.limits.max_connections,
        "connection limit"
    );
    let instance = open_instance(&cfg).await?;
    let identity = instance.keys.identity();
    let storage = instance.storage.clone();
    let data_dir = instance.data_dir.clone();
    let engine = Engine::new(
        storage.clone(),
        crate::engine::EngineConfig {
            owner: Some(identity),
            ..cfg.engine_config()
        },
    );
    let listener = TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let https = if cfg.tls.enabled() {
        let handshake_timeout = std::time::Duration::from_secs(cfg.limits.tls_handshake_timeout_secs);
        let (tls, acme) = match (&cfg.tls.cert, &cfg.tls.key) {
            (Some(cert), Some(key)) => {
                let tls = Arc::new(
                    http::tls::Tls::new(cert, key, handshake_timeout)
                        .context("loading the TLS certificate")?,
                );
                tls.watch(
                    std::time::Duration::from_secs(cfg.tls.reload_interval_secs),
                    shutdown.clone(),
                );
                (tls, None)
            }
            _ => {
                let provider = http::tls::provider();
                let acme = Arc::new(
                    http::acme::Acme::new(&cfg.tls, &data_dir, provider.clone()).context("starting ACME")?,
                );
                let tls = Arc::new(http::tls::Tls::with_certificates(
                    acme.certificates(),
                    provider,
                    handshake_timeout,
                )?);
                (tls, Some(acme))
            }
        };
        let redirect = match &cfg.tls.redirect_listen {
            Some(at) => {
                let l = TcpListener::bind(at)
                    .await
                    .with_context(|| format!("listening on {at} (tls.redirect_listen)"))?;
                let public = cfg
                    .public_url
                    .as_deref()
                    .and_then(|u| u.parse::<::http::Uri>().ok())
                    .filter(|u| u.scheme_str() == Some("https"));
                let target = http::tls::RedirectTarget {
                    authority: public.and_then(|u| u.authority().cloned()),
                    https_port: addr.port(),
                };
                tracing::info!(addr = %l.local_addr()?, "redirecting plain HTTP to HTTPS");
                Some((l, target))
            }
            None => None,
        };
        // Ordering starts once the redirect listener is bound: the CA connects to it.
        let challenges = acme.map(|acme| {
            let challenges = acme.challenges();
            acme.run(shutdown.clone());
            challenges
        });
        Some(http::Https {
            tls,
            redirect,
            challenges,
        })
    } else {
        None
    };
    crate::service::spawn_signals(shutdown.clone(), cfg.clone(), reload);
    crate::service::spawn_watchdog();
    tracing::info!(%identity, store = storage.backend(), data_dir = %data_dir.display(), "plait {}", env!("CARGO_PKG_VERSION"));
    let accounts = crate::access::Accounts::new(engine.clone(), instance.keys.clone(), &cfg.access);
    let owner_logins = crate::access::owner_login::OwnerLogins::new(
        &data_dir,
        engine.clone(),
        accounts.master(),
        std::time::Duration::from_secs(cfg.access.owner_session_lifetime_secs),
    );
    let access = crate::access::Access::new(
        accounts,
        crate::access::tokens::Tokens::new(&data_dir),
        owner_logins,
        crate::mirror::shares::Shares::new(&data_dir),
        cfg.access.clone(),
    );
    access.start(&engine).await.context("loading the access rules")?;
    let proxy =
        crate::proxy::Proxy::new(&cfg.proxy, &cfg.limits, shutdown.clone()).map_err(anyhow::Error::msg)?;
    let web = match &cfg.web_dir {
        Some(d) => Some(Arc::new(
            crate::http::static_files::StaticFiles::new(d).map_err(anyhow::Error::msg)?,
        )),
        None => None,
    };
    for r in &cfg.proxy {
        tracing::info!(prefix = %r.prefix, upstream = %r.upstream, live = r.live, "proxy route");
    }
    let p2p = if cfg.p2p.enabled {
        let home = crate::federation::Home {
            engine: engine.clone(),
            identity,
            access: access.clone(),
        };
        let keeper = Arc::new(crate::mirror::keeper::Keeper::new(
            storage.clone(),
            crate::mirror::grants::Grants::new(&data_dir),
            &cfg.mirror,
        ));
        let seal_key = crate::mirror::devices::load_seal(&data_dir)?;
        let owner = crate::mirror::owner::Owner::start(
            storage.clone(),
            plait_bridge::Keypair::from_secret_bytes(&instance.keys.secret_bytes()),
            seal_key,
            cfg.mirror,
        )
        .await
        .context("loading what was sealed for the mirrors")?;
        let inviter = Arc::new(std::sync::OnceLock::new());
        let node = plait_bridge::node::Node::start(
            plait_bridge::Keypair::from_secret_bytes(&instance.keys.secret_bytes()),
            Arc::new(crate::p2p::StoredState(storage.clone())),
            cfg.p2p.clone(),
            Some(Arc::new(Served {
                home,
                keeper: keeper.clone(),
                inviter: inviter.clone(),
            })),
        )
        .await
        .map_err(|e| anyhow::anyhow!("starting the p2p node: {e}"))?;
        tracing::info!(peer_id = %node.status().peer_id, "p2p node started");
        let public_url = cfg.public_url.clone().unwrap_or_else(|| {
            let host = if addr.ip().is_unspecified() {
                std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
            } else {
                addr
            };
            let scheme = if cfg.tls.enabled() { "https" } else { "http" };
            format!("{scheme}://{host}")
        });
        let _ = inviter.set((
            node.clone(),
            format!("{}/.well-known/plait/join", public_url.trim_end_matches('/')),
        ));
        owner.clone().run_sealer(data_dir.clone(), shutdown.clone());
        crate::mirror::device_writes::Merger {
            node: node.clone(),
            engine: engine.clone(),
            storage: storage.clone(),
            owner: owner.clone(),
            data_dir: data_dir.clone(),
        }
        .run(
            std::time::Duration::from_millis(cfg.mirror.device_merge_interval_ms),
            shutdown.clone(),
        );
        let mut device_sealer = None;
        if let Some(device) = crate::mirror::device_writes::load_device(&data_dir)? {
            let of = device.0.cert.owner;
            let sealer = crate::mirror::device_writes::start_device(
                storage.clone(),
                &instance.keys,
                device,
                cfg.mirror,
                node.clone(),
                &data_dir,
                shutdown.clone(),
            )
            .await?;
            device_sealer = Some(sealer);
            access.set_device_of(of);
            tracing::info!(owner = %of, "a device: its owner's writes under /~{of}/ are sealed for the owner");
        }
        owner
            .clone()
            .run_pusher(node.clone(), data_dir.clone(), shutdown.clone());
        crate::mirror::holders::run(node.clone(), owner.clone(), data_dir.clone(), shutdown.clone());
        let reader = crate::mirror::reader::Reader::new(
            storage.clone(),
            engine.clone(),
            node.clone(),
            owner.clone(),
            data_dir.clone(),
            cfg.mirror,
        );
        reader.clone().run(shutdown.clone());
        let p2p = Arc::new(
            crate::p2p::P2p::new(node, instance.keys.clone(), &public_url).with_mirror(crate::p2p::Mirror {
                data_dir: data_dir.clone(),
                owner,
                keeper,
                reader,
                device: device_sealer,
            }),
        );
        if let Err(e) = crate::p2p::serve_admin(&data_dir, p2p.clone(), shutdown.clone()).await {
            tracing::warn!(error = %e, "no admin socket: `plait invite`, `plait join` and `plait status` cannot reach this server");
        }
        Some(p2p)
    } else {
        None
    };
    let federation = p2p
        .as_ref()
        .map(|p| Arc::new(crate::federation::Federation::new(engine.clone(), p.node.clone())));
    let refusals: Arc<crate::refusals::Refusals> = Arc::default();
    let metrics: Arc<crate::metrics::Metrics> = Arc::default();
    let status = crate::status::Status::new(
        crate::status::Sources {
            engine: engine.clone(),
            identity,
            metrics: metrics.clone(),
            refusals: refusals.clone(),
            p2p: p2p.clone(),
            access: access.clone(),
            data_dir: data_dir.clone(),
            public_url: cfg.public_url.clone(),
        },
        cfg.dashboard.clone(),
    );
    status.start(shutdown.clone());
    let app = App::new(http::AppParts {
        engine,
        identity,
        limits: Arc::new(cfg.limits.clone()),
        access,
        https: https.is_some()
            || cfg
                .public_url
                .as_deref()
                .is_some_and(|u| u.starts_with("https://")),
        proxy,
        web,
        p2p,
        federation,
        mirror: cfg.mirror,
        shutdown,
        started: Instant::now(),
        trusted_proxies: Arc::new(cfg.trusted_proxies()),
        refusals,
        statebus_messages: Arc::new(crate::statebus::MessageRate::new(
            cfg.limits.statebus_messages_per_second_per_address,
        )),
        statebus_connections: crate::statebus::connections::Registry::new(),
        holds: Arc::new(http::hold::Holds::new(&cfg.limits)),
        metrics,
        metrics_settings: cfg.metrics.clone(),
        status,
        multiplexers: Arc::new(http::multiplex::Multiplexers::new(&cfg.limits)),
    });
    app.metrics.upkeep(app.shutdown.clone());
    if let Some(addr) = &cfg.metrics.listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for metrics on {addr}"))?;
        let at = listener.local_addr()?;
        tokio::spawn(http::serve_metrics(listener, app.clone()));
        tracing::info!("metrics on http://{at}{}", cfg.metrics.listener_path());
    }
    // Idle addresses' message and bad-request buckets are dropped once a minute.
    let (messages, holds) = (app.statebus_messages.clone(), app.holds.clone());
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            every.tick().await;
            messages.prune(std::time::Instant::now());
            holds.prune();
        }
    });
    tracing::info!(
        public_writes = cfg.access.public_writes,
        "the owner writes; an owner token: plait token --data-dir {}",
        data_dir.display()
    );
    // Logged once everything is ready: scripts and tests wait for this line.
    let scheme = if https.is_some() { "https" } else { "http" };
    tracing::info!("listening on {scheme}://{addr}");
    crate::service::ready(&format!("listening on {scheme}://{addr}"));
    http::serve(listener, app, https).await;
    drop(instance);
    tracing::info!("stopped");
    Ok(())
}

/// What this server answers members over the network: fetches of its resources
/// (federation) and the mirror protocol.
struct Served {
    home: crate::federation::Home,
    keeper: Arc<crate::mirror::keeper::Keeper>,
    /// The node and this server's join URL, set once the node runs: a granted owner's
    /// request for a device's invite is answered with them.
    inviter: Arc<std::sync::OnceLock<(plait_bridge::node::Node, String)>>,
}

impl plait_bridge::types::Serve for Served {
    fn fetch(
        &self,
        from: plait_bridge::Identity,
        path: String,
        body: Vec<u8>,
    ) -> futures::future::BoxFuture<'static, Result<Vec<u8>, String>> {
        self.home.fetch(from, path, body)
    }

    fn mirror(
        &self,
        from: plait_bridge::Identity,
        req: plait_bridge::mirror::wire::Request,
    ) -> futures::future::BoxFuture<'static, plait_bridge::mirror::wire::Response> {
        use plait_bridge::mirror::Refusal;
        use plait_bridge::mirror::wire::{MAX_INVITE_TTL_SECS, Request, Response};
        let keeper = self.keeper.clone();
        let inviter = self.inviter.clone();
        Box::pin(async move {
            let Request::Invite { ttl_secs } = req else {
                return keeper.answer(from, req).await;
            };
            match keeper.granted(&from) {
                Ok(true) => {}
                Ok(false) => return Response::Refused(Refusal::NoGrant),
                Err(r) => return Response::Refused(r),
            }
            let Some((node, join_url)) = inviter.get() else {
                return Response::Refused(Refusal::Unavailable("starting".into()));
            };
            match node
                .invite(
                    node.dht_of(&from),
                    join_url.clone(),
                    ttl_secs.clamp(1, MAX_INVITE_TTL_SECS),
                    1,
                )
                .await
            {
                Ok(inv) => {
                    tracing::info!(%from, dht = %inv.dht, "an invite for a device of a granted owner");
                    Response::Invite(inv.to_link())
                }
                Err(e) => Response::Refused(Refusal::Unavailable(e.to_string())),
            }
        })
    }
}
