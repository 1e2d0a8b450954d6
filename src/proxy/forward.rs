//! Plain HTTP forwarding: absolute-form in, origin-form out, hop-by-hop
//! headers removed (RFC 9110 7.6.1), bodies streamed both ways, and upstream
//! connections kept alive in a pool keyed by the checked address.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::future::Future;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use super::body::{CountedBody, ProxyBody};
use super::connect::dial;
use super::error::{ProxyError, UpstreamError};
use super::{Shared, Snapshot};
use crate::access_log::AccessRecord;
use crate::metrics::Metrics;
use crate::policy::Permit;
use crate::target::Target;

/// Idle upstream connections kept per destination address: enough for a
/// few hundred concurrent clients of one busy API to keep reusing theirs
/// (at 32, 50 concurrent clients already forced new connections).
const MAX_IDLE_PER_ADDR: usize = 256;

/// The `Via` value this proxy adds (RFC 9110 7.6.3).
const VIA: &str = "1.1 portcullis";

type Sender = SendRequest<CountedBody>;

/// Idle keep-alive connections to origins, keyed by the address that was
/// checked and dialed (never by name, so a pooled connection can only be
/// reused for a request whose own decision permitted that same address).
pub struct UpstreamPool {
    idle: DashMap<SocketAddr, Vec<(Sender, Instant)>>,
    idle_timeout: Duration,
}

impl UpstreamPool {
    /// An empty pool whose connections expire after `idle_timeout`.
    pub fn new(idle_timeout: Duration) -> Self {
        UpstreamPool { idle: DashMap::new(), idle_timeout }
    }

    /// An open idle connection to one of `addrs`, if any. It may not have
    /// signalled readiness yet (see [`forward`]).
    fn checkout(&self, addrs: &[SocketAddr]) -> Option<(Sender, SocketAddr)> {
        for addr in addrs {
            let Some(mut entry) = self.idle.get_mut(addr) else { continue };
            while let Some((sender, since)) = entry.pop() {
                if since.elapsed() < self.idle_timeout && !sender.is_closed() {
                    return Some((sender, *addr));
                }
            }
        }
        None
    }

    /// Keeps a connection whose response has been read completely. Its
    /// connection task may not have marked it ready for the next request
    /// yet; only a closed one is dropped here.
    fn checkin(&self, addr: SocketAddr, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut entry = self.idle.entry(addr).or_default();
        if entry.len() < MAX_IDLE_PER_ADDR {
            entry.push((sender, Instant::now()));
        }
    }

    /// Drops expired and closed connections, and empty entries, so memory
    /// does not grow with the number of distinct destinations.
    fn reap(&self) {
        let timeout = self.idle_timeout;
        self.idle.retain(|_, conns| {
            conns.retain(|(sender, since)| since.elapsed() < timeout && !sender.is_closed());
            !conns.is_empty()
        });
    }

    /// Number of idle connections held (for tests and metrics).
    pub fn idle_count(&self) -> usize {
        self.idle.iter().map(|e| e.len()).sum()
    }
}

/// Periodically expires idle upstream connections.
pub async fn reap_idle(shared: Arc<Shared>) {
    let period = (shared.pool.idle_timeout / 2).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        shared.pool.reap();
    }
}

