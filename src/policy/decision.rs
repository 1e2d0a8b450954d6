//! The answer: a [`Decision`] to allow, with the [`Permit`] that only this
//! module's parent can build, or to deny, with a closed [`DenyReason`] whose
//! code feeds the deny header, the log line and the metric label alike.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use crate::target::DomainName;

use super::provenance::RuleId;
use super::ranges::RangeKind;

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
    /// Every reason, so that the series counting them can exist before the
    /// first deny (`every_reason_is_listed_once` checks the list).
    pub const ALL: [DenyReason; 28] = {
        use RangeKind::*;
        [
            DenyReason::DeniedRange(Metadata),
            DenyReason::DeniedRange(LinkLocal),
            DenyReason::DeniedRange(Loopback),
            DenyReason::DeniedRange(Private),
            DenyReason::DeniedRange(Special),
            DenyReason::DeniedRange(Internal),
            DenyReason::DeniedRange(SelfAddr),
            DenyReason::DeniedName(Metadata),
            DenyReason::DeniedName(LinkLocal),
            DenyReason::DeniedName(Loopback),
            DenyReason::DeniedName(Private),
            DenyReason::DeniedName(Special),
            DenyReason::DeniedName(Internal),
            DenyReason::DeniedName(SelfAddr),
            DenyReason::NotAllowListed,
            DenyReason::PortNotAllowed,
            DenyReason::DeniedByRole,
            DenyReason::AuthRequired,
            DenyReason::AuthFailed,
            DenyReason::SniMismatch,
            DenyReason::SniMissing,
            DenyReason::NotTls,
            DenyReason::SniTimeout,
            DenyReason::InvalidTarget,
            DenyReason::Revoked,
            DenyReason::HostMismatch,
            DenyReason::NotHttp,
            DenyReason::EchRefused,
        ]
    };

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
pub struct RoleId(pub(super) usize);

impl RoleId {
    /// The index as carried in a [`RuleId`] (a policy has fewer than 2^16 roles).
    pub(super) fn index(self) -> u16 {
        self.0 as u16
    }
}

/// Permission to dial: the checked socket addresses and the rule that
/// allowed them. Only the policy engine constructs one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permit {
    pub(super) addrs: Vec<SocketAddr>,
    pub(super) rule: AllowedBy,
    pub(super) rule_id: RuleId,
    pub(super) would_deny: Option<DenyReason>,
    pub(super) sni_check: bool,
    pub(super) tunnel: TunnelStart,
    /// Given on the name alone, for a parent proxy that resolves it.
    pub(super) name_only: bool,
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
    pub(super) fn toward(mut self, original: IpAddr) -> Permit {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each variant is in [`DenyReason::ALL`] exactly once: the match has
    /// no wildcard, so a new variant does not compile until it is placed.
    #[test]
    fn every_reason_is_listed_once() {
        let position = |reason: DenyReason| -> usize {
            let kind = |k: RangeKind| RangeKind::ALL.iter().position(|x| *x == k).expect("every kind is listed");
            match reason {
                DenyReason::DeniedRange(k) => kind(k),
                DenyReason::DeniedName(k) => 7 + kind(k),
                DenyReason::NotAllowListed => 14,
                DenyReason::PortNotAllowed => 15,
                DenyReason::DeniedByRole => 16,
                DenyReason::AuthRequired => 17,
                DenyReason::AuthFailed => 18,
                DenyReason::SniMismatch => 19,
                DenyReason::SniMissing => 20,
                DenyReason::NotTls => 21,
                DenyReason::SniTimeout => 22,
                DenyReason::InvalidTarget => 23,
                DenyReason::Revoked => 24,
                DenyReason::HostMismatch => 25,
                DenyReason::NotHttp => 26,
                DenyReason::EchRefused => 27,
            }
        };
        for (i, reason) in DenyReason::ALL.iter().enumerate() {
            assert_eq!(position(*reason), i, "{reason}");
        }
        let codes: std::collections::BTreeSet<&str> = DenyReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(codes.len(), DenyReason::ALL.len(), "one code per reason");
    }
}
