//! A tunnel's first bytes, checked before anything reaches the upstream:
//! the SNI check, and on a port of `http_ports` the plain HTTP start.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::tunnel_http::{self, Start};
use crate::policy::{DenyReason, Permit, TunnelStart};
use crate::proxy::Snapshot;
use crate::sni::{self, SniError};
use crate::target::Target;

/// What a tunnel's first bytes are checked for before anything reaches the
/// upstream: the SNI check, and on a port of `http_ports` the plain HTTP
/// Host check (see [`tunnel_http`]).
pub(super) struct StartCheck {
    pub(super) target: Target,
    /// The client's role and the operator's line, in a plain-HTTP tunnel's deny answers.
    pub(super) role: Arc<str>,
    pub(super) deny_message: Option<String>,
    /// The first bytes are the head of a tunnel: they get the head's time limit.
    pub(super) limit: Duration,
    pub(super) max_head: usize,
    sni: bool,
    start: TunnelStart,
}

impl StartCheck {
    /// The checks a permit asks for; `None` when the tunnel may start with anything.
    pub(super) fn of(permit: &Permit, target: &Target, role: Arc<str>, snapshot: &Snapshot) -> Option<Self> {
        let start = permit.tunnel_start();
        (permit.sni_check() || start != TunnelStart::Any).then(|| StartCheck {
            target: target.clone(),
            deny_message: snapshot.deny_messages.for_role(Some(&role)).map(str::to_string),
            role,
            limit: snapshot.timeouts.request_header.0,
            max_head: snapshot.limits.max_request_head_bytes,
            sni: permit.sni_check(),
            start,
        })
    }

    /// How the tunnel goes on, with the bytes read so far; otherwise the
    /// reason, after telling the client why where it can understand it.
    pub(super) async fn run<C>(&self, client: &mut C, early: Vec<u8>) -> Result<Started, DenyReason>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let host = self.target.host.to_string();
        if self.start == TunnelStart::Any {
            return check_sni(client, early, &host, self.limit).await.map(Started::Relay);
        }
        let mut buf = early;
        let start = tokio::time::timeout(self.limit, read_start(client, &mut buf)).await.unwrap_or(Start::Incomplete);
        match (start, self.start) {
            // Every request, this one included, is checked as it is served.
            (Start::Http, _) => Ok(Started::PlainHttp(buf)),
            (_, TunnelStart::CheckedHttp) => {
                let _ = client.shutdown().await;
                Err(DenyReason::NotHttp)
            }
            _ if self.sni => check_sni(client, buf, &host, self.limit).await.map(Started::Relay),
            _ => Ok(Started::Relay(buf)),
        }
    }
}

/// How a tunnel goes on once its first bytes passed the checks.
pub(super) enum Started {
    /// Relay bytes both ways, these first.
    Relay(Vec<u8>),
    /// Serve plain HTTP request by request, these bytes first.
    PlainHttp(Vec<u8>),
}

/// Reads until the first bytes can be classified (a few bytes: a TLS
/// record type or a method token) or the client stops sending.
async fn read_start<C>(client: &mut C, buf: &mut Vec<u8>) -> Start
where
    C: AsyncRead + Unpin,
{
    let mut chunk = [0u8; 4096];
    loop {
        match tunnel_http::classify(buf) {
            Start::Incomplete => {}
            decided => return decided,
        }
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return Start::Incomplete,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads the client's ClientHello (at most [`sni::MAX_PEEK`] bytes within
/// `limit`) and returns the bytes read when its server name is `host`;
/// otherwise the reason code, after telling a TLS client why.
async fn check_sni<C>(client: &mut C, early: Vec<u8>, host: &str, limit: Duration) -> Result<Vec<u8>, DenyReason>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = early;
    buf.reserve(4096);
    let parsed = tokio::time::timeout(limit, read_client_hello(client, &mut buf)).await;
    let refusal = match parsed {
        Ok(Ok(name)) if name == host => return Ok(buf),
        Ok(Ok(name)) => {
            tracing::debug!(sni = %name, connect = %host, "SNI does not name the CONNECT host");
            DenyReason::SniMismatch
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, connect = %host, "no usable ClientHello");
            e.deny_reason()
        }
        Err(_) => DenyReason::SniTimeout,
    };
    if refusal != DenyReason::NotTls {
        // A fatal access_denied alert (RFC 8446 6.2), so the TLS client
        // reports a refusal rather than a bare reset.
        let _ = client.write_all(&[21, 3, 3, 0, 2, 2, 49]).await;
    }
    let _ = client.shutdown().await;
    Err(refusal)
}

async fn read_client_hello<C>(client: &mut C, buf: &mut Vec<u8>) -> Result<String, SniError>
where
    C: AsyncRead + Unpin,
{
    let mut chunk = [0u8; 4096];
    loop {
        match sni::server_name(buf) {
            Err(SniError::Incomplete) if buf.len() < sni::MAX_PEEK => {}
            Err(SniError::Incomplete) => return Err(SniError::TooLarge),
            decided => return decided,
        }
        let room = (sni::MAX_PEEK - buf.len()).min(chunk.len());
        match client.read(&mut chunk[..room]).await {
            Ok(0) | Err(_) => return Err(SniError::Incomplete),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
