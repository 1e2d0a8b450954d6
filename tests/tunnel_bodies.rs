//! Bodies through tunnels, byte-exact, through the real binary: plain HTTP
//! inside a CONNECT tunnel (a port in both `connect_ports` and
//! `http_ports`) with large Content-Length and chunked bodies both ways,
//! pipelined requests, a refusal after pipelined answers, and a gibibyte;
//! and the opaque tunnel both ways at once. Bytes follow a pattern with a
//! prime period, compared slice by slice, so a lost, repeated or shifted
//! piece anywhere shows.

mod common;

use std::net::SocketAddr;
use std::sync::OnceLock;

use common::*;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The pattern's period: a prime near 1 MiB, so no power-of-two chunking
/// lines up with it.
const PERIOD: usize = 1_048_573;

/// Two periods of the pattern, so any piece of up to one period starts
/// somewhere in the first and is one contiguous slice.
fn pattern_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let period: Vec<u8> = (0..PERIOD).map(|i| (i.wrapping_mul(7919) >> 3) as u8 ^ (i % 251) as u8).collect();
        [period.clone(), period].concat()
    })
}

/// The pattern from stream offset `at`, `len` bytes (at most one period).
fn piece(at: u64, len: usize) -> &'static [u8] {
    let start = (at % PERIOD as u64) as usize;
    &pattern_bytes()[start..start + len]
}

/// Writes `len` pattern bytes in pieces of at most `step`.
async fn write_pattern<W: AsyncWrite + Unpin>(w: &mut W, len: u64, step: usize) {
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(step.min(PERIOD) as u64) as usize;
        w.write_all(piece(at, n)).await.unwrap();
        at += n as u64;
    }
}

/// Reads exactly `len` bytes and checks each piece against the pattern
/// from offset `at`; returns the offset after them.
async fn expect_pattern<R: AsyncBufRead + Unpin>(r: &mut R, mut at: u64, len: u64, what: &str) -> u64 {
    let end = at + len;
    while at < end {
        let ready = tokio::time::timeout(STEP, r.fill_buf()).await.expect("bytes in time").unwrap();
        assert!(!ready.is_empty(), "{what}: the stream ended {} bytes early", end - at);
        let n = ready.len().min((end - at) as usize).min(PERIOD);
        assert!(ready[..n] == *piece(at, n), "{what}: bytes differ in {at}..{}", at + n as u64);
        r.consume(n);
        at += n as u64;
    }
    at
}

/// One head (request or response), as its lines.
async fn read_head<R: AsyncBufRead + Unpin>(r: &mut R) -> Option<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if tokio::time::timeout(STEP, r.read_line(&mut line)).await.expect("a head in time").unwrap() == 0 {
            return None;
        }
        let line = line.trim_end().to_string();
        if line.is_empty() {
            return Some(lines);
        }
        lines.push(line);
    }
}

fn header<'a>(head: &'a [String], name: &str) -> Option<&'a str> {
    head.iter().skip(1).find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()))
}

/// Reads a body framed as `head` says, checking it against the pattern.
/// Returns its length.
async fn expect_body<R: AsyncBufRead + Unpin>(r: &mut R, head: &[String], what: &str) -> u64 {
    if let Some(len) = header(head, "content-length") {
        let len: u64 = len.parse().unwrap();
        return expect_pattern(r, 0, len, what).await;
    }
    assert_eq!(header(head, "transfer-encoding"), Some("chunked"), "{what}: {head:?}");
    let mut at = 0u64;
    loop {
        let mut size = String::new();
        r.read_line(&mut size).await.unwrap();
        let size = u64::from_str_radix(size.trim_end().split(';').next().unwrap(), 16).unwrap();
        if size == 0 {
            while !read_head_line(r).await.is_empty() {}
            return at;
        }
        at = expect_pattern(r, at, size, what).await;
        assert!(read_head_line(r).await.is_empty(), "{what}: CRLF after a chunk");
    }
}

