//! CONNECT tunnels: the upgraded client connection relayed to the
//! upstream the door opened, after the checks the permit asks for on the
//! first bytes, under the tunnel's lifetimes (idle, maximum lifetime,
//! revocation).

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::copy::{relay_after, RelayCounts, RelayEnd, TunnelMeter};
use super::start::{StartCheck, Started};
use super::tunnel_http;
use crate::access_log::{AccessRecord, Outcome};
use crate::policy::DenyReason;
use crate::proxy::admit::Opened;
use crate::proxy::body::ProxyBody;
use crate::proxy::error::ProxyError;
use crate::proxy::entrance::framing::WatchedIo;
use crate::proxy::revoke::Registration;
use crate::proxy::slots::ConnectionSlot;
use crate::proxy::egress::upstream::Upstream;
use crate::proxy::Shared;
use crate::snapshot::Snapshot;
use crate::target::Target;

/// Dials the permitted destination, answers 200 only once the upstream
/// connection is up, and relays bytes until both sides are done or the
/// tunnel is idle for too long. When the permit asks for it, the client's
/// first bytes must be a TLS ClientHello naming the CONNECT host, or on a
/// port of `http_ports` plain HTTP whose every request names it, before
/// anything reaches the upstream. The log line is written when it closes.
pub async fn tunnel(
    shared: &Arc<Shared>,
    snapshot: &Snapshot,
    opened: Opened,
    target: &Target,
    req: Request<Incoming>,
    mut record: AccessRecord,
    connection: Arc<ConnectionSlot>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let metrics = shared.metrics.clone();
    let Opened { admitted, upstream, outbound, slot: tunnel_slot, registration } = opened;
    let role = snapshot.policy.role(admitted.role).shared_name();
    record.status = 200;
    let idle = snapshot.timeouts.tunnel_idle.0;
    let sni = StartCheck::of(&admitted.permit, target, role.clone(), snapshot);
    let mut meter = TunnelMeter::new(metrics.relayed_bytes_for(&role));
    let lifetime = snapshot.timeouts.tunnel_max_lifetime.map(|d| d.0);
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let opened = Instant::now();
                let counts = RelayCounts::default();
                let served = async {
                    match upstream {
                        Upstream::Tcp(upstream) => serve_upgraded(upgraded, upstream, sni, idle, &counts).await,
                        // Boxed: the TLS relay's future is larger, and every
                        // tunnel's task would otherwise be sized for it (an idle
                        // tunnel cost 4 KB more).
                        Upstream::Tls(upstream) => Box::pin(serve_upgraded(upgraded, upstream, sni, idle, &counts)).await,
                    }
                };
                // Dropping `served` closes both sockets.
                tokio::select! {
                    outcome = served => if let Err(outcome) = outcome {
                        record.outcome = outcome;
                    },
                    cut = cut_short(&registration, lifetime) => record.outcome = cut,
                    never = meter.run(&counts) => match never {},
                }
                let (up, down) = counts.get();
                meter.flush(up, down);
                (record.bytes_in, record.bytes_out) = (up, down);
                record.bytes_metered = (up, down);
                metrics.tunnel_duration.observe(opened.elapsed().as_secs_f64());
            }
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
        drop((registration, outbound));
        drop((tunnel_slot, connection));
        record.emit();
    });
    Ok(Response::new(ProxyBody::empty()))
}

/// Completes when a relay must stop however busy it is: a reload revoked
/// its tunnel, or it reached `tunnel_max_lifetime` (`lifetime`, counted
/// from now). Every relay (CONNECT tunnels, redirected TLS and TCP
/// connections, and the plain HTTP served inside a tunnel) runs under it.
pub(in crate::proxy) async fn cut_short(registration: &Registration, lifetime: Option<Duration>) -> Outcome {
    let end_of_life = async {
        match lifetime {
            Some(lifetime) => tokio::time::sleep(lifetime).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = registration.revoked() => Outcome::Deny(DenyReason::Revoked),
        _ = end_of_life => Outcome::Error("tunnel-lifetime"),
    }
}

/// Serves a tunnel on the client's upgraded connection, with the upstream
/// as the stream type it is (a TCP socket can be spliced to).
async fn serve_upgraded<U>(
    upgraded: hyper::upgrade::Upgraded,
    upstream: U,
    check: Option<StartCheck>,
    idle: Duration,
    counts: &RelayCounts,
) -> Result<(), Outcome>
where
    U: RelayEnd + 'static,
{
    match upgraded.downcast::<TokioIo<WatchedIo<TcpStream>>>() {
        // The plain listener: relay between the two sockets
        // directly, without a lock around the client stream.
        Ok(parts) => {
            let hyper::upgrade::Parts { io, read_buf, .. } = parts;
            let early = read_buf.to_vec();
            // hyper's read buffer (8 KB or more) would otherwise stay
            // referenced, and allocated, for the life of the tunnel.
            drop(read_buf);
            serve_tunnel(io.into_inner().into_inner(), early, upstream, check, idle, counts).await
        }
        Err(upgraded) => serve_tunnel(TokioIo::new(upgraded), Vec::new(), upstream, check, idle, counts).await,
    }
}

/// The checks on the first bytes (when asked for), then the relay, or for
/// plain HTTP the request-by-request service. `early` holds bytes the
/// client sent right behind its CONNECT head.
async fn serve_tunnel<C, U>(
    mut client: C,
    early: Vec<u8>,
    mut upstream: U,
    check: Option<StartCheck>,
    idle: Duration,
    counts: &RelayCounts,
) -> Result<(), Outcome>
where
    C: RelayEnd + 'static,
    U: RelayEnd + 'static,
{
    let Some(check) = check else {
        relay_after(client, upstream, early, idle, counts).await;
        return Ok(());
    };
    match check.run(&mut client, early).await {
        Ok(Started::Relay(first)) => {
            relay_after(client, upstream, first, idle, counts).await;
            Ok(())
        }
        Ok(Started::PlainHttp(first)) => {
            let limits = tunnel_http::Limits {
                header: check.limit,
                idle,
                max_head: check.max_head,
                max_response_head: check.max_response_head,
            };
            let ends = tunnel_http::Ends { target: check.target, role: check.role, deny_message: check.deny_message };
            // Boxed: its future is larger than the opaque relay's, and every
            // tunnel's task would otherwise be sized for it.
            Box::pin(tunnel_http::serve(client, first, upstream, ends, limits, counts)).await
        }
        Err(reason) => {
            let _ = upstream.shutdown().await;
            Err(Outcome::Deny(reason))
        }
    }
}
