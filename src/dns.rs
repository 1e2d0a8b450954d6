//! Name resolution: each name is resolved once per request, for both address
//! families, and every answer is handed to the policy. The dialer never sees
//! a name, so there is no second lookup for an attacker to rebind.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;

use crate::config::DnsConfig;
use crate::target::DomainName;

/// Why a name could not be resolved. All map to 502 `resolve-failed`.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("no address records for the name")]
    NoAddresses,
    #[error("DNS lookup timed out")]
    Timeout,
    #[error("DNS lookup failed: {0}")]
    Failed(String),
}

/// A caching, TTL-aware resolver, with names pinned in config answered
/// without a query.
#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
    timeout: Duration,
    pinned: Arc<HashMap<Box<str>, Vec<IpAddr>>>,
}

impl Resolver {
    /// Builds a resolver from config: the listed name servers, or the
    /// system's configuration when none are listed.
    pub fn new(config: &DnsConfig) -> Result<Self, ResolveError> {
        let provider = TokioConnectionProvider::default();
        let mut builder = if config.nameservers.is_empty() {
            TokioResolver::builder(provider).map_err(|e| ResolveError::Failed(format!("system resolver configuration: {e}")))?
        } else {
            let mut rc = ResolverConfig::new();
            for addr in &config.nameservers {
                rc.add_name_server(NameServerConfig::new(*addr, Protocol::Udp));
                rc.add_name_server(NameServerConfig::new(*addr, Protocol::Tcp));
            }
            TokioResolver::builder_with_config(rc, provider)
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = config.timeout.0;
        opts.attempts = 1;
        // Both families, so that every address the name has is checked.
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.positive_max_ttl = Some(config.max_ttl.0);
        opts.negative_max_ttl = Some(Duration::from_secs(30));
        // Names are already fully qualified; never expand search domains.
        opts.ndots = 0;
        if !config.nameservers.is_empty() {
            opts.use_hosts_file = ResolveHosts::Never;
        }
        // The whole lookup (A and AAAA, retries over TCP) gets a bound too.
        let timeout = config.timeout.0 * 3;
        let pinned = config.pinned.iter().map(|(name, addrs)| (name.0.as_str().into(), addrs.clone())).collect();
        Ok(Resolver { inner: builder.build(), timeout, pinned: Arc::new(pinned) })
    }

    /// The pinned answer for `name`, if config pins it.
    pub fn pinned(&self, name: &DomainName) -> Option<&[IpAddr]> {
        self.pinned.get(name.as_str()).map(Vec::as_slice)
    }

    /// Every address `name` resolves to, in answer order, without duplicates.
    pub async fn resolve(&self, name: &DomainName) -> Result<Vec<IpAddr>, ResolveError> {
        if let Some(addrs) = self.pinned(name) {
            return Ok(addrs.to_vec());
        }
        // The trailing dot makes the query absolute: what was checked is what is asked.
        let fqdn = format!("{}.", name.as_str());
        let lookup = tokio::time::timeout(self.timeout, self.inner.lookup_ip(fqdn))
            .await
            .map_err(|_| ResolveError::Timeout)?
            .map_err(|e| {
                if e.is_no_records_found() {
                    ResolveError::NoAddresses
                } else {
                    ResolveError::Failed(e.to_string())
                }
            })?;
        let mut addrs: Vec<IpAddr> = Vec::new();
        for addr in lookup.iter() {
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        if addrs.is_empty() {
            return Err(ResolveError::NoAddresses);
        }
        Ok(addrs)
    }
}
