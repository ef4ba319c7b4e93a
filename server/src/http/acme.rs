//! Certificates from an ACME CA (`tls.acme_domains`, `--acme`): Let's Encrypt by default,
//! any RFC 8555 directory by `tls.acme_directory`. The protocol is `instant-acme`'s.
//!
//! * **Kept in the data dir.** `acme/account.json` (the account key and URL, with the
//!   directory it belongs to), `acme/cert.pem` (the chain, leaf first) and `acme/key.pem`,
//!   each mode 0600 and replaced by write-then-rename, so a crash leaves the old file or
//!   the new one, never half of one.
//! * **At start.** A kept certificate that covers exactly the configured domains and has
//!   not expired is served at once. Otherwise HTTPS starts with a temporary self-signed
//!   certificate for the domains (browsers refuse it, nothing crashes) until the first
//!   order is issued, seconds later when the CA can reach the redirect listener.
//! * **Renewal.** A background task checks every `tls.acme_check_interval_secs` and on
//!   SIGHUP (and retries a failed order after at most [`RETRY_AFTER_FAILURE`]); when the
//!   certificate in use expires within `tls.acme_renew_before_days` it orders a new one, keeps it, and
//!   swaps it into [`Certificates`] without a restart. Handshakes already done keep the old.
//! * **Challenges.** HTTP-01 only: [`Challenges`] holds the key authorizations of the
//!   order in flight, and the plain redirect listener (`tls::redirect_router`) answers
//!   `/.well-known/acme-challenge/TOKEN` from it. TLS-ALPN-01 and DNS-01 are not offered.
//!
//! Knows nothing of routes or the engine; it knows the files it keeps, the CA, and the
//! resolver it feeds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow, bail};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder,
    OrderStatus, RetryPolicy,
};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::tls::{Certificates, certified_key};
use crate::config::TlsSettings;

/// A failed order is tried again after this long (or the check interval, if shorter): soon
/// enough that a first certificate does not wait half a day, rarely enough to stay far
/// below Let's Encrypt's limit of five failed validations per hour.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(15 * 60);

/// How long the CA gets to validate the challenges, and then to issue.
const ORDER_TIMEOUT: Duration = Duration::from_secs(120);

/// The HTTP-01 key authorizations of the order in flight, by token.
#[derive(Debug, Default)]
pub struct Challenges {
    by_token: Mutex<HashMap<String, String>>,
}

impl Challenges {
    /// The key authorization to answer for `token`, while its order is open.
    pub fn answer(&self, token: &str) -> Option<String> {
        self.lock().get(token).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.by_token.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `acme/account.json`: the account's credentials and the directory they belong to (a
/// changed `tls.acme_directory` makes a new account).
#[derive(Serialize, Deserialize)]
struct KeptAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// The ACME client of one server: its settings, its files, the resolver it feeds.
pub struct Acme {
    domains: Vec<String>,
    directory: String,
    email: Option<String>,
    ca_file: Option<PathBuf>,
    renew_before: Duration,
    check_every: Duration,
    /// `DATA_DIR/acme`.
    dir: PathBuf,
    provider: Arc<CryptoProvider>,
    challenges: Arc<Challenges>,
    certificates: Arc<Certificates>,
    /// When the certificate in use expires; `None` for the temporary self-signed one.
    expires: Mutex<Option<SystemTime>>,
}

impl Acme {
    /// Reads the kept certificate (or makes the temporary one) so HTTPS can start now.
    pub fn new(
        settings: &TlsSettings,
        data_dir: &Path,
        provider: Arc<CryptoProvider>,
    ) -> anyhow::Result<Acme> {
        let dir = data_dir.join("acme");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("restricting {}", dir.display()))?;
        }
        let mut domains = settings.acme_domains.clone();
        domains.sort();
        domains.dedup();
        let (key, expires) = match kept(&dir, &domains, &provider) {
            Some((key, expires)) => {
                tracing::info!(domains = ?domains, expires = %humantime::format_rfc3339_seconds(expires), "ACME: serving the kept certificate");
                (key, Some(expires))
            }
            None => {
                tracing::info!(domains = ?domains, "ACME: no usable kept certificate; serving a temporary self-signed one until the CA issues one");
                (self_signed(&domains, &provider)?, None)
            }
        };
        Ok(Acme {
            domains,
            directory: settings.acme_directory.clone(),
            email: settings.acme_email.clone(),
            ca_file: settings.acme_ca_file.clone(),
            renew_before: Duration::from_secs(settings.acme_renew_before_days.saturating_mul(86_400)),
            check_every: Duration::from_secs(settings.acme_check_interval_secs.max(1)),
            dir,
            provider,
            challenges: Arc::default(),
            certificates: Arc::new(Certificates::fixed(key)),
            expires: Mutex::new(expires),
        })
    }

