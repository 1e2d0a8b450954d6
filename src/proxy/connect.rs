//! Dialing a permitted address, and CONNECT tunnels.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::body::ProxyBody;
use super::error::{ProxyError, UpstreamError};
use super::tunnel_http::{self, Start};
use super::admit::Opened;
use super::revoke::Registration;
use super::slots::ConnectionSlot;
use super::framing::WatchedIo;
use super::upstream::Upstream;
use super::{Shared, Snapshot};
use crate::config::Timeouts;
use crate::metrics::{Metrics, RelayedBytes};
use crate::access_log::{AccessRecord, Outcome};
use crate::policy::{DenyReason, Permit, TunnelStart};
use crate::sni::{self, SniError};
use crate::target::Target;

/// Relay buffer per direction.
/// Relay buffers start small, so an idle tunnel costs little memory, and
/// double whenever a read fills them, up to the largest size, so a bulk
/// transfer moves in large chunks.
const RELAY_BUF_START: usize = 2 * 1024;
const RELAY_BUF_MAX: usize = 128 * 1024;
/// A grown buffer that sees no byte for this long shrinks back to the
/// start size, so a tunnel that once moved a burst idles as cheaply as one
/// that never did.
const RELAY_QUIET: Duration = Duration::from_millis(250);
/// How often an open tunnel adds the bytes it relayed since the last time
/// to the metrics, so a long transfer shows on a graph while it runs.
const METER_EVERY: Duration = Duration::from_secs(2);

/// Opens a TCP connection to a reachable address of `permit` within one
/// overall `upstream_connect` timeout, racing the addresses Happy Eyeballs
/// style (RFC 8305): families interleaved, the next attempt started after
/// `connect_stagger` or as soon as one fails, the first to connect kept.
/// The permit is the only way to name an address here: nothing unchecked
/// can be dialed.
pub async fn dial(permit: &Permit, timeouts: &Timeouts, metrics: &Metrics) -> Result<(TcpStream, SocketAddr), UpstreamError> {
    let started = Instant::now();
    let dialed = dial_any(permit, timeouts.upstream_connect.0, timeouts.connect_stagger.0).await;
    metrics.upstream_connect.observe(started.elapsed().as_secs_f64());
    dialed
}

/// The addresses in RFC 8305 §4 order: the family of the first answer
/// first, then the two families alternating, each in answer order.
fn interleaved(addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let first_v6 = addrs.first().is_some_and(|a| a.is_ipv6());
    let (lead, other): (Vec<SocketAddr>, Vec<SocketAddr>) = addrs.iter().partition(|a| a.is_ipv6() == first_v6);
    let mut out = Vec::with_capacity(addrs.len());
    let (mut lead, mut other) = (lead.into_iter(), other.into_iter());
    loop {
        match (lead.next(), other.next()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
}

async fn dial_any(permit: &Permit, timeout: Duration, stagger: Duration) -> Result<(TcpStream, SocketAddr), UpstreamError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut waiting = interleaved(permit.addrs()).into_iter();
    let Some(first) = waiting.next() else { return Err(UpstreamError::ConnectTimeout) };
    let connected = |stream: TcpStream, addr| {
        let _ = stream.set_nodelay(true);
        Ok((stream, addr))
    };
    if waiting.len() == 0 {
        // One address: nothing to race, so no task and no timer but the deadline.
        return match tokio::time::timeout_at(deadline, TcpStream::connect(first)).await {
            Ok(Ok(stream)) => connected(stream, first),
            Ok(Err(e)) => Err(dial_failure(e)),
            Err(_) => Err(UpstreamError::ConnectTimeout),
        };
    }
    // Dropping the set aborts the attempts that lost the race. Attempts
    // start at once (a zero-length timer would wait for the timer wheel's
    // next millisecond tick), the next one after `stagger` or as soon as
    // an attempt fails.
    let mut attempts = tokio::task::JoinSet::new();
    let attempt = |addr: SocketAddr| async move { (addr, TcpStream::connect(addr).await) };
    attempts.spawn(attempt(first));
    let next_attempt = tokio::time::sleep(stagger);
    let expired = tokio::time::sleep_until(deadline);
    tokio::pin!(next_attempt, expired);
    loop {
        tokio::select! {
            () = &mut next_attempt, if waiting.len() > 0 => {
                if let Some(addr) = waiting.next() {
                    attempts.spawn(attempt(addr));
                }
                next_attempt.as_mut().reset(tokio::time::Instant::now() + stagger);
            }
            Some(joined) = attempts.join_next() => match joined {
                Ok((addr, Ok(stream))) => return connected(stream, addr),
                Ok((addr, Err(e))) => {
                    tracing::debug!(%addr, error = %e, "connect attempt failed");
                    match waiting.next() {
                        Some(next) => {
                            attempts.spawn(attempt(next));
                            next_attempt.as_mut().reset(tokio::time::Instant::now() + stagger);
                        }
                        // The last attempt's failure stands for all of them.
                        None if attempts.is_empty() => return Err(dial_failure(e)),
                        None => {}
                    }
                }
                Err(_) => {}
            },
            () = &mut expired => return Err(UpstreamError::ConnectTimeout),
        }
    }
}

/// A failed connect as the error a response reports.
fn dial_failure(e: io::Error) -> UpstreamError {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => UpstreamError::Refused,
        _ => UpstreamError::Unreachable(e),
    }
}

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
pub(super) async fn cut_short(registration: &Registration, lifetime: Option<Duration>) -> Outcome {
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
            let early = parts.read_buf.to_vec();
            let client = parts.io.into_inner().into_inner();
            serve_tunnel(client, early, upstream, check, idle, counts).await
        }
        Err(upgraded) => serve_tunnel(TokioIo::new(upgraded), Vec::new(), upstream, check, idle, counts).await,
    }
}