async fn read_head_line<R: AsyncBufRead + Unpin>(r: &mut R) -> String {
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    line.trim_end().to_string()
}

/// Writes a chunked body of pattern bytes in chunks of the sizes in
/// `chunks` (repeated until `len`), with a trailer.
async fn write_chunked<W: AsyncWrite + Unpin>(w: &mut W, len: u64, chunks: &[usize]) {
    let mut at = 0u64;
    for &size in chunks.iter().cycle() {
        if at == len {
            break;
        }
        let n = (len - at).min(size as u64);
        w.write_all(format!("{n:x}\r\n").as_bytes()).await.unwrap();
        write_pattern_from(w, at, n).await;
        w.write_all(b"\r\n").await.unwrap();
        at += n;
    }
    w.write_all(b"0\r\nX-Trailer: done\r\n\r\n").await.unwrap();
}

async fn write_pattern_from<W: AsyncWrite + Unpin>(w: &mut W, mut at: u64, len: u64) {
    let end = at + len;
    while at < end {
        let n = (end - at).min(PERIOD as u64) as usize;
        w.write_all(piece(at, n)).await.unwrap();
        at += n as u64;
    }
}

/// An HTTP/1.1 origin that checks and produces pattern bodies:
/// - `GET /length/N`: N bytes with Content-Length;
/// - `GET /chunked/N/S`: N bytes in chunks of S;
/// - `HEAD` of either: the head alone;
/// - `POST /check` (Content-Length or chunked): checks the body against the
///   pattern and answers `checked N` (or closes when it differs).
async fn start_pattern_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            tokio::spawn(serve_pattern(stream));
        }
    });
    addr
}

async fn serve_pattern(stream: TcpStream) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::with_capacity(1 << 20, r);
    while let Some(head) = read_head(&mut r).await {
        let mut words = head[0].split(' ');
        let (method, path) = (words.next().unwrap().to_string(), words.next().unwrap().to_string());
        let parts: Vec<&str> = path.split('/').collect();
        if method == "POST" {
            let n = expect_body(&mut r, &head, "origin").await;
            let text = format!("checked {n}");
            w.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}", text.len()).as_bytes()).await.unwrap();
            continue;
        }
        let len: u64 = parts[2].parse().unwrap();
        let head_only = method == "HEAD";
        match parts[1] {
            "length" => {
                w.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n").as_bytes()).await.unwrap();
                if !head_only {
                    write_pattern(&mut w, len, 256 * 1024).await;
                }
            }
            _ => {
                w.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").await.unwrap();
                if !head_only {
                    write_chunked(&mut w, len, &[parts[3].parse().unwrap()]).await;
                }
            }
        }
    }
}

/// The binary with a policy where `http_port` carries plain HTTP inside
/// tunnels and `opaque_port` only opaque ones.
async fn proxy(name: &str, http_port: u16, opaque_port: u16) -> BinaryProxy {
    let path = std::env::temp_dir().join(format!("portcullis-tunnel-bodies-{name}-{}.yaml", std::process::id()));
    BinaryProxy::spawn(
        &path,
        &format!(
            "allow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    allow:\n      cidrs: [127.0.0.1/32]\n      \
             connect_ports: [{http_port}, {opaque_port}]\n      http_ports: [{http_port}]\n"
        ),
    )
    .await
}

/// A tunnel to `origin`, split into a buffered reader and a writer.
async fn tunnel(proxy: SocketAddr, origin: SocketAddr) -> (BufReader<tokio::net::tcp::OwnedReadHalf>, tokio::net::tcp::OwnedWriteHalf) {
    let (resp, stream) = connect(proxy, &origin.to_string()).await;
    assert_eq!(resp.status, 200);
    let (r, w) = stream.into_split();
    (BufReader::with_capacity(1 << 20, r), w)
}

