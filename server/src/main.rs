//! The `plait` binary.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use plait_server::backup;
use plait_server::cli::{
    AdminArgs, Cli, Command, DeviceCommand, ImportCommand, MembersCommand, MirrorCommand,
};
use plait_server::config::{Config, LogFormat, Overrides};
use plait_server::p2p::AdminRequest;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Keygen(args) => keygen(args),
        Command::Token(args) => token(args),
        Command::Dashboard(args) => dashboard(args),
        Command::Import(ImportCommand::Statebus {
            source,
            data_dir,
            database_url,
            config,
        }) => import_statebus(&source, data_dir, database_url, config),
        Command::Invite {
            admin,
            dht,
            uses,
            ttl_secs,
        } => admin_command(admin, AdminRequest::Invite { dht, uses, ttl_secs }, |r| {
            r["link"].as_str().unwrap_or_default().to_string()
        }),
        Command::Join { admin, link } => admin_command(admin, AdminRequest::Join { link }, |r| {
            format!(
                "joined {} through {}",
                r["dht"].as_str().unwrap_or(""),
                r["inviter"].as_str().unwrap_or("")
            )
        }),
        Command::Status { admin } => admin_command(admin, AdminRequest::Status, |r| {
            serde_json::to_string_pretty(r).unwrap_or_default()
        }),
        Command::Members {
            admin,
            json,
            action: None,
        } => admin_command(admin, AdminRequest::Members, |r| {
            if json {
                serde_json::to_string_pretty(r).unwrap_or_default()
            } else {
                show_members(r)
            }
        }),
        Command::Members {
            admin,
            action: Some(MembersCommand::Remove { admin: own, id, dht }),
            ..
        } => {
            let admin = AdminArgs {
                data_dir: own.data_dir.or(admin.data_dir),
            };
            admin_command(admin, AdminRequest::Remove { id, dht }, |r| {
                let from: Vec<&str> = r["from"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                    .unwrap_or_default();
                format!(
                    "removed {} from {}",
                    r["removed"].as_str().unwrap_or(""),
                    from.join(", ")
                )
            })
        }
        Command::Resolve { admin, id } => admin_command(admin, AdminRequest::Resolve { id }, |r| {
            serde_json::to_string_pretty(r).unwrap_or_default()
        }),
        Command::Mirror(cmd) => mirror(cmd),
        Command::Device(DeviceCommand::Revoke { admin, device }) => {
            admin_command(admin, AdminRequest::DeviceRevoke { id: device }, |r| {
                let rotated = if r["rotated"].as_bool() == Some(true) {
                    "; the seal key it held is retired and a new one made"
                } else {
                    ""
                };
                let mut out = format!(
                    "revoked {}: nothing sealed from now on is sealed to it{rotated}",
                    r["revoked"].as_str().unwrap_or("")
                );
                let told = r["mirrors_told"].as_array().map_or(0, Vec::len);
                out.push_str(&format!("\n{told} mirror(s) told to refuse its pushes"));
                for m in r["mirrors_not_told"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "\nnot told yet (retried while the server runs): {}: {}",
                        m["id"].as_str().unwrap_or(""),
                        m["error"].as_str().unwrap_or("")
                    ));
                }
                out
            })
        }
        Command::Device(DeviceCommand::Join { store, link }) => store_config(store).and_then(|cfg| {
            let j = block_on(plait_server::mirror::join::join(&cfg, &link))?;
            println!(
                "{} is now device {} of {}: restored {} resources ({} segments); serve them with `plait serve --data-dir {}` under /~{}/",
                cfg.data_dir().display(),
                j.device,
                j.owner,
                j.resources,
                j.segments,
                cfg.data_dir().display(),
                j.owner
            );
            Ok(())
        }),
        Command::Device(DeviceCommand::Link {
            admin,
            expires,
            invite,
        }) => admin_command(
            admin,
            AdminRequest::DeviceLink {
                ttl_secs: expires,
                invite,
            },
            |r| {
                format!(
                    "device {} (its keys wait on {}; the link works once, until {} ms)\n{}",
                    r["device"].as_str().unwrap_or(""),
                    r["kept_by"],
                    r["expires_ms"],
                    r["link"].as_str().unwrap_or("")
                )
            },
        ),
        Command::Backup(args) => backup(args),
        Command::Restore(args) => restore(args),
        Command::Migrate(args) => migrate(args),
        Command::Connect { admin, addr } => admin_command(admin, AdminRequest::Connect { addr }, |r| {
            format!("connected to {}", r["connected"].as_str().unwrap_or(""))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr at `level` (`log_level`), unless `RUST_LOG` is set: it wins.
fn init_logging(format: LogFormat, level: &str) {
    // Kademlia warns when a node with no peers yet starts (every fresh install); the node
    // logs what matters about its network itself. `RUST_LOG` shows everything.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::try_new(format!("{level},libp2p_kad::behaviour=error"))
            .unwrap_or_else(|_| EnvFilter::new("info,libp2p_kad::behaviour=error"))
    });
    // A log line that cannot be written (stderr closed by whoever started the server) is
    // dropped: tracing-subscriber would otherwise report it with `eprintln!`, which panics
    // on the same closed stderr and takes the request (or the signal handler) with it.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// glibc's malloc gives contending threads arenas of their own, up to eight per core, and
/// each arena keeps what was freed in it: under a flood of large requests that doubled the
/// server's peak memory (`tests/load/run abuse`, 2 cores: 580–590 MB with glibc's default,
/// 295–339 MB with two arenas). So one arena per core, unless `MALLOC_ARENA_MAX` is set.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        // SAFETY: mallopt only sets an allocator parameter; called before the runtime's
        // threads start.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, cores.min(64) as libc::c_int) };
    }
}

