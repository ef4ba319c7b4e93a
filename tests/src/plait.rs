//! Real `plait` server processes for tests.
//!
//! The binary is `target/<profile>/plait` next to the test executable (built by
//! `cargo build --workspace --bins`, which `tests/run` does), or `PLAIT_BIN`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Which store a test server uses.
#[derive(Debug, Clone)]
pub enum Store {
    /// The embedded store in the data dir.
    Embedded,
    /// Postgres at this URL.
    Postgres(String),
}

impl Store {
    /// A fresh Postgres database on the test cluster.
    pub fn fresh_postgres() -> Store {
        Store::Postgres(crate::pg::fresh_database())
    }
}

/// The path of the `plait` binary under test.
pub fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("PLAIT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let bin = profile_dir.join("plait");
    assert!(
        bin.exists(),
        "{} does not exist: run `cargo build --workspace --bins` first (tests/run does), or set PLAIT_BIN",
        bin.display()
    );
    bin
}

/// A data dir this server owns (removed with it) or shares with another server.
enum DataDir {
    Owned(tempfile::TempDir),
    Shared(PathBuf),
}

/// A running `plait serve`.
pub struct Plait {
    pub addr: SocketAddr,
    pub store: Store,
    pub extra_args: Vec<String>,
    /// Environment for the server (settings as `PLAIT_*`).
    pub env: Vec<(String, String)>,
    data_dir: DataDir,
    /// The network namespace the server runs in (`ip netns exec`), if not the test's own.
    netns: Option<String>,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    /// An owner token, issued on first use.
    owner_token: std::sync::OnceLock<String>,
}

impl Plait {
    /// Starts a server on a free port with a fresh data dir.
    pub fn start(store: Store) -> Plait {
        Self::start_with(store, &[])
    }

    /// Starts a server with extra `plait serve` arguments.
    pub fn start_with(store: Store, extra: &[&str]) -> Plait {
        Self::start_with_env(store, extra, &[])
    }

    /// Starts a server with extra arguments and settings from the environment
    /// (e.g. `("PLAIT_LIMITS__WRITES_PER_SECOND", "5")`). Unless set here, the write rate
    /// limits (writes, bytes and document work) and the hold on repeated bad requests are off: tests that
    /// write fast, or send many bad requests on purpose, must not trip them by accident.
    pub fn start_with_env(store: Store, extra: &[&str], env: &[(&str, &str)]) -> Plait {
        let data_dir = DataDir::Owned(tempfile::tempdir().expect("temp dir"));
        let mut p = Self::new(store, data_dir, extra);
        p.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        p.spawn("127.0.0.1:0");
        p
    }

    /// Starts a server listening on `listen` (e.g. `10.1.2.3:0`), inside network namespace
    /// `netns` when given (see [`crate::netns::NetNs`]).
    pub fn start_at(store: Store, listen: &str, netns: Option<&str>, extra: &[&str]) -> Plait {
        Self::start_at_with_env(store, listen, netns, extra, &[])
    }

