//! The YAML configuration: serde structs that reject unknown keys, value
//! types that validate while they parse (so errors carry file, line and
//! field), and the compile step that turns a config into a [`Policy`].
//!
//! This module holds the top-level [`Config`], its loading and checks, and
//! the compile step; `sections` the file's sections with their defaults;
//! `values` the self-validating value types. Both are re-exported here, so
//! callers name everything as `config::X`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::Path;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Deserialize;

use crate::policy::provenance::SourceLines;
use crate::policy::ranges::{Nat64Prefix, Transitions};
use crate::policy::{AddressPlan, AllowList, DenyList, Policy, PolicyError, PortSet, Role};

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
    pub tls: Option<crate::tls::TlsConfig>,
    /// How clients are mapped to roles.
    #[serde(default)]
    pub identity: crate::identity::IdentityConfig,
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
    /// Roles by name; `default` is required.
    pub roles: BTreeMap<String, RoleConfig>,
    /// A line added to the body of every policy deny (e.g. where to request
    /// access); a role's own `deny_message` replaces it for that role.
    #[serde(default)]
    pub deny_message: Option<String>,
    /// Where each rule sits in the file it was read from, for provenance.
    #[serde(skip)]
    pub source: Option<Arc<SourceLines>>,
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
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Io { file: file.clone(), source })?;
        Config::from_bytes(&bytes, &file)
    }

    /// Parses and validates the bytes of a config file; `file` names it in errors.
    pub fn from_bytes(bytes: &[u8], file: &str) -> Result<Config, ConfigError> {
        let text = std::str::from_utf8(bytes).map_err(|e| ConfigError::Invalid {
            file: file.to_string(),
            message: format!("not UTF-8 text: {e}"),
            line: Some(bytes[..e.valid_up_to()].iter().filter(|b| **b == b'\n').count() + 1),
        })?;
        Config::from_yaml_str(text, file)
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn from_yaml_str(text: &str, file: &str) -> Result<Config, ConfigError> {
        let mut config: Config = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Invalid {
            file: file.to_string(),
            line: e.location().map(|l| l.line()),
            message: e.to_string(),
        })?;
        config.source = Some(Arc::new(SourceLines::index(file, text)));
        config.check_all().map_err(|refused| ConfigError::Invalid {
            file: file.to_string(),
            line: refused.value.as_ref().and_then(|(path, v)| line_of(text, path, v)),
            message: refused.message,
        })?;
        Ok(config)
    }

    /// Everything the proxy would compile at start: policy, identities and
    /// TLS material (certificate files are read).
    fn check_all(&self) -> Result<(), Refused> {
        for (field, value) in [
            ("limits.max_request_head_bytes", self.limits.max_request_head_bytes),
            ("limits.max_response_head_bytes", self.limits.max_response_head_bytes),
        ] {
            if value < 8192 {
                return Err(format!("{field}: {value} is below the minimum of 8192 bytes").into());
            }
        }
        let policy = self.compile_policy()?;
        crate::identity::Identities::compile(&self.identity, &policy)?;
        crate::dns_listen::DnsRules::compile(self)?;
        if let Some(parent) = &self.upstream_proxy {
            if let Some(missing) = parent.roles.iter().find(|r| !self.roles.contains_key(*r)) {
                return Err(format!("upstream_proxy.roles: role {missing:?} is not defined under roles").into());
            }
            let tls = crate::tls::parent_tls(parent).map_err(|e| Refused::at(e.field.to_string(), e.reason, e.value))?;
            crate::proxy::parent::Parent::with_tls(parent, tls)?;
        }
        if let Some(tls) = &self.tls {
            crate::tls::server_config(tls)?;
        }
        Ok(())
    }

    /// Compiles the policy. Fails only on cross-field problems, which the
    /// message names by field path.
    pub fn compile(&self) -> Result<Policy, String> {
        self.compile_policy().map_err(|r| r.message)
    }

    fn compile_policy(&self) -> Result<Policy, Refused> {
        for (i, carve) in self.allow_ranges.iter().enumerate() {
            if let Some(missing) = carve.roles().iter().find(|r| !self.roles.contains_key(*r)) {
                let reason = format!("role {missing:?} is not defined under roles");
                return Err(Refused::at(format!("allow_ranges[{i}].roles"), reason, missing));
            }
            if let CarveOut::Named { cidr, .. } = carve {
                if let Some((meta, _)) = crate::policy::ranges::denied_ranges()
                    .find(|(net, kind)| *kind == crate::policy::ranges::RangeKind::Metadata && cidr.0.contains(net))
                {
                    return Err(Refused::at(
                        format!("allow_ranges[{i}]"),
                        format!("{} contains the metadata address {meta}, which no carve-out bound to names can lift; narrow the CIDR", cidr.0),
                        cidr.0,
                    ));
                }
            }
        }
        let nat64: Vec<Nat64Prefix> = self.nat64_prefixes.iter().map(|n| n.0).collect();
        let transitions = Transitions::new(nat64.iter().copied());
        let internal = unwrap_all(&transitions, "internal_ranges", self.internal_ranges.iter().map(|r| r.0))?;
        let listeners = [self.listen, self.admin_listen].into_iter().filter(|l| l.port() != 0).collect();
        let self_addrs = crate::host::interface_addrs();
        let carve_outs = unwrap_all(&transitions, "allow_ranges", self.allow_ranges.iter().map(CarveOut::net))?;
        let named = self
            .allow_ranges
            .iter()
            .zip(&carve_outs)
            .filter_map(|(c, net)| match c {
                CarveOut::Named { domains, ports, roles, .. } => Some(crate::policy::NamedCarveOut {
                    net: *net,
                    domains: domains.iter().map(|d| d.0.clone()).collect(),
                    ports: ports.iter().map(|p| p.get()).collect(),
                    roles: roles.clone(),
                }),
                _ => None,
            })
            .collect();
        let mut plan = AddressPlan { carve_outs: Vec::new(), internal, nat64, self_addrs, listeners, named };
        for (i, net) in carve_outs.iter().enumerate() {
            if !plan.overlaps_denied_range(net) {
                return Err(Refused::at(
                    format!("allow_ranges[{i}]"),
                    format!(
                        "{net} is not inside any always-denied or internal range, so carving it out changes \
                         nothing; allow it under roles.<name>.allow.cidrs instead"
                    ),
                    self.allow_ranges[i].net(),
                ));
            }
        }
        let for_all = self.allow_ranges.iter().zip(&carve_outs);
        plan.carve_outs = for_all.clone().filter(|(c, _)| matches!(c, CarveOut::All(_))).map(|(_, n)| *n).collect();
        let mut roles = Vec::with_capacity(self.roles.len());
        for (name, role) in &self.roles {
            let own = for_all.clone().filter(|(c, _)| matches!(c, CarveOut::Roles { .. }) && c.applies_to(name));
            roles.push(compile_role(&transitions, name, role)?.with_carve_outs(own.map(|(_, n)| *n).collect()));
        }
        let policy = Policy::new(roles, DEFAULT_ROLE, &plan).map_err(|e| match e {
            PolicyError::MissingRole(_) => {
                format!("roles: {e}; every config needs a `{DEFAULT_ROLE}` role for clients without an identity")
            }
            PolicyError::TooManyRoles(_) => format!("roles: {e}"),
        })?;
        Ok(match &self.source {
            Some(source) => policy.with_source(source.clone()),
            None => policy,
        })
    }
}

