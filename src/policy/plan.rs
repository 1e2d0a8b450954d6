//! What the operator adds to the built-in address table: internal ranges,
//! NAT64 prefixes, carve-outs (for all, per role, or bound to names), and
//! the proxy's own addresses.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::target::DomainName;

use super::decision::RoleId;
use super::domain::{DomainMatcher, DomainPattern};
use super::provenance::{Lift, RangeSource};
use super::ranges::{self, Nat64Prefix, RangeKind};
use super::role::PortSet;

/// Whether an address range is denied, or not denied inside a denied block
/// (a globally reachable registry row, or the operator's carve-out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RangeVerdict {
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
    pub(super) fn describe(&self) -> String {
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
pub(super) struct NameBinding {
    pub(super) net: IpNet,
    pub(super) domains: DomainMatcher<()>,
    pub(super) ports: Option<PortSet>,
    pub(super) roles: Option<Box<[RoleId]>>,
}

impl NameBinding {
    pub(super) fn lifts(&self, role: RoleId, name: &DomainName, port: u16, addr: IpAddr) -> bool {
        self.net.contains(&addr) && self.covers(role, name, port)
    }

    /// True when the binding is for this role, name and port (whatever the address).
    pub(super) fn covers(&self, role: RoleId, name: &DomainName, port: u16) -> bool {
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
