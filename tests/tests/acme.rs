//! ACME against a real CA: Debian's `pebble`, started by the test with a certificate for
//! its own HTTPS that the test makes. `plait serve --acme localhost` gets a certificate by
//! HTTP-01 (pebble connects to the redirect listener), serves it, renews it when inside the
//! renewal window, and after a restart serves the kept one without ordering again.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use plait_tests::plait::{Plait, Store};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

const PEBBLE: &str = "/usr/bin/pebble";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running pebble: its files, ports and log; killed on drop.
struct Pebble {
    dir: tempfile::TempDir,
    port: u16,
    management: u16,
    child: Child,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Pebble {
    /// Starts pebble validating HTTP-01 on `http_port`, its HTTPS with a certificate from
    /// a CA the test makes (`ca_file`).
    fn start(http_port: u16) -> Pebble {
        let dir = tempfile::tempdir().unwrap();
        let ca = plait_tests::pki::Ca::new("pebble's HTTPS test CA");
        let issued = ca.issue(&["localhost", "127.0.0.1"], None);
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), issued.cert_pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), issued.key_pem()).unwrap();
        let (port, management) = (free_port(), free_port());
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": dir.path().join("cert.pem"),
            "privateKey": dir.path().join("key.pem"),
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        let config_file = dir.path().join("pebble.json");
        std::fs::write(&config_file, config.to_string()).unwrap();
        let log = std::fs::File::create(dir.path().join("pebble.log")).unwrap();
        let child = Command::new(PEBBLE)
            .arg("-config")
            .arg(&config_file)
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_VA_ALWAYS_VALID", "0")
            // Pebble rejects 5% of good nonces by default, to test clients' retries; the
            // test is about issuance.
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("run pebble");
        let pebble = Pebble {
            dir,
            port,
            management,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", management)).is_err()
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        {
            assert!(
                Instant::now() < deadline,
                "pebble did not start: {}",
                pebble.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        pebble
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }

    /// How many orders pebble has been sent.
    fn orders(&self) -> usize {
        self.log().matches("POST /order-plz").count()
    }

    /// The root that issues pebble's certificates (made anew on every start).
    fn issuing_root(&self) -> CertificateDer<'static> {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(self.ca_file())
            .arg(format!("https://127.0.0.1:{}/roots/0", self.management))
            .output()
            .expect("run curl");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        CertificateDer::from_pem_slice(&out.stdout).expect("a PEM root")
    }
}

/// The leaf certificate `p` presents to a new handshake as `localhost`, verified with
/// `root`; `None` if the handshake fails (no certificate from the CA yet).
async fn presented(p: &Plait, root: &CertificateDer<'static>) -> Option<CertificateDer<'static>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(p.addr).await.ok()?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .ok()?;
    Some(tls.get_ref().1.peer_certificates()?[0].clone())
}

/// Waits up to a minute for a presented certificate that `differs` accepts.
async fn wait_for(
    p: &Plait,
    pebble: &Pebble,
    root: &CertificateDer<'static>,
    what: &str,
    differs: impl Fn(&CertificateDer<'static>) -> bool,
) -> CertificateDer<'static> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(c) = presented(p, root).await
            && differs(&c)
        {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within 60 s\nplait:\n{}\npebble:\n{}",
            p.log(),
            pebble.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn kept_leaf(data_dir: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(data_dir.join("acme/cert.pem")).expect("a kept certificate")
}

fn orders(p: &Plait) -> usize {
    p.log().matches("ACME: ordering a certificate").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issues_renews_and_keeps_a_certificate_from_pebble() {
    assert!(
        Path::new(PEBBLE).exists(),
        "{PEBBLE} is missing: apt-get install pebble (.ci/run does)"
    );
    let http_port = free_port();
    let pebble = Pebble::start(http_port);
    let redirect = format!("127.0.0.1:{http_port}");
    let ca_file = pebble.ca_file().display().to_string();
    let directory = pebble.directory();
    // Renew whenever the certificate expires within ~270 years (always), checked every 2 s.
    let mut p = Plait::start_with_env(
        Store::Embedded,
        &["--acme", "localhost", "--redirect-listen", &redirect],
        &[
            ("PLAIT_TLS__ACME_DIRECTORY", &directory),
            ("PLAIT_TLS__ACME_CA_FILE", &ca_file),
            ("PLAIT_TLS__ACME_RENEW_BEFORE_DAYS", "100000"),
            ("PLAIT_TLS__ACME_CHECK_INTERVAL_SECS", "2"),
        ],
    );
    let root = pebble.issuing_root();

    // Issued: a handshake verified with pebble's root succeeds, and so does HTTPS.
    let first = wait_for(&p, &pebble, &root, "certificate from pebble", |_| true).await;
    let root_file = pebble.dir.path().join("root.pem");
    std::fs::write(
        &root_file,
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, root.as_ref())
        ),
    )
    .unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg("--cacert")
        .arg(&root_file)
        .args(["--resolve", &format!("localhost:{}:127.0.0.1", p.addr.port())])
        .arg(format!("https://localhost:{}/.well-known/plait", p.addr.port()))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Other paths of the plain listener still redirect; unknown tokens are 404.
    let r = plait_tests::wire::send(
        redirect.parse().unwrap(),
        "GET",
        "/.well-known/acme-challenge/nope",
        &[("Host", "localhost")],
        b"",
    )
    .await;
    assert_eq!(r.status, 404);
    let r = plait_tests::wire::send(
        redirect.parse().unwrap(),
        "GET",
        "/x",
        &[("Host", "localhost")],
        b"",
    )
    .await;
    assert_eq!(r.status, 308);

    // Renewed: inside the window, a new certificate comes into use without a restart.
    let second = wait_for(&p, &pebble, &root, "renewed certificate", |c| *c != first).await;
    assert_ne!(first, second);

    // Kept: with the default window (30 days) a restart serves the kept certificate at
    // once and orders nothing.
    p.env.retain(|(k, _)| k != "PLAIT_TLS__ACME_RENEW_BEFORE_DAYS");
    p.terminate();
    let kept = kept_leaf(p.data_dir());
    let mode = {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(p.data_dir().join("acme/key.pem"))
            .unwrap()
            .permissions()
            .mode()
    };
    assert_eq!(mode & 0o777, 0o600, "the kept key is private");
    let before = orders(&p);
    let pebble_before = pebble.orders();
    assert!(pebble_before >= 2, "two orders at least:\n{}", pebble.log());
    assert!(
        pebble.log().contains("Attempting to validate w/ HTTP"),
        "pebble validated by HTTP-01:\n{}",
        pebble.log()
    );
    p.restart();
    let served = presented(&p, &root)
        .await
        .expect("the kept certificate is served at once");
    assert_eq!(served, kept);
    // SIGHUP makes a check, not an order (the certificate is not due), nor an exit.
    let pid = p.pid().expect("running").to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(p.is_running(), "SIGHUP ended the server:\n{}", p.log());
    assert!(p.log().contains("SIGHUP: checking the ACME certificate"));
    assert_eq!(orders(&p), before, "ordered again after a restart:\n{}", p.log());
    assert_eq!(pebble.orders(), pebble_before, "pebble saw a new order");
    assert_eq!(presented(&p, &root).await.as_ref(), Some(&kept));
    assert!(p.log().contains("ACME: serving the kept certificate"));
}
