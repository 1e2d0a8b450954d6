//! Rule provenance: which rule made a decision, and every rule a decision
//! consulted.
//!
//! The hot path carries a [`RuleId`], a few bytes of indices and no text.
//! A [`RuleCatalog`], shared by one policy snapshot, turns an id into the
//! rule as written (`roles.ci.allow.domains[3] (*.pkg.example) at
//! portcullis.yaml:42`) only when something is logged or printed. The text
//! is for operators (decision log, `check`, `test`); it never goes into a
//! response to a client.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use super::domain::DomainPattern;
use super::ranges::{self, RangeKind};
use super::registry;
use super::kind::{Mode, RequestKind};
pub use crate::source_lines::SourceLines;

/// A rule of one policy snapshot. Small and `Copy`; meaningful only with the
/// [`RuleCatalog`] of the snapshot that produced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleId {
    /// An always-denied name: an index into `ranges::DENIED_NAMES` followed
    /// by `ranges::DENIED_NAME_SUFFIXES`.
    DeniedName(u16),
    /// An always-denied address range.
    Range(RangeSource),
    /// One of the proxy's own listening sockets (index into the listeners).
    Listener(u16),
    /// A rule of the role at this index.
    Role(u16, RoleRule),
    /// The name resolved to no address, so nothing could be checked.
    NoAddresses,
}

/// Where an always-denied range comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RangeSource {
    /// A row of the built-in table (index into `registry::rows()`).
    Registry(u16),
    /// `internal_ranges[i]` in the config.
    Internal(u32),
    /// An address of the proxy host (index into the host's addresses).
    SelfAddr(u32),
}

/// A rule of a role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RoleRule {
    /// `allow.domains[i]`.
    AllowDomain(u32),
    /// `allow.cidrs[i]`.
    AllowCidr(u32),
    /// `deny.domains[i]`.
    DenyDomain(u32),
    /// `deny.cidrs[i]`.
    DenyCidr(u32),
    /// `allow.http_ports` or `allow.connect_ports`, by request kind.
    Ports(RequestKind),
    /// Nothing on the allow-list matched: the default deny.
    DefaultDeny,
    /// `mode: open`.
    OpenMode,
}

/// Why an address inside an always-denied block is not denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lift {
    /// A globally reachable registry row (index into `registry::rows()`).
    Reachable(u16),
    /// A carve-out for every role (index into the global carve-outs).
    CarveOut(u32),
    /// A carve-out naming the role at this index (index into its own).
    RoleCarveOut(u16, u32),
    /// A carve-out bound to the requested name (`allow_ranges` with
    /// `domains`; index into the snapshot's name-bound carve-outs).
    BoundToName(u32),
}

/// One rule consulted while deciding, in the order consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The name against the always-denied names.
    DeniedName { matched: Option<RuleId> },
    /// An address against the always-denied ranges (as judged: the IPv4
    /// address a transition form carries).
    Range { addr: IpAddr, judged: IpAddr, verdict: RangeStep },
    /// An address and port against the proxy's own listeners.
    Listener { addr: IpAddr, matched: Option<RuleId> },
    /// The name against the role's `deny.domains`.
    RoleDenyName { matched: Option<RuleId> },
    /// An address against the role's `deny.cidrs`.
    RoleDenyAddr { addr: IpAddr, matched: Option<RuleId> },
    /// The role's mode, which decides whether the allow-list applies.
    Mode { role: u16, mode: Mode },
    /// The port against the role's ports for the request kind.
    Port { port: u16, rule: RuleId, allowed: bool },
    /// The name against the role's `allow.domains`.
    AllowName { matched: Option<RuleId> },
    /// A name that matches no domain rule, with `resolve_unlisted_names: false`.
    UnlistedNameNotResolved,
    /// An address against the role's `allow.cidrs`.
    AllowAddr { addr: IpAddr, matched: Option<RuleId> },
}

/// What the range table said about an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeStep {
    /// Outside every always-denied range.
    Outside,
    /// Inside a denied block but lifted.
    Lifted(Lift),
    /// Denied by this range.
    Denied(RuleId),
}

/// Receives each rule consulted by a decision. [`NoTrace`] does nothing
/// and compiles away, so `Policy::decide` pays nothing for provenance.
pub trait Trace {
    /// One rule was consulted.
    fn step(&mut self, step: Step);
}

