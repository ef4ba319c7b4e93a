//! The `plait` command line (clap).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::LogFormat;

/// Plait: a self-hosted state server for Braid and Statebus apps.
#[derive(Debug, Parser)]
#[command(name = "plait", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (embedded store in the data dir unless a database URL is given).
    Serve(ServeArgs),
    /// Print the instance identity, creating the key if the data dir has none.
    Keygen(KeygenArgs),
    /// Print a bearer token of the owner (with no --read/--write: a full owner token), or
    /// list or revoke tokens.
    Token(TokenArgs),
    /// Print a one-time link that logs the owner in to the admin dashboard (single use,
    /// short-lived; the server may be running or not).
    Dashboard(DashboardArgs),
    /// Load data from another server's store.
    #[command(subcommand)]
    Import(ImportCommand),
    /// Write one file holding the store (one consistent snapshot: the server may be
    /// running) and the data dir's tokens and mirror settings; keys only with --keys.
    Backup(BackupArgs),
    /// Bring a backup back into a data dir (and store) holding no data yet.
    Restore(RestoreArgs),
    /// Copy the store into an empty one elsewhere, checked by rows and hashes: the data
    /// dir's embedded store into Postgres (`--to postgres://…`), or the Postgres store
    /// named by --database-url into the data dir (`--to embedded`). Stop the server first.
    Migrate(MigrateArgs),
    /// Print a one-line invite link to one of this server's networks (creating the network,
    /// with this server as its root, if it is not a member yet).
    Invite {
        #[command(flatten)]
        admin: AdminArgs,
        /// The network (DHT) to invite to; by default the one this server belongs to, or
        /// the `[p2p] dht` setting when it belongs to none or several.
        #[arg(long)]
        dht: Option<String>,
        /// How many servers may join with the link.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// How long the link is valid, in seconds.
        #[arg(long, default_value_t = 7 * 24 * 3600)]
        ttl_secs: u64,
    },
    /// Join a network with an invite link: the running server presents it to the inviter.
    Join {
        #[command(flatten)]
        admin: AdminArgs,
        /// The link `plait invite` printed.
        link: String,
    },
    /// Print the running server's peer-to-peer status: addresses, network, members, peers.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the members of each network (DHT) the running server is in: who admitted each,
    /// whether it is connected, directly or through a relay; and who was removed.
    Members {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print JSON rather than text.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<MembersCommand>,
    },
    /// Look an identity up in the network's DHT and connect to it.
    Resolve {
        #[command(flatten)]
        admin: AdminArgs,
        /// The identity (52 characters).
        id: String,
    },
    /// The end-to-end-encrypted mirror: keep other servers' sealed segments (grant, revoke)
    /// or push this server's to a mirror (add); list both.
    #[command(subcommand)]
    Mirror(MirrorCommand),
    /// Devices: other machines of this owner, given its keys through a mirror.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Dial a peer by address (MULTIADDR/p2p/PEER_ID); reports whether it admitted us.
    Connect {
        #[command(flatten)]
        admin: AdminArgs,
        addr: String,
    },
}

/// Where an instance keeps its data: its data dir, and Postgres if it uses it.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The data dir (identity, tokens, and the embedded store unless Postgres is used).
    #[arg(long, value_name = "DIR", env = "PLAIT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The Postgres store (also PLAIT_DATABASE_URL or DATABASE_URL).
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// A TOML settings file.
    #[arg(long, value_name = "FILE", env = "PLAIT_CONFIG")]
    pub config: Option<PathBuf>,
}

/// `plait backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Also carry the instance's secret keys (identity and seal key): the file is then as
    /// secret as they are.
    #[arg(long)]
    pub keys: bool,
    /// The backup file to write (must not exist).
    pub file: PathBuf,
}

/// `plait restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The backup file.
    pub file: PathBuf,
}

/// `plait migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// `postgres://…` (from the embedded store) or `embedded` (from --database-url).
    #[arg(long, value_name = "URL|embedded")]
    pub to: String,
}

/// `plait dashboard`: a one-time login link for the admin dashboard.
#[derive(Debug, Args)]
pub struct DashboardArgs {
    /// The data dir of the instance whose owner logs in.
    #[arg(long, value_name = "DIR", env = "PLAIT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// A TOML settings file (its `public_url` or `listen` make the link's address).
    #[arg(long, value_name = "FILE", env = "PLAIT_CONFIG")]
    pub config: Option<PathBuf>,
    /// The server's address as the browser reaches it (default: `public_url`, else the
    /// `listen` address).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// How long the link may be used (once), e.g. `10m`.
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    pub ttl: humantime::Duration,
}

