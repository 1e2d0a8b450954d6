//! The policy half of the compile step: config sections into the pure
//! [`Policy`] (address plan, roles, carve-outs), with every refusal naming
//! its field and the value as written.

use std::num::NonZeroU16;

use ipnet::IpNet;

use crate::config::{CarveOut, Config, RoleConfig, RuleCidr, DEFAULT_ROLE};
use crate::policy::ranges::{self, Nat64Prefix, RangeKind, Transitions};
use crate::policy::{AddressPlan, AllowList, DenyList, NamedCarveOut, Policy, PolicyError, PortSet, Role};

use super::Refused;

/// Compiles the config's policy.
pub(super) fn compile(config: &Config) -> Result<Policy, Refused> {
    check_carve_outs(config)?;
    let nat64: Vec<Nat64Prefix> = config.nat64_prefixes.iter().map(|n| n.0).collect();
    let transitions = Transitions::new(nat64.iter().copied());
    let internal = unwrap_all(&transitions, "internal_ranges", config.internal_ranges.iter().map(|r| r.0))?;
    let listeners = [config.listen, config.admin_listen].into_iter().filter(|l| l.port() != 0).collect();
    let self_addrs = crate::host::interface_addrs();
    let carve_outs = unwrap_all(&transitions, "allow_ranges", config.allow_ranges.iter().map(CarveOut::net))?;
    let named = config
        .allow_ranges
        .iter()
        .zip(&carve_outs)
        .filter_map(|(c, net)| match c {
            CarveOut::Named { domains, ports, roles, .. } => Some(NamedCarveOut {
                net: *net,
                domains: domains.iter().map(|d| d.0.clone()).collect(),
                ports: ports.iter().map(|p| p.get()).collect(),
                roles: roles.clone(),
            }),
            _ => None,
        })
        .collect();
    let mut plan = AddressPlan { carve_outs: Vec::new(), internal, nat64, self_addrs, listeners, named };
    for (i, net) in carve_outs.iter().enumerate() {
        if !plan.overlaps_denied_range(net) {
            return Err(Refused::at(
                format!("allow_ranges[{i}]"),
                format!(
                    "{net} is not inside any always-denied or internal range, so carving it out changes \
                     nothing; allow it under roles.<name>.allow.cidrs instead"
                ),
                config.allow_ranges[i].net(),
            ));
        }
    }
    let for_all = config.allow_ranges.iter().zip(&carve_outs);
    plan.carve_outs = for_all.clone().filter(|(c, _)| matches!(c, CarveOut::All(_))).map(|(_, n)| *n).collect();
    let mut roles = Vec::with_capacity(config.roles.len());
    for (name, role) in &config.roles {
        let own = for_all.clone().filter(|(c, _)| matches!(c, CarveOut::Roles { .. }) && c.applies_to(name));
        roles.push(compile_role(&transitions, name, role)?.with_carve_outs(own.map(|(_, n)| *n).collect()));
    }
    let policy = Policy::new(roles, DEFAULT_ROLE, &plan).map_err(|e| match e {
        PolicyError::MissingRole(_) => {
            format!("roles: {e}; every config needs a `{DEFAULT_ROLE}` role for clients without an identity")
        }
        PolicyError::TooManyRoles(_) => format!("roles: {e}"),
    })?;
    Ok(match &config.source {
        Some(source) => policy.with_source(source.clone()),
        None => policy,
    })
}

/// Every carve-out names defined roles, and none bound to names lifts a
/// metadata address.
fn check_carve_outs(config: &Config) -> Result<(), Refused> {
    for (i, carve) in config.allow_ranges.iter().enumerate() {
        if let Some(missing) = carve.roles().iter().find(|r| !config.roles.contains_key(*r)) {
            let reason = format!("role {missing:?} is not defined under roles");
            return Err(Refused::at(format!("allow_ranges[{i}].roles"), reason, missing));
        }
        if let CarveOut::Named { cidr, .. } = carve {
            if let Some((meta, _)) =
                ranges::denied_ranges().find(|(net, kind)| *kind == RangeKind::Metadata && cidr.0.contains(net))
            {
                return Err(Refused::at(
                    format!("allow_ranges[{i}]"),
                    format!("{} contains the metadata address {meta}, which no carve-out bound to names can lift; narrow the CIDR", cidr.0),
                    cidr.0,
                ));
            }
        }
    }
    Ok(())
}

/// Rewrites rules that lie inside a declared NAT64 prefix as IPv4 ranges.
fn unwrap_all(transitions: &Transitions, field: &str, nets: impl Iterator<Item = IpNet>) -> Result<Vec<IpNet>, Refused> {
    nets.enumerate()
        .map(|(i, net)| transitions.unwrap_rule(net).map_err(|e| Refused::at(format!("{field}[{i}]"), e, net)))
        .collect()
}

fn compile_role(transitions: &Transitions, name: &str, role: &RoleConfig) -> Result<Role, Refused> {
    let allow = &role.allow;
    let ports = |list: &[NonZeroU16]| PortSet::new(list.iter().map(|p| p.get()));
    let cidrs = |field: &str, list: &[RuleCidr]| {
        unwrap_all(transitions, &format!("roles.{name}.{field}"), list.iter().map(|c| c.0))
    };
    let allow_list = AllowList::new(
        allow.domains.iter().map(|d| d.0.clone()),
        cidrs("allow.cidrs", &allow.cidrs)?,
        ports(&allow.http_ports),
        ports(&allow.connect_ports),
    )
    .resolve_unlisted(allow.resolve_unlisted_names);
    let deny = DenyList::new(role.deny.domains.iter().map(|d| d.0.clone()), cidrs("deny.cidrs", &role.deny.cidrs)?);
    Ok(Role::new(name, role.mode, role.sni_check, allow_list).with_deny(deny).with_allow_ech(role.allow_ech))
}
