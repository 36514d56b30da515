//! TLS for database sessions, with libpq's `sslmode` semantics.
//!
//! tokio-postgres only knows `disable`, `prefer` and `require`, and leaves verification to the
//! TLS connector. pgdelta reads `sslmode` and `sslrootcert` from the connection string itself
//! and builds a rustls configuration to match:
//!
//! | sslmode | encryption | certificate checks |
//! | --- | --- | --- |
//! | `disable` | never | – |
//! | `allow`, `prefer` (default) | when the server offers it | none (as libpq) |
//! | `require` | always | none, unless `sslrootcert` is given: then as `verify-ca` (as libpq) |
//! | `verify-ca` | always | chain up to `sslrootcert` |
//! | `verify-full` | always | chain up to `sslrootcert`, and the host name |
//!
//! `sslrootcert` is a PEM file, or `system` for the operating system's bundle; without it the
//! verifying modes use `~/.postgresql/root.crt`, as libpq does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::error::Error;

/// libpq's sslmode values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub(crate) fn parse(v: &str) -> Result<SslMode, Error> {
        Ok(match v {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::Config(format!(
                    "unknown sslmode '{other}': use disable, allow, prefer, require, verify-ca or verify-full"
                )))
            }
        })
    }

    /// The mode tokio-postgres negotiates with.
    pub(crate) fn negotiation(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as T;
        match self {
            SslMode::Disable => T::Disable,
            SslMode::Allow | SslMode::Prefer => T::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => T::Require,
        }
    }
}

/// The TLS settings taken out of a connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsSettings {
    pub mode: SslMode,
    pub root_cert: Option<String>,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            mode: SslMode::Prefer,
            root_cert: None,
        }
    }
}

/// The libpq settings pgdelta resolves itself (tokio-postgres would reject `verify-full`, and
/// knows nothing of services and password files).
const LIBPQ_ONLY: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "service",
    "passfile",
    "target_session_attrs",
];

/// Removes the [`LIBPQ_ONLY`] settings from a URL or key=value connection string and returns
/// them, values unquoted and decoded. Client certificates are not supported.
pub(crate) fn split_settings(s: &str) -> Result<(String, BTreeMap<String, String>), Error> {
    let mut taken = BTreeMap::new();
    let mut take = |key: &str, value: String| -> Result<bool, Error> {
        if key == "sslcert" || key == "sslkey" {
            return Err(Error::Config(
                "client certificates (sslcert, sslkey) are not supported yet; authenticate with a password".into(),
            ));
        }
        if !LIBPQ_ONLY.contains(&key) {
            return Ok(false);
        }
        taken.insert(key.to_string(), value);
        Ok(true)
    };
    let trimmed = s.trim();
    let rest = if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        match trimmed.split_once('?') {
            None => trimmed.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    if !take(k, percent_decode(v))? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for (k, v, raw) in key_values(trimmed) {
            if !take(&k, v)? {
                kept.push(raw);
            }
        }
        kept.join(" ")
    };
    Ok((rest, taken))
}

impl TlsSettings {
    /// The TLS settings among resolved libpq settings (`sslmode`, `sslrootcert`).
    pub(crate) fn from_settings(settings: &BTreeMap<String, String>) -> Result<Self, Error> {
        let mut tls = TlsSettings::default();
        if let Some(mode) = settings.get("sslmode") {
            tls.mode = SslMode::parse(mode)?;
        }
        tls.root_cert = settings.get("sslrootcert").cloned();
        Ok(tls)
    }
}

/// Decodes `%XX` escapes in a URL query value (libpq does the same).
fn percent_decode(v: &str) -> String {
    percent_encoding::percent_decode_str(v)
        .decode_utf8_lossy()
        .into_owned()
}

/// Splits `key=value key='quoted value'` into (key, unquoted value, raw text).
fn key_values(s: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut chars = s.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut key = String::new();
        let mut value = String::new();
        let mut in_value = false;
        let mut quoted = false;
        let mut end = s.len();
        while let Some((i, c)) = chars.next() {
            if !in_value {
                if c == '=' {
                    in_value = true;
                    if let Some(&(_, '\'')) = chars.peek() {
                        chars.next();
                        quoted = true;
                    }
                } else if c.is_whitespace() {
                    end = i;
                    break;
                } else {
                    key.push(c);
                }
            } else if quoted {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            value.push(n);
                        }
                    }
                    '\'' => {
                        quoted = false;
                    }
                    c => value.push(c),
                }
            } else if c.is_whitespace() {
                end = i;
                break;
            } else {
                value.push(c);
            }
        }
        out.push((key.trim().to_string(), value, s[start..end].to_string()));
    }
    out
}

