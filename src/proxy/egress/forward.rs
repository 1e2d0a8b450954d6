//! Plain HTTP forwarding: absolute-form in, origin-form out, hop-by-hop
//! headers removed (RFC 9110 7.6.1), bodies streamed both ways, and upstream
//! connections kept alive in a pool keyed by the checked address.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::future::Future;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::proxy::admit::Admitted;
use super::upload::{CountedBody, Upload};
use crate::proxy::body::ProxyBody;
use super::dial::dial;
use crate::proxy::error::{ClientError, ProxyError, UpstreamError};
use crate::refusal::Refusal;
use crate::proxy::loops::{self, OutboundGuard};
use crate::proxy::egress::parent::Parent;
use crate::proxy::egress::pool::{PoolKey, PoolLimits, Sender};
use super::response::{PoolReturn, UpstreamBody};
use crate::proxy::Shared;
use crate::snapshot::Snapshot;
use crate::access_log::AccessRecord;
use crate::policy::Permit;
use crate::target::Target;

/// Periodically expires idle upstream connections.
pub async fn reap_idle(shared: Arc<Shared>) {
    let period = (shared.pool.idle_timeout() / 2).max(Duration::from_millis(100));
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
    admitted: Admitted,
    target: &Target,
    req: Request<Incoming>,
    mut record: AccessRecord,
) -> Result<Response<ProxyBody>, ProxyError> {
    let role = snapshot.policy.role(admitted.role).shared_name();
    let permit = admitted.permit;
    let upload = Arc::new(Upload::default());
    let mut upstream_req = rewrite_request(req, target, upload.clone());
    let timeouts = &snapshot.timeouts;
    let parent = snapshot.parent.as_ref().filter(|p| p.applies(&role, target, &permit));
    if let Some(parent) = parent {
        for_parent(&mut upstream_req, &Parent::destination(&permit, target), parent);
    }
    // Connections to a parent are not pooled: they carry other targets.
    let pooled = if parent.is_some() { None } else { shared.pool.checkout(&role, permit.addrs()) };
    let pooled_ready = match pooled {
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
        None => connect(&permit, parent, snapshot, shared).await.map(|(s, a)| (s, a, false))?,
    };
    record.dialed = Some(addr);
    let response = loop {
        let sending = sender.try_send_request(upstream_req);
        match tokio::time::timeout(timeouts.upstream_response.0, sending).await {
            Err(_) => return Err(UpstreamError::ResponseTimeout.into()),
            Ok(Ok(response)) => break response,
            Ok(Err(e)) if upload.broken() => {
                tracing::debug!(error = %e.into_error(), "client request body broke off");
                return Err(ClientError::Refused(Refusal::MalformedBody).into());
            }
            Ok(Err(mut e)) => {
                // A pooled connection the origin closed while idle: the
                // request was not sent, so it is safe to send it on a new one.
                match (pooled, e.take_message()) {
                    (true, Some(req)) => {
                        upstream_req = req;
                        (sender, addr) = connect(&permit, parent, snapshot, shared).await?;
                        record.dialed = Some(addr);
                        pooled = false;
                    }
                    _ => return Err(UpstreamError::Protocol(e.into_error()).into()),
                }
            }
        }
    };
    if parent.is_some() && response.status() == http::StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        // Only the parent asks for proxy credentials: ours were refused.
        return Err(UpstreamError::ParentAuthFailed.into());
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.append(header::VIA, loops::via().clone());
    record.status = parts.status.as_u16();
    let limits = PoolLimits {
        max_total: snapshot.limits.max_idle_upstream,
        max_per_key: snapshot.limits.max_idle_upstream_per_destination,
    };
    let body = UpstreamBody {
        inner: body,
        return_to: parent.is_none().then(|| PoolReturn {
            shared: shared.clone(),
            key: PoolKey { role, addr },
            target: target.clone(),
            sender,
            limits,
        }),
        upload,
        received: 0,
        record,
    };
    Ok(Response::from_parts(parts, ProxyBody::Upstream(Box::new(body))))
}

/// A new upstream connection: to a permitted address, or to the parent.
async fn connect(
    permit: &Permit,
    parent: Option<&Parent>,
    snapshot: &Snapshot,
    shared: &Shared,
) -> Result<(Sender, SocketAddr), UpstreamError> {
    let (idle, max_head) = (snapshot.timeouts.tunnel_idle.0, snapshot.limits.max_response_head_bytes);
    let (sender, addr) = match parent {
        Some(parent) => {
            let (stream, addr) = parent.dial(snapshot.timeouts.upstream_connect.0).await?;
            let outbound = stream.local_addr().ok().map(|local| shared.outbound.register(local));
            (handshake(IdleStream::new(stream, idle, outbound), max_head).await?, addr)
        }
        None => {
            let (stream, addr) = dial(permit, &snapshot.timeouts, snapshot.upstream.mark(), &shared.metrics).await?;
            let outbound = stream.local_addr().ok().map(|local| shared.outbound.register(local));
            (handshake(IdleStream::new(stream, idle, outbound), max_head).await?, addr)
        }
    };
    Ok((sender, addr))
}

