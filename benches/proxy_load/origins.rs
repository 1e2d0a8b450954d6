//! The origins of the load bench, in a process of their own (this bench
//! binary started again with `PORTCULLIS_LOAD_ORIGINS=1`): an HTTP origin
//! twice, a TCP echo and a bulk source.
//!
//! The HTTP origin listens on two ports: `http` is in both of the proxy's
//! port lists (plain HTTP through the proxy, and a CONNECT tunnel to it is
//! served as HTTP inside the tunnel), `http_opaque` only in `connect_ports`
//! (a tunnel to it is relayed opaquely). It answers `/bulk` with
//! [`bulk_bytes`] of body (Content-Length), a POST to `/upload` with the
//! number of body bytes it read, and anything else with 13 bytes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::{bulk_bytes, OWN_NETNS};

/// Set in the origins' process.
pub const ENV: &str = "PORTCULLIS_LOAD_ORIGINS";
/// Fixed ports for the origins (a script allows them in a peer's config):
/// http, echo, source and optionally http_opaque, comma-separated.
const PORTS: &str = "PORTCULLIS_LOAD_ORIGIN_PORTS";
const CHUNK: usize = 256 * 1024;

/// The origins' process and where each origin listens.
pub struct Origins {
    pub child: Child,
    pub http: SocketAddr,
    pub echo: SocketAddr,
    pub source: SocketAddr,
    pub http_opaque: SocketAddr,
}

impl Origins {
    /// Starts the origins' process and reads their ports.
    pub fn spawn() -> Origins {
        let exe = std::env::current_exe().expect("the bench binary knows its path");
        let mut child = Command::new(exe).env(ENV, "1").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("start origins");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout is piped");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).expect("origins print their ports");
        let ports: Vec<u16> = line.split_whitespace().map(|p| p.parse().expect("a port")).collect();
        let [http, echo, source, http_opaque] = ports[..] else { panic!("origins printed {line:?}") };
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        Origins { child, http: addr(http), echo: addr(echo), source: addr(source), http_opaque: addr(http_opaque) }
    }

    /// Stops the origins: they serve until their standard input closes.
    pub fn stop(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// The origins' process: prints their ports on one line (http, echo,
/// source, http_opaque), serves until its standard input closes.
pub async fn serve() {
    let http = start_http(bind(0)).await;
    let echo = start_echo().await;
    let source = start_source().await;
    let http_opaque = start_http(bind(3)).await;
    println!("{} {} {} {}", http.port(), echo.port(), source.port(), http_opaque.port());
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = [0u8; 64];
        while matches!(std::io::Read::read(&mut std::io::stdin(), &mut sink), Ok(n) if n > 0) {}
    })
    .await;
}

/// Where origin `index` (http, echo, source, http_opaque) listens: loopback,
/// or in the bench's own namespace every local address (the stand-in one
/// for the transparent phases). Its port is taken from [`PORTS`] (three or
/// four; http_opaque takes any port when there are three) or any.
fn bind(index: usize) -> SocketAddr {
    let port = std::env::var(PORTS).map_or(0, |ports| {
        let ports: Vec<u16> = ports.split(',').map(|p| p.trim().parse().expect("PORTCULLIS_LOAD_ORIGIN_PORTS: ports")).collect();
        assert!(matches!(ports.len(), 3 | 4), "{PORTS}: http, echo, source and optionally http_opaque ports");
        ports.get(index).copied().unwrap_or(0)
    });
    match std::env::var_os(OWN_NETNS) {
        Some(_) => SocketAddr::from(([0, 0, 0, 0], port)),
        None => SocketAddr::from(([127, 0, 0, 1], port)),
    }
}

type Answer = Response<Either<Full<Bytes>, Repeat>>;

async fn answer(request: Request<Incoming>) -> Result<Answer, Infallible> {
    let body = match request.uri().path() {
        "/bulk" => Either::Right(Repeat { left: bulk_bytes(), chunk: Bytes::from(vec![0x5au8; CHUNK]) }),
        "/upload" => {
            let mut body = request.into_body();
            let mut read = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                read += frame.data_ref().map_or(0, |d| d.len());
            }
            Either::Left(Full::new(Bytes::from(read.to_string())))
        }
        _ => Either::Left(Full::new(Bytes::from_static(b"hello, world\n"))),
    };
    Ok(Response::new(body))
}

/// A body of `left` bytes in slices of one shared chunk, its length known
/// up front (so it is sent with Content-Length).
pub struct Repeat {
    left: usize,
    chunk: Bytes,
}

impl Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len());
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left as u64)
    }
}

async fn start_http(at: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind(at).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(answer);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    addr
}

async fn start_echo() -> SocketAddr {
    let listener = TcpListener::bind(bind(1)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Bytes per write of the bulk source: `PORTCULLIS_LOAD_SOURCE_WRITE_KIB`
/// (default 256). Smaller writes, as many servers make, can keep a relay
/// from ever filling its largest buffer, so it never starts splicing.
fn source_write() -> usize {
    super::setting::<usize>("PORTCULLIS_LOAD_SOURCE_WRITE_KIB", CHUNK >> 10).max(1) << 10
}

/// Reads the client's one-byte request, then writes [`bulk_bytes`] to the
/// connection and closes. (Closing with the request unread would reset the
/// connection and lose the end of the transfer.)
async fn start_source() -> SocketAddr {
    let listener = TcpListener::bind(bind(2)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 1];
                if stream.read_exact(&mut request).await.is_err() {
                    return;
                }
                let size = source_write();
                let chunk = vec![0x5au8; size];
                let (total, mut sent) = (bulk_bytes(), 0);
                while sent < total {
                    let n = (total - sent).min(size);
                    if stream.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    sent += n;
                }
            });
        }
    });
    addr
}
