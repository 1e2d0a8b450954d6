//! The YAML configuration, as schema and values: serde structs that reject
//! unknown keys, and value types that validate while they parse (so errors
//! carry file, line and field). Nothing here compiles the runtime: checks
//! that span fields, and the compile into a running policy, live in
//! `crate::snapshot`, the one compile step. Config imports only value
//! leaves (`policy::{kind, domain, ranges}`, `target`, `source_lines`),
//! never the engine, the proxy, TLS or identities.
//!
//! This module holds the top-level [`Config`] and its loading; `sections`
//! the file's sections with their defaults; `values` the self-validating
//! value types. Both are re-exported here, so callers name everything as
//! `config::X`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use crate::source_lines::SourceLines;

/// The role that applies to clients without an identity.
pub const DEFAULT_ROLE: &str = "default";

/// A configuration that was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Io { file: String, source: std::io::Error },
    /// The YAML did not parse or a value was invalid; the message names the
    /// field and the line.
    #[error("{file}: {message}")]
    Invalid { file: String, message: String, line: Option<usize> },
}

impl From<crate::input::InputError> for ConfigError {
    fn from(e: crate::input::InputError) -> Self {
        let message = match e.line {
            Some(line) => format!("{} at line {line}", e.reason),
            None => e.reason,
        };
        ConfigError::Invalid { file: e.file, message, line: e.line }
    }
}

impl ConfigError {
    /// The 1-based line of the offending value, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Invalid { line, .. } => *line,
            ConfigError::Io { .. } => None,
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the proxy listens.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where the admin endpoints (metrics, health) listen.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Where connections redirected by netfilter (`REDIRECT`) arrive; off
    /// when absent. See `deploy/transparent/redirect.sh`.
    #[serde(default)]
    pub transparent_listen: Option<SocketAddr>,
    /// Where the DNS listener answers (UDP and TCP); off when absent. See
    /// docs/DNS.md.
    #[serde(default)]
    pub dns_listen: Option<SocketAddr>,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub dns: DnsConfig,
    /// Serve the proxy port over TLS (an `https://` proxy).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// How clients are mapped to roles.
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub reload: ReloadConfig,
    /// Exact carve-outs from the always-denied and internal ranges.
    #[serde(default)]
    pub allow_ranges: Vec<CarveOut>,
    /// Ranges internal to this deployment (pod, service and node CIDRs,
    /// privately used public ranges, global IPv6 cluster prefixes): denied
    /// as `denied-range:internal` unless carved out.
    #[serde(default)]
    pub internal_ranges: Vec<RuleCidr>,
    /// Network-specific NAT64 prefixes (RFC 6052): addresses inside are
    /// judged by the IPv4 address they carry, like `64:ff9b::/96`.
    #[serde(default)]
    pub nat64_prefixes: Vec<Nat64Rule>,
    /// A parent proxy that allowed requests leave through.
    #[serde(default)]
    pub upstream_proxy: Option<UpstreamProxyConfig>,
    /// How the proxy's own upstream sockets are made (`upstream.mark`).
    #[serde(default)]
    pub upstream: UpstreamSockets,
    /// Roles by name; `default` is required.
    pub roles: BTreeMap<String, RoleConfig>,
    /// A line added to the body of every policy deny (e.g. where to request
    /// access); a role's own `deny_message` replaces it for that role.
    #[serde(default)]
    pub deny_message: Option<String>,
    /// Where each rule sits in the file it was read from, for provenance.
    #[serde(skip)]
    pub source: Option<Arc<SourceLines>>,
    /// The text the config was parsed from, to find the line of a value
    /// that the compile step refuses.
    #[serde(skip)]
    text: Option<Arc<str>>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 3128))
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9128))
}

mod sections;
mod values;

