//! Postgres over TLS: the database URL's `sslmode` read as libpq reads it, with rustls.
//!
//! * `disable` — plain TCP.
//! * `prefer` (libpq's default) — TLS if the server offers it, else plain; the certificate
//!   is not checked (as libpq).
//! * `require` — TLS or no connection; the certificate is not checked, unless
//!   `sslrootcert` is given, which makes it `verify-ca` (as libpq).
//! * `verify-ca` — TLS; the chain must lead to `sslrootcert`.
//! * `verify-full` — as `verify-ca`, and the certificate must name the host.
//!
//! `sslrootcert=FILE` (PEM) is the CA to trust; `verify-ca` and `verify-full` need it
//! (there is no `~/.postgresql/root.crt` default: the service runs without a home).
//! Both parameters are taken out of the URL before tokio-postgres reads the rest.
//! Knows nothing of what is stored.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::storage::StorageError;

/// How the certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    None,
    Chain,
    ChainAndName,
}

/// A database URL read: tokio-postgres's settings and the TLS connector to use with them.
pub struct Target {
    pub config: tokio_postgres::Config,
    /// `None` for `sslmode=disable`.
    pub tls: Option<MakeRustlsConnect>,
}

fn bad(msg: String) -> StorageError {
    StorageError::Unavailable(format!("bad database URL: {msg}"))
}

/// Reads `url` (URL or `key=value` form).
pub fn target(url: &str) -> Result<Target, StorageError> {
    let (rest, mode, root) = take_tls_params(url);
    let mut config: tokio_postgres::Config = rest.parse().map_err(|e| bad(format!("{e}")))?;
    let mode = mode.unwrap_or_else(|| "prefer".into());
    let (ssl, check) = match (mode.as_str(), root.is_some()) {
        ("disable", _) => (SslMode::Disable, Check::None),
        ("allow" | "prefer", _) => (SslMode::Prefer, Check::None),
        ("require", false) => (SslMode::Require, Check::None),
        ("require" | "verify-ca", true) => (SslMode::Require, Check::Chain),
        ("verify-full", true) => (SslMode::Require, Check::ChainAndName),
        ("verify-ca" | "verify-full", false) => {
            return Err(bad(format!(
                "sslmode={mode} needs sslrootcert=FILE (the CA to trust)"
            )));
        }
        (other, _) => {
            return Err(bad(format!(
                "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
            )));
        }
    };
    config.ssl_mode(ssl);
    if ssl == SslMode::Disable {
        return Ok(Target { config, tls: None });
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?;
    let verifier: Arc<dyn ServerCertVerifier> = match (check, root) {
        (Check::None, _) | (_, None) => Arc::new(Unchecked(provider)),
        (check, Some(file)) => {
            let pem = std::fs::read(&file).map_err(|e| bad(format!("sslrootcert {file}: {e}")))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| bad(format!("sslrootcert {file}: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| bad(format!("sslrootcert {file}: {e}")))?;
            }
            if roots.is_empty() {
                return Err(bad(format!("sslrootcert {file}: no certificate in it")));
            }
            let webpki =
                rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| bad(e.to_string()))?;
            Arc::new(Checked {
                webpki,
                names: check == Check::ChainAndName,
            })
        }
    };
    let tls = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Target {
        config,
        tls: Some(MakeRustlsConnect::new(tls)),
    })
}

/// Splits `sslmode` and `sslrootcert` out of `url`: (the rest, sslmode, sslrootcert).
fn take_tls_params(url: &str) -> (String, Option<String>, Option<String>) {
    let (mut mode, mut root) = (None, None);
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_string(), None, None);
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("sslmode", v)) => mode = Some(v.to_string()),
                Some(("sslrootcert", v)) => root = Some(percent_decode(v)),
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (rest, mode, root);
    }
    let mut kept = Vec::new();
    for word in url.split_whitespace() {
        match word.split_once('=') {
            Some(("sslmode", v)) => mode = Some(v.to_string()),
            Some(("sslrootcert", v)) => root = Some(v.to_string()),
            _ => kept.push(word),
        }
    }
    (kept.join(" "), mode, root)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(Ok(b)) = s.get(i + 1..i + 3).map(|h| u8::from_str_radix(h, 16))
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `require`/`prefer` without a CA: encrypted, the certificate not checked (libpq's
/// meaning); the handshake's own signatures are still verified.
#[derive(Debug)]
struct Unchecked(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca` (`names: false`) and `verify-full`: the chain must lead to the CA; with
/// `names`, the certificate must also name the host.
#[derive(Debug)]
struct Checked {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    names: bool,
}

impl ServerCertVerifier for Checked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.names => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_come_out_of_the_url() {
        let (rest, mode, root) = take_tls_params(
            "postgres://u:p@h:5/db?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem",
        );
        assert_eq!(rest, "postgres://u:p@h:5/db?application_name=x");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/tmp/ca.pem"));
        let (rest, mode, root) = take_tls_params("host=h dbname=d sslmode=require");
        assert_eq!(
            (rest.as_str(), mode.as_deref(), root),
            ("host=h dbname=d", Some("require"), None)
        );
        assert!(
            target("postgres://h/db?sslmode=verify-full").is_err(),
            "needs a CA"
        );
        assert!(target("postgres://h/db?sslmode=sometimes").is_err());
        assert!(target("postgres://h/db?sslmode=disable").unwrap().tls.is_none());
        assert!(target("postgres://h/db?sslmode=require").unwrap().tls.is_some());
    }
}
