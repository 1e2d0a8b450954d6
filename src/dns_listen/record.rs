//! What the DNS listener reports: one decision line per query (`kind:
//! dns`) and its metrics. Labels are bounded: role names from config,
//! decisions, reason codes, and query types from a fixed list.

use std::net::SocketAddr;
use std::time::Instant;

use hickory_proto::rr::RecordType;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts};

use super::decide::{AdmittedBy, DnsReason};

/// The DNS listener's metrics, registered beside the proxy's (and present
/// whether or not the listener is on, so the alert's series exist).
#[derive(Clone)]
pub struct DnsMetrics {
    /// `portcullis_dns_queries_total{role, decision, reason, qtype}`.
    pub queries: IntCounterVec,
    /// `portcullis_dns_upstream_duration_seconds`.
    pub upstream: Histogram,
    /// `portcullis_dns_dropped_total{reason}`: queries dropped without an
    /// answer (over a limit, or not even a query header).
    pub dropped: IntCounterVec,
}

impl DnsMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let queries = IntCounterVec::new(
            Opts::new("portcullis_dns_queries_total", "DNS listener queries by role, decision, reason code and query type."),
            &["role", "decision", "reason", "qtype"],
        )?;
        let upstream = Histogram::with_opts(
            HistogramOpts::new("portcullis_dns_upstream_duration_seconds", "Time for an upstream resolver to answer a forwarded query.")
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 14)?),
        )?;
        let dropped = IntCounterVec::new(
            Opts::new("portcullis_dns_dropped_total", "DNS listener queries dropped without an answer, by reason."),
            &["reason"],
        )?;
        registry.register(Box::new(queries.clone()))?;
        registry.register(Box::new(upstream.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        for reason in ["over-limit", "unanswerable", "too-large"] {
            dropped.with_label_values(&[reason]);
        }
        Ok(DnsMetrics { queries, upstream, dropped })
    }
}

/// The query type as a metric label: a fixed set, anything else `other`.
pub fn qtype_label(qtype: RecordType) -> &'static str {
    match qtype {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::CNAME => "CNAME",
        RecordType::HTTPS => "HTTPS",
        RecordType::SVCB => "SVCB",
        RecordType::PTR => "PTR",
        RecordType::TXT => "TXT",
        RecordType::MX => "MX",
        RecordType::SRV => "SRV",
        RecordType::NS => "NS",
        RecordType::SOA => "SOA",
        RecordType::CAA => "CAA",
        RecordType::NULL => "NULL",
        RecordType::ANY => "ANY",
        _ => "other",
    }
}

/// How a query ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsOutcome {
    /// Forwarded and answered.
    Allow(AdmittedBy),
    /// Refused, failed or malformed.
    Deny(DnsReason),
}

impl DnsOutcome {
    /// The `decision` field: `allow`, `would_deny` (report mode), `deny`
    /// (a refusal or bad input) or `error` (the upstream failed).
    pub const fn decision(self) -> &'static str {
        match self {
            DnsOutcome::Allow(AdmittedBy::ReportOnly) => "would_deny",
            DnsOutcome::Allow(_) => "allow",
            DnsOutcome::Deny(DnsReason::UpstreamTimeout | DnsReason::UpstreamFailed | DnsReason::AnswerTooLarge) => "error",
            DnsOutcome::Deny(_) => "deny",
        }
    }

    /// The `reason` field: why it was admitted, or why not.
    pub const fn reason(self) -> &'static str {
        match self {
            DnsOutcome::Allow(AdmittedBy::ReportOnly) => "not-allowlisted",
            DnsOutcome::Allow(by) => by.as_str(),
            DnsOutcome::Deny(reason) => reason.as_str(),
        }
    }
}

/// One query's decision line, filled in as it is answered.
pub struct DnsRecord {
    pub client: SocketAddr,
    /// The question's name as parsed (empty when the query did not parse).
    pub name: String,
    pub qtype: Option<RecordType>,
    pub role: String,
    pub identity: &'static str,
    pub outcome: DnsOutcome,
    /// The response code sent (`NOERROR`, `REFUSED`, ...).
    pub rcode: &'static str,
    /// Answer records returned.
    pub answers: usize,
    pub tcp: bool,
    pub started: Instant,
}

