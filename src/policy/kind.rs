//! The question's vocabulary: how a role applies its allow-list ([`Mode`])
//! and what the client asked the proxy to do ([`RequestKind`]). A leaf, so
//! that decisions, their provenance and the config schema can all name
//! them without reaching the engine.

/// How a role's allow-list is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Requests not on the allow-list are denied.
    #[default]
    Enforce,
    /// Requests not on the allow-list are allowed, logged and counted as
    /// `would_deny`. The always-denied ranges stay denied.
    Report,
    /// No allow-list: anything outside the always-denied ranges and the
    /// role's own deny entries is allowed.
    Open,
}

impl Mode {
    /// The label used in logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Report => "report",
            Mode::Open => "open",
        }
    }
}

/// What the client asked the proxy to do; ports are allowed per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// An absolute-form plain HTTP request, forwarded.
    Http,
    /// A CONNECT tunnel.
    Connect,
    /// A plain HTTP request on a redirected connection, named by its Host
    /// header; HTTP ports apply.
    TransparentHttp,
    /// A redirected TLS connection, named by its ClientHello's SNI;
    /// CONNECT ports apply.
    TransparentTls,
    /// A redirected connection with no name, decided on its original
    /// destination; CONNECT ports apply.
    TransparentTcp,
}

impl RequestKind {
    /// The label used in logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            RequestKind::Http => "http",
            RequestKind::Connect => "connect",
            RequestKind::TransparentHttp => "transparent-http",
            RequestKind::TransparentTls => "transparent-tls",
            RequestKind::TransparentTcp => "transparent-tcp",
        }
    }
}
