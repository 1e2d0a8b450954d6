//! The load bench's tunnel phases: bulk transfers (raw and HTTP, direct or
//! through one tunnel) and the idle tunnels whose memory the bench reads.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::client::{is_200, open, try_open};
use super::{bulk_bytes, BURST_BYTES};

/// The most any one bulk transfer may take.
const BULK_TIME: Duration = Duration::from_secs(60);
const CHUNK: usize = 256 * 1024;
/// Tunnels being opened at once by [`idle_after_get`].
const OPENING: usize = 16;

/// (MB/s, MB) reading [`bulk_bytes`] from the source, at most 60 s. The
/// client speaks first, one byte the source ignores, like any request: a
/// redirected connection is classified by its first bytes.
pub async fn bulk(source: SocketAddr, proxy: Option<SocketAddr>) -> (f64, f64) {
    let mut s = open(source, proxy).await;
    s.write_all(&[0]).await.unwrap();
    let mut buf = vec![0u8; CHUNK];
    let started = Instant::now();
    let mut got = 0usize;
    let deadline = started + BULK_TIME;
    while got < bulk_bytes() && Instant::now() < deadline {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    (got as f64 / 1e6 / started.elapsed().as_secs_f64(), got as f64 / 1e6)
}

/// Which way an HTTP bulk transfer goes.
#[derive(Clone, Copy)]
pub enum Way {
    /// `GET /bulk`: the origin sends [`bulk_bytes`] with Content-Length.
    Download,
    /// `POST /upload` of [`bulk_bytes`] with Content-Length.
    Upload,
}

/// One HTTP exchange moving [`bulk_bytes`] on a connection of its own: to
/// the HTTP origin `origin` directly, or through a tunnel `proxy` opens to
/// it (CONNECT, then the origin-form request in the tunnel). (MB/s, MB), or
/// why it failed; at most 60 s.
pub async fn http_bulk(origin: SocketAddr, proxy: Option<SocketAddr>, way: Way) -> Result<(f64, f64), String> {
    let mut s = try_open(origin, proxy).await?;
    let started = Instant::now();
    let exchange = async {
        match way {
            Way::Download => download(&mut s, origin).await,
            Way::Upload => upload(&mut s, origin).await,
        }
    };
    let moved = tokio::time::timeout(BULK_TIME, exchange).await.map_err(|_| format!("not done after {} s", BULK_TIME.as_secs()))??;
    Ok((moved as f64 / 1e6 / started.elapsed().as_secs_f64(), moved as f64 / 1e6))
}

async fn download(s: &mut TcpStream, origin: SocketAddr) -> Result<usize, String> {
    s.write_all(format!("GET /bulk HTTP/1.1\r\nHost: {origin}\r\n\r\n").as_bytes()).await.map_err(|e| format!("request: {e}"))?;
    let (length, early) = response_head(s).await?;
    let mut got = early.len();
    let mut buf = vec![0u8; CHUNK];
    while got < length {
        match s.read(&mut buf).await {
            Ok(0) => return Err(format!("closed after {got} of {length} body bytes")),
            Ok(n) => got += n,
            Err(e) => return Err(format!("body: {e}")),
        }
    }
    Ok(got)
}

async fn upload(s: &mut TcpStream, origin: SocketAddr) -> Result<usize, String> {
    let total = bulk_bytes();
    s.write_all(format!("POST /upload HTTP/1.1\r\nHost: {origin}\r\nContent-Length: {total}\r\n\r\n").as_bytes()).await.map_err(|e| format!("request: {e}"))?;
    let chunk = vec![0x5au8; CHUNK];
    let mut sent = 0;
    while sent < total {
        let n = (total - sent).min(CHUNK);
        s.write_all(&chunk[..n]).await.map_err(|e| format!("body after {sent} bytes: {e}"))?;
        sent += n;
    }
    let (length, mut answer) = response_head(s).await?;
    let mut buf = [0u8; 64];
    while answer.len() < length {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    match std::str::from_utf8(&answer).ok().and_then(|a| a.trim().parse::<usize>().ok()) {
        Some(read) if read == total => Ok(total),
        _ => Err(format!("origin read {:?} of {total} bytes", String::from_utf8_lossy(&answer))),
    }
}

/// Reads a response head; requires 200 and Content-Length. Returns the
/// length and the body bytes read with the head.
async fn response_head(s: &mut TcpStream) -> Result<(usize, Vec<u8>), String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if head.len() > 64 * 1024 {
            return Err("response head over 64 KiB".into());
        }
        match s.read(&mut buf).await {
            Ok(0) => return Err(format!("closed in the response head: {:?}", String::from_utf8_lossy(&head))),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("response head: {e}")),
        }
    };
    let text = String::from_utf8_lossy(&head[..end]);
    if !is_200(&head) {
        return Err(format!("answered {}", text.lines().next().unwrap_or("")));
    }
    let length = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .ok_or_else(|| format!("no Content-Length in {text:?}"))?;
    Ok((length, head.split_off(end)))
}

