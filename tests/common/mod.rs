//! Shared test fixtures: the proxy in-process, origins and a DNS server on
//! loopback, and a raw HTTP/1 client for exact control over the bytes sent.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use portcullis::config::Config;
use portcullis::proxy::Server;

/// Every test step is bounded by this.
pub const STEP: Duration = Duration::from_secs(10);

/// Starts the proxy in-process on 127.0.0.1:0 with `yaml` (whose `listen`
/// is overridden) and returns its address.
pub async fn start_proxy(yaml: &str) -> SocketAddr {
    let yaml = format!("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n{yaml}");
    let config = Config::from_yaml_str(&yaml, "test.yaml").expect("test config is valid");
    let server = Server::bind(&config).await.expect("bind proxy");
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run());
    addr
}

/// An HTTP origin on loopback:
/// - `/headers`: the request head as text, one `name: value` per line, first line `METHOD URI`.
/// - `/echo`: streams the request body back.
/// - `/bytes/N`: N bytes of a fixed pattern, streamed in 64 KiB chunks.
pub async fn start_http_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(origin_handler);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    addr
}

/// The same origin as [`start_http_origin`], over TLS with `tls`.
pub async fn start_https_origin(tls: Arc<rustls::ServerConfig>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else { return };
                let svc = hyper::service::service_fn(origin_handler);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    addr
}

type OriginBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

async fn origin_handler(req: Request<Incoming>) -> Result<Response<OriginBody>, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/echo" {
        return Ok(Response::new(req.into_body().boxed()));
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let total: usize = n.parse().unwrap_or(0);
        return Ok(Response::new(PatternBody { sent: 0, total }.boxed()));
    }
    let mut text = format!("{} {}\n", req.method(), req.uri());
    for (name, value) in req.headers() {
        text.push_str(&format!("{}: {}\n", name, value.to_str().unwrap_or("<binary>")));
    }
    Ok(Response::new(Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed()))
}

/// A deterministic byte pattern, so large transfers can be compared exactly.
pub fn pattern(start: usize, len: usize) -> Vec<u8> {
    (start..start + len).map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8).collect()
}

/// A body of `total` pattern bytes produced in 64 KiB frames.
struct PatternBody {
    sent: usize,
    total: usize,
}

impl http_body::Body for PatternBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let len = (self.total - self.sent).min(65536);
        if len == 0 {
            return std::task::Poll::Ready(None);
        }
        let chunk = pattern(self.sent, len);
        self.sent += len;
        std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }
}

/// A TCP origin that echoes every byte back and closes when the client half-closes.
pub async fn start_tcp_echo() -> SocketAddr {
    start_tcp_echo_on("127.0.0.1:0".parse().unwrap()).await
}

/// [`start_tcp_echo`] on a given address (a test-owned namespace's address).
pub async fn start_tcp_echo_on(bind: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A TCP origin that reads until EOF and only then answers `got N bytes`.
pub async fn start_tcp_count_then_reply() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = stream.read_to_end(&mut got).await;
                let _ = stream.write_all(format!("got {} bytes", got.len()).as_bytes()).await;
            });
        }
    });
    addr
}

/// A loopback address where nothing listens, and the socket that holds
/// its port: bound but never listening, so a connection to it is refused,
/// and no other socket can take the port while the returned socket lives
/// (a port freed and reused later could be taken by a parallel test).
pub fn refusing_addr() -> (SocketAddr, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    (socket.local_addr().unwrap(), socket)
}

/// Writes `text` to `name` in a per-process temporary directory tagged `tag`.
pub fn temp_file(tag: &str, name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("portcullis-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts `portcullis run --config <config>` (the real binary) with stdout
/// piped, waits for its startup line, and returns the process, the rest
/// of its stdout (the decision log), and the proxy and admin addresses it
/// bound (a config listening on port 0 learns its ports here).
pub fn run_binary(
    config: &std::path::Path,
) -> (std::process::Child, std::io::Lines<std::io::BufReader<std::process::ChildStdout>>, (SocketAddr, SocketAddr)) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a startup line").unwrap();
    assert!(first.contains("portcullis listening"), "{first}");
    (child, lines, listening_addrs(&first))
}

/// The value of one exposed series, written exactly as the exposition
/// writes it (`name{label="value",...}`). Panics when the series is
/// absent: a misspelt name must not read as zero.
pub fn metric_value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in the metrics:\n{metrics}"))
}

/// Polls `check` every 20 ms until it returns a value; panics naming
/// `what` after [`STEP`].
pub async fn wait_until<T, F: std::future::Future<Output = Option<T>>>(what: &str, mut check: impl FnMut() -> F) -> T {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The proxy and admin addresses named by a `portcullis listening` line.
pub fn listening_addrs(startup: &str) -> (SocketAddr, SocketAddr) {
    let v: serde_json::Value = serde_json::from_str(startup).unwrap_or_else(|e| panic!("{e}: {startup}"));
    let addr = |field: &str| -> SocketAddr {
        v[field].as_str().and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("no {field} address in {startup}"))
    };
    (addr("listen"), addr("admin"))
}

