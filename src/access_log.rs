//! The decision log: exactly one structured line per request, written when
//! the request is finished (for tunnels and streamed bodies, when the last
//! byte has been relayed), so it can carry byte counts and duration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::metrics::Metrics;
use crate::policy::provenance::RuleRef;
use crate::policy::{DenyReason, Mode, RequestKind};
use crate::refusal::Refusal;

/// How a request ended, as far as policy is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not decided yet (the record is still being filled in).
    Pending,
    /// Allowed by the allow-list.
    Allow,
    /// Allowed only because the role is in report mode.
    WouldDeny(DenyReason),
    /// Denied by policy or refused as an invalid target.
    Deny(DenyReason),
    /// Refused at the edge as malformed (framing, Host, an unparsable or
    /// oversize head); the decision is `deny`.
    Refused(Refusal),
    /// Allowed, but the proxy could not complete it (code as in `X-Portcullis-Error`).
    Error(&'static str),
}

impl Outcome {
    /// The `decision` field.
    pub const fn decision(self) -> &'static str {
        match self {
            Outcome::Pending => "pending",
            Outcome::Allow => "allow",
            Outcome::WouldDeny(_) => "would_deny",
            Outcome::Deny(_) | Outcome::Refused(_) => "deny",
            Outcome::Error(_) => "error",
        }
    }

    /// The `reason` field.
    pub const fn reason(self) -> &'static str {
        match self {
            Outcome::Pending | Outcome::Allow => "",
            Outcome::WouldDeny(r) | Outcome::Deny(r) => r.as_str(),
            Outcome::Refused(refusal) => refusal.as_str(),
            Outcome::Error(code) => code,
        }
    }
}

/// One request's log record, filled in along the request path.
#[derive(Clone)]
pub struct AccessRecord {
    pub client: SocketAddr,
    /// `None` for a request hyper refused before it was parsed.
    pub method: Option<http::Method>,
    pub kind: Option<RequestKind>,
    /// The target host as parsed, or the request's authority (userinfo cut
    /// off) when it did not parse.
    pub host: String,
    pub port: u16,
    pub dialed: Option<SocketAddr>,
    /// Where the checked addresses came from (`dns`, `static`), if a name was resolved.
    pub answer: &'static str,
    /// Where a redirected (transparent) connection was headed; logged only
    /// when set.
    pub original_dst: Option<SocketAddr>,
    pub outcome: Outcome,
    pub role: String,
    /// Where the role came from: certificate, credentials, source, default.
    pub identity: &'static str,
    pub mode: Mode,
    /// The address in an always-denied range that denied a name, for the
    /// carve-out hint (never logged: the hint is for the client).
    pub denied_addr: Option<std::net::IpAddr>,
    /// The digest of the `Proxy-Authorization` value the client was
    /// identified by, which owns its denials (see [`crate::denials`]).
    pub credentials: Option<[u8; 32]>,
    /// The rule that decided, described only when the line is written
    /// (operators only: never in a response).
    pub rule: Option<RuleRef>,
    pub status: u16,
    /// Bytes from the client to the destination (request body, tunnel upstream).
    pub bytes_in: u64,
    /// Bytes from the destination to the client (response body, tunnel downstream).
    pub bytes_out: u64,
    /// The part of (`bytes_in`, `bytes_out`) already added to the
    /// relayed-bytes metrics while the request ran (an open tunnel's live
    /// counting); `emit` adds only the rest.
    pub bytes_metered: (u64, u64),
    pub started: Instant,
    metrics: Arc<Metrics>,
}

impl AccessRecord {
    /// Starts a record for a request that just arrived.
    pub fn new(client: SocketAddr, method: http::Method, metrics: Arc<Metrics>) -> Self {
        AccessRecord { method: Some(method), ..Self::unparsed(client, metrics) }
    }

    /// A record for a request refused before its head was parsed: no
    /// method, no kind.
    pub fn unparsed(client: SocketAddr, metrics: Arc<Metrics>) -> Self {
        AccessRecord {
            client,
            method: None,
            kind: None,
            host: String::new(),
            port: 0,
            dialed: None,
            answer: "",
            original_dst: None,
            outcome: Outcome::Pending,
            role: String::new(),
            identity: "",
            mode: Mode::Enforce,
            denied_addr: None,
            credentials: None,
            rule: None,
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            bytes_metered: (0, 0),
            started: Instant::now(),
            metrics,
        }
    }

