//! The one mapping from an error to what the client is told: status, the
//! code in the reason phrase and header, a text or JSON body that names
//! only what was parsed, and whether the connection closes; and for every
//! entrance the same path from a failed request to its answer, decision
//! line and count.


use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use hyper::ext::ReasonPhrase;

use super::body::ProxyBody;
use super::error::{ClientError, ProxyError, DENY_HEADER, ERROR_HEADER};
use super::{repeats, Shared};
use crate::snapshot::Snapshot;
pub use crate::snapshot::DenyMessages;
use crate::access_log::AccessRecord;
use crate::policy::DenyReason;

impl ProxyError {
    /// The status line's reason phrase: the canonical phrase followed by the
    /// code, e.g. `Forbidden (portcullis: not-allowlisted)`. Many clients
    /// show only the status line of a refused CONNECT, so the code goes there.
    pub fn reason_phrase(&self) -> ReasonPhrase {
        reason_phrase(self.status(), self.code())
    }

    /// The response the client sees: status with the code in its reason
    /// phrase, the reason header, and a body (text or JSON, see [`Answer`])
    /// naming the code, the target as parsed and the role, never the path,
    /// query or credentials.
    pub fn to_response(&self, answer: &Answer<'_>) -> Response<ProxyBody> {
        let header_name = match self {
            ProxyError::Denied(_) => DENY_HEADER,
            _ => ERROR_HEADER,
        };
        // The operator's line belongs to policy denies, not to failures.
        let deny_message = match self {
            ProxyError::Denied(_) => answer.deny_message,
            _ => None,
        };
        let message = self.to_string();
        let fix = match (self, answer.target) {
            (ProxyError::Denied(reason), Some((host, port))) => {
                crate::denials::carve_out_lines(*reason, host, port, answer.role.unwrap_or(crate::config::DEFAULT_ROLE), answer.denied_addr)
            }
            _ => None,
        };
        let (body, content_type) = if answer.json {
            (answer.json_body(self.code(), &message, deny_message, fix.as_deref()), "application/json")
        } else {
            (answer.text_body(self.code(), &message, deny_message, fix.as_deref()), "text/plain; charset=utf-8")
        };
        let mut resp = Response::new(ProxyBody::full(Bytes::from(body)));
        *resp.status_mut() = self.status();
        resp.extensions_mut().insert(self.reason_phrase());
        let headers = resp.headers_mut();
        headers.insert(header_name, HeaderValue::from_static(self.code()));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        if self.status() == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
            headers.append(header::PROXY_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"portcullis\""));
            headers.append(header::PROXY_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"portcullis\""));
        }
        if self.closes_connection() || answer.close {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if matches!(self, ProxyError::Client(ClientError::OriginForm)) {
            headers.insert(header::ALLOW, HeaderValue::from_static("CONNECT, GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"));
        }
        resp
    }
}

/// `Reason (portcullis: code)` for a status and a reason code. Codes are
/// static tokens, so the phrase is always valid.
pub fn reason_phrase(status: StatusCode, code: &'static str) -> ReasonPhrase {
    let phrase = format!("{} (portcullis: {code})", status.canonical_reason().unwrap_or("Error"));
    ReasonPhrase::try_from(phrase).unwrap_or_else(|_| ReasonPhrase::from_static(b"Refused by portcullis"))
}

/// A complete HTTP/1.1 answer for places without a hyper connection (a
/// connection refused before its request is read):
/// the code in the reason phrase and in `header`, a one-line body, and
/// `connection: close`.
pub fn raw_answer(status: StatusCode, header: &str, code: &'static str, message: &str) -> String {
    let body = format!("portcullis: {code}: {message}\n");
    let reason = reason_phrase(status, code);
    format!(
        "HTTP/1.1 {} {}\r\n{header}: {code}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        String::from_utf8_lossy(reason.as_bytes()),
        body.len()
    )
}

