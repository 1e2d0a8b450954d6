//! Zero-copy relay between two TCP sockets on Linux.
//!
//! `splice(2)` moves the pages of received segments from one socket into a
//! pipe and from the pipe into the other socket, so a bulk transfer through
//! a tunnel never copies its bytes into user space and back. A relay half
//! switches to it only once a transfer shows itself as bulk (see
//! `connect::copy_half`): an idle tunnel keeps no pipe, so it costs no file
//! descriptors beyond its two sockets.
//!
//! Pipes are counted (red team N4): the descriptors the limits promise to
//! connections, pooled sockets and the reserve ([`promise`]) are never
//! taken by a pipe. A pipe is opened only from what the open-file limit
//! leaves beyond them; when none is left, a tunnel copies through user
//! space, so one client's bulk transfers cannot starve another's accepts,
//! dials and DNS sockets.
//!
//! The syscalls go through `nix`, so the crate stays `forbid(unsafe_code)`.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Pipe capacity asked for, and the most bytes moved per `splice` call:
/// fewer, larger calls per megabyte. Pages are moved, not copied, so a
/// larger pipe costs memory only while data is in flight. When the kernel
/// refuses the size (`fs.pipe-max-size`), the default 64 KiB is used.
const PIPE_BYTES: usize = 1024 * 1024;

/// Descriptors promised to what the limits allow (see [`promise`]).
static PROMISED: AtomicU64 = AtomicU64::new(0);
/// Pipes open now, each two descriptors.
static PIPES: AtomicU64 = AtomicU64::new(0);

/// Records that the limits in force may need `fds` descriptors at once
/// (`Limits::fds_needed`); pipes use only what the open-file limit leaves
/// beyond them. The limit is one per process, and so is this budget.
pub fn promise(fds: u64) {
    PROMISED.store(fds, Ordering::Relaxed);
}

/// How many pipes may be open at once now: half of what the open-file
/// limit leaves beyond the promised descriptors.
fn pipes_allowed() -> u64 {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(0, |(soft, _)| soft);
    soft.saturating_sub(PROMISED.load(Ordering::Relaxed)) / 2
}

/// A non-blocking pipe that carries one direction of a tunnel.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

/// A Linux pipe's capacity unless resized.
const DEFAULT_PIPE_BYTES: usize = 64 * 1024;

impl Pipe {
    /// A new pipe within the budget; fails when the budget has none left
    /// (or the process is out of file descriptors), in which case the
    /// caller keeps copying through user space.
    pub fn new() -> io::Result<Pipe> {
        let allowed = pipes_allowed();
        if PIPES.fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| (open < allowed).then_some(open + 1)).is_err() {
            return Err(io::Error::other("no descriptors left in the budget for a splice pipe"));
        }
        let (read, write) = match nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) {
            Ok(ends) => ends,
            Err(e) => {
                PIPES.fetch_sub(1, Ordering::AcqRel);
                return Err(e.into());
            }
        };
        let capacity = match fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_BYTES as i32)) {
            Ok(size) => size as usize,
            Err(_) => DEFAULT_PIPE_BYTES,
        };
        Ok(Pipe { read, write, capacity })
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        PIPES.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Moves the next chunk of bytes that `from` has received to `to`, at most
/// `max` (a body's remaining length: nothing behind it is taken). Returns
/// how many bytes moved, 0 at end of stream. Every byte taken from `from`
/// has been handed to `to` when this returns `Ok`, so the pipe is empty
/// between calls.
pub async fn move_chunk(from: &TcpStream, to: &TcpStream, pipe: &Pipe, max: usize) -> io::Result<usize> {
    let want = max.min(pipe.capacity);
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    // The pipe is empty here, so `EAGAIN` can only mean that `from` has
    // nothing to read; `async_io` then waits for readiness and retries.
    let taken = from
        .async_io(Interest::READABLE, || {
            splice(from.as_fd(), None, pipe.write.as_fd(), None, want, flags).map_err(io::Error::from)
        })
        .await?;
    let mut left = taken;
    while left > 0 {
        // `EAGAIN` here means the send buffer of `to` is full.
        let given = to
            .async_io(Interest::WRITABLE, || {
                splice(pipe.read.as_fd(), None, to.as_fd(), None, left, flags).map_err(io::Error::from)
            })
            .await?;
        if given == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "splice wrote nothing"));
        }
        left -= given;
    }
    Ok(taken)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// Bytes written into one connection come out of the other unchanged,
    /// in order, and the end of stream is reported once the writer closes.
    #[tokio::test]
    async fn moves_every_byte_in_order_then_reports_eof() {
        let (mut writer, from) = pair().await;
        let (to, mut reader) = pair().await;
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let producer = tokio::spawn(async move {
            writer.write_all(&data).await.unwrap();
            writer.shutdown().await.unwrap();
        });
        let consumer = tokio::spawn(async move {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).await.unwrap();
            got
        });
        let pipe = Pipe::new().unwrap();
        let mut moved = 0;
        loop {
            let n = move_chunk(&from, &to, &pipe, usize::MAX).await.unwrap();
            if n == 0 {
                break;
            }
            assert!(n <= pipe.capacity);
            moved += n;
        }
        drop(to);
        producer.await.unwrap();
        assert_eq!(moved, expected.len());
        assert!(consumer.await.unwrap() == expected, "bytes changed on the way");
    }
}
