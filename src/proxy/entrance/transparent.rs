//! The transparent entrance: connections that netfilter redirected here
//! (`deploy/transparent/redirect.sh`) from clients that never chose a proxy.
//!
//! The original destination comes from `SO_ORIGINAL_DST`; the first bytes
//! say what the client wants: a TLS ClientHello names its host by SNI, an
//! HTTP/1 request by its Host header (each request on the connection is
//! decided on its own), anything else has no name and is decided on the
//! original destination alone. From there the connection joins the
//! explicit proxy's path: identify (source address only), `authorize`
//! with the original destination, then dial the permit and relay or
//! forward. A name's checked addresses are dialed, the original
//! destination only when it is one of them.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::proxy::body::ProxyBody;
use crate::proxy::error::{ClientError, ProxyError};
use crate::proxy::entrance::framing::{check_head, Entrance, Wire};
use crate::proxy::loops::{self, Loop};
use crate::proxy::admit::{self, Ask, Evidence, Opened};
use crate::proxy::egress::upstream::Upstream;
use crate::proxy::relay::{copy, tunnel};
use crate::proxy::respond::respond;
use crate::proxy::egress::forward;
use crate::proxy::{accept_until, admit_slot, Server, Shared};
use crate::snapshot::Snapshot;
use crate::access_log::AccessRecord;
use crate::orig_dst;
use crate::policy::RequestKind;
use crate::proxy::relay::first_bytes::{self, FirstBytes};
use crate::sni::SniError;
use crate::target::{Host, Target};

/// Why a redirected connection was closed before anything was decided.
/// Counted in `portcullis_connections_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Its original destination is one of this proxy's own listeners (or
    /// it was not redirected at all): serving it would loop.
    Loop,
    /// The original destination could not be read (no conntrack entry).
    NoOriginalDst,
}

impl Refusal {
    /// The metric label.
    const fn as_str(self) -> &'static str {
        match self {
            Refusal::Loop => "transparent_loop",
            Refusal::NoOriginalDst => "transparent_no_original_dst",
        }
    }
}

/// The transparent listener, sharing its proxy's snapshot, connection
/// pool, limits and metrics.
pub struct TransparentServer {
    listener: TcpListener,
    shared: Arc<Shared>,
    /// Every listener of this process, for the loop guard.
    own: Arc<[SocketAddr]>,
}

impl Server {
    /// Binds the transparent listener on `listen`. `others` are the
    /// process's other listeners (proxy, admin): connections headed for
    /// any of them, or for this one, are refused.
    pub async fn bind_transparent(&self, listen: SocketAddr, others: &[SocketAddr]) -> io::Result<TransparentServer> {
        let listener = TcpListener::bind(listen).await?;
        let mut own = others.to_vec();
        own.push(listener.local_addr()?);
        Ok(TransparentServer { listener, shared: self.shared.clone(), own: own.into() })
    }
}

impl TransparentServer {
    /// The address actually bound.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts redirected connections until `shutdown` completes, then
    /// stops accepting and asks open HTTP connections to finish their
    /// current request. The proxy's [`Server::run_until`] waits for them,
    /// as they hold the same connection slots.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = &self.shared;
        let own = &self.own;
        accept_until(&self.listener, &shared.metrics, shutdown, |stream, client: SocketAddr| {
            // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d.
            let client = SocketAddr::new(client.ip().to_canonical(), client.port());
            if let Some(guard) = admit_slot(shared, client.ip()) {
                tokio::spawn(serve(guard, stream, client, own.clone(), stop_rx.clone()));
            }
        })
        .await;
        let _ = stop_tx.send(true);
    }
}

