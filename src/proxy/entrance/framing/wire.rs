//! The watch on a client connection's bytes: requests followed head by
//! head and body by body as hyper reads them, to see what hyper's parsed
//! request no longer shows (both Content-Length and Transfer-Encoding, an
//! unfinished head, an overlong target).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::refusal::Refusal;

/// hyper's longest accepted request target (`MAX_URI_LEN` in hyper's h1 role).
const HYPER_MAX_URI_LEN: usize = u16::MAX as usize - 1;
/// hyper's default limit on request header lines.
const HYPER_MAX_HEADERS: usize = 100;

/// What the watch on one client connection saw, shared with the service
/// that serves the connection's requests.
#[derive(Debug, Default)]
pub struct Wire {
    /// The 1-based number of the first request head that carried both
    /// Content-Length and Transfer-Encoding; 0 when none did.
    conflicting_head: AtomicU64,
    /// Bytes of a request head that is not complete yet have arrived.
    partial_head: AtomicBool,
    /// The last complete head had a target longer than hyper accepts.
    long_uri: AtomicBool,
    /// Requests handed to the service so far.
    served: AtomicU64,
}

impl Wire {
    /// Called once per request by the service: whether this request's head
    /// carried both Content-Length and Transfer-Encoding. The watch has
    /// parsed a head before hyper has, so it is never behind.
    pub fn next_request_conflicting(&self) -> bool {
        let number = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        self.conflicting_head.load(Ordering::Relaxed) == number
    }

    /// Classifies the error a client connection ended with: the refusal to
    /// log, and the status hyper answered with (`None`: it answered
    /// nothing). A client that went away, or an idle keep-alive connection
    /// that timed out without a byte, is no refusal.
    pub fn refusal_of(&self, e: &hyper::Error) -> Option<(Refusal, Option<StatusCode>)> {
        if e.is_parse_too_large() {
            return Some(match self.long_uri.load(Ordering::Relaxed) {
                true => (Refusal::UriTooLong, Some(StatusCode::URI_TOO_LONG)),
                false => (Refusal::HeadTooLarge, Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)),
            });
        }
        if e.is_parse_version_h2() {
            return Some((Refusal::MalformedRequest, None));
        }
        if e.is_parse() {
            return Some((Refusal::MalformedRequest, Some(StatusCode::BAD_REQUEST)));
        }
        if e.is_timeout() && self.partial_head.load(Ordering::Relaxed) {
            return Some((Refusal::HeadTimeout, None));
        }
        None
    }
}

/// A client connection whose incoming bytes are followed request by
/// request (head, then body by its framing), as hyper reads them, to see
/// what hyper's parsed request no longer shows. Writes pass through.
pub struct WatchedIo<I> {
    inner: I,
    tracker: Tracker,
}

impl<I> WatchedIo<I> {
    /// Watches `inner`, reporting into `wire`. A head that grows past twice
    /// `max_head` (hyper refuses it by then) stops the watch.
    pub fn new(inner: I, wire: Arc<Wire>, max_head: usize) -> Self {
        WatchedIo { inner, tracker: Tracker::new(wire, max_head.saturating_mul(2)) }
    }

    /// The connection itself (after an upgrade, for a CONNECT tunnel).
    pub fn into_inner(self) -> I {
        self.inner
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WatchedIo<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.tracker.feed(&buf.filled()[before..]);
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WatchedIo<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Where the watch is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// In a request head (its bytes so far are in `Tracker::head`).
    Head,
    /// In a body of known length: this many bytes remain.
    Sized(u64),
    /// In a chunked body.
    Chunked(Chunk),
    /// Nothing more to follow: hyper refuses what came, the connection
    /// closes after this request, or it no longer carries requests.
    Off,
}

/// The chunked decoder's states, as in hyper's (`proto/h1/decode.rs`), so
/// both find the same end of a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    Start,
    Size(u64),
    SizeLws(u64),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
}

struct Tracker {
    wire: Arc<Wire>,
    position: Position,
    /// The bytes of the head being read, when it spans reads.
    head: Vec<u8>,
    max_head: usize,
    heads: u64,
}