/// Starts HTTP/1 on a dialed connection. A response head larger than
/// `max_head` bytes fails the request (502) instead of growing the buffer.
async fn handshake<S>(stream: IdleStream<S>, max_head: usize) -> Result<Sender, UpstreamError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
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
struct IdleStream<S> {
    inner: S,
    /// Its entry among this process's upstream sockets, while it is open.
    _outbound: Option<OutboundGuard>,
    idle: Duration,
    last: tokio::time::Instant,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl<S> IdleStream<S> {
    fn new(inner: S, idle: Duration, outbound: Option<OutboundGuard>) -> Self {
        let now = tokio::time::Instant::now();
        IdleStream { inner, _outbound: outbound, idle, last: now, deadline: Box::pin(tokio::time::sleep_until(now + idle)) }
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

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for IdleStream<S> {
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

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for IdleStream<S> {
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
pub fn rewrite_request(req: Request<Incoming>, target: &Target, upload: Arc<Upload>) -> Request<CountedBody> {
    let (mut parts, body) = req.into_parts();
    parts.uri = origin_form(&parts.uri);
    parts.version = Version::HTTP_11;
    normalise_framing(&mut parts.headers);
    strip_hop_by_hop(&mut parts.headers);
    // The absolute-form URI wins over any Host header the client sent
    // (RFC 9112 3.2.2), so the origin sees the host the policy checked.
    let host = HeaderValue::try_from(target.host_header(80))
        .expect("a parsed target is a DNS name or an IP literal, both valid header text");
    parts.headers.insert(header::HOST, host);
    parts.headers.append(header::VIA, loops::via().clone());
    Request::from_parts(parts, CountedBody::new(body, upload))
}

/// The origin-form target (RFC 9112 3.2.1) of an absolute-form URI. A
/// path-less URI with a query (`http://host?q=1`) keeps its query: the
/// http crate yields `?q=1` for it, which needs the `/` in front.
fn origin_form(uri: &Uri) -> Uri {
    let Some(pq) = uri.path_and_query() else { return Uri::from_static("/") };
    let target = match pq.as_str() {
        with_path if with_path.starts_with('/') => Uri::try_from(with_path),
        query_only => Uri::try_from(format!("/{query_only}")),
    };
    // path_and_query of a parsed URI is valid origin-form once it starts with '/'.
    target.unwrap_or_else(|_| Uri::from_static("/"))
}

/// Turns an origin-form request into the absolute-form request a parent
/// proxy expects, naming `destination` (the checked address, or the name
/// when the parent resolves it; the `Host` header keeps the name), with the
/// parent's credentials.
fn for_parent(req: &mut Request<CountedBody>, destination: &str, parent: &Parent) {
    let path = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    if let Ok(uri) = Uri::try_from(format!("http://{destination}{path}")) {
        *req.uri_mut() = uri;
    }
    if let Some(auth) = parent.auth() {
        req.headers_mut().insert(header::PROXY_AUTHORIZATION, auth.clone());
    }
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
    // Names as constants: removing by `&str` would parse each name again
    // on every request.
    const FIXED: [HeaderName; 9] = [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        HeaderName::from_static("proxy-connection"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ];
    // One pass over the few names a message carries, comparing without
    // hashing: most messages carry none of these, and nine removals
    // would hash nine names on every request and every response.
    if !headers.keys().any(|name| FIXED.contains(name)) {
        return;
    }
    // Split the raw bytes: a value hyper accepted may hold obs-text, and
    // refusing the whole value would forward the names it lists.
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &FIXED {
        headers.remove(name);
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
    fn origin_form_keeps_path_and_query() {
        let cases = [
            ("http://a.test", "/"),
            ("http://a.test/", "/"),
            ("http://a.test?q=1", "/?q=1"),
            ("http://a.test:8080?q=1&r=%20", "/?q=1&r=%20"),
            ("http://a.test/p?q=1", "/p?q=1"),
            ("http://a.test//evil.test/x", "//evil.test/x"),
        ];
        for (absolute, want) in cases {
            let uri: Uri = absolute.parse().unwrap();
            assert_eq!(origin_form(&uri).to_string(), want, "{absolute}");
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
