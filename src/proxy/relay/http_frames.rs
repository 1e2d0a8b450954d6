//! The HTTP/1 framing a plain-HTTP tunnel needs and no more: request heads
//! parsed and checked as on the proxy port, the head forwarded without what
//! is meant for the proxy, response heads read for where their bodies end,
//! and chunked bodies followed chunk by chunk while their bytes move in bulk.

use std::io;
use std::sync::atomic::AtomicU64;

use http::{Request, Response, Version};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::copy::{Activity, Half, RELAY_BUF_MAX};
use super::feed::Feed;
use crate::policy::DenyReason;
use crate::proxy::body::ProxyBody;
use crate::proxy::entrance::framing::{body_framing, next_chunk_state, Chunk, Framing, Refusal};
use crate::target::Target;

/// hyper's limits on a request head, kept so a tunnel refuses what the
/// proxy port refuses (`MAX_URI_LEN` and the default header count).
const MAX_URI_LEN: usize = u16::MAX as usize - 1;
const MAX_HEADERS: usize = 100;
/// Response header lines read at most (hyper's client default).
const MAX_RESPONSE_HEADERS: usize = 100;

/// How a message's body is delimited (RFC 9112 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Body {
    Sized(u64),
    Chunked,
    /// Until the sender closes (a response without length).
    ToClose,
}

/// A request head that parsed: the request as the checks see it, how its
/// body is framed, and the head as it goes upstream.
pub(super) struct RequestHead {
    pub(super) request: Request<()>,
    /// Content-Length and Transfer-Encoding both (refused by `check_head`).
    pub(super) conflicting: bool,
    pub(super) body: Body,
    pub(super) forwarded: Vec<u8>,
    /// Bytes of the head in the client's stream.
    pub(super) len: usize,
    /// The response will have no body whatever it says (HEAD).
    pub(super) head_method: bool,
    /// The client asks to switch protocols (`Connection: upgrade`).
    pub(super) upgrade: bool,
}

/// Parses the request head at the start of `bytes`: `Ok(None)` while it is
/// incomplete, the refusal (and the status hyper would answer with) when
/// it cannot be served.
pub(super) fn parse_request(bytes: &[u8]) -> Result<Option<RequestHead>, Refusal> {
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(bytes, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadTooLarge),
        Err(_) => return Err(Refusal::MalformedRequest),
    };
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(Refusal::MalformedRequest);
    };
    if path.len() > MAX_URI_LEN {
        return Err(Refusal::UriTooLong);
    }
    let (body, conflicting) = match body_framing(&req) {
        Framing::Sized(n) => (Body::Sized(n), false),
        Framing::Chunked => (Body::Chunked, false),
        Framing::Conflicting => (Body::Sized(0), true),
        Framing::Refused => return Err(Refusal::MalformedRequest),
    };
    let request = as_request(&req, method, path, minor).ok_or(Refusal::MalformedRequest)?;
    let (forwarded, upgrade) = forwarded_head(&req, method, path, minor);
    Ok(Some(RequestHead { head_method: method == "HEAD", request, conflicting, body, forwarded, len, upgrade }))
}

/// The head as `http` types, for the checks every entrance runs.
fn as_request(req: &httparse::Request<'_, '_>, method: &str, path: &str, minor: u8) -> Option<Request<()>> {
    let mut builder = Request::builder()
        .method(http::Method::from_bytes(method.as_bytes()).ok()?)
        .uri(http::Uri::try_from(path).ok()?)
        .version(if minor == 0 { Version::HTTP_10 } else { Version::HTTP_11 });
    for h in req.headers.iter() {
        builder = builder.header(http::HeaderName::from_bytes(h.name.as_bytes()).ok()?, http::HeaderValue::from_bytes(h.value).ok()?);
    }
    builder.body(()).ok()
}