/// What the answer to a refused request may say about the request: only
/// what the proxy parsed (never the path, query or credentials).
#[derive(Debug, Clone, Copy, Default)]
pub struct Answer<'a> {
    /// The target as parsed, when it parsed.
    pub target: Option<(&'a str, u16)>,
    /// The role the client was identified as, when it was.
    pub role: Option<&'a str>,
    /// The operator's line for policy denies (the role's, else the global one).
    pub deny_message: Option<&'a str>,
    /// The address in an always-denied range a name resolved to, when that
    /// denied it: the body then shows the carve-out for the name.
    pub denied_addr: Option<std::net::IpAddr>,
    /// The client's `Accept` asks for `application/json`.
    pub json: bool,
    /// Close the connection after the answer (a client repeating a failure).
    pub close: bool,
}

impl Answer<'_> {
    /// `portcullis: code: message`, then one `name: value` line per known
    /// field, the operator's line, and the fix (config lines) when there is one.
    fn text_body(&self, code: &str, message: &str, deny_message: Option<&str>, fix: Option<&str>) -> String {
        let mut body = format!("portcullis: {code}: {message}\n");
        if let Some((host, port)) = self.target {
            body.push_str(&format!("host: {host}\nport: {port}\n"));
        }
        if let Some(role) = self.role {
            body.push_str(&format!("role: {role}\n"));
        }
        if let Some(line) = deny_message {
            body.push_str(line);
            body.push('\n');
        }
        if let Some(fix) = fix {
            body.push_str(fix);
        }
        body
    }

    /// `{"reason":…,"message":…,"host":…,"port":…,"role":…,"deny_message":…,"fix":…}`,
    /// the unknown fields left out.
    fn json_body(&self, code: &str, message: &str, deny_message: Option<&str>, fix: Option<&str>) -> String {
        use crate::logging::json_str;
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"{\"reason\":");
        json_str(&mut out, code);
        out.extend_from_slice(b",\"message\":");
        json_str(&mut out, message);
        if let Some((host, port)) = self.target {
            out.extend_from_slice(b",\"host\":");
            json_str(&mut out, host);
            out.extend_from_slice(format!(",\"port\":{port}").as_bytes());
        }
        if let Some(role) = self.role {
            out.extend_from_slice(b",\"role\":");
            json_str(&mut out, role);
        }
        if let Some(line) = deny_message {
            out.extend_from_slice(b",\"deny_message\":");
            json_str(&mut out, line);
        }
        if let Some(fix) = fix {
            out.extend_from_slice(b",\"fix\":");
            json_str(&mut out, fix);
        }
        out.extend_from_slice(b"}\n");
        String::from_utf8(out).unwrap_or_default()
    }
}

/// True when an `Accept` header asks for JSON (`application/json` listed
/// with a non-zero weight).
pub fn accepts_json(accept: Option<&HeaderValue>) -> bool {
    let Some(text) = accept.and_then(|v| v.to_str().ok()) else { return false };
    text.split(',').any(|item| {
        let mut parts = item.split(';').map(str::trim);
        let media = parts.next().unwrap_or("");
        let zero = parts.any(|p| p.strip_prefix("q=").is_some_and(|q| q.parse::<f32>().is_ok_and(|q| q == 0.0)));
        media.eq_ignore_ascii_case("application/json") && !zero
    })
}

/// The response for a routed request: the upstream's, or the error's, in
/// which case the request's log line is written here.
pub(super) fn respond(
    shared: &Shared,
    snapshot: &Snapshot,
    record: AccessRecord,
    routed: Result<Response<ProxyBody>, ProxyError>,
    json: bool,
) -> Response<ProxyBody> {
    match routed {
        Ok(response) => response,
        Err(err) => refuse(shared, snapshot, record, err, json),
    }
}

/// Records why a request failed in its log record, and counts an upstream
/// failure; shared by every entrance.
pub(super) fn record_failure(shared: &Shared, record: &mut AccessRecord, err: &ProxyError) {
    record.outcome = err.outcome();
    if let ProxyError::Upstream(e) = err {
        shared.metrics.upstream_errors.with_label_values(&[e.code()]).inc();
    }
}

