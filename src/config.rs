//! The YAML configuration: serde structs that reject unknown keys, value
//! types that validate while they parse (so errors carry file, line and
//! field), and the compile step that turns a config into a [`Policy`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::policy::domain::DomainPattern;
use crate::policy::{self, AllowList, DenyList, Mode, Policy, PortSet, Role};

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
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub dns: DnsConfig,
    /// Serve the proxy port over TLS (an `https://` proxy).
    #[serde(default)]
    pub tls: Option<crate::tls::TlsConfig>,
    /// How clients are mapped to roles.
    #[serde(default)]
    pub identity: crate::identity::IdentityConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub reload: ReloadConfig,
    /// Exact carve-outs from the always-denied ranges.
    #[serde(default)]
    pub allow_ranges: Vec<CarveOut>,
    /// Roles by name; `default` is required.
    pub roles: BTreeMap<String, RoleConfig>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 3128))
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9128))
}

/// Time limits on each phase of a request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Reading a request head (slowloris defence).
    pub request_header: ConfigDuration,
    /// Establishing the upstream TCP connection.
    pub upstream_connect: ConfigDuration,
    /// Waiting for the upstream response head on forwarded HTTP.
    pub upstream_response: ConfigDuration,
    /// A tunnel with no bytes in either direction for this long is closed.
    pub tunnel_idle: ConfigDuration,
    /// An idle pooled upstream connection is closed after this long.
    pub upstream_idle: ConfigDuration,
    /// On SIGTERM, in-flight requests and tunnels get this long to finish.
    pub shutdown_grace: ConfigDuration,
}

/// Bounds on concurrent client connections.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Open client connections in total.
    pub max_connections: usize,
    /// Open client connections from one source IP address.
    pub max_connections_per_client: usize,
    /// Largest request head (request line and headers) a client may send,
    /// at least 8192. hyper enforces it per read buffer, so a head is
    /// refused (431, or 414 for a URI over 65,534 bytes) somewhere between
    /// this size and twice it.
    pub max_request_head_bytes: usize,
    /// Largest response head an upstream may send; larger gets 502.
    pub max_response_head_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_connections_per_client: 1_000,
            max_request_head_bytes: 64 * 1024,
            max_response_head_bytes: 256 * 1024,
        }
    }
}

/// How config changes are picked up (SIGHUP always reloads).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// Watch the config file and reload when its content changes.
    pub watch: bool,
    /// How often the file is checked.
    pub interval: ConfigDuration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig { watch: true, interval: ConfigDuration(Duration::from_secs(2)) }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            request_header: ConfigDuration(Duration::from_secs(10)),
            upstream_connect: ConfigDuration(Duration::from_secs(5)),
            upstream_response: ConfigDuration(Duration::from_secs(60)),
            tunnel_idle: ConfigDuration(Duration::from_secs(300)),
            upstream_idle: ConfigDuration(Duration::from_secs(60)),
            shutdown_grace: ConfigDuration(Duration::from_secs(30)),
        }
    }
}

/// How names are resolved.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Name servers as `ip:port`; empty means the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Per-query timeout.
    pub timeout: ConfigDuration,
    /// Answers are cached no longer than this, whatever their TTL.
    pub max_ttl: ConfigDuration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: ConfigDuration(Duration::from_secs(2)),
            max_ttl: ConfigDuration(Duration::from_secs(300)),
        }
    }
}

/// One role: its mode and allow-list.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    #[serde(default)]
    pub mode: Mode,
    /// On CONNECT to a destination allowed by domain, require the TLS
    /// ClientHello's SNI to name the CONNECT host.
    #[serde(default = "default_true")]
    pub sni_check: bool,
    #[serde(default)]
    pub allow: AllowConfig,
    #[serde(default)]
    pub deny: DenyConfig,
}

/// Destinations a role may never reach, whatever its allow-list or mode.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DenyConfig {
    pub domains: Vec<DomainRule>,
    pub cidrs: Vec<Cidr>,
}

fn default_true() -> bool {
    true
}

/// Destinations a role may reach.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AllowConfig {
    /// Exact names and `*.suffix` wildcards.
    pub domains: Vec<DomainRule>,
    /// Address prefixes; a name is allowed when every address it resolves to is inside.
    pub cidrs: Vec<Cidr>,
    /// Ports allowed for plain HTTP forwarding.
    pub http_ports: Vec<NonZeroU16>,
    /// Ports allowed for CONNECT tunnels.
    pub connect_ports: Vec<NonZeroU16>,
}

impl Default for AllowConfig {
    fn default() -> Self {
        AllowConfig {
            domains: Vec::new(),
            cidrs: Vec::new(),
            http_ports: vec![NonZeroU16::new(80).expect("80 is not zero")],
            connect_ports: vec![NonZeroU16::new(443).expect("443 is not zero")],
        }
    }
}