/// What a tunnel's first bytes are checked for before anything reaches the
/// upstream: the SNI check, and on a port of `http_ports` the plain HTTP
/// Host check (see [`tunnel_http`]).
struct StartCheck {
    target: Target,
    /// The client's role and the operator's line, in a plain-HTTP tunnel's deny answers.
    role: Arc<str>,
    deny_message: Option<String>,
    /// The first bytes are the head of a tunnel: they get the head's time limit.
    limit: Duration,
    max_head: usize,
    sni: bool,
    /// The role lets a ClientHello offering ECH through (on its outer name).
    allow_ech: bool,
    start: TunnelStart,
}

impl StartCheck {
    /// The checks a permit asks for; `None` when the tunnel may start with anything.
    fn of(permit: &Permit, target: &Target, role: Arc<str>, snapshot: &Snapshot) -> Option<Self> {
        let start = permit.tunnel_start();
        (permit.sni_check() || start != TunnelStart::Any).then(|| StartCheck {
            target: target.clone(),
            deny_message: snapshot.deny_messages.for_role(Some(&role)).map(str::to_string),
            allow_ech: snapshot.policy.role_id(&role).is_some_and(|r| snapshot.policy.role(r).allows_ech()),
            role,
            limit: snapshot.timeouts.request_header.0,
            max_head: snapshot.limits.max_request_head_bytes,
            sni: permit.sni_check(),
            start,
        })
    }

    /// How the tunnel goes on, with the bytes read so far; otherwise the
    /// reason, after telling the client why where it can understand it.
    async fn run<C>(&self, client: &mut C, early: Vec<u8>) -> Result<Started, DenyReason>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let host = self.target.host.to_string();
        if self.start == TunnelStart::Any {
            return check_sni(client, early, &host, self.allow_ech, self.limit).await.map(Started::Relay);
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
            _ if self.sni => check_sni(client, buf, &host, self.allow_ech, self.limit).await.map(Started::Relay),
            _ => Ok(Started::Relay(buf)),
        }
    }
}

/// How a tunnel goes on once its first bytes passed the checks.
enum Started {
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
            let limits = tunnel_http::Limits { header: check.limit, idle, max_head: check.max_head };
            let ends = tunnel_http::Ends { target: check.target, role: check.role, deny_message: check.deny_message };
            let (up, down) = tunnel_http::serve(client, first, upstream, ends, limits).await?;
            counts.add(up, down);
            Ok(())
        }
        Err(reason) => {
            let _ = upstream.shutdown().await;
            Err(Outcome::Deny(reason))
        }
    }
}

/// One end of a relay, the client's or the upstream's, that can be split
/// into independent halves.
pub trait RelayEnd: AsyncRead + AsyncWrite + Unpin + Send {
    type Read: AsyncRead + Unpin + Send + Half;
    type Write: AsyncWrite + Unpin + Send + Half;
    fn halves(self) -> (Self::Read, Self::Write);
}

