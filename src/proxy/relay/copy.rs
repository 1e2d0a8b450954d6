//! The relay engine: both directions copied with buffers that grow for a
//! bulk transfer and shrink when quiet, switching to `splice(2)` between
//! two TCP sockets, half-close passed on, an idle bound, and the bytes
//! counted as they move.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::metrics::RelayedBytes;

/// Relay buffer per direction.
/// Relay buffers start small, so an idle tunnel costs little memory, and
/// double whenever a read fills them, up to the largest size, so a bulk
/// transfer moves in large chunks.
pub(super) const RELAY_BUF_START: usize = 2 * 1024;
pub(super) const RELAY_BUF_MAX: usize = 128 * 1024;
/// A grown buffer that sees no byte for this long shrinks back to the
/// start size, so a tunnel that once moved a burst idles as cheaply as one
/// that never did.
const RELAY_QUIET: Duration = Duration::from_millis(250);
/// How often an open tunnel adds the bytes it relayed since the last time
/// to the metrics, so a long transfer shows on a graph while it runs.
const METER_EVERY: Duration = Duration::from_secs(2);

/// One end of a relay, the client's or the upstream's, that can be split
/// into independent halves.
pub trait RelayEnd: AsyncRead + AsyncWrite + Unpin + Send {
    type Read: AsyncRead + Unpin + Send + Half;
    type Write: AsyncWrite + Unpin + Send + Half;
    fn halves(self) -> (Self::Read, Self::Write);
}

/// One half of a relay: a TCP socket half can be spliced from or to.
pub trait Half {
    /// The socket under this half, when it is a plain TCP socket.
    fn socket(&self) -> Option<&TcpStream> {
        None
    }
}