async fn serve(
    guard: crate::proxy::ConnectionGuard,
    mut stream: TcpStream,
    client: SocketAddr,
    own: Arc<[SocketAddr]>,
    stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let metrics = guard.shared.metrics.clone();
    let (original, local) = match (orig_dst::original_destination(&stream), stream.local_addr()) {
        (Ok(original), Ok(local)) => (SocketAddr::new(original.ip().to_canonical(), original.port()), local),
        (Err(e), _) | (_, Err(e)) => {
            tracing::info!(%client, error = %e, "no original destination; refused");
            metrics.refused(Refusal::NoOriginalDst.as_str()).inc();
            return;
        }
    };
    let looped = || loops::redirected(client, local, original, &own, &guard.shared.outbound);
    if let Some(kind) = looped() {
        return refuse_loop(&guard.shared, client, original, kind, RequestKind::TransparentTcp);
    }
    let (limit, max_head) = {
        let snapshot = guard.shared.snapshot.load();
        (snapshot.timeouts.request_header.0, snapshot.limits.max_request_head_bytes)
    };
    // A request line is part of the head: the head's size limit applies.
    let (first_bytes, first) = classify(&mut stream, limit, max_head).await;
    // Checked again once the first bytes are in: by then an upstream
    // socket of this process that was redirected back here is registered.
    if let Some(kind) = looped() {
        let carried = match first_bytes {
            Seen::Http => RequestKind::TransparentHttp,
            Seen::Tls(_) => RequestKind::TransparentTls,
            Seen::Other => RequestKind::TransparentTcp,
        };
        return refuse_loop(&guard.shared, client, original, kind, carried);
    }
    match first_bytes {
        Seen::Http => {
            let shared = guard.shared.clone();
            let service = move |wire: Arc<Wire>| {
                hyper::service::service_fn(move |req| {
                    let conflicting = wire.next_request_conflicting();
                    handle(shared.clone(), client, original, conflicting, req)
                })
            };
            crate::proxy::serve_with(guard, Prefixed::new(first, stream), client, service, stop).await
        }
        Seen::Tls(name) => relay(guard, stream, client, original, RequestKind::TransparentTls, name, first).await,
        Seen::Other => relay(guard, stream, client, original, RequestKind::TransparentTcp, None, first).await,
    }
}

/// Refuses a redirected connection that loops back to this process:
/// counted, logged with its likely cause, and given a decision line (as a
/// redirected connection of kind `carried`, as far as it was read).
fn refuse_loop(shared: &Shared, client: SocketAddr, original: SocketAddr, kind: Loop, carried: RequestKind) {
    tracing::warn!(%client, %original, cause = kind.cause(), "loop-detected: a redirected connection came back to Portcullis; refused");
    shared.metrics.refused(Refusal::Loop.as_str()).inc();
    let mut record = AccessRecord::new(client, Method::CONNECT, shared.metrics.clone());
    record.kind = Some(carried);
    record.original_dst = Some(original);
    record.host = original.ip().to_string();
    record.port = original.port();
    refuse(shared, &mut record, &ProxyError::LoopDetected);
}

/// What a redirected connection's first bytes say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// A TLS ClientHello, with its server name when it carries one.
    Tls(Option<String>),
    /// An HTTP/1.x request line.
    Http,
    /// Anything else (a broken ClientHello included), or nothing within
    /// the time limit: decided on the original destination alone.
    Other,
}

/// Reads the first bytes with the one classifier ([`first_bytes`]), within
/// `limit` and about `max_line` bytes for a request line, and says what
/// they are. The bytes read are returned to be replayed.
async fn classify<S>(stream: &mut S, limit: Duration, max_line: usize) -> (Seen, Vec<u8>)
where
    S: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(4096);
    let read = tokio::time::timeout(limit, first_bytes::read(stream, &mut buf, max_line)).await;
    let seen = match read.ok().flatten() {
        Some(FirstBytes::Http) => Seen::Http,
        Some(FirstBytes::Tls(Ok(name))) => Seen::Tls(Some(name)),
        Some(FirstBytes::Tls(Err(SniError::Missing))) => Seen::Tls(None),
        Some(FirstBytes::Tls(Err(_)) | FirstBytes::Other) | None => Seen::Other,
    };
    (seen, buf)
}

/// Serves one HTTP request of a redirected connection, named by its Host.
async fn handle(
    shared: Arc<Shared>,
    client: SocketAddr,
    original: SocketAddr,
    conflicting_framing: bool,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let snapshot = shared.snapshot.load_full();
    let mut record = AccessRecord::new(client, req.method().clone(), shared.metrics.clone());
    record.kind = Some(RequestKind::TransparentHttp);
    record.original_dst = Some(original);
    let json = crate::proxy::respond::accepts_json(req.headers().get(http::header::ACCEPT));
    // The same edge as the proxy port's; a CONNECT has nothing to connect.
    if let Err(refusal) = check_head(&req, conflicting_framing, Entrance::Redirected) {
        return Ok(respond(&shared, &snapshot, record, Err(ClientError::Refused(refusal).into()), json));
    }
    let routed = route(&shared, &snapshot, client, original, &mut record, req).await;
    Ok(respond(&shared, &snapshot, record, routed, json))
}

