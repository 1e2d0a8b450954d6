//! Client identities and per-role policy through real sockets: source
//! ranges, Basic and Bearer credentials, report mode, and the TLS listener
//! with client certificates.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use portcullis::config::{Config, ConfigError};
use portcullis::metrics::Metrics;
use portcullis::proxy::Server;
use portcullis::snapshot::Snapshot;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Two teams on one proxy: team-a may reach a.test, team-b may reach b.test.
fn teams_yaml(dns: SocketAddr, port: u16, identity: &str, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n{extra}dns:\n  nameservers: [\"{dns}\"]\nallow_ranges: [127.0.0.1/32]\n{identity}roles:\n  default:\n    allow:\n      domains: [public.example]\n  team-a:\n    allow:\n      domains: [a.test]\n      http_ports: [{port}]\n  team-b:\n    allow:\n      domains: [b.test]\n      http_ports: [{port}]\n  auditor:\n    mode: report\n    allow:\n      domains: [a.test]\n      http_ports: [{port}]\n"
    )
}

async fn start(yaml: &str) -> (SocketAddr, Arc<Metrics>) {
    let config = Config::from_yaml_str(yaml, "identity.yaml").expect("valid config");
    let server = Server::bind(&config).await.expect("bind");
    let (addr, metrics) = (server.local_addr().unwrap(), server.metrics());
    tokio::spawn(server.run());
    (addr, metrics)
}

async fn dns_for_teams() -> DnsServer {
    start_dns(&[("a.test", &["127.0.0.1"]), ("b.test", &["127.0.0.1"])]).await
}

#[tokio::test]
async fn source_ranges_map_to_roles() {
    let dns = dns_for_teams().await;
    let origin = start_http_origin().await;
    let port = origin.port();
    let identity = "identity:\n  sources:\n    - {cidr: 127.0.0.2/32, role: team-a}\n    - {cidr: 127.0.0.3/32, role: team-b}\n";
    let (proxy, _) = start(&teams_yaml(dns.addr, port, identity, "")).await;
    let a = format!("http://a.test:{port}/headers");
    let b = format!("http://b.test:{port}/headers");
    assert_eq!(get_from(proxy, "127.0.0.2", &a, "").await.status, 200);
    let denied = get_from(proxy, "127.0.0.2", &b, "").await;
    assert_eq!((denied.status, denied.header("x-portcullis-deny")), (403, Some("not-allowlisted")));
    assert_eq!(get_from(proxy, "127.0.0.3", &b, "").await.status, 200);
    assert_eq!(get_from(proxy, "127.0.0.3", &a, "").await.status, 403);
    // No identity: the default role, which allows neither.
    assert_eq!(get_from(proxy, "127.0.0.4", &a, "").await.status, 403);
    // The always-denied ranges apply to every role.
    let meta = get_from(proxy, "127.0.0.2", "http://169.254.169.254/", "").await;
    assert_eq!(meta.header("x-portcullis-deny"), Some("denied-range:metadata"));
}

