//! The policy engine: a pure, immutable value compiled from config that
//! answers "may this client reach this target at these addresses?".
//!
//! No I/O and no locks. The proxy publishes a compiled [`Policy`] behind an
//! atomic pointer and loads it once per request; only this module can make the
//! [`Permit`] the dialer requires, so nothing can dial an unchecked address.

pub mod cidr;
pub mod domain;
pub mod ranges;

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::target::{DomainName, Host, Target};
use cidr::CidrTable;
use domain::{DomainMatcher, DomainPattern};
use ranges::RangeKind;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
            DenyReason::DeniedName(Metadata) => "denied-name:metadata",
            DenyReason::DeniedName(LinkLocal) => "denied-name:link-local",
            DenyReason::DeniedName(Loopback) => "denied-name:loopback",
            DenyReason::DeniedName(Private) => "denied-name:private",
            DenyReason::DeniedName(Special) => "denied-name:special",
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

/// Permission to dial: the checked socket addresses and the rule that
/// allowed them. Only the policy engine constructs one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permit {
    addrs: Vec<SocketAddr>,
    rule: AllowedBy,
    would_deny: Option<DenyReason>,
    sni_check: bool,
}

impl Permit {
    /// Every address that was checked, in resolver order; dial only these.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The rule that allowed the request.
    pub fn rule(&self) -> AllowedBy {
        self.rule
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
}

/// The outcome of a policy check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(Permit),
    Deny(DenyReason),
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
    domains: DomainMatcher<()>,
    cidrs: CidrTable<()>,
    http_ports: PortSet,
    connect_ports: PortSet,
}

impl AllowList {
    /// Compiles an allow-list.
    pub fn new(
        domains: impl IntoIterator<Item = DomainPattern>,
        cidrs: impl IntoIterator<Item = IpNet>,
        http_ports: PortSet,
        connect_ports: PortSet,
    ) -> Self {
        AllowList {
            domains: DomainMatcher::new(domains.into_iter().map(|d| (d, ()))),
            cidrs: CidrTable::new(cidrs.into_iter().map(|n| (n, ()))),
            http_ports,
            connect_ports,
        }
    }

    fn ports(&self, kind: RequestKind) -> &PortSet {
        match kind {
            RequestKind::Http | RequestKind::TransparentHttp => &self.http_ports,
            RequestKind::Connect | RequestKind::TransparentTls | RequestKind::TransparentTcp => &self.connect_ports,
        }
    }

    fn name_allowed(&self, name: &DomainName) -> bool {
        self.domains.lookup(name.as_str()).is_some()
    }

    fn addr_allowed(&self, addr: IpAddr) -> bool {
        self.cidrs.lookup(ranges::judged_address(addr)).is_some()
    }

    /// The part of the check that needs no addresses: the port, and for a
    /// name when no CIDR rule could match its addresses, the name itself.
    fn check_before_resolution(&self, kind: RequestKind, target: &Target) -> Result<(), DenyReason> {
        if !self.ports(kind).contains(target.port) {
            return Err(DenyReason::PortNotAllowed);
        }
        match &target.host {
            Host::Name(name) if self.cidrs.is_empty() && !self.name_allowed(name) => {
                Err(DenyReason::NotAllowListed)
            }
            _ => Ok(()),
        }
    }

    fn check(&self, kind: RequestKind, target: &Target, addrs: &[IpAddr]) -> Result<AllowedBy, DenyReason> {
        if !self.ports(kind).contains(target.port) {
            return Err(DenyReason::PortNotAllowed);
        }
        if let Host::Name(name) = &target.host {
            if self.name_allowed(name) {
                return Ok(AllowedBy::Domain);
            }
        }
        if !addrs.is_empty() && addrs.iter().all(|a| self.addr_allowed(*a)) {
            return Ok(AllowedBy::Cidr);
        }
        Err(DenyReason::NotAllowListed)
    }
}