fn serve(args: plait_server::cli::ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        listen: args.listen,
        data_dir: args.data_dir,
        database_url: args.database_url,
        log_format: args.log_format.map(Into::into),
        log_level: args.log_level,
        web_dir: args.web_dir,
        proxy: args.proxy,
        p2p_listen: args.p2p_listen,
        p2p_relays: args.p2p_relay,
        no_p2p: args.no_p2p,
        public_writes: args.public_writes,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        redirect_listen: args.redirect_listen,
        acme: args.acme,
    };
    limit_malloc_arenas();
    let cfg = Config::load(args.config.as_deref(), &overrides).map_err(anyhow::Error::msg)?;
    init_logging(cfg.log_format, &cfg.log_level);
    let file = args.config.clone();
    let reload: plait_server::service::Reload = Box::new(move || Config::load(file.as_deref(), &overrides));
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(plait_server::serve::run(cfg, Some(reload)))
}

/// Sends one command to the running server's admin socket and prints the answer.
fn admin_command(
    admin: plait_server::cli::AdminArgs,
    req: AdminRequest,
    show: impl FnOnce(&serde_json::Value) -> String,
) -> anyhow::Result<()> {
    let dir = admin
        .data_dir
        .unwrap_or_else(plait_server::config::default_data_dir);
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(plait_server::p2p::admin_request(&dir, &req))?;
    println!("{}", show(&result));
    Ok(())
}

/// `plait members` as text: per network, each member and how it stands, then the removed.
fn show_members(r: &serde_json::Value) -> String {
    let Ok(dhts) = serde_json::from_value::<Vec<plait_bridge::types::DhtMembers>>(r["dhts"].clone()) else {
        return serde_json::to_string_pretty(r).unwrap_or_default();
    };
    if dhts.is_empty() {
        return "this server is in no network yet (`plait invite` makes one, `plait join` joins one)".into();
    }
    let mut out = Vec::new();
    for d in dhts {
        out.push(format!(
            "{} (root {}, {} members)",
            d.dht,
            d.root,
            d.members.len()
        ));
        for m in &d.members {
            let origin = match m.admitted_by {
                Some(by) => format!("admitted by {by}"),
                None => "root".into(),
            };
            let link = if m.this_node {
                "this server"
            } else if m.direct {
                "connected directly"
            } else if m.connected {
                "connected through a relay"
            } else {
                "not connected"
            };
            out.push(format!("  {}  {origin}; {link}", m.id));
        }
        for x in &d.removed {
            out.push(format!("  removed: {} (by {})", x.id, x.removed_by));
        }
    }
    out.join("\n")
}

fn keygen(args: plait_server::cli::KeygenArgs) -> anyhow::Result<()> {
    let dir = args
        .data_dir
        .unwrap_or_else(plait_server::config::default_data_dir);
    let (keys, created) = plait_server::serve::open_identity(&dir)?;
    if created {
        eprintln!(
            "created {}",
            dir.join(plait_server::serve::IDENTITY_FILE).display()
        );
    }
    println!("{}", keys.identity());
    Ok(())
}

