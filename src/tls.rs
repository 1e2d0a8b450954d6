//! TLS material: the listener's (an `https://` proxy: server certificate,
//! optional client-certificate verification against a CA, and the names a
//! client certificate carries for the identity step), and the client side
//! of TLS to an `https://` parent proxy.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::CertNames;

pub use crate::config::TlsConfig;

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
            let roots = load_roots(path).map_err(|e| format!("tls.client_ca: {e}"))?;
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

/// The CA certificates of a PEM bundle; at least one.
fn load_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let cas = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
    if cas.is_empty() {
        return Err(format!("no certificate in {}", path.display()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots.add(ca).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// TLS to an `https://` parent proxy: who verifies its certificate, and
/// the name the certificate must carry (also sent as SNI when it is a DNS name).
#[derive(Clone)]
pub struct ParentTls {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: ServerName<'static>,
}

/// An `upstream_proxy` TLS setting that was refused: the field, the value
/// as written (to find its line), and why.
#[derive(Debug)]
pub struct ParentTlsError {
    pub field: &'static str,
    pub value: String,
    pub reason: String,
}

impl std::fmt::Display for ParentTlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Loads `ca_file` and builds the client configuration for an `https://`
/// parent; `None` for an `http://` one. The certificate is verified
/// against `server_name` when given, else the URL's host (an IP literal
/// against the certificate's IP addresses).
pub fn parent_tls(config: &crate::config::UpstreamProxyConfig) -> Result<Option<ParentTls>, ParentTlsError> {
    let refuse = |field, value: &dyn std::fmt::Display, reason: String| ParentTlsError { field, value: value.to_string(), reason };
    let host = &config.url.target.host;
    if !config.url.tls {
        return match (&config.ca_file, &config.server_name) {
            (Some(path), _) => Err(refuse("upstream_proxy.ca_file", &path.display(), "only for an https:// parent".into())),
            (None, Some(name)) => Err(refuse("upstream_proxy.server_name", name, "only for an https:// parent".into())),
            (None, None) => Ok(None),
        };
    }
    let Some(path) = &config.ca_file else {
        let reason = "an https:// parent needs upstream_proxy.ca_file, a PEM bundle of the CAs that verify its certificate \
                      (there are no built-in roots)";
        return Err(refuse("upstream_proxy.url", host, reason.into()));
    };
    let roots = load_roots(path).map_err(|e| refuse("upstream_proxy.ca_file", &path.display(), e))?;
    let server_name = match (&config.server_name, host) {
        (Some(name), _) => ServerName::try_from(name.as_str()).map(|n| n.to_owned()).map_err(|_| {
            refuse("upstream_proxy.server_name", name, format!("{name:?} is not a DNS name or an IP address"))
        })?,
        (None, crate::target::Host::Name(name)) => ServerName::try_from(name.as_str().to_string())
            .map_err(|_| refuse("upstream_proxy.url", host, format!("{name} is not a name a certificate can carry")))?,
        (None, crate::target::Host::Ip(ip)) => ServerName::IpAddress((*ip).into()),
    };
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| refuse("upstream_proxy.url", host, e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(ParentTls { connector: tokio_rustls::TlsConnector::from(Arc::new(client)), server_name }))
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
