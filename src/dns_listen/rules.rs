//! What the DNS listener needs from config, compiled once per snapshot: the
//! names every role may ask, the extra query types (global and per role),
//! the upstream resolvers and the bounds.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::rr::RecordType;

use crate::config::{Config, DnsListenerLimits, QueryType};
use crate::policy::domain::DomainMatcher;
use crate::target::DomainName;

/// The DNS listener's part of a snapshot.
#[derive(Debug, Clone)]
pub struct DnsRules {
    /// `dns.always_answer`.
    always_answer: DomainMatcher<()>,
    /// `dns.allow_types`.
    allow_types: TypeCodes,
    /// Roles with their own `dns.allow_types`, sorted by name.
    role_types: Box<[(Box<str>, TypeCodes)]>,
    /// Where admitted queries are forwarded, in order.
    pub upstreams: Box<[SocketAddr]>,
    /// One upstream attempt's time limit (`dns.timeout`).
    pub timeout: Duration,
    /// Answers' TTLs are capped at this (`dns.max_ttl`).
    pub max_ttl: u32,
    pub limits: DnsListenerLimits,
}

impl DnsRules {
    /// Compiles the listener's rules. The upstreams are `dns.nameservers`,
    /// else the system's (`/etc/resolv.conf`), read only when `dns_listen`
    /// is set; none of them may be the listener itself.
    pub fn compile(config: &Config) -> Result<DnsRules, String> {
        let dns = &config.dns;
        if dns.listener.max_message_bytes < 512 {
            return Err(format!("dns.listener.max_message_bytes: {} is below the DNS minimum of 512", dns.listener.max_message_bytes));
        }
        for (field, value) in [
            ("max_in_flight", dns.listener.max_in_flight),
            ("max_in_flight_per_client", dns.listener.max_in_flight_per_client),
            ("max_tcp_connections", dns.listener.max_tcp_connections),
            ("max_tcp_pipeline", dns.listener.max_tcp_pipeline),
            ("max_queries_per_second_per_client", dns.listener.max_queries_per_second_per_client as usize),
        ] {
            if value == 0 {
                return Err(format!("dns.listener.{field}: must be at least 1"));
            }
        }
        let upstreams = match config.dns_listen {
            Some(listen) => upstreams(config, listen)?,
            // A reload that drops `dns_listen` leaves the listener running
            // until restart: it keeps forwarding to the listed nameservers.
            None => config.dns.nameservers.clone().into_boxed_slice(),
        };
        // Sorted by name: `config.roles` is a sorted map.
        let role_types = config
            .roles
            .iter()
            .filter_map(|(name, role)| Some((name.as_str().into(), type_codes(role.dns.allow_types.as_ref()?))))
            .collect();
        Ok(DnsRules {
            always_answer: DomainMatcher::new(dns.always_answer.iter().map(|d| (d.0.clone(), ()))),
            allow_types: type_codes(&dns.allow_types),
            role_types,
            upstreams,
            timeout: dns.timeout.0,
            max_ttl: u32::try_from(dns.max_ttl.0.as_secs()).unwrap_or(u32::MAX),
            limits: dns.listener.clone(),
        })
    }

    /// True when `dns.always_answer` lists `name`.
    pub fn always_answers(&self, name: &DomainName) -> bool {
        self.always_answer.lookup(name.as_str()).is_some()
    }

    /// True when the `dns.allow_types` in force for the role named `role`
    /// lists `qtype`: the role's own list, else the global one.
    pub fn allows_type(&self, role: &str, qtype: RecordType) -> bool {
        let types = match self.role_types.binary_search_by(|(name, _)| (**name).cmp(role)) {
            Ok(i) => &self.role_types[i].1,
            Err(_) => &self.allow_types,
        };
        types.binary_search(&u16::from(qtype)).is_ok()
    }
}

/// Query type codes, sorted and without repeats.
type TypeCodes = Box<[u16]>;

fn type_codes(types: &[QueryType]) -> TypeCodes {
    let mut codes: Vec<u16> = types.iter().map(|t| u16::from(t.0)).collect();
    codes.sort_unstable();
    codes.dedup();
    codes.into_boxed_slice()
}

fn upstreams(config: &Config, listen: SocketAddr) -> Result<Box<[SocketAddr]>, String> {
    let servers: Vec<SocketAddr> = if config.dns.nameservers.is_empty() {
        let (system, _) = hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| format!("dns_listen: dns.nameservers is empty and the system resolver configuration cannot be read: {e}"))?;
        let mut found: Vec<SocketAddr> = system.name_servers().iter().map(|ns| ns.socket_addr).collect();
        found.dedup();
        found
    } else {
        config.dns.nameservers.clone()
    };
    if servers.is_empty() {
        return Err("dns_listen: no upstream resolver (set dns.nameservers)".to_string());
    }
    let is_listener = |s: &SocketAddr| {
        s.port() == listen.port()
            && (s.ip() == listen.ip() || (listen.ip().is_unspecified() && (s.ip().is_loopback() || crate::host::interface_addrs().contains(&s.ip()))))
    };
    if let Some(own) = servers.iter().find(|s| is_listener(s)) {
        return Err(format!("dns.nameservers: {own} is the DNS listener itself (dns_listen {listen}); name the resolver it forwards to"));
    }
    Ok(servers.into_boxed_slice())
}
