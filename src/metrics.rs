//! Prometheus metrics. Every label has a bounded set of values: request
//! kind, decision, reason code, role name from config, error code, direction.
//! Never a hostname, URL or client address.

use std::time::Duration;

use crate::policy::{DenyReason, Mode, Policy, RequestKind};

use prometheus::{
    exponential_buckets, Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// All metrics of one proxy process, in their own registry.
pub struct Metrics {
    registry: Registry,
    /// `portcullis_requests_total{kind, decision, reason, role}`.
    pub requests: IntCounterVec,
    /// `portcullis_upstream_connect_duration_seconds`.
    pub upstream_connect: Histogram,
    /// `portcullis_dns_resolve_duration_seconds`.
    pub dns_resolve: Histogram,
    /// `portcullis_upstream_errors_total{kind}`.
    pub upstream_errors: IntCounterVec,
    /// `portcullis_active_connections`.
    pub active_connections: IntGauge,
    /// `portcullis_active_tunnels`.
    pub active_tunnels: IntGauge,
    /// `portcullis_upstream_idle_connections`: pooled keep-alive connections.
    pub upstream_idle: IntGauge,
    /// `portcullis_revoked_total{kind}`: open tunnels and pooled connections
    /// closed because a reload denies them.
    pub revoked: IntCounterVec,
    /// `portcullis_relayed_bytes_total{direction}`.
    pub relayed_bytes: IntCounterVec,
    /// `portcullis_role_relayed_bytes_total{role, direction}`: the same
    /// bytes by role (role names come from the config, so the set is bounded).
    pub role_relayed_bytes: IntCounterVec,
    /// The two directions of `relayed_bytes`, and of `role_relayed_bytes`
    /// per role, looked up once: every request adds to them, and a label
    /// lookup hashes its values and takes the vector's lock.
    relayed_directions: (IntCounter, IntCounter),
    role_directions: dashmap::DashMap<String, (IntCounter, IntCounter)>,
    /// `portcullis_tunnel_duration_seconds`: how long CONNECT tunnels stayed
    /// open, observed when they close.
    pub tunnel_duration: Histogram,
    /// `portcullis_connections_refused_total{reason}`.
    pub connections_refused: IntCounterVec,
    /// `portcullis_config_reloads_total{result}`.
    pub reloads: IntCounterVec,
    /// `portcullis_policy_generation`.
    pub policy_generation: IntGauge,
    /// `portcullis_config_last_reload_success_timestamp_seconds`.
    pub last_reload_success: Gauge,
    /// `portcullis_build_info{version}`.
    pub build_info: IntGaugeVec,
    /// `portcullis_draining`: 1 while shutting down.
    pub draining: IntGauge,
    /// The DNS listener's `portcullis_dns_*` metrics.
    pub dns: crate::dns_listen::record::DnsMetrics,
    /// `portcullis_auth_failures_repeated_total`: wrong proxy credentials
    /// from a client that failed within the last few seconds (answered with
    /// `Connection: close`; their log lines are thinned out).
    pub auth_failures_repeated: IntCounter,
    /// `portcullis_log_lines_dropped_total`: copied from the log sink's
    /// count when rendered (under the lock, so two scrapes cannot both add
    /// the same difference).
    log_lines_dropped: std::sync::Mutex<IntCounter>,
    /// `process_open_fds` and `process_max_fds`, read at each scrape (Linux).
    #[cfg(target_os = "linux")]
    descriptors: Descriptors,
    /// Recent policy denials per client, for `GET /v1/denials` (not a
    /// metric; kept here because every decision line reaches it).
    pub denials: crate::denials::Denials,
}

/// The counters one role's relayed bytes go to, looked up once so a long
/// tunnel adds to them without hashing label values again.
#[derive(Clone)]
pub struct RelayedBytes {
    up: IntCounter,
    down: IntCounter,
    role_up: IntCounter,
    role_down: IntCounter,
}

impl RelayedBytes {
    /// Adds bytes relayed client to upstream (`up`) and back (`down`).
    pub fn add(&self, up: u64, down: u64) {
        self.up.inc_by(up);
        self.role_up.inc_by(up);
        self.down.inc_by(down);
        self.role_down.inc_by(down);
    }
}

/// Buckets from 10 ms to about 11.6 hours: tunnels last from a single
/// request to a whole working day.
fn tunnel_buckets() -> Vec<f64> {
    exponential_buckets(0.01, 4.0, 12).expect("constant bucket parameters are valid")
}

/// Buckets from 100 µs to about 13 s.
fn latency_buckets() -> Vec<f64> {
    exponential_buckets(0.0001, 2.5, 14).expect("constant bucket parameters are valid")
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let m = IntCounterVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
            registry.register(Box::new(m.clone())).expect("metric names are unique");
            m
        };
        let gauge = |name: &str, help: &str| {
            let m = IntGauge::new(name, help).expect("metric definition is valid");
            registry.register(Box::new(m.clone())).expect("metric names are unique");
            m
        };
        let histogram = |name: &str, help: &str| {
            let m = Histogram::with_opts(HistogramOpts::new(name, help).buckets(latency_buckets()))
                .expect("metric definition is valid");
            registry.register(Box::new(m.clone())).expect("metric names are unique");
            m
        };
        let last_reload_success = Gauge::new(
            "portcullis_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load.",
        )
        .expect("metric definition is valid");
        registry.register(Box::new(last_reload_success.clone())).expect("metric names are unique");
        let build_info = IntGaugeVec::new(
            Opts::new("portcullis_build_info", "Build information; always 1."),
            &["version"],
        )
        .expect("metric definition is valid");
        registry.register(Box::new(build_info.clone())).expect("metric names are unique");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let log_lines_dropped = IntCounter::new(
            "portcullis_log_lines_dropped_total",
            "Log lines dropped because the log output could not keep up.",
        )
        .expect("metric definition is valid");
        registry.register(Box::new(log_lines_dropped.clone())).expect("metric names are unique");
        let tunnel_duration = Histogram::with_opts(
            HistogramOpts::new("portcullis_tunnel_duration_seconds", "How long CONNECT tunnels stayed open.")
                .buckets(tunnel_buckets()),
        )
        .expect("metric definition is valid");
        registry.register(Box::new(tunnel_duration.clone())).expect("metric names are unique");
        let auth_failures_repeated = IntCounter::new(
            "portcullis_auth_failures_repeated_total",
            "Wrong proxy credentials repeated by a client within a few seconds of its last failure.",
        )
        .expect("metric definition is valid");
        registry.register(Box::new(auth_failures_repeated.clone())).expect("metric names are unique");
        let relayed_bytes = counter_vec(
            "portcullis_relayed_bytes_total",
            "Bytes relayed; a request's when it finishes, an open tunnel's every few seconds.",
            &["direction"],
        );
        let relayed_directions = (
            relayed_bytes.with_label_values(&["client_to_upstream"]),
            relayed_bytes.with_label_values(&["upstream_to_client"]),
        );
        let metrics = Metrics {
            relayed_bytes,
            relayed_directions,
            role_directions: dashmap::DashMap::new(),
            tunnel_duration,
            requests: counter_vec(
                "portcullis_requests_total",
                "Requests by kind, policy decision, reason code and role.",
                &["kind", "decision", "reason", "role"],
            ),
            upstream_connect: histogram(
                "portcullis_upstream_connect_duration_seconds",
                "Time to establish upstream TCP connections.",
            ),
            dns_resolve: histogram("portcullis_dns_resolve_duration_seconds", "Time to resolve destination names."),
            upstream_errors: counter_vec(
                "portcullis_upstream_errors_total",
                "Failures after an allow decision, by kind.",
                &["kind"],
            ),
            active_connections: gauge("portcullis_active_connections", "Open client connections."),
            active_tunnels: gauge("portcullis_active_tunnels", "Open CONNECT tunnels."),
            upstream_idle: gauge("portcullis_upstream_idle_connections", "Idle keep-alive connections to origins in the pool."),
            revoked: counter_vec(
                "portcullis_revoked_total",
                "Open tunnels and pooled upstream connections closed because a reloaded policy denies them.",
                &["kind"],
            ),
            role_relayed_bytes: counter_vec(
                "portcullis_role_relayed_bytes_total",
                "Bytes relayed by role; a request's when it finishes, an open tunnel's every few seconds.",
                &["role", "direction"],
            ),
            connections_refused: counter_vec(
                "portcullis_connections_refused_total",
                "Client connections refused before reading a request.",
                &["reason"],
            ),
            reloads: counter_vec("portcullis_config_reloads_total", "Config loads by result.", &["result"]),
            policy_generation: gauge("portcullis_policy_generation", "Generation of the policy in force (1 at start)."),
            draining: gauge("portcullis_draining", "1 while the process is shutting down."),
            auth_failures_repeated,
            last_reload_success,
            log_lines_dropped: std::sync::Mutex::new(log_lines_dropped),
            #[cfg(target_os = "linux")]
            descriptors: Descriptors::register(&registry),
            denials: crate::denials::Denials::default(),
            build_info,
            dns: crate::dns_listen::record::DnsMetrics::register(&registry).expect("metric names are unique"),
            registry,
        };
        // Series that alerts watch exist from the start, at zero.
        for result in ["success", "failure"] {
            metrics.reloads.with_label_values(&[result]);
        }
        for reason in ["global_limit", "per_client_limit", "tunnel_limit", "per_client_tunnel_limit", "tls_handshake", "fd_exhausted"] {
            metrics.refused(reason);
        }
        for kind in ["tunnel", "pooled"] {
            metrics.revoked.with_label_values(&[kind]);
        }
        metrics
    }

    /// Creates, at zero, the series that the dashboard and the alert rules
    /// read, so that rates and ratios have a value before the first request
    /// (Prometheus' instrumentation guidance: initialise the label values
    /// you know). Bounded by the config: per role of `policy` and per
    /// request kind served (the redirected kinds only with a `transparent`
    /// listener), an allow and every deny reason, and for a role in report
    /// mode the reasons it lets through; both relayed directions per role;
    /// every `upstream_errors` code. Called at start and on every reload,
    /// so a role added by a reload has its series from then on.
    pub fn start_series(&self, policy: &Policy, transparent: bool, upstream_errors: &[&str]) {
        const EXPLICIT: &[RequestKind] = &[RequestKind::Http, RequestKind::Connect];
        const REDIRECTED: &[RequestKind] =
            &[RequestKind::TransparentHttp, RequestKind::TransparentTls, RequestKind::TransparentTcp];
        let kinds = EXPLICIT.iter().chain(if transparent { REDIRECTED } else { &[] });
        for role in policy.roles() {
            let name = role.name();
            self.with_role_directions(name, |_| ());
            // The series the DNS refusal alert watches.
            self.dns.queries.with_label_values(&[name, "deny", "not-allowlisted", "A"]);
            for kind in kinds.clone().map(|k| k.as_str()) {
                self.requests.with_label_values(&[kind, "allow", "none", name]);
                for reason in DenyReason::ALL {
                    self.requests.with_label_values(&[kind, "deny", reason.as_str(), name]);
                }
                if role.mode() == Mode::Report {
                    for reason in [DenyReason::NotAllowListed, DenyReason::PortNotAllowed] {
                        self.requests.with_label_values(&[kind, "would_deny", reason.as_str(), name]);
                    }
                }
            }
        }
        for code in upstream_errors {
            self.upstream_errors.with_label_values(&[code]);
        }
    }

    /// Counts a finished request.
    pub fn count_request(&self, kind: &str, decision: &str, reason: &str, role: &str) {
        self.requests.with_label_values(&[kind, decision, reason, role]).inc();
    }

    /// Records bytes a request of `role` relayed. Nothing at all for none,
    /// so requests refused before a role was known add no series.
    pub fn count_bytes(&self, role: &str, client_to_upstream: u64, upstream_to_client: u64) {
        if client_to_upstream == 0 && upstream_to_client == 0 {
            return;
        }
        let (up, down) = &self.relayed_directions;
        up.inc_by(client_to_upstream);
        down.inc_by(upstream_to_client);
        self.with_role_directions(role, |(up, down)| {
            up.inc_by(client_to_upstream);
            down.inc_by(upstream_to_client);
        });
    }

    /// Calls `f` with the relayed-bytes counters of `role`, looked up in the
    /// vector only the first time the role is seen.
    fn with_role_directions<R>(&self, role: &str, f: impl FnOnce(&(IntCounter, IntCounter)) -> R) -> R {
        if let Some(pair) = self.role_directions.get(role) {
            return f(&pair);
        }
        let pair = (
            self.role_relayed_bytes.with_label_values(&[role, "client_to_upstream"]),
            self.role_relayed_bytes.with_label_values(&[role, "upstream_to_client"]),
        );
        let result = f(&pair);
        self.role_directions.insert(role.to_owned(), pair);
        result
    }

    /// The relayed-bytes counters of `role`, for a tunnel that adds to
    /// them while it is open.
    pub fn relayed_bytes_for(&self, role: &str) -> RelayedBytes {
        let (role_up, role_down) = self.with_role_directions(role, Clone::clone);
        RelayedBytes { up: self.relayed_directions.0.clone(), down: self.relayed_directions.1.clone(), role_up, role_down }
    }

    /// Records a reload outcome.
    pub fn count_reload(&self, ok: bool, generation: u64) {
        let result = if ok { "success" } else { "failure" };
        self.reloads.with_label_values(&[result]).inc();
        if ok {
            self.policy_generation.set(generation as i64);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or(Duration::ZERO);
            self.last_reload_success.set(now.as_secs_f64());
        }
    }

    /// The registry every metric is in, for metrics registered by other
    /// parts of the process (the DNS listener's).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The counter of one refusal reason.
    pub fn refused(&self, reason: &str) -> IntCounter {
        self.connections_refused.with_label_values(&[reason])
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        {
            let counter = self.log_lines_dropped.lock().unwrap_or_else(|e| e.into_inner());
            counter.inc_by(crate::logging::dropped_lines().saturating_sub(counter.get()));
        }
        #[cfg(target_os = "linux")]
        self.descriptors.update();
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding into a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// The process's open file descriptors and its limit, so an alert can
/// warn before accepts start failing for lack of them. Read from
/// `/proc/self/fd` and `getrlimit` at scrape time, never on the request path.
#[cfg(target_os = "linux")]
struct Descriptors {
    open: IntGauge,
    max: IntGauge,
}

#[cfg(target_os = "linux")]
impl Descriptors {
    fn register(registry: &Registry) -> Self {
        let gauge = |name: &str, help: &str| {
            let m = IntGauge::new(name, help).expect("metric definition is valid");
            registry.register(Box::new(m.clone())).expect("metric names are unique");
            m
        };
        Descriptors {
            open: gauge("process_open_fds", "Open file descriptors of the proxy process."),
            max: gauge("process_max_fds", "The soft limit on open file descriptors of the proxy process."),
        }
    }

    fn update(&self) {
        use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            // One of the entries is the directory handle this count reads through.
            self.open.set(entries.count().saturating_sub(1) as i64);
        }
        if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) {
            self.max.set(if soft == RLIM_INFINITY { i64::MAX } else { soft.min(i64::MAX as u64) as i64 });
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes count under both the direction and the role; a request that
    /// moved nothing (refused before a role was known) adds no series.
    #[test]
    fn bytes_count_by_direction_and_role() {
        let metrics = Metrics::new();
        metrics.count_bytes("", 0, 0);
        metrics.count_bytes("team-a", 3, 4);
        metrics.count_bytes("team-b", 0, 10);
        let text = metrics.render();
        for (series, value) in [
            ("portcullis_relayed_bytes_total{direction=\"client_to_upstream\"}", 3),
            ("portcullis_relayed_bytes_total{direction=\"upstream_to_client\"}", 14),
            ("portcullis_role_relayed_bytes_total{direction=\"client_to_upstream\",role=\"team-a\"}", 3),
            ("portcullis_role_relayed_bytes_total{direction=\"upstream_to_client\",role=\"team-a\"}", 4),
            ("portcullis_role_relayed_bytes_total{direction=\"upstream_to_client\",role=\"team-b\"}", 10),
        ] {
            assert!(text.lines().any(|l| l == format!("{series} {value}")), "{series} {value} in:\n{text}");
        }
        assert!(!text.contains("role=\"\""), "{text}");
    }

    /// The descriptor gauges are read at render: at least the standard
    /// streams are open, and the count is under the limit.
    #[cfg(target_os = "linux")]
    #[test]
    fn descriptors_are_read_at_render() {
        let metrics = Metrics::new();
        metrics.render();
        let (open, max) = (metrics.descriptors.open.get(), metrics.descriptors.max.get());
        assert!(open >= 3 && open < max, "{open} of {max}");
    }
}