/// Forwards one absolute-form request to the permitted destination.
pub async fn forward(
    shared: &Arc<Shared>,
    snapshot: &Snapshot,
    permit: Permit,
    target: &Target,
    req: Request<Incoming>,
    mut record: AccessRecord,
) -> Result<Response<ProxyBody>, ProxyError> {
    let sent = Arc::new(AtomicU64::new(0));
    let mut upstream_req = rewrite_request(req, target, sent.clone());
    let timeouts = &snapshot.timeouts;
    let pooled_ready = match shared.pool.checkout(permit.addrs()) {
        // A pooled connection becomes ready as soon as its connection task
        // has finished the previous exchange; one that fails (the origin
        // closed it) or takes too long is replaced by a new connection.
        Some((mut sender, addr)) => match tokio::time::timeout(timeouts.upstream_connect.0, sender.ready()).await {
            Ok(Ok(())) => Some((sender, addr)),
            _ => None,
        },
        None => None,
    };
    let (mut sender, mut addr, mut pooled) = match pooled_ready {
        Some((sender, addr)) => (sender, addr, true),
        None => connect(&permit, snapshot, &shared.metrics).await.map(|(s, a)| (s, a, false))?,
    };
    record.dialed = Some(addr);
    let response = loop {
        let sending = sender.try_send_request(upstream_req);
        match tokio::time::timeout(timeouts.upstream_response.0, sending).await {
            Err(_) => return Err(UpstreamError::ResponseTimeout.into()),
            Ok(Ok(response)) => break response,
            Ok(Err(mut e)) => {
                // A pooled connection the origin closed while idle: the
                // request was not sent, so it is safe to send it on a new one.
                match (pooled, e.take_message()) {
                    (true, Some(req)) => {
                        upstream_req = req;
                        (sender, addr) = connect(&permit, snapshot, &shared.metrics).await?;
                        record.dialed = Some(addr);
                        pooled = false;
                    }
                    _ => return Err(UpstreamError::Protocol(e.into_error()).into()),
                }
            }
        }
    };
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.append(header::VIA, HeaderValue::from_static(VIA));
    record.status = parts.status.as_u16();
    let body = UpstreamBody {
        inner: body,
        return_to: Some((shared.clone(), addr, sender)),
        sent,
        received: 0,
        record,
    };
    Ok(Response::from_parts(parts, ProxyBody::Upstream(Box::new(body))))
}

async fn connect(permit: &Permit, snapshot: &Snapshot, metrics: &Metrics) -> Result<(Sender, SocketAddr), UpstreamError> {
    let (stream, addr) = dial(permit, snapshot.timeouts.upstream_connect.0, metrics).await?;
    let stream = IdleStream::new(stream, snapshot.timeouts.tunnel_idle.0);
    handshake(stream, snapshot.limits.max_response_head_bytes).await.map(|s| (s, addr))
}

/// Starts HTTP/1 on a dialed connection. A response head larger than
/// `max_head` bytes fails the request (502) instead of growing the buffer.
async fn handshake(stream: IdleStream, max_head: usize) -> Result<Sender, UpstreamError> {
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        // hyper refuses a buffer limit below 8 KiB.
        .max_buf_size(max_head.max(8192))
        .handshake(TokioIo::new(stream))
        .await
        .map_err(UpstreamError::Protocol)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// An upstream connection that fails with `TimedOut` once no byte has moved
/// either way for `idle`: a body that stalls mid-way (an origin that stops
/// sending, a client that stops uploading) ends both connections instead of
/// holding them forever. The same bound as an idle tunnel.
///
/// Moving bytes only records the time; the timer is moved when it fires
/// (to the last activity plus `idle`), so a busy connection does not touch
/// the runtime's timer wheel on every read and write.
struct IdleStream {
    inner: tokio::net::TcpStream,
    idle: Duration,
    last: tokio::time::Instant,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl IdleStream {
    fn new(inner: tokio::net::TcpStream, idle: Duration) -> Self {
        let now = tokio::time::Instant::now();
        IdleStream { inner, idle, last: now, deadline: Box::pin(tokio::time::sleep_until(now + idle)) }
    }

    fn touch(&mut self) {
        self.last = tokio::time::Instant::now();
    }

    /// `Pending` while time remains; the deadline's waker is registered.
    fn check(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        loop {
            if self.deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = self.last + self.idle;
            if tokio::time::Instant::now() >= due {
                return Poll::Ready(std::io::Error::new(std::io::ErrorKind::TimedOut, "upstream connection idle"));
            }
            // Bytes moved since the timer was set: wait for the rest.
            self.deadline.as_mut().reset(due);
        }
    }
}

impl tokio::io::AsyncRead for IdleStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.check(cx).map(Err),
        }
    }
}

impl tokio::io::AsyncWrite for IdleStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => {
                self.touch();
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.check(cx).map(Err),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Builds the origin-form request the upstream sees. Public for the
/// `request_head` fuzz target, which checks it on what hyper parses.
#[doc(hidden)]
pub fn rewrite_request(req: Request<Incoming>, target: &Target, sent: Arc<AtomicU64>) -> Request<CountedBody> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    // path_and_query of a parsed URI is always a valid origin-form target.
    parts.uri = Uri::try_from(path).unwrap_or_else(|_| Uri::from_static("/"));
    parts.version = Version::HTTP_11;
    normalise_framing(&mut parts.headers);
    strip_hop_by_hop(&mut parts.headers);
    // The absolute-form URI wins over any Host header the client sent
    // (RFC 9112 3.2.2), so the origin sees the host the policy checked.
    let host = HeaderValue::try_from(target.host_header(80))
        .expect("a parsed target is a DNS name or an IP literal, both valid header text");
    parts.headers.insert(header::HOST, host);
    parts.headers.append(header::VIA, HeaderValue::from_static(VIA));
    Request::from_parts(parts, CountedBody::new(body, sent))
}

