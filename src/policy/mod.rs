//! The policy engine: a pure, immutable value compiled from config that
//! answers "may this client reach this target at these addresses?".
//!
//! No I/O and no locks. The proxy publishes a compiled [`Policy`] behind an
//! atomic pointer and loads it once per request; only this module can make the
//! [`Permit`] the dialer requires, so nothing can dial an unchecked address.

pub mod cidr;
pub mod domain;
pub mod provenance;
pub mod ranges;
pub mod registry;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::target::{DomainName, Host, Target};
use cidr::CidrTable;
use domain::{DomainMatcher, DomainPattern};
use provenance::{Lift, NoTrace, RangeSource, RangeStep, RoleRule, RoleRules, RuleCatalog, RuleId, RuleRef, RuleText, SourceLines, Step, Trace};
use ranges::{Nat64Prefix, RangeKind, Transitions};

/// How a role's allow-list is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Requests not on the allow-list are denied.
    #[default]
    Enforce,
    /// Requests not on the allow-list are allowed, logged and counted as
    /// `would_deny`. The always-denied ranges stay denied.
    Report,
    /// No allow-list: anything outside the always-denied ranges and the
    /// role's own deny entries is allowed.
    Open,
}

impl Mode {
    /// The label used in logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Report => "report",
            Mode::Open => "open",
        }
    }
}

/// What the client asked the proxy to do; ports are allowed per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// An absolute-form plain HTTP request, forwarded.
    Http,
    /// A CONNECT tunnel.
    Connect,
    /// A plain HTTP request on a redirected connection, named by its Host
    /// header; HTTP ports apply.
    TransparentHttp,
    /// A redirected TLS connection, named by its ClientHello's SNI;
    /// CONNECT ports apply.
    TransparentTls,
    /// A redirected connection with no name, decided on its original
    /// destination; CONNECT ports apply.
    TransparentTcp,
}

impl RequestKind {
    /// The label used in logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            RequestKind::Http => "http",
            RequestKind::Connect => "connect",
            RequestKind::TransparentHttp => "transparent-http",
            RequestKind::TransparentTls => "transparent-tls",
            RequestKind::TransparentTcp => "transparent-tcp",
        }
    }
}

/// Why a request was denied. One reason code per variant, shared by the
/// `X-Portcullis-Deny` header, the log line and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// A destination address is in an always-denied range.
    DeniedRange(RangeKind),
    /// The destination name is an always-denied name (metadata, localhost).
    DeniedName(RangeKind),
    /// Neither the name nor every address is on the role's allow-list.
    NotAllowListed,
    /// The port is not allowed for this kind of request.
    PortNotAllowed,
    /// The destination matches the role's own deny entries.
    DeniedByRole,
    /// Credentials are required and none were presented.
    AuthRequired,
    /// The presented credentials are wrong.
    AuthFailed,
    /// A tunnel's TLS ClientHello names another host than the CONNECT target.
    SniMismatch,
    /// A tunnel's TLS ClientHello carries no server name.
    SniMissing,
    /// A tunnel that must carry TLS started with something else.
    NotTls,
    /// A tunnel that must carry TLS sent no ClientHello in time.
    SniTimeout,
    /// The request target could not be parsed strictly.
    InvalidTarget,
    /// An open tunnel or pooled connection that a reloaded policy denies.
    Revoked,
    /// A tunnel's plain HTTP request names another host than the CONNECT
    /// target (in `Host` or an absolute-form target), or none.
    HostMismatch,
    /// A tunnel admitted only by `http_ports` did not start with a plain
    /// HTTP/1.x request head.
    NotHttp,
    /// A TLS ClientHello offers Encrypted ClientHello: its real server name
    /// is hidden, so the name that decides is not the name it goes to.
    EchRefused,
}

impl DenyReason {
    /// The reason code.
    pub const fn as_str(self) -> &'static str {
        use RangeKind::*;
        match self {
            DenyReason::DeniedRange(Metadata) => "denied-range:metadata",
            DenyReason::DeniedRange(LinkLocal) => "denied-range:link-local",
            DenyReason::DeniedRange(Loopback) => "denied-range:loopback",
            DenyReason::DeniedRange(Private) => "denied-range:private",
            DenyReason::DeniedRange(Special) => "denied-range:special",
            DenyReason::DeniedRange(Internal) => "denied-range:internal",
            DenyReason::DeniedRange(SelfAddr) => "denied-range:self",
            DenyReason::DeniedName(Metadata) => "denied-name:metadata",
            DenyReason::DeniedName(LinkLocal) => "denied-name:link-local",
            DenyReason::DeniedName(Loopback) => "denied-name:loopback",
            DenyReason::DeniedName(Private) => "denied-name:private",
            DenyReason::DeniedName(Special) => "denied-name:special",
            DenyReason::DeniedName(Internal) => "denied-name:internal",
            DenyReason::DeniedName(SelfAddr) => "denied-name:self",
            DenyReason::NotAllowListed => "not-allowlisted",
            DenyReason::PortNotAllowed => "port-not-allowed",
            DenyReason::DeniedByRole => "denied-by-role",
            DenyReason::AuthRequired => "auth-required",
            DenyReason::AuthFailed => "auth-failed",
            DenyReason::SniMismatch => "sni-mismatch",
            DenyReason::SniMissing => "sni-missing",
            DenyReason::NotTls => "not-tls",
            DenyReason::SniTimeout => "sni-timeout",
            DenyReason::InvalidTarget => "invalid-target",
            DenyReason::Revoked => "revoked",
            DenyReason::HostMismatch => "host-mismatch",
            DenyReason::NotHttp => "not-http",
            DenyReason::EchRefused => "ech-refused",
        }
    }

    /// True for denials that report mode does not lift.
    pub const fn is_always_denied(self) -> bool {
        !matches!(self, DenyReason::NotAllowListed | DenyReason::PortNotAllowed)
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which allow-list rule let a request through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowedBy {
    /// The name matched a domain rule.
    Domain,
    /// Every address matched a CIDR rule.
    Cidr,
    /// Nothing matched, but the role is in report mode.
    ReportOnly,
    /// The role is in open mode.
    Open,
}

impl AllowedBy {
    /// The label used in logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            AllowedBy::Domain => "domain",
            AllowedBy::Cidr => "cidr",
            AllowedBy::ReportOnly => "report-only",
            AllowedBy::Open => "open",
        }
    }
}

