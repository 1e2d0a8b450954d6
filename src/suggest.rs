//! `portcullis suggest`: grow an allow-list from the decision log.
//!
//! Reads `would_deny` (report mode) and `deny` lines and proposes the
//! fewest allow-list additions that would admit them: exact names, a
//! `*.suffix` wildcard where two or more names share a suffix at or below
//! their registrable domain (Public Suffix List, never above it), `/32` or
//! `/128` CIDRs for address literals, and missing ports. Whatever lies in
//! the always-denied ranges or names is listed as blocked regardless and
//! never suggested; denials an allow-list cannot lift are listed apart.
//!
//! The suffixes are the PSL's ICANN and private sections (`github.io`,
//! `s3.amazonaws.com`, `cloudfront.net`: each label below is another
//! customer's) and the few multi-tenant hosts the PSL does not list
//! ([`MULTI_TENANT`]). A public suffix itself (`com`, `co.uk`,
//! `storage.googleapis.com`) is never proposed: it would admit every
//! tenant below it. Such requests are listed apart.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnet::IpNet;
use psl::Psl;
use serde::Deserialize;

use crate::policy::{Policy, RequestKind, RoleId};
use crate::target::Host;

/// Hosts under which each label is a different tenant, but which the
/// Public Suffix List (as compiled into `psl`) does not list: Google Cloud
/// Storage's virtual-hosted buckets (`BUCKET.storage.googleapis.com`) and
/// Cloudflare R2's accounts (`ACCOUNT.r2.cloudflarestorage.com`).
pub const MULTI_TENANT: &[&str] = &["storage.googleapis.com", "r2.cloudflarestorage.com"];

/// A decision log that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SuggestError {
    /// A line is not a JSON object.
    #[error("{file}:{line}: not a decision log line: {message}")]
    BadLine { file: String, line: usize, message: String },
    /// The role asked for is not in the config.
    #[error("role {0:?} is not defined in the config")]
    UnknownRole(String),
}

/// The fields of a decision line that matter here.
#[derive(Debug, Deserialize)]
struct LogLine {
    #[serde(default)]
    target: String,
    #[serde(default)]
    decision: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    host: String,
    #[serde(default)]
    port: u16,
    #[serde(default)]
    role: String,
}

/// A request that was (or would have been) denied, by destination.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Denied {
    host: String,
    port: u16,
    reason: String,
}