/// The rustls configuration for `settings`, or `None` for `sslmode=disable`.
pub(crate) fn client_config(settings: &TlsSettings) -> Result<Option<ClientConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS setup failed: {e}")))?;
    let verify = match (settings.mode, &settings.root_cert) {
        (SslMode::Disable, _) => return Ok(None),
        (SslMode::Allow | SslMode::Prefer, _) | (SslMode::Require, None) => None,
        (SslMode::Require | SslMode::VerifyCa, Some(_)) | (SslMode::VerifyCa, None) => Some(false),
        (SslMode::VerifyFull, _) => Some(true),
    };
    let chain = match verify {
        None => None,
        Some(check_name) => {
            let roots = Arc::new(load_roots(settings.root_cert.as_deref())?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| Error::Config(format!("TLS setup failed: {e}")))?;
            if check_name {
                return Ok(Some(
                    builder.with_webpki_verifier(webpki).with_no_client_auth(),
                ));
            }
            Some(webpki)
        }
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Relaxed { provider, chain }))
        .with_no_client_auth();
    Ok(Some(config))
}

fn load_roots(root_cert: Option<&str>) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    if root_cert == Some("system") {
        // The platform's trust store (SSL_CERT_FILE / SSL_CERT_DIR are honoured).
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let why = found
                .errors
                .first()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            return Err(Error::Config(format!(
                "sslrootcert=system: no system CA certificate found{why} (install ca-certificates)"
            )));
        }
        return Ok(roots);
    }
    let path: PathBuf = match root_cert {
        Some(p) => PathBuf::from(p),
        None => {
            let home = std::env::var("HOME").unwrap_or_default();
            let p = Path::new(&home).join(".postgresql/root.crt");
            if !p.exists() {
                return Err(Error::Config(
                    "sslmode verify-ca/verify-full needs the CA certificate: give sslrootcert=FILE (or sslrootcert=system), or put it in ~/.postgresql/root.crt".into(),
                ));
            }
            p
        }
    };
    let certs = CertificateDer::pem_file_iter(&path)
        .map_err(|e| Error::Config(format!("cannot read sslrootcert {}: {e}", path.display())))?;
    for c in certs {
        let c = c.map_err(|e| Error::Config(format!("sslrootcert {}: {e}", path.display())))?;
        roots
            .add(c)
            .map_err(|e| Error::Config(format!("sslrootcert {}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(Error::Config(format!(
            "sslrootcert {} holds no certificate",
            path.display()
        )));
    }
    Ok(roots)
}

/// The checks libpq makes below `verify-full`: none at all (`prefer`, `require` without a root
/// certificate), or the chain up to a trusted root without the host name (`verify-ca`).
/// Handshake signatures are always verified.
#[derive(Debug)]
struct Relaxed {
    provider: Arc<CryptoProvider>,
    /// `Some`: check the chain (verify-ca); `None`: check nothing.
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> Result<(String, TlsSettings), Error> {
        let (rest, taken) = split_settings(s)?;
        Ok((rest, TlsSettings::from_settings(&taken)?))
    }

    #[test]
    fn splits_ssl_settings_out_of_urls() {
        let (rest, s) = split("postgres://u:p@h:5/db?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&application_name=x").unwrap();
        assert_eq!(rest, "postgres://u:p@h:5/db?application_name=x");
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.root_cert.as_deref(), Some("/tmp/ca.pem"));
        let (rest, s) = split("postgres://h/db").unwrap();
        assert_eq!(
            (rest.as_str(), s),
            ("postgres://h/db", TlsSettings::default())
        );
        let (rest, _) = split_settings("postgres://h/db?sslmode=require").unwrap();
        assert_eq!(rest, "postgres://h/db");
    }

    #[test]
    fn splits_ssl_settings_out_of_key_values() {
        let (rest, s) =
            split("host=h sslmode=verify-ca password='a b\\'c' sslrootcert='/x y/ca.pem' dbname=d")
                .unwrap();
        assert_eq!(rest, "host=h password='a b\\'c' dbname=d");
        assert_eq!(s.mode, SslMode::VerifyCa);
        assert_eq!(s.root_cert.as_deref(), Some("/x y/ca.pem"));
    }

    #[test]
    fn takes_services_and_password_files_out_too() {
        let (rest, taken) =
            split_settings("postgres://h/db?service=wh&passfile=%2Fp&connect_timeout=3").unwrap();
        assert_eq!(rest, "postgres://h/db?connect_timeout=3");
        assert_eq!(taken["service"], "wh");
        assert_eq!(taken["passfile"], "/p");
        let (rest, taken) = split_settings("service=wh dbname=x").unwrap();
        assert_eq!(
            (rest.as_str(), taken["service"].as_str()),
            ("dbname=x", "wh")
        );
    }

    #[test]
    fn rejects_what_it_cannot_do() {
        assert!(split("postgres://h/db?sslmode=bogus").is_err());
        assert!(split_settings("host=h sslcert=c.pem").is_err());
        let verify_without_root = TlsSettings {
            mode: SslMode::VerifyFull,
            root_cert: Some("/nonexistent/ca.pem".into()),
        };
        assert!(client_config(&verify_without_root).is_err());
        assert!(client_config(&TlsSettings {
            mode: SslMode::Disable,
            root_cert: None
        })
        .unwrap()
        .is_none());
        assert!(client_config(&TlsSettings::default()).unwrap().is_some());
    }
}