/// Index of a role inside one [`Policy`] snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleId(usize);

impl RoleId {
    /// The index as carried in a [`RuleId`] (a policy has fewer than 2^16 roles).
    fn index(self) -> u16 {
        self.0 as u16
    }
}

/// Permission to dial: the checked socket addresses and the rule that
/// allowed them. Only the policy engine constructs one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permit {
    addrs: Vec<SocketAddr>,
    rule: AllowedBy,
    rule_id: RuleId,
    would_deny: Option<DenyReason>,
    sni_check: bool,
    tunnel: TunnelStart,
    /// Given on the name alone, for a parent proxy that resolves it.
    name_only: bool,
}

/// What a CONNECT tunnel may start with, by the port it was allowed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelStart {
    /// Not a tunnel, or a tunnel port outside `http_ports`: any bytes
    /// (subject to the SNI check).
    Any,
    /// The port is in both `connect_ports` and `http_ports`: a plain HTTP
    /// request must name the CONNECT host; anything else is as for `Any`.
    AnyOrCheckedHttp,
    /// The port is in `http_ports` only: the tunnel must start with a plain
    /// HTTP/1.x request naming the CONNECT host.
    CheckedHttp,
}

impl Permit {
    /// Every address that was checked, in resolver order; dial only these.
    /// Empty for a [`Permit::name_only`] permit.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// True when the permit was given on the name alone, for a parent proxy
    /// that resolves the name (`upstream_proxy.resolve: parent`): it holds
    /// no address, so only the parent can be asked to reach it.
    pub fn name_only(&self) -> bool {
        self.name_only
    }

    /// The kind of rule that allowed the request.
    pub fn rule(&self) -> AllowedBy {
        self.rule
    }

    /// The rule that decided: the allow rule, or in report mode the rule
    /// that would have denied. Described by [`Policy::describe`].
    pub fn rule_id(&self) -> RuleId {
        self.rule_id
    }

    /// True when a tunnel must carry a TLS ClientHello whose SNI names the
    /// CONNECT host: the role asks for it and the name (not an address
    /// range) is what allowed the request.
    pub fn sni_check(&self) -> bool {
        self.sni_check
    }

    /// In report mode: the reason this request would have been denied.
    pub fn would_deny(&self) -> Option<DenyReason> {
        self.would_deny
    }

    /// Narrows the permit to `original` when it is one of the checked
    /// addresses; otherwise leaves every checked address, so an unchecked
    /// address can never enter a permit this way.
    fn toward(mut self, original: IpAddr) -> Permit {
        let original = original.to_canonical();
        if let Some(addr) = self.addrs.iter().copied().find(|a| a.ip() == original) {
            self.addrs = vec![addr];
        }
        self
    }

    /// What a tunnel on this permit may carry first.
    pub fn tunnel_start(&self) -> TunnelStart {
        self.tunnel
    }
}

/// The outcome of a policy check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(Permit),
    /// Denied for `reason` by `rule`.
    Deny { reason: DenyReason, rule: RuleId },
}

impl Decision {
    /// The reason of a deny.
    pub fn deny_reason(&self) -> Option<DenyReason> {
        match self {
            Decision::Deny { reason, .. } => Some(*reason),
            Decision::Allow(_) => None,
        }
    }

    /// The rule that decided (for an allow in report mode, the rule that
    /// would have denied).
    pub fn rule(&self) -> RuleId {
        match self {
            Decision::Deny { rule, .. } => *rule,
            Decision::Allow(permit) => permit.rule_id,
        }
    }
}

/// What can be decided before resolving the target's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreResolution<'t> {
    /// Decided without DNS (an IP literal, or a name denied outright).
    Decided(Decision),
    /// The name must be resolved and the addresses passed to [`Policy::decide`].
    Resolve(&'t DomainName),
}

/// A sorted set of ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSet(Box<[u16]>);

impl PortSet {
    /// Builds the set from any list of ports.
    pub fn new(ports: impl IntoIterator<Item = u16>) -> Self {
        let mut v: Vec<u16> = ports.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        PortSet(v.into_boxed_slice())
    }

    /// True when `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        self.0.binary_search(&port).is_ok()
    }
}

/// Destinations a role may reach: domains, CIDRs and ports.
#[derive(Debug, Clone)]
pub struct AllowList {
    /// Values are indices into `rules`' domains and cidrs.
    domains: DomainMatcher<u32>,
    cidrs: CidrTable<u32>,
    http_ports: PortSet,
    connect_ports: PortSet,
    /// False: CIDR rules admit IP literals only; a name that matches no
    /// domain rule is denied without being resolved (no DNS query leaves
    /// for it, which closes the exfiltration channel through denied names).
    resolve_unlisted: bool,
    /// The rules as written, in config order, for provenance.
    domain_list: Box<[DomainPattern]>,
    cidr_list: Box<[IpNet]>,
}

