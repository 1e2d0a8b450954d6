//! The YAML configuration: serde structs that reject unknown keys, value
//! types that validate while they parse (so errors carry file, line and
//! field), and the compile step that turns a config into a [`Policy`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::policy::domain::DomainPattern;
use crate::policy::provenance::SourceLines;
use crate::policy::ranges::{Nat64Prefix, Transitions};
use crate::policy::{AddressPlan, AllowList, DenyList, Mode, Policy, PolicyError, PortSet, Role};
use crate::target::Target;

/// The role that applies to clients without an identity.
pub const DEFAULT_ROLE: &str = "default";

/// A configuration that was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Io { file: String, source: std::io::Error },
    /// The YAML did not parse or a value was invalid; the message names the
    /// field and the line.
    #[error("{file}: {message}")]
    Invalid { file: String, message: String, line: Option<usize> },
}

impl ConfigError {
    /// The 1-based line of the offending value, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Invalid { line, .. } => *line,
            ConfigError::Io { .. } => None,
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the proxy listens.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where the admin endpoints (metrics, health) listen.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Where connections redirected by netfilter (`REDIRECT`) arrive; off
    /// when absent. See `deploy/transparent/redirect.sh`.
    #[serde(default)]
    pub transparent_listen: Option<SocketAddr>,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub dns: DnsConfig,
    /// Serve the proxy port over TLS (an `https://` proxy).
    #[serde(default)]
    pub tls: Option<crate::tls::TlsConfig>,
    /// How clients are mapped to roles.
    #[serde(default)]
    pub identity: crate::identity::IdentityConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub reload: ReloadConfig,
    /// Exact carve-outs from the always-denied and internal ranges.
    #[serde(default)]
    pub allow_ranges: Vec<CarveOut>,
    /// Ranges internal to this deployment (pod, service and node CIDRs,
    /// privately used public ranges, global IPv6 cluster prefixes): denied
    /// as `denied-range:internal` unless carved out.
    #[serde(default)]
    pub internal_ranges: Vec<RuleCidr>,
    /// Network-specific NAT64 prefixes (RFC 6052): addresses inside are
    /// judged by the IPv4 address they carry, like `64:ff9b::/96`.
    #[serde(default)]
    pub nat64_prefixes: Vec<Nat64Rule>,
    /// A parent proxy that allowed requests leave through.
    #[serde(default)]
    pub upstream_proxy: Option<UpstreamProxyConfig>,
    /// Roles by name; `default` is required.
    pub roles: BTreeMap<String, RoleConfig>,
    /// A line added to the body of every policy deny (e.g. where to request
    /// access); a role's own `deny_message` replaces it for that role.
    #[serde(default)]
    pub deny_message: Option<String>,
    /// Where each rule sits in the file it was read from, for provenance.
    #[serde(skip)]
    pub source: Option<Arc<SourceLines>>,
}

/// `upstream_proxy`: allowed requests of `roles` (every role when empty)
/// leave through a parent proxy, except those to `except` destinations.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamProxyConfig {
    /// `http://host[:port]` or `https://host[:port]` of the parent.
    pub url: ParentUrl,
    /// PEM bundle of the CAs that verify an `https://` parent's certificate
    /// (required for one: there are no built-in roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The name an `https://` parent's certificate is verified against (and
    /// sent as SNI), instead of the URL's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Who resolves the names of requests that leave through the parent.
    #[serde(default)]
    pub resolve: ParentResolve,
    /// An environment variable holding `user:password` for Basic auth to the parent.
    #[serde(default)]
    pub credentials_env: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    /// Destinations reached directly.
    #[serde(default)]
    pub except: DenyConfig,
}

/// `upstream_proxy.resolve`: where the names of requests that leave
/// through the parent are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParentResolve {
    /// Here: the policy checks every address and the parent is told the
    /// checked address.
    #[default]
    Local,
    /// By the parent: the policy decides on the name alone and the parent
    /// is told the name (local DNS may be unavailable behind a parent).
    Parent,
}