    /// The resolver HTTPS serves from.
    pub fn certificates(&self) -> Arc<Certificates> {
        self.certificates.clone()
    }

    /// The challenge answers for the redirect listener.
    pub fn challenges(&self) -> Arc<Challenges> {
        self.challenges.clone()
    }

    /// Whether the certificate in use must be replaced now.
    fn due(&self) -> bool {
        match *self.expires.lock().unwrap_or_else(|e| e.into_inner()) {
            None => true,
            Some(at) => SystemTime::now() + self.renew_before >= at,
        }
    }

    /// Checks now, then every `check_every` and on SIGHUP, ordering when due, until
    /// `shutdown`.
    pub fn run(self: Arc<Self>, shutdown: CancellationToken) {
        use tokio::signal::unix::{SignalKind, signal};
        // Handled, as with certificate files, so SIGHUP never ends the server.
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler");
                None
            }
        };
        tokio::spawn(async move {
            loop {
                let mut wait = self.check_every;
                if self.due() {
                    let order = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        r = self.renew() => r,
                    };
                    if let Err(e) = order {
                        wait = wait.min(RETRY_AFTER_FAILURE);
                        tracing::error!(error = format!("{e:#}"), retry_in = ?wait, "ACME: ordering a certificate failed; still serving the previous one");
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                    Some(()) = async {
                        match hangup.as_mut() {
                            Some(h) => h.recv().await,
                            None => std::future::pending().await,
                        }
                    } => tracing::info!("SIGHUP: checking the ACME certificate"),
                }
            }
        });
    }

    /// Orders a certificate, keeps it, and puts it in use.
    async fn renew(&self) -> anyhow::Result<()> {
        tracing::info!(domains = ?self.domains, directory = %self.directory, "ACME: ordering a certificate");
        let account = self.account().await?;
        let (chain, key) = self.order(&account).await?;
        let certified = certified_key(chain.as_bytes(), key.as_bytes(), &self.provider)
            .map_err(|e| anyhow!("the CA's certificate does not load: {e}"))?;
        let expires = leaf_expiry(&certified)?;
        // The key first: a crash between the two leaves a pair that does not match, which
        // `kept` refuses (and orders again), never a certificate without its key.
        crate::private_file::write(&self.dir.join("key.pem"), key.as_bytes())?;
        crate::private_file::write(&self.dir.join("cert.pem"), chain.as_bytes())?;
        self.certificates.set(certified);
        *self.expires.lock().unwrap_or_else(|e| e.into_inner()) = Some(expires);
        tracing::info!(domains = ?self.domains, expires = %humantime::format_rfc3339_seconds(expires), "ACME: new certificate in use");
        Ok(())
    }

    /// The kept account for this directory, or a new one (then kept).
    async fn account(&self) -> anyhow::Result<Account> {
        let builder = || match &self.ca_file {
            Some(ca) => Account::builder_with_root(ca)
                .with_context(|| format!("reading tls.acme_ca_file {}", ca.display())),
            None => Account::builder().context("making the ACME HTTP client"),
        };
        let path = self.dir.join("account.json");
        if let Ok(bytes) = std::fs::read(&path) {
            match serde_json::from_slice::<KeptAccount>(&bytes) {
                Ok(k) if k.directory == self.directory => {
                    return builder()?
                        .from_credentials(k.credentials)
                        .await
                        .context("restoring the kept ACME account");
                }
                Ok(_) => tracing::info!("ACME: the kept account is for another directory; making a new one"),
                Err(e) => {
                    tracing::warn!(error = %e, "ACME: {} does not parse; making a new account", path.display())
                }
            }
        }
        let contact = self.email.as_ref().map(|e| format!("mailto:{e}"));
        let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, credentials) = builder()?
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.directory.clone(),
                None,
            )
            .await
            .context("creating an ACME account")?;
        let kept = KeptAccount {
            directory: self.directory.clone(),
            credentials,
        };
        crate::private_file::write(&path, &serde_json::to_vec_pretty(&kept)?)?;
        tracing::info!(account = account.id(), "ACME: new account");
        Ok(account)
    }

    /// One order through HTTP-01: the chain and the new private key, both PEM.
    async fn order(&self, account: &Account) -> anyhow::Result<(String, String)> {
        let identifiers: Vec<Identifier> = self.domains.iter().map(|d| Identifier::Dns(d.clone())).collect();
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .context("placing the order")?;
        let mut tokens = Vec::new();
        let result = async {
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz.context("reading an authorization")?;
                match authz.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => bail!("authorization for {:?} is {other:?}", authz.identifier()),
                }
                let mut challenge = authz
                    .challenge(ChallengeType::Http01)
                    .ok_or_else(|| anyhow!("the CA offers no HTTP-01 challenge"))?;
                self.challenges.lock().insert(
                    challenge.token.clone(),
                    challenge.key_authorization().as_str().to_owned(),
                );
                tokens.push(challenge.token.clone());
                challenge.set_ready().await.context("answering a challenge")?;
            }
            let retry = RetryPolicy::new().timeout(ORDER_TIMEOUT);
            let status = order.poll_ready(&retry).await.context("waiting for validation")?;
            if status != OrderStatus::Ready {
                bail!(
                    "the order is {status:?}, not ready (did the CA reach the redirect listener on port 80?)"
                );
            }
            let key = order.finalize().await.context("finalizing the order")?;
            let chain = order
                .poll_certificate(&retry)
                .await
                .context("waiting for the certificate")?;
            Ok((chain, key))
        }
        .await;
        let mut open = self.challenges.lock();
        for t in &tokens {
            open.remove(t);
        }
        result
    }
}

