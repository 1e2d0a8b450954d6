//! The forwarding path on arbitrary client bytes: hyper's HTTP/1 server
//! parses them on an in-memory stream, every absolute-form request it
//! accepts goes through the real `rewrite_request`, and hyper's client
//! writes the result to an in-memory origin. An oracle written apart from
//! `src/proxy/forward.rs` then reads the origin's bytes:
//!
//! - exactly one request, origin-form, HTTP/1.1;
//! - at most one framing header (`Content-Length` or `Transfer-Encoding`),
//!   and no byte after the message it frames (no smuggled second request);
//! - no hop-by-hop header, and none the client's `Connection` named;
//! - exactly one `Host`, equal to the authority of the request target.
#![no_main]

use std::cell::RefCell;
use std::convert::Infallible;
use portcullis::proxy::body::Upload;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use portcullis::proxy::forward::rewrite_request;
use portcullis::target::Target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Headers that describe one hop (RFC 9110 7.6.1, RFC 9112 7.1 and 9.6)
/// and the proxy's own credentials: never on the origin's side.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "transfer-encoding",
];

/// Virtual time with no progress after which a side is taken to be done.
const IDLE: Duration = Duration::from_secs(1);

thread_local! {
    static RUNTIME: RefCell<tokio::runtime::Runtime> = RefCell::new(
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a current-thread runtime builds"),
    );
}

fuzz_target!(|data: &[u8]| {
    RUNTIME.with(|rt| rt.borrow().block_on(serve(data.to_vec())));
});

/// Serves the bytes as one client connection, the way the proxy does.
async fn serve(data: Vec<u8>) {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let service = hyper::service::service_fn(|req| async move { Ok::<_, Infallible>(forward(req).await) });
    let conn = hyper::server::conn::http1::Builder::new()
        .max_buf_size(64 * 1024)
        .keep_alive(true)
        .serve_connection(TokioIo::new(server), service);
    let drive_client = async move {
        // Responses are drained while writing, or a full pipe stalls both sides.
        let (mut rd, mut wr) = tokio::io::split(&mut client);
        let write = async {
            let _ = wr.write_all(&data).await;
            let _ = wr.shutdown().await;
        };
        let read = async {
            let mut sink = Vec::new();
            let _ = rd.read_to_end(&mut sink).await;
        };
        tokio::join!(write, read);
    };
    let both = async { tokio::join!(conn, drive_client) };
    let _ = tokio::time::timeout(Duration::from_secs(3600), both).await;
}

/// What the proxy does with one parsed request, checked at the origin.
async fn forward(req: Request<Incoming>) -> Response<Empty<Bytes>> {
    let answer = |status: u16| Response::builder().status(status).body(Empty::new()).expect("a valid status");
    if req.method() == http::Method::CONNECT || req.uri().authority().is_none() {
        return answer(400);
    }
    let Ok(target) = Target::parse_absolute(req.uri()) else { return answer(400) };
    let authority = req.uri().authority().expect("checked above").as_str().to_string();
    let named = connection_tokens(req.headers().get_all(http::header::CONNECTION).iter().map(|v| v.as_bytes()));
    let rewritten = rewrite_request(req, &target, Arc::new(Upload::default()));
    for name in &named {
        // The proxy sets its own Host and Via after stripping.
        if name != "host" && name != "via" {
            assert!(!rewritten.headers().contains_key(name.as_str()), "{name:?} named in Connection survived");
        }
    }
    let wire = send_to_origin(rewritten).await;
    if !wire.is_empty() {
        check_origin_bytes(&wire, &expected_host(&authority), &named);
    }
    answer(200)
}

/// Sends the request with hyper's client and returns every byte the origin
/// received before the client side went idle or closed.
async fn send_to_origin(req: Request<portcullis::proxy::body::CountedBody>) -> Vec<u8> {
    let (near, mut origin) = tokio::io::duplex(1 << 16);
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(near)).await else {
        return Vec::new();
    };
    let send = async move {
        let _ = sender.send_request(req).await;
    };
    let receive = async move {
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        // No response is ever written: once nothing moves for IDLE of
        // virtual time, the client has sent all it will send.
        while let Ok(Ok(n @ 1..)) = tokio::time::timeout(IDLE, origin.read(&mut buf)).await {
            got.extend_from_slice(&buf[..n]);
        }
        got
    };
    let exchange = async { tokio::join!(conn, send) };
    tokio::pin!(receive, exchange);
    tokio::select! {
        got = &mut receive => got,
        // The client gave up (a cut-short body); what it sent still counts.
        _ = &mut exchange => receive.await,
    }
}