impl AllowList {
    /// Compiles an allow-list.
    pub fn new(
        domains: impl IntoIterator<Item = DomainPattern>,
        cidrs: impl IntoIterator<Item = IpNet>,
        http_ports: PortSet,
        connect_ports: PortSet,
    ) -> Self {
        let domain_list: Box<[DomainPattern]> = domains.into_iter().collect();
        let cidr_list: Box<[IpNet]> = cidrs.into_iter().collect();
        AllowList {
            domains: DomainMatcher::new(indexed(&domain_list)),
            cidrs: CidrTable::new(indexed(&cidr_list)),
            http_ports,
            connect_ports,
            resolve_unlisted: true,
            domain_list,
            cidr_list,
        }
    }

    /// Sets whether CIDR rules may admit names (by resolving names that
    /// match no domain rule) or IP literals only.
    pub fn resolve_unlisted(mut self, resolve: bool) -> Self {
        self.resolve_unlisted = resolve;
        self
    }

    /// True when a name that matches no domain rule could still be admitted
    /// by a CIDR rule once resolved.
    fn cidrs_admit_names(&self) -> bool {
        self.resolve_unlisted && !self.cidrs.is_empty()
    }

    /// The port list named for `kind` (a `CONNECT` is also admitted on an
    /// `http_ports` port when it carries plain HTTP, see [`Self::port_allowed`]).
    fn ports(&self, kind: RequestKind) -> &PortSet {
        match kind {
            RequestKind::Http | RequestKind::TransparentHttp => &self.http_ports,
            RequestKind::Connect | RequestKind::TransparentTls | RequestKind::TransparentTcp => &self.connect_ports,
        }
    }

    /// Plain HTTP goes to `http_ports`; a tunnel to `connect_ports`, or to
    /// `http_ports` when it carries plain HTTP (see [`TunnelStart`]).
    fn port_allowed(&self, kind: RequestKind, port: u16) -> bool {
        match kind {
            RequestKind::Http | RequestKind::TransparentHttp => self.http_ports.contains(port),
            RequestKind::Connect => self.connect_ports.contains(port) || self.http_ports.contains(port),
            RequestKind::TransparentTls | RequestKind::TransparentTcp => self.connect_ports.contains(port),
        }
    }

    /// What a tunnel to `port` may start with. Outside enforce mode any
    /// port is lifted, so only a port in `http_ports` adds the Host check.
    fn tunnel_start(&self, kind: RequestKind, mode: Mode, port: u16) -> TunnelStart {
        let http = kind == RequestKind::Connect && self.http_ports.contains(port);
        let any = self.connect_ports.contains(port) || mode != Mode::Enforce;
        match (http, any) {
            (false, _) => TunnelStart::Any,
            (true, true) => TunnelStart::AnyOrCheckedHttp,
            (true, false) => TunnelStart::CheckedHttp,
        }
    }

    fn name_rule(&self, name: &DomainName) -> Option<u32> {
        self.domains.lookup(name.as_str()).map(|m| *m.value())
    }

    /// The part of the check that needs no addresses: the port, and for a
    /// name when no CIDR rule could admit it through its addresses, the name
    /// itself. A name denied here is never resolved.
    fn check_before_resolution(&self, kind: RequestKind, target: &Target) -> Result<(), (DenyReason, RoleRule)> {
        if !self.port_allowed(kind, target.port) {
            return Err((DenyReason::PortNotAllowed, RoleRule::Ports(kind)));
        }
        match &target.host {
            Host::Name(name) if !self.cidrs_admit_names() && self.name_rule(name).is_none() => {
                Err((DenyReason::NotAllowListed, RoleRule::DefaultDeny))
            }
            _ => Ok(()),
        }
    }

    /// Checks port, name and addresses; `role` only labels the trace.
    #[inline(always)]
    fn check<T: Trace>(
        &self,
        transitions: &Transitions,
        (role, kind): (u16, RequestKind),
        target: &Target,
        addrs: &[IpAddr],
        trace: &mut T,
    ) -> Result<(AllowedBy, RoleRule), (DenyReason, RoleRule)> {
        let port_allowed = self.port_allowed(kind, target.port);
        trace.step(Step::Port { port: target.port, rule: RuleId::Role(role, RoleRule::Ports(kind)), allowed: port_allowed });
        if !port_allowed {
            return Err((DenyReason::PortNotAllowed, RoleRule::Ports(kind)));
        }
        if let Host::Name(name) = &target.host {
            let matched = self.name_rule(name);
            trace.step(Step::AllowName { matched: matched.map(|i| RuleId::Role(role, RoleRule::AllowDomain(i))) });
            if let Some(i) = matched {
                return Ok((AllowedBy::Domain, RoleRule::AllowDomain(i)));
            }
            if !self.resolve_unlisted {
                trace.step(Step::UnlistedNameNotResolved);
                return Err((DenyReason::NotAllowListed, RoleRule::DefaultDeny));
            }
        }
        let mut first = None;
        for addr in addrs {
            let matched = self.cidrs.lookup(transitions.judged(*addr)).copied();
            trace.step(Step::AllowAddr { addr: *addr, matched: matched.map(|i| RuleId::Role(role, RoleRule::AllowCidr(i))) });
            match matched {
                Some(i) => first = first.or(Some(i)),
                None => return Err((DenyReason::NotAllowListed, RoleRule::DefaultDeny)),
            }
        }
        match first {
            Some(i) => Ok((AllowedBy::Cidr, RoleRule::AllowCidr(i))),
            None => Err((DenyReason::NotAllowListed, RoleRule::DefaultDeny)),
        }
    }
}

