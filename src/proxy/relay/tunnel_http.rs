//! Plain HTTP inside a CONNECT tunnel: the plain-text analogue of the SNI
//! check. Clients such as undici's `EnvHttpProxyAgent` tunnel `http://` URLs
//! with `CONNECT host:80`. A tunnel whose first bytes start an HTTP/1
//! request is served request by request: every request must name the CONNECT
//! host (in `Host` and in an absolute-form target) and is sent to the
//! already-dialed upstream; one that names another host gets
//! `403 host-mismatch` and the tunnel closes.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::body::ProxyBody;
use super::copy::{Activity, RelayEnd};
use crate::proxy::error::{ClientError, ProxyError, UpstreamError};
use crate::proxy::respond::Answer;
use crate::proxy::entrance::framing::{check_head, Entrance, WatchedIo, Wire};
use crate::access_log::Outcome;
use crate::policy::DenyReason;
use crate::target::Target;

/// Exactly one `Host`, naming the CONNECT host and port (the port defaults
/// to the CONNECT port, which is what a client that tunnels to it means);
/// an absolute-form target must name them too, since an origin obeys it
/// over `Host` (RFC 9112 3.2.2). A CONNECT inside the tunnel names nothing.
fn names_target<B>(req: &Request<B>, target: &Target) -> Result<(), DenyReason> {
    let names = |authority: &str| Target::parse_host_header(authority, target.port).is_ok_and(|t| t == *target);
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(h), None) => h.to_str().map_err(|_| DenyReason::HostMismatch)?,
        _ => return Err(DenyReason::HostMismatch),
    };
    if req.method() == http::Method::CONNECT || !names(host.trim()) {
        return Err(DenyReason::HostMismatch);
    }
    match req.uri().authority() {
        None => Ok(()),
        Some(authority) if names(authority.as_str()) => Ok(()),
        Some(_) => Err(DenyReason::HostMismatch),
    }
}

/// What a plain-HTTP tunnel connects: the CONNECT target every request
/// must name, and what its deny answers say besides (the client's role and
/// the operator's line for it).
#[derive(Debug, Clone)]
pub struct Ends {
    pub target: Target,
    pub role: Arc<str>,
    pub deny_message: Option<String>,
}

/// The bounds of a plain-HTTP tunnel.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// For each request head, and between requests (as on the proxy port).
    pub header: Duration,
    /// With no byte moving to or from the client (a stalled body).
    pub idle: Duration,
    /// Bytes of one request head, as `limits.max_request_head_bytes`.
    pub max_head: usize,
}

/// Serves a tunnel that started with plain HTTP: `early` (the bytes already
/// read) and the rest of `client` are parsed as HTTP/1 requests, each
/// framed as strictly as on the proxy port ([`check_head`]), checked
/// against `target` and sent to `upstream` without the client's proxy
/// credentials or the headers its `Connection` names. Returns the bytes
/// read from and written to the client, or how the tunnel ended: refused
/// as malformed, or `host-mismatch` once a request named another host.
pub async fn serve<C, U>(client: C, early: Vec<u8>, upstream: U, ends: Ends, limits: Limits) -> Result<(u64, u64), Outcome>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: RelayEnd + 'static,
{
    let Ok((sender, upstream_conn)) = hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await else {
        return Ok((0, 0));
    };
    let upstream_conn = tokio::spawn(upstream_conn.with_upgrades());
    let ended = Arc::new(OnceLock::new());
    let wire = Arc::new(Wire::default());
    let sender = Arc::new(tokio::sync::Mutex::new(sender));
    let (upgrade_tx, upgrade_rx) = tokio::sync::oneshot::channel();
    let upgrade_tx = Arc::new(std::sync::Mutex::new(Some(upgrade_tx)));
    let (service_ended, service_wire) = (ended.clone(), wire.clone());
    let service = hyper::service::service_fn(move |req| {
        let (sender, ends, ended, upgrade) = (sender.clone(), ends.clone(), service_ended.clone(), upgrade_tx.clone());
        let conflicting = service_wire.next_request_conflicting();
        async move { Ok::<_, std::convert::Infallible>(exchange(req, conflicting, &sender, &ends, &ended, &upgrade).await) }
    });
    let (read, written) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let activity = Arc::new(Activity::new());
    let counted = Counted { early, pos: 0, inner: client, read: read.clone(), written: written.clone(), activity: activity.clone() };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header)
        .max_buf_size(limits.max_head)
        .serve_connection(TokioIo::new(WatchedIo::new(counted, wire, limits.max_head)), service)
        .with_upgrades();
    tokio::select! {
        _ = conn => {}
        _ = activity.idle_for(limits.idle) => tracing::debug!("plain-HTTP tunnel idle timeout"),
    }
    if let Some(outcome) = ended.get() {
        upstream_conn.abort();
        return Err(*outcome);
    }
    // A 101 answer: both sides are handed over and relayed as a raw tunnel,
    // inside this future, so idle timeout, revocation and limits still apply.
    if let Ok(upgrade) = upgrade_rx.await {
        relay_upgraded::<U>(upgrade, limits.idle).await;
    }
    upstream_conn.abort();
    // The client side of an upgrade still runs through `Counted`.
    Ok((read.load(Ordering::Relaxed), written.load(Ordering::Relaxed)))
}