pub use sections::*;
pub use values::*;

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = crate::input::read(path, crate::input::CONFIG).map_err(ConfigError::from)?;
        Config::from_yaml_str(&text, &path.display().to_string())
    }

    /// Parses config text and validates each value; `file` names it in
    /// errors. Checks across fields run when the config is compiled
    /// (`Snapshot::compile`).
    pub fn from_yaml_str(text: &str, file: &str) -> Result<Config, ConfigError> {
        crate::input::check(text, file, crate::input::CONFIG)?;
        let mut config: Config = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Invalid {
            file: file.to_string(),
            line: e.location().map(|l| l.line()),
            message: e.to_string(),
        })?;
        config.source = Some(Arc::new(SourceLines::index(file, text)));
        config.text = Some(text.into());
        Ok(config)
    }

    /// The files the compile step reads besides the config itself (bearer
    /// token files, TLS certificates, keys and CA bundles), so that a
    /// reload can follow their rotation as it follows the config's.
    pub fn referenced_files(&self) -> Vec<&Path> {
        let tokens = self.identity.credentials.iter().filter_map(|c| c.token_file.as_deref());
        let tls = self.tls.iter().flat_map(|t| [Some(t.cert.as_path()), Some(t.key.as_path()), t.client_ca.as_deref()]).flatten();
        let parent = self.upstream_proxy.iter().filter_map(|p| p.ca_file.as_deref());
        tokens.chain(tls).chain(parent).collect()
    }

    /// The file the config was read from, for errors (`config` when it was
    /// not read from text).
    pub fn file(&self) -> &str {
        self.source.as_deref().map_or("config", SourceLines::file)
    }

    /// A refusal about this config: `message`, at the line where `value`
    /// sits under the field `path` when both are given and found (the
    /// message then ends with it, as the parser's own messages do).
    pub fn refusal(&self, message: String, value: Option<(&str, &str)>) -> ConfigError {
        let text = self.text.as_deref();
        let line = value.zip(text).and_then(|((path, value), text)| crate::source_lines::line_of(text, path, value));
        let message = match line {
            Some(line) => format!("{message} at line {line}"),
            None => message,
        };
        ConfigError::Invalid { file: self.file().to_string(), message, line }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Mode;
    use std::num::NonZeroU16;
    use std::time::Duration;

    const MINIMAL: &str = "roles:\n  default: {}\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_yaml_str(MINIMAL, "t.yaml").unwrap();
        assert_eq!(c.listen, "127.0.0.1:3128".parse().unwrap());
        assert_eq!(c.admin_listen, "127.0.0.1:9128".parse().unwrap());
        assert_eq!(c.timeouts.request_header.0, Duration::from_secs(10));
        assert!(c.allow_ranges.is_empty());
        let role = &c.roles["default"];
        assert_eq!(role.mode, Mode::Enforce);
        assert_eq!(role.allow.http_ports, vec![NonZeroU16::new(80).unwrap()]);
    }

    #[test]
    fn durations() {
        let cases = [("500ms", Some(500)), ("10s", Some(10_000)), ("5m", Some(300_000)), ("1h", Some(3_600_000)), ("0s", None), ("10", None), ("s", None), ("1.5s", None), ("10 days", None), ("168h", Some(604_800_000)), ("169h", None), ("5124095576030431h", None), ("18446744073709551615ms", None), ("99999999999999999999s", None)];
        for (text, want) in cases {
            let got = ConfigDuration::parse(text).ok().map(|d| d.0.as_millis() as u64);
            assert_eq!(got, want, "{text}");
        }
    }

    #[test]
    fn parent_urls_take_the_default_port_of_their_scheme() {
        let cases = [
            ("http://parent.example", Some(("parent.example:3128", false))),
            ("http://parent.example:8080/", Some(("parent.example:8080", false))),
            ("https://parent.example", Some(("parent.example:443", true))),
            ("https://10.1.2.3:3129", Some(("10.1.2.3:3129", true))),
            ("https://[2001:db8::1]", Some(("[2001:db8::1]:443", true))),
            ("socks5://parent.example:1080", None),
            ("https://user:pw@parent.example", None),
            ("https://parent.example/path", None),
            ("https://", None),
            ("parent.example:3128", None),
        ];
        for (text, want) in cases {
            let got = ParentUrl::parse(text).ok().map(|u| (u.target.to_string(), u.tls));
            assert_eq!(got, want.map(|(t, tls)| (t.to_string(), tls)), "{text}");
        }
    }

    /// The files a reload watches besides the config: every file the
    /// compile step reads.
    #[test]
    fn referenced_files_are_every_file_the_compile_reads() {
        let yaml = "tls: {cert: /c.pem, key: /k.pem, client_ca: /ca.pem}\n\
                    identity:\n  credentials:\n    - {token_file: /t1, role: default}\n    - {token_sha256: \"00\", role: default}\n\
                    upstream_proxy: {url: \"https://p.example\", ca_file: /pca.pem}\nroles:\n  default: {}\n";
        let c = Config::from_yaml_str(yaml, "f.yaml").unwrap();
        let files: Vec<&str> = c.referenced_files().iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(files, ["/t1", "/c.pem", "/k.pem", "/ca.pem", "/pca.pem"]);
    }

    #[test]
    fn missing_file_is_refused() {
        let err = Config::load(Path::new("/nonexistent/portcullis.yaml")).unwrap_err().to_string();
        assert!(err.starts_with("/nonexistent/portcullis.yaml: cannot read"), "{err}");
    }

    #[test]
    fn shipped_config_is_valid_and_carves_out_nothing() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/portcullis.yaml");
        let c = Config::load(&path).unwrap();
        assert!(c.allow_ranges.is_empty());
        assert_eq!(c.listen, "127.0.0.1:3128".parse().unwrap());
        assert_eq!(c.roles["default"].mode, Mode::Enforce);
    }
}