/// Additions for one role.
#[derive(Debug, Clone, Default)]
pub struct RoleSuggestion {
    /// Domain rules to add, each with the requests and names it covers.
    pub domains: Vec<(String, u64, Vec<String>)>,
    /// CIDR rules to add, with request counts.
    pub cidrs: Vec<(IpNet, u64)>,
    /// Ports to add, per kind, with request counts.
    pub ports: BTreeMap<(&'static str, u16), u64>,
    /// The role's ports for each kind once the additions are made.
    http_ports: Vec<u16>,
    connect_ports: Vec<u16>,
}

/// Everything `suggest` found.
#[derive(Debug, Clone, Default)]
pub struct Suggestion {
    /// Decision lines read (would_deny and deny).
    pub lines: u64,
    /// Per role name.
    pub roles: BTreeMap<String, RoleSuggestion>,
    /// Always-denied destinations: `role host:port reason` → requests.
    pub blocked: BTreeMap<(String, String), u64>,
    /// Denials an allow-list cannot lift (role deny entries, SNI, auth...).
    pub other: BTreeMap<(String, String), u64>,
    /// Requests to a public suffix itself: `role host:port` → requests.
    pub public_suffixes: BTreeMap<(String, String), u64>,
}

/// Reads decision lines (`file` names them in errors) and proposes additions.
pub fn suggest(policy: &Policy, log: &str, file: &str, only_role: Option<&str>) -> Result<Suggestion, SuggestError> {
    if let Some(role) = only_role {
        policy.role_id(role).ok_or_else(|| SuggestError::UnknownRole(role.to_string()))?;
    }
    let mut out = Suggestion::default();
    // role → kind → denied destination → requests
    let mut fixable: BTreeMap<String, BTreeMap<&'static str, BTreeMap<Denied, u64>>> = BTreeMap::new();
    for (i, text) in log.lines().enumerate() {
        if text.trim().is_empty() {
            continue;
        }
        let bad = |message: String| SuggestError::BadLine { file: file.to_string(), line: i + 1, message };
        if crate::input::line_too_deep(text, crate::input::DECISION_LOG) {
            let bounds = crate::input::DECISION_LOG;
            return Err(bad(format!("nested deeper than the {} levels allowed for {}", bounds.max_depth, bounds.what)));
        }
        let line: LogLine = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if line.target != "portcullis::access" || !matches!(line.decision.as_str(), "would_deny" | "deny") {
            continue;
        }
        if only_role.is_some_and(|r| r != line.role) {
            continue;
        }
        out.lines += 1;
        let destination = format!("{}:{}", line.host, line.port);
        // Transparent kinds use the same port lists as their explicit twins.
        let kind = match line.kind.as_str() {
            "http" | "transparent-http" => "http",
            "connect" | "transparent-tls" | "transparent-tcp" => "connect",
            _ => "",
        };
        let addressable = matches!(line.reason.as_str(), "not-allowlisted" | "port-not-allowed") && !kind.is_empty();
        if line.reason.starts_with("denied-range:") || line.reason.starts_with("denied-name:") {
            *out.blocked.entry((line.role.clone(), format!("{destination} {}", line.reason))).or_default() += 1;
        } else if !addressable || policy.role_id(&line.role).is_none() {
            *out.other.entry((line.role.clone(), format!("{destination} {}", line.reason))).or_default() += 1;
        } else {
            let denied = Denied { host: line.host, port: line.port, reason: line.reason };
            *fixable.entry(line.role).or_default().entry(kind).or_default().entry(denied).or_default() += 1;
        }
    }
    for (role_name, kinds) in fixable {
        let role = policy.role_id(&role_name).expect("only roles of the policy are kept");
        let blocked_hosts: BTreeSet<String> =
            out.blocked.keys().filter(|(r, _)| *r == role_name).map(|(_, d)| d.split(':').next().unwrap_or("").to_string()).collect();
        let refused = Refused { blocked: &mut out.blocked, public_suffixes: &mut out.public_suffixes };
        let suggestion = for_role(policy, role, &kinds, &blocked_hosts, refused, &role_name);
        out.roles.insert(role_name, suggestion);
    }
    Ok(out)
}

/// Where the requests that get no suggestion are listed.
struct Refused<'a> {
    blocked: &'a mut BTreeMap<(String, String), u64>,
    public_suffixes: &'a mut BTreeMap<(String, String), u64>,
}