/// The parent's URL, `http://host[:port]` (port 3128 when omitted) or
/// `https://host[:port]` (port 443), validated while parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentUrl {
    /// The parent's host and port.
    pub target: Target,
    /// `https://`: the connection to the parent is TLS.
    pub tls: bool,
}

impl ParentUrl {
    /// Parses the URL; no path, query or credentials.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (tls, default_port, rest) = match text.split_once("://") {
            Some(("http", rest)) => (false, 3128, rest),
            Some(("https", rest)) => (true, 443, rest),
            _ => return Err(format!("upstream_proxy.url {text:?}: expected http://host[:port] or https://host[:port]")),
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains(['/', '@', '?', '#']) {
            return Err(format!("upstream_proxy.url {text:?}: expected scheme://host[:port] with no path or credentials"));
        }
        let target = Target::parse_authority_with_default(authority, Some(default_port))
            .map_err(|e| format!("upstream_proxy.url {text:?}: {e}"))?;
        Ok(ParentUrl { target, tls })
    }
}

impl<'de> Deserialize<'de> for ParentUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ParentUrl::parse(&text).map_err(serde::de::Error::custom)
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 3128))
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9128))
}

/// Time limits on each phase of a request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Reading a request head (slowloris defence).
    pub request_header: ConfigDuration,
    /// Establishing the upstream TCP connection (all attempts together).
    pub upstream_connect: ConfigDuration,
    /// Happy Eyeballs (RFC 8305): the next address is tried after this
    /// long without an answer from the previous one.
    pub connect_stagger: ConfigDuration,
    /// Waiting for the upstream response head on forwarded HTTP.
    pub upstream_response: ConfigDuration,
    /// A tunnel with no bytes in either direction for this long is closed.
    pub tunnel_idle: ConfigDuration,
    /// An idle pooled upstream connection is closed after this long.
    pub upstream_idle: ConfigDuration,
    /// On SIGTERM, in-flight requests and tunnels get this long to finish.
    pub shutdown_grace: ConfigDuration,
    /// On SIGTERM, the listeners keep accepting this long while `/readyz`
    /// answers 503, so load balancers drop the endpoint before new
    /// connections would be refused; the drain (`shutdown_grace`) follows.
    pub shutdown_delay: ConfigDuration,
    /// A tunnel is closed after this long however busy it is; none by default.
    pub tunnel_max_lifetime: Option<ConfigDuration>,
}

/// Bounds on concurrent client connections.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Open client connections in total.
    pub max_connections: usize,
    /// Open client connections from one source IP address. A connection
    /// that became a tunnel keeps its slot for the tunnel's whole life.
    pub max_connections_per_client: usize,
    /// Open CONNECT tunnels in total.
    pub max_tunnels: usize,
    /// Open CONNECT tunnels from one source IP address.
    pub max_tunnels_per_client: usize,
    /// Idle keep-alive connections to origins kept in total; the least
    /// recently used goes first.
    pub max_idle_upstream: usize,
    /// Idle keep-alive connections kept per (role, destination address).
    pub max_idle_upstream_per_destination: usize,
    /// Largest request head (request line and headers) a client may send,
    /// at least 8192. hyper enforces it per read buffer, so a head is
    /// refused (431, or 414 for a URI over 65,534 bytes) somewhere between
    /// this size and twice it.
    pub max_request_head_bytes: usize,
    /// Largest response head an upstream may send; larger gets 502.
    pub max_response_head_bytes: usize,
}

impl Limits {
    /// Descriptors kept free for listeners, DNS sockets, the config file
    /// and the log.
    pub const RESERVED_FDS: u64 = 64;

    /// The file descriptors these limits may need at once: each client
    /// connection (a tunnel keeps its connection's slot) and the upstream
    /// connection it may have open, every pooled idle connection, and a
    /// reserve. Splice pipes are left out: when no descriptor is left for
    /// one, a tunnel copies through user space instead.
    pub fn fds_needed(&self) -> u64 {
        2 * self.max_connections as u64 + self.max_idle_upstream as u64 + Self::RESERVED_FDS
    }

