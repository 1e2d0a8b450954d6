//! A tunnel's first bytes, checked before anything reaches the upstream:
//! the SNI check, and on a port of `http_ports` the plain HTTP start.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::first_bytes::{self, FirstBytes};
use crate::policy::{DenyReason, Permit, TunnelStart};
use crate::snapshot::Snapshot;
use crate::sni::SniError;
use crate::target::Target;

/// What a tunnel's first bytes are checked for before anything reaches the
/// upstream: the SNI check, and on a port of `http_ports` the plain HTTP
/// Host check (see [`super::tunnel_http`]).
pub(super) struct StartCheck {
    pub(super) target: Target,
    /// The client's role and the operator's line, in a plain-HTTP tunnel's deny answers.
    pub(super) role: Arc<str>,
    pub(super) deny_message: Option<String>,
    /// The first bytes are the head of a tunnel: they get the head's time limit.
    pub(super) limit: Duration,
    pub(super) max_head: usize,
    pub(super) max_response_head: usize,
    sni: bool,
    /// The role lets a ClientHello offering ECH through (on its outer name).
    allow_ech: bool,
    start: TunnelStart,
}

impl StartCheck {
    /// The checks a permit asks for; `None` when the tunnel may start with anything.
    pub(super) fn of(permit: &Permit, target: &Target, role: Arc<str>, snapshot: &Snapshot) -> Option<Self> {
        let start = permit.tunnel_start();
        (permit.sni_check() || start != TunnelStart::Any).then(|| StartCheck {
            target: target.clone(),
            deny_message: snapshot.deny_messages.for_role(Some(&role)).map(str::to_string),
            allow_ech: snapshot.policy.role_id(&role).is_some_and(|r| snapshot.policy.role(r).allows_ech()),
            role,
            limit: snapshot.timeouts.request_header.0,
            max_head: snapshot.limits.max_request_head_bytes,
            max_response_head: snapshot.limits.max_response_head_bytes,
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
            return check_sni(client, early, &host, self.allow_ech, self.limit).await.map(Started::Relay);
        }
        let mut buf = early;
        let read = tokio::time::timeout(self.limit, first_bytes::read(client, &mut buf, self.max_head)).await;
        match (read.ok().flatten(), self.start) {
            // Every request, this one included, is checked as it is served.
            (Some(FirstBytes::Http), _) => Ok(Started::PlainHttp(buf)),
            (_, TunnelStart::CheckedHttp) => {
                let _ = client.shutdown().await;
                Err(DenyReason::NotHttp)
            }
            _ if self.sni => check_sni(client, buf, &host, self.allow_ech, self.limit).await.map(Started::Relay),
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

/// Reads the client's ClientHello (at most [`sni::MAX_PEEK`] bytes within
/// `limit`) and returns the bytes read when its server name is `host` (and
/// it offers no Encrypted ClientHello, unless `allow_ech`); otherwise the
/// reason code, after telling a TLS client why.
async fn check_sni<C>(client: &mut C, early: Vec<u8>, host: &str, allow_ech: bool, limit: Duration) -> Result<Vec<u8>, DenyReason>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = early;
    // Only a ClientHello is waited for: other bytes are told apart at once.
    let read = tokio::time::timeout(limit, first_bytes::read(client, &mut buf, 0)).await;
    let refusal = match read {
        Ok(Some(FirstBytes::Tls(Ok(_)))) if !allow_ech && crate::sni::offers_ech(&buf) => {
            tracing::debug!(connect = %host, "ClientHello offers Encrypted ClientHello");
            DenyReason::EchRefused
        }
        Ok(Some(FirstBytes::Tls(Ok(name)))) if name == host => return Ok(buf),
        Ok(Some(FirstBytes::Tls(Ok(name)))) => {
            tracing::debug!(sni = %name, connect = %host, "SNI does not name the CONNECT host");
            DenyReason::SniMismatch
        }
        Ok(Some(FirstBytes::Tls(Err(e)))) => {
            tracing::debug!(error = %e, connect = %host, "no usable ClientHello");
            e.deny_reason()
        }
        Ok(Some(FirstBytes::Http | FirstBytes::Other)) => SniError::NotTls.deny_reason(),
        // The client stopped before its ClientHello was complete.
        Ok(None) => SniError::Incomplete.deny_reason(),
        Err(_) => DenyReason::SniTimeout,
    };
    if refusal != DenyReason::NotTls {
        // A fatal access_denied alert (RFC 8446 6.2), so the TLS client
        // reports a refusal rather than a bare reset.
        let _ = client.write_all(&crate::sni::ACCESS_DENIED_ALERT).await;
    }
    let _ = client.shutdown().await;
    Err(refusal)
}
