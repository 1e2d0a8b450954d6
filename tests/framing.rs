//! Strict framing at the edge, through real sockets: each malformed request
//! is answered 400 with its reason and the connection closed, reaches no
//! origin, leaves one decision line and one count, and the proxy goes on
//! serving new connections. Also: requests hyper refuses before the proxy
//! sees them still leave a trace, userinfo never reaches the log (F5), and a
//! path-less absolute URI keeps its query (F10). Everything is on loopback.

mod common;
#[path = "common/hostile.rs"]
mod hostile;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use common::*;
use hostile::*;
use portcullis::metrics::Metrics;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

/// Decision lines of every proxy in this test process, as written.
fn decision_log() -> &'static Mutex<Vec<u8>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (_, guard) = portcullis::logging::LogSink::install(Capture(lines.clone())).expect("the only sink of this process");
        // The writer thread serves the whole test process.
        std::mem::forget(guard);
        tracing_subscriber::fmt()
            .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
            .with_writer(std::io::sink)
            .init();
        lines
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The decision lines of the connection from `client`, once there are `n`.
async fn lines_of(client: SocketAddr, n: usize) -> Vec<(String, serde_json::Value)> {
    let needle = format!("\"client\":\"{client}\"");
    let find = || -> Vec<String> {
        let log = decision_log().lock().unwrap();
        String::from_utf8_lossy(&log).lines().filter(|l| l.contains(&needle)).map(str::to_string).collect()
    };
    eventually(&format!("{n} decision line(s) of {client}"), STEP, || find().len() >= n).await;
    let lines = find();
    assert_eq!(lines.len(), n, "exactly {n} line(s) for {client}: {lines:?}");
    lines.into_iter().map(|l| (l.clone(), serde_json::from_str(&l).expect("a JSON line"))).collect()
}

/// The one decision line of `client`'s connection.
async fn line_of(client: SocketAddr) -> (String, serde_json::Value) {
    lines_of(client, 1).await.remove(0)
}

fn requests(metrics: &Metrics, kind: &str, reason: &str, role: &str) -> u64 {
    metrics.requests.with_label_values(&[kind, "deny", reason, role]).get()
}

/// A proxy that reaches loopback, a victim origin that must never receive a
/// byte of a refused request, and an origin for the liveness checks.
struct Setup {
    /// The loopback address this test's clients connect from, its own.
    source: IpAddr,
    proxy: SocketAddr,
    metrics: Arc<Metrics>,
    victim: SocketAddr,
    victim_log: Arc<Mutex<Vec<Vec<u8>>>>,
    alive: SocketAddr,
}

async fn setup(timeouts: &str) -> Setup {
    decision_log();
    let (victim, victim_log) = start_recording_origin().await;
    let alive = start_http_origin().await;
    let ports = format!("{}, {}", victim.port(), alive.port());
    let yaml = format!(
        "timeouts:\n  upstream_connect: 2s\n  upstream_response: 2s\n{timeouts}\
         allow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    allow:\n      cidrs: [127.0.0.1/32]\n      http_ports: [{ports}]\n      connect_ports: [{ports}]\n"
    );
    let (proxy, metrics) = start_proxy_with_metrics(&yaml).await;
    static NEXT_SOURCE: AtomicU8 = AtomicU8::new(2);
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, NEXT_SOURCE.fetch_add(1, Ordering::Relaxed)));
    Setup { source, proxy, metrics, victim, victim_log, alive }
}

/// A connection to `proxy` from `source`. Tests run in parallel and share
/// one log, and the kernel may give the same client port to connections
/// to different proxies: a source address per test keeps each decision
/// line's client address unique.
async fn open(source: IpAddr, proxy: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    socket.connect(proxy).await.unwrap()
}

impl Setup {
    fn victim_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.victim.port())
    }

    /// A new connection is served.
    async fn still_serving(&self) {
        let resp = get(self.proxy, &format!("http://127.0.0.1:{}/alive", self.alive.port())).await;
        assert_eq!(resp.status, 200, "liveness on a new connection");
    }

    fn victim_untouched(&self, name: &str) {
        let log = self.victim_log.lock().unwrap();
        assert!(log.is_empty(), "{name}: the origin was connected to and received {log:?}");
    }
}