    /// Refuses limits that cannot be served within `nofile` descriptors,
    /// with the numbers.
    pub fn check_fds(&self, nofile: u64) -> Result<(), String> {
        let need = self.fds_needed();
        if need <= nofile {
            return Ok(());
        }
        let fit = nofile.saturating_sub(self.max_idle_upstream as u64 + Self::RESERVED_FDS) / 2;
        let lower = match fit {
            0 => "lower limits.max_idle_upstream and limits.max_connections".to_string(),
            fit => format!("lower limits.max_connections to {fit}"),
        };
        Err(format!(
            "limits need up to {need} file descriptors (2 x max_connections {} + max_idle_upstream {} + {} reserved), \
             but the open-file limit is {nofile}: {lower} or raise the limit \
             (ulimit -n, systemd LimitNOFILE=, docker --ulimit nofile=)",
            self.max_connections,
            self.max_idle_upstream,
            Self::RESERVED_FDS
        ))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 8_192,
            max_connections_per_client: 1_000,
            max_tunnels: 4_096,
            max_tunnels_per_client: 500,
            max_idle_upstream: 1_024,
            max_idle_upstream_per_destination: 128,
            max_request_head_bytes: 64 * 1024,
            max_response_head_bytes: 256 * 1024,
        }
    }
}

/// How config changes are picked up (SIGHUP always reloads).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// Watch the config file and reload when its content changes.
    pub watch: bool,
    /// How often the file is checked.
    pub interval: ConfigDuration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig { watch: true, interval: ConfigDuration(Duration::from_secs(2)) }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            request_header: ConfigDuration(Duration::from_secs(10)),
            upstream_connect: ConfigDuration(Duration::from_secs(5)),
            connect_stagger: ConfigDuration(Duration::from_millis(250)),
            upstream_response: ConfigDuration(Duration::from_secs(60)),
            tunnel_idle: ConfigDuration(Duration::from_secs(300)),
            upstream_idle: ConfigDuration(Duration::from_secs(60)),
            shutdown_grace: ConfigDuration(Duration::from_secs(30)),
            shutdown_delay: ConfigDuration(Duration::ZERO),
            tunnel_max_lifetime: None,
        }
    }
}

/// How names are resolved.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Name servers as `ip:port`; empty means the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Per-query timeout.
    pub timeout: ConfigDuration,
    /// Answers are cached no longer than this, whatever their TTL.
    pub max_ttl: ConfigDuration,
    /// Pinned names (`static:` in the file): answered from here, without
    /// DNS. The answers are checked like any other.
    #[serde(rename = "static")]
    pub pinned: BTreeMap<PinnedName, Vec<std::net::IpAddr>>,
}

/// A pinned name, normalised like a request's host.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PinnedName(pub String);

impl<'de> Deserialize<'de> for PinnedName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        crate::target::DomainName::parse(&text)
            .map(|n| PinnedName(n.as_str().to_string()))
            .map_err(|e| serde::de::Error::custom(format!("dns.static: {text:?} is not a host name: {e}")))
    }
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: ConfigDuration(Duration::from_secs(2)),
            max_ttl: ConfigDuration(Duration::from_secs(300)),
            pinned: BTreeMap::new(),
        }
    }
}

/// One role: its mode and allow-list.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    #[serde(default)]
    pub mode: Mode,
    /// On CONNECT to a destination allowed by domain, require the TLS
    /// ClientHello's SNI to name the CONNECT host.
    #[serde(default = "default_true")]
    pub sni_check: bool,
    #[serde(default)]
    pub allow: AllowConfig,
    #[serde(default)]
    pub deny: DenyConfig,
    /// This role's line in the body of its policy denies, instead of the
    /// global `deny_message`.
    #[serde(default)]
    pub deny_message: Option<String>,
}

/// Destinations a role may never reach, whatever its allow-list or mode.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DenyConfig {
    pub domains: Vec<DomainRule>,
    pub cidrs: Vec<RuleCidr>,
}