type TunnelBody = Either<Incoming, ProxyBody>;

/// Both halves of a connection that switched protocols (101).
type Upgrade = (hyper::upgrade::OnUpgrade, hyper::upgrade::OnUpgrade);

/// Where the one upgrade a connection can make is handed to [`serve`].
type UpgradeSlot = std::sync::Mutex<Option<tokio::sync::oneshot::Sender<Upgrade>>>;

/// Relays an upgraded connection: the upstream is the dialed stream `U`
/// again, and whatever the origin sent behind its 101 goes first.
async fn relay_upgraded<U: RelayEnd + 'static>((client, upstream): Upgrade, idle: Duration) {
    use tokio::io::AsyncWriteExt;
    let (Ok(client), Ok(upstream)) = (client.await, upstream.await) else { return };
    let Ok(parts) = upstream.downcast::<TokioIo<U>>() else { return };
    let mut client = TokioIo::new(client);
    if client.write_all(&parts.read_buf).await.is_ok() {
        super::copy::relay(client, parts.io.into_inner(), idle).await;
    }
}

/// One request of a plain-HTTP tunnel: checked, sent upstream, and its
/// response passed back; an upgrade (101) is relayed as a raw tunnel.
async fn exchange(
    mut req: Request<Incoming>,
    conflicting_framing: bool,
    sender: &tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Incoming>>,
    ends: &Ends,
    ended: &OnceLock<Outcome>,
    upgrade: &UpgradeSlot,
) -> Response<TunnelBody> {
    let host = ends.target.host.to_string();
    let answer = Answer {
        target: Some((&host, ends.target.port)),
        role: Some(&ends.role),
        deny_message: ends.deny_message.as_deref(),
        denied_addr: None,
        json: crate::proxy::respond::accepts_json(req.headers().get(http::header::ACCEPT)),
        close: true,
    };
    if let Err(refusal) = check_head(&req, conflicting_framing, Entrance::Tunnel) {
        let _ = ended.set(Outcome::Refused(refusal));
        return ProxyError::from(ClientError::Refused(refusal)).to_response(&answer).map(Either::Right);
    }
    if let Err(reason) = names_target(&req, &ends.target) {
        let _ = ended.set(Outcome::Deny(reason));
        return ProxyError::Denied(reason).to_response(&answer).map(Either::Right);
    }
    strip_proxy_headers(req.headers_mut());
    let client_upgrade = hyper::upgrade::on(&mut req);
    let mut sender = sender.lock().await;
    let sent = match sender.ready().await {
        Ok(()) => sender.send_request(req).await,
        Err(e) => Err(e),
    };
    let mut resp = match sent {
        Ok(resp) => resp,
        Err(e) => return ProxyError::Upstream(UpstreamError::Protocol(e)).to_response(&answer).map(Either::Right),
    };
    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        if let Some(slot) = upgrade.lock().ok().and_then(|mut slot| slot.take()) {
            let _ = slot.send((client_upgrade, upstream_upgrade));
        }
    }
    resp.map(Either::Left)
}

