//! The explicit entrance: the proxy port. A client that chose this proxy
//! sends absolute-form requests and CONNECTs, over plain TCP or TLS; each
//! request is checked at the edge, parsed into an [`Ask`] and taken through
//! the door, then forwarded or turned into a tunnel.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::access_log::AccessRecord;
use crate::identity::CertNames;
use crate::policy::RequestKind;
use crate::proxy::admit::{self, Ask, Evidence};
use crate::proxy::body::ProxyBody;
use crate::proxy::error::{ClientError, ProxyError};
use crate::proxy::entrance::framing::{self, Wire};
use crate::proxy::respond::{refuse, respond};
use crate::proxy::egress::forward;
use crate::proxy::{loops, relay, serve_with, slots, ConnectionGuard, Shared};
use crate::snapshot::Snapshot;
use crate::target::Target;

/// Completes the TLS handshake when the proxy port speaks TLS, then serves HTTP.
pub(in crate::proxy) async fn serve_connection(guard: ConnectionGuard, stream: TcpStream, client: SocketAddr, stop: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    let snapshot = guard.shared.snapshot.load_full();
    let Some(acceptor) = &snapshot.tls else {
        return serve_http(guard, stream, client, None, stop).await;
    };
    let handshake = tokio::time::timeout(snapshot.timeouts.request_header.0, acceptor.accept(stream)).await;
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            guard.shared.metrics.refused("tls_handshake").inc();
            tracing::info!(%client, error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            guard.shared.metrics.refused("tls_handshake").inc();
            return;
        }
    };
    let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| crate::tls::cert_names(c));
    serve_http(guard, tls, client, cert.map(Arc::new), stop).await
}

async fn serve_http<I>(
    guard: ConnectionGuard,
    io: I,
    client: SocketAddr,
    cert: Option<Arc<CertNames>>,
    stop: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let shared = guard.shared.clone();
    let slot = guard.slot.clone();
    let service = move |wire: Arc<Wire>| {
        hyper::service::service_fn(move |req| {
            let conflicting = wire.next_request_conflicting();
            handle(shared.clone(), client, cert.clone(), slot.clone(), conflicting, req)
        })
    };
    serve_with(guard, io, client, service, stop).await
}

/// Serves one request; every outcome is a response and one log line.
async fn handle(
    shared: Arc<Shared>,
    client: SocketAddr,
    cert: Option<Arc<CertNames>>,
    slot: Arc<slots::ConnectionSlot>,
    conflicting_framing: bool,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let snapshot = shared.snapshot.load_full();
    let mut record = AccessRecord::new(client, req.method().clone(), shared.metrics.clone());
    let json = crate::proxy::respond::accepts_json(req.headers().get(http::header::ACCEPT));
    let kind = request_kind(req.method());
    record.kind = Some(kind);
    // The edge comes first: a malformed request is refused whoever sends it.
    if let Err(refusal) = framing::check_head(&req, conflicting_framing, framing::Entrance::Proxy) {
        return Ok(refuse(&shared, &snapshot, record, ClientError::Refused(refusal).into(), json));
    }
    let credentials = req.headers().get(http::header::PROXY_AUTHORIZATION).cloned();
    let who = Evidence::Proxy { source: client.ip(), cert, credentials };
    let routed = route(&shared, &snapshot, who, kind, &mut record, slot, req).await;
    Ok(respond(&shared, &snapshot, record, routed, json))
}

fn request_kind(method: &Method) -> RequestKind {
    if method == Method::CONNECT {
        RequestKind::Connect
    } else {
        RequestKind::Http
    }
}

/// Parses the request into an [`Ask`], takes it through the door, and
/// forwards it or opens its tunnel; the caller turns an error into a response.
async fn route(
    shared: &Arc<Shared>,
    snapshot: &Arc<Snapshot>,
    who: Evidence,
    kind: RequestKind,
    record: &mut AccessRecord,
    slot: Arc<slots::ConnectionSlot>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let target = match parse_target(kind, &req, record) {
        Ok(target) => target,
        Err(e) => return Err(admit::unparsed(snapshot, &who, record, e)),
    };
    if loops::has_looped(req.headers()) {
        return Err(ProxyError::LoopDetected);
    }
    let ask = Ask { who, kind, target, original: None };
    if kind == RequestKind::Connect {
        let opened = admit::admit_tunnel(shared, snapshot, &ask, record).await?;
        return relay::tunnel::tunnel(shared, snapshot, opened, &ask.target, req, record.clone(), slot).await;
    }
    let admitted = admit::admit(shared, snapshot, &ask, record).await?;
    forward::forward(shared, snapshot, admitted, &ask.target, req, record.clone()).await
}

fn parse_target(kind: RequestKind, req: &Request<Incoming>, record: &mut AccessRecord) -> Result<Target, ProxyError> {
    match parse_request_target(kind, req) {
        Ok(target) => {
            record.host = target.host.to_text();
            record.port = target.port;
            Ok(target)
        }
        Err(e) => {
            // Only the authority is logged for a refused target: a path or
            // query string may carry secrets, and so may userinfo (F5).
            record.host = req.uri().authority().map(|a| without_userinfo(a.as_str()).to_string()).unwrap_or_default();
            Err(e)
        }
    }
}

/// `authority` with any `userinfo@` removed: everything up to the last '@'
/// (a password may itself contain an unescaped '@').
fn without_userinfo(authority: &str) -> &str {
    authority.rsplit_once('@').map_or(authority, |(_, host)| host)
}

fn parse_request_target(kind: RequestKind, req: &Request<Incoming>) -> Result<Target, ProxyError> {
    let parsed = match kind {
        RequestKind::Connect => {
            let authority = req.uri().authority().ok_or(ClientError::ConnectWithoutAuthority)?;
            Target::parse_authority(authority.as_str())
        }
        RequestKind::Http if req.uri().authority().is_none() => return Err(ClientError::OriginForm.into()),
        _ => Target::parse_absolute(req.uri()),
    };
    Ok(parsed.map_err(ClientError::InvalidTarget)?)
}

#[cfg(test)]
mod tests {
    use super::without_userinfo;

    #[test]
    fn userinfo_is_cut_through_the_last_at() {
        for (authority, logged) in [
            ("allowed.test", "allowed.test"),
            ("allowed.test:443", "allowed.test:443"),
            ("alice:pw@allowed.test", "allowed.test"),
            ("bob:p@ss@allowed.test:443", "allowed.test:443"),
            ("@allowed.test", "allowed.test"),
            ("user@", ""),
        ] {
            assert_eq!(without_userinfo(authority), logged, "{authority}");
        }
    }
}