fn default_true() -> bool {
    true
}

/// Destinations a role may reach.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AllowConfig {
    /// Exact names and `*.suffix` wildcards.
    pub domains: Vec<DomainRule>,
    /// Address prefixes; a name is allowed when every address it resolves to is inside.
    pub cidrs: Vec<RuleCidr>,
    /// True (the default): a name that matches no domain rule is resolved,
    /// and allowed when every address is inside `cidrs`. False: `cidrs`
    /// admit IP literals only and such a name is denied without any DNS
    /// query (a denied name then cannot carry data out through DNS).
    pub resolve_unlisted_names: bool,
    /// Ports allowed for plain HTTP forwarding.
    pub http_ports: Vec<NonZeroU16>,
    /// Ports allowed for CONNECT tunnels.
    pub connect_ports: Vec<NonZeroU16>,
}

impl Default for AllowConfig {
    fn default() -> Self {
        AllowConfig {
            domains: Vec::new(),
            cidrs: Vec::new(),
            resolve_unlisted_names: true,
            http_ports: vec![NonZeroU16::new(80).expect("80 is not zero")],
            connect_ports: vec![NonZeroU16::new(443).expect("443 is not zero")],
        }
    }
}

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
    fn roles(&self) -> &[String] {
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

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Io { file: file.clone(), source })?;
        Config::from_bytes(&bytes, &file)
    }

    /// Parses and validates the bytes of a config file; `file` names it in errors.
    pub fn from_bytes(bytes: &[u8], file: &str) -> Result<Config, ConfigError> {
        let text = std::str::from_utf8(bytes).map_err(|e| ConfigError::Invalid {
            file: file.to_string(),
            message: format!("not UTF-8 text: {e}"),
            line: Some(bytes[..e.valid_up_to()].iter().filter(|b| **b == b'\n').count() + 1),
        })?;
        Config::from_yaml_str(text, file)
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn from_yaml_str(text: &str, file: &str) -> Result<Config, ConfigError> {
        let mut config: Config = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Invalid {
            file: file.to_string(),
            line: e.location().map(|l| l.line()),
            message: e.to_string(),
        })?;
        config.source = Some(Arc::new(SourceLines::index(file, text)));
        config.check_all().map_err(|refused| ConfigError::Invalid {
            file: file.to_string(),
            line: refused.value.as_ref().and_then(|(path, v)| line_of(text, path, v)),
            message: refused.message,
        })?;
        Ok(config)
    }

    /// Everything the proxy would compile at start: policy, identities and
    /// TLS material (certificate files are read).
    fn check_all(&self) -> Result<(), Refused> {
        for (field, value) in [
            ("limits.max_request_head_bytes", self.limits.max_request_head_bytes),
            ("limits.max_response_head_bytes", self.limits.max_response_head_bytes),
        ] {
            if value < 8192 {
                return Err(format!("{field}: {value} is below the minimum of 8192 bytes").into());
            }
        }
        let policy = self.compile_policy()?;
        crate::identity::Identities::compile(&self.identity, &policy)?;
        if let Some(parent) = &self.upstream_proxy {
            if let Some(missing) = parent.roles.iter().find(|r| !self.roles.contains_key(*r)) {
                return Err(format!("upstream_proxy.roles: role {missing:?} is not defined under roles").into());
            }
            crate::tls::parent_tls(parent).map_err(|e| Refused::at(e.field.to_string(), e.reason, e.value))?;
            crate::proxy::parent::Parent::compile(parent)?;
        }
        if let Some(tls) = &self.tls {
            crate::tls::server_config(tls)?;
        }
        Ok(())
    }

    /// Compiles the policy. Fails only on cross-field problems, which the
    /// message names by field path.
    pub fn compile(&self) -> Result<Policy, String> {
        self.compile_policy().map_err(|r| r.message)
    }

    fn compile_policy(&self) -> Result<Policy, Refused> {
        for (i, carve) in self.allow_ranges.iter().enumerate() {
            if let Some(missing) = carve.roles().iter().find(|r| !self.roles.contains_key(*r)) {
                let reason = format!("role {missing:?} is not defined under roles");
                return Err(Refused::at(format!("allow_ranges[{i}].roles"), reason, missing));
            }
            if let CarveOut::Named { cidr, .. } = carve {
                if let Some((meta, _)) = crate::policy::ranges::denied_ranges()
                    .find(|(net, kind)| *kind == crate::policy::ranges::RangeKind::Metadata && cidr.0.contains(net))
                {
                    return Err(Refused::at(
                        format!("allow_ranges[{i}]"),
                        format!("{} contains the metadata address {meta}, which no carve-out bound to names can lift; narrow the CIDR", cidr.0),
                        cidr.0,
                    ));
                }
            }
        }
        let nat64: Vec<Nat64Prefix> = self.nat64_prefixes.iter().map(|n| n.0).collect();
        let transitions = Transitions::new(nat64.iter().copied());
        let internal = unwrap_all(&transitions, "internal_ranges", self.internal_ranges.iter().map(|r| r.0))?;
        let listeners = [self.listen, self.admin_listen].into_iter().filter(|l| l.port() != 0).collect();
        let self_addrs = crate::host::interface_addrs();
        let carve_outs = unwrap_all(&transitions, "allow_ranges", self.allow_ranges.iter().map(CarveOut::net))?;
        let named = self
            .allow_ranges
            .iter()
            .zip(&carve_outs)
            .filter_map(|(c, net)| match c {
                CarveOut::Named { domains, ports, roles, .. } => Some(crate::policy::NamedCarveOut {
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
                    self.allow_ranges[i].net(),
                ));
            }
        }
        let for_all = self.allow_ranges.iter().zip(&carve_outs);
        plan.carve_outs = for_all.clone().filter(|(c, _)| matches!(c, CarveOut::All(_))).map(|(_, n)| *n).collect();
        let mut roles = Vec::with_capacity(self.roles.len());
        for (name, role) in &self.roles {
            let own = for_all.clone().filter(|(c, _)| matches!(c, CarveOut::Roles { .. }) && c.applies_to(name));
            roles.push(compile_role(&transitions, name, role)?.with_carve_outs(own.map(|(_, n)| *n).collect()));
        }
        let policy = Policy::new(roles, DEFAULT_ROLE, &plan).map_err(|e| match e {
            PolicyError::MissingRole(_) => {
                format!("roles: {e}; every config needs a `{DEFAULT_ROLE}` role for clients without an identity")
            }
            PolicyError::TooManyRoles(_) => format!("roles: {e}"),
        })?;
        Ok(match &self.source {
            Some(source) => policy.with_source(source.clone()),
            None => policy,
        })
    }
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
}