/// The trace of the hot path: nothing is kept.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoTrace;

impl Trace for NoTrace {
    #[inline(always)]
    fn step(&mut self, _: Step) {}
}

impl Trace for Vec<Step> {
    fn step(&mut self, step: Step) {
        self.push(step);
    }
}

/// A role's rules as written, in config order, for describing them.
#[derive(Debug, Clone, Default)]
pub struct RoleRules {
    /// The role's name.
    pub name: Arc<str>,
    /// `allow.domains`, in order.
    pub allow_domains: Box<[DomainPattern]>,
    /// `allow.cidrs`, in order (transition prefixes as unwrapped).
    pub allow_cidrs: Box<[IpNet]>,
    /// `deny.domains`, in order.
    pub deny_domains: Box<[DomainPattern]>,
    /// `deny.cidrs`, in order.
    pub deny_cidrs: Box<[IpNet]>,
    /// `allow.http_ports`, sorted.
    pub http_ports: Box<[u16]>,
    /// `allow.connect_ports`, sorted.
    pub connect_ports: Box<[u16]>,
    /// Carve-outs that name this role.
    pub carve_outs: Box<[IpNet]>,
}

/// What a policy snapshot needs to describe its rules: the rules as
/// written, the address plan, and where the config put them.
#[derive(Debug, Clone, Default)]
pub struct RuleCatalog {
    pub(super) roles: Vec<RoleRules>,
    pub(super) internal: Vec<IpNet>,
    pub(super) self_addrs: Vec<IpAddr>,
    pub(super) listeners: Vec<SocketAddr>,
    pub(super) carve_outs: Vec<IpNet>,
    /// The name-bound carve-outs, described.
    pub(super) named: Vec<String>,
    pub(super) source: Option<Arc<SourceLines>>,
    /// Texts of rules that decided requests, formatted once per snapshot
    /// (the decision log names the rule on every line). At most
    /// [`RULE_TEXT_CACHE`] entries; past that, texts are formatted each time.
    pub(super) texts: dashmap::DashMap<RuleId, Arc<str>>,
}

/// How many rule texts a snapshot keeps formatted.
const RULE_TEXT_CACHE: usize = 4096;

impl RuleCatalog {
    /// The rule as an operator reads it.
    pub fn describe(&self, rule: RuleId) -> RuleText<'_> {
        RuleText { catalog: self, rule }
    }

    fn at(&self, line: Option<u32>) -> Option<(&str, u32)> {
        Some((self.source.as_ref()?.file(), line?))
    }

    fn item_line(&self, path: &str, index: usize) -> Option<u32> {
        self.source.as_ref()?.item(path, index)
    }

    fn key_line(&self, path: &str) -> Option<u32> {
        self.source.as_ref()?.key(path)
    }

    /// The role's name, for rules of that role.
    pub fn role_name(&self, role: u16) -> &str {
        self.roles.get(usize::from(role)).map_or("?", |r| &r.name)
    }

    fn write_range(&self, f: &mut fmt::Formatter<'_>, source: RangeSource) -> fmt::Result {
        match source {
            RangeSource::Registry(i) => match registry::rows().nth(usize::from(i)) {
                Some(row) => {
                    let kind = match row.treatment {
                        registry::Treatment::Deny(kind) => kind.as_str(),
                        _ => "special",
                    };
                    write!(f, "always-denied:{kind} ({})", row.prefix)
                }
                None => f.write_str("always-denied"),
            },
            RangeSource::Internal(i) => {
                let net = self.internal.get(i as usize).map_or(String::new(), |n| n.to_string());
                write!(f, "internal_ranges[{i}] ({net})")?;
                self.write_at(f, self.item_line("internal_ranges", i as usize))
            }
            RangeSource::SelfAddr(i) => {
                let addr = self.self_addrs.get(i as usize).map_or(String::new(), |a| a.to_string());
                write!(f, "always-denied:self ({addr}, an address of this host)")
            }
        }
    }

    fn write_at(&self, f: &mut fmt::Formatter<'_>, line: Option<u32>) -> fmt::Result {
        match self.at(line) {
            Some((file, line)) => write!(f, " at {file}:{line}"),
            None => Ok(()),
        }
    }

    fn write_role_rule(&self, f: &mut fmt::Formatter<'_>, role: u16, rule: RoleRule) -> fmt::Result {
        let Some(r) = self.roles.get(usize::from(role)) else { return f.write_str("unknown rule") };
        let name = &r.name;
        let (path, index, value): (String, Option<usize>, String) = match rule {
            RoleRule::AllowDomain(i) => list_item(name, "allow.domains", i, &r.allow_domains),
            RoleRule::AllowCidr(i) => list_item(name, "allow.cidrs", i, &r.allow_cidrs),
            RoleRule::DenyDomain(i) => list_item(name, "deny.domains", i, &r.deny_domains),
            RoleRule::DenyCidr(i) => list_item(name, "deny.cidrs", i, &r.deny_cidrs),
            RoleRule::Ports(kind) => {
                let (field, ports) = match kind {
                    RequestKind::Http | RequestKind::TransparentHttp => ("http_ports", &r.http_ports),
                    RequestKind::Connect | RequestKind::TransparentTls | RequestKind::TransparentTcp => {
                        ("connect_ports", &r.connect_ports)
                    }
                };
                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                (format!("roles.{name}.allow.{field}"), None, format!("[{}]", list.join(", ")))
            }
            RoleRule::DefaultDeny => {
                return write!(f, "default-deny (role {name}: no allow rule matched)");
            }
            RoleRule::OpenMode => (format!("roles.{name}.mode"), None, "open".to_string()),
        };
        write!(f, "{path}")?;
        if let Some(i) = index {
            write!(f, "[{i}]")?;
        }
        write!(f, " ({value})")?;
        let line = match index {
            Some(i) => self.item_line(&path, i),
            None => self.key_line(&path),
        };
        self.write_at(f, line)
    }
}