/// A CA and a TLS server config for a server (an origin, a parent proxy)
/// with `names` (IP addresses become IP SANs); the CA as PEM.
pub fn test_ca_and_server_tls(names: &[&str]) -> (String, Arc<rustls::ServerConfig>) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, "portcullis test CA");
    let ca = params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = params.signed_by(&key, &ca, &ca_key).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf.der().to_vec())],
            PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    (ca.pem(), Arc::new(tls))
}

/// A running `portcullis run` process and the decision lines it has written.
pub struct BinaryProxy {
    child: std::process::Child,
    path: std::path::PathBuf,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
    /// Every byte the process wrote to stdout and to stderr, as written.
    pub output: Arc<Mutex<Vec<u8>>>,
    /// The `portcullis listening` line (every listener's address).
    pub startup: String,
}

impl BinaryProxy {
    /// Writes `yaml` (with loopback listeners on port 0) to `path` and runs it.
    pub async fn spawn(path: &std::path::Path, yaml: &str) -> BinaryProxy {
        BinaryProxy::spawn_with_env(path, yaml, &[]).await
    }

    /// [`BinaryProxy::spawn`] with extra environment variables. The proxy
    /// binds port 0 itself (a port freed by the test and bound later could
    /// be taken in between); its addresses come from its startup line.
    pub async fn spawn_with_env(path: &std::path::Path, yaml: &str, env: &[(&str, &str)]) -> BinaryProxy {
        use std::io::{BufRead, Read};
        std::fs::write(path, format!("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n{yaml}")).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["run", "--config", path.to_str().unwrap()])
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (log, output) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = Vec::new();
        let startup = loop {
            line.clear();
            let n = stdout.read_until(b'\n', &mut line).unwrap();
            assert!(n > 0, "portcullis exited before its startup line; output: {}", String::from_utf8_lossy(&output.lock().unwrap()));
            output.lock().unwrap().extend_from_slice(&line);
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            if text.contains("portcullis listening") {
                break text;
            }
            log.lock().unwrap().push(text);
        };
        let (sink, raw) = (log.clone(), output.clone());
        std::thread::spawn(move || loop {
            let mut line = Vec::new();
            if stdout.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
                return;
            }
            raw.lock().unwrap().extend_from_slice(&line);
            sink.lock().unwrap().push(String::from_utf8_lossy(&line).trim_end().to_string());
        });
        let (mut stderr, raw) = (child.stderr.take().unwrap(), output.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut buf) {
                raw.lock().unwrap().extend_from_slice(&buf[..n]);
                eprint!("{}", String::from_utf8_lossy(&buf[..n]));
            }
        });
        let (addr, admin) = listening_addrs(&startup);
        BinaryProxy { child, path: path.to_path_buf(), addr, admin, log, output, startup }
    }

    /// Replaces the config file with `yaml` (same loopback listeners) in
    /// one rename, as a deployment would, so the watcher never reads half a file.
    pub fn rewrite(&self, yaml: &str) {
        let staged = self.path.with_extension("staged");
        std::fs::write(&staged, format!("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n{yaml}")).unwrap();
        std::fs::rename(&staged, &self.path).unwrap();
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let resp = send_raw(self.admin, "GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n").await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        resp.text()
    }

    /// The decision lines that contain every one of `parts`, once there
    /// are at least `at_least` of them (a tunnel's line is written when it
    /// closes, just after the client exits), or after [`STEP`].
    pub async fn lines_with(&self, parts: &[&str], at_least: usize) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let lines: Vec<String> =
                self.log.lock().unwrap().iter().filter(|l| parts.iter().all(|p| l.contains(p))).cloned().collect();
            if lines.len() >= at_least || tokio::time::Instant::now() > deadline {
                return lines;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Drop for BinaryProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DNS server on loopback answering A and AAAA from a table; other names
/// get NXDOMAIN. Counts the queries it answers per name.
pub struct DnsServer {
    pub addr: SocketAddr,
    pub queries: Arc<Mutex<HashMap<String, usize>>>,
}

pub async fn start_dns(records: &[(&str, &[&str])]) -> DnsServer {
    start_dns_on("127.0.0.1:0".parse().unwrap(), records).await
}

/// [`start_dns`] on a given address (a test-owned namespace's address).
pub async fn start_dns_on(bind: SocketAddr, records: &[(&str, &[&str])]) -> DnsServer {
    use hickory_proto::op::{Message, MessageType, ResponseCode};
    use hickory_proto::rr::{rdata, RData, Record, RecordType};

    let table: HashMap<String, Vec<IpAddr>> = records
        .iter()
        .map(|(name, addrs)| (format!("{}.", name.to_lowercase()), addrs.iter().map(|a| a.parse().unwrap()).collect()))
        .collect();
    let socket = UdpSocket::bind(bind).await.unwrap();
    let addr = socket.local_addr().unwrap();
    let queries = Arc::new(Mutex::new(HashMap::new()));
    let counter = queries.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = socket.recv_from(&mut buf).await else { return };
            let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
            let mut reply = Message::new();
            reply.set_id(query.id()).set_message_type(MessageType::Response).set_recursion_available(true);
            reply.set_recursion_desired(query.recursion_desired());
            let mut found = false;
            for q in query.queries() {
                reply.add_query(q.clone());
                let name = q.name().to_ascii().to_lowercase();
                *counter.lock().unwrap().entry(name.clone()).or_insert(0) += 1;
                let Some(addrs) = table.get(&name) else { continue };
                found = true;
                for a in addrs {
                    let rdata = match (a, q.query_type()) {
                        (IpAddr::V4(v4), RecordType::A) => RData::A(rdata::A(*v4)),
                        (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(rdata::AAAA(*v6)),
                        _ => continue,
                    };
                    reply.add_answer(Record::from_rdata(q.name().clone(), 1, rdata));
                }
            }
            if !found {
                reply.set_response_code(ResponseCode::NXDomain);
            }
            if let Ok(bytes) = reply.to_vec() {
                let _ = socket.send_to(&bytes, peer).await;
            }
        }
    });
    DnsServer { addr, queries }
}