/// The answer for a request that failed, with its log line and count.
pub(super) fn refuse(shared: &Shared, snapshot: &Snapshot, mut record: AccessRecord, err: ProxyError, json: bool) -> Response<ProxyBody> {
    record_failure(shared, &mut record, &err);
    let failure = match err {
        ProxyError::Denied(DenyReason::AuthFailed) => {
            shared.auth_failures.record(record.client.ip(), std::time::Instant::now())
        }
        _ => repeats::Failure::First,
    };
    let role = (!record.role.is_empty()).then_some(record.role.as_str());
    let answer = Answer {
        // A parsed target always has a port (CONNECT requires one, an
        // absolute URI gets its scheme's); an unparsed one is not echoed.
        target: (record.port != 0).then_some((record.host.as_str(), record.port)),
        role,
        deny_message: snapshot.deny_messages.for_role(role),
        denied_addr: record.denied_addr,
        json,
        close: matches!(failure, repeats::Failure::Repeat { .. }),
    };
    let response = err.to_response(&answer);
    record.status = response.status().as_u16();
    log_refusal(shared, &record, failure);
    response
}

/// Logs and counts a refusal; a repeated credential failure is counted,
/// and logged only when its client is due a line.
fn log_refusal(shared: &Shared, record: &AccessRecord, failure: repeats::Failure) {
    match failure {
        repeats::Failure::First => record.emit(),
        repeats::Failure::Repeat { log } => {
            shared.metrics.auth_failures_repeated.inc();
            if log {
                record.emit();
            } else {
                record.count();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::error::UpstreamError;

    #[test]
    fn accept_header_asks_for_json() {
        for (accept, json) in [
            (None, false),
            (Some("application/json"), true),
            (Some("text/html, application/json;q=0.9"), true),
            (Some("Application/JSON"), true),
            (Some("application/json;q=0"), false),
            (Some("*/*"), false),
            (Some("application/jsonx"), false),
        ] {
            let value = accept.map(HeaderValue::from_static);
            assert_eq!(accepts_json(value.as_ref()), json, "{accept:?}");
        }
    }

    #[test]
    fn reason_phrase_carries_the_code() {
        for (err, phrase) in [
            (ProxyError::Denied(DenyReason::NotAllowListed), "Forbidden (portcullis: not-allowlisted)"),
            (ProxyError::Denied(DenyReason::AuthFailed), "Proxy Authentication Required (portcullis: auth-failed)"),
            (ProxyError::Upstream(UpstreamError::Refused), "Bad Gateway (portcullis: upstream-refused)"),
            (ProxyError::LoopDetected, "Loop Detected (portcullis: loop-detected)"),
        ] {
            assert_eq!(err.reason_phrase().as_bytes(), phrase.as_bytes());
            let resp = err.to_response(&Answer::default());
            let carried = resp.extensions().get::<ReasonPhrase>().map(|r| r.as_bytes().to_vec());
            assert_eq!(carried.as_deref(), Some(phrase.as_bytes()));
        }
    }

    #[test]
    fn bodies_name_target_role_and_message_but_nothing_else() {
        let err = ProxyError::Denied(DenyReason::DeniedRange(crate::policy::ranges::RangeKind::Metadata));
        let answer = Answer {
            target: Some(("169.254.169.254", 80)),
            role: Some("ci"),
            deny_message: Some("ask in \"#egress\""),
            denied_addr: None,
            json: false,
            close: false,
        };
        assert_eq!(
            answer.text_body(err.code(), &err.to_string(), answer.deny_message, None),
            "portcullis: denied-range:metadata: destination denied by policy\nhost: 169.254.169.254\nport: 80\nrole: ci\nask in \"#egress\"\n"
        );
        assert_eq!(
            answer.json_body(err.code(), &err.to_string(), answer.deny_message, None),
            "{\"reason\":\"denied-range:metadata\",\"message\":\"destination denied by policy\",\"host\":\"169.254.169.254\",\"port\":80,\"role\":\"ci\",\"deny_message\":\"ask in \\\"#egress\\\"\"}\n"
        );
        // A failure that is not a policy deny does not carry the operator's line.
        let failed = ProxyError::Upstream(UpstreamError::Refused).to_response(&Answer { json: true, ..answer });
        assert_eq!(failed.headers()[header::CONTENT_TYPE], "application/json");
    }
}
