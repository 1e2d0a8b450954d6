//! The TLS listener (an `https://` proxy): server certificate, optional
//! client-certificate verification against a CA, and the names a client
//! certificate carries for the identity step.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::CertNames;

/// `tls:` in config: serve the proxy port over TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the proxy.
    pub cert: PathBuf,
    /// PEM private key of the proxy.
    pub key: PathBuf,
    /// PEM CA bundle that client certificates must chain to; no client
    /// certificates are requested when absent.
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a valid certificate (needs `client_ca`).
    #[serde(default)]
    pub require_client_cert: bool,
}

/// Loads the files and builds the rustls server configuration.
pub fn server_config(config: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert)
        .and_then(|iter| iter.collect::<Result<_, _>>())
        .map_err(|e| format!("tls.cert: cannot load {}: {e}", config.cert.display()))?;
    if certs.is_empty() {
        return Err(format!("tls.cert: no certificate in {}", config.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&config.key)
        .map_err(|e| format!("tls.key: cannot load {}: {e}", config.key.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?;
    let builder = match &config.client_ca {
        None if config.require_client_cert => {
            return Err("tls.require_client_cert: needs tls.client_ca to verify certificates against".into())
        }
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let cas = CertificateDer::pem_file_iter(path)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("tls.client_ca: cannot load {}: {e}", path.display()))?;
            for ca in cas {
                roots.add(ca).map_err(|e| format!("tls.client_ca: {}: {e}", path.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if config.require_client_cert { verifier } else { verifier.allow_unauthenticated() };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| format!("tls.client_ca: {e}"))?)
        }
    };
    let server = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls: certificate and key do not form a usable pair: {e}"))?;
    Ok(Arc::new(server))
}

/// The URI SANs, DNS SANs and subject CN of a DER certificate.
pub fn cert_names(der: &[u8]) -> Option<CertNames> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let mut names = CertNames::default();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => names.uris.push(uri.to_string()),
                GeneralName::DNSName(dns) => names.dns.push(dns.to_ascii_lowercase()),
                _ => {}
            }
        }
    }
    names.cn = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string);
    Some(names)
}