#[tokio::test]
async fn basic_and_bearer_credentials_select_roles_and_never_leak() {
    let dns = dns_for_teams().await;
    let origin = start_http_origin().await;
    let port = origin.port();
    let identity = format!(
        "identity:\n  credentials:\n    - {{user: alice, password_sha256: \"{}\", role: team-a}}\n    - {{token_sha256: \"{}\", role: team-b}}\n",
        sha256_hex("alice-secret"),
        sha256_hex("token-b")
    );
    let (proxy, _) = start(&teams_yaml(dns.addr, port, &identity, "")).await;
    let a = format!("http://a.test:{port}/headers");
    let b = format!("http://b.test:{port}/headers");
    // "alice:alice-secret"
    let basic = "Proxy-Authorization: Basic YWxpY2U6YWxpY2Utc2VjcmV0\r\n";
    let resp = get_from(proxy, "127.0.0.1", &a, basic).await;
    assert_eq!(resp.status, 200);
    let seen = resp.text().to_lowercase();
    assert!(!seen.contains("proxy-authorization") && !seen.contains("ywxpy2u"), "credentials leaked: {seen}");
    assert_eq!(get_from(proxy, "127.0.0.1", &b, basic).await.status, 403);

    let bearer = "Proxy-Authorization: Bearer token-b\r\n";
    let resp = get_from(proxy, "127.0.0.1", &b, bearer).await;
    assert_eq!(resp.status, 200);
    assert!(!resp.text().contains("token-b"), "token leaked: {}", resp.text());
    assert_eq!(get_from(proxy, "127.0.0.1", &a, bearer).await.status, 403);

    // "alice:wrong", an unknown token, an unknown scheme: 407.
    for wrong in ["Basic YWxpY2U6d3Jvbmc=", "Bearer token-x", "Digest abc", "Basic !!!"] {
        let resp = get_from(proxy, "127.0.0.1", &a, &format!("Proxy-Authorization: {wrong}\r\n")).await;
        assert_eq!(resp.status, 407, "{wrong}");
        assert_eq!(resp.header("x-portcullis-deny"), Some("auth-failed"));
        assert!(resp.header("proxy-authenticate").is_some_and(|v| v.contains("realm=\"portcullis\"")));
    }
}

#[tokio::test]
async fn required_credentials_answer_407_when_missing() {
    let dns = dns_for_teams().await;
    let origin = start_http_origin().await;
    let identity = format!(
        "identity:\n  require_credentials: true\n  credentials:\n    - {{token_sha256: \"{}\", role: team-a}}\n",
        sha256_hex("t")
    );
    let (proxy, _) = start(&teams_yaml(dns.addr, origin.port(), &identity, "")).await;
    let url = format!("http://a.test:{}/headers", origin.port());
    let resp = get_from(proxy, "127.0.0.1", &url, "").await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny")), (407, Some("auth-required")));
    let (resp, _) = connect(proxy, "a.test:443").await;
    assert_eq!(resp.status, 407);
    assert_eq!(get_from(proxy, "127.0.0.1", &url, "Proxy-Authorization: Bearer t\r\n").await.status, 200);
}

#[tokio::test]
async fn challenge_mode_asks_unidentified_clients_for_credentials() {
    let dns = dns_for_teams().await;
    let origin = start_http_origin().await;
    let identity = format!(
        "identity:\n  challenge_unauthenticated: true\n  credentials:\n    - {{user: alice, password_sha256: \"{}\", role: team-a}}\n",
        sha256_hex("alice-secret")
    );
    let (proxy, metrics) = start(&teams_yaml(dns.addr, origin.port(), &identity, "")).await;
    let url = format!("http://a.test:{}/headers", origin.port());
    // The default role would deny: a challenge instead of 403, plain and CONNECT.
    let resp = get_from(proxy, "127.0.0.1", &url, "").await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny")), (407, Some("auth-required")));
    assert_eq!(resp.reason, "Proxy Authentication Required (portcullis: auth-required)");
    assert!(resp.header("proxy-authenticate").is_some_and(|v| v.starts_with("Basic")));
    assert!(resp.text().contains("host: a.test\n"), "{}", resp.text());
    let (resp, _) = connect(proxy, "a.test:443").await;
    assert_eq!(resp.status, 407);
    // Identified clients are never challenged: the role's own deny stays 403.
    let alice = "Proxy-Authorization: Basic YWxpY2U6YWxpY2Utc2VjcmV0\r\n";
    assert_eq!(get_from(proxy, "127.0.0.1", &url, alice).await.status, 200);
    let b = format!("http://b.test:{}/headers", origin.port());
    assert_eq!(get_from(proxy, "127.0.0.1", &b, alice).await.status, 403);
    // Wrong credentials in a loop: the first answer keeps the connection,
    // the repeats close it and are counted.
    let wrong = "Proxy-Authorization: Basic YWxpY2U6d3Jvbmc=\r\n";
    let first = get_from(proxy, "127.0.0.5", &url, wrong).await;
    assert_eq!((first.status, first.header("connection")), (407, None));
    for _ in 0..5 {
        let again = get_from(proxy, "127.0.0.5", &url, wrong).await;
        assert_eq!((again.status, again.header("x-portcullis-deny")), (407, Some("auth-failed")));
        assert_eq!(again.header("connection"), Some("close"));
    }
    assert_eq!(metrics.auth_failures_repeated.get(), 5);
}