fn for_role(
    policy: &Policy,
    role: RoleId,
    kinds: &BTreeMap<&'static str, BTreeMap<Denied, u64>>,
    blocked_hosts: &BTreeSet<String>,
    refused: Refused<'_>,
    role_name: &str,
) -> RoleSuggestion {
    let r = policy.role(role);
    let mut s = RoleSuggestion::default();
    let mut names: BTreeMap<String, u64> = BTreeMap::new();
    let mut cidrs: BTreeMap<IpNet, u64> = BTreeMap::new();
    for (kind_str, denied) in kinds {
        let kind = if *kind_str == "http" { RequestKind::Http } else { RequestKind::Connect };
        for (d, count) in denied {
            if !r.allows_port(kind, d.port) {
                *s.ports.entry((kind_str, d.port)).or_default() += count;
            }
            match Host::parse_bare(&d.host) {
                Ok(Host::Ip(ip)) => match policy.denied_range_for(role, ip) {
                    Some(range) => {
                        let key = (role_name.to_string(), format!("{}:{} denied-range:{}", d.host, d.port, range.as_str()));
                        *refused.blocked.entry(key).or_default() += count;
                    }
                    None if !r.allows_addr(policy.transitions(), ip) => {
                        *cidrs.entry(IpNet::from(policy.transitions().judged(ip))).or_default() += count;
                    }
                    None => {}
                },
                Ok(Host::Name(name)) if blocked_hosts.contains(name.as_str()) => {}
                Ok(Host::Name(name)) if policy.denied_name(&name).is_some() => {}
                Ok(Host::Name(name)) if is_public_suffix(name.as_str()) => {
                    *refused.public_suffixes.entry((role_name.to_string(), format!("{}:{}", d.host, d.port))).or_default() += count;
                }
                Ok(Host::Name(name)) if !r.allows_name(&name) => *names.entry(name.as_str().to_string()).or_default() += count,
                _ => {}
            }
        }
    }
    s.domains = group_names(&names, blocked_hosts);
    s.cidrs = cidrs.into_iter().collect();
    let with = |kind: &str, have: &[u16]| -> Vec<u16> {
        let mut v: Vec<u16> = have.to_vec();
        v.extend(s.ports.keys().filter(|(k, _)| *k == kind).map(|(_, p)| *p));
        v.sort_unstable();
        v.dedup();
        v
    };
    s.http_ports = with("http", r.ports(RequestKind::Http));
    s.connect_ports = with("connect", r.ports(RequestKind::Connect));
    s
}

/// Exact names, or `*.suffix` where two or more names lie strictly below
/// a common suffix that is the registrable domain or below it, and no
/// blocked name lies below it.
fn group_names(names: &BTreeMap<String, u64>, blocked: &BTreeSet<String>) -> Vec<(String, u64, Vec<String>)> {
    let mut by_domain: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for name in names.keys() {
        by_domain.entry(registrable(name)).or_default().push(name);
    }
    let mut out = Vec::new();
    for (registrable, group) in by_domain {
        let below: Vec<&str> = group.iter().copied().filter(|n| n.len() > registrable.len()).collect();
        let suffix = common_suffix(&below);
        let wildcard = suffix.filter(|s| {
            s.ends_with(registrable)
                && below.iter().filter(|n| n.len() > s.len()).count() >= 2
                && !blocked.iter().any(|b| is_below(b, s))
        });
        match wildcard {
            Some(suffix) => {
                let covered: Vec<String> = group.iter().filter(|n| is_below(n, &suffix)).map(|n| n.to_string()).collect();
                let count = covered.iter().map(|n| names[n]).sum();
                out.push((format!("*.{suffix}"), count, covered));
                for n in group.iter().filter(|n| !is_below(n, &suffix)) {
                    out.push((n.to_string(), names[*n], vec![n.to_string()]));
                }
            }
            None => out.extend(group.iter().map(|n| (n.to_string(), names[*n], vec![n.to_string()]))),
        }
    }
    out
}

