//! Warnings for rules that load but can never match, printed by
//! `portcullis validate`: the config is valid, yet a rule in it does nothing,
//! which is almost always a misunderstanding worth telling its author about.
//!
//! A pure function of the loaded config and its compiled policy; nothing here
//! changes what the proxy decides.

use std::fmt;

use ipnet::IpNet;

use crate::config::{CarveOut, Config};
use crate::policy::ranges::{self, RangeKind};
use crate::policy::Policy;

/// Ports that carry TLS from the first byte: a client asks for them with
/// `CONNECT` (an `https://` URL), never as a forwarded plain-HTTP request.
const TLS_PORTS: &[(u16, &str)] = &[
    (443, "HTTPS"),
    (465, "SMTP over TLS"),
    (636, "LDAP over TLS"),
    (853, "DNS over TLS"),
    (990, "FTP over TLS"),
    (993, "IMAP over TLS"),
    (995, "POP3 over TLS"),
];

/// One rule that can never match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The field, e.g. `roles.ci.allow.cidrs[0]`.
    pub field: String,
    /// Its 1-based line in the config file, when known.
    pub line: Option<u32>,
    /// Why it never matches and what to write instead.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {}", self.field, self.message),
            None => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

/// Every allow rule of `config` that `policy` (compiled from it) can never
/// let a request through, in file order.
pub fn lint(config: &Config, policy: &Policy) -> Vec<Warning> {
    let mut warnings = Vec::new();
    for (name, role) in &config.roles {
        for (i, cidr) in role.allow.cidrs.iter().enumerate() {
            if let Some(kind) = unreachable_cidr(config, policy, name, cidr.0) {
                warnings.push(cidr_warning(config, name, i, cidr.0, kind));
            }
        }
        for (i, port) in role.allow.http_ports.iter().enumerate() {
            if let Some((_, protocol)) = TLS_PORTS.iter().find(|(p, _)| *p == port.get()) {
                let field = format!("roles.{name}.allow.http_ports");
                warnings.push(Warning {
                    line: line_of(config, &field, i),
                    field: format!("{field}[{i}]"),
                    message: format!(
                        "port {port} is the {protocol} port: clients reach it with CONNECT (an https:// URL), never as a \
                         forwarded plain-HTTP request, so this entry admits nothing; list it under \
                         roles.{name}.allow.connect_ports instead"
                    ),
                });
            }
        }
    }
    warnings
}

/// The kind of the always-denied (or declared internal) range that holds all
/// of `net`, when no `allow_ranges` entry for `role` carves any of it out:
/// then the `cidrs` rule can never admit an address.
fn unreachable_cidr(config: &Config, policy: &Policy, role: &str, net: IpNet) -> Option<RangeKind> {
    let kind = ranges::denied_ranges()
        .chain(config.internal_ranges.iter().map(|r| (r.0, RangeKind::Internal)))
        .find(|(denied, _)| denied.contains(&net))
        .map(|(_, kind)| kind)?;
    let carved = config
        .allow_ranges
        .iter()
        .any(|carve| carve.applies_to(role) && overlaps(&carve.net(), &net));
    // The compiled policy agrees the range is denied for this role (a global
    // carve-out would have lifted it there too).
    let role_id = policy.role_id(role)?;
    let denied = policy.denied_range_for(role_id, net.network()).is_some();
    (!carved && denied).then_some(kind)
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn cidr_warning(config: &Config, role: &str, i: usize, net: IpNet, kind: RangeKind) -> Warning {
    let field = format!("roles.{role}.allow.cidrs");
    let example = match net {
        IpNet::V4(_) => "10.1.2.3/32",
        IpNet::V6(_) => "fd12:3456::7/128",
    };
    let named = config.allow_ranges.iter().any(|c| matches!(c, CarveOut::Named { .. }));
    let hint = if named { "extend an allow_ranges entry" } else { "add an allow_ranges entry" };
    Warning {
        line: line_of(config, &field, i),
        field: format!("{field}[{i}]"),
        message: format!(
            "{net} lies inside an always-denied range ({}), and no allow_ranges entry carves any of it out for role \
             {role}, so this rule can never admit an address; to reach a host there, {hint} bound to its name, e.g. \
             `allow_ranges: [{{cidr: {example}, domains: [mirror.corp.example], ports: [443]}}]`",
            kind.as_str()
        ),
    }
}

fn line_of(config: &Config, path: &str, i: usize) -> Option<u32> {
    config.source.as_ref()?.item(path, i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warnings(yaml: &str) -> Vec<String> {
        let config = Config::from_yaml_str(yaml, "t.yaml").expect("valid config");
        let policy = crate::snapshot::compile_policy(&config).expect("compiles");
        lint(&config, &policy).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn rules_that_can_never_match_are_named_with_their_line() {
        let cases: &[(&str, &[&str])] = &[
            // A public range and the default ports: nothing to say.
            ("roles:\n  default:\n    allow:\n      cidrs: [8.8.8.0/24]\n", &[]),
            (
                "roles:\n  default:\n    allow:\n      cidrs: [8.8.8.0/24, 10.0.0.0/8]\n",
                &["line 4: roles.default.allow.cidrs[1]: 10.0.0.0/8 lies inside an always-denied range (private)"],
            ),
            ("roles:\n  default:\n    allow:\n      cidrs: [169.254.0.0/16]\n", &["(link-local)"]),
            ("roles:\n  default:\n    allow:\n      cidrs: [\"fd00::/8\"]\n", &["(private)"]),
            (
                "internal_ranges: [34.118.0.0/16]\nroles:\n  default:\n    allow:\n      cidrs: [34.118.5.0/24]\n",
                &["(internal)"],
            ),
            // Wider than any denied range: part of it can match.
            ("roles:\n  default:\n    allow:\n      cidrs: [0.0.0.0/0]\n", &[]),
            // Carved out, globally, for the role, or bound to names: it can match.
            ("allow_ranges: [10.0.5.0/24]\nroles:\n  default:\n    allow:\n      cidrs: [10.0.0.0/8]\n", &[]),
            (
                "allow_ranges:\n  - {cidr: 10.0.5.0/24, roles: [default]}\nroles:\n  default:\n    allow:\n      cidrs: [10.0.5.0/24]\n",
                &[],
            ),
            (
                "allow_ranges:\n  - {cidr: 10.0.5.7/32, domains: [m.corp.example]}\nroles:\n  default:\n    allow:\n      cidrs: [10.0.5.0/24]\n",
                &[],
            ),
            // Carved out for another role only: still never for this one.
            (
                "allow_ranges:\n  - {cidr: 10.0.5.0/24, roles: [ci]}\nroles:\n  default:\n    allow:\n      cidrs: [10.0.5.0/24]\n  ci: {}\n",
                &["roles.default.allow.cidrs[0]: 10.0.5.0/24"],
            ),
            (
                "roles:\n  default:\n    allow:\n      http_ports: [80, 443]\n",
                &["line 4: roles.default.allow.http_ports[1]: port 443 is the HTTPS port"],
            ),
            ("roles:\n  default:\n    allow:\n      connect_ports: [443, 8443]\n      http_ports: [80, 8080]\n", &[]),
        ];
        for (yaml, want) in cases {
            let got = warnings(yaml);
            assert_eq!(got.len(), want.len(), "{yaml}: {got:?}");
            for (got, want) in got.iter().zip(want.iter()) {
                assert!(got.contains(want), "{yaml}: {got:?} lacks {want:?}");
            }
        }
    }
}