    /// Writes the log line and counts the request.
    pub fn emit(&self) {
        self.count();
        if let Outcome::Deny(reason) = self.outcome {
            self.remember_denial(reason);
        }
        crate::logging::write_access_line(512, |line| self.write_json(line));
    }

    /// Keeps the denial for its client's `GET /v1/denials`.
    fn remember_denial(&self, reason: DenyReason) {
        use crate::denials::{fix_hint, Denial, Owner};
        let owner = match self.credentials {
            Some(digest) => Owner::Credentials(digest),
            None => Owner::Source(self.client.ip().to_canonical()),
        };
        self.metrics.denials.record(Denial {
            at: std::time::SystemTime::now(),
            owner,
            kind: self.kind.map_or("", RequestKind::as_str),
            host: self.host.clone(),
            port: self.port,
            reason: reason.as_str(),
            role: self.role.clone(),
            rule: self.rule.as_ref().map_or_else(String::new, |r| r.text().to_string()),
            fix: fix_hint(reason, &self.host, self.port, &self.role, self.denied_addr),
        });
    }

    /// Counts the request in the metrics without writing a log line (for
    /// repeats whose log lines are thinned out).
    pub fn count(&self) {
        let kind = self.kind.map_or("invalid", RequestKind::as_str);
        let reason = match self.outcome.reason() {
            "" => "none",
            code => code,
        };
        self.metrics.count_request(kind, self.outcome.decision(), reason, &self.role);
        // Bytes an open tunnel's meter already added are not added again.
        self.metrics.count_bytes(
            &self.role,
            self.bytes_in.saturating_sub(self.bytes_metered.0),
            self.bytes_out.saturating_sub(self.bytes_metered.1),
        );
    }