/// `(rule, index)` pairs: the index is the rule's provenance.
fn indexed<T: Clone>(list: &[T]) -> impl Iterator<Item = (T, u32)> + '_ {
    list.iter().cloned().zip(0..)
}

/// A named set of rules applied to a class of clients.
#[derive(Debug, Clone)]
pub struct Role {
    name: Arc<str>,
    mode: Mode,
    sni_check: bool,
    allow: AllowList,
    deny: DenyList,
    /// Carve-outs that name this role, on top of the global ones.
    carve_outs: Vec<IpNet>,
    /// TLS ClientHellos offering Encrypted ClientHello are let through.
    allow_ech: bool,
}

/// Destinations a role may never reach, on top of the always-denied ranges.
///
/// `domains` is a check on the requested name only: another name for the
/// same address, or the address itself, is not caught by it. Pair it with
/// `cidrs` to deny the addresses. A CIDR entry matches an address in its
/// IPv6 spelling and in the IPv4 form a transition address carries.
#[derive(Debug, Clone)]
pub struct DenyList {
    /// Values are indices into the lists as written.
    domains: DomainMatcher<u32>,
    cidrs: CidrTable<u32>,
    domain_list: Box<[DomainPattern]>,
    cidr_list: Box<[IpNet]>,
}

impl Default for DenyList {
    fn default() -> Self {
        DenyList::new([], [])
    }
}

impl DenyList {
    /// Compiles a deny list.
    pub fn new(domains: impl IntoIterator<Item = DomainPattern>, cidrs: impl IntoIterator<Item = IpNet>) -> Self {
        let domain_list: Box<[DomainPattern]> = domains.into_iter().collect();
        let cidr_list: Box<[IpNet]> = cidrs.into_iter().collect();
        DenyList {
            domains: DomainMatcher::new(indexed(&domain_list)),
            cidrs: CidrTable::new(indexed(&cidr_list)),
            domain_list,
            cidr_list,
        }
    }

    /// The deny rule matching the name or any address; `role` labels the trace.
    #[inline(always)]
    fn denies<T: Trace>(&self, transitions: &Transitions, role: u16, target: &Target, addrs: &[IpAddr], trace: &mut T) -> Option<RoleRule> {
        if let Host::Name(n) = &target.host {
            let matched = self.domains.lookup(n.as_str()).map(|m| *m.value());
            trace.step(Step::RoleDenyName { matched: matched.map(|i| RuleId::Role(role, RoleRule::DenyDomain(i))) });
            if let Some(i) = matched {
                return Some(RoleRule::DenyDomain(i));
            }
        }
        for a in addrs {
            let matched = self.cidrs.lookup(*a).or_else(|| self.cidrs.lookup(transitions.judged(*a))).copied();
            trace.step(Step::RoleDenyAddr { addr: *a, matched: matched.map(|i| RuleId::Role(role, RoleRule::DenyCidr(i))) });
            if let Some(i) = matched {
                return Some(RoleRule::DenyCidr(i));
            }
        }
        None
    }
}

impl Role {
    /// Creates a role.
    pub fn new(name: &str, mode: Mode, sni_check: bool, allow: AllowList) -> Self {
        Role { name: name.into(), mode, sni_check, allow, deny: DenyList::default(), carve_outs: Vec::new(), allow_ech: false }
    }

    /// Adds the role's own deny entries.
    pub fn with_deny(mut self, deny: DenyList) -> Self {
        self.deny = deny;
        self
    }

    /// Lets ClientHellos that offer Encrypted ClientHello through (decided
    /// on their outer name).
    pub fn with_allow_ech(mut self, allow: bool) -> Self {
        self.allow_ech = allow;
        self
    }

    /// True when the role lets ClientHellos offering Encrypted ClientHello through.
    pub fn allows_ech(&self) -> bool {
        self.allow_ech
    }

    /// True when a domain entry of the role's own deny list matches `name`.
    pub fn denies_name(&self, name: &DomainName) -> bool {
        self.deny.domains.lookup(name.as_str()).is_some()
    }

    /// True when a name no domain rule matches may still be admitted by the
    /// role's CIDR rules once resolved (`allow.resolve_unlisted_names` and
    /// at least one CIDR rule).
    pub fn admits_unlisted_names_by_address(&self) -> bool {
        self.allow.cidrs_admit_names()
    }

    /// Adds carve-outs from the always-denied ranges that apply to this role only.
    pub fn with_carve_outs(mut self, carve_outs: Vec<IpNet>) -> Self {
        self.carve_outs = carve_outs;
        self
    }

    /// The role's name as configured.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The role's name, shared (keys of per-role state such as the pool).
    pub fn shared_name(&self) -> Arc<str> {
        self.name.clone()
    }

    /// The role's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// True when the role's allow-list admits `port` for `kind`.
    pub fn allows_port(&self, kind: RequestKind, port: u16) -> bool {
        self.allow.port_allowed(kind, port)
    }

    /// The ports the role allows for `kind`, sorted.
    pub fn ports(&self, kind: RequestKind) -> &[u16] {
        &self.allow.ports(kind).0
    }

    /// True when a domain rule of the role's allow-list matches `name`.
    pub fn allows_name(&self, name: &DomainName) -> bool {
        self.allow.name_rule(name).is_some()
    }

    /// True when a CIDR rule of the role's allow-list covers `addr` (as judged).
    pub fn allows_addr(&self, transitions: &Transitions, addr: IpAddr) -> bool {
        self.allow.cidrs.lookup(transitions.judged(addr)).is_some()
    }

