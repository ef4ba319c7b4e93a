//! A throwaway PostgreSQL cluster for tests, or the server named by `DATABASE_URL`.
//!
//! The cluster is made once per test process with `initdb` (as the `postgres` user when
//! running as root, since Postgres refuses to run as root), listens on a free port on
//! 127.0.0.1, and is stopped and removed by a watchdog when the test process exits. Each
//! test gets a database of its own. Nothing is skipped when Postgres is missing: the test
//! fails and says why.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// Where to reach the cluster as its superuser.
pub struct Cluster {
    /// `postgres://user@host:port` without a database name.
    base: String,
    /// For the CLI tools.
    host: String,
    port: u16,
    user: String,
    bin: PathBuf,
    /// The data directory, for clusters this process made (stop/start need it).
    data: Option<PathBuf>,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// The shared cluster for this test process.
pub fn cluster() -> &'static Cluster {
    CLUSTER
        .get_or_init(|| Cluster::start().unwrap_or_else(|e| panic!("cannot start Postgres for tests: {e}")))
}

/// A fresh, empty database; returns its URL.
pub fn fresh_database() -> String {
    cluster().create_database()
}

fn pg_bin() -> Result<PathBuf, String> {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            format!("no PostgreSQL under /usr/lib/postgresql ({e}); install postgresql or set PG_BIN")
        })?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .ok_or_else(|| "no initdb found; install postgresql or set PG_BIN".into())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a Postgres tool as the cluster's owner.