fn list_item<T: fmt::Display>(role: &str, field: &str, i: u32, list: &[T]) -> (String, Option<usize>, String) {
    let value = list.get(i as usize).map_or(String::new(), T::to_string);
    (format!("roles.{role}.{field}"), Some(i as usize), value)
}

/// A rule ready to print; formatting happens only when it is displayed.
pub struct RuleText<'a> {
    catalog: &'a RuleCatalog,
    rule: RuleId,
}

impl fmt::Display for RuleText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rule {
            RuleId::DeniedName(i) => {
                let i = usize::from(i);
                let names = ranges::DENIED_NAMES.len();
                let (pattern, kind): (String, RangeKind) = match ranges::DENIED_NAMES.get(i) {
                    Some((name, kind)) => (name.to_string(), *kind),
                    None => match ranges::DENIED_NAME_SUFFIXES.get(i - names) {
                        Some((name, kind)) => (format!("*.{name}"), *kind),
                        None => return f.write_str("always-denied name"),
                    },
                };
                write!(f, "always-denied:{} (name {pattern})", kind.as_str())
            }
            RuleId::Range(source) => self.catalog.write_range(f, source),
            RuleId::Listener(i) => {
                let addr = self.catalog.listeners.get(usize::from(i)).map_or(String::new(), |a| a.to_string());
                write!(f, "always-denied:self (listener {addr})")
            }
            RuleId::Role(role, rule) => self.catalog.write_role_rule(f, role, rule),
            RuleId::NoAddresses => f.write_str("no-addresses (the name resolved to nothing)"),
        }
    }
}

/// A rule id with the catalog that can describe it: what a decision log
/// record keeps until it is written.
#[derive(Debug, Clone)]
pub struct RuleRef {
    catalog: Arc<RuleCatalog>,
    rule: RuleId,
}

impl RuleRef {
    /// Pairs a rule with its snapshot's catalog.
    pub fn new(catalog: Arc<RuleCatalog>, rule: RuleId) -> Self {
        RuleRef { catalog, rule }
    }

    /// The rule id.
    pub fn id(&self) -> RuleId {
        self.rule
    }

    /// The rule's text, formatted on its first use in this snapshot.
    pub fn text(&self) -> Arc<str> {
        if let Some(text) = self.catalog.texts.get(&self.rule) {
            return Arc::clone(&text);
        }
        let text: Arc<str> = self.to_string().into();
        if self.catalog.texts.len() < RULE_TEXT_CACHE {
            self.catalog.texts.insert(self.rule, Arc::clone(&text));
        }
        text
    }
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.catalog.describe(self.rule).fmt(f)
    }
}