/// `plait mirror …`: grants work on the data dir's grant file, whether or not the server
/// runs; `add` goes through the running server.
fn mirror(cmd: MirrorCommand) -> anyhow::Result<()> {
    use plait_server::mirror::{grants, owner};
    let dir = |d: Option<std::path::PathBuf>| d.unwrap_or_else(plait_server::config::default_data_dir);
    let identity = |id: &str| {
        id.parse::<plait_bridge::Identity>()
            .map_err(|e| anyhow::anyhow!("{id:?} is not an identity: {e}"))
    };
    match cmd {
        MirrorCommand::Grant { data_dir, id, quota } => {
            let dir = dir(data_dir);
            let quota = grants::parse_size(&quota).map_err(anyhow::Error::msg)?;
            let id = identity(&id)?;
            grants::Grants::new(&dir).grant(id, quota)?;
            println!("granted {id} {quota} bytes");
        }
        MirrorCommand::Revoke { data_dir, id } => {
            let dir = dir(data_dir);
            let id = identity(&id)?;
            if grants::Grants::new(&dir).revoke(&id)? {
                println!("revoked {id}");
            } else {
                anyhow::bail!("{id} has no grant here");
            }
        }
        MirrorCommand::List { data_dir, json } => {
            let dir = dir(data_dir);
            let granted = grants::Grants::new(&dir).list()?;
            let mirrors = owner::mirrors(&dir)?;
            // Use and acknowledgements come from the running server, when there is one.
            let live = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(plait_server::p2p::admin_request(
                    &dir,
                    &AdminRequest::MirrorStatus,
                ))
                .ok();
            let out = serde_json::json!({
                "grants": granted.iter().map(|(id, g)| serde_json::json!({
                    "id": id,
                    "quota": g.quota,
                    "used": live.as_ref().and_then(|l| l["used"].get(id.to_string()).cloned()),
                })).collect::<Vec<_>>(),
                "mirrors": mirrors.iter().map(|(id, m)| serde_json::json!({
                    "id": id,
                    "dht": m.dht,
                    "acked": live.as_ref().and_then(|l| l["mirrors"][id.to_string()].get("acked").cloned()),
                    "error": live.as_ref().and_then(|l| l["mirrors"][id.to_string()].get("error").cloned()),
                    "revoked_acked": live.as_ref().and_then(|l| l["mirrors"][id.to_string()].get("revoked_acked").cloned()),
                })).collect::<Vec<_>>(),
                "sealed_seq": live.as_ref().map(|l| l["sealed_seq"].clone()),
                "following": live.as_ref().map(|l| l["following"].clone()),
                "device_pushes": live.as_ref().map(|l| l["device_pushes"].clone()),
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!("grants (this server keeps their sealed segments):");
                for g in out["grants"].as_array().into_iter().flatten() {
                    let used = g["used"]
                        .as_u64()
                        .map_or(String::new(), |u| format!(", {u} used"));
                    println!("  {}  quota {}{used}", g["id"].as_str().unwrap_or(""), g["quota"]);
                }
                println!("mirrors (this server pushes its sealed segments to):");
                for m in out["mirrors"].as_array().into_iter().flatten() {
                    let acked = m["acked"]
                        .as_u64()
                        .map_or(String::new(), |a| format!(", holds up to {a}"));
                    let err = m["error"].as_str().map_or(String::new(), |e| format!(" ({e})"));
                    println!(
                        "  {}  in {}{acked}{err}",
                        m["id"].as_str().unwrap_or(""),
                        m["dht"].as_str().unwrap_or("")
                    );
                }
                if let Some(f) = out["following"].as_object().filter(|f| !f.is_empty()) {
                    println!("following (owners' chains this server reads its shares of):");
                    for (owner, st) in f {
                        let err = st["error"].as_str().map_or(String::new(), |e| format!(" ({e})"));
                        println!(
                            "  {owner}  through {}, {} bytes fetched{err}",
                            st["seq"], st["fetched_bytes"]
                        );
                    }
                }
                if let Some(d) = out["device_pushes"].as_object().filter(|d| !d.is_empty()) {
                    println!("this device's writes, pushed to its owner's mirrors:");
                    for (mirror, st) in d {
                        let err = st["error"].as_str().map_or(String::new(), |e| format!(" ({e})"));
                        println!("  {mirror}  holds up to {}{err}", st["acked"]);
                    }
                }
            }
        }
        MirrorCommand::Add {
            admin,
            link,
            wait_secs,
        } => {
            let dir = admin
                .data_dir
                .unwrap_or_else(plait_server::config::default_data_dir);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let r = rt.block_on(plait_server::p2p::admin_request(
                &dir,
                &AdminRequest::MirrorAdd { link },
            ))?;
            let mirror = r["mirror"].as_str().unwrap_or("").to_string();
            println!(
                "mirroring to {mirror} ({}{})",
                r["dht"].as_str().unwrap_or(""),
                if r["joined"].as_bool() == Some(true) {
                    ", joined"
                } else {
                    ""
                }
            );
            if wait_secs > 0 {
                let target = r["sealed_seq"].as_u64().unwrap_or(0);
                rt.block_on(first_sync(&dir, &mirror, target, Duration::from_secs(wait_secs)))?;
            }
        }
        other => mirror_sharing(other)?,
    }
    Ok(())
}

/// `plait mirror share|unshare|shares|recipient|follow|unfollow`: an owner's shares work
/// on the data dir's shares file, whether or not the server runs; `follow` goes through
/// the running server (it may join the mirror's network).
fn mirror_sharing(cmd: MirrorCommand) -> anyhow::Result<()> {
    use plait_server::mirror::{reader, shares};
    let dir = |d: Option<std::path::PathBuf>| d.unwrap_or_else(plait_server::config::default_data_dir);
    let identity = |id: &str| {
        id.parse::<plait_bridge::Identity>()
            .map_err(|e| anyhow::anyhow!("{id:?} is not an identity: {e}"))
    };
    match cmd {
        MirrorCommand::Share {
            data_dir,
            prefix,
            reader,
            recipient,
        } => {
            let reader = identity(&reader)?;
            let prefix = shares::Shares::new(&dir(data_dir)).share(
                &prefix,
                reader,
                &recipient,
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            )?;
            println!("sharing /{prefix} with {reader}: what is sealed from now on opens with {recipient}");
        }
        MirrorCommand::Unshare {
            data_dir,
            prefix,
            reader,
        } => {
            let reader = identity(&reader)?;
            if !shares::Shares::new(&dir(data_dir)).unshare(&prefix, &reader)? {
                anyhow::bail!("{prefix} is not shared with {reader}");
            }
            println!("no longer sharing {prefix} with {reader}");
        }
        MirrorCommand::Shares { data_dir, json } => {
            let all = shares::Shares::new(&dir(data_dir)).list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                for s in all {
                    println!("/{}  {}  {}", s.prefix, s.reader, s.recipient);
                }
            }
        }
        MirrorCommand::Recipient { data_dir } => {
            let dir = dir(data_dir);
            std::fs::create_dir_all(&dir)?;
            let key = plait_bridge::mirror::SealKey::load_or_create(
                &dir.join(plait_bridge::mirror::SEAL_KEY_FILE),
            )?;
            println!("{}", key.recipient());
        }
        MirrorCommand::Follow { admin, owner, link } => {
            let dir = admin
                .data_dir
                .unwrap_or_else(plait_server::config::default_data_dir);
            let r = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(plait_server::p2p::admin_request(
                    &dir,
                    &AdminRequest::MirrorFollow { owner, link },
                ))?;
            let on = r["mirror"]
                .as_str()
                .map_or("the mirrors its record names".to_string(), str::to_string);
            println!(
                "following {} on {on}; the owner shares with this server's recipient:\n{}",
                r["owner"].as_str().unwrap_or(""),
                r["recipient"].as_str().unwrap_or("")
            );
        }
        MirrorCommand::Unfollow { data_dir, owner } => {
            let owner = identity(&owner)?;
            if !reader::remove_follow(&dir(data_dir), &owner)? {
                anyhow::bail!("this server does not follow {owner}");
            }
            println!("no longer following {owner}");
        }
        MirrorCommand::Grant { .. }
        | MirrorCommand::Revoke { .. }
        | MirrorCommand::List { .. }
        | MirrorCommand::Add { .. } => unreachable!("handled by `mirror`"),
    }
    Ok(())
}