impl Tracker {
    fn new(wire: Arc<Wire>, max_head: usize) -> Self {
        Tracker { wire, position: Position::Head, head: Vec::new(), max_head, heads: 0 }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            bytes = match self.position {
                Position::Off => return,
                Position::Head => self.feed_head(bytes),
                Position::Sized(remaining) => {
                    let skip = usize::try_from(remaining).map_or(bytes.len(), |r| r.min(bytes.len()));
                    let left = remaining - skip as u64;
                    self.position = if left == 0 { Position::Head } else { Position::Sized(left) };
                    &bytes[skip..]
                }
                Position::Chunked(chunk) => self.feed_chunked(chunk, bytes),
            };
        }
    }

    /// Consumes head bytes; returns what follows the head.
    fn feed_head<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        let held = self.head.len();
        if held == 0 {
            match self.parse(bytes, 0) {
                Some(len) => return &bytes[len..],
                None if self.position == Position::Head => self.hold(bytes),
                None => {}
            }
            return &[];
        }
        self.hold(bytes);
        if self.position != Position::Head {
            return &[];
        }
        let head = std::mem::take(&mut self.head);
        match self.parse(&head, held) {
            // The head was incomplete before `bytes`, so it ends inside them.
            Some(len) => &bytes[len.saturating_sub(held).min(bytes.len())..],
            None => {
                if self.position == Position::Head {
                    self.head = head;
                }
                &[]
            }
        }
    }

    /// Keeps the bytes of an unfinished head, up to the limit.
    fn hold(&mut self, bytes: &[u8]) {
        self.head.extend_from_slice(bytes);
        if self.head.len() > self.max_head {
            return self.stop();
        }
        // Empty lines before a request line are skipped by hyper (and
        // sent by some clients after a body): they begin no head.
        if bytes.iter().any(|&b| b != b'\r' && b != b'\n') {
            self.wire.partial_head.store(true, Ordering::Relaxed);
        }
    }

    fn stop(&mut self) {
        self.position = Position::Off;
        self.head = Vec::new();
        self.wire.partial_head.store(false, Ordering::Relaxed);
    }

    /// Parses a complete head at the start of `bytes` as hyper does, and
    /// moves to its body; `None` while the head is incomplete (or after
    /// stopping). Bytes before `new` were scanned already: a head is only
    /// parsed again once an empty line may have ended it.
    fn parse(&mut self, bytes: &[u8], new: usize) -> Option<usize> {
        if !has_empty_line(&bytes[new.saturating_sub(2)..]) {
            return None;
        }
        // Uninitialised slots: initialising 100 empty headers on every
        // request cost more than parsing a typical head.
        let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; HYPER_MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let len = match req.parse_with_uninit_headers(bytes, &mut headers) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return None,
            Err(_) => {
                self.stop();
                return None;
            }
        };
        self.heads += 1;
        self.wire.partial_head.store(false, Ordering::Relaxed);
        self.wire.long_uri.store(req.path.is_some_and(|p| p.len() > HYPER_MAX_URI_LEN), Ordering::Relaxed);
        self.position = match body_framing(&req) {
            Framing::Conflicting => {
                self.wire.conflicting_head.store(self.heads, Ordering::Relaxed);
                Position::Off
            }
            Framing::Refused => Position::Off,
            Framing::Chunked => Position::Chunked(Chunk::Start),
            Framing::Sized(0) => Position::Head,
            Framing::Sized(len) => Position::Sized(len),
        };
        if self.position == Position::Off {
            self.stop();
        }
        Some(len)
    }

    /// Consumes chunked-body bytes; returns what follows the body.
    fn feed_chunked<'a>(&mut self, mut chunk: Chunk, mut bytes: &'a [u8]) -> &'a [u8] {
        while let Some((&byte, rest)) = bytes.split_first() {
            if let Chunk::Data(remaining) = chunk {
                let skip = usize::try_from(remaining).map_or(bytes.len(), |r| r.min(bytes.len()));
                let left = remaining - skip as u64;
                chunk = if left == 0 { Chunk::DataCr } else { Chunk::Data(left) };
                bytes = &bytes[skip..];
                continue;
            }
            bytes = rest;
            match next_chunk_state(chunk, byte) {
                Some(Some(next)) => chunk = next,
                Some(None) => {
                    self.position = Position::Head;
                    return bytes;
                }
                None => {
                    self.stop();
                    return &[];
                }
            }
        }
        self.position = Position::Chunked(chunk);
        &[]
    }
}

/// Whether `bytes` holds `\n\n` or `\n\r\n`: a line feed followed by an
/// empty line, which may end a head. Jumps from line feed to line feed
/// instead of comparing a window at every byte (this runs on every head).
fn has_empty_line(bytes: &[u8]) -> bool {
    let mut rest = bytes;
    while let Some(at) = rest.iter().position(|&b| b == b'\n') {
        rest = &rest[at + 1..];
        if rest.first() == Some(&b'\n') || rest.starts_with(b"\r\n") {
            return true;
        }
    }
    false
}

/// How a request head frames its body, judged as hyper judges it.
pub(crate) enum Framing {
    Sized(u64),
    Chunked,
    /// Both Content-Length and Transfer-Encoding.
    Conflicting,
    /// hyper refuses the head.
    Refused,
}

