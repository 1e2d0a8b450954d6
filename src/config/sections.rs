//! The sections of the config file: limits, timeouts, DNS, roles, the parent
//! proxy, with their defaults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::policy::kind::Mode;
use crate::target::Target;

use super::values::{Cidr, ConfigDuration, DomainRule, RuleCidr};

/// `upstream`: how the proxy's own upstream sockets are made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSockets {
    /// `SO_MARK` set on every upstream socket (origins and the parent), so
    /// sidecar-mode netfilter rules exempt the proxy by packet mark
    /// (`PORTCULLIS_MARK` in deploy/transparent/redirect.sh) instead of by
    /// uid. Setting it needs CAP_NET_ADMIN in the proxy's container. 0 or
    /// absent: no mark.
    #[serde(default)]
    pub mark: Option<u32>,
}

impl UpstreamSockets {
    /// The mark to set, if any (0 is the kernel's "no mark").
    pub fn mark(&self) -> Option<u32> {
        self.mark.filter(|m| *m != 0)
    }
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
    /// reserve. Splice pipes are opened only from what the open-file limit
    /// leaves beyond this (`proxy/splice.rs`); without one, a tunnel copies
    /// through user space instead.
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
    /// Names the DNS listener (`dns_listen`) answers for every role, on top
    /// of the role's domain rules (`*.svc.cluster.local`); also the only
    /// names it answers PTR queries for.
    pub always_answer: Vec<DomainRule>,
    /// Query types the DNS listener forwards beyond A, AAAA, CNAME, HTTPS
    /// and SVCB (`TXT`, `MX`, `SRV`, ...), for names it admits.
    pub allow_types: Vec<QueryType>,
    /// Bounds on the DNS listener.
    pub listener: DnsListenerLimits,
}

/// A DNS query type named in config (`TXT`, `SRV`, or `TYPE65` style).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryType(pub hickory_proto::rr::RecordType);

impl<'de> Deserialize<'de> for QueryType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use hickory_proto::rr::RecordType;
        let text = String::deserialize(d)?;
        let upper = text.to_ascii_uppercase();
        let parsed = match upper.strip_prefix("TYPE").and_then(|n| n.parse::<u16>().ok()) {
            Some(code) => Ok(RecordType::from(code)),
            None => upper.parse::<RecordType>(),
        };
        match parsed {
            Ok(RecordType::ANY | RecordType::AXFR | RecordType::IXFR | RecordType::OPT) => Err(serde::de::Error::custom(
                format!("{text:?} is not forwarded by the DNS listener (ANY, AXFR, IXFR, OPT never are)"),
            )),
            Ok(t) => Ok(QueryType(t)),
            Err(_) => Err(serde::de::Error::custom(format!("{text:?} is not a DNS record type"))),
        }
    }
}

/// `dns.listener`: bounds on the DNS listener, each per listener process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsListenerLimits {
    /// Largest DNS message read or written (queries over it are dropped;
    /// answers over it are refused with SERVFAIL). 512 to 65535.
    pub max_message_bytes: u16,
    /// Queries answered at once, in total: each holds at most one upstream
    /// socket (UDP queries share theirs), so this also bounds the
    /// listener's file descriptors.
    pub max_in_flight: usize,
    /// Queries answered at once for one client address.
    pub max_in_flight_per_client: usize,
    /// Queries accepted per second from one client address (a burst of as
    /// many is allowed); the rest are dropped.
    pub max_queries_per_second_per_client: u32,
    /// Open TCP connections to the listener.
    pub max_tcp_connections: usize,
    /// Queries of one TCP connection answered at once (pipelining depth).
    pub max_tcp_pipeline: usize,
    /// A TCP connection without a query for this long is closed.
    pub tcp_idle: ConfigDuration,
}

impl DnsListenerLimits {
    /// Upstream UDP sockets the listener keeps open while idle, for the
    /// next queries.
    pub const IDLE_UPSTREAM_SOCKETS: usize = 32;

    /// The descriptors the listener may hold at once: its two sockets, one
    /// upstream socket per query in flight and the idle ones, one per TCP
    /// connection.
    pub fn fds_needed(&self) -> u64 {
        2 + Self::IDLE_UPSTREAM_SOCKETS as u64 + self.max_in_flight as u64 + self.max_tcp_connections as u64
    }
}

impl Default for DnsListenerLimits {
    fn default() -> Self {
        DnsListenerLimits {
            max_message_bytes: 4096,
            max_in_flight: 256,
            max_in_flight_per_client: 32,
            max_queries_per_second_per_client: 200,
            max_tcp_connections: 64,
            max_tcp_pipeline: 16,
            tcp_idle: ConfigDuration(Duration::from_secs(10)),
        }
    }
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
            always_answer: Vec::new(),
            allow_types: Vec::new(),
            listener: DnsListenerLimits::default(),
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
    /// Let TLS ClientHellos that offer Encrypted ClientHello through, decided
    /// on their outer (public) name. Off: they are refused as `ech-refused`.
    #[serde(default)]
    pub allow_ech: bool,
    /// What the DNS listener forwards for this role's clients.
    #[serde(default)]
    pub dns: RoleDnsConfig,
}

/// `dns:` under a role.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoleDnsConfig {
    /// Query types the DNS listener forwards for this role beyond A, AAAA,
    /// CNAME, HTTPS and SVCB, in place of the global `dns.allow_types`
    /// (absent: the global list; `[]`: none).
    pub allow_types: Option<Vec<QueryType>>,
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

/// How clients are mapped to roles.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Refuse (407) clients that present neither a mapped certificate nor credentials.
    pub require_credentials: bool,
    /// Answer 407 with `Proxy-Authenticate` instead of 403 when a client
    /// that presented no identity (the `default` role) is denied, so clients
    /// that send credentials only when challenged (the JDK, .NET, browsers)
    /// retry with them. Needs `credentials`.
    pub challenge_unauthenticated: bool,
    /// TLS client certificate → role, first match wins.
    pub certificates: Vec<CertificateRule>,
    /// `Proxy-Authorization` credentials → role.
    pub credentials: Vec<CredentialRule>,
    /// Source address ranges → role (longest prefix wins).
    pub sources: Vec<SourceRule>,
}

/// Maps a certificate name to a role. Exactly one of `uri`, `dns`, `cn`;
/// a value ending in `*` matches by prefix (e.g. a SPIFFE trust domain path).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateRule {
    pub uri: Option<String>,
    pub dns: Option<String>,
    pub cn: Option<String>,
    pub role: String,
}

/// One credential. Basic: `user` with `password_sha256`. Bearer: one of
/// `token_sha256`, `token_file`, `token_env`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialRule {
    pub user: Option<String>,
    pub password_sha256: Option<String>,
    pub token_sha256: Option<String>,
    pub token_file: Option<PathBuf>,
    pub token_env: Option<String>,
    pub role: String,
}

/// Maps a source range to a role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceRule {
    pub cidr: Cidr,
    pub role: String,
}

/// `tls:` in config: serve the proxy port over TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the proxy.
    pub cert: PathBuf,
    /// PEM private key of the proxy.
    pub key: PathBuf,
    /// PEM CA bundle that client certificates must chain to; no client
    /// certificates are requested when absent.
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a valid certificate (needs `client_ca`).
    #[serde(default)]
    pub require_client_cert: bool,
}