/// After `plait mirror add`: shows the mirror's first sync, until it acknowledged the
/// `target` segments sealed when it was added, or `wait` has passed (the server keeps
/// pushing).
async fn first_sync(dir: &std::path::Path, mirror: &str, target: u64, wait: Duration) -> anyhow::Result<()> {
    let status = || plait_server::p2p::admin_request(dir, &AdminRequest::MirrorStatus);
    if target == 0 {
        return Ok(());
    }
    let mut progress =
        plait_server::progress::Progress::counting(&format!("first sync to {mirror}"), "segments", target);
    let until = std::time::Instant::now() + wait;
    loop {
        let s = status().await?;
        let acked = s["mirrors"][mirror]["acked"].as_u64().unwrap_or(0);
        progress.update(acked.min(target), 0);
        if acked >= target {
            progress.finish();
            return Ok(());
        }
        if std::time::Instant::now() >= until {
            let why = s["mirrors"][mirror]["error"]
                .as_str()
                .map_or(String::new(), |e| format!(" (last error: {e})"));
            eprintln!(
                "the mirror holds {acked} of {target} segments after {} s{why}; the server keeps \
                 pushing (`plait mirror list` shows how far)",
                wait.as_secs()
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `plait token`: works on the data dir's token file, whether or not the server runs.
/// `plait dashboard`: prints a one-time login link to the admin dashboard.
fn dashboard(args: plait_server::cli::DashboardArgs) -> anyhow::Result<()> {
    use plait_server::config::{Config, Overrides};
    let cfg = Config::load(args.config.as_deref(), &Overrides::default()).map_err(anyhow::Error::msg)?;
    let dir = args.data_dir.unwrap_or_else(|| cfg.data_dir());
    // The link logs in as this instance's owner: the data dir must be an instance.
    plait_server::serve::open_identity(&dir)?;
    let url = match args.url.or(cfg.public_url.clone()) {
        Some(u) => u,
        None => {
            let listen = cfg
                .listen
                .replace("0.0.0.0:", "127.0.0.1:")
                .replace("[::]:", "[::1]:");
            let scheme = if cfg.tls.enabled() { "https" } else { "http" };
            format!("{scheme}://{listen}")
        }
    };
    let secret = plait_server::access::owner_login::issue_link(&dir, args.ttl.into())?;
    println!(
        "{}{}#login={secret}",
        url.trim_end_matches('/'),
        plait_server::http::dashboard::DASHBOARD_PATH
    );
    eprintln!("(the link logs in once, within {})", args.ttl);
    Ok(())
}

fn token(args: plait_server::cli::TokenArgs) -> anyhow::Result<()> {
    use plait_server::access::tokens::Tokens;
    let dir = args
        .data_dir
        .unwrap_or_else(plait_server::config::default_data_dir);
    // The instance key is the owner: a token is issued in its name, so the data dir must
    // be (or become) an instance.
    let (keys, _) = plait_server::serve::open_identity(&dir)?;
    let tokens = Tokens::new(&dir);
    if args.list {
        for t in tokens.list()? {
            let scope = if t.is_owner() {
                "owner".to_string()
            } else {
                format!("read {:?} write {:?}", t.read, t.write)
            };
            let expires = t.expires_secs.map_or("never".to_string(), |e| {
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(e))
                    .to_string()
            });
            println!(
                "{}\t{}\texpires {}\t{}",
                t.id,
                scope,
                expires,
                t.label.unwrap_or_default()
            );
        }
        return Ok(());
    }
    if let Some(id) = args.revoke {
        if tokens.revoke(&id)? {
            println!("revoked {id}");
            return Ok(());
        }
        anyhow::bail!("no token has the id {id}");
    }
    let (record, token) = tokens.issue(&args.read, &args.write, args.ttl.map(Into::into), args.label)?;
    let what = if record.is_owner() {
        format!("an owner token of {}", keys.identity())
    } else {
        format!(
            "a token of {} (read {:?}, write {:?})",
            keys.identity(),
            record.read,
            record.write
        )
    };
    eprintln!(
        "{what}, id {} (revoke with: plait token --revoke {}):",
        record.id, record.id
    );
    println!("{token}");
    Ok(())
}

/// The settings a store command works with: the data dir and, if any, Postgres.
fn store_config(store: plait_server::cli::StoreArgs) -> anyhow::Result<Config> {
    let overrides = Overrides {
        data_dir: store.data_dir,
        database_url: store.database_url,
        ..Default::default()
    };
    let cfg = Config::load(store.config.as_deref(), &overrides).map_err(anyhow::Error::msg)?;
    init_logging(LogFormat::Text, &cfg.log_level);
    Ok(cfg)
}

fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

fn store_place<'a>(cfg: &'a Config, embedded: &'a std::path::Path) -> backup::Place<'a> {
    match &cfg.database_url {
        Some(url) => backup::Place::Postgres(url),
        None => backup::Place::Embedded(embedded),
    }
}

fn backup(args: plait_server::cli::BackupArgs) -> anyhow::Result<()> {
    let cfg = store_config(args.store)?;
    let dir = cfg.data_dir();
    let embedded = dir.join(plait_server::serve::EMBEDDED_FILE);
    let m = block_on(backup::backup(
        &dir,
        store_place(&cfg, &embedded),
        &args.file,
        args.keys,
    ))?;
    println!(
        "backed up {} into {}: {} rows, blake3 {}{}",
        m.identity,
        args.file.display(),
        m.rows.values().sum::<u64>(),
        m.blake3,
        if m.keys {
            " (with its keys: keep the file secret)"
        } else {
            ""
        }
    );
    Ok(())
}

fn restore(args: plait_server::cli::RestoreArgs) -> anyhow::Result<()> {
    let cfg = store_config(args.store)?;
    let dir = cfg.data_dir();
    let embedded = dir.join(plait_server::serve::EMBEDDED_FILE);
    let m = block_on(backup::restore(&dir, store_place(&cfg, &embedded), &args.file))?;
    println!(
        "restored {} into {}: {} rows, blake3 {} (as in the backup)",
        m.identity,
        dir.display(),
        m.rows.values().sum::<u64>(),
        m.blake3
    );
    Ok(())
}

fn migrate(args: plait_server::cli::MigrateArgs) -> anyhow::Result<()> {
    let cfg = store_config(args.store)?;
    let dir = cfg.data_dir();
    let embedded = dir.join(plait_server::serve::EMBEDDED_FILE);
    let (from, to, next) = if args.to == "embedded" {
        let url = cfg
            .database_url
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("--to embedded moves from Postgres: give --database-url"))?;
        (
            backup::Place::Postgres(url),
            backup::Place::Embedded(&embedded),
            format!("plait serve --data-dir {}", dir.display()),
        )
    } else if args.to.starts_with("postgres://") || args.to.starts_with("postgresql://") {
        if cfg.database_url.is_some() {
            anyhow::bail!("--to postgres://… moves the embedded store: leave out --database-url");
        }
        (
            backup::Place::Embedded(&embedded),
            backup::Place::Postgres(&args.to),
            format!("plait serve --data-dir {} --database-url URL", dir.display()),
        )
    } else {
        anyhow::bail!("--to takes a postgres:// URL or `embedded`");
    };
    let (from_name, to_name) = (from.to_string(), to.to_string());
    let s = block_on(backup::migrate(&dir, from, to))?;
    println!("moved {from_name} to {to_name}: {s} (equal on both sides)");
    println!("the source is unchanged; serve the copy with: {next}");
    Ok(())
}

fn import_statebus(
    source: &str,
    data_dir: Option<std::path::PathBuf>,
    database_url: Option<String>,
    config: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    use plait_server::statebus::import;
    let overrides = Overrides {
        data_dir,
        database_url,
        ..Default::default()
    };
    let cfg = Config::load(config.as_deref(), &overrides).map_err(anyhow::Error::msg)?;
    init_logging(LogFormat::Text, &cfg.log_level);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let source = import::Source::detect(source)?;
            let entries = source.entries().await?;
            let instance = plait_server::serve::open_instance(&cfg).await?;
            let mut engine_cfg = cfg.engine_config();
            engine_cfg.limits.writes_per_second = 0;
            let engine = plait_server::engine::Engine::new(instance.storage.clone(), engine_cfg);
            let accounts = plait_server::access::accounts::Accounts::new(
                engine.clone(),
                instance.keys.clone(),
                &cfg.access,
            );
            let mut progress = plait_server::progress::Progress::new("import", entries.len() as u64);
            let mut bytes = 0;
            let report = import::import(
                &engine,
                &accounts,
                instance.keys.identity(),
                entries,
                |done, b| {
                    bytes += b;
                    progress.update(done, bytes)
                },
            )
            .await?;
            progress.finish();
            for (key, why) in &report.skipped {
                eprintln!("skipped {key}: {why}");
            }
            println!("imported from {source:?}: {report}");
            Ok(())
        })
}