/// The known public suffix of `name`, from the PSL (both sections) or
/// [`MULTI_TENANT`], whichever is longer. `None` for a name under no known
/// suffix (a single-label or internal name).
fn public_suffix(name: &str) -> Option<&str> {
    let listed = psl::List
        .suffix(name.as_bytes())
        .filter(|s| s.is_known())
        .and_then(|s| std::str::from_utf8(s.as_bytes()).ok())
        .map(|s| &name[name.len() - s.len()..]);
    let extra = MULTI_TENANT.iter().find(|m| name == **m || is_below(name, m)).map(|m| &name[name.len() - m.len()..]);
    match (listed, extra) {
        (Some(a), Some(b)) => Some(if a.len() >= b.len() { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// True when `name` is itself a public suffix: an allow-list entry for it
/// would admit every registrant or tenant below it.
fn is_public_suffix(name: &str) -> bool {
    public_suffix(name) == Some(name)
}

/// The registrable domain of `name` (its public suffix and one label
/// more), or the name itself under no known suffix.
fn registrable(name: &str) -> &str {
    match public_suffix(name) {
        Some(suffix) if suffix.len() < name.len() => {
            let above = &name[..name.len() - suffix.len() - 1];
            let label = above.rfind('.').map_or(0, |at| at + 1);
            &name[label..]
        }
        _ => name,
    }
}

/// True when `name` lies strictly below `suffix` at a label boundary.
fn is_below(name: &str, suffix: &str) -> bool {
    name.len() > suffix.len() + 1 && name.ends_with(suffix) && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
}

/// The longest label-aligned suffix shared by every name.
fn common_suffix(names: &[&str]) -> Option<String> {
    let first = names.first()?;
    let mut labels: Vec<&str> = first.rsplit('.').collect();
    for name in &names[1..] {
        let shared = labels.iter().zip(name.rsplit('.')).take_while(|(a, b)| *a == b).count();
        labels.truncate(shared);
    }
    (!labels.is_empty()).then(|| labels.iter().rev().copied().collect::<Vec<_>>().join("."))
}

impl fmt::Display for Suggestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# portcullis suggest: {} would_deny/deny lines read", self.lines)?;
        writeln!(f, "# Additions to the allow-lists below; port lists are given whole.")?;
        if self.roles.values().all(|r| r.domains.is_empty() && r.cidrs.is_empty() && r.ports.is_empty()) {
            writeln!(f, "# nothing to add")?;
        } else {
            writeln!(f, "roles:")?;
        }
        for (name, role) in &self.roles {
            if role.domains.is_empty() && role.cidrs.is_empty() && role.ports.is_empty() {
                continue;
            }
            writeln!(f, "  {}:\n    allow:", yaml_key(name))?;
            if !role.domains.is_empty() {
                writeln!(f, "      domains:")?;
                for (rule, count, covered) in &role.domains {
                    let names = if covered.len() > 1 { format!(": {}", covered.join(", ")) } else { String::new() };
                    writeln!(f, "        - \"{rule}\"  # {count} request{}{names}", plural(*count))?;
                }
            }
            if !role.cidrs.is_empty() {
                writeln!(f, "      cidrs:")?;
                for (net, count) in &role.cidrs {
                    writeln!(f, "        - \"{net}\"  # {count} request{}", plural(*count))?;
                }
            }
            for (kind, field, list) in [("http", "http_ports", &role.http_ports), ("connect", "connect_ports", &role.connect_ports)] {
                let added: Vec<String> = role.ports.iter().filter(|((k, _), _)| *k == kind).map(|((_, p), c)| format!("{p} ({c} request{})", plural(*c))).collect();
                if !added.is_empty() {
                    let ports: Vec<String> = list.iter().map(u16::to_string).collect();
                    writeln!(f, "      {field}: [{}]  # adds {}", ports.join(", "), added.join(", "))?;
                }
            }
        }
        if !self.blocked.is_empty() {
            writeln!(f, "# Blocked regardless (always-denied addresses and names; no allow-list entry admits them):")?;
            for ((role, what), count) in &self.blocked {
                writeln!(f, "#   role {role}: {what}  ({count} request{})", plural(*count))?;
            }
        }
        if !self.public_suffixes.is_empty() {
            writeln!(f, "# Not suggested: public suffixes (an entry would admit every registrant or tenant below them):")?;
            for ((role, what), count) in &self.public_suffixes {
                writeln!(f, "#   role {role}: {what}  ({count} request{})", plural(*count))?;
            }
        }
        if !self.other.is_empty() {
            writeln!(f, "# Not an allow-list matter (role deny entries, TLS checks, credentials, malformed requests):")?;
            for ((role, what), count) in &self.other {
                writeln!(f, "#   role {role}: {what}  ({count} request{})", plural(*count))?;
            }
        }
        Ok(())
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// A role name as a YAML key, quoted unless plainly safe.
fn yaml_key(name: &str) -> String {
    if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') && !name.is_empty() {
        name.to_string()
    } else {
        format!("{name:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_stop_at_the_registrable_domain() {
        let counts = |names: &[&str]| names.iter().map(|n| (n.to_string(), 1u64)).collect::<BTreeMap<_, _>>();
        let cases: &[(&[&str], &[&str])] = &[
            (&["a.cdn.example.com", "b.cdn.example.com"], &["*.cdn.example.com"]),
            (&["a.example.com", "b.cdn.example.com"], &["*.example.com"]),
            (&["example.com", "a.example.com", "b.example.com"], &["*.example.com", "example.com"]),
            (&["a.example.com", "example.com"], &["a.example.com", "example.com"]),
            // Different registrable domains under one public suffix: never `*.co.uk`.
            (&["foo.co.uk", "bar.co.uk"], &["bar.co.uk", "foo.co.uk"]),
            // github.io is a public suffix: each user's site is its own domain.
            (&["alice.github.io", "bob.github.io"], &["alice.github.io", "bob.github.io"]),
            (&["x.alice.github.io", "y.alice.github.io"], &["*.alice.github.io"]),
            // The PSL's private section: each bucket, distribution, account is another customer's.
            (&["a.s3.amazonaws.com", "b.s3.amazonaws.com"], &["a.s3.amazonaws.com", "b.s3.amazonaws.com"]),
            (&["d1.cloudfront.net", "d2.cloudfront.net"], &["d1.cloudfront.net", "d2.cloudfront.net"]),
            (&["acct.blob.core.windows.net", "other.blob.core.windows.net"], &["acct.blob.core.windows.net", "other.blob.core.windows.net"]),
            // Multi-tenant hosts the PSL does not list.
            (&["a.storage.googleapis.com", "b.storage.googleapis.com"], &["a.storage.googleapis.com", "b.storage.googleapis.com"]),
            (&["x.bucket.storage.googleapis.com", "y.bucket.storage.googleapis.com"], &["*.bucket.storage.googleapis.com"]),
            (&["1.acct.r2.cloudflarestorage.com", "2.acct.r2.cloudflarestorage.com"], &["*.acct.r2.cloudflarestorage.com"]),
        ];
        for (names, want) in cases {
            let got: Vec<String> = group_names(&counts(names), &BTreeSet::new()).into_iter().map(|(r, _, _)| r).collect();
            assert_eq!(got, *want, "{names:?}");
        }
        let blocked: BTreeSet<String> = ["evil.example.com".to_string()].into();
        let got: Vec<String> =
            group_names(&counts(&["a.example.com", "b.example.com"]), &blocked).into_iter().map(|(r, _, _)| r).collect();
        assert_eq!(got, ["a.example.com", "b.example.com"], "no wildcard over a blocked name");
    }

    #[test]
    fn public_suffixes_are_known_from_both_sections_and_the_list() {
        let cases: &[(&str, bool)] = &[
            ("com", true),
            ("co.uk", true),
            ("github.io", true),
            ("s3.amazonaws.com", true),
            ("cloudfront.net", true),
            ("storage.googleapis.com", true),
            ("r2.cloudflarestorage.com", true),
            ("googleapis.com", true),
            ("example.com", false),
            ("bucket.storage.googleapis.com", false),
            ("amazonaws.com", false),
            // Under no known suffix: an internal name, never a public suffix.
            ("intranet", false),
            ("build.corp", false),
        ];
        for (name, want) in cases {
            assert_eq!(is_public_suffix(name), *want, "{name}");
        }
        assert_eq!(registrable("a.b.bucket.storage.googleapis.com"), "bucket.storage.googleapis.com");
        assert_eq!(registrable("www.example.co.uk"), "example.co.uk");
        assert_eq!(registrable("intranet"), "intranet");
    }
}