/// Sends `request` on a new connection (after `before`, answered first),
/// and expects 400 with `reason`, then the connection closed. Returns the
/// client address of the connection.
async fn refused(source: IpAddr, proxy: SocketAddr, before: Option<&str>, request: &str, reason: &str) -> SocketAddr {
    let mut stream = open(source, proxy).await;
    let client = stream.local_addr().unwrap();
    if let Some(first) = before {
        stream.write_all(first.as_bytes()).await.unwrap();
        assert_eq!(read_response(&mut stream).await.status, 200, "the request before");
    }
    // The proxy may close before reading everything.
    let _ = stream.write_all(request.as_bytes()).await;
    let resp = read_response(&mut stream).await;
    assert_eq!((resp.status, resp.header("x-portcullis-error")), (400, Some(reason)), "{request:?}: {}", resp.text());
    assert_eq!(resp.header("connection"), Some("close"), "{reason}: the connection must not be reused");
    let (rest, closed) = read_until_closed(&mut stream, STEP).await;
    assert!(closed && rest.is_empty(), "{reason}: nothing after the answer, then close; got {:?}", String::from_utf8_lossy(&rest));
    client
}

/// The decision line of a request refused at the edge.
fn assert_refusal_line(line: &serde_json::Value, kind: &str, reason: &str, status: u16) {
    assert_eq!(line["decision"], "deny", "{line}");
    assert_eq!(line["reason"], reason, "{line}");
    assert_eq!(line["kind"], kind, "{line}");
    assert_eq!(line["status"], status, "{line}");
    assert_eq!(line["dialed"], "", "{line}");
}

/// RFC 9112 6.3: hyper would frame by Transfer-Encoding and drop the
/// Content-Length; the proxy refuses the request instead, whichever header
/// comes first and wherever on a keep-alive connection it comes.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused() {
    let s = setup("").await;
    let u = s.victim_url();
    let smuggled = format!("GET {u}/smuggled HTTP/1.1\r\nHost: x\r\n\r\n");
    let alive = format!("GET http://127.0.0.1:{}/first HTTP/1.1\r\nHost: x\r\n\r\n", s.alive.port());
    let cl_te = format!("POST {u}/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n{smuggled}");
    let te_cl = format!("POST {u}/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 41\r\n\r\n0\r\n\r\n{smuggled}");
    let cases: [(&str, Option<&str>, &str); 3] = [
        ("Content-Length first", None, &cl_te),
        ("Transfer-Encoding first", None, &te_cl),
        ("second request of a keep-alive connection", Some(&alive), &cl_te),
    ];
    for (name, before, request) in cases {
        let client = refused(s.source, s.proxy, before, request, "conflicting-framing").await;
        s.victim_untouched(name);
        s.still_serving().await;
        let lines = lines_of(client, 1 + usize::from(before.is_some())).await;
        assert_refusal_line(&lines.last().unwrap().1, "http", "conflicting-framing", 400);
    }
    assert_eq!(requests(&s.metrics, "http", "conflicting-framing", ""), 3);
}

