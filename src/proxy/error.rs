//! Everything that can stop a request, grouped by who caused it (client,
//! policy, upstream, limits), each with its one reason code, its status and
//! its decision-line outcome. `respond.rs` turns one into the answer.

use http::StatusCode;

use super::slots::LimitKind;
use crate::refusal::Refusal;
use crate::access_log::Outcome;
use crate::dns::ResolveError;
use crate::policy::DenyReason;
use crate::target::TargetError;

/// The header naming a policy deny reason.
pub const DENY_HEADER: &str = "x-portcullis-deny";
/// The header naming a non-policy failure.
pub const ERROR_HEADER: &str = "x-portcullis-error";

/// Why the proxy answered instead of the destination.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client sent something the proxy will not interpret.
    #[error("{0}")]
    Client(#[from] ClientError),
    /// The policy denied the request (or, for the auth reasons, could not
    /// tell who is asking).
    #[error("{}", denial_text(*.0))]
    Denied(DenyReason),
    /// The proxy tried and the network or the upstream failed.
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    /// The request already carries this process's `Via`: it has looped.
    #[error("the request has already passed through this proxy")]
    LoopDetected,
    /// A limit on open connections or tunnels refused the request.
    #[error("too many open {}", over_limit_text(*.0))]
    OverLimit(LimitKind),
}

fn over_limit_text(kind: LimitKind) -> &'static str {
    match kind {
        LimitKind::Connections => "connections",
        LimitKind::ConnectionsPerClient => "connections from this client",
        LimitKind::Tunnels => "tunnels",
        LimitKind::TunnelsPerClient => "tunnels from this client",
    }
}

fn denial_text(reason: DenyReason) -> &'static str {
    match reason {
        DenyReason::AuthRequired => "proxy authentication required",
        DenyReason::AuthFailed => "proxy credentials not accepted",
        _ => "destination denied by policy",
    }
}

/// Mistakes in the client's request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid target: {0}")]
    InvalidTarget(#[from] TargetError),
    #[error("origin-form request: this is a forward proxy; send absolute-form (http://host/...) or CONNECT")]
    OriginForm,
    #[error("CONNECT requires an authority target (host:port)")]
    ConnectWithoutAuthority,
    /// Malformed framing or head; the connection is closed after the answer.
    #[error("{}", .0.describe())]
    Refused(Refusal),
}

/// Failures past the policy: resolution, connection, upstream protocol.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("resolving the destination failed: {0}")]
    Resolve(#[from] ResolveError),
    #[error("the destination refused the connection")]
    Refused,
    #[error("connecting to the destination timed out")]
    ConnectTimeout,
    #[error("connecting to the destination failed: {0}")]
    Unreachable(std::io::Error),
    #[error("the destination did not answer in time")]
    ResponseTimeout,
    #[error("the destination closed or broke the connection: {0}")]
    Protocol(hyper::Error),
    #[error("the parent proxy cannot be reached: {0}")]
    ParentUnreachable(std::io::Error),
    #[error("the parent proxy refused the request with status {0}")]
    ParentRefused(u16),
    #[error("the parent proxy did not accept this proxy's credentials")]
    ParentAuthFailed,
    #[error("the parent proxy answered something unusable: {0}")]
    ParentError(String),
    /// The TLS handshake with an `https://` parent failed (its certificate
    /// did not verify against `upstream_proxy.ca_file`, or it speaks no TLS):
    /// nothing of the request was sent.
    #[error("the TLS handshake with the parent proxy failed: {0}")]
    ParentTlsFailed(std::io::Error),
}

impl UpstreamError {
    /// Every value of [`UpstreamError::code`], so that the series counting
    /// them can exist from the start.
    pub const CODES: [&'static str; 11] = [
        "resolve-failed",
        "upstream-refused",
        "upstream-connect-timeout",
        "upstream-unreachable",
        "upstream-response-timeout",
        "upstream-error",
        "parent-unreachable",
        "parent-refused",
        "parent-auth-failed",
        "parent-error",
        "parent-tls-failed",
    ];