    /// The role's rules as written, for provenance.
    fn rules(&self) -> RoleRules {
        RoleRules {
            name: self.name.clone(),
            allow_domains: self.allow.domain_list.clone(),
            allow_cidrs: self.allow.cidr_list.clone(),
            deny_domains: self.deny.domain_list.clone(),
            deny_cidrs: self.deny.cidr_list.clone(),
            http_ports: self.allow.http_ports.0.clone(),
            connect_ports: self.allow.connect_ports.0.clone(),
            carve_outs: self.carve_outs.clone().into_boxed_slice(),
        }
    }
}

/// Whether an address range is denied, or not denied inside a denied block
/// (a globally reachable registry row, or the operator's carve-out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RangeVerdict {
    Denied(RangeKind, RangeSource),
    NotDenied(Lift),
}

/// What the operator adds to the built-in address table.
#[derive(Debug, Clone, Default)]
pub struct AddressPlan {
    /// Exceptions to the denied ranges, for every role.
    pub carve_outs: Vec<IpNet>,
    /// Ranges internal to this deployment (pod, service, node CIDRs, PUPI
    /// ranges, global IPv6 cluster prefixes): denied as `internal`.
    pub internal: Vec<IpNet>,
    /// Network-specific NAT64 prefixes: unwrapped like `64:ff9b::/96`.
    pub nat64: Vec<Nat64Prefix>,
    /// The proxy host's own addresses (loopback aside): denied as `self`
    /// unless an exact carve-out names them.
    pub self_addrs: Vec<IpAddr>,
    /// The proxy's own listening sockets: denied as `self` whatever is
    /// carved out (an unspecified address stands for every host address).
    pub listeners: Vec<SocketAddr>,
    /// Carve-outs bound to names.
    pub named: Vec<NamedCarveOut>,
}

/// A carve-out that lifts a denied range only for requests naming one of
/// `domains` (and, when given, on one of `ports`, for one of `roles`):
/// never for an IP literal or another name resolving into it, and never
/// for a metadata address.
#[derive(Debug, Clone)]
pub struct NamedCarveOut {
    pub net: IpNet,
    pub domains: Vec<DomainPattern>,
    pub ports: Vec<u16>,
    /// Role names; empty means every role.
    pub roles: Vec<String>,
}

impl NamedCarveOut {
    /// As `check --explain` names it: the CIDR and what it is bound to.
    fn describe(&self) -> String {
        let list = |items: Vec<String>| items.join(", ");
        let mut text = format!("{}, domains: {}", self.net, list(self.domains.iter().map(ToString::to_string).collect()));
        if !self.ports.is_empty() {
            text.push_str(&format!(", ports: {}", list(self.ports.iter().map(ToString::to_string).collect())));
        }
        if !self.roles.is_empty() {
            text.push_str(&format!(", roles: {}", self.roles.join(", ")));
        }
        text
    }
}

/// A compiled [`NamedCarveOut`].
#[derive(Debug, Clone)]
struct NameBinding {
    net: IpNet,
    domains: DomainMatcher<()>,
    ports: Option<PortSet>,
    roles: Option<Box<[RoleId]>>,
}

impl NameBinding {
    fn lifts(&self, role: RoleId, name: &DomainName, port: u16, addr: IpAddr) -> bool {
        self.net.contains(&addr) && self.covers(role, name, port)
    }

    /// True when the binding is for this role, name and port (whatever the address).
    fn covers(&self, role: RoleId, name: &DomainName, port: u16) -> bool {
        self.domains.lookup(name.as_str()).is_some()
            && self.ports.as_ref().is_none_or(|p| p.contains(port))
            && self.roles.as_ref().is_none_or(|r| r.contains(&role))
    }
}

impl AddressPlan {
    /// True when `net` overlaps an always-denied or internal range, or
    /// holds a host address, i.e. a carve-out for it would change something.
    pub fn overlaps_denied_range(&self, net: &IpNet) -> bool {
        let overlaps = |d: &IpNet| d.contains(&net.network()) || net.contains(&d.network());
        ranges::denied_ranges().any(|(d, _)| overlaps(&d))
            || self.internal.iter().any(overlaps)
            || self.self_addrs.iter().any(|a| net.contains(a))
    }
}

/// The compiled, immutable policy.
#[derive(Debug, Clone)]
pub struct Policy {
    transitions: Transitions,
    bindings: Box<[NameBinding]>,
    listeners: Box<[SocketAddr]>,
    self_addrs: Box<[IpAddr]>,
    ranges: CidrTable<RangeVerdict>,
    /// Per role: its own table when it has role-specific carve-outs.
    role_ranges: Vec<Option<CidrTable<RangeVerdict>>>,
    /// The kind and the rule index (see [`RuleId::DeniedName`]).
    denied_names: DomainMatcher<(RangeKind, u16)>,
    roles: Vec<Role>,
    default_role: RoleId,
    /// Describes the rule ids this snapshot hands out.
    catalog: Arc<RuleCatalog>,
}