    /// [`Self::start_at`] with settings from the environment, as [`Self::start_with_env`].
    pub fn start_at_with_env(
        store: Store,
        listen: &str,
        netns: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Plait {
        let data_dir = DataDir::Owned(tempfile::tempdir().expect("temp dir"));
        let mut p = Self::new(store, data_dir, extra);
        p.netns = netns.map(str::to_string);
        p.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        p.spawn(listen);
        p
    }

    /// A second server process of the same instance: same data dir (so the same
    /// identity) and the same store. Only Postgres can be shared.
    pub fn start_sharing(other: &Plait, extra: &[&str]) -> Plait {
        Self::launch(
            other.store.clone(),
            DataDir::Shared(other.data_dir().to_path_buf()),
            extra,
        )
    }

    /// Starts a server on `dir`, an existing data dir the test keeps (a restored one, say).
    pub fn start_in(store: Store, dir: &Path, extra: &[&str]) -> Plait {
        Self::launch(store, DataDir::Shared(dir.to_path_buf()), extra)
    }

    fn launch(store: Store, data_dir: DataDir, extra: &[&str]) -> Plait {
        let mut p = Self::new(store, data_dir, extra);
        p.spawn("127.0.0.1:0");
        p
    }

    fn new(store: Store, data_dir: DataDir, extra: &[&str]) -> Plait {
        Plait {
            addr: "127.0.0.1:0".parse().unwrap(),
            store,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            data_dir,
            netns: None,
            child: None,
            log: Arc::new(Mutex::new(String::new())),
            owner_token: std::sync::OnceLock::new(),
        }
    }

    /// Serves `dir` (an existing data dir) from the next start on.
    pub fn use_data_dir(&mut self, dir: &Path) {
        self.data_dir = DataDir::Shared(dir.to_path_buf());
    }

    pub fn data_dir(&self) -> &Path {
        match &self.data_dir {
            DataDir::Owned(d) => d.path(),
            DataDir::Shared(p) => p,
        }
    }

    fn spawn(&mut self, listen: &str) {
        let mut cmd = match &self.netns {
            None => Command::new(binary()),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(binary());
                c
            }
        };
        cmd.arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(self.data_dir());
        if let Store::Postgres(url) = &self.store {
            cmd.arg("--database-url").arg(url);
        }
        cmd.args(&self.extra_args);
        // The p2p node is off unless a test asks for it (by giving it an address).
        if !self.extra_args.iter().any(|a| a == "--p2p-listen") {
            cmd.arg("--no-p2p");
        }
        cmd.env_remove("DATABASE_URL").env_remove("PLAIT_DATABASE_URL");
        cmd.env("PLAIT_LIMITS__WRITES_PER_SECOND", "0");
        cmd.env("PLAIT_LIMITS__WRITE_BYTES_PER_SECOND", "0");
        cmd.env("PLAIT_LIMITS__DOCUMENT_WORK_MS_PER_SECOND", "0");
        cmd.env("PLAIT_LIMITS__BAD_REQUESTS_PER_SECOND_PER_ADDRESS", "0");
        // Most tests write anonymously, as apps written for the reference servers do; the
        // access tests turn this off (an entry in `env` wins).
        cmd.env("PLAIT_ACCESS__PUBLIC_WRITES", "true");
        // `PLAIT_TEST_LOG` becomes `RUST_LOG` (which wins over `log_level`); without it,
        // the server's `log_level` decides (default `info`).
        match std::env::var("PLAIT_TEST_LOG") {
            Ok(filter) => cmd.env("RUST_LOG", filter),
            Err(_) => cmd.env_remove("RUST_LOG"),
        };
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn plait");
        let (tx, rx) = mpsc::channel();
        for stream in [
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = self.log.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    // `http://` or, with `--tls-cert`, `https://`.
                    let at = ["listening on http://", "listening on https://"]
                        .iter()
                        .find_map(|p| line.find(p).map(|i| i + p.len()));
                    if let Some(i) = at {
                        let rest = &line[i..];
                        let addr: String = rest
                            .chars()
                            .take_while(|c| !c.is_whitespace() && *c != '/')
                            .collect();
                        let _ = tx.send(addr);
                    }
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => self.addr = addr.parse().expect("listening address"),
            Err(_) => {
                let _ = child.kill();
                panic!("plait did not start within 60 s; its output:\n{}", self.log());
            }
        }
        self.child = Some(child);
    }

    /// A full owner token of this server (`plait token`), issued once.
    pub fn owner_token(&self) -> String {
        self.owner_token.get_or_init(|| self.token(&[])).clone()
    }

    /// Runs `plait token --data-dir DIR ARGS…` and returns the token it printed.
    pub fn token(&self, args: &[&str]) -> String {
        let out = Command::new(binary())
            .arg("token")
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(args)
            .output()
            .expect("run plait token");
        assert!(
            out.status.success(),
            "plait token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .last()
            .expect("plait token prints a token")
            .to_string()
    }

    /// The `Authorization` header of the owner.
    pub fn owner_auth(&self) -> (&'static str, String) {
        ("Authorization", format!("Bearer {}", self.owner_token()))
    }

    /// The server's status resource (`/.well-known/plait`) as the owner sees it, fetched
    /// from outside any runtime.
    pub fn well_known(&self) -> serde_json::Value {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(self.status())
    }

    /// [`Plait::well_known`], from async code.
    pub async fn status(&self) -> serde_json::Value {
        let (k, v) = self.owner_auth();
        let r = crate::wire::send(self.addr, "GET", "/.well-known/plait", &[(k, v.as_str())], b"").await;
        serde_json::from_slice(&r.body).expect("the status resource is JSON")
    }

    /// Everything the server has printed.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `kill -9`: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a graceful exit; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        for _ in 0..300 {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        panic!(
            "plait did not exit within 15 s of SIGTERM; output:\n{}",
            self.log()
        );
    }

    /// Starts the server again on the same data dir and store (and the same port if free).
    pub fn restart(&mut self) {
        self.kill9();
        let listen = self.addr.to_string();
        self.spawn(&listen);
    }

    /// Logs in over HTTP (creating the account first when `create`); returns the
    /// `Cookie` header value of the session.
    pub async fn login(&self, name: &str, pass: &str, create: bool) -> String {
        let r = crate::wire::send(self.addr, "GET", "/current_user", &[], b"").await;
        let cookie = format!(
            "plait_session={}",
            r.cookie("plait_session").expect("a session cookie")
        );
        let h = [("Cookie", cookie.as_str())];
        let mut asks = vec![serde_json::json!({"login_as": {"name": name, "pass": pass}})];
        if create {
            asks.insert(
                0,
                serde_json::json!({"create_account": {"name": name, "pass": pass}}),
            );
        }
        for ask in asks {
            let r =
                crate::wire::send(self.addr, "PUT", "/current_user", &h, ask.to_string().as_bytes()).await;
            let answer: serde_json::Value = serde_json::from_slice(&r.body).expect("a JSON answer");
            assert!(answer.get("error").is_none(), "{ask}: {answer}");
        }
        cookie
    }

    /// The server process's peak resident memory so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let pid = self.child.as_ref().expect("running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process's status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status");
        kib * 1024
    }

    /// The server process's id, while it runs (to send it signals).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Plait {
    fn drop(&mut self) {
        self.kill9();
    }
}