/// A compile-time refusal, with the value it is about when there is one
/// (its line is then found in the file).
#[derive(Debug)]
struct Refused {
    message: String,
    /// The field path and the value as written.
    value: Option<(String, String)>,
}

impl Refused {
    fn at(path: String, reason: String, value: impl fmt::Display) -> Self {
        Refused { message: format!("{path}: {reason}"), value: Some((path, value.to_string())) }
    }
}

impl From<String> for Refused {
    fn from(message: String) -> Self {
        Refused { message, value: None }
    }
}

/// The 1-based line of `value` under the field `path` (`roles.ci.allow.cidrs[1]`):
/// each key of the path is looked for in turn, then the value after the last.
fn line_of(text: &str, path: &str, value: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    // A key at the start of a line, or inside a flow mapping (`{cidr: .., roles: ..}`).
    let has_key = |line: &str, key: &str| {
        line.match_indices(key).any(|(at, _)| {
            let before = line[..at].trim_end_matches(' ');
            line[at + key.len()..].starts_with(':') && (before.is_empty() || before.ends_with(['{', ',', '-']))
        })
    };
    let mut from = 0;
    for key in path.split('.').map(|k| k.split('[').next().unwrap_or(k)) {
        from += lines[from..].iter().position(|l| has_key(l, key))?;
    }
    lines[from..].iter().position(|l| l.contains(value)).map(|i| from + i + 1)
}