/// A named set of rules applied to a class of clients.
#[derive(Debug, Clone)]
pub struct Role {
    name: Box<str>,
    mode: Mode,
    sni_check: bool,
    allow: AllowList,
    deny: DenyList,
    /// Carve-outs that name this role, on top of the global ones.
    carve_outs: Vec<IpNet>,
}

/// Destinations a role may never reach, on top of the always-denied ranges.
#[derive(Debug, Clone)]
pub struct DenyList {
    domains: DomainMatcher<()>,
    cidrs: CidrTable<()>,
}

impl Default for DenyList {
    fn default() -> Self {
        DenyList::new([], [])
    }
}

impl DenyList {
    /// Compiles a deny list.
    pub fn new(domains: impl IntoIterator<Item = DomainPattern>, cidrs: impl IntoIterator<Item = IpNet>) -> Self {
        DenyList {
            domains: DomainMatcher::new(domains.into_iter().map(|d| (d, ()))),
            cidrs: CidrTable::new(cidrs.into_iter().map(|n| (n, ()))),
        }
    }

    fn denies(&self, target: &Target, addrs: &[IpAddr]) -> bool {
        let name_denied = matches!(&target.host, Host::Name(n) if self.domains.lookup(n.as_str()).is_some());
        name_denied || addrs.iter().any(|a| self.cidrs.lookup(ranges::judged_address(*a)).is_some())
    }
}

impl Role {
    /// Creates a role.
    pub fn new(name: &str, mode: Mode, sni_check: bool, allow: AllowList) -> Self {
        Role { name: name.into(), mode, sni_check, allow, deny: DenyList::default(), carve_outs: Vec::new() }
    }

    /// Adds the role's own deny entries.
    pub fn with_deny(mut self, deny: DenyList) -> Self {
        self.deny = deny;
        self
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

    /// The role's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }
}

/// Whether an address range is denied or carved out by the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RangeVerdict {
    Denied(RangeKind),
    CarvedOut,
}

/// True when `net` overlaps an always-denied range, i.e. a carve-out for it
/// would change something.
pub fn overlaps_denied_range(net: &IpNet) -> bool {
    ranges::denied_ranges().any(|(d, _)| d.contains(&net.network()) || net.contains(&d.network()))
}

/// The compiled, immutable policy.
#[derive(Debug, Clone)]
pub struct Policy {
    ranges: CidrTable<RangeVerdict>,
    /// Per role: its own table when it has role-specific carve-outs.
    role_ranges: Vec<Option<CidrTable<RangeVerdict>>>,
    denied_names: DomainMatcher<RangeKind>,
    roles: Vec<Role>,
    default_role: RoleId,
}

impl Policy {
    /// Compiles a policy. `default_role` names the role for clients without
    /// an identity and must be one of `roles`. Carve-outs lift the
    /// always-denied ranges only where they are at least as specific.
    pub fn new(roles: Vec<Role>, default_role: &str, carve_outs: &[IpNet]) -> Result<Self, PolicyError> {
        let default_role = roles
            .iter()
            .position(|r| &*r.name == default_role)
            .map(RoleId)
            .ok_or_else(|| PolicyError::MissingRole(default_role.to_string()))?;
        // Carve-outs come after the denied ranges so an identical prefix
        // resolves to the carve-out.
        let table = |extra: &[IpNet]| {
            CidrTable::new(
                ranges::denied_ranges()
                    .map(|(n, k)| (n, RangeVerdict::Denied(k)))
                    .chain(carve_outs.iter().chain(extra).map(|n| (*n, RangeVerdict::CarvedOut))),
            )
        };
        let ranges = table(&[]);
        let role_ranges = roles
            .iter()
            .map(|r| (!r.carve_outs.is_empty()).then(|| table(&r.carve_outs)))
            .collect();
        let denied_names = DomainMatcher::new(
            ranges::DENIED_NAMES
                .iter()
                .map(|(n, k)| (DomainPattern::parse(n), *k))
                .chain(ranges::DENIED_NAME_SUFFIXES.iter().map(|(n, k)| (DomainPattern::parse(&format!("*.{n}")), *k)))
                .map(|(p, k)| (p.expect("built-in denied names are valid"), k)),
        );
        Ok(Policy { ranges, role_ranges, denied_names, roles, default_role })
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
        Self::range_verdict(&self.ranges, addr)
    }