/// Parses and compiles a config as start-up does.
fn compile(yaml: &str, file: &str) -> Result<Snapshot, ConfigError> {
    Snapshot::compile(&Config::from_yaml_str(yaml, file)?, 1)
}

#[test]
fn challenge_mode_needs_credentials_to_answer_with() {
    let yaml = "identity:\n  challenge_unauthenticated: true\nroles:\n  default: {}\n";
    let err = compile(yaml, "c.yaml").expect_err("refused without credentials");
    assert!(err.to_string().contains("identity.challenge_unauthenticated"), "{err}");
}

#[tokio::test]
async fn report_mode_role_is_counted_as_would_deny() {
    let dns = dns_for_teams().await;
    let origin = start_http_origin().await;
    let port = origin.port();
    let identity = "identity:\n  sources:\n    - {cidr: 127.0.0.5/32, role: auditor}\n";
    let (proxy, metrics) = start(&teams_yaml(dns.addr, port, identity, "")).await;
    let resp = get_from(proxy, "127.0.0.5", &format!("http://b.test:{port}/headers"), "").await;
    assert_eq!(resp.status, 200, "report mode lets a would-deny request through");
    let meta = get_from(proxy, "127.0.0.5", "http://169.254.169.254/", "").await;
    assert_eq!(meta.status, 403, "the metadata address is denied in report mode too");
    let text = metrics.render();
    let line = text
        .lines()
        .find(|l| l.starts_with("portcullis_requests_total") && l.contains("decision=\"would_deny\""))
        .unwrap_or_else(|| panic!("no would_deny sample in\n{text}"));
    assert!(line.contains("reason=\"not-allowlisted\"") && line.contains("role=\"auditor\"") && line.ends_with(" 1"), "{line}");
}

#[tokio::test]
async fn role_deny_entries_and_open_mode() {
    let dns = start_dns(&[("a.test", &["127.0.0.1"]), ("blocked.test", &["127.0.0.1"])]).await;
    let origin = start_http_origin().await;
    let yaml = format!(
        "dns:\n  nameservers: [\"{}\"]\nallow_ranges:\n  - {{cidr: 127.0.0.1/32, roles: [ci]}}\nidentity:\n  sources:\n    - {{cidr: 127.0.0.6/32, role: ci}}\nroles:\n  default: {{}}\n  ci:\n    mode: open\n    deny:\n      domains: [blocked.test]\n",
        dns.addr
    );
    let (proxy, _) = start(&yaml).await;
    let port = origin.port();
    assert_eq!(get_from(proxy, "127.0.0.6", &format!("http://a.test:{port}/headers"), "").await.status, 200, "open mode");
    let resp = get_from(proxy, "127.0.0.6", &format!("http://blocked.test:{port}/"), "").await;
    assert_eq!(resp.header("x-portcullis-deny"), Some("denied-by-role"));
    assert_eq!(get_from(proxy, "127.0.0.6", "http://169.254.169.254/", "").await.status, 403);
    // The carve-out names only `ci`: the default role still may not reach loopback.
    let resp = get_from(proxy, "127.0.0.1", &format!("http://127.0.0.1:{port}/"), "").await;
    assert_eq!(resp.header("x-portcullis-deny"), Some("denied-range:loopback"));
}