/// Rewrites rules that lie inside a declared NAT64 prefix as IPv4 ranges.
fn unwrap_all(transitions: &Transitions, field: &str, nets: impl Iterator<Item = IpNet>) -> Result<Vec<IpNet>, Refused> {
    nets.enumerate()
        .map(|(i, net)| transitions.unwrap_rule(net).map_err(|e| Refused::at(format!("{field}[{i}]"), e, net)))
        .collect()
}

fn compile_role(transitions: &Transitions, name: &str, role: &RoleConfig) -> Result<Role, Refused> {
    let allow = &role.allow;
    let ports = |list: &[NonZeroU16]| PortSet::new(list.iter().map(|p| p.get()));
    let cidrs = |field: &str, list: &[RuleCidr]| {
        unwrap_all(transitions, &format!("roles.{name}.{field}"), list.iter().map(|c| c.0))
    };
    let allow_list = AllowList::new(
        allow.domains.iter().map(|d| d.0.clone()),
        cidrs("allow.cidrs", &allow.cidrs)?,
        ports(&allow.http_ports),
        ports(&allow.connect_ports),
    )
    .resolve_unlisted(allow.resolve_unlisted_names);
    let deny = DenyList::new(role.deny.domains.iter().map(|d| d.0.clone()), cidrs("deny.cidrs", &role.deny.cidrs)?);
    Ok(Role::new(name, role.mode, role.sni_check, allow_list).with_deny(deny).with_allow_ech(role.allow_ech))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Mode;
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
            ("allow_ranges: [8.8.8.0/24]\nroles:\n  default: {}\n", 1, "not inside any always-denied or internal range"),
            ("roles:\n  default:\n    deny:\n      cidrs: [\"2001::/32\"]\n", 4, "Teredo prefix"),
            ("roles:\n  default:\n    deny:\n      cidrs: [\"64:ff9b::/96\"]\n", 4, "covers a whole IPv6 transition form"),
            ("internal_ranges: [\"::ffff:0:0/96\"]\nroles:\n  default: {}\n", 1, "covers a whole"),
            ("nat64_prefixes: [\"2001:db8:64::/80\"]\nroles:\n  default: {}\n", 1, "must be /32, /40, /48, /56, /64 or /96"),
            ("nat64_prefixes: [10.0.0.0/8]\nroles:\n  default: {}\n", 1, "must be IPv6"),
            (
                "nat64_prefixes: [\"2001:db8:64::/96\"]\nroles:\n  default:\n    allow:\n      cidrs:\n        - 8.8.8.0/24\n        - \"2001:db8:64::/96\"\n",
                7,
                "roles.default.allow.cidrs[1]: 2001:db8:64::/96 covers a whole",
            ),
            ("timeouts:\n  tunnel_idle: 5124095576030431h\nroles:\n  default: {}\n", 2, "must be at most 7 days"),
            ("allow_ranges:\n  - {cidr: 169.254.0.0/16, domains: [meta.example]}\nroles:\n  default: {}\n", 2, "contains the metadata address 169.254.169.254/32"),
            ("allow_ranges:\n  - {cidr: 10.0.0.0/8, ports: [443]}\nroles:\n  default: {}\n", 2, "`ports` needs `domains`"),
            ("allow_ranges:\n  - {cidr: 10.0.0.0/8}\nroles:\n  default: {}\n", 2, "needs `roles` or `domains`"),
            ("allow_ranges:\n  - {cidr: 10.0.0.0/8, domains: [a.example], roles: [nobody]}\nroles:\n  default: {}\n", 2, "role \"nobody\" is not defined"),
            ("dns:\n  static:\n    \"bad name!\": [10.0.0.1]\nroles:\n  default: {}\n", 3, "is not a host name"),
            ("roles:\n  default:\n    mode: permissive\n", 3, "unknown variant `permissive`"),
            ("roles:\n  default:\n    allow:\n      http_ports: [0]\n", 4, "nonzero"),
            ("roles:\n  default:\n    allow:\n      connect_ports: [70000]\n", 4, "70000"),
            ("timeouts:\n  tunnel_idle: forever\nroles:\n  default: {}\n", 2, "invalid duration"),
            ("listen: nowhere\nroles:\n  default: {}\n", 1, "invalid socket address"),
            ("upstream_proxy:\n  url: ftp://parent.example\nroles:\n  default: {}\n", 2, "expected http://host[:port] or https://host[:port]"),
            ("upstream_proxy:\n  url: http://parent.example\n  resolve: remote\nroles:\n  default: {}\n", 3, "unknown variant `remote`"),
            ("upstream_proxy:\n  url: https://parent.example\nroles:\n  default: {}\n", 2, "upstream_proxy.url: an https:// parent needs upstream_proxy.ca_file"),
            ("upstream_proxy:\n  url: https://[::1]:3129\n  ca_file: /nonexistent/ca.pem\nroles:\n  default: {}\n", 3, "upstream_proxy.ca_file: cannot load /nonexistent/ca.pem"),
            ("upstream_proxy:\n  url: http://parent.example\n  ca_file: /nonexistent/ca.pem\nroles:\n  default: {}\n", 3, "upstream_proxy.ca_file: only for an https:// parent"),
            ("upstream_proxy:\n  url: http://parent.example\n  server_name: parent.example\nroles:\n  default: {}\n", 3, "upstream_proxy.server_name: only for an https:// parent"),
        ];
        for (text, line, reason) in cases {
            let err = Config::from_yaml_str(text, "bad.yaml").unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with("bad.yaml: "), "{msg}");
            assert!(msg.contains(reason), "want {reason:?} in {msg}");
            assert_eq!(err.line(), Some(*line), "{msg}");
        }
    }

    /// Rules written as transition prefixes become the IPv4 range they
    /// stand for (at parse time, or at compile time inside a declared NAT64
    /// prefix); carve-outs may lift internal ranges.
    #[test]
    fn transition_prefix_rules_and_internal_ranges() {
        let yaml = "internal_ranges: [34.118.0.0/16, \"2600:1900:4000::/44\"]\n\
                    nat64_prefixes: [\"2001:db8:64::/96\"]\n\
                    allow_ranges: [34.118.5.0/24]\n\
                    roles:\n  default:\n    allow:\n      cidrs: [\"::ffff:8.8.8.0/120\", \"2001:db8:64::808:400/120\"]\n\
                    \x20   deny:\n      cidrs: [\"::ffff:8.8.8.8/128\"]\n";
        let c = Config::from_yaml_str(yaml, "t.yaml").unwrap();
        let cidrs: Vec<String> = c.roles["default"].allow.cidrs.iter().map(|r| r.0.to_string()).collect();
        assert_eq!(cidrs, ["8.8.8.0/24", "2001:db8:64::808:400/120"]);
        assert_eq!(c.roles["default"].deny.cidrs[0].0.to_string(), "8.8.8.8/32");
        let p = c.compile().unwrap();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(p.denied_range(ip("34.118.1.1")), Some(crate::policy::ranges::RangeKind::Internal));
        assert_eq!(p.denied_range(ip("34.118.5.1")), None, "carved out");
        assert_eq!(p.denied_range(ip("2600:1900:4000::1")), Some(crate::policy::ranges::RangeKind::Internal));
        assert_eq!(p.denied_range(ip("2001:db8:64::a9fe:a9fe")), Some(crate::policy::ranges::RangeKind::Metadata));
        assert_eq!(p.denied_range(ip("2001:db8:64::808:808")), None);
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

    /// The CA bundle and the name of an `https://` parent are checked when
    /// the config is loaded, each refusal naming its field.
    #[test]
    fn parent_tls_settings_are_checked_at_load() {
        let dir = std::env::temp_dir().join(format!("portcullis-parent-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no PEM here\n").unwrap();
        let broken = dir.join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(vec!["ca.test".to_string()]).unwrap().self_signed(&key).unwrap();
        let good = dir.join("ca.pem");
        std::fs::write(&good, ca.pem()).unwrap();
        let yaml = |ca_file: &std::path::Path, extra: &str| {
            format!("upstream_proxy:\n  url: https://parent.example:3129\n  ca_file: {}\n{extra}roles:\n  default: {{}}\n", ca_file.display())
        };
        for (text, want) in [
            (yaml(&empty, ""), Some("upstream_proxy.ca_file: no certificate in")),
            (yaml(&broken, ""), Some("upstream_proxy.ca_file: ")),
            (yaml(&good, "  server_name: \"bad name!\"\n"), Some("upstream_proxy.server_name: \"bad name!\" is not a DNS name or an IP address")),
            (yaml(&good, "  server_name: parent.test\n  resolve: parent\n"), None),
            (yaml(&good, ""), None),
        ] {
            match (Config::from_yaml_str(&text, "p.yaml"), want) {
                (Ok(_), None) => {}
                (Err(e), Some(want)) => assert!(e.to_string().contains(want), "want {want:?} in {e}"),
                (got, want) => panic!("{text}: got {:?}, want {want:?}", got.map(|_| ())),
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
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
