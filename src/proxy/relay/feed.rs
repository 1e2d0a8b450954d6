//! One direction of a relay read through a buffer, for plain HTTP inside a
//! tunnel: a head is parsed where its bytes lie, and a body moves on with
//! the opaque relay's means (spliced between two TCP sockets, copied in
//! large reads otherwise), exactly as far as its framing says.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::copy::{copy_half, Activity, Half, RELAY_BUF_MAX, RELAY_BUF_START};

/// A body with at least this much left, between two TCP sockets, is
/// spliced rather than copied.
const SPLICE_FROM: u64 = RELAY_BUF_MAX as u64;

/// A reading half and the bytes read from it but not yet used
/// (`buf[start..end]`).
pub(super) struct Feed<R> {
    reader: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<R: AsyncRead + Unpin + Half> Feed<R> {
    /// A feed whose first bytes are `early` (already read elsewhere).
    pub(super) fn new(reader: R, early: Vec<u8>) -> Self {
        let end = early.len();
        Feed { reader, buf: early, start: 0, end }
    }

    /// The bytes read and not yet used.
    pub(super) fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Marks the first `n` buffered bytes as used.
    pub(super) fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
    }

    /// Reads more bytes behind the buffered ones, with room for up to
    /// `limit` buffered bytes (the buffer grows by doubling). Returns how
    /// many arrived, 0 at the end of the stream or when `limit` bytes are
    /// buffered already.
    pub(super) async fn fill(&mut self, limit: usize) -> io::Result<usize> {
        if self.end == self.buf.len() && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        if self.end == self.buf.len() {
            let grown = (self.buf.len() * 2).clamp(RELAY_BUF_START, limit.max(RELAY_BUF_START));
            if grown <= self.buf.len() {
                return Ok(0);
            }
            self.buf.resize(grown, 0);
        }
        let n = self.reader.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Gives back a grown buffer once nothing is buffered, so a tunnel
    /// idles as cheaply after a bulk body as before it.
    pub(super) fn settle(&mut self) {
        if self.start == self.end && self.buf.len() > RELAY_BUF_START {
            self.buf = vec![0u8; RELAY_BUF_START];
            (self.start, self.end) = (0, 0);
        }
    }

    /// Moves the next `n` bytes of the stream to `writer`: the buffered
    /// ones first, then the rest in bulk. Fails with `UnexpectedEof` when
    /// the stream ends before.
    pub(super) async fn pass<W>(&mut self, writer: &mut W, mut n: u64, moved: &AtomicU64, activity: &Activity) -> io::Result<()>
    where
        W: AsyncWrite + Unpin + Half,
    {
        while n > 0 {
            let ready = self.buffered();
            if !ready.is_empty() {
                let k = usize::try_from(n).map_or(ready.len(), |n| n.min(ready.len()));
                writer.write_all(&ready[..k]).await?;
                self.consume(k);
                n -= k as u64;
                moved.fetch_add(k as u64, Ordering::Relaxed);
                activity.touch();
                continue;
            }
            if n >= SPLICE_FROM {
                if let Some(spliced) = splice_exact(self.reader.socket().zip(writer.socket()), n, moved, activity).await {
                    return spliced;
                }
            }
            // Large reads for a large body; what arrives behind it stays buffered.
            let want = usize::try_from(n).map_or(RELAY_BUF_MAX, |n| n.clamp(RELAY_BUF_START, RELAY_BUF_MAX));
            if self.buf.len() < want {
                self.buf.resize(want.next_power_of_two().min(RELAY_BUF_MAX), 0);
            }
            if self.fill(self.buf.len()).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    /// Moves the buffered bytes and then everything until the end of the
    /// stream to `writer` with the opaque relay, and passes the end on.
    pub(super) async fn pass_to_end<W>(&mut self, writer: &mut W, moved: &AtomicU64, activity: &Activity)
    where
        W: AsyncWrite + Unpin + Half,
    {
        let ready = self.buffered().len() as u64;
        if self.pass(writer, ready, moved, activity).await.is_err() {
            return;
        }
        self.buf = Vec::new();
        copy_half(&mut self.reader, writer, moved, activity).await;
    }
}

/// Moves exactly `n` bytes from one TCP socket to another through a pipe
/// (Linux). `None` when it cannot (not two sockets, no pipe in the
/// budget): the caller copies.
#[cfg(target_os = "linux")]
async fn splice_exact(
    sockets: Option<(&tokio::net::TcpStream, &tokio::net::TcpStream)>,
    mut n: u64,
    moved: &AtomicU64,
    activity: &Activity,
) -> Option<io::Result<()>> {
    let (from, to) = sockets?;
    let pipe = super::splice::Pipe::new().ok()?;
    while n > 0 {
        let max = usize::try_from(n).unwrap_or(usize::MAX);
        match super::splice::move_chunk(from, to, &pipe, max).await {
            Ok(0) => return Some(Err(io::ErrorKind::UnexpectedEof.into())),
            Ok(k) => {
                n -= k as u64;
                moved.fetch_add(k as u64, Ordering::Relaxed);
                activity.touch();
            }
            Err(e) => return Some(Err(e)),
        }
    }
    Some(Ok(()))
}

#[cfg(not(target_os = "linux"))]
async fn splice_exact(
    _: Option<(&tokio::net::TcpStream, &tokio::net::TcpStream)>,
    _: u64,
    _: &AtomicU64,
    _: &Activity,
) -> Option<io::Result<()>> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body moves exactly as far as asked, whatever the reads deliver;
    /// the bytes behind it stay for the next head.
    #[tokio::test]
    async fn pass_moves_exactly_n_bytes_and_keeps_the_rest() {
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        for (early, n) in [(0usize, 500_000u64), (10, 5), (1000, 400_000), (0, 1)] {
            let (mut tx, rx) = tokio::io::duplex(64 * 1024);
            let sent = data[early..].to_vec();
            let writer = tokio::spawn(async move {
                // Whatever is not read stays unwritten once the test drops its end.
                let _ = tx.write_all(&sent).await;
            });
            let (read_half, _) = tokio::io::split(rx);
            let mut feed = Feed::new(read_half, data[..early].to_vec());
            let (out, mut sink) = tokio::io::duplex(1 << 20);
            let (_, mut out) = tokio::io::split(out);
            let moved = AtomicU64::new(0);
            feed.pass(&mut out, n, &moved, &Activity::new()).await.unwrap();
            assert_eq!(moved.load(Ordering::Relaxed), n);
            let mut got = vec![0u8; n as usize];
            sink.read_exact(&mut got).await.unwrap();
            assert!(got == data[..n as usize], "early {early}, n {n}");
            if let Some(&next) = feed.buffered().first() {
                assert_eq!(next, data[n as usize], "what follows is kept in order");
            }
            drop(feed);
            writer.await.unwrap();
        }
    }
}