/// Opens up to `n` tunnels to the HTTP origin `origin`, [`OPENING`] at a
/// time, sends one `GET /small` through each and reads its whole response,
/// then keeps them open. Stops early at the first failure (the descriptor
/// limit, usually), which it returns, or after 60 s.
pub async fn idle_after_get(origin: SocketAddr, proxy: SocketAddr, n: usize) -> (Vec<TcpStream>, Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut held = Vec::with_capacity(n);
    let mut opening = JoinSet::new();
    let mut failure = None;
    let mut started = 0;
    loop {
        while started < n && opening.len() < OPENING && failure.is_none() && Instant::now() < deadline {
            opening.spawn(tunnel_after_get(origin, proxy));
            started += 1;
        }
        let Some(done) = opening.join_next().await else { break };
        match done.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(s) => held.push(s),
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    (held, failure)
}

async fn tunnel_after_get(origin: SocketAddr, proxy: SocketAddr) -> Result<TcpStream, String> {
    let mut s = try_open(origin, Some(proxy)).await?;
    s.write_all(format!("GET /small HTTP/1.1\r\nHost: {origin}\r\n\r\n").as_bytes()).await.map_err(|e| format!("GET: {e}"))?;
    let (length, early) = response_head(&mut s).await?;
    let mut got = early.len();
    let mut buf = [0u8; 64];
    while got < length {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return Err("closed in the response body".into()),
            Ok(n) => got += n,
        }
    }
    Ok(s)
}

/// Sends [`BURST_BYTES`] through each tunnel to the echo origin and reads
/// them back, 50 tunnels at a time; stops after 60 s. Returns the tunnels
/// (still open) and how many completed their burst.
pub async fn bursts(tunnels: Vec<TcpStream>) -> (Vec<TcpStream>, usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut kept = Vec::with_capacity(tunnels.len());
    let mut done = 0;
    let mut tunnels = tunnels.into_iter().peekable();
    while tunnels.peek().is_some() && Instant::now() < deadline {
        let mut batch = tokio::task::JoinSet::new();
        for mut s in tunnels.by_ref().take(50) {
            batch.spawn(async move {
                let (mut r, mut w) = s.split();
                let back = async {
                    let mut got = vec![0u8; BURST_BYTES];
                    r.read_exact(&mut got).await.map(|_| ())
                };
                let burst = vec![0x5au8; BURST_BYTES];
                let (sent, read) = tokio::join!(w.write_all(&burst), back);
                let ok = sent.is_ok() && read.is_ok();
                (s, ok)
            });
        }
        while let Some(Ok((s, ok))) = batch.join_next().await {
            done += usize::from(ok);
            kept.push(s);
        }
    }
    kept.extend(tunnels);
    (kept, done)
}

/// Opens up to `n` tunnels and keeps them open; stops early at the fd limit
/// or after 60 s.
pub async fn idle_tunnels(echo: SocketAddr, proxy: SocketAddr, n: usize) -> (usize, Vec<TcpStream>) {
    let mut held = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(60);
    while held.len() < n && Instant::now() < deadline {
        let Ok(mut s) = TcpStream::connect(proxy).await else { break };
        let target = echo.to_string();
        if s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await.is_err() {
            break;
        }
        let mut head = [0u8; 128];
        let Ok(n) = s.read(&mut head).await else { break };
        if !is_200(&head[..n]) {
            break;
        }
        held.push(s);
    }
    (held.len(), held)
}