async fn route(
    shared: &Arc<Shared>,
    snapshot: &Arc<Snapshot>,
    client: SocketAddr,
    original: SocketAddr,
    record: &mut AccessRecord,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let who = Evidence::Redirected { source: client.ip() };
    let target = match request_target(&req, original) {
        Ok(target) => target,
        Err(e) => return Err(admit::unparsed(snapshot, &who, record, e)),
    };
    record.host = target.host.to_text();
    record.port = target.port;
    if loops::has_looped(req.headers()) {
        tracing::warn!(%client, %original, cause = loops::SIDECAR_CAUSE, "loop-detected: a request came back to Portcullis; refused");
        return Err(ProxyError::LoopDetected);
    }
    let ask = Ask { who, kind: RequestKind::TransparentHttp, target, original: Some(original) };
    let admitted = admit::admit(shared, snapshot, &ask, record).await?;
    forward::forward(shared, snapshot, admitted, &ask.target, req, record.clone()).await
}

/// The target of a redirected HTTP request: the host its client named (the
/// absolute-form authority, else the Host header) at the original port,
/// which is where the client's packets went. Without either, the original
/// destination itself.
fn request_target<B>(req: &Request<B>, original: SocketAddr) -> Result<Target, ProxyError> {
    let named = match req.uri().authority() {
        Some(authority) => Some(authority.host().to_string()),
        None => match req.headers().get(http::header::HOST) {
            Some(value) => {
                let text = value.to_str().map_err(|_| invalid_host())?;
                let authority: http::uri::Authority = text.parse().map_err(|_| invalid_host())?;
                Some(authority.host().to_string())
            }
            None => None,
        },
    };
    let host = match named {
        Some(name) => Host::parse(&name).map_err(ClientError::InvalidTarget)?,
        None => Host::Ip(original.ip()),
    };
    Ok(Target { host, port: original.port() })
}

fn invalid_host() -> ProxyError {
    ClientError::InvalidTarget(crate::target::TargetError::EmptyHost).into()
}

/// Decides a TLS or other TCP connection once, then relays it to the
/// permitted address until either side is done, it idles out, a reload
/// revokes it or it reaches `tunnel_max_lifetime`; a refusal closes it
/// (TLS clients get an `access_denied` alert). One log line either way.
async fn relay(
    guard: crate::proxy::ConnectionGuard,
    mut stream: TcpStream,
    client: SocketAddr,
    original: SocketAddr,
    kind: RequestKind,
    name: Option<String>,
    first: Vec<u8>,
) {
    let shared = guard.shared.clone();
    let snapshot = shared.snapshot.load_full();
    // A redirected connection is logged like a tunnel.
    let mut record = AccessRecord::new(client, Method::CONNECT, shared.metrics.clone());
    record.kind = Some(kind);
    record.original_dst = Some(original);
    let ech = kind == RequestKind::TransparentTls && crate::sni::offers_ech(&first);
    let opened = match open(&shared, &snapshot, client, original, (kind, ech), name, &mut record).await {
        Ok(opened) => opened,
        Err(err) => {
            refuse(&shared, &mut record, &err);
            if kind == RequestKind::TransparentTls {
                // A fatal access_denied alert (RFC 8446 6.2).
                let _ = stream.write_all(&crate::sni::ACCESS_DENIED_ALERT).await;
            }
            let _ = stream.shutdown().await;
            return;
        }
    };
    let Opened { upstream, outbound, slot, registration, .. } = opened;
    let idle = snapshot.timeouts.tunnel_idle.0;
    let lifetime = snapshot.timeouts.tunnel_max_lifetime.map(|d| d.0);
    let counts = copy::RelayCounts::default();
    let relayed = async {
        match upstream {
            Upstream::Tcp(upstream) => copy::relay_after(stream, upstream, first, idle, &counts).await,
            Upstream::Tls(upstream) => Box::pin(copy::relay_after(stream, upstream, first, idle, &counts)).await,
        }
    };
    tokio::select! {
        () = relayed => {}
        cut = tunnel::cut_short(&registration, lifetime) => record.outcome = cut,
    }
    (record.bytes_in, record.bytes_out) = counts.get();
    drop((slot, registration, outbound));
    record.emit();
    drop(guard);
}