/// One half of a relay: a TCP socket half can be spliced from or to.
pub trait Half {
    /// The socket under this half, when it is a plain TCP socket.
    fn socket(&self) -> Option<&TcpStream> {
        None
    }
}

impl Half for tokio::net::tcp::OwnedReadHalf {
    fn socket(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl Half for tokio::net::tcp::OwnedWriteHalf {
    fn socket(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl<T> Half for tokio::io::ReadHalf<T> {}
impl<T> Half for tokio::io::WriteHalf<T> {}

impl RelayEnd for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl RelayEnd for TokioIo<hyper::upgrade::Upgraded> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

impl RelayEnd for tokio::io::DuplexStream {
    type Read = tokio::io::ReadHalf<tokio::io::DuplexStream>;
    type Write = tokio::io::WriteHalf<tokio::io::DuplexStream>;
    fn halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

/// TLS to an `https://` parent: relayed by copying, and kept boxed (a TLS
/// session is kilobytes; unboxed it would be inline in the tunnel's future).
impl RelayEnd for Box<tokio_rustls::client::TlsStream<TcpStream>> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
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
    buf.reserve(4096);
    let parsed = tokio::time::timeout(limit, read_client_hello(client, &mut buf)).await;
    let refusal = match parsed {
        Ok(Ok(hello)) if hello.ech && !allow_ech => {
            tracing::debug!(sni = ?hello.name, connect = %host, "ClientHello offers Encrypted ClientHello");
            DenyReason::EchRefused
        }
        Ok(Ok(hello)) if hello.name.as_deref() == Some(host) => return Ok(buf),
        Ok(Ok(sni::Hello { name: None, .. })) => DenyReason::SniMissing,
        Ok(Ok(sni::Hello { name: Some(name), .. })) => {
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

async fn read_client_hello<C>(client: &mut C, buf: &mut Vec<u8>) -> Result<sni::Hello, SniError>
where
    C: AsyncRead + Unpin,
{
    let mut chunk = [0u8; 4096];
    loop {
        match sni::read_hello(buf) {
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

/// Sends `first` (bytes already read from the client) upstream, then relays.
pub(super) async fn relay_after<C, U>(client: C, mut upstream: U, first: Vec<u8>, idle: Duration, counts: &RelayCounts)
where
    C: RelayEnd,
    U: RelayEnd,
{
    if !first.is_empty() {
        match tokio::time::timeout(idle, upstream.write_all(&first)).await {
            Ok(Ok(())) => counts.sent.fetch_add(first.len() as u64, Ordering::Relaxed),
            _ => return,
        };
    }
    // The ClientHello buffer is not kept for the life of the tunnel.
    drop(first);
    relay_counted(client, upstream, idle, counts).await;
}

/// Bytes a tunnel has relayed so far, per direction. Each direction's copy
/// loop is the only writer of its counter; the tunnel's [`TunnelMeter`]
/// reads both every few seconds, so the shared metrics are not touched per read.
#[derive(Default)]
pub struct RelayCounts {
    sent: AtomicU64,
    received: AtomicU64,
}

impl RelayCounts {
    /// Adds bytes moved outside the copy loops (a tunnel served as HTTP).
    fn add(&self, up: u64, down: u64) {
        self.sent.fetch_add(up, Ordering::Relaxed);
        self.received.fetch_add(down, Ordering::Relaxed);
    }

    /// (client→upstream, upstream→client) bytes so far.
    pub fn get(&self) -> (u64, u64) {
        (self.sent.load(Ordering::Relaxed), self.received.load(Ordering::Relaxed))
    }
}

/// Adds an open tunnel's relayed bytes to the metrics: every
/// [`METER_EVERY`] what moved since the last time, and the rest at the end,
/// so the totals match the log line's and nothing is counted twice.
struct TunnelMeter {
    bytes: RelayedBytes,
    counted: (u64, u64),
}

impl TunnelMeter {
    fn new(bytes: RelayedBytes) -> Self {
        TunnelMeter { bytes, counted: (0, 0) }
    }

    /// Adds the difference between (`up`, `down`) and what was counted.
    fn flush(&mut self, up: u64, down: u64) {
        self.bytes.add(up - self.counted.0, down - self.counted.1);
        self.counted = (up, down);
    }

    /// Flushes `counts` every [`METER_EVERY`]; never completes.
    async fn run(&mut self, counts: &RelayCounts) -> std::convert::Infallible {
        loop {
            tokio::time::sleep(METER_EVERY).await;
            let (up, down) = counts.get();
            self.flush(up, down);
        }
    }
}

/// Copies both directions until each has seen EOF (propagating half-close)
/// or no byte has moved for `idle`. Returns (client→upstream, upstream→client) bytes.
pub async fn relay<C, U>(client: C, upstream: U, idle: Duration) -> (u64, u64)
where
    C: RelayEnd,
    U: RelayEnd,
{
    let counts = RelayCounts::default();
    relay_counted(client, upstream, idle, &counts).await;
    counts.get()
}

/// [`relay`], counting into `counts` as bytes move, so they can be read
/// while the relay runs.
pub async fn relay_counted<C, U>(client: C, upstream: U, idle: Duration, counts: &RelayCounts)
where
    C: RelayEnd,
    U: RelayEnd,
{
    let (mut client_read, mut client_write) = client.halves();
    let (mut up_read, mut up_write) = upstream.halves();
    let activity = Activity::new();
    let both = async {
        tokio::join!(
            copy_half(&mut client_read, &mut up_write, &counts.sent, &activity),
            copy_half(&mut up_read, &mut client_write, &counts.received, &activity),
        )
    };
    tokio::select! {
        _ = both => {}
        _ = activity.idle_for(idle) => tracing::debug!("tunnel idle timeout"),
    }
}

async fn copy_half<R, W>(reader: &mut R, writer: &mut W, count: &AtomicU64, activity: &Activity)
where
    R: AsyncRead + Unpin + Half,
    W: AsyncWrite + Unpin + Half,
{
    let mut buf = vec![0u8; RELAY_BUF_START];
    loop {
        let n = match read_or_shrink(reader, &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        activity.touch();
        if writer.write_all(&buf[..n]).await.is_err() {
            return;
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        if n == buf.len() {
            if buf.len() < RELAY_BUF_MAX {
                buf.resize(buf.len() * 2, 0);
            } else if let Some(done) = splice_rest(reader.socket().zip(writer.socket()), &mut buf, count, activity).await {
                // A bulk transfer between two sockets: the rest moved in the
                // kernel. `done` says whether it ended at the end of stream.
                if !done {
                    return;
                }
                break;
            }
        }
    }
    // EOF from this side: pass the half-close on so the peer sees it while
    // the other direction keeps flowing.
    let _ = writer.shutdown().await;
}

/// Reads into `buf`; a grown buffer that waits longer than [`RELAY_QUIET`]
/// for data is replaced by a start-sized one first (reads are cancel-safe:
/// nothing is lost by giving up the first wait).
async fn read_or_shrink<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.len() > RELAY_BUF_START {
        if let Ok(read) = tokio::time::timeout(RELAY_QUIET, reader.read(buf)).await {
            return read;
        }
        *buf = vec![0u8; RELAY_BUF_START];
    }
    reader.read(buf).await
}

/// Relays the rest of a bulk transfer with `splice(2)` when both halves are
/// TCP sockets (Linux only). `None` when it cannot (another kind of stream,
/// no file descriptor left for the pipe): the caller goes on copying.
/// Otherwise `Some(true)` at the end of stream, `Some(false)` on an error;
/// the user-space buffer `buf` is freed once splicing starts, so a bulk
/// transfer does not keep 128 KiB per direction it no longer uses.
#[cfg(target_os = "linux")]
async fn splice_rest(
    sockets: Option<(&TcpStream, &TcpStream)>,
    buf: &mut Vec<u8>,
    count: &AtomicU64,
    activity: &Activity,
) -> Option<bool> {
    let (from, to) = sockets?;
    let pipe = super::splice::Pipe::new().ok()?;
    *buf = Vec::new();
    loop {
        match super::splice::move_chunk(from, to, &pipe).await {
            Ok(0) => return Some(true),
            Ok(n) => {
                activity.touch();
                count.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => return Some(false),
        }
    }
}

#[cfg(not(target_os = "linux"))]
async fn splice_rest(_: Option<(&TcpStream, &TcpStream)>, _: &mut Vec<u8>, _: &AtomicU64, _: &Activity) -> Option<bool> {
    None
}

/// The time of the last byte moved, shared by both directions of a tunnel.
pub(super) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Self {
        Activity { start: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    pub(super) fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Completes once nothing has moved for `idle`.
    pub(super) async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let due = last + idle;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due.into()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A client that shuts its write side still gets the whole answer.
    #[tokio::test]
    async fn half_close_propagates() {
        let origin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin_addr = origin.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = origin.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(format!("got {} bytes", got.len()).as_bytes()).await.unwrap();
        });
        let (client, proxy_side) = tokio::io::duplex(1024);
        let upstream = TcpStream::connect(origin_addr).await.unwrap();
        let relay = tokio::spawn(relay(proxy_side, upstream, Duration::from_secs(5)));
        let (mut r, mut w) = tokio::io::split(client);
        w.write_all(b"hello").await.unwrap();
        w.shutdown().await.unwrap();
        let mut answer = String::new();
        r.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer, "got 5 bytes");
        assert_eq!(relay.await.unwrap(), (5, 11));
    }

    /// A grown relay buffer that waits past the quiet time is replaced by
    /// a start-sized one; data that arrives in time is read into the big one.
    #[tokio::test]
    async fn grown_buffers_shrink_when_quiet() {
        let (mut writer, mut reader) = tokio::io::duplex(64 * 1024);
        let mut buf = vec![0u8; RELAY_BUF_MAX];
        writer.write_all(b"now").await.unwrap();
        assert_eq!(read_or_shrink(&mut reader, &mut buf).await.unwrap(), 3);
        assert_eq!(buf.len(), RELAY_BUF_MAX, "busy: kept");
        let late = tokio::spawn(async move {
            tokio::time::sleep(RELAY_QUIET * 2).await;
            writer.write_all(b"later").await.unwrap();
            writer
        });
        assert_eq!(read_or_shrink(&mut reader, &mut buf).await.unwrap(), 5);
        assert_eq!(&buf[..5], b"later", "nothing lost across the shrink");
        assert_eq!(buf.len(), RELAY_BUF_START, "quiet: shrunk");
        drop(late.await.unwrap());
    }

    #[test]
    fn addresses_are_interleaved_by_family() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let input = [a("[2001:db8::1]:1"), a("[2001:db8::2]:1"), a("192.0.2.1:1"), a("[2001:db8::3]:1"), a("192.0.2.2:1")];
        let want = [a("[2001:db8::1]:1"), a("192.0.2.1:1"), a("[2001:db8::2]:1"), a("192.0.2.2:1"), a("[2001:db8::3]:1")];
        assert_eq!(interleaved(&input), want);
        let v4_first = [a("192.0.2.1:1"), a("[2001:db8::1]:1"), a("[2001:db8::2]:1")];
        assert_eq!(interleaved(&v4_first), [a("192.0.2.1:1"), a("[2001:db8::1]:1"), a("[2001:db8::2]:1")]);
        assert!(interleaved(&[]).is_empty());
    }

    /// Each flush adds only what moved since the last one, so the periodic
    /// flushes and the final one add up to the tunnel's totals.
    #[test]
    fn meter_adds_only_what_moved_since_the_last_flush() {
        let metrics = Metrics::new();
        let mut meter = TunnelMeter::new(metrics.relayed_bytes_for("team-a"));
        let counted = |role: &str, direction: &str| {
            let all = metrics.relayed_bytes.with_label_values(&[direction]).get();
            let by_role = metrics.role_relayed_bytes.with_label_values(&[role, direction]).get();
            assert_eq!(all, by_role, "{direction}");
            all
        };
        for (up, down) in [(0, 0), (10, 0), (10, 5), (250, 5), (250, 5), (1 << 40, 7)] {
            meter.flush(up, down);
            assert_eq!((counted("team-a", "client_to_upstream"), counted("team-a", "upstream_to_client")), (up, down));
        }
    }

    #[tokio::test]
    async fn idle_tunnel_is_closed() {
        let origin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin_addr = origin.local_addr().unwrap();
        let _keep = tokio::spawn(async move {
            let (s, _) = origin.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let (_client, proxy_side) = tokio::io::duplex(1024);
        let upstream = TcpStream::connect(origin_addr).await.unwrap();
        let started = Instant::now();
        let counts = tokio::time::timeout(Duration::from_secs(10), relay(proxy_side, upstream, Duration::from_millis(200)))
            .await
            .expect("idle timeout must end the relay");
        assert_eq!(counts, (0, 0));
        assert!(started.elapsed() >= Duration::from_millis(200));
    }
}
