//! The reason codes of the requests refused at the edge as malformed,
//! before any decision: the framing check produces them, the errors and
//! the decision line carry them. A leaf, so that the access log can name
//! them without importing the proxy.

/// Why a request was refused at the edge. `as_str` is the reason code of
/// the `X-Portcullis-Error` header, the decision line and the
/// `portcullis_requests_total` label alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Content-Length and Transfer-Encoding in one request (RFC 9112 6.3).
    ConflictingFraming,
    /// An HTTP/1.1 request without Host (RFC 9112 3.2).
    MissingHost,
    /// A Host value that is not a valid `host[:port]`.
    InvalidHost,
    /// More than one Host line (RFC 9112 3.2).
    DuplicateHost,
    /// A CONNECT request on a redirected connection: its client did not
    /// choose a proxy, so there is nothing to connect it to.
    ConnectRedirected,
    /// A CONNECT request that declares content.
    ConnectWithBody,
    /// The request body broke its own framing while it was forwarded (bad
    /// chunk size, overflow, a bare LF).
    MalformedBody,
    /// hyper could not parse the request head and answered 400 itself (or
    /// closed, for an HTTP/2 preface).
    MalformedRequest,
    /// The request head outgrew `limits.max_request_head_bytes` (hyper: 431).
    HeadTooLarge,
    /// The request target is longer than hyper accepts (hyper: 414).
    UriTooLong,
    /// A request head was begun but not finished within
    /// `timeouts.request_header`; the connection is closed without an answer.
    HeadTimeout,
}

impl Refusal {
    /// The reason code.
    pub const fn as_str(self) -> &'static str {
        match self {
            Refusal::ConflictingFraming => "conflicting-framing",
            Refusal::MissingHost => "missing-host",
            Refusal::InvalidHost => "invalid-host",
            Refusal::DuplicateHost => "duplicate-host",
            Refusal::ConnectRedirected => "connect-redirected",
            Refusal::ConnectWithBody => "connect-with-body",
            Refusal::MalformedBody => "malformed-body",
            Refusal::MalformedRequest => "malformed-request",
            Refusal::HeadTooLarge => "head-too-large",
            Refusal::UriTooLong => "uri-too-long",
            Refusal::HeadTimeout => "head-timeout",
        }
    }

    /// One line for the response body.
    pub const fn describe(self) -> &'static str {
        match self {
            Refusal::ConflictingFraming => "Content-Length and Transfer-Encoding in one request",
            Refusal::MissingHost => "HTTP/1.1 request without Host",
            Refusal::InvalidHost => "Host is not a valid host[:port]",
            Refusal::DuplicateHost => "more than one Host line",
            Refusal::ConnectRedirected => "CONNECT on a redirected connection; use the proxy port",
            Refusal::ConnectWithBody => "CONNECT must not carry a body",
            Refusal::MalformedBody => "the request body is not validly framed",
            Refusal::MalformedRequest => "the request head could not be parsed",
            Refusal::HeadTooLarge => "the request head is too large",
            Refusal::UriTooLong => "the request target is too long",
            Refusal::HeadTimeout => "the request head was not completed in time",
        }
    }
}