impl DnsRecord {
    /// A record for a query from `client` that just arrived.
    pub fn new(client: SocketAddr, tcp: bool) -> Self {
        DnsRecord {
            client,
            name: String::new(),
            qtype: None,
            role: String::new(),
            identity: "",
            outcome: DnsOutcome::Deny(DnsReason::Malformed),
            rcode: "",
            answers: 0,
            tcp,
            started: Instant::now(),
        }
    }

    /// Counts the query and writes its line.
    pub fn emit(&self, metrics: Option<&DnsMetrics>) {
        if let Some(metrics) = metrics {
            let qtype = self.qtype.map_or("none", qtype_label);
            metrics.queries.with_label_values(&[&self.role, self.outcome.decision(), self.outcome.reason(), qtype]).inc();
        }
        crate::logging::write_access_line(384, |line| self.write_json(line));
    }

    /// The decision line, in the shape of the proxy's other decision lines
    /// (`host` is the question's name; `qtype`, `rcode`, `answers` and
    /// `transport` are the DNS fields).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        use crate::logging::{access_line_head, decision_fields, json_str, push_u64};
        access_line_head(out, self.client);
        out.extend_from_slice(b",\"kind\":\"dns\",\"host\":");
        json_str(out, &self.name);
        out.extend_from_slice(b",\"qtype\":");
        json_str(out, &self.qtype.map(|t| t.to_string()).unwrap_or_default());
        out.extend_from_slice(b",\"transport\":");
        json_str(out, if self.tcp { "tcp" } else { "udp" });
        decision_fields(out, self.outcome.decision(), self.outcome.reason(), &self.role, self.identity);
        out.extend_from_slice(b",\"rcode\":");
        json_str(out, self.rcode);
        out.extend_from_slice(b",\"answers\":");
        push_u64(out, self.answers as u64);
        let micros = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        out.extend_from_slice(b",\"duration_us\":");
        push_u64(out, micros);
        out.extend_from_slice(b"}\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{ranges::RangeKind, DenyReason};

    #[test]
    fn decision_line_is_json_with_the_dns_fields() {
        let mut record = DnsRecord::new("127.0.0.1:5353".parse().unwrap(), false);
        record.name = "metadata.google.internal".into();
        record.qtype = Some(RecordType::A);
        record.role = "ci \"x\"".into();
        record.identity = "source";
        record.outcome = DnsOutcome::Deny(DnsReason::Policy(DenyReason::DeniedName(RangeKind::Metadata)));
        record.rcode = "REFUSED";
        let mut line = Vec::new();
        record.write_json(&mut line);
        let value: serde_json::Value = serde_json::from_slice(&line).expect("valid JSON");
        assert_eq!(value["kind"], "dns");
        assert_eq!(value["host"], "metadata.google.internal");
        assert_eq!(value["qtype"], "A");
        assert_eq!(value["decision"], "deny");
        assert_eq!(value["reason"], "denied-name:metadata");
        assert_eq!(value["role"], "ci \"x\"");
        assert_eq!(value["rcode"], "REFUSED");
        assert_eq!(value["transport"], "udp");
    }

    #[test]
    fn outcomes_name_decision_and_reason() {
        let cases = [
            (DnsOutcome::Allow(AdmittedBy::Domain), "allow", "domain"),
            (DnsOutcome::Allow(AdmittedBy::ReportOnly), "would_deny", "not-allowlisted"),
            (DnsOutcome::Deny(DnsReason::TypeNotAllowed), "deny", "type-not-allowed"),
            (DnsOutcome::Deny(DnsReason::UpstreamTimeout), "error", "upstream-timeout"),
            (DnsOutcome::Deny(DnsReason::Policy(DenyReason::NotAllowListed)), "deny", "not-allowlisted"),
        ];
        for (outcome, decision, reason) in cases {
            assert_eq!((outcome.decision(), outcome.reason()), (decision, reason), "{outcome:?}");
        }
    }
}