fn status(head: &[String]) -> u16 {
    head[0].split(' ').nth(1).unwrap().parse().unwrap()
}

/// Content-Length bodies of every size class (empty, tiny, one buffer,
/// beyond the splice threshold) both ways through one tunnel.
#[tokio::test]
async fn sized_bodies_cross_an_http_tunnel_byte_exact_both_ways() {
    let origin = start_pattern_origin().await;
    let proxy = proxy("sized", origin.port(), 1).await;
    let (mut r, mut w) = tunnel(proxy.addr, origin).await;
    for len in [0u64, 1, 1000, 65_536, 300_001, 8 << 20] {
        w.write_all(format!("GET /length/{len} HTTP/1.1\r\nHost: {origin}\r\n\r\n").as_bytes()).await.unwrap();
        let head = read_head(&mut r).await.expect("a response");
        assert_eq!((status(&head), expect_body(&mut r, &head, "download").await), (200, len));
        w.write_all(format!("POST /check HTTP/1.1\r\nHost: {origin}\r\nContent-Length: {len}\r\n\r\n").as_bytes()).await.unwrap();
        write_pattern(&mut w, len, 100_000).await;
        let head = read_head(&mut r).await.expect("a response");
        let mut text = String::new();
        (&mut r).take(header(&head, "content-length").unwrap().parse().unwrap()).read_to_string(&mut text).await.unwrap();
        assert_eq!(text, format!("checked {len}"), "upload of {len}");
    }
}

/// Chunked bodies both ways, with chunks from 1 byte to beyond the splice
/// threshold, extensions-free and with a trailer; the tunnel goes on after each.
#[tokio::test]
async fn chunked_bodies_cross_an_http_tunnel_byte_exact_both_ways() {
    let origin = start_pattern_origin().await;
    let proxy = proxy("chunked", origin.port(), 1).await;
    let (mut r, mut w) = tunnel(proxy.addr, origin).await;
    for (len, chunk) in [(10u64, 1usize), (100_000, 4096), (3 << 20, 200_000), (5 << 20, 1 << 20)] {
        w.write_all(format!("GET /chunked/{len}/{chunk} HTTP/1.1\r\nHost: {origin}\r\n\r\n").as_bytes()).await.unwrap();
        let head = read_head(&mut r).await.expect("a response");
        assert_eq!((status(&head), expect_body(&mut r, &head, "chunked download").await), (200, len));
        w.write_all(format!("POST /check HTTP/1.1\r\nHost: {origin}\r\nTransfer-Encoding: chunked\r\n\r\n").as_bytes()).await.unwrap();
        write_chunked(&mut w, len, &[chunk, 7, chunk / 3 + 1]).await;
        let head = read_head(&mut r).await.expect("a response");
        let mut text = String::new();
        (&mut r).take(header(&head, "content-length").unwrap().parse().unwrap()).read_to_string(&mut text).await.unwrap();
        assert_eq!(text, format!("checked {len}"), "chunked upload of {len} in {chunk}");
    }
}