fn as_owner(bin: &Path, tool: &str, args: &[&str]) -> Command {
    let exe = bin.join(tool);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(exe).args(args);
        c
    } else {
        let mut c = Command::new(exe);
        c.args(args);
        c
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    fn start() -> Result<Cluster, String> {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            return Cluster::existing(&url);
        }
        Cluster::make()
    }

    /// A cluster of this test's own, even when `DATABASE_URL` is set: for tests that stop
    /// and restart the database server.
    pub fn private() -> Cluster {
        Cluster::make().unwrap_or_else(|e| panic!("cannot start Postgres for tests: {e}"))
    }

    /// A cluster of this test's own that takes TCP connections over TLS only, with this
    /// certificate and key (PEM); the unix socket stays open for the tools.
    pub fn private_tls(cert_pem: &str, key_pem: &str) -> Cluster {
        Cluster::make_with(Some((cert_pem, key_pem)))
            .unwrap_or_else(|e| panic!("cannot start Postgres for tests: {e}"))
    }

    fn make() -> Result<Cluster, String> {
        Cluster::make_with(None)
    }

    fn make_with(tls: Option<(&str, &str)>) -> Result<Cluster, String> {
        let bin = pg_bin()?;
        let dir = std::env::temp_dir().join(format!(
            "plait-pg-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .map_err(|e| e.to_string())?;
            if !ok.success() {
                return Err("chown of the cluster dir failed".into());
            }
        }
        let data = dir.join("data");
        let data_s = data.to_str().unwrap().to_string();
        let out = as_owner(
            &bin,
            "initdb",
            &[
                "-D",
                &data_s,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )
        .stdout(Stdio::null())
        .output()
        .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let port = free_port();
        let mut opts = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {} -c max_connections=300 -c shared_buffers=64MB",
            dir.display()
        );
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            let write = |name: &str, text: &str| -> Result<(), String> {
                let path = data.join(name);
                std::fs::write(&path, text).map_err(|e| e.to_string())?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| e.to_string())?;
                if is_root() {
                    Command::new("chown")
                        .args(["postgres:postgres"])
                        .arg(&path)
                        .status()
                        .map_err(|e| e.to_string())?;
                }
                Ok(())
            };
            write("server.crt", cert)?;
            write("server.key", key)?;
            write(
                "pg_hba.conf",
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
            )?;
            opts.push_str(" -c ssl=on");
        }
        let log = dir.join("log").to_str().unwrap().to_string();
        let out = as_owner(
            &bin,
            "pg_ctl",
            &["-D", &data_s, "-o", &opts, "-l", &log, "-w", "-t", "60", "start"],
        )
        .stdout(Stdio::null())
        .output()
        .map_err(|e| format!("pg_ctl: {e}"))?;
        if !out.status.success() {
            let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
            return Err(format!(
                "pg_ctl start failed: {}\n{log}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        // Stop and remove the cluster when this test process is gone (`kill -0` would fail
        // across users, so look at /proc).
        let watchdog = format!(
            "while [ -d /proc/{pid} ]; do sleep 1; done; {ctl} -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            ctl = bin.join("pg_ctl").display(),
            data = data_s,
            dir = dir.display(),
        );
        let mut w = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "sh", "-c", &watchdog]);
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", &watchdog]);
            c
        };
        w.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        w.spawn().map_err(|e| format!("watchdog: {e}"))?;
        Ok(Cluster {
            base: format!("postgres://postgres@127.0.0.1:{port}"),
            host: "127.0.0.1".into(),
            port,
            user: "postgres".into(),
            bin,
            data: Some(data),
        })
    }

    fn existing(url: &str) -> Result<Cluster, String> {
        // postgres://user[:pass]@host:port[/db]
        let rest = url
            .split_once("://")
            .map(|x| x.1)
            .ok_or("DATABASE_URL is not a postgres:// URL")?;
        let (auth, hostpart) = rest.split_once('@').ok_or("DATABASE_URL needs user@host")?;
        let hostport = hostpart.split('/').next().unwrap_or(hostpart);
        let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "5432"));
        let user = auth.split(':').next().unwrap_or(auth);
        if let Some((_, pass)) = auth.split_once(':') {
            // SAFETY-free: tests are single-purpose processes; the CLI tools read PGPASSWORD.
            unsafe { std::env::set_var("PGPASSWORD", pass) };
        }
        Ok(Cluster {
            base: format!("postgres://{auth}@{hostport}"),
            host: host.into(),
            port: port.parse().map_err(|_| "bad port in DATABASE_URL")?,
            user: user.into(),
            bin: pg_bin().unwrap_or_else(|_| PathBuf::from("")),
            data: None,
        })
    }

    /// Creates an empty database and returns its URL.
    pub fn create_database(&self) -> String {
        let name = format!("plait_test_{}", rand::random::<u64>());
        let tool = if self.bin.as_os_str().is_empty() {
            PathBuf::from("createdb")
        } else {
            self.bin.join("createdb")
        };
        let out = Command::new(tool)
            .args([
                "-h",
                &self.host,
                "-p",
                &self.port.to_string(),
                "-U",
                &self.user,
                &name,
            ])
            .output()
            .expect("createdb runs");
        assert!(
            out.status.success(),
            "createdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!("{}/{}", self.base, name)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn ctl(&self, args: &[&str]) {
        let data = self
            .data
            .as_ref()
            .expect("only clusters made here can be stopped");
        let data = data.to_str().unwrap();
        let mut full = vec!["-D", data, "-w", "-t", "60"];
        full.extend_from_slice(args);
        let out = as_owner(&self.bin, "pg_ctl", &full)
            .stdout(Stdio::null())
            .output()
            .expect("pg_ctl runs");
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the database server (fast shutdown: open connections are cut).
    pub fn stop(&self) {
        self.ctl(&["-m", "fast", "stop"]);
    }

    /// Starts it again with the same settings.
    pub fn start_again(&self) {
        let data = self.data.as_ref().expect("made here");
        let dir = data.parent().unwrap();
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c max_connections=300 -c shared_buffers=64MB",
            self.port,
            dir.display()
        );
        let log = dir.join("log").to_str().unwrap().to_string();
        self.ctl(&["-o", &opts, "-l", &log, "start"]);
    }

    /// Runs SQL with psql against a database URL of this cluster; returns its output.
    pub fn psql(&self, url: &str, sql: &str) -> String {
        let tool = if self.bin.as_os_str().is_empty() {
            PathBuf::from("psql")
        } else {
            self.bin.join("psql")
        };
        let out = Command::new(tool)
            .args(["-X", "-A", "-t", "-d", url, "-c", sql])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