/// The watch follows bodies by their framing: pipelined requests whose
/// bodies look like a conflicting head are all served, and the request
/// after them that does carry both headers is the one refused.
#[tokio::test]
async fn bodies_that_look_like_heads_are_not_refused() {
    let s = setup("").await;
    let echo = format!("http://127.0.0.1:{}/echo", s.alive.port());
    let decoy = format!("POST {}/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", s.victim_url());
    let pipelined = format!(
        "POST {echo} HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n{decoy}\
         POST {echo} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{len:x};ext=1\r\n{decoy}\r\n0\r\nX-Trailer: 1\r\n\r\n\
         GET {echo} HTTP/1.1\r\nHost: x\r\n\r\n",
        len = decoy.len()
    );
    let mut stream = open(s.source, s.proxy).await;
    stream.write_all(pipelined.as_bytes()).await.unwrap();
    for (i, body) in [decoy.as_str(), decoy.as_str(), ""].into_iter().enumerate() {
        let resp = read_response(&mut stream).await;
        assert_eq!((resp.status, resp.text().as_str()), (200, body), "request {i}");
    }
    let cl_te = format!("POST {echo} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    stream.write_all(cl_te.as_bytes()).await.unwrap();
    let resp = read_response(&mut stream).await;
    assert_eq!((resp.status, resp.header("x-portcullis-error")), (400, Some("conflicting-framing")));
    s.victim_untouched("decoys");
}

/// RFC 9112 3.2: an HTTP/1.1 request needs one valid Host, even though the
/// absolute-form target decides where it goes.
#[tokio::test]
async fn missing_or_invalid_host_is_refused() {
    let s = setup("").await;
    let u = s.victim_url();
    let cases = [
        ("no Host", format!("GET {u}/ HTTP/1.1\r\n\r\n"), "missing-host"),
        ("empty Host", format!("GET {u}/ HTTP/1.1\r\nHost:\r\n\r\n"), "invalid-host"),
        ("space in Host", format!("GET {u}/ HTTP/1.1\r\nHost: a b\r\n\r\n"), "invalid-host"),
        ("userinfo in Host", format!("GET {u}/ HTTP/1.1\r\nHost: user:pw@a.test\r\n\r\n"), "invalid-host"),
        ("port out of range", format!("GET {u}/ HTTP/1.1\r\nHost: a.test:65536\r\n\r\n"), "invalid-host"),
        ("path in Host", format!("GET {u}/ HTTP/1.1\r\nHost: a.test/x\r\n\r\n"), "invalid-host"),
        ("CONNECT without Host", format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\n\r\n", s.victim.port()), "missing-host"),
    ];
    for (name, request, reason) in &cases {
        let client = refused(s.source, s.proxy, None, request, reason).await;
        s.victim_untouched(name);
        s.still_serving().await;
        let kind = if request.starts_with("CONNECT") { "connect" } else { "http" };
        assert_refusal_line(&line_of(client).await.1, kind, reason, 400);
    }
    assert_eq!(requests(&s.metrics, "http", "missing-host", ""), 1);
    assert_eq!(requests(&s.metrics, "connect", "missing-host", ""), 1);
    assert_eq!(requests(&s.metrics, "http", "invalid-host", ""), 5);
}

/// RFC 9110 9.3.6: CONNECT content has no defined meaning. hyper would read
/// and discard it; the proxy refuses the request before any dial, allowed
/// destination or not.
#[tokio::test]
async fn connect_with_a_body_is_refused() {
    let s = setup("").await;
    let hidden = format!("GET {}/ HTTP/1.1\r\nHost: x\r\n\r\n", s.victim_url());
    let connect = |target: String, framing: &str| {
        let (header, body) = match framing {
            "chunked" => ("Transfer-Encoding: chunked".to_string(), format!("{:x}\r\n{hidden}\r\n0\r\n\r\n", hidden.len())),
            _ => (format!("Content-Length: {}", hidden.len()), hidden.clone()),
        };
        format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{header}\r\n\r\n{body}")
    };
    let allowed = format!("127.0.0.1:{}", s.victim.port());
    let cases = [
        ("Content-Length", connect(allowed.clone(), "content-length")),
        ("chunked", connect(allowed.clone(), "chunked")),
        ("denied destination", connect("169.254.169.254:443".to_string(), "content-length")),
    ];
    for (name, request) in &cases {
        let dials = s.metrics.upstream_connect.get_sample_count();
        let client = refused(s.source, s.proxy, None, request, "connect-with-body").await;
        assert_eq!(s.metrics.upstream_connect.get_sample_count(), dials, "{name}: nothing was dialed");
        s.victim_untouched(name);
        s.still_serving().await;
        assert_refusal_line(&line_of(client).await.1, "connect", "connect-with-body", 400);
    }
    assert_eq!(requests(&s.metrics, "connect", "connect-with-body", ""), 3);
    // An explicit empty body is no body.
    let (resp, _stream) = connect_with(s.proxy, &format!("CONNECT {allowed} HTTP/1.1\r\nHost: {allowed}\r\nContent-Length: 0\r\n\r\n")).await;
    assert_eq!(resp.status, 200);
}

async fn connect_with(proxy: SocketAddr, request: &str) -> (RawResponse, TcpStream) {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let resp = read_response(&mut stream).await;
    (resp, stream)
}

/// A request body whose chunked framing breaks while it is forwarded is the
/// client's fault: 400 `malformed-body`, counted apart from upstream errors.
/// The head may have reached the origin (bodies are streamed), but no
/// answer from it reaches the client.
#[tokio::test]
async fn malformed_request_body_is_a_client_error() {
    let s = setup("").await;
    let (origin, origin_log) = start_logging_origin(true).await;
    let (proxy, metrics) = start_proxy_with_metrics(&format!(
        "allow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    allow:\n      cidrs: [127.0.0.1/32]\n      http_ports: [{}, {}]\n",
        origin.port(),
        s.alive.port()
    ))
    .await;
    let head = format!("POST http://127.0.0.1:{}/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", origin.port());
    let cases = [
        ("bad chunk size", format!("{head}5\r\nhello\r\nzz\r\n")),
        ("chunk size overflow", format!("{head}{}\r\nhello\r\n", "f".repeat(17))),
        ("bare LF hiding a header", format!("{head}5;a\nContent-Length: 5\r\nhello\r\n0\r\n\r\n")),
    ];
    for (name, request) in &cases {
        let client = refused(s.source, proxy, None, request, "malformed-body").await;
        let (_, line) = line_of(client).await;
        assert_eq!((&line["decision"], &line["reason"], &line["status"]), (&"deny".into(), &"malformed-body".into(), &400.into()), "{name}: {line}");
        let resp = get(proxy, &format!("http://127.0.0.1:{}/alive", s.alive.port())).await;
        assert_eq!(resp.status, 200, "{name}: liveness");
    }
    assert_eq!(requests(&metrics, "http", "malformed-body", "default"), 3);
    let upstream_errors: u64 = ["upstream-error", "upstream-refused", "upstream-unreachable"]
        .iter()
        .map(|code| metrics.upstream_errors.with_label_values(&[code]).get())
        .sum();
    assert_eq!(upstream_errors, 0, "not counted as upstream errors");
    assert!(origin_log.lock().unwrap().iter().all(|h| h.starts_with("post /upload\n")), "{:?}", origin_log.lock().unwrap());
}

/// hyper answers these itself, before the proxy sees a request; each still
/// leaves one decision line and one count.
#[tokio::test]
async fn requests_hyper_refuses_leave_a_trace() {
    let s = setup("").await;
    let u = s.victim_url();
    let cases = [
        ("space in the target", format!("GET {u}/a b HTTP/1.1\r\nHost: x\r\n\r\n"), 400, "malformed-request"),
        ("NUL in a header", format!("GET {u}/ HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n"), 400, "malformed-request"),
        ("signed Content-Length", format!("POST {u}/ HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello"), 400, "malformed-request"),
        ("one header of 200 KB", format!("GET {u}/ HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "b".repeat(200_000)), 431, "head-too-large"),
        ("request line of 70 KB", format!("GET {u}/{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000)), 414, "uri-too-long"),
    ];
    for (name, request, status, reason) in &cases {
        let mut stream = open(s.source, s.proxy).await;
        let client = stream.local_addr().unwrap();
        let _ = stream.write_all(request.as_bytes()).await;
        assert_eq!(read_response(&mut stream).await.status, *status, "{name}");
        let (_, closed) = read_until_closed(&mut stream, STEP).await;
        assert!(closed, "{name}: closed");
        let (_, line) = line_of(client).await;
        assert_refusal_line(&line, "", reason, *status);
        assert_eq!(line["method"], "", "{name}: no method was parsed");
        s.victim_untouched(name);
        s.still_serving().await;
    }
    // An HTTP/2 preface: hyper closes without an answer.
    let mut stream = open(s.source, s.proxy).await;
    let client = stream.local_addr().unwrap();
    stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    let (got, closed) = read_until_closed(&mut stream, STEP).await;
    assert!(closed && got.is_empty(), "HTTP/2 preface: closed without an answer, got {:?}", String::from_utf8_lossy(&got));
    assert_refusal_line(&line_of(client).await.1, "", "malformed-request", 0);
    s.still_serving().await;
    assert_eq!(requests(&s.metrics, "invalid", "malformed-request", ""), 4);
    assert_eq!(requests(&s.metrics, "invalid", "head-too-large", ""), 1);
    assert_eq!(requests(&s.metrics, "invalid", "uri-too-long", ""), 1);
}

/// A head begun and not finished in time is closed without an answer and
/// logged; an idle connection that times out and a client that leaves
/// mid-head are not refusals and leave no line.
#[tokio::test]
async fn unfinished_heads_are_logged_idle_connections_are_not() {
    let s = setup("  request_header: 300ms\n").await;
    let total = |m: &Metrics| -> u64 {
        ["malformed-request", "head-timeout", "head-too-large"].iter().map(|r| requests(m, "invalid", r, "")).sum()
    };
    // An idle connection: no byte, then the header timeout.
    let mut idle = open(s.source, s.proxy).await;
    let (got, closed) = read_until_closed(&mut idle, STEP).await;
    assert!(closed && got.is_empty());
    // A client that leaves mid-head.
    let mut gone = open(s.source, s.proxy).await;
    gone.write_all(format!("GET {}/ HTTP/1.1\r\nHo", s.victim_url()).as_bytes()).await.unwrap();
    drop(gone);
    eventually("both connections ended", STEP, || s.metrics.active_connections.get() == 0).await;
    assert_eq!(total(&s.metrics), 0, "no refusal counted");
    // A keep-alive connection idle after a request: one line, the request's.
    let mut kept = open(s.source, s.proxy).await;
    let kept_client = kept.local_addr().unwrap();
    kept.write_all(format!("GET http://127.0.0.1:{}/ HTTP/1.1\r\nHost: x\r\n\r\n", s.alive.port()).as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut kept).await.status, 200);
    assert!(read_until_closed(&mut kept, STEP).await.1);
    // An unfinished head.
    let mut slow = open(s.source, s.proxy).await;
    let client = slow.local_addr().unwrap();
    slow.write_all(format!("GET {}/ HTTP/1.1\r\nHo", s.victim_url()).as_bytes()).await.unwrap();
    let (got, closed) = read_until_closed(&mut slow, STEP).await;
    assert!(closed && got.is_empty(), "closed without an answer: {:?}", String::from_utf8_lossy(&got));
    assert_refusal_line(&line_of(client).await.1, "", "head-timeout", 0);
    eventually("all connections ended", STEP, || s.metrics.active_connections.get() == 0).await;
    assert_eq!(requests(&s.metrics, "invalid", "head-timeout", ""), 1);
    assert_eq!(total(&s.metrics), 1, "only the unfinished head");
    assert_eq!(lines_of(kept_client, 1).await[0].1["reason"], "", "the idle keep-alive adds no line");
    s.victim_untouched("unfinished head");
    s.still_serving().await;
}

/// F5: a target refused for its userinfo is logged without it.
#[tokio::test]
async fn userinfo_of_a_refused_target_is_never_logged() {
    let s = setup("").await;
    let port = s.victim.port();
    let cases = [
        (format!("GET http://alice:SuperSecretPw1@127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"), "SuperSecretPw1", "alice"),
        (format!("CONNECT bob:SuperSecretPw2@127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"), "SuperSecretPw2", "bob"),
        (format!("GET http://carol:p@ss@127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"), "ss@", "carol"),
    ];
    for (request, secret, user) in &cases {
        let mut stream = open(s.source, s.proxy).await;
        let client = stream.local_addr().unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let resp = read_response(&mut stream).await;
        assert_eq!((resp.status, resp.header("x-portcullis-error")), (400, Some("invalid-target")), "{request}");
        let (raw, line) = line_of(client).await;
        assert_eq!(line["host"], format!("127.0.0.1:{port}"), "{raw}");
        assert!(!raw.contains(secret) && !raw.contains(user), "credentials logged: {raw}");
    }
    s.victim_untouched("userinfo");
}

/// F10: `http://host?q=1` reaches the origin as `/?q=1`.
#[tokio::test]
async fn query_of_a_pathless_uri_is_forwarded() {
    let s = setup("").await;
    let authority = format!("127.0.0.1:{}", s.alive.port());
    for (target, want) in [
        (format!("http://{authority}?q=1&r=2"), "GET /?q=1&r=2\n"),
        (format!("http://{authority}/p?q=1"), "GET /p?q=1\n"),
        (format!("http://{authority}"), "GET /\n"),
    ] {
        let resp = send_raw(s.proxy, &format!("GET {target} HTTP/1.1\r\nHost: {authority}\r\n\r\n")).await;
        assert_eq!(resp.status, 200, "{target}");
        assert!(resp.text().starts_with(want), "{target}: the origin saw {:?}", resp.text());
    }
}