/// The head as it goes upstream (red team N8): without the client's proxy
/// credentials, `Proxy-Connection`, and `Connection` with the headers it
/// names; an upgrade the tunnel honours (a 101 goes on as a raw tunnel)
/// and a `close` keep their `Connection` token. Returns whether it asks
/// for an upgrade.
fn forwarded_head(req: &httparse::Request<'_, '_>, method: &str, path: &str, minor: u8) -> (Vec<u8>, bool) {
    let named: Vec<&[u8]> = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(|token| token.trim_ascii())
        .collect();
    let names = |token: &str| named.iter().any(|n| n.eq_ignore_ascii_case(token.as_bytes()));
    let upgrade = names("upgrade") && req.headers.iter().any(|h| h.name.eq_ignore_ascii_case("upgrade"));
    let close = names("close");
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(format!("{method} {path} HTTP/1.{minor}\r\n").as_bytes());
    for h in req.headers.iter() {
        let dropped = ["connection", "proxy-authorization", "proxy-connection"].iter().any(|n| h.name.eq_ignore_ascii_case(n))
            || (names(h.name) && !(upgrade && h.name.eq_ignore_ascii_case("upgrade")));
        if !dropped {
            out.extend_from_slice(h.name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(h.value);
            out.extend_from_slice(b"\r\n");
        }
    }
    match (upgrade, close) {
        (true, true) => out.extend_from_slice(b"Connection: upgrade, close\r\n"),
        (true, false) => out.extend_from_slice(b"Connection: upgrade\r\n"),
        (false, true) => out.extend_from_slice(b"Connection: close\r\n"),
        (false, false) => {}
    }
    out.extend_from_slice(b"\r\n");
    (out, upgrade)
}

/// Exactly one `Host`, naming the CONNECT host and port (the port defaults
/// to the CONNECT port, which is what a client that tunnels to it means);
/// an absolute-form target must name them too, since an origin obeys it
/// over `Host` (RFC 9112 3.2.2). A CONNECT inside the tunnel names nothing.
pub(super) fn names_target<B>(req: &Request<B>, target: &Target) -> Result<(), DenyReason> {
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

/// A response head: its status and how its body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ResponseHead {
    pub(super) status: u16,
    /// `None`: no body (1xx, 204, 304, an answer to HEAD).
    pub(super) body: Option<Body>,
    pub(super) len: usize,
}

/// Parses the response head at the start of `bytes` (an answer to a HEAD
/// request when `to_head`): `Ok(None)` while incomplete, `Err` when it is
/// not a response this tunnel can frame.
pub(super) fn parse_response(bytes: &[u8], to_head: bool) -> Result<Option<ResponseHead>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let status = resp.code.ok_or(())?;
    if (100..200).contains(&status) || status == 204 || status == 304 || to_head {
        return Ok(Some(ResponseHead { status, body: None, len }));
    }
    let mut length = None;
    let mut chunked = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("content-length") {
            // Digits only, as hyper reads it (`+5` is no length).
            let value = h.value.trim_ascii();
            if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                return Err(());
            }
            let n = std::str::from_utf8(value).ok().and_then(|v| v.parse::<u64>().ok()).ok_or(())?;
            if length.is_some_and(|prev| prev != n) {
                return Err(());
            }
            length = Some(n);
        }
    }
    let body = match (chunked, length) {
        (Some(true), _) => Body::Chunked,
        (Some(false), _) => Body::ToClose,
        (None, Some(n)) => Body::Sized(n),
        (None, None) => Body::ToClose,
    };
    Ok(Some(ResponseHead { status, body: Some(body), len }))
}

/// Why a body stopped short.
#[derive(Debug)]
pub(super) enum BodyError {
    /// Its chunked framing broke (what hyper refuses, or framing bytes
    /// beyond `max_framing` between two chunks of data).
    Malformed,
    /// A stream ended or failed.
    Io,
}

impl From<io::Error> for BodyError {
    fn from(_: io::Error) -> Self {
        BodyError::Io
    }
}