impl Policy {
    /// Compiles a policy. `default_role` names the role for clients without
    /// an identity and must be one of `roles`. Carve-outs lift the
    /// always-denied and internal ranges only where they are at least as
    /// specific.
    pub fn new(roles: Vec<Role>, default_role: &str, plan: &AddressPlan) -> Result<Self, PolicyError> {
        if roles.len() > usize::from(u16::MAX) {
            return Err(PolicyError::TooManyRoles(roles.len()));
        }
        let default_role = roles
            .iter()
            .position(|r| &*r.name == default_role)
            .map(RoleId)
            .ok_or_else(|| PolicyError::MissingRole(default_role.to_string()))?;
        // Loopback is left to its range (and the listener check): a carve-out
        // of it is how tests and sidecars reach local origins.
        let own: Vec<(IpNet, u32)> =
            plan.self_addrs.iter().zip(0..).filter(|(a, _)| !a.is_loopback()).map(|(a, i)| (IpNet::from(*a), i)).collect();
        let row_index = |net: IpNet| registry::rows().position(|r| r.net() == net).unwrap_or(0) as u16;
        // Later entries win for an identical prefix: internal ranges and
        // host addresses over the registry rows, carve-outs over all.
        let table = |role: Option<(u16, &[IpNet])>| {
            let (role_index, extra) = role.unwrap_or((0, &[]));
            CidrTable::new(
                registry::rows()
                    .zip(0..)
                    .filter_map(|(row, i)| match row.treatment {
                        registry::Treatment::Deny(k) => Some((row.net(), RangeVerdict::Denied(k, RangeSource::Registry(i)))),
                        _ => None,
                    })
                    .chain(ranges::reachable_exceptions().map(|n| (n, RangeVerdict::NotDenied(Lift::Reachable(row_index(n))))))
                    .chain(plan.internal.iter().zip(0..).map(|(n, i)| {
                        (*n, RangeVerdict::Denied(RangeKind::Internal, RangeSource::Internal(i)))
                    }))
                    .chain(own.iter().map(|(n, i)| (*n, RangeVerdict::Denied(RangeKind::SelfAddr, RangeSource::SelfAddr(*i)))))
                    .chain(plan.carve_outs.iter().zip(0..).map(|(n, i)| (*n, RangeVerdict::NotDenied(Lift::CarveOut(i)))))
                    .chain(extra.iter().zip(0..).map(|(n, i)| (*n, RangeVerdict::NotDenied(Lift::RoleCarveOut(role_index, i))))),
            )
        };
        let ranges = table(None);
        let role_ranges = roles
            .iter()
            .zip(0..)
            .map(|(r, i)| (!r.carve_outs.is_empty()).then(|| table(Some((i, &r.carve_outs)))))
            .collect();
        let denied_names = DomainMatcher::new(
            ranges::DENIED_NAMES
                .iter()
                .map(|(n, k)| (DomainPattern::parse(n), *k))
                .chain(ranges::DENIED_NAME_SUFFIXES.iter().map(|(n, k)| (DomainPattern::parse(&format!("*.{n}")), *k)))
                .zip(0..)
                .map(|((p, k), i)| (p.expect("built-in denied names are valid"), (k, i))),
        );
        let catalog = Arc::new(RuleCatalog {
            roles: roles.iter().map(Role::rules).collect(),
            internal: plan.internal.clone(),
            self_addrs: plan.self_addrs.clone(),
            listeners: plan.listeners.clone(),
            carve_outs: plan.carve_outs.clone(),
            named: plan.named.iter().map(NamedCarveOut::describe).collect(),
            source: None,
            texts: Default::default(),
        });
        let transitions = Transitions::new(plan.nat64.iter().copied());
        let bindings = plan
            .named
            .iter()
            .map(|n| {
                let roles = if n.roles.is_empty() {
                    None
                } else {
                    let ids = n.roles.iter().map(|name| {
                        roles.iter().position(|r| &*r.name == name).map(RoleId).ok_or_else(|| PolicyError::MissingRole(name.clone()))
                    });
                    Some(ids.collect::<Result<Box<[RoleId]>, _>>()?)
                };
                Ok(NameBinding {
                    net: n.net,
                    domains: DomainMatcher::new(n.domains.iter().map(|d| (d.clone(), ()))),
                    ports: (!n.ports.is_empty()).then(|| PortSet::new(n.ports.iter().copied())),
                    roles,
                })
            })
            .collect::<Result<_, PolicyError>>()?;
        Ok(Policy {
            transitions,
            bindings,
            listeners: plan.listeners.iter().copied().collect(),
            self_addrs: plan.self_addrs.iter().copied().collect(),
            ranges,
            role_ranges,
            denied_names,
            roles,
            default_role,
            catalog,
        })
    }

    /// Attaches the config's source lines, so rules print with `file:line`.
    pub fn with_source(mut self, source: Arc<SourceLines>) -> Self {
        Arc::make_mut(&mut self.catalog).source = Some(source);
        self
    }

