//! Prometheus metrics. Every label has a bounded set of values: request
//! kind, decision, reason code, role name from config, error code, direction.
//! Never a hostname, URL or client address.

use std::time::Duration;

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
    /// `portcullis_auth_failures_repeated_total`: wrong proxy credentials
    /// from a client that failed within the last few seconds (answered with
    /// `Connection: close`; their log lines are thinned out).
    pub auth_failures_repeated: IntCounter,
    /// `portcullis_log_lines_dropped_total`: copied from the log sink's
    /// count when rendered (under the lock, so two scrapes cannot both add
    /// the same difference).
    log_lines_dropped: std::sync::Mutex<IntCounter>,
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
        let auth_failures_repeated = IntCounter::new(
            "portcullis_auth_failures_repeated_total",
            "Wrong proxy credentials repeated by a client within a few seconds of its last failure.",
        )
        .expect("metric definition is valid");
        registry.register(Box::new(auth_failures_repeated.clone())).expect("metric names are unique");
        let metrics = Metrics {
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
            relayed_bytes: counter_vec(
                "portcullis_relayed_bytes_total",
                "Bytes relayed, counted when a request or tunnel finishes.",
                &["direction"],
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
            build_info,
            registry,
        };
        // Series that alerts watch exist from the start, at zero.
        for result in ["success", "failure"] {
            metrics.reloads.with_label_values(&[result]);
        }
        for reason in ["global_limit", "per_client_limit", "tunnel_limit", "per_client_tunnel_limit", "tls_handshake"] {
            metrics.refused(reason);
        }
        for kind in ["tunnel", "pooled"] {
            metrics.revoked.with_label_values(&[kind]);
        }
        metrics
    }

    /// Counts a finished request.
    pub fn count_request(&self, kind: &str, decision: &str, reason: &str, role: &str) {
        self.requests.with_label_values(&[kind, decision, reason, role]).inc();
    }

    /// Records relayed bytes of a finished request or tunnel.
    pub fn count_bytes(&self, client_to_upstream: u64, upstream_to_client: u64) {
        self.relayed_bytes.with_label_values(&["client_to_upstream"]).inc_by(client_to_upstream);
        self.relayed_bytes.with_label_values(&["upstream_to_client"]).inc_by(upstream_to_client);
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
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding into a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