/// A duration written as `500ms`, `10s`, `5m` or `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

impl ConfigDuration {
    /// Parses the textual form.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let value: u64 = digits
            .parse()
            .map_err(|_| format!("invalid duration {text:?}: expected a number followed by ms, s, m or h"))?;
        let duration = match unit {
            "ms" => Duration::from_millis(value),
            "s" => Duration::from_secs(value),
            "m" => Duration::from_secs(value * 60),
            "h" => Duration::from_secs(value * 3600),
            _ => return Err(format!("invalid duration {text:?}: unit must be ms, s, m or h")),
        };
        if duration.is_zero() {
            return Err(format!("invalid duration {text:?}: must be greater than zero"));
        }
        Ok(ConfigDuration(duration))
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ConfigDuration::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A domain allow-list entry, validated and normalised while parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRule(pub DomainPattern);

impl<'de> Deserialize<'de> for DomainRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        DomainPattern::parse(&text)
            .map(DomainRule)
            .map_err(|e| serde::de::Error::custom(format!("invalid domain pattern {text:?}: {e}")))
    }
}

/// A CIDR whose host bits are zero (`10.0.0.0/8`, not `10.0.0.1/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

impl Cidr {
    fn parse(text: &str) -> Result<Self, String> {
        let net: IpNet = match text.parse() {
            Ok(net) => net,
            // A bare address means the single host.
            Err(_) => text
                .parse::<std::net::IpAddr>()
                .map(IpNet::from)
                .map_err(|_| format!("invalid CIDR {text:?}"))?,
        };
        if net.trunc() != net {
            return Err(format!("CIDR {text:?} has host bits set; did you mean {}?", net.trunc()));
        }
        Ok(Cidr(net))
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Cidr::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// An operator's exception to the always-denied ranges, for every role
/// (`- 10.1.0.0/16`) or only the named ones (`- {cidr: 10.1.0.0/16, roles: [ci]}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CarveOut {
    All(CarvedRange),
    Roles { cidr: CarvedRange, roles: Vec<String> },
}

impl CarveOut {
    /// The carved-out range.
    pub fn net(&self) -> IpNet {
        match self {
            CarveOut::All(r) | CarveOut::Roles { cidr: r, .. } => r.0,
        }
    }

    /// True when this carve-out applies to `role`.
    pub fn applies_to(&self, role: &str) -> bool {
        match self {
            CarveOut::All(_) => true,
            CarveOut::Roles { roles, .. } => roles.iter().any(|r| r == role),
        }
    }
}

impl<'de> Deserialize<'de> for CarveOut {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = CarveOut;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a CIDR, or a map with `cidr` and `roles`")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<CarveOut, E> {
                CarvedRange::parse(text).map(CarveOut::All).map_err(E::custom)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<CarveOut, A::Error> {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct ForRoles {
                    cidr: CarvedRange,
                    roles: Vec<String>,
                }
                let r = ForRoles::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(CarveOut::Roles { cidr: r.cidr, roles: r.roles })
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A carved-out range. It must overlap an always-denied range: a carve-out
/// that changes nothing is a mistake worth reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CarvedRange(pub IpNet);

impl CarvedRange {
    fn parse(text: &str) -> Result<Self, String> {
        let Cidr(net) = Cidr::parse(text)?;
        if !policy::overlaps_denied_range(&net) {
            return Err(format!(
                "{net} is not inside any always-denied range, so carving it out changes nothing; \
                 allow it under roles.<name>.allow.cidrs instead"
            ));
        }
        Ok(CarvedRange(net))
    }
}

impl<'de> Deserialize<'de> for CarvedRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        CarvedRange::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for CarvedRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { file: file.clone(), source })?;
        Config::from_yaml_str(&text, &file)
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn from_yaml_str(text: &str, file: &str) -> Result<Config, ConfigError> {
        let config: Config = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Invalid {
            file: file.to_string(),
            line: e.location().map(|l| l.line()),
            message: e.to_string(),
        })?;
        config.check_all().map_err(|message| ConfigError::Invalid { file: file.to_string(), message, line: None })?;
        Ok(config)
    }

    /// Everything the proxy would compile at start: policy, identities and
    /// TLS material (certificate files are read).
    fn check_all(&self) -> Result<(), String> {
        for (field, value) in [
            ("limits.max_request_head_bytes", self.limits.max_request_head_bytes),
            ("limits.max_response_head_bytes", self.limits.max_response_head_bytes),
        ] {
            if value < 8192 {
                return Err(format!("{field}: {value} is below the minimum of 8192 bytes"));
            }
        }
        let policy = self.compile()?;
        crate::identity::Identities::compile(&self.identity, &policy)?;
        if let Some(tls) = &self.tls {
            crate::tls::server_config(tls)?;
        }
        Ok(())
    }