/// `plait token`: issue, list or revoke bearer tokens.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The data dir whose owner issues the token (the server may be running or not).
    #[arg(long, value_name = "DIR", env = "PLAIT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Let the token read under PREFIX (`/path` or `/~<id>/path`; repeatable).
    #[arg(long = "read", value_name = "PREFIX")]
    pub read: Vec<String>,
    /// Let the token write and delete (and read) under PREFIX (repeatable).
    #[arg(long = "write", value_name = "PREFIX")]
    pub write: Vec<String>,
    /// How long the token is valid (e.g. `30d`, `12h`); default: until revoked.
    #[arg(long, value_name = "DURATION")]
    pub ttl: Option<humantime::Duration>,
    /// A note to tell tokens apart in `--list`.
    #[arg(long, value_name = "TEXT")]
    pub label: Option<String>,
    /// List the issued tokens (ids, scopes, expiry; never the tokens themselves).
    #[arg(long, conflicts_with_all = ["revoke", "read", "write", "ttl", "label"])]
    pub list: bool,
    /// Revoke the token with this id.
    #[arg(long, value_name = "ID", conflicts_with_all = ["read", "write", "ttl", "label"])]
    pub revoke: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum MembersCommand {
    /// Remove a member (this server must be the network's root or the member that admitted
    /// it): its connections close, it is refused from then on, everywhere the removal
    /// reaches; the members it admitted stay.
    Remove {
        #[command(flatten)]
        admin: AdminArgs,
        /// The member's identity (52 characters).
        id: String,
        /// The network to remove it from; by default every network of this server it is in.
        #[arg(long)]
        dht: Option<String>,
    },
}