impl From<String> for Refused {
    fn from(message: String) -> Self {
        Refused { message, value: None }
    }
}

/// The 1-based line of `value` under the field `path` (`roles.ci.allow.cidrs[1]`):
/// each key of the path is looked for in turn, then the value after the last.
fn line_of(text: &str, path: &str, value: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    // A key at the start of a line, or inside a flow mapping (`{cidr: .., roles: ..}`).
    let has_key = |line: &str, key: &str| {
        line.match_indices(key).any(|(at, _)| {
            let before = line[..at].trim_end_matches(' ');
            line[at + key.len()..].starts_with(':') && (before.is_empty() || before.ends_with(['{', ',', '-']))
        })
    };
    let mut from = 0;
    for key in path.split('.').map(|k| k.split('[').next().unwrap_or(k)) {
        from += lines[from..].iter().position(|l| has_key(l, key))?;
    }
    lines[from..].iter().position(|l| l.contains(value)).map(|i| from + i + 1)
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
    Ok(Role::new(name, role.mode, role.sni_check, allow_list).with_deny(deny))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "roles:\n  default: {}\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_yaml_str(MINIMAL, "t.yaml").unwrap();
        assert_eq!(c.listen, "127.0.0.1:3128".parse().unwrap());
        assert_eq!(c.admin_listen, "127.0.0.1:9128".parse().unwrap());
        assert_eq!(c.timeouts.request_header.0, Duration::from_secs(10));
        assert!(c.allow_ranges.is_empty());
        let role = &c.roles["default"];
        assert_eq!(role.mode, Mode::Enforce);
        assert_eq!(role.allow.http_ports, vec![NonZeroU16::new(80).unwrap()]);
    }

    #[test]
    fn durations() {
        let cases = [("500ms", Some(500)), ("10s", Some(10_000)), ("5m", Some(300_000)), ("1h", Some(3_600_000)), ("0s", None), ("10", None), ("s", None), ("1.5s", None), ("10 days", None), ("168h", Some(604_800_000)), ("169h", None), ("5124095576030431h", None), ("18446744073709551615ms", None), ("99999999999999999999s", None)];
        for (text, want) in cases {
            let got = ConfigDuration::parse(text).ok().map(|d| d.0.as_millis() as u64);
            assert_eq!(got, want, "{text}");
        }
    }

    /// Each bad config is refused with the file name, the line and a reason.
    #[test]
    fn bad_configs_name_file_line_and_reason() {
        let cases: &[(&str, usize, &str)] = &[
            ("roles:\n  default:\n    allow:\n      domainz: [a.com]\n", 4, "unknown field `domainz`"),
            ("listen: 127.0.0.1:3128\nbogus: 1\nroles:\n  default: {}\n", 2, "unknown field `bogus`"),
            ("roles:\n  default:\n    allow:\n      domains:\n        - ok.com\n        - \"*bad.com\"\n", 5, "invalid domain pattern"),
            ("roles:\n  default:\n    allow:\n      domains: [\"2852039166\"]\n", 4, "non-canonical IPv4"),
            ("roles:\n  default:\n    allow:\n      cidrs: [10.0.0.1/8]\n", 4, "host bits set"),
            ("roles:\n  default:\n    allow:\n      cidrs: [not-a-cidr]\n", 4, "invalid CIDR"),
            ("allow_ranges: [8.8.8.0/24]\nroles:\n  default: {}\n", 1, "not inside any always-denied or internal range"),
            ("roles:\n  default:\n    deny:\n      cidrs: [\"2001::/32\"]\n", 4, "Teredo prefix"),
            ("roles:\n  default:\n    deny:\n      cidrs: [\"64:ff9b::/96\"]\n", 4, "covers a whole IPv6 transition form"),
            ("internal_ranges: [\"::ffff:0:0/96\"]\nroles:\n  default: {}\n", 1, "covers a whole"),
            ("nat64_prefixes: [\"2001:db8:64::/80\"]\nroles:\n  default: {}\n", 1, "must be /32, /40, /48, /56, /64 or /96"),
            ("nat64_prefixes: [10.0.0.0/8]\nroles:\n  default: {}\n", 1, "must be IPv6"),
            (
                "nat64_prefixes: [\"2001:db8:64::/96\"]\nroles:\n  default:\n    allow:\n      cidrs:\n        - 8.8.8.0/24\n        - \"2001:db8:64::/96\"\n",
                7,
                "roles.default.allow.cidrs[1]: 2001:db8:64::/96 covers a whole",
            ),
            ("timeouts:\n  tunnel_idle: 5124095576030431h\nroles:\n  default: {}\n", 2, "must be at most 7 days"),
            ("allow_ranges:\n  - {cidr: 169.254.0.0/16, domains: [meta.example]}\nroles:\n  default: {}\n", 2, "contains the metadata address 169.254.169.254/32"),
            ("allow_ranges:\n  - {cidr: 10.0.0.0/8, ports: [443]}\nroles:\n  default: {}\n", 2, "`ports` needs `domains`"),
            ("allow_ranges:\n  - {cidr: 10.0.0.0/8}\nroles:\n  default: {}\n", 2, "needs `roles` or `domains`"),
            ("allow_ranges:\n  - {cidr: 10.0.0.0/8, domains: [a.example], roles: [nobody]}\nroles:\n  default: {}\n", 2, "role \"nobody\" is not defined"),
            ("dns:\n  static:\n    \"bad name!\": [10.0.0.1]\nroles:\n  default: {}\n", 3, "is not a host name"),
            ("roles:\n  default:\n    mode: permissive\n", 3, "unknown variant `permissive`"),
            ("roles:\n  default:\n    allow:\n      http_ports: [0]\n", 4, "nonzero"),
            ("roles:\n  default:\n    allow:\n      connect_ports: [70000]\n", 4, "70000"),
            ("timeouts:\n  tunnel_idle: forever\nroles:\n  default: {}\n", 2, "invalid duration"),
            ("listen: nowhere\nroles:\n  default: {}\n", 1, "invalid socket address"),
            ("upstream_proxy:\n  url: ftp://parent.example\nroles:\n  default: {}\n", 2, "expected http://host[:port] or https://host[:port]"),
            ("upstream_proxy:\n  url: http://parent.example\n  resolve: remote\nroles:\n  default: {}\n", 3, "unknown variant `remote`"),
            ("upstream_proxy:\n  url: https://parent.example\nroles:\n  default: {}\n", 2, "upstream_proxy.url: an https:// parent needs upstream_proxy.ca_file"),
            ("upstream_proxy:\n  url: https://[::1]:3129\n  ca_file: /nonexistent/ca.pem\nroles:\n  default: {}\n", 3, "upstream_proxy.ca_file: cannot load /nonexistent/ca.pem"),
            ("upstream_proxy:\n  url: http://parent.example\n  ca_file: /nonexistent/ca.pem\nroles:\n  default: {}\n", 3, "upstream_proxy.ca_file: only for an https:// parent"),
            ("upstream_proxy:\n  url: http://parent.example\n  server_name: parent.example\nroles:\n  default: {}\n", 3, "upstream_proxy.server_name: only for an https:// parent"),
        ];
        for (text, line, reason) in cases {
            let err = Config::from_yaml_str(text, "bad.yaml").unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with("bad.yaml: "), "{msg}");
            assert!(msg.contains(reason), "want {reason:?} in {msg}");
            assert_eq!(err.line(), Some(*line), "{msg}");
        }
    }

    /// Rules written as transition prefixes become the IPv4 range they
    /// stand for (at parse time, or at compile time inside a declared NAT64
    /// prefix); carve-outs may lift internal ranges.
    #[test]
    fn transition_prefix_rules_and_internal_ranges() {
        let yaml = "internal_ranges: [34.118.0.0/16, \"2600:1900:4000::/44\"]\n\
                    nat64_prefixes: [\"2001:db8:64::/96\"]\n\
                    allow_ranges: [34.118.5.0/24]\n\
                    roles:\n  default:\n    allow:\n      cidrs: [\"::ffff:8.8.8.0/120\", \"2001:db8:64::808:400/120\"]\n\
                    \x20   deny:\n      cidrs: [\"::ffff:8.8.8.8/128\"]\n";
        let c = Config::from_yaml_str(yaml, "t.yaml").unwrap();
        let cidrs: Vec<String> = c.roles["default"].allow.cidrs.iter().map(|r| r.0.to_string()).collect();
        assert_eq!(cidrs, ["8.8.8.0/24", "2001:db8:64::808:400/120"]);
        assert_eq!(c.roles["default"].deny.cidrs[0].0.to_string(), "8.8.8.8/32");
        let p = c.compile().unwrap();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(p.denied_range(ip("34.118.1.1")), Some(crate::policy::ranges::RangeKind::Internal));
        assert_eq!(p.denied_range(ip("34.118.5.1")), None, "carved out");
        assert_eq!(p.denied_range(ip("2600:1900:4000::1")), Some(crate::policy::ranges::RangeKind::Internal));
        assert_eq!(p.denied_range(ip("2001:db8:64::a9fe:a9fe")), Some(crate::policy::ranges::RangeKind::Metadata));
        assert_eq!(p.denied_range(ip("2001:db8:64::808:808")), None);
    }

    #[test]
    fn parent_urls_take_the_default_port_of_their_scheme() {
        let cases = [
            ("http://parent.example", Some(("parent.example:3128", false))),
            ("http://parent.example:8080/", Some(("parent.example:8080", false))),
            ("https://parent.example", Some(("parent.example:443", true))),
            ("https://10.1.2.3:3129", Some(("10.1.2.3:3129", true))),
            ("https://[2001:db8::1]", Some(("[2001:db8::1]:443", true))),
            ("socks5://parent.example:1080", None),
            ("https://user:pw@parent.example", None),
            ("https://parent.example/path", None),
            ("https://", None),
            ("parent.example:3128", None),
        ];
        for (text, want) in cases {
            let got = ParentUrl::parse(text).ok().map(|u| (u.target.to_string(), u.tls));
            assert_eq!(got, want.map(|(t, tls)| (t.to_string(), tls)), "{text}");
        }
    }

    /// The CA bundle and the name of an `https://` parent are checked when
    /// the config is loaded, each refusal naming its field.
    #[test]
    fn parent_tls_settings_are_checked_at_load() {
        let dir = std::env::temp_dir().join(format!("portcullis-parent-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no PEM here\n").unwrap();
        let broken = dir.join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(vec!["ca.test".to_string()]).unwrap().self_signed(&key).unwrap();
        let good = dir.join("ca.pem");
        std::fs::write(&good, ca.pem()).unwrap();
        let yaml = |ca_file: &std::path::Path, extra: &str| {
            format!("upstream_proxy:\n  url: https://parent.example:3129\n  ca_file: {}\n{extra}roles:\n  default: {{}}\n", ca_file.display())
        };
        for (text, want) in [
            (yaml(&empty, ""), Some("upstream_proxy.ca_file: no certificate in")),
            (yaml(&broken, ""), Some("upstream_proxy.ca_file: ")),
            (yaml(&good, "  server_name: \"bad name!\"\n"), Some("upstream_proxy.server_name: \"bad name!\" is not a DNS name or an IP address")),
            (yaml(&good, "  server_name: parent.test\n  resolve: parent\n"), None),
            (yaml(&good, ""), None),
        ] {
            match (Config::from_yaml_str(&text, "p.yaml"), want) {
                (Ok(_), None) => {}
                (Err(e), Some(want)) => assert!(e.to_string().contains(want), "want {want:?} in {e}"),
                (got, want) => panic!("{text}: got {:?}, want {want:?}", got.map(|_| ())),
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn head_limits_have_a_floor() {
        let err = Config::from_yaml_str("limits:\n  max_request_head_bytes: 100\nroles:\n  default: {}\n", "l.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.max_request_head_bytes: 100 is below the minimum of 8192"), "{err}");
    }

    #[test]
    fn missing_default_role_is_refused() {
        let err = Config::from_yaml_str("roles:\n  team-a: {}\n", "x.yaml").unwrap_err().to_string();
        assert!(err.contains("x.yaml: roles:") && err.contains("default"), "{err}");
        let err = Config::from_yaml_str("listen: 127.0.0.1:1\n", "x.yaml").unwrap_err().to_string();
        assert!(err.contains("missing field `roles`"), "{err}");
    }

    #[test]
    fn missing_file_is_refused() {
        let err = Config::load(Path::new("/nonexistent/portcullis.yaml")).unwrap_err().to_string();
        assert!(err.starts_with("/nonexistent/portcullis.yaml: cannot read"), "{err}");
    }

    #[test]
    fn shipped_config_is_valid_and_carves_out_nothing() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/portcullis.yaml");
        let c = Config::load(&path).unwrap();
        assert!(c.allow_ranges.is_empty());
        assert_eq!(c.listen, "127.0.0.1:3128".parse().unwrap());
        assert_eq!(c.roles["default"].mode, Mode::Enforce);
    }
}
