//! The proxy listener and the request path: read the head, parse the target,
//! resolve, decide, then forward (plain HTTP) or tunnel (CONNECT).

pub mod admit;
pub mod body;
pub mod connect;
pub mod egress;
pub mod error;
pub mod forward;
pub mod framing;
pub mod loops;
pub mod parent;
pub mod pool;
pub mod repeats;
pub mod revoke;
pub mod slots;
pub mod tunnel_http;
#[cfg(target_os = "linux")]
mod splice;
pub mod transparent;
pub mod upstream;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::access_log::{AccessRecord, Outcome};
use crate::config::{Config, Limits, Timeouts};
use crate::metrics::Metrics;
use crate::dns::Resolver;
use crate::identity::{CertNames, Identities};
use crate::policy::{DenyReason, Policy, RequestKind};
use tokio_rustls::TlsAcceptor;
use crate::target::Target;
use admit::{Ask, Evidence};
use body::ProxyBody;
use error::{ClientError, ProxyError};
use framing::{WatchedIo, Wire};

/// Everything a request needs that can change on reload, published as one
/// snapshot so a request never mixes two configurations.
pub struct Snapshot {
    pub policy: Policy,
    pub identities: Identities,
    /// Present when the proxy port speaks TLS.
    pub tls: Option<TlsAcceptor>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub resolver: Resolver,
    /// The parent proxy, when one is configured.
    pub parent: Option<parent::Parent>,
    /// The operator's lines for deny bodies.
    pub deny_messages: error::DenyMessages,
    /// 1 for the config loaded at start, +1 per successful reload.
    pub generation: u64,
    /// The DNS listener's rules (`dns_listen`).
    pub dns: crate::dns_listen::DnsRules,
}

impl Snapshot {
    /// Compiles a snapshot from a validated config.
    pub fn from_config(config: &Config, generation: u64) -> Result<Self, String> {
        let policy = config.compile()?;
        let tls = match &config.tls {
            Some(tls) => Some(TlsAcceptor::from(crate::tls::server_config(tls)?)),
            None => None,
        };
        Ok(Snapshot {
            identities: Identities::compile(&config.identity, &policy)?,
            tls,
            policy,
            timeouts: config.timeouts.clone(),
            limits: config.limits.clone(),
            resolver: Resolver::new(&config.dns).map_err(|e| format!("dns: {e}"))?,
            parent: config.upstream_proxy.as_ref().map(parent::Parent::compile).transpose()?,
            deny_messages: error::DenyMessages::from_config(config),
            generation,
            dns: crate::dns_listen::DnsRules::compile(config)?,
        })
    }
}

/// The shared, swappable snapshot. Reads are lock-free.
pub type SnapshotHandle = Arc<ArcSwap<Snapshot>>;

/// State shared by every connection of one proxy.
pub struct Shared {
    snapshot: SnapshotHandle,
    pool: pool::UpstreamPool,
    metrics: Arc<Metrics>,
    /// Open connections and tunnels, per client IP and in total.
    slots: Arc<slots::Slots>,
    /// Open tunnels, for revocation on reload.
    tunnels: revoke::Tunnels,
    /// Recent wrong credentials per client, to thin out repeats.
    auth_failures: repeats::AuthFailures,
    /// This process's open upstream sockets, for the loop guard.
    outbound: Arc<loops::Outbound>,
}

