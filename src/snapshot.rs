//! Config → [`Snapshot`]: the one compile step. Everything a request needs
//! that can change on reload (policy, identities, TLS, parent, limits, the
//! resolver) is built here, once per load, from a parsed [`Config`].
//! `validate`, `check`, `test`, start-up and reload all come through
//! [`Snapshot::compile`], so what they accept is what the proxy runs, and
//! certificate files are read once per load. Refusals name the file, the
//! field and, where the value is found, the line.

mod policy;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, ConfigError, Limits, Timeouts, UpstreamProxyConfig};
use crate::dns::Resolver;
use crate::identity::Identities;
use crate::policy::Policy;
use crate::proxy::egress::parent::Parent;

/// Everything a request needs that can change on reload, published as one
/// snapshot so a request never mixes two configurations.
pub struct Snapshot {
    pub policy: Policy,
    pub identities: Identities,
    /// Present when the proxy port speaks TLS.
    pub tls: Option<TlsAcceptor>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub resolver: Resolver,
    /// The parent proxy, when one is configured.
    pub parent: Option<Parent>,
    /// How upstream sockets are made (`upstream.mark`).
    pub upstream: crate::config::UpstreamSockets,
    /// The operator's lines for deny bodies.
    pub deny_messages: DenyMessages,
    /// 1 for the config loaded at start, +1 per successful reload.
    pub generation: u64,
    /// The DNS listener's rules (`dns_listen`).
    pub dns: crate::dns_listen::rules::DnsRules,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot").field("generation", &self.generation).finish_non_exhaustive()
    }
}

/// The operator's deny lines (`deny_message`): the global one and per
/// role, as deny bodies carry them.
#[derive(Debug, Clone, Default)]
pub struct DenyMessages {
    global: Option<Box<str>>,
    roles: HashMap<Box<str>, Box<str>>,
}

impl DenyMessages {
    /// Collects `deny_message` from the config and its roles.
    pub fn from_config(config: &Config) -> Self {
        DenyMessages {
            global: config.deny_message.as_deref().map(Into::into),
            roles: config
                .roles
                .iter()
                .filter_map(|(name, role)| Some((name.as_str().into(), role.deny_message.as_deref()?.into())))
                .collect(),
        }
    }

    /// The line for a deny of `role` (the global one when the role has none
    /// or is unknown).
    pub fn for_role(&self, role: Option<&str>) -> Option<&str> {
        role.and_then(|r| self.roles.get(r)).or(self.global.as_ref()).map(|m| &**m)
    }
}

/// The shared, swappable snapshot. Reads are lock-free.
pub type SnapshotHandle = Arc<ArcSwap<Snapshot>>;

impl Snapshot {
    /// Compiles a parsed config: checks across fields, then the policy,
    /// identities, parent, TLS material (files are read) and resolver.
    pub fn compile(config: &Config, generation: u64) -> Result<Snapshot, ConfigError> {
        compile(config, generation).map_err(|refused| refused.about(config))
    }
}

/// Refuses a config whose limits cannot be served within `nofile` open
/// files. Start-up checks against the limit it raised; a reload against the
/// limit in force, so raising `max_connections` or `max_idle_upstream`
/// past it is refused and the running policy stays.
pub fn check_descriptors(config: &Config, nofile: u64) -> Result<(), ConfigError> {
    config.limits.check_fds(nofile).map_err(|message| config.refusal(format!("limits: {message}"), None))?;
    check_dns_listener_fds(config, nofile).map_err(|message| config.refusal(message, None))
}

/// Refuses a config whose limits and DNS listener together need more than
/// `nofile` descriptors.
fn check_dns_listener_fds(config: &Config, nofile: u64) -> Result<(), String> {
    if config.dns_listen.is_none() {
        return Ok(());
    }
    let dns = config.dns.listener.fds_needed();
    let need = config.limits.fds_needed() + dns;
    if need <= nofile {
        return Ok(());
    }
    Err(format!(
        "limits and dns_listen need up to {need} file descriptors ({} for the proxy's limits, {dns} for \
         dns.listener's max_in_flight + max_tcp_connections + 34), but the open-file limit is {nofile}: \
         lower them or raise the limit",
        config.limits.fds_needed()
    ))
}


/// Compiles the policy alone, for tools that judge requests without
/// serving them (fuzzing, the policy tests of other modules).
pub fn compile_policy(config: &Config) -> Result<Policy, ConfigError> {
    policy::compile(config).map_err(|refused| refused.about(config))
}

fn compile(config: &Config, generation: u64) -> Result<Snapshot, Refused> {
    check_head_limits(&config.limits)?;
    let policy = policy::compile(config)?;
    let identities = Identities::compile(&config.identity, &policy)?;
    let parent = config.upstream_proxy.as_ref().map(|parent| compile_parent(config, parent)).transpose()?;
    let parent = parent.map(|p| p.with_mark(config.upstream.mark()));
    let tls = config.tls.as_ref().map(crate::tls::server_config).transpose()?.map(TlsAcceptor::from);
    Ok(Snapshot {
        identities,
        tls,
        policy,
        timeouts: config.timeouts.clone(),
        limits: config.limits.clone(),
        resolver: Resolver::new(&config.dns).map_err(|e| format!("dns: {e}"))?,
        parent,
        upstream: config.upstream,
        deny_messages: DenyMessages::from_config(config),
        generation,
        dns: crate::dns_listen::rules::DnsRules::compile(config)?,
    })
}

/// hyper refuses a head buffer below 8 KiB.
fn check_head_limits(limits: &Limits) -> Result<(), Refused> {
    for (field, value) in [
        ("limits.max_request_head_bytes", limits.max_request_head_bytes),
        ("limits.max_response_head_bytes", limits.max_response_head_bytes),
    ] {
        if value < 8192 {
            return Err(format!("{field}: {value} is below the minimum of 8192 bytes").into());
        }
    }
    Ok(())
}

fn compile_parent(config: &Config, parent: &UpstreamProxyConfig) -> Result<Parent, Refused> {
    if let Some(missing) = parent.roles.iter().find(|r| !config.roles.contains_key(*r)) {
        return Err(format!("upstream_proxy.roles: role {missing:?} is not defined under roles").into());
    }
    let tls = crate::tls::parent_tls(parent).map_err(|e| Refused::at(e.field.to_string(), e.reason, e.value))?;
    Ok(Parent::with_tls(parent, tls)?)
}

/// A compile-time refusal, with the value it is about when there is one
/// (its line is then found in the file).
#[derive(Debug)]
struct Refused {
    message: String,
    /// The field path and the value as written.
    value: Option<(String, String)>,
}

impl Refused {
    fn at(path: String, reason: String, value: impl fmt::Display) -> Self {
        Refused { message: format!("{path}: {reason}"), value: Some((path, value.to_string())) }
    }

    /// The refusal as an error about `config`'s file.
    fn about(self, config: &Config) -> ConfigError {
        let value = self.value.as_ref().map(|(path, value)| (path.as_str(), value.as_str()));
        config.refusal(self.message, value)
    }
}

impl From<String> for Refused {
    fn from(message: String) -> Self {
        Refused { message, value: None }
    }
}