/// Moves one body of `framing` from `feed` to `writer`, as bytes, in bulk.
pub(super) async fn pass_body<R, W>(
    feed: &mut Feed<R>,
    writer: &mut W,
    framing: Body,
    max_framing: usize,
    moved: &AtomicU64,
    activity: &Activity,
) -> Result<(), BodyError>
where
    R: AsyncRead + Unpin + Half,
    W: AsyncWrite + Unpin + Half,
{
    match framing {
        Body::Sized(n) => Ok(feed.pass(writer, n, moved, activity).await?),
        Body::Chunked => pass_chunked(feed, writer, max_framing, moved, activity).await,
        Body::ToClose => {
            feed.pass_to_end(writer, moved, activity).await;
            Ok(())
        }
    }
}

/// Moves a chunked body: the size lines, extensions and trailers are
/// stepped through byte by byte with the proxy port's own decoder (so both
/// find the same end), the chunks' data is skipped over in bulk, and
/// everything is written on as it was read.
async fn pass_chunked<R, W>(feed: &mut Feed<R>, writer: &mut W, max_framing: usize, moved: &AtomicU64, activity: &Activity) -> Result<(), BodyError>
where
    R: AsyncRead + Unpin + Half,
    W: AsyncWrite + Unpin + Half,
{
    let mut state = Chunk::Start;
    let mut framing = 0usize;
    loop {
        let bytes = feed.buffered();
        let mut scanned = 0;
        let mut done = false;
        while scanned < bytes.len() && !done {
            if let Chunk::Data(left) = state {
                let k = usize::try_from(left).map_or(bytes.len() - scanned, |l| l.min(bytes.len() - scanned));
                scanned += k;
                state = if left == k as u64 { Chunk::DataCr } else { Chunk::Data(left - k as u64) };
                framing = 0;
                continue;
            }
            match next_chunk_state(state, bytes[scanned]) {
                Some(Some(next)) => state = next,
                Some(None) => done = true,
                None => return Err(BodyError::Malformed),
            }
            scanned += 1;
            framing += 1;
            if framing > max_framing {
                return Err(BodyError::Malformed);
            }
        }
        if scanned > 0 {
            writer.write_all(&bytes[..scanned]).await?;
            feed.consume(scanned);
            moved.fetch_add(scanned as u64, std::sync::atomic::Ordering::Relaxed);
            activity.touch();
        }
        if done {
            return Ok(());
        }
        if let Chunk::Data(left) = state {
            // A large chunk with nothing buffered: moved like a sized body.
            if left >= RELAY_BUF_MAX as u64 {
                feed.pass(writer, left, moved, activity).await?;
                state = Chunk::DataCr;
                continue;
            }
        }
        if feed.fill(RELAY_BUF_MAX).await? == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
    }
}

