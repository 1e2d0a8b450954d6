//! The proxy listener and the request path: read the head, parse the target,
//! resolve, decide, then forward (plain HTTP) or tunnel (CONNECT).

pub mod body;
pub mod connect;
pub mod error;
pub mod forward;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::access_log::{AccessRecord, Outcome};
use crate::config::{Config, Timeouts};
use crate::dns::Resolver;
use crate::policy::{Decision, Permit, Policy, PreResolution, RequestKind};
use crate::target::Target;
use body::ProxyBody;
use error::{ClientError, ProxyError, UpstreamError};

/// Everything a request needs that can change on reload, published as one
/// snapshot so a request never mixes two configurations.
pub struct Snapshot {
    pub policy: Policy,
    pub timeouts: Timeouts,
    pub resolver: Resolver,
}

impl Snapshot {
    /// Compiles a snapshot from a validated config.
    pub fn from_config(config: &Config) -> Result<Self, String> {
        Ok(Snapshot {
            policy: config.compile()?,
            timeouts: config.timeouts.clone(),
            resolver: Resolver::new(&config.dns).map_err(|e| format!("dns: {e}"))?,
        })
    }
}

/// The shared, swappable snapshot. Reads are lock-free.
pub type SnapshotHandle = Arc<ArcSwap<Snapshot>>;

/// State shared by every connection of one proxy.
pub struct Shared {
    snapshot: SnapshotHandle,
    pool: forward::UpstreamPool,
}

/// A bound proxy listener, ready to serve.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Server {
    /// Binds `config.listen` and compiles the first snapshot.
    pub async fn bind(config: &Config) -> io::Result<Self> {
        let snapshot = Snapshot::from_config(config).map_err(io::Error::other)?;
        let listener = TcpListener::bind(config.listen).await?;
        let idle = config.timeouts.upstream_idle.0;
        let shared = Arc::new(Shared {
            snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
            pool: forward::UpstreamPool::new(idle),
        });
        Ok(Server { listener, shared })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The handle through which a reload publishes a new snapshot.
    pub fn snapshot_handle(&self) -> SnapshotHandle {
        self.shared.snapshot.clone()
    }

    /// Accepts and serves connections until the task is dropped.
    pub async fn run(self) {
        let _reaper = AbortOnDrop(tokio::spawn(forward::reap_idle(self.shared.clone())));
        loop {
            let (stream, client) = match self.listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            tokio::spawn(serve_connection(self.shared.clone(), stream, client));
        }
    }
}

/// Aborts a background task when its owner goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream, client: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let header_timeout = shared.snapshot.load().timeouts.request_header.0;
    let service = hyper::service::service_fn(move |req| handle(shared.clone(), client, req));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%client, error = %e, "client connection ended with an error");
    }
}

/// Serves one request; every outcome is a response and one log line.
async fn handle(shared: Arc<Shared>, client: SocketAddr, req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
    let snapshot = shared.snapshot.load_full();
    let mut record = AccessRecord::new(client, req.method().clone());
    let response = match route(&shared, &snapshot, &mut record, req).await {
        Ok(response) => response,
        Err(err) => {
            record.outcome = err.outcome();
            let response = err.to_response();
            record.status = response.status().as_u16();
            record.emit();
            response
        }
    };
    Ok(response)
}

/// Parses, decides and dispatches; the caller turns an error into a response.
async fn route(
    shared: &Arc<Shared>,
    snapshot: &Arc<Snapshot>,
    record: &mut AccessRecord,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let kind = if req.method() == Method::CONNECT { RequestKind::Connect } else { RequestKind::Http };
    record.kind = Some(kind);
    let target = parse_target(kind, &req, record)?;
    let permit = authorize(snapshot, kind, &target, record).await?;
    match kind {
        RequestKind::Connect => connect::tunnel(snapshot, permit, req, record.clone()).await,
        RequestKind::Http => forward::forward(shared, snapshot, permit, &target, req, record.clone()).await,
    }
}

fn parse_target(kind: RequestKind, req: &Request<Incoming>, record: &mut AccessRecord) -> Result<Target, ProxyError> {
    record.host = req.uri().to_string();
    let parsed = match kind {
        RequestKind::Connect => {
            let authority = req.uri().authority().ok_or(ClientError::ConnectWithoutAuthority)?;
            Target::parse_authority(authority.as_str())
        }
        RequestKind::Http if req.uri().authority().is_none() => return Err(ClientError::OriginForm.into()),
        RequestKind::Http => Target::parse_absolute(req.uri()),
    };
    let target = parsed.map_err(ClientError::InvalidTarget)?;
    record.host = target.host.to_string();
    record.port = target.port;
    Ok(target)
}

/// Resolves if needed and asks the policy; returns the permit to dial.
async fn authorize(
    snapshot: &Snapshot,
    kind: RequestKind,
    target: &Target,
    record: &mut AccessRecord,
) -> Result<Permit, ProxyError> {
    let policy = &snapshot.policy;
    let role = policy.default_role();
    record.role = policy.role(role).name().to_string();
    record.mode = policy.role(role).mode();
    let decision = match policy.pre_resolution(role, kind, target) {
        PreResolution::Decided(decision) => decision,
        PreResolution::Resolve(name) => {
            let addrs = snapshot.resolver.resolve(name).await.map_err(UpstreamError::Resolve)?;
            policy.decide(role, kind, target, &addrs)
        }
    };
    match decision {
        Decision::Deny(reason) => Err(ProxyError::Denied(reason)),
        Decision::Allow(permit) => {
            record.outcome = match permit.would_deny() {
                Some(reason) => Outcome::WouldDeny(reason),
                None => Outcome::Allow,
            };
            Ok(permit)
        }
    }
}