/// Turns a redirected TLS/TCP connection into its [`Ask`] (named by its
/// SNI, else by its original destination) and takes it through the door.
async fn open(
    shared: &Arc<Shared>,
    snapshot: &Snapshot,
    client: SocketAddr,
    original: SocketAddr,
    (kind, ech): (RequestKind, bool),
    name: Option<String>,
    record: &mut AccessRecord,
) -> Result<Opened, ProxyError> {
    let host = match name {
        Some(name) => Host::parse(&name).map_err(ClientError::InvalidTarget)?,
        None => Host::Ip(original.ip()),
    };
    let target = Target { host, port: original.port() };
    record.host = target.host.to_text();
    record.port = target.port;
    let ask = Ask { who: Evidence::Redirected { source: client.ip() }, kind, target, original: Some(original) };
    if ech {
        // The SNI of an ECH offer is the outer, public name: not what decides.
        let (role, _) = admit::identify(snapshot, &ask.who, record).map_err(ProxyError::Denied)?;
        if !snapshot.policy.role(role).allows_ech() {
            return Err(ProxyError::Denied(crate::policy::DenyReason::EchRefused));
        }
    }
    admit::admit_tunnel(shared, snapshot, &ask, record).await
}

/// Logs and counts a redirected connection that is closed undecided or denied.
fn refuse(shared: &Shared, record: &mut AccessRecord, err: &ProxyError) {
    crate::proxy::respond::record_failure(shared, record, err);
    record.emit();
}

/// A connection whose first bytes were already read: they are read again
/// first, then the socket. Writes go straight to the socket.
struct Prefixed<S> {
    prefix: Vec<u8>,
    read: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Replays `prefix` before reading from `inner`.
    fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed { prefix, read: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.read < this.prefix.len() {
            let n = (this.prefix.len() - this.read).min(buf.remaining());
            buf.put_slice(&this.prefix[this.read..this.read + n]);
            this.read += n;
            if this.read == this.prefix.len() {
                this.prefix = Vec::new();
                this.read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_broken_or_nameless_clienthello_is_told_apart() {
        let hello = crate::sni::testing::hello_for("allowed.test");
        for (bytes, want) in [
            (hello, Seen::Tls(Some("allowed.test".into()))),
            (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00".to_vec(), Seen::Other),
            (b"GET / HTTP/1.1\r\n".to_vec(), Seen::Http),
        ] {
            let (mut client, mut proxy_side) = tokio::io::duplex(64 * 1024);
            client.write_all(&bytes).await.unwrap();
            assert_eq!(classify(&mut proxy_side, Duration::from_secs(5), 1024).await.0, want);
        }
    }

    #[tokio::test]
    async fn silence_is_other_after_the_limit() {
        let (mut proxy_side, _client) = tokio::io::duplex(64);
        let (kind, bytes) = classify(&mut proxy_side, Duration::from_millis(50), 1024).await;
        assert_eq!((kind, bytes), (Seen::Other, Vec::new()));
    }

    #[tokio::test]
    async fn prefix_is_replayed_before_the_stream() {
        let (mut client, mut proxy_side) = tokio::io::duplex(1024);
        let sent = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nrest of the stream";
        client.write_all(sent).await.unwrap();
        drop(client);
        let (kind, first) = classify(&mut proxy_side, Duration::from_secs(5), 1024).await;
        assert_eq!(kind, Seen::Http);
        let mut replayed = Vec::new();
        Prefixed::new(first, proxy_side).read_to_end(&mut replayed).await.unwrap();
        assert_eq!(replayed, sent);
    }

    #[test]
    fn redirected_request_targets() {
        let original: SocketAddr = "11.0.0.10:8080".parse().unwrap();
        // (request target, Host header, want host:port | None for 400)
        let cases: [(&str, Option<&str>, Option<&str>); 8] = [
            ("/", Some("allowed.test"), Some("allowed.test:8080")),
            ("/", Some("Allowed.TEST:9999"), Some("allowed.test:8080")),
            ("/x?y", Some("[2600::10]:80"), Some("[2600::10]:8080")),
            ("/", Some("11.0.0.20"), Some("11.0.0.20:8080")),
            ("/", None, Some("11.0.0.10:8080")),
            ("http://other.test/p", Some("allowed.test"), Some("other.test:8080")),
            ("/", Some("bad host"), None),
            ("/", Some("0x7f.1"), None),
        ];
        for (uri, host, want) in cases {
            let mut req = Request::builder().uri(uri);
            if let Some(host) = host {
                req = req.header(http::header::HOST, host);
            }
            let got = request_target(&req.body(()).unwrap(), original).ok().map(|t| t.to_string());
            assert_eq!(got.as_deref(), want, "{uri} Host: {host:?}");
        }
    }
}