/// A bound proxy listener, ready to serve.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Server {
    /// Binds `config.listen` with its own metrics registry.
    pub async fn bind(config: &Config) -> io::Result<Self> {
        let snapshot = Snapshot::from_config(config, 1).map_err(io::Error::other)?;
        Self::bind_with(config.listen, snapshot, Arc::new(Metrics::new())).await
    }

    /// Binds `listen`, serving `snapshot` and recording into `metrics`.
    pub async fn bind_with(listen: SocketAddr, snapshot: Snapshot, metrics: Arc<Metrics>) -> io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let idle = snapshot.timeouts.upstream_idle.0;
        metrics.policy_generation.set(snapshot.generation as i64);
        #[cfg(target_os = "linux")]
        splice::promise(snapshot.limits.fds_needed());
        let shared = Arc::new(Shared {
            snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
            pool: pool::UpstreamPool::new(idle, metrics.upstream_idle.clone()),
            slots: slots::Slots::new(metrics.clone()),
            tunnels: revoke::Tunnels::default(),
            auth_failures: repeats::AuthFailures::default(),
            outbound: Arc::default(),
            metrics,
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

    /// The metrics this server records into.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Accepts and serves connections forever.
    pub async fn run(self) {
        self.run_until(std::future::pending()).await
    }

    /// Accepts and serves connections until `shutdown` completes; then
    /// stops accepting, asks open connections to finish their current
    /// request, and waits for connections and tunnels to end, at most the
    /// configured grace period.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) {
        let _reaper = AbortOnDrop(tokio::spawn(forward::reap_idle(self.shared.clone())));
        let _revoker = AbortOnDrop(tokio::spawn(revoke::on_reload(self.shared.clone())));
        let (stop_tx, stop_rx) = watch::channel(false);
        accept_until(&self.listener, &self.shared.metrics, shutdown, |stream, client| {
            self.admit(stream, client, stop_rx.clone())
        })
        .await;
        drop(self.listener);
        let metrics = &self.shared.metrics;
        metrics.draining.set(1);
        let _ = stop_tx.send(true);
        let grace = self.shared.snapshot.load().timeouts.shutdown_grace.0;
        tracing::info!(grace_secs = grace.as_secs_f64(), "draining: stopped accepting");
        let drained = tokio::time::timeout(grace, async {
            while metrics.active_connections.get() > 0 || metrics.active_tunnels.get() > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        match drained {
            Ok(()) => tracing::info!("drained"),
            Err(_) => tracing::warn!(
                connections = metrics.active_connections.get(),
                tunnels = metrics.active_tunnels.get(),
                "grace period over; closing what remains"
            ),
        }
    }

    /// Applies the connection limits, then serves the connection.
    fn admit(&self, stream: TcpStream, client: SocketAddr, stop: watch::Receiver<bool>) {
        match admit_slot(&self.shared, client.ip()) {
            Some(guard) => tokio::spawn(serve_connection(guard, stream, client, stop)),
            None => tokio::spawn(refuse_over_limit(stream)),
        };
    }
}

/// Accepts on `listener`, handing each connection to `admit`, until
/// `shutdown` completes.
async fn accept_until(
    listener: &TcpListener,
    metrics: &Metrics,
    shutdown: impl Future<Output = ()>,
    mut admit: impl FnMut(TcpStream, SocketAddr),
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut shutdown => return,
        };
        match accepted {
            Ok((stream, client)) => admit(stream, client),
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, and
                // count it (the connection waits in the backlog).
                // EMFILE (24) and ENFILE (23), the same on Linux and the BSDs.
                let out_of_fds = matches!(e.raw_os_error(), Some(23 | 24));
                metrics.refused(if out_of_fds { "fd_exhausted" } else { "accept_error" }).inc();
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Takes a connection slot for `ip` within the limits (a refusal is
/// counted by the slots), or `None`.
fn admit_slot(shared: &Arc<Shared>, ip: std::net::IpAddr) -> Option<ConnectionGuard> {
    let slot = shared.slots.connection(ip, &shared.snapshot.load().limits).ok()?;
    Some(ConnectionGuard { shared: shared.clone(), slot: Arc::new(slot) })
}

/// A served connection: the shared state and its slot in the limits. The
/// slot is shared with a tunnel the connection turns into.
struct ConnectionGuard {
    shared: Arc<Shared>,
    slot: Arc<slots::ConnectionSlot>,
}

/// Answers 503 without reading the request, then closes.
async fn refuse_over_limit(mut stream: TcpStream) {
    let response = error::raw_answer(
        http::StatusCode::SERVICE_UNAVAILABLE,
        error::ERROR_HEADER,
        "over-limit",
        "too many connections",
    );
    let refusal = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        // Drain what the client already sent, so closing does not reset
        // the connection before the client has read the answer.
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), refusal).await;
}

/// Completes once shutdown has been signalled (or the signaller is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Aborts a background task when its owner goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Completes the TLS handshake when the proxy port speaks TLS, then serves HTTP.
async fn serve_connection(guard: ConnectionGuard, stream: TcpStream, client: SocketAddr, stop: watch::Receiver<bool>) {
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

/// Serves HTTP/1 on a client connection with the service `make_service`
/// builds (given the connection's framing watch), under the head limits,
/// until the client is done or shutdown asks it to finish. A request hyper
/// refuses before the service sees it still gets its decision line.
async fn serve_with<I, S>(
    guard: ConnectionGuard,
    io: I,
    client: SocketAddr,
    make_service: impl FnOnce(Arc<Wire>) -> S,
    mut stop: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let (header_timeout, max_head) = {
        let snapshot = guard.shared.snapshot.load();
        (snapshot.timeouts.request_header.0, snapshot.limits.max_request_head_bytes)
    };
    let wire = Arc::new(Wire::default());
    let io = WatchedIo::new(io, wire.clone(), max_head);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(max_head)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), make_service(wire.clone()))
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = stopped(&mut stop) => {
            // Finish the request in flight, then close instead of keeping alive.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%client, error = %e, "client connection ended with an error");
        if let Some((refusal, status)) = wire.refusal_of(&e) {
            // hyper answered (or closed) before the service saw a request.
            let mut record = AccessRecord::unparsed(client, guard.shared.metrics.clone());
            record.outcome = Outcome::Refused(refusal);
            record.status = status.map_or(0, |s| s.as_u16());
            record.emit();
        }
    }
    drop(guard);
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
    let json = error::accepts_json(req.headers().get(http::header::ACCEPT));
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

/// The response for a routed request: the upstream's, or the error's, in
/// which case the request's log line is written here.
fn respond(
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
fn record_failure(shared: &Shared, record: &mut AccessRecord, err: &ProxyError) {
    record.outcome = err.outcome();
    if let ProxyError::Upstream(e) = err {
        shared.metrics.upstream_errors.with_label_values(&[e.code()]).inc();
    }
}

/// The answer for a request that failed, with its log line and count.
fn refuse(shared: &Shared, snapshot: &Snapshot, mut record: AccessRecord, err: ProxyError, json: bool) -> Response<ProxyBody> {
    record_failure(shared, &mut record, &err);
    let failure = match err {
        ProxyError::Denied(DenyReason::AuthFailed) => {
            shared.auth_failures.record(record.client.ip(), std::time::Instant::now())
        }
        _ => repeats::Failure::First,
    };
    let role = (!record.role.is_empty()).then_some(record.role.as_str());
    let answer = error::Answer {
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
        return connect::tunnel(shared, snapshot, opened, &ask.target, req, record.clone(), slot).await;
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
