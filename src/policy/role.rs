//! A role's own rules: its ports, allow-list and deny-list, and how they
//! judge a target once the always-denied ranges have had their say.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::target::{DomainName, Host, Target};

use super::cidr::CidrTable;
use super::decision::{AllowedBy, DenyReason, TunnelStart};
use super::domain::{DomainMatcher, DomainPattern};
use super::kind::{Mode, RequestKind};
use super::ranges::Transitions;
use super::provenance::{RoleRule, RoleRules, RuleId, Step, Trace};

/// A sorted set of ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSet(pub(super) Box<[u16]>);

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
    pub(super) domains: DomainMatcher<u32>,
    pub(super) cidrs: CidrTable<u32>,
    pub(super) http_ports: PortSet,
    pub(super) connect_ports: PortSet,
    /// False: CIDR rules admit IP literals only; a name that matches no
    /// domain rule is denied without being resolved (no DNS query leaves
    /// for it, which closes the exfiltration channel through denied names).
    pub(super) resolve_unlisted: bool,
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
    pub(super) fn cidrs_admit_names(&self) -> bool {
        self.resolve_unlisted && !self.cidrs.is_empty()
    }

    /// The port list named for `kind` (a `CONNECT` is also admitted on an
    /// `http_ports` port when it carries plain HTTP, see [`Self::port_allowed`]).
    pub(super) fn ports(&self, kind: RequestKind) -> &PortSet {
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
    pub(super) fn tunnel_start(&self, kind: RequestKind, mode: Mode, port: u16) -> TunnelStart {
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
    pub(super) fn check_before_resolution(&self, kind: RequestKind, target: &Target) -> Result<(), (DenyReason, RoleRule)> {
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
    pub(super) fn check<T: Trace>(
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
pub(super) fn indexed<T: Clone>(list: &[T]) -> impl Iterator<Item = (T, u32)> + '_ {
    list.iter().cloned().zip(0..)
}

/// A named set of rules applied to a class of clients.
#[derive(Debug, Clone)]
pub struct Role {
    pub(super) name: Arc<str>,
    pub(super) mode: Mode,
    pub(super) sni_check: bool,
    pub(super) allow: AllowList,
    pub(super) deny: DenyList,
    /// Carve-outs that name this role, on top of the global ones.
    pub(super) carve_outs: Vec<IpNet>,
    /// TLS ClientHellos offering Encrypted ClientHello are let through.
    pub(super) allow_ech: bool,
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
    pub(super) domains: DomainMatcher<u32>,
    pub(super) cidrs: CidrTable<u32>,
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
    pub(super) fn denies<T: Trace>(&self, transitions: &Transitions, role: u16, target: &Target, addrs: &[IpAddr], trace: &mut T) -> Option<RoleRule> {
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
    pub(super) fn rules(&self) -> RoleRules {
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