    /// The decision line: one JSON object and a newline, written by hand
    /// (no intermediate map, no allocation per field) in the same shape as
    /// the proxy's other JSON log lines.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        use crate::logging::{access_line_head, decision_fields, json_str, push_socket_addr, push_u64};
        access_line_head(out, self.client);
        out.extend_from_slice(b",\"method\":");
        json_str(out, self.method.as_ref().map_or("", http::Method::as_str));
        out.extend_from_slice(b",\"kind\":");
        json_str(out, self.kind.map_or("", RequestKind::as_str));
        out.extend_from_slice(b",\"host\":");
        json_str(out, &self.host);
        out.extend_from_slice(b",\"port\":");
        push_u64(out, u64::from(self.port));
        out.extend_from_slice(b",\"dialed\":\"");
        if let Some(addr) = self.dialed {
            push_socket_addr(out, addr);
        }
        out.extend_from_slice(b"\",\"answer\":");
        json_str(out, self.answer);
        if let Some(original) = self.original_dst {
            out.extend_from_slice(b",\"original_dst\":\"");
            push_socket_addr(out, original);
            out.push(b'"');
        }
        decision_fields(out, self.outcome.decision(), self.outcome.reason(), &self.role, self.identity);
        out.extend_from_slice(b",\"mode\":");
        json_str(out, self.mode.as_str());
        out.extend_from_slice(b",\"rule\":");
        match (&self.rule, self.outcome) {
            // Decided after the allow, by the tunnel's TLS check or a reload.
            (Some(rule), Outcome::Deny(DenyReason::SniMismatch | DenyReason::SniMissing | DenyReason::NotTls | DenyReason::SniTimeout | DenyReason::EchRefused)) => {
                json_str(out, &format!("sni_check (after the allow by {})", rule.text()))
            }
            (Some(rule), Outcome::Deny(DenyReason::Revoked)) => {
                json_str(out, &format!("revoked by a reload (was allowed by {})", rule.text()))
            }
            (Some(rule), _) => json_str(out, &rule.text()),
            (None, _) => out.extend_from_slice(b"\"\""),
        }
        out.extend_from_slice(b",\"status\":");
        push_u64(out, u64::from(self.status));
        out.extend_from_slice(b",\"bytes_in\":");
        push_u64(out, self.bytes_in);
        out.extend_from_slice(b",\"bytes_out\":");
        push_u64(out, self.bytes_out);
        // Milliseconds with three decimals, from whole microseconds.
        let micros = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        out.extend_from_slice(b",\"duration_ms\":");
        push_u64(out, micros / 1000);
        out.push(b'.');
        let fraction = micros % 1000;
        out.extend_from_slice(&[b'0' + (fraction / 100) as u8, b'0' + (fraction / 10 % 10) as u8, b'0' + (fraction % 10) as u8]);
        out.extend_from_slice(b"}\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{DenyReason, Mode, RequestKind};

    /// The hand-written line is one valid JSON object per line with every
    /// field, whatever the strings hold.
    #[test]
    fn decision_line_is_valid_json_with_every_field() {
        let mut record = AccessRecord::new("127.0.0.1:4242".parse().unwrap(), http::Method::GET, Arc::new(Metrics::new()));
        record.kind = Some(RequestKind::Http);
        record.host = "evil\"host\\\n\u{1}é".to_string();
        record.port = 8080;
        record.dialed = Some("[2001:db8::1]:443".parse().unwrap());
        record.answer = "static";
        record.outcome = Outcome::WouldDeny(DenyReason::NotAllowListed);
        record.role = "team \"a\"".to_string();
        record.identity = "credentials";
        record.mode = Mode::Report;
        let config = crate::config::Config::from_yaml_str("roles:\n  default:\n    allow:\n      domains: [\"*.a.example\"]\n", "p.yaml").unwrap();
        let policy = crate::snapshot::compile_policy(&config).unwrap();
        let target = crate::target::Target::parse_authority("x.a.example:443").unwrap();
        let decision = policy.decide(policy.default_role(), RequestKind::Connect, &target, &["8.8.8.8".parse().unwrap()]);
        record.rule = Some(policy.rule_ref(decision.rule()));
        record.status = 502;
        record.bytes_in = 12;
        record.bytes_out = u64::MAX;
        let mut line = Vec::new();
        record.write_json(&mut line);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
        assert!(line.ends_with(b"}\n"));
        let value: serde_json::Value = serde_json::from_slice(&line).expect("valid JSON");
        let field = |name: &str| value.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(field("level"), "INFO");
        assert_eq!(field("target"), "portcullis::access");
        assert_eq!(field("client"), "127.0.0.1:4242");
        assert_eq!(field("method"), "GET");
        assert_eq!(field("kind"), "http");
        assert_eq!(field("host"), "evil\"host\\\n\u{1}é");
        assert_eq!(field("port"), 8080);
        assert_eq!(field("dialed"), "[2001:db8::1]:443");
        assert_eq!(field("decision"), "would_deny");
        assert_eq!(field("reason"), "not-allowlisted");
        assert_eq!(field("role"), "team \"a\"");
        assert_eq!(field("identity"), "credentials");
        assert_eq!(field("mode"), "report");
        assert_eq!(field("rule"), "roles.default.allow.domains[0] (*.a.example) at p.yaml:4");
        assert_eq!(field("status"), 502);
        assert_eq!(field("bytes_in"), 12);
        assert_eq!(field("bytes_out"), u64::MAX);
        assert!(field("duration_ms").as_f64().is_some_and(|d| d >= 0.0));
        let timestamp = field("timestamp").as_str().unwrap();
        assert!(timestamp.len() == 27 && timestamp.ends_with('Z'), "{timestamp}");
        assert_eq!(field("answer"), "static");
        assert_eq!(value.as_object().unwrap().len(), 20, "no other fields: {value}");
        for (outcome, rule) in [
            (Outcome::Deny(DenyReason::SniMismatch), "sni_check (after the allow by roles.default.allow.domains[0] (*.a.example) at p.yaml:4)"),
            (Outcome::Deny(DenyReason::Revoked), "revoked by a reload (was allowed by roles.default.allow.domains[0] (*.a.example) at p.yaml:4)"),
            (Outcome::Error("upstream-refused"), "roles.default.allow.domains[0] (*.a.example) at p.yaml:4"),
        ] {
            record.outcome = outcome;
            let mut line = Vec::new();
            record.write_json(&mut line);
            let value: serde_json::Value = serde_json::from_slice(&line).expect("valid JSON");
            assert_eq!(value["rule"], rule, "{outcome:?}");
        }
    }
}