/// The kept certificate and its expiry, when it loads, names exactly `domains` and has not
/// expired.
fn kept(dir: &Path, domains: &[String], provider: &CryptoProvider) -> Option<(CertifiedKey, SystemTime)> {
    let chain = std::fs::read(dir.join("cert.pem")).ok()?;
    let key = std::fs::read(dir.join("key.pem")).ok()?;
    let certified = match certified_key(&chain, &key, provider) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "ACME: the kept certificate does not load");
            return None;
        }
    };
    let leaf = certified.cert.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let mut names: Vec<String> = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.dedup();
    if names != domains {
        tracing::info!(kept = ?names, wanted = ?domains, "ACME: the kept certificate is for other domains");
        return None;
    }
    let expires = leaf_expiry(&certified).ok()?;
    (expires > SystemTime::now()).then_some((certified, expires))
}

/// The leaf certificate's `notAfter`.
fn leaf_expiry(certified: &CertifiedKey) -> anyhow::Result<SystemTime> {
    let leaf = certified.cert.first().ok_or_else(|| anyhow!("empty chain"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| anyhow!("the certificate does not parse: {e}"))?;
    let secs = parsed.validity().not_after.timestamp();
    let secs = u64::try_from(secs).map_err(|_| anyhow!("the certificate expired before 1970"))?;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// A self-signed certificate for `domains`, served until the CA issues one.
fn self_signed(domains: &[String], provider: &CryptoProvider) -> anyhow::Result<CertifiedKey> {
    let made = rcgen::generate_simple_self_signed(domains.to_vec())
        .context("making a temporary self-signed certificate")?;
    certified_key(
        made.cert.pem().as_bytes(),
        made.signing_key.serialize_pem().as_bytes(),
        provider,
    )
    .map_err(|e| anyhow!("the temporary certificate does not load: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_certificate_is_used_only_for_its_domains_and_before_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let provider = super::super::tls::provider();
        let domains = vec!["a.example".to_string(), "b.example".to_string()];
        assert!(kept(dir.path(), &domains, &provider).is_none(), "nothing kept");
        let made = rcgen::generate_simple_self_signed(domains.clone()).unwrap();
        crate::private_file::write(&dir.path().join("cert.pem"), made.cert.pem().as_bytes()).unwrap();
        crate::private_file::write(
            &dir.path().join("key.pem"),
            made.signing_key.serialize_pem().as_bytes(),
        )
        .unwrap();
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join("key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (_, expires) = kept(dir.path(), &domains, &provider).expect("kept");
        assert!(expires > SystemTime::now());
        assert!(
            kept(dir.path(), &domains[..1], &provider).is_none(),
            "other domains"
        );
    }
}