    /// The always-denied range an address falls in for `role`, whose own
    /// carve-outs also count.
    pub fn denied_range_for(&self, role: RoleId, addr: IpAddr) -> Option<RangeKind> {
        let table = self.role_ranges[role.0].as_ref().unwrap_or(&self.ranges);
        Self::range_verdict(table, addr)
    }

    fn range_verdict(table: &CidrTable<RangeVerdict>, addr: IpAddr) -> Option<RangeKind> {
        match table.lookup(ranges::judged_address(addr)) {
            Some(RangeVerdict::Denied(kind)) => Some(*kind),
            _ => None,
        }
    }

    /// The kind of an always-denied name.
    pub fn denied_name(&self, name: &DomainName) -> Option<RangeKind> {
        self.denied_names.lookup(name.as_str()).map(|m| *m.value())
    }

    /// Decides what can be decided before DNS: IP literals completely,
    /// names only when they are denied whatever they resolve to.
    pub fn pre_resolution<'t>(&self, role: RoleId, kind: RequestKind, target: &'t Target) -> PreResolution<'t> {
        let name = match &target.host {
            Host::Ip(ip) => return PreResolution::Decided(self.decide(role, kind, target, &[*ip])),
            Host::Name(name) => name,
        };
        if let Some(range) = self.denied_name(name) {
            return PreResolution::Decided(Decision::Deny(DenyReason::DeniedName(range)));
        }
        let role = self.role(role);
        if role.deny.denies(target, &[]) {
            return PreResolution::Decided(Decision::Deny(DenyReason::DeniedByRole));
        }
        match role.allow.check_before_resolution(kind, target) {
            Err(reason) if role.mode == Mode::Enforce => PreResolution::Decided(Decision::Deny(reason)),
            _ => PreResolution::Resolve(name),
        }
    }

    /// Decides a request given every address the target resolved to (or the
    /// literal address). One denied address denies the whole request.
    pub fn decide(&self, role: RoleId, kind: RequestKind, target: &Target, addrs: &[IpAddr]) -> Decision {
        if let Host::Name(name) = &target.host {
            if let Some(range) = self.denied_name(name) {
                return Decision::Deny(DenyReason::DeniedName(range));
            }
        }
        if let Some(range) = addrs.iter().find_map(|a| self.denied_range_for(role, *a)) {
            return Decision::Deny(DenyReason::DeniedRange(range));
        }
        let role = self.role(role);
        if role.deny.denies(target, addrs) {
            return Decision::Deny(DenyReason::DeniedByRole);
        }
        let checked = match role.mode {
            Mode::Open => Ok(AllowedBy::Open),
            Mode::Enforce | Mode::Report => role.allow.check(kind, target, addrs),
        };
        let (rule, would_deny) = match (checked, role.mode) {
            (Ok(rule), _) => (rule, None),
            (Err(reason), Mode::Report | Mode::Open) => (AllowedBy::ReportOnly, Some(reason)),
            (Err(reason), Mode::Enforce) => return Decision::Deny(reason),
        };
        if addrs.is_empty() {
            return Decision::Deny(DenyReason::NotAllowListed);
        }
        let addrs = addrs.iter().map(|a| SocketAddr::new(a.to_canonical(), target.port)).collect();
        let sni_check = role.sni_check && rule == AllowedBy::Domain;
        Decision::Allow(Permit { addrs, rule, would_deny, sni_check })
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

/// A policy that cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("role {0:?} is not defined")]
    MissingRole(String),
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod transparent_tests;