pub(crate) fn body_framing(req: &httparse::Request<'_, '_>) -> Framing {
    let mut length: Option<u64> = None;
    let mut chunked = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("content-length") {
            match (digits(h.value), length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(prev)) if n == prev => {}
                // hyper skips a Content-Length after Transfer-Encoding
                // unparsed; either way, both were sent.
                _ if chunked.is_some() => return Framing::Conflicting,
                _ => return Framing::Refused,
            }
        }
    }
    match (chunked, length) {
        (Some(_), _) if req.version != Some(1) => Framing::Refused,
        (Some(_), Some(_)) => Framing::Conflicting,
        (Some(true), None) => Framing::Chunked,
        (Some(false), None) => Framing::Refused,
        (None, length) => Framing::Sized(length.unwrap_or(0)),
    }
}

/// A Content-Length value as hyper reads it: ASCII digits only.
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| match b {
        b'0'..=b'9' => n.checked_mul(10)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}

/// One step of the chunked decoder: `Some(Some(state))` to go on,
/// `Some(None)` at the end of the body, `None` where hyper fails the body.
pub(crate) fn next_chunk_state(chunk: Chunk, byte: u8) -> Option<Option<Chunk>> {
    let hex = |size: u64| {
        let digit = (byte as char).to_digit(16)?;
        size.checked_mul(16)?.checked_add(u64::from(digit))
    };
    let next = match (chunk, byte) {
        (Chunk::Start, _) => Chunk::Size(hex(0)?),
        (Chunk::Size(size), b'\t' | b' ') | (Chunk::SizeLws(size), b'\t' | b' ') => Chunk::SizeLws(size),
        (Chunk::Size(size) | Chunk::SizeLws(size), b';') => Chunk::Extension(size),
        (Chunk::Size(size) | Chunk::SizeLws(size) | Chunk::Extension(size), b'\r') => Chunk::SizeLf(size),
        (Chunk::Size(size), _) => Chunk::Size(hex(size)?),
        (Chunk::SizeLws(_), _) | (Chunk::Extension(_), b'\n') => return None,
        (Chunk::Extension(size), _) => Chunk::Extension(size),
        (Chunk::SizeLf(0), b'\n') => Chunk::EndCr,
        (Chunk::SizeLf(size), b'\n') => Chunk::Data(size),
        (Chunk::DataCr, b'\r') => Chunk::DataLf,
        (Chunk::DataLf, b'\n') => Chunk::Start,
        (Chunk::EndCr, b'\r') => Chunk::EndLf,
        (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
        (Chunk::EndCr | Chunk::Trailer, _) => Chunk::Trailer,
        (Chunk::TrailerLf, b'\n') => Chunk::EndCr,
        (Chunk::EndLf, b'\n') => return Some(None),
        (Chunk::SizeLf(_) | Chunk::DataCr | Chunk::DataLf | Chunk::TrailerLf | Chunk::EndLf, _) => return None,
        (Chunk::Data(0 | 1), _) => Chunk::DataCr,
        (Chunk::Data(left), _) => Chunk::Data(left - 1),
    };
    Some(Some(next))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The line-feed jump finds exactly what a window at every byte finds.
    #[test]
    fn empty_line_search_matches_a_window_scan() {
        let window_scan = |b: &[u8]| b.windows(2).any(|w| w == b"\n\n") || b.windows(3).any(|w| w == b"\n\r\n");
        let alphabet = [b'\n', b'\r', b'a'];
        // Every string of up to six bytes over line feed, return and a letter.
        for len in 0..=6u32 {
            for mut code in 0..3usize.pow(len) {
                let bytes: Vec<u8> = (0..len).map(|_| { let b = alphabet[code % 3]; code /= 3; b }).collect();
                assert_eq!(has_empty_line(&bytes), window_scan(&bytes), "{bytes:?}");
            }
        }
    }

    /// Feeds `wire_bytes` in pieces of `step` bytes; returns the number of
    /// heads seen, the conflicting head (0: none) and whether the watch
    /// still follows the stream.
    fn follow(wire_bytes: &[u8], step: usize) -> (u64, u64, bool) {
        let wire = Arc::new(Wire::default());
        let mut tracker = Tracker::new(wire.clone(), 1 << 16);
        for piece in wire_bytes.chunks(step) {
            tracker.feed(piece);
        }
        (tracker.heads, wire.conflicting_head.load(Ordering::Relaxed), tracker.position != Position::Off)
    }

    #[test]
    fn requests_are_followed_through_their_bodies() {
        let get = "GET http://a.test/ HTTP/1.1\r\nHost: a\r\n\r\n";
        // A body that looks like a head must not be taken for one.
        let decoy = "GET http://a.test/ HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let sized = format!("POST http://a.test/ HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{decoy}", decoy.len());
        let chunked = format!(
            "POST http://a.test/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n{:x};ext=1\r\n{decoy}\r\n0\r\nX-Trailer: 1\r\n\r\n",
            decoy.len()
        );
        let both = "POST http://a.test/ HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let both_reversed = "POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: x\r\n\r\n0\r\n\r\n";
        let cases: Vec<(String, (u64, u64, bool))> = vec![
            (get.to_string(), (1, 0, true)),
            (format!("\r\n{get}\r\n{get}"), (2, 0, true)),
            (format!("{sized}{get}"), (2, 0, true)),
            (format!("{chunked}{get}{chunked}"), (3, 0, true)),
            (format!("{get}{both}{get}"), (2, 2, false)),
            (format!("{sized}{both_reversed}"), (2, 2, false)),
            // hyper refuses these itself; the watch stops.
            ("POST http://a.test/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".to_string(), (1, 0, false)),
            ("POST http://a.test/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n".to_string(), (1, 0, false)),
            ("POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n".to_string(), (1, 0, false)),
            (format!("POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\nx\r\n0\r\n\r\n{get}"), (1, 0, false)),
            (format!("POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{}\r\n", "f".repeat(17)), (1, 0, false)),
            ("GET /\0 HTTP/1.1\r\n\r\n".to_string(), (0, 0, false)),
        ];
        for (bytes, want) in cases {
            for step in [1, 2, 7, bytes.len()] {
                assert_eq!(follow(bytes.as_bytes(), step), want, "step {step}: {bytes:?}");
            }
        }
    }

    /// Random sequences of requests, cut into random pieces: the watch
    /// counts every head up to the first one hyper refuses or that carries
    /// both headers, wherever the reads happen to split the stream.
    #[test]
    fn any_split_of_any_sequence_is_followed_the_same() {
        let decoy = "GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        // (bytes, what the watch does after it: go on, or stop with or
        // without noting a conflicting head)
        let blocks: [(String, Option<bool>); 6] = [
            ("GET http://a.test/ HTTP/1.1\r\nHost: a\r\n\r\n".to_string(), None),
            (format!("PUT http://a.test/ HTTP/1.1\r\nContent-Length: {}\r\n\r\n{decoy}", decoy.len()), None),
            (format!("POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n{:X} ; x=y\r\n{decoy}\r\n0\r\nT: 1\r\n\r\n", decoy.len()), None),
            ("\r\n".to_string(), None),
            ("POST http://a.test/ HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n".to_string(), Some(true)),
            ("POST http://a.test/ HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n".to_string(), Some(false)),
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |bound: usize| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as usize % bound
        };
        for _ in 0..500 {
            let mut bytes = Vec::new();
            let (mut heads, mut conflicting, mut stopped) = (0u64, 0u64, false);
            for _ in 0..1 + next(6) {
                let (block, stop) = &blocks[next(blocks.len())];
                bytes.extend_from_slice(block.as_bytes());
                if stopped || block == "\r\n" {
                    continue;
                }
                heads += 1;
                if let Some(noted) = stop {
                    stopped = true;
                    conflicting = if *noted { heads } else { 0 };
                }
            }
            let wire = Arc::new(Wire::default());
            let mut tracker = Tracker::new(wire.clone(), 1 << 16);
            let mut rest = bytes.as_slice();
            while !rest.is_empty() {
                let (piece, after) = rest.split_at((1 + next(40)).min(rest.len()));
                tracker.feed(piece);
                rest = after;
            }
            let got = (tracker.heads, wire.conflicting_head.load(Ordering::Relaxed), tracker.position == Position::Off);
            assert_eq!(got, (heads, conflicting, stopped), "{:?}", String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn an_unfinished_head_is_noticed_and_blank_lines_are_not() {
        let wire = Arc::new(Wire::default());
        let mut tracker = Tracker::new(wire.clone(), 1 << 16);
        tracker.feed(b"\r\n");
        assert!(!wire.partial_head.load(Ordering::Relaxed));
        tracker.feed(b"GET http://a.test/ HTTP/1.1\r\nHo");
        assert!(wire.partial_head.load(Ordering::Relaxed));
        tracker.feed(b"st: a\r\n\r\n");
        assert!(!wire.partial_head.load(Ordering::Relaxed));
        assert_eq!(tracker.heads, 1);
    }

    #[test]
    fn an_oversize_head_stops_the_watch() {
        let wire = Arc::new(Wire::default());
        let mut tracker = Tracker::new(wire.clone(), 100);
        tracker.feed(format!("GET http://a.test/{} HTTP/1.1\r\n", "a".repeat(100)).as_bytes());
        assert_eq!(tracker.position, Position::Off);
        assert!(tracker.head.capacity() == 0 && !wire.partial_head.load(Ordering::Relaxed));
    }
}
