//! The proxy, by role: `entrance/` (the proxy port and the transparent
//! listener) parses each request into an `Ask`; `admit` identifies,
//! decides, charges and dials; `egress/` opens upstream connections;
//! `relay/` moves bytes under one set of lifetimes; `respond` maps every
//! error to its answer once. Here: the snapshot a request reads, the state
//! shared by every connection, and the listener machinery.

pub mod admit;
pub mod body;
pub mod decide;
pub mod egress;
pub mod entrance;
pub mod error;
pub mod loops;
pub mod relay;
pub mod repeats;
pub mod respond;
pub mod revoke;
pub mod slots;

// The rooms' modules under their old names, so paths such as
// `proxy::forward::rewrite_request` (the fuzz target) stay valid.
pub use egress::{forward, parent, pool, upstream};
pub use entrance::{framing, transparent};
pub use relay::tunnel_http;
#[cfg(target_os = "linux")]
use relay::splice;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::access_log::{AccessRecord, Outcome};
use crate::config::Config;
use crate::metrics::Metrics;
use body::ProxyBody;
use framing::{WatchedIo, Wire};

pub use crate::snapshot::{Snapshot, SnapshotHandle};

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
        let snapshot = Snapshot::compile(config, 1).map_err(io::Error::other)?;
        Self::bind_with(config.listen, snapshot, Arc::new(Metrics::new())).await
    }

    /// Binds `listen`, serving `snapshot` and recording into `metrics`.
    pub async fn bind_with(listen: SocketAddr, snapshot: Snapshot, metrics: Arc<Metrics>) -> io::Result<Self> {
        Ok(Self::on_listener(TcpListener::bind(listen).await?, snapshot, metrics))
    }

    /// Serves `snapshot` on a listener already bound (the snapshot must know
    /// the listener's address, so that requests to it are refused as `self`).
    pub fn on_listener(listener: TcpListener, snapshot: Snapshot, metrics: Arc<Metrics>) -> Self {
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
        Server { listener, shared }
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
            Some(guard) => tokio::spawn(entrance::explicit::serve_connection(guard, stream, client, stop)),
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
    let response = respond::raw_answer(
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
        .timer(entrance::head_timer::HeadTimer::default())
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