/// The tokens of `Connection` field values (RFC 9110 7.6.1, 5.6.1: a
/// comma-separated list with optional whitespace), lower-cased. Read from
/// the raw bytes, whatever their encoding.
fn connection_tokens<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<String> {
    let mut tokens = Vec::new();
    for value in values {
        for item in value.split(|&b| b == b',') {
            let item = item.trim_ascii();
            if !item.is_empty() && item.iter().all(|&b| is_tchar(b)) {
                tokens.push(String::from_utf8_lossy(item).to_ascii_lowercase());
            }
        }
    }
    tokens
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The Host an origin must see for an absolute-form `http` URI with this
/// authority: the host lower-cased without a trailing dot (IPv6 in its
/// canonical text), and the port unless it is 80.
fn expected_host(authority: &str) -> String {
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => {
            let (addr, after) = rest.split_once(']').expect("an accepted IPv6 authority closes its bracket");
            let addr: std::net::Ipv6Addr = addr.parse().expect("an accepted IPv6 literal parses");
            (format!("[{addr}]"), after.strip_prefix(':'))
        }
        None => {
            let (host, port) = match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            };
            let host = host.to_ascii_lowercase();
            (host.strip_suffix('.').unwrap_or(&host).to_string(), port)
        }
    };
    let port: u16 = match port {
        None | Some("") => 80,
        Some(p) => p.parse().expect("an accepted port is a number"),
    };
    if port == 80 {
        host
    } else {
        format!("{host}:{port}")
    }
}

/// The oracle on the origin's side of the wire.
fn check_origin_bytes(wire: &[u8], host: &str, named: &[String]) {
    let Some(end) = wire.windows(4).position(|w| w == b"\r\n\r\n") else {
        panic!("the origin got no complete head: {:?}", String::from_utf8_lossy(wire));
    };
    // Field values may carry obs-text (RFC 9110 5.5), forwarded as is.
    let head = String::from_utf8_lossy(&wire[..end]);
    let body = &wire[end + 4..];
    let mut lines = head.split("\r\n");
    let request_line = lines.next().expect("split yields one item");
    let mut parts = request_line.split(' ');
    let (_method, path, version) = (parts.next(), parts.next().unwrap_or(""), parts.next());
    assert!(path.starts_with('/'), "not origin-form: {request_line:?}");
    assert_eq!(version, Some("HTTP/1.1"), "{request_line:?}");
    assert_eq!(parts.next(), None, "{request_line:?}");
    let mut hosts = Vec::new();
    let mut framing = Vec::new();
    for line in lines {
        let (name, value) = line.split_once(':').unwrap_or_else(|| panic!("header line without a colon: {line:?}"));
        let name = name.to_ascii_lowercase();
        let value = value.trim_matches([' ', '\t']);
        match name.as_str() {
            "host" => hosts.push(value.to_string()),
            "content-length" => framing.push((name.clone(), value.to_string())),
            "transfer-encoding" => {
                // Only hyper's client adds this, for a body of unknown length.
                assert_eq!(value, "chunked", "a forwarded Transfer-Encoding");
                framing.push((name.clone(), value.to_string()));
            }
            _ => {
                assert!(!HOP_BY_HOP.contains(&name.as_str()), "hop-by-hop {name:?} reached the origin");
                assert!(!named.contains(&name) || name == "via", "{name:?}, named in Connection, reached the origin");
            }
        }
    }
    assert_eq!(hosts, [host], "Host at the origin");
    assert!(framing.len() <= 1, "several framing headers: {framing:?}");
    match framing.first().map(|(n, v)| (n.as_str(), v.as_str())) {
        None => assert!(body.is_empty(), "{} bytes after a head without framing", body.len()),
        Some(("content-length", len)) => {
            let len: usize = len.parse().unwrap_or_else(|_| panic!("Content-Length {len:?}"));
            assert!(body.len() <= len, "{} bytes after a {len}-byte body", body.len() - len);
        }
        Some(_) => {
            let after = chunked_end(body);
            assert!(after.is_none_or(|at| at == body.len()), "bytes after the last chunk");
        }
    }
}

/// Where a chunked body (RFC 9112 7.1) ends, or `None` when it is cut short.
fn chunked_end(body: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let line_end = at + body[at..].windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&body[at..line_end]).expect("hyper writes hex chunk sizes");
        let size = usize::from_str_radix(line.split(';').next().unwrap_or(line), 16).expect("hyper writes hex chunk sizes");
        at = line_end + 2;
        if size == 0 {
            // Trailer section: hyper sends none here, so the final CRLF.
            return (body.len() >= at + 2).then(|| {
                assert_eq!(&body[at..at + 2], b"\r\n", "trailers after the last chunk");
                at + 2
            });
        }
        if body.len() < at + size + 2 {
            return None;
        }
        assert_eq!(&body[at + size..at + size + 2], b"\r\n", "chunk of {size} bytes not followed by CRLF");
        at += size + 2;
    }
}