/// A response read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// The status line's reason phrase.
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response head, and the body when it has a Content-Length.
/// Leaves the stream positioned after it (for tunnels and keep-alive).
pub async fn read_response(stream: &mut TcpStream) -> RawResponse {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(STEP, stream.read(&mut byte)).await.expect("response head in time").unwrap();
        assert!(n > 0, "connection closed before a response head; got {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let text = String::from_utf8(head).unwrap();
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let reason = status_line.splitn(3, ' ').nth(2).unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let mut resp = RawResponse { status, reason, headers, body: Vec::new() };
    if let Some(len) = resp.header("content-length").map(|v| v.parse::<usize>().unwrap()) {
        let mut body = vec![0u8; len];
        tokio::time::timeout(STEP, stream.read_exact(&mut body)).await.expect("body in time").unwrap();
        resp.body = body;
    } else if resp.header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        resp.body = read_chunked(stream).await;
    }
    resp
}

async fn read_line(stream: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        let n = tokio::time::timeout(STEP, stream.read(&mut byte)).await.expect("chunk in time").unwrap();
        assert!(n > 0, "closed mid-chunk");
        line.push(byte[0]);
    }
    String::from_utf8(line[..line.len() - 2].to_vec()).unwrap()
}

async fn read_chunked(stream: &mut TcpStream) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let size = usize::from_str_radix(read_line(stream).await.split(';').next().unwrap(), 16).unwrap();
        if size == 0 {
            while !read_line(stream).await.is_empty() {}
            return body;
        }
        let start = body.len();
        body.resize(start + size, 0);
        tokio::time::timeout(STEP, stream.read_exact(&mut body[start..])).await.expect("chunk in time").unwrap();
        assert!(read_line(stream).await.is_empty());
    }
}

/// Opens a connection to the proxy, sends `request` verbatim and reads the response.
pub async fn send_raw(proxy: SocketAddr, request: &str) -> RawResponse {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    read_response(&mut stream).await
}

/// `GET url` from a chosen loopback source address (a client identity by
/// source), with extra header lines.
pub async fn get_from(proxy: SocketAddr, source: &str, url: &str, headers: &str) -> RawResponse {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source.parse::<IpAddr>().unwrap(), 0)).unwrap();
    let mut stream = socket.connect(proxy).await.unwrap();
    let host = url.split('/').nth(2).unwrap();
    stream.write_all(format!("GET {url} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n").as_bytes()).await.unwrap();
    read_response(&mut stream).await
}

/// `GET <url>` through the proxy.
pub async fn get(proxy: SocketAddr, url: &str) -> RawResponse {
    let host = url.split('/').nth(2).unwrap_or("");
    send_raw(proxy, &format!("GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n")).await
}

/// Sends `CONNECT authority` and returns the response and the open stream.
pub async fn connect(proxy: SocketAddr, authority: &str) -> (RawResponse, TcpStream) {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let resp = read_response(&mut stream).await;
    (resp, stream)
}

/// Sends `payload` into an open tunnel to an echo origin, half-closes it,
/// and returns everything that came back (within [`STEP`]).
pub async fn echo_through(tunnel: TcpStream, payload: &[u8]) -> Vec<u8> {
    let (mut from_tunnel, mut into_tunnel) = tunnel.into_split();
    let upload = payload.to_vec();
    let writer = tokio::spawn(async move {
        into_tunnel.write_all(&upload).await.unwrap();
        into_tunnel.shutdown().await.unwrap();
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(STEP, from_tunnel.read_to_end(&mut echoed)).await.expect("echo in time").unwrap();
    writer.await.unwrap();
    echoed
}

/// Runs the real `portcullis` binary; returns exit code, stdout and stderr.
pub fn portcullis(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis")).args(args).output().expect("run portcullis");
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