/// Test PKI: a CA, a server certificate for 127.0.0.1, and client certificates.
struct Pki {
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("portcullis-pki-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "portcullis test CA");
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca, ca_key }
    }

    /// Issues a certificate; returns (cert path, key path, cert PEM, key PEM).
    fn issue(&self, file: &str, server: bool, uri: Option<&str>, cn: &str) -> (PathBuf, PathBuf, String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        if server {
            params.subject_alt_names.push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        } else {
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        }
        if let Some(uri) = uri {
            params.subject_alt_names.push(rcgen::SanType::URI(uri.try_into().unwrap()));
        }
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let (cert_path, key_path) = (self.dir.join(format!("{file}.pem")), self.dir.join(format!("{file}.key")));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path, cert.pem(), key.serialize_pem())
    }

    fn client_config(&self, client: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match client {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }
}

/// Sends one request over TLS to the proxy; `None` when the TLS session
/// could not be established or was closed without an answer.
async fn tls_request(proxy: SocketAddr, config: Arc<rustls::ClientConfig>, request: &str) -> Option<String> {
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = rustls::pki_types::ServerName::IpAddress("127.0.0.1".parse::<IpAddr>().unwrap().into());
    let mut tls = tokio::time::timeout(STEP, connector.connect(name, tcp)).await.unwrap().ok()?;
    tls.write_all(request.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Read the head, then as many body bytes as Content-Length says.
    while !response_complete(&out) {
        match tokio::time::timeout(STEP, tls.read(&mut buf)).await.expect("answer in time") {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    (!out.is_empty()).then(|| String::from_utf8_lossy(&out).into_owned())
}

fn response_complete(data: &[u8]) -> bool {
    let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
    let head = String::from_utf8_lossy(&data[..end]).to_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    data.len() >= end + 4 + length
}

#[tokio::test]
async fn mtls_listener_maps_certificates_to_roles() {
    let dns = dns_for_teams().await;
    let origin = start_http_origin().await;
    let port = origin.port();
    let pki = Pki::new("mtls");
    let (server_cert, server_key, _, _) = pki.issue("server", true, None, "portcullis");
    let (_, _, a_cert, a_key) = pki.issue("team-a", false, Some("spiffe://test/ns/team-a/sa/worker"), "worker-a");
    let (_, _, b_cert, b_key) = pki.issue("team-b", false, None, "team-b");
    let tls = format!(
        "tls:\n  cert: {}\n  key: {}\n  client_ca: {}\n  require_client_cert: true\n",
        server_cert.display(),
        server_key.display(),
        pki.dir.join("ca.pem").display()
    );
    let identity = "identity:\n  certificates:\n    - {uri: \"spiffe://test/ns/team-a/*\", role: team-a}\n    - {cn: team-b, role: team-b}\n";
    // The real binary: BinaryProxy writes its own loopback listeners.
    let yaml = teams_yaml(dns.addr, port, identity, &tls).replacen("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n", "", 1);
    let binary = BinaryProxy::spawn(&pki.dir.join("portcullis.yaml"), &yaml).await;
    let proxy = binary.addr;
    let request = |host: &str| format!("GET http://{host}:{port}/headers HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");

    let a = pki.client_config(Some((&a_cert, &a_key)));
    let resp = tls_request(proxy, a.clone(), &request("a.test")).await.expect("team-a answer");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let resp = tls_request(proxy, a, &request("b.test")).await.expect("team-a answer");
    assert!(resp.starts_with("HTTP/1.1 403") && resp.contains("not-allowlisted"), "{resp}");

    let b = pki.client_config(Some((&b_cert, &b_key)));
    let resp = tls_request(proxy, b.clone(), &request("b.test")).await.expect("team-b answer");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let connect = "CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n";
    let resp = tls_request(proxy, b, connect).await.expect("team-b answer");
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");

    let anonymous = pki.client_config(None);
    assert_eq!(tls_request(proxy, anonymous, &request("a.test")).await, None, "no certificate, no service");
    let metrics = binary.metrics().await;
    assert_eq!(metric_value(&metrics, "portcullis_connections_refused_total{reason=\"tls_handshake\"}"), 1.0);
    for (role, names) in [("team-a", "a.test"), ("team-b", "b.test")] {
        let lines = binary.lines_with(&[&format!("\"role\":\"{role}\",\"identity\":\"certificate\"")], 2).await;
        assert!(lines.iter().any(|l| l.contains(&format!("\"host\":\"{names}\""))), "{role} by certificate: {lines:#?}");
    }
}

#[test]
fn bad_tls_material_is_refused_like_a_bad_config() {
    let yaml = "tls:\n  cert: /nonexistent/cert.pem\n  key: /nonexistent/key.pem\nroles:\n  default: {}\n";
    let err = compile(yaml, "tls.yaml").unwrap_err().to_string();
    assert!(err.starts_with("tls.yaml: tls.cert: cannot load /nonexistent/cert.pem"), "{err}");
    let yaml = "identity:\n  sources:\n    - {cidr: 10.0.0.0/8, role: nobody}\nroles:\n  default: {}\n";
    let err = compile(yaml, "id.yaml").unwrap_err().to_string();
    assert!(err.contains("identity.sources[0].role: role \"nobody\" is not defined"), "{err}");
    let yaml = "identity:\n  credentials:\n    - {user: bob, token_sha256: \"00\", role: default}\nroles:\n  default: {}\n";
    let err = compile(yaml, "id.yaml").unwrap_err().to_string();
    assert!(err.contains("identity.credentials[0]: give either user with password_sha256"), "{err}");
}

/// The red team's N13: a rotated `token_file` (a Kubernetes Secret
/// update) is picked up by the file watch, without SIGHUP and with the
/// config unchanged: the old token is refused, the new one accepted.
/// Through the real binary.
#[tokio::test]
async fn a_rotated_token_file_is_picked_up_without_a_signal() {
    let origin = start_http_origin().await;
    let dir = std::env::temp_dir().join(format!("portcullis-token-rotation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "old-token\n").unwrap();
    let yaml = format!(
        "reload:\n  interval: 200ms\nallow_ranges: [127.0.0.0/8]\nidentity:\n  require_credentials: true\n  credentials:\n    - {{token_file: {}, role: ci}}\n\
         roles:\n  default: {{}}\n  ci:\n    mode: open\n    allow: {{http_ports: [{}]}}\n",
        token.display(),
        origin.port()
    );
    let proxy = BinaryProxy::spawn(&dir.join("portcullis.yaml"), &yaml).await;
    let url = format!("http://127.0.0.1:{}/", origin.port());
    let with = |bearer: &'static str| {
        let request = format!("GET {url} HTTP/1.1\r\nHost: 127.0.0.1\r\nProxy-Authorization: Bearer {bearer}\r\nConnection: close\r\n\r\n");
        async move { send_raw(proxy.addr, &request).await }
    };
    assert_eq!(with("old-token").await.status, 200, "the first token is accepted");
    assert_eq!(with("new-token").await.status, 407, "the next one not yet");

    let staged = dir.join("token.staged");
    std::fs::write(&staged, "new-token\n").unwrap();
    std::fs::rename(&staged, &token).unwrap();
    wait_until("the rotated token is accepted", || async { (with("new-token").await.status == 200).then_some(()) }).await;
    let old = with("old-token").await;
    assert_eq!((old.status, old.header("x-portcullis-deny")), (407, Some("auth-failed")), "the old token is refused");
    // The log is written in batches: wait for the reload's line.
    let lines = wait_until("the reload's log line", || async {
        let lines = proxy.log.lock().unwrap().clone();
        lines.iter().any(|l| l.contains("config reloaded")).then_some(lines)
    })
    .await;
    assert!(lines.iter().any(|l| l.contains("config reloaded") && l.contains("file-change")), "reloaded by the watch: {lines:?}");
    assert!(!lines.iter().any(|l| l.contains("sighup")), "no signal was sent");
    std::fs::remove_dir_all(&dir).unwrap();
}