/// Removes what is meant for this proxy, not the origin (red team N8):
/// the client's proxy credentials, `Proxy-Connection`, and `Connection`
/// with the headers it names, except an upgrade, which the tunnel honours
/// (a 101 is relayed as a raw tunnel): then `Connection: upgrade` stays.
fn strip_proxy_headers(headers: &mut http::HeaderMap) {
    use http::header;
    let named: Vec<http::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|name| http::HeaderName::from_bytes(name.trim_ascii()).ok())
        .collect();
    let upgrade = named.contains(&header::UPGRADE) && headers.contains_key(header::UPGRADE);
    for name in named.into_iter().filter(|name| *name != header::UPGRADE) {
        headers.remove(name);
    }
    headers.remove(header::CONNECTION);
    if upgrade {
        headers.insert(header::CONNECTION, http::HeaderValue::from_static("upgrade"));
    }
    headers.remove(header::PROXY_AUTHORIZATION);
    headers.remove(http::HeaderName::from_static("proxy-connection"));
}

/// The client side of a plain-HTTP tunnel: the bytes read before it was
/// recognised come first, and every byte either way is counted.
struct Counted<C> {
    early: Vec<u8>,
    pos: usize,
    inner: C,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
    activity: Arc<Activity>,
}

impl<C: AsyncRead + Unpin> AsyncRead for Counted<C> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.early.len() {
            let n = (this.early.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.early[this.pos..this.pos + n]);
            this.pos += n;
            this.read.fetch_add(n as u64, Ordering::Relaxed);
            if this.pos == this.early.len() {
                this.early = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.activity.touch();
            this.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<C: AsyncWrite + Unpin> AsyncWrite for Counted<C> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &polled {
            this.activity.touch();
            this.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_headers_are_stripped_and_upgrades_kept() {
        type Case = (&'static [(&'static str, &'static str)], &'static [&'static str]);
        let cases: [Case; 3] = [
            (
                &[("proxy-authorization", "Basic c2VjcmV0"), ("connection", "x-secret, keep-alive"), ("x-secret", "1"), ("x-kept", "1")],
                &["x-kept"],
            ),
            (&[("connection", "Upgrade"), ("upgrade", "websocket"), ("proxy-connection", "keep-alive")], &["connection", "upgrade"]),
            (&[("connection", "upgrade, x-hop"), ("x-hop", "1")], &[]),
        ];
        for (input, left) in cases {
            let mut headers = http::HeaderMap::new();
            for (name, value) in input {
                headers.append(*name, http::HeaderValue::from_static(value));
            }
            strip_proxy_headers(&mut headers);
            let mut names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
            names.sort_unstable();
            assert_eq!(names, *left, "{input:?}");
        }
    }

    #[test]
    fn requests_must_name_the_connect_target() {
        let target = Target::parse_authority("origin.test:80").unwrap();
        let ok = Ok(());
        let mismatch = Err(DenyReason::HostMismatch);
        for (method, uri, hosts, expected) in [
            ("GET", "/", &["origin.test"][..], ok),
            ("GET", "/a?b", &["ORIGIN.test:80"], ok),
            ("GET", "http://origin.test/", &["origin.test"], ok),
            ("OPTIONS", "*", &["origin.test"], ok),
            ("GET", "/", &["other.test"], mismatch),
            ("GET", "/", &["origin.test:8080"], mismatch),
            ("GET", "/", &["origin.test.evil"], mismatch),
            ("GET", "/", &["user@origin.test"], mismatch),
            ("GET", "/", &[], mismatch),
            ("GET", "/", &["origin.test", "other.test"], mismatch),
            ("GET", "http://other.test/", &["origin.test"], mismatch),
            ("CONNECT", "other.test:80", &["origin.test"], mismatch),
        ] {
            let mut req = Request::builder().method(method).uri(uri);
            for host in hosts {
                req = req.header(http::header::HOST, *host);
            }
            let req = req.body(()).unwrap();
            assert_eq!(names_target(&req, &target), expected, "{method} {uri} {hosts:?}");
        }
    }
}
