//! Value types that validate while they parse, so a bad value is refused
//! with its file, line and field: durations, domain rules, CIDRs, carve-outs.

use std::fmt;
use std::num::NonZeroU16;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::policy::domain::DomainPattern;
use crate::policy::ranges::{Nat64Prefix, Transitions};

/// A duration written as `500ms`, `10s`, `5m` or `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

impl ConfigDuration {
    /// The longest duration a config may give.
    pub const MAX: Duration = Duration::from_secs(7 * 24 * 3600);

    /// Parses the textual form; at most [`ConfigDuration::MAX`].
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let value: u64 = digits
            .parse()
            .map_err(|_| format!("invalid duration {text:?}: expected a number followed by ms, s, m or h"))?;
        let millis_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(format!("invalid duration {text:?}: unit must be ms, s, m or h")),
        };
        // Deadlines are computed as `now + duration`; a bound keeps every
        // such sum far from overflow (a panic in a connection task).
        let millis = value.checked_mul(millis_per_unit).filter(|ms| *ms <= Self::MAX.as_millis() as u64);
        let Some(millis) = millis else {
            return Err(format!("invalid duration {text:?}: must be at most 7 days"));
        };
        if millis == 0 {
            return Err(format!("invalid duration {text:?}: must be greater than zero"));
        }
        Ok(ConfigDuration(Duration::from_millis(millis)))
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ConfigDuration::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A domain allow-list entry, validated and normalised while parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRule(pub DomainPattern);

impl<'de> Deserialize<'de> for DomainRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        DomainPattern::parse(&text)
            .map(DomainRule)
            .map_err(|e| serde::de::Error::custom(format!("invalid domain pattern {text:?}: {e}")))
    }
}

/// A CIDR whose host bits are zero (`10.0.0.0/8`, not `10.0.0.1/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

impl Cidr {
    fn parse(text: &str) -> Result<Self, String> {
        let net: IpNet = match text.parse() {
            Ok(net) => net,
            // A bare address means the single host.
            Err(_) => text
                .parse::<std::net::IpAddr>()
                .map(IpNet::from)
                .map_err(|_| format!("invalid CIDR {text:?}"))?,
        };
        if net.trunc() != net {
            return Err(format!("CIDR {text:?} has host bits set; did you mean {}?", net.trunc()));
        }
        Ok(Cidr(net))
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Cidr::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A CIDR in a policy rule. A prefix written as an IPv6 transition form
/// (`::ffff:10.0.0.0/104`, `2002:a00::/24`) is rewritten as the IPv4 range
/// it stands for, because addresses are judged by their IPv4 form; one that
/// covers a whole form, or any Teredo prefix, is refused. Prefixes inside a
/// declared NAT64 prefix are rewritten when the policy is compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleCidr(pub IpNet);

impl RuleCidr {
    fn parse(text: &str) -> Result<Self, String> {
        let Cidr(net) = Cidr::parse(text)?;
        Transitions::default().unwrap_rule(net).map(RuleCidr)
    }
}

impl<'de> Deserialize<'de> for RuleCidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        RuleCidr::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A network-specific NAT64 prefix (`/32`, `/40`, `/48`, `/56`, `/64` or `/96`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nat64Rule(pub Nat64Prefix);

impl<'de> Deserialize<'de> for Nat64Rule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let net = match Cidr::parse(&text).map_err(serde::de::Error::custom)?.0 {
            IpNet::V6(net) => net,
            IpNet::V4(_) => return Err(serde::de::Error::custom(format!("NAT64 prefix {text:?} must be IPv6"))),
        };
        Nat64Prefix::new(net).map(Nat64Rule).map_err(serde::de::Error::custom)
    }
}

/// An operator's exception to the always-denied ranges, for every role
/// (`- 10.1.0.0/16`), only the named ones (`- {cidr: 10.1.0.0/16, roles: [ci]}`),
/// or only for requests naming given hosts
/// (`- {cidr: 10.0.5.0/24, domains: [vault.corp.example], ports: [8200], roles: [ci]}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CarveOut {
    All(CarvedRange),
    Roles { cidr: CarvedRange, roles: Vec<String> },
    /// Bound to names: never reachable by IP literal or another name.
    Named { cidr: CarvedRange, domains: Vec<DomainRule>, ports: Vec<NonZeroU16>, roles: Vec<String> },
}

impl CarveOut {
    /// The carved-out range.
    pub fn net(&self) -> IpNet {
        match self {
            CarveOut::All(r) | CarveOut::Roles { cidr: r, .. } | CarveOut::Named { cidr: r, .. } => r.0,
        }
    }

    /// True when this carve-out applies to `role`.
    pub fn applies_to(&self, role: &str) -> bool {
        match self {
            CarveOut::All(_) => true,
            CarveOut::Roles { roles, .. } => roles.iter().any(|r| r == role),
            CarveOut::Named { roles, .. } => roles.is_empty() || roles.iter().any(|r| r == role),
        }
    }

    /// The roles the carve-out names (empty: every role).
    pub fn roles(&self) -> &[String] {
        match self {
            CarveOut::All(_) => &[],
            CarveOut::Roles { roles, .. } | CarveOut::Named { roles, .. } => roles,
        }
    }
}

impl<'de> Deserialize<'de> for CarveOut {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = CarveOut;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a CIDR, or a map with `cidr` and `roles` and/or `domains` (with optional `ports`)")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<CarveOut, E> {
                CarvedRange::parse(text).map(CarveOut::All).map_err(E::custom)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<CarveOut, A::Error> {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Scoped {
                    cidr: CarvedRange,
                    #[serde(default)]
                    roles: Vec<String>,
                    #[serde(default)]
                    domains: Vec<DomainRule>,
                    #[serde(default)]
                    ports: Vec<NonZeroU16>,
                }
                use serde::de::Error as _;
                let r = Scoped::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                match (r.domains.is_empty(), r.roles.is_empty(), r.ports.is_empty()) {
                    (false, _, _) => Ok(CarveOut::Named { cidr: r.cidr, domains: r.domains, ports: r.ports, roles: r.roles }),
                    (true, _, false) => Err(A::Error::custom("`ports` needs `domains`: a port-scoped carve-out is bound to names")),
                    (true, true, true) => Err(A::Error::custom("a carve-out map needs `roles` or `domains`; write a bare CIDR for every role")),
                    (true, false, true) => Ok(CarveOut::Roles { cidr: r.cidr, roles: r.roles }),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A carved-out range. It must overlap an always-denied or internal range
/// (checked when the policy is compiled): a carve-out that changes nothing
/// is a mistake worth reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CarvedRange(pub IpNet);

impl CarvedRange {
    fn parse(text: &str) -> Result<Self, String> {
        RuleCidr::parse(text).map(|r| CarvedRange(r.0))
    }
}

impl<'de> Deserialize<'de> for CarvedRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        CarvedRange::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for CarvedRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