    /// The rule as an operator reads it (never sent to clients).
    pub fn describe(&self, rule: RuleId) -> RuleText<'_> {
        self.catalog.describe(rule)
    }

    /// The rule with a handle on this snapshot's catalog, to describe it
    /// later (when the decision line is written).
    pub fn rule_ref(&self, rule: RuleId) -> RuleRef {
        RuleRef::new(self.catalog.clone(), rule)
    }

    /// Describes rule ids and consulted steps of this snapshot.
    pub fn catalog(&self) -> &RuleCatalog {
        &self.catalog
    }

    /// The role for clients without an identity.
    pub fn default_role(&self) -> RoleId {
        self.default_role
    }

    /// Looks a role up by name.
    pub fn role_id(&self, name: &str) -> Option<RoleId> {
        self.roles.iter().position(|r| &*r.name == name).map(RoleId)
    }

    /// The role behind an id from this snapshot.
    pub fn role(&self, id: RoleId) -> &Role {
        &self.roles[id.0]
    }

    /// The always-denied range an address falls in, unless carved out globally.
    pub fn denied_range(&self, addr: IpAddr) -> Option<RangeKind> {
        self.range_verdict(&self.ranges, addr)
    }

    /// The always-denied range an address falls in for `role`, whose own
    /// carve-outs also count.
    pub fn denied_range_for(&self, role: RoleId, addr: IpAddr) -> Option<RangeKind> {
        let table = self.role_ranges[role.0].as_ref().unwrap_or(&self.ranges);
        self.range_verdict(table, addr)
    }

    /// The transition forms in force (built in, plus declared NAT64 prefixes).
    pub fn transitions(&self) -> &Transitions {
        &self.transitions
    }

    fn range_verdict(&self, table: &CidrTable<RangeVerdict>, addr: IpAddr) -> Option<RangeKind> {
        match table.lookup(self.transitions.judged(addr)) {
            Some(RangeVerdict::Denied(kind, _)) => Some(*kind),
            _ => None,
        }
    }

    fn range_table(&self, role: RoleId) -> &CidrTable<RangeVerdict> {
        self.role_ranges[role.0].as_ref().unwrap_or(&self.ranges)
    }

    /// True when a name-bound carve-out lifts the denied `kind` of `addr`
    /// for this request. Metadata is never lifted.
    /// Returns the index of the first such carve-out.
    fn bound_to_name(&self, role: RoleId, target: &Target, addr: IpAddr, kind: RangeKind) -> Option<u32> {
        let Host::Name(name) = &target.host else { return None };
        let addr = self.transitions.judged(addr);
        if kind == RangeKind::Metadata {
            return None;
        }
        self.bindings.iter().position(|b| b.lifts(role, name, target.port, addr)).map(|i| i as u32)
    }

    /// True when a carve-out bound to names (`allow_ranges` with `domains`)
    /// is for this request's role, name and port: it can lift a denied
    /// range only for addresses checked here, so the name must be resolved
    /// here even when a parent proxy could resolve it.
    pub fn binds_name(&self, role: RoleId, target: &Target) -> bool {
        let Host::Name(name) = &target.host else { return false };
        self.bindings.iter().any(|b| b.covers(role, name, target.port))
    }

    /// The index of the listener `addr:port` is, if it is one of the
    /// proxy's own listening sockets.
    fn own_listener(&self, addr: IpAddr, port: u16) -> Option<usize> {
        let addr = self.transitions.judged(addr);
        self.listeners.iter().position(|l| {
            l.port() == port
                && (l.ip().to_canonical() == addr
                    || (l.ip().is_unspecified() && (addr.is_loopback() || self.self_addrs.contains(&addr))))
        })
    }

    /// The kind of an always-denied name.
    pub fn denied_name(&self, name: &DomainName) -> Option<RangeKind> {
        self.denied_names.lookup(name.as_str()).map(|m| m.value().0)
    }

    /// Decides what can be decided before DNS: IP literals completely,
    /// names only when they are denied whatever they resolve to.
    pub fn pre_resolution<'t>(&self, role: RoleId, kind: RequestKind, target: &'t Target) -> PreResolution<'t> {
        let name = match &target.host {
            Host::Ip(ip) => return PreResolution::Decided(self.decide(role, kind, target, &[*ip])),
            Host::Name(name) => name,
        };
        if let Some((range, i)) = self.denied_names.lookup(name.as_str()).map(|m| *m.value()) {
            return PreResolution::Decided(Decision::Deny { reason: DenyReason::DeniedName(range), rule: RuleId::DeniedName(i) });
        }
        let r = role.index();
        let role = self.role(role);
        if let Some(rule) = role.deny.denies(&self.transitions, r, target, &[], &mut NoTrace) {
            return PreResolution::Decided(Decision::Deny { reason: DenyReason::DeniedByRole, rule: RuleId::Role(r, rule) });
        }
        match role.allow.check_before_resolution(kind, target) {
            Err((reason, rule)) if role.mode == Mode::Enforce => {
                PreResolution::Decided(Decision::Deny { reason, rule: RuleId::Role(r, rule) })
            }
            _ => PreResolution::Resolve(name),
        }
    }

    /// Decides a request given every address the target resolved to (or the
    /// literal address). One denied address denies the whole request.
    pub fn decide(&self, role: RoleId, kind: RequestKind, target: &Target, addrs: &[IpAddr]) -> Decision {
        self.decide_with(role, kind, target, addrs, &mut NoTrace)
    }

    /// Decides like [`Policy::decide`] and lists every rule consulted, in
    /// order (`check --explain`). Allocates; not for the request path.
    pub fn explain(&self, role: RoleId, kind: RequestKind, target: &Target, addrs: &[IpAddr]) -> (Decision, Vec<Step>) {
        let mut steps = Vec::new();
        let decision = self.decide_with(role, kind, target, addrs, &mut steps);
        (decision, steps)
    }

    /// Decides a request on its name alone, for a parent proxy that
    /// resolves the name (`upstream_proxy.resolve: parent`): the
    /// always-denied names, the role's deny entries, ports, mode and domain
    /// rules. No address is checked, so a name that only a CIDR rule could
    /// admit is denied (`not-allowlisted`); an allowed permit holds no
    /// address ([`Permit::name_only`]). An IP literal is decided as by
    /// [`Policy::decide`], against every range.
    pub fn decide_name_only(&self, role: RoleId, kind: RequestKind, target: &Target) -> Decision {
        if let Host::Ip(ip) = target.host {
            return self.decide(role, kind, target, &[ip]);
        }
        if let Some(deny) = self.deny_name(target, &mut NoTrace) {
            return deny;
        }
        match self.check_role(role, kind, target, &[], &mut NoTrace) {
            Ok(permit) => Decision::Allow(Permit { name_only: true, ..permit }),
            Err(deny) => deny,
        }
    }

    #[inline(always)]
    fn decide_with<T: Trace>(&self, role_id: RoleId, kind: RequestKind, target: &Target, addrs: &[IpAddr], trace: &mut T) -> Decision {
        if let Some(deny) = self.deny_name(target, trace) {
            return deny;
        }
        let table = self.range_table(role_id);
        for addr in addrs {
            let judged = self.transitions.judged(*addr);
            let verdict = table.lookup(judged).copied();
            let binding = match verdict {
                Some(RangeVerdict::Denied(kind, _)) => self.bound_to_name(role_id, target, *addr, kind),
                _ => None,
            };
            let bound = binding.is_some();
            let step = binding.map_or_else(|| range_step(verdict), |i| RangeStep::Lifted(Lift::BoundToName(i)));
            trace.step(Step::Range { addr: *addr, judged, verdict: step });
            match verdict {
                Some(RangeVerdict::Denied(kind, source)) if !bound => {
                    return Decision::Deny { reason: DenyReason::DeniedRange(kind), rule: RuleId::Range(source) };
                }
                _ => {}
            }
        }
        for addr in addrs {
            let listener = self.own_listener(*addr, target.port).map(|i| RuleId::Listener(i as u16));
            trace.step(Step::Listener { addr: *addr, matched: listener });
            if let Some(rule) = listener {
                return Decision::Deny { reason: DenyReason::DeniedRange(RangeKind::SelfAddr), rule };
            }
        }
        let mut permit = match self.check_role(role_id, kind, target, addrs, trace) {
            Ok(permit) => permit,
            Err(deny) => return deny,
        };
        if addrs.is_empty() {
            return Decision::Deny { reason: DenyReason::NotAllowListed, rule: RuleId::NoAddresses };
        }
        permit.addrs = addrs.iter().map(|a| SocketAddr::new(a.to_canonical(), target.port)).collect();
        Decision::Allow(permit)
    }

    /// The deny of an always-denied name.
    #[inline(always)]
    fn deny_name<T: Trace>(&self, target: &Target, trace: &mut T) -> Option<Decision> {
        let Host::Name(name) = &target.host else { return None };
        let matched = self.denied_names.lookup(name.as_str()).map(|m| *m.value());
        trace.step(Step::DeniedName { matched: matched.map(|(_, i)| RuleId::DeniedName(i)) });
        matched.map(|(range, i)| Decision::Deny { reason: DenyReason::DeniedName(range), rule: RuleId::DeniedName(i) })
    }

    /// The role's part of a decision (its deny entries, mode and
    /// allow-list): a permit still without addresses, or the deny.
    #[inline(always)]
    fn check_role<T: Trace>(&self, role_id: RoleId, kind: RequestKind, target: &Target, addrs: &[IpAddr], trace: &mut T) -> Result<Permit, Decision> {
        let r = role_id.index();
        let role = self.role(role_id);
        if let Some(rule) = role.deny.denies(&self.transitions, r, target, addrs, trace) {
            return Err(Decision::Deny { reason: DenyReason::DeniedByRole, rule: RuleId::Role(r, rule) });
        }
        trace.step(Step::Mode { role: r, mode: role.mode });
        let checked = match role.mode {
            Mode::Open => Ok((AllowedBy::Open, RoleRule::OpenMode)),
            Mode::Enforce | Mode::Report => role.allow.check(&self.transitions, (r, kind), target, addrs, trace),
        };
        let (rule, rule_id, would_deny) = match (checked, role.mode) {
            (Ok((rule, id)), _) => (rule, id, None),
            (Err((reason, id)), Mode::Report | Mode::Open) => (AllowedBy::ReportOnly, id, Some(reason)),
            (Err((reason, id)), Mode::Enforce) => return Err(Decision::Deny { reason, rule: RuleId::Role(r, id) }),
        };
        Ok(Permit {
            addrs: Vec::new(),
            rule,
            rule_id: RuleId::Role(r, rule_id),
            would_deny,
            sni_check: role.sni_check && rule == AllowedBy::Domain,
            tunnel: role.allow.tunnel_start(kind, role.mode, target.port),
            name_only: false,
        })
    }

    /// [`Policy::decide`] for a connection redirected to the transparent
    /// listener, whose packets were headed for `original`: the decision is
    /// the same, and an allowed permit is narrowed to `original` when that
    /// is one of the checked addresses. Otherwise the permit keeps the
    /// checked addresses of the name (a client with another DNS view, or one
    /// lying in its SNI/Host): `original` itself is never dialed unchecked.
    pub fn decide_redirected(
        &self,
        role: RoleId,
        kind: RequestKind,
        target: &Target,
        addrs: &[IpAddr],
        original: IpAddr,
    ) -> Decision {
        match self.decide(role, kind, target, addrs) {
            Decision::Allow(permit) => Decision::Allow(permit.toward(original)),
            deny => deny,
        }
    }
}

fn range_step(verdict: Option<RangeVerdict>) -> RangeStep {
    match verdict {
        None => RangeStep::Outside,
        Some(RangeVerdict::NotDenied(lift)) => RangeStep::Lifted(lift),
        Some(RangeVerdict::Denied(_, source)) => RangeStep::Denied(RuleId::Range(source)),
    }
}

/// A policy that cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("role {0:?} is not defined")]
    MissingRole(String),
    /// Rule ids carry the role as 16 bits.
    #[error("{0} roles: at most 65535 are supported")]
    TooManyRoles(usize),
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod transparent_tests;
