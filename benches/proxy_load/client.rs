//! The load bench's clients: keep-alive HTTP load (absolute-form through a
//! proxy, origin-form direct) and new tunnels per second.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::phase;

const MAX_REQUESTS_PER_CLIENT: usize = 200_000;

/// Opens a connection to `target`, through `proxy` with CONNECT when given;
/// panics when it cannot (phases that must not fail the run use [`try_open`]).
pub async fn open(target: SocketAddr, proxy: Option<SocketAddr>) -> TcpStream {
    try_open(target, proxy).await.unwrap_or_else(|e| panic!("open {target}: {e}"))
}

/// Opens a connection to `target`, through `proxy` with CONNECT when given.
pub async fn try_open(target: SocketAddr, proxy: Option<SocketAddr>) -> Result<TcpStream, String> {
    let Some(proxy) = proxy else {
        let s = TcpStream::connect(target).await.map_err(|e| format!("connect: {e}"))?;
        let _ = s.set_nodelay(true);
        return Ok(s);
    };
    let mut s = TcpStream::connect(proxy).await.map_err(|e| format!("connect to the proxy: {e}"))?;
    let _ = s.set_nodelay(true);
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await.map_err(|e| format!("CONNECT: {e}"))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return Err("proxy closed during CONNECT".into()),
        }
    }
    match is_200(&head) {
        true => Ok(s),
        false => Err(format!("CONNECT answered {}", String::from_utf8_lossy(&head).lines().next().unwrap_or(""))),
    }
}

/// True for a `200` status line of HTTP/1.0 or 1.1 (tinyproxy answers
/// CONNECT in HTTP/1.0).
pub fn is_200(head: &[u8]) -> bool {
    (head.starts_with(b"HTTP/1.1 ") || head.starts_with(b"HTTP/1.0 ")) && head[9..].starts_with(b"200")
}

pub struct HttpResult {
    /// Requests answered 200; `rps` and the latencies count only these.
    pub count: usize,
    pub rps: f64,
    pub p50: f64,
    pub p99: f64,
    /// Responses other than 200, and requests no connection could carry.
    pub failures: usize,
    /// What went wrong first, when something did.
    pub first_failure: Option<String>,
    /// New connections after the server closed one (see [`ClientConn`]).
    pub reconnects: usize,
}

/// What one client of [`http_load`] saw.
#[derive(Default)]
struct ClientRun {
    latencies: Vec<u32>,
    failures: usize,
    first_failure: Option<String>,
    reconnects: usize,
}

impl ClientRun {
    fn fail(&mut self, what: String) {
        self.failures += 1;
        self.first_failure.get_or_insert(what);
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// A load-generator client's connection to the origin or a proxy, opened
/// again when the server closes it. tinyproxy closes after every response
/// without a `Connection: close`, so a client learns it only from the
/// close, sometimes as its next request goes out; any client then sends
/// that request again on a new connection, and so does this one, timing
/// the new connection as part of the request.
struct ClientConn {
    to: SocketAddr,
    sender: Sender,
    /// The connection has answered a request since it was opened.
    used: bool,
    closed: bool,
    reconnects: usize,
}

impl ClientConn {
    async fn open(to: SocketAddr) -> std::io::Result<ClientConn> {
        let sender = Self::handshake(to).await?;
        Ok(ClientConn { to, sender, used: false, closed: false, reconnects: 0 })
    }

    async fn handshake(to: SocketAddr) -> std::io::Result<Sender> {
        let stream = TcpStream::connect(to).await?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Ok(sender)
    }

    async fn reopen(&mut self) -> Result<(), String> {
        self.sender = Self::handshake(self.to).await.map_err(|e| format!("new connection: {e}"))?;
        (self.used, self.closed) = (false, false);
        self.reconnects += 1;
        Ok(())
    }

    /// Sends `request` (or, on a new connection, `again()`) and reads the
    /// whole response; its status, or why no connection could carry it.
    async fn get(&mut self, request: Request<Empty<Bytes>>, again: impl Fn() -> Request<Empty<Bytes>>) -> Result<hyper::StatusCode, String> {
        if self.closed {
            self.reopen().await?;
        }
        let response = match self.sender.send_request(request).await {
            Ok(response) => response,
            // Closed by the server as the request went out: once more on a new one.
            Err(_) if self.used => {
                self.reopen().await?;
                self.sender.send_request(again()).await.map_err(|e| format!("request: {e}"))?
            }
            Err(e) => return Err(format!("request: {e}")),
        };
        let status = response.status();
        response.into_body().collect().await.map_err(|e| format!("response body: {e}"))?;
        self.used = true;
        Ok(status)
    }

    /// Waits until the connection takes another request or is found closed.
    async fn settle(&mut self) {
        self.closed = self.sender.ready().await.is_err();
    }
}

/// `clients` keep-alive connections sending GETs for [`phase`].
pub async fn http_load(origin: SocketAddr, proxy: Option<SocketAddr>, clients: usize) -> HttpResult {
    let started = Instant::now();
    let deadline = started + phase();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(async move {
                let mut conn = ClientConn::open(proxy.unwrap_or(origin)).await.unwrap();
                let uri = match proxy {
                    Some(_) => format!("http://{origin}/small"),
                    None => "/small".to_string(),
                };
                let request = || Request::get(uri.as_str()).header("host", origin.to_string()).body(Empty::<Bytes>::new()).unwrap();
                let mut run = ClientRun::default();
                while Instant::now() < deadline && run.latencies.len() < MAX_REQUESTS_PER_CLIENT {
                    let req = request();
                    let t = Instant::now();
                    match conn.get(req, request).await {
                        Ok(hyper::StatusCode::OK) => run.latencies.push(t.elapsed().as_micros() as u32),
                        Ok(status) => run.fail(format!("status {status}")),
                        Err(e) => {
                            run.fail(e);
                            break;
                        }
                    }
                    conn.settle().await;
                }
                run.reconnects = conn.reconnects;
                run
            })
        })
        .collect();
    let (mut all, mut failures, mut first_failure, mut reconnects) = (Vec::new(), 0, None, 0);
    for t in tasks {
        let run = t.await.unwrap();
        all.extend(run.latencies);
        failures += run.failures;
        first_failure = first_failure.or(run.first_failure);
        reconnects += run.reconnects;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0) as f64;
    HttpResult { count: all.len(), rps: all.len() as f64 / elapsed, p50: pct(0.50), p99: pct(0.99), failures, first_failure, reconnects }
}

/// `; N reconnects (server closed); N FAILED (first: why)` for what is not zero.
pub fn http_notes(r: &HttpResult) -> String {
    let mut notes = String::new();
    if r.reconnects > 0 {
        notes += &format!("; {} reconnects (server closed)", r.reconnects);
    }
    if r.failures > 0 {
        notes += &format!("; {} FAILED (first: {})", r.failures, r.first_failure.as_deref().unwrap_or("?"));
    }
    notes
}

/// New connections per second and how many: (CONNECT, 200,) one echo
/// round trip, close; 8 concurrent loops for [`phase`].
pub async fn new_connections(echo: SocketAddr, proxy: Option<SocketAddr>) -> (f64, f64) {
    let started = Instant::now();
    let deadline = started + phase();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let mut done = 0u64;
                while Instant::now() < deadline && done < 1_000_000 {
                    let mut s = open(echo, proxy).await;
                    s.write_all(b"ping").await.unwrap();
                    let mut buf = [0u8; 4];
                    s.read_exact(&mut buf).await.unwrap();
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    (total as f64 / started.elapsed().as_secs_f64(), total as f64)
}