/// One consulted rule, printable: `check --explain` prints these in order.
pub struct StepText<'a> {
    catalog: &'a RuleCatalog,
    step: Step,
}

impl RuleCatalog {
    /// A consulted step as an operator reads it.
    pub fn describe_step(&self, step: Step) -> StepText<'_> {
        StepText { catalog: self, step }
    }

    fn matched(&self, f: &mut fmt::Formatter<'_>, matched: Option<RuleId>, hit: &str) -> fmt::Result {
        match matched {
            Some(rule) => write!(f, "{hit} by {}", self.describe(rule)),
            None => f.write_str("no match"),
        }
    }
}

impl fmt::Display for StepText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.catalog;
        match self.step {
            Step::DeniedName { matched } => {
                f.write_str("always-denied names: ")?;
                c.matched(f, matched, "denied")
            }
            Step::Range { addr, judged, verdict } => {
                write!(f, "always-denied ranges: {addr}")?;
                if judged != addr {
                    write!(f, " (judged as {judged})")?;
                }
                match verdict {
                    RangeStep::Outside => f.write_str(": outside every range"),
                    RangeStep::Denied(rule @ RuleId::Range(RangeSource::Registry(i))) => {
                        let row = registry::rows().nth(usize::from(i));
                        write!(f, ": denied by {}", c.describe(rule))?;
                        row.map_or(Ok(()), |row| write!(f, ": {}", row.name))
                    }
                    RangeStep::Denied(rule) => write!(f, ": denied by {}", c.describe(rule)),
                    RangeStep::Lifted(Lift::Reachable(i)) => match registry::rows().nth(usize::from(i)) {
                        Some(row) => write!(f, ": not denied, globally reachable {} ({})", row.prefix, row.name),
                        None => f.write_str(": not denied"),
                    },
                    RangeStep::Lifted(Lift::CarveOut(i)) => {
                        let net = c.carve_outs.get(i as usize).map_or(String::new(), |n| n.to_string());
                        write!(f, ": not denied, carved out by allow_ranges ({net})")
                    }
                    RangeStep::Lifted(Lift::BoundToName(i)) => {
                        let binding = c.named.get(i as usize).map_or("", String::as_str);
                        write!(f, ": not denied, carved out for the requested name by allow_ranges ({binding})")
                    }
                    RangeStep::Lifted(Lift::RoleCarveOut(role, i)) => {
                        let role = c.roles.get(usize::from(role));
                        let net = role.and_then(|r| r.carve_outs.get(i as usize)).map_or(String::new(), |n| n.to_string());
                        write!(f, ": not denied, carved out by allow_ranges ({net}, roles: {})", c.role_name_of(role))
                    }
                }
            }
            Step::Listener { addr, matched } => {
                write!(f, "own listeners: {addr}: ")?;
                c.matched(f, matched, "denied")
            }
            Step::RoleDenyName { matched } => {
                f.write_str("role deny.domains: ")?;
                c.matched(f, matched, "denied")
            }
            Step::RoleDenyAddr { addr, matched } => {
                write!(f, "role deny.cidrs: {addr}: ")?;
                c.matched(f, matched, "denied")
            }
            Step::Mode { role, mode } => write!(f, "roles.{}.mode: {}", c.role_name(role), mode.as_str()),
            Step::Port { port, rule, allowed } => {
                let verdict = if allowed { "allowed" } else { "not allowed" };
                write!(f, "port {port}: {verdict} by {}", c.describe(rule))
            }
            Step::AllowName { matched } => {
                f.write_str("allow.domains: ")?;
                c.matched(f, matched, "allowed")
            }
            Step::UnlistedNameNotResolved => {
                f.write_str("allow.cidrs: not consulted for an unlisted name (resolve_unlisted_names: false)")
            }
            Step::AllowAddr { addr, matched } => {
                write!(f, "allow.cidrs: {addr}: ")?;
                c.matched(f, matched, "allowed")
            }
        }
    }
}

impl RuleCatalog {
    fn role_name_of<'r>(&self, role: Option<&'r RoleRules>) -> &'r str {
        role.map_or("?", |r| &r.name)
    }
}