/// A local answer written into the tunnel as HTTP/1.1 bytes: the status
/// line with the answer's reason phrase, its headers, its length and body.
pub(super) fn answer_bytes(resp: Response<ProxyBody>) -> Vec<u8> {
    let (parts, body) = resp.into_parts();
    let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>().map_or_else(
        || parts.status.canonical_reason().unwrap_or("").as_bytes().to_vec(),
        |phrase| phrase.as_bytes().to_vec(),
    );
    let body = match body {
        ProxyBody::Full(Some(bytes)) => bytes.to_vec(),
        _ => Vec::new(),
    };
    let mut out = format!("HTTP/1.1 {} ", parts.status.as_u16()).into_bytes();
    out.extend_from_slice(&reason);
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(head: &str) -> (String, bool) {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut headers);
        req.parse(head.as_bytes()).unwrap();
        let (method, path, minor) = (req.method.unwrap(), req.path.unwrap(), req.version.unwrap());
        let (out, upgrade) = forwarded_head(&req, method, path, minor);
        (String::from_utf8(out).unwrap(), upgrade)
    }

    #[test]
    fn proxy_headers_are_stripped_and_upgrades_kept() {
        let cases = [
            (
                "GET / HTTP/1.1\r\nHost: a\r\nProxy-Authorization: Basic c2VjcmV0\r\nConnection: x-secret, keep-alive\r\nX-Secret: 1\r\nX-Kept: 1\r\n\r\n",
                "GET / HTTP/1.1\r\nHost: a\r\nX-Kept: 1\r\n\r\n",
                false,
            ),
            (
                "GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nProxy-Connection: keep-alive\r\n\r\n",
                "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
                true,
            ),
            ("GET / HTTP/1.1\r\nConnection: upgrade, x-hop\r\nX-Hop: 1\r\n\r\n", "GET / HTTP/1.1\r\n\r\n", false),
            ("GET / HTTP/1.0\r\nconnection: close\r\nX-A: 1\r\n\r\n", "GET / HTTP/1.0\r\nX-A: 1\r\nConnection: close\r\n\r\n", false),
        ];
        for (input, want, upgrade) in cases {
            assert_eq!(forwarded(input), (want.to_string(), upgrade), "{input:?}");
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

    #[test]
    fn request_heads_are_parsed_and_refused_as_hyper_would() {
        let ok = |s: &str| parse_request(s.as_bytes()).map(|h| h.map(|h| (h.body, h.conflicting, h.head_method, h.upgrade)));
        assert_eq!(ok("GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        assert_eq!(ok("\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"), Ok(Some((Body::Sized(0), false, false, false))));
        assert_eq!(ok("HEAD / HTTP/1.1\r\nHost: a\r\n\r\n"), Ok(Some((Body::Sized(0), false, true, false))));
        assert_eq!(ok("POST / HTTP/1.1\r\nContent-Length: 7\r\n\r\n"), Ok(Some((Body::Sized(7), false, false, false))));
        assert_eq!(ok("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"), Ok(Some((Body::Chunked, false, false, false))));
        assert_eq!(ok("POST / HTTP/1.1\r\nContent-Length: 7\r\nTransfer-Encoding: chunked\r\n\r\n").map(|h| h.map(|h| h.1)), Ok(Some(true)));
        assert_eq!(ok("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"), Err(Refusal::MalformedRequest));
        assert_eq!(ok("POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n"), Err(Refusal::MalformedRequest));
        assert_eq!(ok("GET /a b HTTP/1.1\r\n\r\n"), Err(Refusal::MalformedRequest));
        assert_eq!(ok(&format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_URI_LEN))), Err(Refusal::UriTooLong));
        let many: String = (0..MAX_HEADERS + 1).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(ok(&format!("GET / HTTP/1.1\r\n{many}\r\n")), Err(Refusal::HeadTooLarge));
    }

    #[test]
    fn response_bodies_end_where_rfc_9112_says() {
        let cases: [(&str, bool, Result<Option<Option<Body>>, ()>); 11] = [
            ("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false, Ok(Some(Some(Body::Sized(5))))),
            ("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true, Ok(Some(None))),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", false, Ok(Some(Some(Body::Chunked)))),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false, Ok(Some(Some(Body::ToClose)))),
            ("HTTP/1.0 200 OK\r\n\r\n", false, Ok(Some(Some(Body::ToClose)))),
            ("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", false, Ok(Some(None))),
            ("HTTP/1.1 100 Continue\r\n\r\n", false, Ok(Some(None))),
            ("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", false, Err(())),
            ("HTTP/1.1 200 OK\r\nContent-Length: 5", false, Ok(None)),
            ("SSH-2.0-x\r\n\r\n", false, Err(())),
            ("HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n", false, Err(())),
        ];
        for (head, to_head, want) in cases {
            assert_eq!(parse_response(head.as_bytes(), to_head).map(|r| r.map(|r| r.body)), want, "{head:?}");
        }
    }
}