    /// The `X-Portcullis-Error` code, also the log reason and metric label.
    pub const fn code(&self) -> &'static str {
        match self {
            UpstreamError::Resolve(_) => "resolve-failed",
            UpstreamError::Refused => "upstream-refused",
            UpstreamError::ConnectTimeout => "upstream-connect-timeout",
            UpstreamError::Unreachable(_) => "upstream-unreachable",
            UpstreamError::ResponseTimeout => "upstream-response-timeout",
            UpstreamError::Protocol(_) => "upstream-error",
            UpstreamError::ParentUnreachable(_) => "parent-unreachable",
            UpstreamError::ParentRefused(_) => "parent-refused",
            UpstreamError::ParentAuthFailed => "parent-auth-failed",
            UpstreamError::ParentError(_) => "parent-error",
            UpstreamError::ParentTlsFailed(_) => "parent-tls-failed",
        }
    }
}

impl ProxyError {
    /// The reason code carried in the response header and the log line.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::Client(ClientError::InvalidTarget(_) | ClientError::ConnectWithoutAuthority) => "invalid-target",
            ProxyError::Client(ClientError::OriginForm) => "origin-form",
            ProxyError::Client(ClientError::Refused(refusal)) => refusal.as_str(),
            ProxyError::Denied(reason) => reason.as_str(),
            ProxyError::Upstream(e) => e.code(),
            ProxyError::OverLimit(_) => "over-limit",
            ProxyError::LoopDetected => "loop-detected",
        }
    }

    /// How the decision log records this error.
    pub fn outcome(&self) -> Outcome {
        match self {
            ProxyError::Denied(reason) => Outcome::Deny(*reason),
            ProxyError::Client(ClientError::OriginForm) => Outcome::Error("origin-form"),
            ProxyError::Client(ClientError::Refused(refusal)) => Outcome::Refused(*refusal),
            ProxyError::Client(_) => Outcome::Deny(DenyReason::InvalidTarget),
            ProxyError::Upstream(e) => Outcome::Error(e.code()),
            ProxyError::OverLimit(_) => Outcome::Error("over-limit"),
            ProxyError::LoopDetected => Outcome::Error("loop-detected"),
        }
    }

    /// The status code for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Client(ClientError::OriginForm) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Client(_) => StatusCode::BAD_REQUEST,
            ProxyError::Denied(DenyReason::AuthRequired | DenyReason::AuthFailed) => {
                StatusCode::PROXY_AUTHENTICATION_REQUIRED
            }
            ProxyError::Denied(_) => StatusCode::FORBIDDEN,
            ProxyError::Upstream(UpstreamError::ConnectTimeout | UpstreamError::ResponseTimeout) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::OverLimit(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::LoopDetected => StatusCode::LOOP_DETECTED,
        }
    }

    /// Whether the connection must close after the answer: after a framing
    /// error, the next request could not be found reliably.
    pub fn closes_connection(&self) -> bool {
        matches!(self, ProxyError::Client(ClientError::Refused(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code an upstream error can carry is listed once in `CODES`
    /// (`Protocol` wraps a hyper error, which only hyper can make; its code
    /// is the one left over).
    #[test]
    fn upstream_codes_are_listed() {
        let io = || std::io::Error::other("x");
        let made = [
            UpstreamError::Resolve(crate::dns::ResolveError::NoAddresses),
            UpstreamError::Refused,
            UpstreamError::ConnectTimeout,
            UpstreamError::Unreachable(io()),
            UpstreamError::ResponseTimeout,
            UpstreamError::ParentUnreachable(io()),
            UpstreamError::ParentRefused(502),
            UpstreamError::ParentAuthFailed,
            UpstreamError::ParentError("x".into()),
            UpstreamError::ParentTlsFailed(io()),
        ];
        let mut left: Vec<&str> = UpstreamError::CODES.to_vec();
        for e in &made {
            let at = left.iter().position(|c| *c == e.code()).unwrap_or_else(|| panic!("{} is not listed once", e.code()));
            left.remove(at);
        }
        assert_eq!(left, ["upstream-error"]);
    }
}