/// Requests written all at once are answered in order, bodies intact
/// (HEAD answered without one); a request naming another host behind them
/// gets its 403 only after the answers before it, and the tunnel closes.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order_then_a_mismatch_is_refused() {
    let origin = start_pattern_origin().await;
    let proxy = proxy("pipelined", origin.port(), 1).await;
    let (mut r, mut w) = tunnel(proxy.addr, origin).await;
    let host = origin.to_string();
    let mut batch = Vec::new();
    batch.extend_from_slice(format!("GET /length/500000 HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
    batch.extend_from_slice(format!("HEAD /length/77 HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
    batch.extend_from_slice(format!("POST /check HTTP/1.1\r\nHost: {host}\r\nContent-Length: 200000\r\n\r\n").as_bytes());
    batch.extend_from_slice(piece(0, 200_000));
    batch.extend_from_slice(format!("GET /chunked/300000/65536 HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
    batch.extend_from_slice(b"GET /length/5 HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n");
    batch.extend_from_slice(format!("GET /length/6 HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
    w.write_all(&batch).await.unwrap();

    let head = read_head(&mut r).await.unwrap();
    assert_eq!(expect_body(&mut r, &head, "first").await, 500_000);
    let head = read_head(&mut r).await.unwrap();
    assert_eq!((status(&head), header(&head, "content-length")), (200, Some("77")), "HEAD: no body follows");
    let head = read_head(&mut r).await.unwrap();
    let mut text = vec![0u8; "checked 200000".len()];
    r.read_exact(&mut text).await.unwrap();
    assert_eq!((status(&head), text.as_slice()), (200, &b"checked 200000"[..]));
    let head = read_head(&mut r).await.unwrap();
    assert_eq!(expect_body(&mut r, &head, "chunked").await, 300_000);
    let refused = read_head(&mut r).await.unwrap();
    assert_eq!(refused[0], "HTTP/1.1 403 Forbidden (portcullis: host-mismatch)");
    assert_eq!(header(&refused, "x-portcullis-deny"), Some("host-mismatch"));
    let mut rest = Vec::new();
    tokio::time::timeout(STEP, r.read_to_end(&mut rest)).await.expect("closed in time").unwrap();
    let body = String::from_utf8_lossy(&rest);
    assert!(body.starts_with("portcullis: host-mismatch") && !body.contains("HTTP/1.1"), "nothing after the refusal: {body}");
}

/// A gibibyte down an HTTP tunnel (Content-Length) and 256 MiB up it,
/// then the same tunnel still serves a request.
#[tokio::test]
async fn a_gibibyte_crosses_an_http_tunnel() {
    let origin = start_pattern_origin().await;
    let proxy = proxy("gibibyte", origin.port(), 1).await;
    let (mut r, mut w) = tunnel(proxy.addr, origin).await;
    let len = 1u64 << 30;
    w.write_all(format!("GET /length/{len} HTTP/1.1\r\nHost: {origin}\r\n\r\n").as_bytes()).await.unwrap();
    let head = read_head(&mut r).await.unwrap();
    assert_eq!(expect_body(&mut r, &head, "1 GiB download").await, len);
    let up = 256u64 << 20;
    w.write_all(format!("POST /check HTTP/1.1\r\nHost: {origin}\r\nContent-Length: {up}\r\n\r\n").as_bytes()).await.unwrap();
    write_pattern(&mut w, up, PERIOD).await;
    let head = read_head(&mut r).await.unwrap();
    let mut text = String::new();
    (&mut r).take(header(&head, "content-length").unwrap().parse().unwrap()).read_to_string(&mut text).await.unwrap();
    assert_eq!(text, format!("checked {up}"));
    w.write_all(format!("GET /length/3 HTTP/1.1\r\nHost: {origin}\r\n\r\n").as_bytes()).await.unwrap();
    let head = read_head(&mut r).await.unwrap();
    assert_eq!(expect_body(&mut r, &head, "after").await, 3);
}

/// An opaque tunnel carries 256 MiB both ways at once, byte-exact, and
/// passes each side's half-close on.
#[tokio::test]
async fn an_opaque_tunnel_carries_both_ways_at_once() {
    let echo = start_tcp_echo().await;
    let proxy = proxy("opaque", 1, echo.port()).await;
    let (mut r, mut w) = tunnel(proxy.addr, echo).await;
    let len = 256u64 << 20;
    let writer = tokio::spawn(async move {
        write_pattern(&mut w, len, 300_000).await;
        w.shutdown().await.unwrap();
    });
    assert_eq!(expect_pattern(&mut r, 0, len, "echoed").await, len);
    let mut rest = Vec::new();
    tokio::time::timeout(STEP, r.read_to_end(&mut rest)).await.expect("the end passed on").unwrap();
    assert!(rest.is_empty());
    writer.await.unwrap();
}