    /// Compiles the policy. Fails only on cross-field problems, which the
    /// message names by field path.
    pub fn compile(&self) -> Result<Policy, String> {
        for (i, carve) in self.allow_ranges.iter().enumerate() {
            if let CarveOut::Roles { roles, .. } = carve {
                if let Some(missing) = roles.iter().find(|r| !self.roles.contains_key(*r)) {
                    return Err(format!("allow_ranges[{i}].roles: role {missing:?} is not defined under roles"));
                }
            }
        }
        let roles = self
            .roles
            .iter()
            .map(|(name, role)| {
                let own = self.allow_ranges.iter().filter(|c| matches!(c, CarveOut::Roles { .. }) && c.applies_to(name));
                compile_role(name, role).with_carve_outs(own.map(CarveOut::net).collect())
            })
            .collect();
        let carve_outs: Vec<IpNet> =
            self.allow_ranges.iter().filter(|c| matches!(c, CarveOut::All(_))).map(CarveOut::net).collect();
        Policy::new(roles, DEFAULT_ROLE, &carve_outs)
            .map_err(|e| format!("roles: {e}; every config needs a `{DEFAULT_ROLE}` role for clients without an identity"))
    }
}

fn compile_role(name: &str, role: &RoleConfig) -> Role {
    let allow = &role.allow;
    let ports = |list: &[NonZeroU16]| PortSet::new(list.iter().map(|p| p.get()));
    Role::new(
        name,
        role.mode,
        role.sni_check,
        AllowList::new(
            allow.domains.iter().map(|d| d.0.clone()),
            allow.cidrs.iter().map(|c| c.0),
            ports(&allow.http_ports),
            ports(&allow.connect_ports),
        ),
    )
    .with_deny(DenyList::new(role.deny.domains.iter().map(|d| d.0.clone()), role.deny.cidrs.iter().map(|c| c.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let cases = [("500ms", Some(500)), ("10s", Some(10_000)), ("5m", Some(300_000)), ("1h", Some(3_600_000)), ("0s", None), ("10", None), ("s", None), ("1.5s", None), ("10 days", None)];
        for (text, want) in cases {
            let got = ConfigDuration::parse(text).ok().map(|d| d.0.as_millis() as u64);
            assert_eq!(got, want, "{text}");
        }
    }

    /// Each bad config is refused with the file name, the line and a reason.
    #[test]
    fn bad_configs_name_file_line_and_reason() {
        let cases: &[(&str, usize, &str)] = &[
            ("roles:\n  default:\n    allow:\n      domainz: [a.com]\n", 4, "unknown field `domainz`"),
            ("listen: 127.0.0.1:3128\nbogus: 1\nroles:\n  default: {}\n", 2, "unknown field `bogus`"),
            ("roles:\n  default:\n    allow:\n      domains:\n        - ok.com\n        - \"*bad.com\"\n", 5, "invalid domain pattern"),
            ("roles:\n  default:\n    allow:\n      domains: [\"2852039166\"]\n", 4, "non-canonical IPv4"),
            ("roles:\n  default:\n    allow:\n      cidrs: [10.0.0.1/8]\n", 4, "host bits set"),
            ("roles:\n  default:\n    allow:\n      cidrs: [not-a-cidr]\n", 4, "invalid CIDR"),
            ("allow_ranges: [8.8.8.0/24]\nroles:\n  default: {}\n", 1, "not inside any always-denied range"),
            ("roles:\n  default:\n    mode: permissive\n", 3, "unknown variant `permissive`"),
            ("roles:\n  default:\n    allow:\n      http_ports: [0]\n", 4, "nonzero"),
            ("roles:\n  default:\n    allow:\n      connect_ports: [70000]\n", 4, "70000"),
            ("timeouts:\n  tunnel_idle: forever\nroles:\n  default: {}\n", 2, "invalid duration"),
            ("listen: nowhere\nroles:\n  default: {}\n", 1, "invalid socket address"),
        ];
        for (text, line, reason) in cases {
            let err = Config::from_yaml_str(text, "bad.yaml").unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with("bad.yaml: "), "{msg}");
            assert!(msg.contains(reason), "want {reason:?} in {msg}");
            assert_eq!(err.line(), Some(*line), "{msg}");
        }
    }

    #[test]
    fn head_limits_have_a_floor() {
        let err = Config::from_yaml_str("limits:\n  max_request_head_bytes: 100\nroles:\n  default: {}\n", "l.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.max_request_head_bytes: 100 is below the minimum of 8192"), "{err}");
    }

    #[test]
    fn missing_default_role_is_refused() {
        let err = Config::from_yaml_str("roles:\n  team-a: {}\n", "x.yaml").unwrap_err().to_string();
        assert!(err.contains("x.yaml: roles:") && err.contains("default"), "{err}");
        let err = Config::from_yaml_str("listen: 127.0.0.1:1\n", "x.yaml").unwrap_err().to_string();
        assert!(err.contains("missing field `roles`"), "{err}");
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
