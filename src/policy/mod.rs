//! The policy engine: a pure, immutable value compiled from config that
//! answers "may this client reach this target at these addresses?".
//!
//! No I/O and no locks. The proxy publishes a compiled [`Policy`] behind an
//! atomic pointer and loads it once per request; only this module can make the
//! [`Permit`] the dialer requires, so nothing can dial an unchecked address.

pub mod cidr;
mod decision;
pub mod domain;
pub mod kind;
mod plan;
pub mod provenance;
pub mod ranges;
pub mod registry;
mod role;

pub use decision::{AllowedBy, Decision, DenyReason, Permit, PreResolution, RoleId, TunnelStart};
pub use kind::{Mode, RequestKind};
pub use plan::{AddressPlan, NamedCarveOut};
pub use role::{AllowList, DenyList, PortSet, Role};

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::target::{DomainName, Host, Target};
use cidr::CidrTable;
use domain::{DomainMatcher, DomainPattern};
use plan::{NameBinding, RangeVerdict};
use provenance::{Lift, NoTrace, RangeSource, RangeStep, RoleRule, RuleCatalog, RuleId, RuleRef, RuleText, SourceLines, Step, Trace};
use ranges::{RangeKind, Transitions};

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

    /// Every role, in the order of their ids.
    pub fn roles(&self) -> &[Role] {
        &self.roles
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