/// Leaves at most one `Content-Length`, and none when the body was
/// chunked, so the origin frames the body exactly as this proxy did. hyper
/// already normalises what it parsed; this keeps the guarantee local.
fn normalise_framing(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // RFC 9112 6.3: Transfer-Encoding overrides Content-Length, and an
        // intermediary that forwards such a message MUST remove
        // Content-Length first (the classic CL.TE smuggling desync).
        headers.remove(header::CONTENT_LENGTH);
    } else if let Some(len) = headers.get(header::CONTENT_LENGTH).cloned() {
        // hyper accepted repeated Content-Length only with identical values.
        headers.insert(header::CONTENT_LENGTH, len);
    }
}

/// Removes the headers that describe one hop only: those named in
/// `Connection`, and the fixed list of RFC 9110 7.6.1 and RFC 9112 plus the
/// proxy credentials, which are never forwarded.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Split the raw bytes: a value hyper accepted may hold obs-text, and
    // refusing the whole value would forward the names it lists.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    const FIXED: [&str; 9] = [
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ];
    for name in FIXED {
        headers.remove(name);
    }
}

/// An upstream response body on its way to the client. When it ends, the
/// upstream connection goes back to the pool; when it is dropped (ended or
/// abandoned), the request's log line is written.
pub struct UpstreamBody {
    inner: Incoming,
    return_to: Option<(Arc<Shared>, SocketAddr, Sender)>,
    sent: Arc<AtomicU64>,
    received: u64,
    record: AccessRecord,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.received += data.len() as u64;
            }
        }
        // hyper stops polling once `is_end_stream` is true (a body with a
        // known length), so the end is detected here, not only at `None`.
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.release();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl UpstreamBody {
    /// Returns the upstream connection to the pool; called once the whole
    /// response has been read, so the connection is ready for another request.
    fn release(&mut self) {
        if let Some((shared, addr, sender)) = self.return_to.take() {
            shared.pool.checkin(addr, sender);
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // An empty body (204, 304, HEAD) may never be polled at all.
        if self.inner.is_end_stream() {
            self.release();
        }
        self.record.bytes_in = self.sent.load(Ordering::Relaxed);
        self.record.bytes_out = self.received;
        self.record.emit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_is_normalised() {
        type Case = (&'static [(&'static str, &'static str)], &'static [&'static str]);
        let cases: [Case; 4] = [
            (&[("content-length", "5"), ("transfer-encoding", "chunked")], &[]),
            (&[("content-length", "5"), ("content-length", "5")], &["5"]),
            (&[("content-length", "7")], &["7"]),
            (&[("transfer-encoding", "chunked")], &[]),
        ];
        for (input, want) in cases {
            let mut h = HeaderMap::new();
            for (k, v) in input {
                h.append(*k, HeaderValue::from_static(v));
            }
            normalise_framing(&mut h);
            let got: Vec<&str> = h.get_all(header::CONTENT_LENGTH).iter().map(|v| v.to_str().unwrap()).collect();
            assert_eq!(got, *want, "{input:?}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, X-Secret-Hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-end-to-end", "kept"),
            ("content-length", "10"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "x-end-to-end"]);
    }

    /// A `Connection` value with a non-ASCII byte (obs-text, which hyper
    /// accepts) still names its other headers (fuzz request_head,
    /// crash-c34b0dc5).
    #[test]
    fn connection_with_obs_text_still_names_headers() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_bytes(b"x-secret, \xe9").unwrap());
        h.append(header::CONNECTION, HeaderValue::from_bytes(b"\xff\t,X-Other ,").unwrap());
        h.append("x-secret", HeaderValue::from_static("1"));
        h.append("x-other", HeaderValue::from_static("1"));
        h.append("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }
}
