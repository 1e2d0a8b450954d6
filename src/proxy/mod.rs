//! The proxy listener and the request path: read the head, parse the target,
//! resolve, decide, then forward (plain HTTP) or tunnel (CONNECT).

pub mod body;
pub mod connect;
pub mod error;
pub mod forward;
pub mod framing;
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
use crate::policy::{Decision, DenyReason, Permit, Policy, PreResolution, RequestKind, RoleId};
use tokio_rustls::TlsAcceptor;
use crate::target::{DomainName, Target};
use body::ProxyBody;
use error::{ClientError, ProxyError, UpstreamError};
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

    /// True when `name` is handed to the parent proxy unresolved
    /// (`upstream_proxy.resolve: parent`, and the request leaves through
    /// the parent) and nothing in this config needs its addresses: a pinned
    /// name is answered from config and checked, and a name a carve-out is
    /// bound to must be resolved here for the carve-out to apply.
    pub fn parent_resolves(&self, role: RoleId, kind: RequestKind, target: &Target, name: &DomainName) -> bool {
        let Some(parent) = &self.parent else { return false };
        parent.resolves(self.policy.role(role).name(), kind, name)
            && self.resolver.pinned(name).is_none()
            && !self.policy.binds_name(role, target)
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
        let shared = Arc::new(Shared {
            snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
            pool: pool::UpstreamPool::new(idle, metrics.upstream_idle.clone()),
            slots: slots::Slots::new(metrics.clone()),
            tunnels: revoke::Tunnels::default(),
            auth_failures: repeats::AuthFailures::default(),
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
    // The edge comes first: a malformed request is refused whoever sends it.
    if let Err(refusal) = framing::check_head(&req, conflicting_framing) {
        record.kind = Some(request_kind(req.method()));
        return Ok(refuse(&shared, &snapshot, record, ClientError::Refused(refusal).into(), json));
    }
    let identity = snapshot.identities.identify(
        &snapshot.policy,
        cert.as_deref(),
        req.headers().get(http::header::PROXY_AUTHORIZATION),
        client.ip(),
    );
    let routed = match identity {
        Ok((role, source)) => {
            record.identity = source.as_str();
            record.role = snapshot.policy.role(role).name().to_string();
            record.mode = snapshot.policy.role(role).mode();
            match route(&shared, &snapshot, role, &mut record, slot, req).await {
                Err(ProxyError::Denied(reason)) => Err(ProxyError::Denied(snapshot.identities.challenge(source, reason))),
                routed => routed,
            }
        }
        Err(reason) => {
            // The 407 line names what the client wanted to reach.
            let kind = request_kind(req.method());
            record.kind = Some(kind);
            let _ = parse_target(kind, &req, &mut record);
            Err(ProxyError::Denied(reason))
        }
    };
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

/// Parses, decides and dispatches; the caller turns an error into a response.
async fn route(
    shared: &Arc<Shared>,
    snapshot: &Arc<Snapshot>,
    role: RoleId,
    record: &mut AccessRecord,
    slot: Arc<slots::ConnectionSlot>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let kind = request_kind(req.method());
    record.kind = Some(kind);
    let target = parse_target(kind, &req, record)?;
    if forward::has_looped(req.headers()) {
        return Err(ProxyError::LoopDetected);
    }
    let permit = authorize(shared, snapshot, role, kind, &target, record, None).await?;
    let role_name = snapshot.policy.role(role).shared_name();
    match kind {
        RequestKind::Connect => connect::tunnel(shared, snapshot, permit, &target, req, record.clone(), slot, role_name).await,
        _ => forward::forward(shared, snapshot, permit, &target, req, record.clone(), role_name).await,
    }
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

/// Resolves if needed and asks the policy; returns the permit to dial.
/// `original` is where a redirected connection was headed (transparent
/// listener), so the policy can prefer it when it is a checked address.
async fn authorize(
    shared: &Shared,
    snapshot: &Snapshot,
    role: RoleId,
    kind: RequestKind,
    target: &Target,
    record: &mut AccessRecord,
    original: Option<SocketAddr>,
) -> Result<Permit, ProxyError> {
    let policy = &snapshot.policy;
    let decision = match policy.pre_resolution(role, kind, target) {
        PreResolution::Decided(decision) => decision,
        PreResolution::Resolve(name) if snapshot.parent_resolves(role, kind, target, name) => {
            record.answer = "parent";
            policy.decide_name_only(role, kind, target)
        }
        PreResolution::Resolve(name) => {
            record.answer = if snapshot.resolver.pinned(name).is_some() { "static" } else { "dns" };
            let started = std::time::Instant::now();
            let resolved = snapshot.resolver.resolve(name).await;
            shared.metrics.dns_resolve.observe(started.elapsed().as_secs_f64());
            let addrs = resolved.map_err(UpstreamError::Resolve)?;
            match original {
                None => policy.decide(role, kind, target, &addrs),
                Some(original) => policy.decide_redirected(role, kind, target, &addrs, original.ip()),
            }
        }
    };
    match decision {
        Decision::Deny { reason, rule } => {
            record.rule = Some(policy.rule_ref(rule));
            Err(ProxyError::Denied(reason))
        }
        Decision::Allow(permit) => {
            record.rule = Some(policy.rule_ref(permit.rule_id()));
            record.outcome = match permit.would_deny() {
                Some(reason) => Outcome::WouldDeny(reason),
                None => Outcome::Allow,
            };
            Ok(permit)
        }
    }
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
