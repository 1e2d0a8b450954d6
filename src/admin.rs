//! The admin listener: `/metrics`, `/healthz`, `/readyz`, and
//! `/v1/denials` (the caller's own recent denials, see [`crate::denials`]).
//! Separate from the proxy port, and it never proxies: anything else is 404.
//!
//! A caller of `/v1/denials` is who the proxy would take it for: with a
//! `Proxy-Authorization` header that the config's `identity.credentials`
//! accept, those credentials; otherwise its source address.
//!
//! At most [`MAX_CONNECTIONS`] admin connections are served at once (they
//! come out of the limits' reserved descriptors); one more is answered 503
//! and closed, so a client holding connections open cannot take the
//! process's descriptors through this port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::denials::{self, Owner};
use crate::identity::IdentitySource;
use crate::metrics::Metrics;
use crate::proxy::SnapshotHandle;

/// Admin connections served at once; one more is refused with 503.
pub const MAX_CONNECTIONS: usize = 16;
/// How long one admin connection may stay open (a scraper reconnects).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Whether the process should receive traffic.
#[derive(Default)]
pub struct Health {
    accepting: AtomicBool,
}

impl Health {
    /// Marks the proxy listener as accepting (true) or not (false).
    pub fn set_accepting(&self, accepting: bool) {
        self.accepting.store(accepting, Ordering::SeqCst);
    }

    /// Ready: a policy is loaded (always, once the proxy exists), the proxy
    /// listener is accepting, and the process is not draining.
    pub fn is_ready(&self, metrics: &Metrics) -> bool {
        self.accepting.load(Ordering::SeqCst) && metrics.draining.get() == 0
    }
}

/// Serves admin requests on `listener` until the task is dropped; denials
/// are looked up per caller, identified by `snapshot`'s identity rules.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, health: Arc<Health>, snapshot: SnapshotHandle) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let answer = crate::proxy::respond::raw_answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    crate::proxy::error::ERROR_HEADER,
                    "over-limit",
                    "too many open admin connections",
                );
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer.as_bytes())).await;
            });
            continue;
        };
        let (metrics, health, snapshot) = (metrics.clone(), health.clone(), snapshot.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = route(&req, peer, &metrics, &health, &snapshot);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
            drop(slot);
        });
    }
}

fn route(
    req: &Request<Incoming>,
    peer: SocketAddr,
    metrics: &Metrics,
    health: &Health,
    snapshot: &SnapshotHandle,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::NOT_FOUND, "not found\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let mut resp = text(StatusCode::OK, metrics.render());
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            resp
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" if health.is_ready(metrics) => text(StatusCode::OK, "ready\n".into()),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
        "/v1/denials" => own_denials(req, peer, metrics, snapshot),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// The caller's own recent denials as JSON; 407 for credentials the
/// config does not accept.
fn own_denials(req: &Request<Incoming>, peer: SocketAddr, metrics: &Metrics, snapshot: &SnapshotHandle) -> Response<Full<Bytes>> {
    let snapshot = snapshot.load();
    let presented = req.headers().get(header::PROXY_AUTHORIZATION);
    let (owner, caller) = match snapshot.identities.identify(&snapshot.policy, None, presented, peer.ip()) {
        Ok((_, IdentitySource::Credentials)) => {
            let value = presented.map_or(&[][..], HeaderValue::as_bytes);
            (Owner::of(peer.ip(), Some(value)), "credentials".to_string())
        }
        Err(crate::policy::DenyReason::AuthFailed) => {
            let mut resp = text(StatusCode::PROXY_AUTHENTICATION_REQUIRED, "portcullis: auth-failed: credentials not accepted\n".into());
            resp.headers_mut().insert(header::PROXY_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"portcullis\""));
            return resp;
        }
        // No credentials presented (or none configured, so a header
        // identifies nobody, as on the proxy port): the source address.
        Ok(_) | Err(_) => (Owner::of(peer.ip(), None), peer.ip().to_canonical().to_string()),
    };
    let listed = metrics.denials.of(&owner, denials::MAX_LISTED);
    let mut resp = text(StatusCode::OK, denials::to_json(&caller, &listed));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}