/// `plait mirror …`.
#[derive(Debug, Subcommand)]
pub enum MirrorCommand {
    /// Let the server ID push sealed segments here, up to SIZE bytes (e.g. `10GiB`); the
    /// server may be running or not. Granting again changes the quota.
    Grant {
        #[arg(long, value_name = "DIR", env = "PLAIT_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// The owner's identity (52 characters).
        id: String,
        /// How many bytes its segments may occupy here.
        #[arg(long, value_name = "SIZE")]
        quota: String,
    },
    /// Take ID's grant back: nothing more of it is stored (what is stored stays).
    Revoke {
        #[arg(long, value_name = "DIR", env = "PLAIT_DATA_DIR")]
        data_dir: Option<PathBuf>,
        id: String,
    },
    /// The namespaces this server keeps segments for (with their use, if it runs), and the
    /// mirrors this server pushes to (with what each acknowledged, if it runs).
    List {
        #[arg(long, value_name = "DIR", env = "PLAIT_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Print JSON rather than text.
        #[arg(long)]
        json: bool,
    },
    /// Push this server's sealed segments to the server that made LINK (`plait invite` on
    /// the mirror), joining its network first if need be. The server must be running.
    /// Then waits, showing progress, until the mirror holds every segment sealed so far
    /// (the first sync); the pushing goes on in the server either way.
    Add {
        #[command(flatten)]
        admin: AdminArgs,
        /// The mirror's invite link.
        link: String,
        /// Longest to wait for the first sync (0: do not wait).
        #[arg(long, default_value_t = 600)]
        wait_secs: u64,
    },
    /// Seal what this server writes under PREFIX to READER_ID too, so that reader, following
    /// this server's chain on a mirror (`plait mirror follow` there), reads that part of
    /// the namespace and nothing else; this server lets it read the prefix as well. The
    /// server may be running or not. Sharing again replaces the recipient.
    Share {
        #[arg(long, value_name = "DIR", env = "PLAIT_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// The part of the namespace (`/shared`; `/` for all of it).
        prefix: String,
        /// The reader's identity (52 characters).
        reader: String,
        /// The reader's age recipient (`plait mirror recipient` on the reader).
        #[arg(long, value_name = "age1…")]
        recipient: String,
    },
    /// Stop sealing PREFIX to READER_ID: what is sealed from now on is not sealed to it.
    Unshare {
        #[arg(long, value_name = "DIR", env = "PLAIT_DATA_DIR")]
        data_dir: Option<PathBuf>,
        prefix: String,
        reader: String,
    },
    /// The parts of this server's namespace it shares, and with whom.
    Shares {
        #[arg(long, value_name = "DIR", env = "PLAIT_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Print JSON rather than text.
        #[arg(long)]
        json: bool,
    },
    /// Print this server's age recipient (`age1…`), which an owner shares a part of its
    /// namespace with (`plait mirror share … --recipient`).
    Recipient {
        #[arg(long, value_name = "DIR", env = "PLAIT_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Follow OWNER_ID's chain on a mirror and serve the parts it shares with this server
    /// under `/~<OWNER_ID>/…`, live, even while the owner is offline. LINK (an invite of
    /// the mirror's network) is joined if this server is not a member; without it, the
    /// mirrors the owner's DHT record names are asked. The server must be running.
    Follow {
        #[command(flatten)]
        admin: AdminArgs,
        /// The owner's identity (52 characters).
        owner: String,
        /// An invite link of the mirror's network, made by the mirror.
        link: Option<String>,
    },
    /// Stop following OWNER_ID (what was fetched stays).
    Unfollow {
        #[arg(long, value_name = "DIR", env = "PLAIT_DATA_DIR")]
        data_dir: Option<PathBuf>,
        owner: String,
    },
}

/// `plait device …`.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Print a one-time link that makes another machine a device of this owner. The
    /// device's keys are made here, sealed to a secret only the link carries and left
    /// with this server's mirrors, so the link works after this server stops. The
    /// server must be running and have a mirror.
    Link {
        #[command(flatten)]
        admin: AdminArgs,
        /// Seconds the link works.
        #[arg(long, default_value_t = 86_400)]
        expires: u64,
        /// An invite link of the mirror's network (`plait invite` on the mirror), carried
        /// in the link for the device to join it; by default the mirror makes one.
        #[arg(long, value_name = "LINK")]
        invite: Option<String>,
    },
    /// Revoke DEVICE: what is sealed from now on is not sealed to it (the owner's seal
    /// key is replaced if the device holds it; the old one is kept for older segments).
    /// The server must be running.
    Revoke {
        #[command(flatten)]
        admin: AdminArgs,
        /// The device's identity (as `plait device link` printed it).
        device: String,
    },
    /// Make a new data dir a device of the owner whose LINK this is (`plait device
    /// link`): join the mirror's network, take the device's keys from the mirror (once)
    /// and restore the owner's namespace from it. Then `plait serve` serves it under
    /// `/~<owner>/…`.
    Join {
        #[command(flatten)]
        store: StoreArgs,
        link: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// A statebus server's store: its file_store `db` file, its sqlite file (table
    /// `cache`), or its Postgres database (`postgres://…`, table `store`). Accounts keep
    /// their passwords; importing again is safe. With the embedded store, stop the server
    /// first.
    Statebus {
        /// The `db` file, the sqlite file, or a postgres:// URL.
        source: String,
        /// Where Plait's identity and embedded store are.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Import into Postgres (also PLAIT_DATABASE_URL or DATABASE_URL).
        #[arg(long, value_name = "URL")]
        database_url: Option<String>,
        /// A TOML settings file.
        #[arg(long, value_name = "FILE", env = "PLAIT_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on, e.g. 127.0.0.1:7524 (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Directory for the identity key and the embedded store.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Store everything in Postgres (also PLAIT_DATABASE_URL or DATABASE_URL).
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// A TOML settings file; the environment and flags override it.
    #[arg(long, value_name = "FILE", env = "PLAIT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log line format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormatArg>,
    /// What is logged: a level (error, warn, info, debug, trace) or tracing directives;
    /// `RUST_LOG`, when set, wins.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Forward requests whose path starts with PREFIX to the origin URL (repeatable), e.g.
    /// `--proxy /api=http://127.0.0.1:3000`.
    #[arg(long = "proxy", value_name = "PREFIX=URL")]
    pub proxy: Vec<crate::config::ProxyRoute>,
    /// Serve the static files of DIR (for paths that name a file in it).
    #[arg(long, value_name = "DIR")]
    pub web_dir: Option<PathBuf>,
    /// Listen for peers on MULTIADDR (repeatable), e.g. /ip4/0.0.0.0/tcp/7525.
    #[arg(long, value_name = "MULTIADDR")]
    pub p2p_listen: Vec<String>,
    /// Be reachable through the member at MULTIADDR (ending in /p2p/<peer id>; repeatable):
    /// for a machine others cannot dial, behind NAT.
    #[arg(long, value_name = "MULTIADDR")]
    pub p2p_relay: Vec<String>,
    /// Do not run the peer-to-peer node.
    #[arg(long)]
    pub no_p2p: bool,
    /// Let everyone write and delete (as the Braid and Statebus reference servers do), for
    /// apps written for them; deny rules still hold. Default: only the owner writes.
    #[arg(long)]
    pub public_writes: bool,
    /// Serve HTTPS on --listen with this certificate chain (PEM, reloaded when it changes).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Also listen for plain HTTP on ADDR, redirecting every request to HTTPS (308) and
    /// answering ACME HTTP-01 challenges.
    #[arg(long, value_name = "ADDR")]
    pub redirect_listen: Option<String>,
    /// Get (and renew) the certificate for DOMAIN by ACME, Let's Encrypt unless
    /// tls.acme_directory says otherwise; repeatable. Needs --redirect-listen.
    #[arg(long, value_name = "DOMAIN")]
    pub acme: Vec<String>,
}

/// How a command finds the running server: its data dir (as `plait serve` was given).
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The running server's data dir (its admin socket is there).
    #[arg(long, value_name = "DIR", env = "PLAIT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Directory holding the identity key.
    #[arg(long, value_name = "DIR", env = "PLAIT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(a: LogFormatArg) -> Self {
        match a {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}