impl Half for tokio::net::tcp::OwnedReadHalf {
    fn socket(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl Half for tokio::net::tcp::OwnedWriteHalf {
    fn socket(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl<T> Half for tokio::io::ReadHalf<T> {}
impl<T> Half for tokio::io::WriteHalf<T> {}

impl RelayEnd for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl RelayEnd for TokioIo<hyper::upgrade::Upgraded> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

impl RelayEnd for tokio::io::DuplexStream {
    type Read = tokio::io::ReadHalf<tokio::io::DuplexStream>;
    type Write = tokio::io::WriteHalf<tokio::io::DuplexStream>;
    fn halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

/// TLS to an `https://` parent: relayed by copying, and kept boxed (a TLS
/// session is kilobytes; unboxed it would be inline in the tunnel's future).
impl RelayEnd for Box<tokio_rustls::client::TlsStream<TcpStream>> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

/// Sends `first` (bytes already read from the client) upstream, then relays.
pub(in crate::proxy) async fn relay_after<C, U>(client: C, mut upstream: U, first: Vec<u8>, idle: Duration, counts: &RelayCounts)
where
    C: RelayEnd,
    U: RelayEnd,
{
    if !first.is_empty() {
        match tokio::time::timeout(idle, upstream.write_all(&first)).await {
            Ok(Ok(())) => counts.sent.fetch_add(first.len() as u64, Ordering::Relaxed),
            _ => return,
        };
    }
    // The ClientHello buffer is not kept for the life of the tunnel.
    drop(first);
    relay_counted(client, upstream, idle, counts).await;
}

/// Bytes a tunnel has relayed so far, per direction. Each direction's copy
/// loop is the only writer of its counter; the tunnel's [`TunnelMeter`]
/// reads both every few seconds, so the shared metrics are not touched per read.
#[derive(Default)]
pub struct RelayCounts {
    pub(super) sent: AtomicU64,
    pub(super) received: AtomicU64,
}

impl RelayCounts {
    /// (client→upstream, upstream→client) bytes so far.
    pub fn get(&self) -> (u64, u64) {
        (self.sent.load(Ordering::Relaxed), self.received.load(Ordering::Relaxed))
    }
}

/// Adds an open tunnel's relayed bytes to the metrics: every
/// [`METER_EVERY`] what moved since the last time, and the rest at the end,
/// so the totals match the log line's and nothing is counted twice.
pub(in crate::proxy) struct TunnelMeter {
    bytes: RelayedBytes,
    counted: (u64, u64),
}

impl TunnelMeter {
    pub(in crate::proxy) fn new(bytes: RelayedBytes) -> Self {
        TunnelMeter { bytes, counted: (0, 0) }
    }

    /// Adds the difference between (`up`, `down`) and what was counted.
    pub(in crate::proxy) fn flush(&mut self, up: u64, down: u64) {
        self.bytes.add(up - self.counted.0, down - self.counted.1);
        self.counted = (up, down);
    }

    /// Flushes `counts` every [`METER_EVERY`]; never completes.
    pub(in crate::proxy) async fn run(&mut self, counts: &RelayCounts) -> std::convert::Infallible {
        loop {
            tokio::time::sleep(METER_EVERY).await;
            let (up, down) = counts.get();
            self.flush(up, down);
        }
    }
}

/// Copies both directions until each has seen EOF (propagating half-close)
/// or no byte has moved for `idle`. Returns (client→upstream, upstream→client) bytes.
pub async fn relay<C, U>(client: C, upstream: U, idle: Duration) -> (u64, u64)
where
    C: RelayEnd,
    U: RelayEnd,
{
    let counts = RelayCounts::default();
    relay_counted(client, upstream, idle, &counts).await;
    counts.get()
}

/// [`relay`], counting into `counts` as bytes move, so they can be read
/// while the relay runs.
pub async fn relay_counted<C, U>(client: C, upstream: U, idle: Duration, counts: &RelayCounts)
where
    C: RelayEnd,
    U: RelayEnd,
{
    let (mut client_read, mut client_write) = client.halves();
    let (mut up_read, mut up_write) = upstream.halves();
    let activity = Activity::new();
    let both = async {
        tokio::join!(
            copy_half(&mut client_read, &mut up_write, &counts.sent, &activity),
            copy_half(&mut up_read, &mut client_write, &counts.received, &activity),
        )
    };
    tokio::select! {
        _ = both => {}
        _ = activity.idle_for(idle) => tracing::debug!("tunnel idle timeout"),
    }
}

pub(super) async fn copy_half<R, W>(reader: &mut R, writer: &mut W, count: &AtomicU64, activity: &Activity)
where
    R: AsyncRead + Unpin + Half,
    W: AsyncWrite + Unpin + Half,
{
    let mut buf = vec![0u8; RELAY_BUF_START];
    loop {
        let n = match read_or_shrink(reader, &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        activity.touch();
        if writer.write_all(&buf[..n]).await.is_err() {
            return;
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        if n == buf.len() {
            if buf.len() < RELAY_BUF_MAX {
                buf.resize(buf.len() * 2, 0);
            } else if let Some(done) = splice_rest(reader.socket().zip(writer.socket()), &mut buf, count, activity).await {
                // A bulk transfer between two sockets: the rest moved in the
                // kernel. `done` says whether it ended at the end of stream.
                if !done {
                    return;
                }
                break;
            }
        }
    }
    // EOF from this side: pass the half-close on so the peer sees it while
    // the other direction keeps flowing.
    let _ = writer.shutdown().await;
}

/// Reads into `buf`; a grown buffer that waits longer than [`RELAY_QUIET`]
/// for data is replaced by a start-sized one first (reads are cancel-safe:
/// nothing is lost by giving up the first wait).
async fn read_or_shrink<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.len() > RELAY_BUF_START {
        if let Ok(read) = tokio::time::timeout(RELAY_QUIET, reader.read(buf)).await {
            return read;
        }
        *buf = vec![0u8; RELAY_BUF_START];
    }
    reader.read(buf).await
}

/// Relays the rest of a bulk transfer with `splice(2)` when both halves are
/// TCP sockets (Linux only). `None` when it cannot (another kind of stream,
/// no file descriptor left for the pipe): the caller goes on copying.
/// Otherwise `Some(true)` at the end of stream, `Some(false)` on an error;
/// the user-space buffer `buf` is freed once splicing starts, so a bulk
/// transfer does not keep 128 KiB per direction it no longer uses.
#[cfg(target_os = "linux")]
async fn splice_rest(
    sockets: Option<(&TcpStream, &TcpStream)>,
    buf: &mut Vec<u8>,
    count: &AtomicU64,
    activity: &Activity,
) -> Option<bool> {
    let (from, to) = sockets?;
    let pipe = crate::proxy::relay::splice::Pipe::new().ok()?;
    *buf = Vec::new();
    loop {
        match crate::proxy::relay::splice::move_chunk(from, to, &pipe, usize::MAX).await {
            Ok(0) => return Some(true),
            Ok(n) => {
                activity.touch();
                count.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => return Some(false),
        }
    }
}

#[cfg(not(target_os = "linux"))]
async fn splice_rest(_: Option<(&TcpStream, &TcpStream)>, _: &mut Vec<u8>, _: &AtomicU64, _: &Activity) -> Option<bool> {
    None
}

/// The time of the last byte moved, shared by both directions of a tunnel.
pub(in crate::proxy) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub(in crate::proxy) fn new() -> Self {
        Activity { start: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    pub(in crate::proxy) fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Completes once nothing has moved for `idle`.
    pub(in crate::proxy) async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let due = last + idle;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due.into()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use tokio::net::TcpListener;

    /// A client that shuts its write side still gets the whole answer.
    #[tokio::test]
    async fn half_close_propagates() {
        let origin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin_addr = origin.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = origin.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(format!("got {} bytes", got.len()).as_bytes()).await.unwrap();
        });
        let (client, proxy_side) = tokio::io::duplex(1024);
        let upstream = TcpStream::connect(origin_addr).await.unwrap();
        let relay = tokio::spawn(relay(proxy_side, upstream, Duration::from_secs(5)));
        let (mut r, mut w) = tokio::io::split(client);
        w.write_all(b"hello").await.unwrap();
        w.shutdown().await.unwrap();
        let mut answer = String::new();
        r.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer, "got 5 bytes");
        assert_eq!(relay.await.unwrap(), (5, 11));
    }

    /// A grown relay buffer that waits past the quiet time is replaced by
    /// a start-sized one; data that arrives in time is read into the big one.
    #[tokio::test]
    async fn grown_buffers_shrink_when_quiet() {
        let (mut writer, mut reader) = tokio::io::duplex(64 * 1024);
        let mut buf = vec![0u8; RELAY_BUF_MAX];
        writer.write_all(b"now").await.unwrap();
        assert_eq!(read_or_shrink(&mut reader, &mut buf).await.unwrap(), 3);
        assert_eq!(buf.len(), RELAY_BUF_MAX, "busy: kept");
        let late = tokio::spawn(async move {
            tokio::time::sleep(RELAY_QUIET * 2).await;
            writer.write_all(b"later").await.unwrap();
            writer
        });
        assert_eq!(read_or_shrink(&mut reader, &mut buf).await.unwrap(), 5);
        assert_eq!(&buf[..5], b"later", "nothing lost across the shrink");
        assert_eq!(buf.len(), RELAY_BUF_START, "quiet: shrunk");
        drop(late.await.unwrap());
    }

    /// Each flush adds only what moved since the last one, so the periodic
    /// flushes and the final one add up to the tunnel's totals.
    #[test]
    fn meter_adds_only_what_moved_since_the_last_flush() {
        let metrics = Metrics::new();
        let mut meter = TunnelMeter::new(metrics.relayed_bytes_for("team-a"));
        let counted = |role: &str, direction: &str| {
            let all = metrics.relayed_bytes.with_label_values(&[direction]).get();
            let by_role = metrics.role_relayed_bytes.with_label_values(&[role, direction]).get();
            assert_eq!(all, by_role, "{direction}");
            all
        };
        for (up, down) in [(0, 0), (10, 0), (10, 5), (250, 5), (250, 5), (1 << 40, 7)] {
            meter.flush(up, down);
            assert_eq!((counted("team-a", "client_to_upstream"), counted("team-a", "upstream_to_client")), (up, down));
        }
    }

    #[tokio::test]
    async fn idle_tunnel_is_closed() {
        let origin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin_addr = origin.local_addr().unwrap();
        let _keep = tokio::spawn(async move {
            let (s, _) = origin.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let (_client, proxy_side) = tokio::io::duplex(1024);
        let upstream = TcpStream::connect(origin_addr).await.unwrap();
        let started = Instant::now();
        let counts = tokio::time::timeout(Duration::from_secs(10), relay(proxy_side, upstream, Duration::from_millis(200)))
            .await
            .expect("idle timeout must end the relay");
        assert_eq!(counts, (0, 0));
        assert!(started.elapsed() >= Duration::from_millis(200));
    }
}
