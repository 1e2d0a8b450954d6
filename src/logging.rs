//! Log output: every line (decision lines and the proxy's own events) is
//! appended to one in-memory batch, and a dedicated thread writes batches
//! to the output.
//!
//! A request never waits on a write to stdout (a slow log collector or a
//! full pipe would otherwise stall the runtime's worker threads), costs no
//! system call and no thread wake-up per line: the writer thread is woken
//! once per batch and collects lines for [`BATCH_WINDOW`] before writing
//! them with one call. Pending output is bounded by [`MAX_PENDING`]; beyond
//! it lines are dropped and counted ([`dropped_lines`], exported as
//! `portcullis_log_lines_dropped_total`) rather than blocking requests.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the writer collects lines after the first one of a batch.
pub const BATCH_WINDOW: Duration = Duration::from_millis(10);
/// A batch this large is written at once, without waiting for the window.
const FLUSH_BYTES: usize = 256 * 1024;
/// Most bytes waiting to be written; lines beyond are dropped and counted.
pub const MAX_PENDING: usize = 16 * 1024 * 1024;

static DROPPED: AtomicU64 = AtomicU64::new(0);
static SINK: OnceLock<Arc<LogSink>> = OnceLock::new();

/// Lines dropped because the output could not keep up.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The process-wide sink, when [`LogSink::install`] was called.
pub fn sink() -> Option<&'static Arc<LogSink>> {
    SINK.get()
}

/// The shared batch of lines waiting for the writer thread.
pub struct LogSink {
    pending: Mutex<Pending>,
    wake: Condvar,
}

struct Pending {
    buf: Vec<u8>,
    /// When the oldest waiting line arrived.
    since: Option<Instant>,
    closed: bool,
}

/// Stops the writer thread when dropped, after it wrote everything pending.
pub struct LogGuard {
    sink: Arc<LogSink>,
    thread: Option<JoinHandle<()>>,
}

impl LogSink {
    /// Starts a writer thread for `out`. The sink is not global; see
    /// [`LogSink::install`].
    pub fn start<W: Write + Send + 'static>(out: W) -> std::io::Result<(Arc<LogSink>, LogGuard)> {
        let sink = Arc::new(LogSink {
            pending: Mutex::new(Pending { buf: Vec::with_capacity(FLUSH_BYTES), since: None, closed: false }),
            wake: Condvar::new(),
        });
        let writer = sink.clone();
        let thread = std::thread::Builder::new().name("portcullis-log".into()).spawn(move || writer.write_loop(out))?;
        Ok((sink.clone(), LogGuard { sink, thread: Some(thread) }))
    }

    /// Starts the writer for `out` and makes it the process-wide sink used
    /// by decision lines. Fails when one is installed already.
    pub fn install<W: Write + Send + 'static>(out: W) -> std::io::Result<(Arc<LogSink>, LogGuard)> {
        let (sink, guard) = Self::start(out)?;
        SINK.set(sink.clone())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::AlreadyExists, "a log sink is installed already"))?;
        Ok((sink, guard))
    }

    /// Queues one complete line (with its newline).
    pub fn append(&self, line: &[u8]) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.buf.len() + line.len() > MAX_PENDING {
            drop(pending);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        pending.buf.extend_from_slice(line);
        let first = pending.since.is_none();
        if first {
            pending.since = Some(Instant::now());
        }
        let full = pending.buf.len() >= FLUSH_BYTES;
        drop(pending);
        // One wake-up per batch: when it starts, and when it is full.
        if first || full {
            self.wake.notify_one();
        }
    }

    fn write_loop<W: Write>(&self, mut out: W) {
        let mut batch = Vec::with_capacity(FLUSH_BYTES);
        loop {
            let closed = {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if pending.closed || pending.buf.len() >= FLUSH_BYTES {
                        break;
                    }
                    match pending.since {
                        None => pending = self.wake.wait(pending).unwrap_or_else(|e| e.into_inner()),
                        Some(since) => {
                            let waited = since.elapsed();
                            if waited >= BATCH_WINDOW {
                                break;
                            }
                            pending = self.wake.wait_timeout(pending, BATCH_WINDOW - waited).unwrap_or_else(|e| e.into_inner()).0;
                        }
                    }
                }
                std::mem::swap(&mut pending.buf, &mut batch);
                pending.since = None;
                pending.closed
            };
            if !batch.is_empty() {
                // A failing output (closed stdout) cannot be reported
                // anywhere better; the lines are lost, the proxy goes on.
                let _ = out.write_all(&batch).and_then(|()| out.flush());
                batch.clear();
            }
            if closed {
                return;
            }
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.sink.pending.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.sink.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `tracing-subscriber` formats each event into one buffer and writes it
/// with a single `write_all`, so each write here is one whole line.
#[derive(Clone)]
pub struct SinkWriter(pub Arc<LogSink>);

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SinkWriter {
    type Writer = SinkWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Writes `s` as a JSON string (with quotes) into `out`.
pub fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // Most strings need no escape: one pass to check, one copy.
    if !needs_escape(bytes) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f | 0x7f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            out.extend_from_slice(format!("\\u{b:04x}").as_bytes());
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Whether `bytes` holds a byte a JSON string must escape (a control
/// character, `"`, `\\` or DEL). Eight bytes at a time: this runs over
/// every string of every decision line.
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Exact for "some byte is zero" and "some byte is below n <= 128"
    // (bytes of 0x80 and above never count: `!x` clears their high bit).
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH != 0;
    let has_below_space = |x: u64| x.wrapping_sub(ONES * 0x20) & !x & HIGH != 0;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let x = u64::from_le_bytes(word.try_into().expect("chunks_exact yields 8 bytes"));
        if has_below_space(x) || has_zero(x ^ (ONES * u64::from(b'"'))) || has_zero(x ^ (ONES * u64::from(b'\\'))) || has_zero(x ^ (ONES * 0x7f)) {
            return true;
        }
    }
    words.remainder().iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f)
}

/// Writes `n` in decimal (no `fmt` machinery: the decision line writes
/// several numbers per request).
pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    push_padded(out, n, 1);
}

/// Writes `n` in decimal with at least `width` (at most 20) digits.
fn push_padded(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at.min(digits.len().saturating_sub(width))..]);
}

/// Writes a decision line (the `portcullis::access` target) built by
/// `write`: to the binary's sink, or through tracing for a library user
/// without one. Nothing is built when the target is off.
pub fn write_access_line(capacity: usize, write: impl FnOnce(&mut Vec<u8>)) {
    if !tracing::enabled!(target: "portcullis::access", tracing::Level::INFO) {
        return;
    }
    let mut line = Vec::with_capacity(capacity);
    write(&mut line);
    match sink() {
        Some(sink) => sink.append(&line),
        None => tracing::info!(target: "portcullis::access", line = %String::from_utf8_lossy(&line).trim_end()),
    }
}

/// The start every decision line shares: the timestamp, level, target and
/// the client's address, up to and including the address's closing quote.
pub fn access_line_head(out: &mut Vec<u8>, client: std::net::SocketAddr) {
    out.extend_from_slice(b"{\"timestamp\":");
    json_timestamp(out, std::time::SystemTime::now());
    out.extend_from_slice(b",\"level\":\"INFO\",\"target\":\"portcullis::access\",\"client\":\"");
    push_socket_addr(out, client);
    out.push(b'"');
}

/// The decision fields every decision line carries, in this order:
/// `decision`, `reason`, `role`, `identity`.
pub fn decision_fields(out: &mut Vec<u8>, decision: &str, reason: &str, role: &str, identity: &str) {
    out.extend_from_slice(b",\"decision\":");
    json_str(out, decision);
    out.extend_from_slice(b",\"reason\":");
    json_str(out, reason);
    out.extend_from_slice(b",\"role\":");
    json_str(out, role);
    out.extend_from_slice(b",\"identity\":");
    json_str(out, identity);
}

/// Writes a socket address as `Display` does (`1.2.3.4:80`,
/// `[2001:db8::1]:443`); IPv4 without the `fmt` machinery.
pub fn push_socket_addr(out: &mut Vec<u8>, addr: std::net::SocketAddr) {
    match addr {
        std::net::SocketAddr::V4(v4) => {
            crate::target::push_ipv4(out, *v4.ip());
            out.push(b':');
            push_u64(out, u64::from(v4.port()));
        }
        v6 => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// Writes the current UTC time as RFC 3339 with microseconds, quoted, the
/// same shape as the proxy's other log lines.
pub fn json_timestamp(out: &mut Vec<u8>, now: std::time::SystemTime) {
    let since = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    out.push(b'"');
    // The date and time to the second change once a second: written once
    // per second and thread, then copied (a line per request needs them).
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, Vec<u8>)> = const { std::cell::RefCell::new((u64::MAX, Vec::new())) };
    }
    SECOND.with_borrow_mut(|(at, text)| {
        if *at != secs {
            text.clear();
            push_date_time(text, secs);
            *at = secs;
        }
        out.extend_from_slice(text);
    });
    out.push(b'.');
    push_padded(out, u64::from(since.subsec_micros()), 6);
    out.extend_from_slice(b"Z\"");
}

/// `YYYY-MM-DDTHH:MM:SS` of `secs` since the epoch, in UTC.
fn push_date_time(out: &mut Vec<u8>, secs: u64) {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    push_padded(out, year.max(0) as u64, 4);
    for (sep, value) in [(b'-', u64::from(month)), (b'-', u64::from(day)), (b'T', rem / 3600), (b':', rem / 60 % 60), (b':', rem % 60)] {
        out.push(sep);
        push_padded(out, value, 2);
    }
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    /// The word-at-a-time check agrees with a byte-by-byte scan, at every
    /// position of a word and for every byte value.
    #[test]
    fn escape_check_matches_a_byte_scan() {
        let plain = |b: u8| !(b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f);
        for b in 0..=255u8 {
            for len in [1, 7, 8, 9, 17] {
                for at in 0..len {
                    let mut s = vec![b'a'; len];
                    s[at] = b;
                    assert_eq!(needs_escape(&s), !plain(b), "byte {b:#x} at {at} of {len}");
                }
            }
        }
        assert!(!needs_escape(b""));
        assert!(!needs_escape("roles.default.allow.cidrs[0] (127.0.0.1/32) at é.yaml:9".as_bytes()));
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut out = Vec::new();
        json_str(&mut out, "a\"b\\c\nd\u{1}e\u{7f}é");
        assert_eq!(String::from_utf8(out).unwrap(), r#""a\"b\\c\nd\u0001e\u007fé""#);
    }

    /// The hand-written numbers and addresses read exactly as `Display`.
    #[test]
    fn numbers_and_addresses_match_display() {
        for n in [0, 7, 9, 10, 99, 100, 65_535, 1_000_000_007, u64::MAX - 1, u64::MAX] {
            let mut out = Vec::new();
            push_u64(&mut out, n);
            assert_eq!(String::from_utf8(out).unwrap(), n.to_string());
        }
        for addr in ["0.0.0.0:0", "127.0.0.1:8080", "255.255.255.255:65535", "10.0.10.1:9", "[::1]:443", "[2001:db8::1%3]:80", "[::ffff:1.2.3.4]:1"] {
            let addr: std::net::SocketAddr = addr.parse().unwrap();
            let mut out = Vec::new();
            push_socket_addr(&mut out, addr);
            assert_eq!(String::from_utf8(out).unwrap(), addr.to_string());
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let cases = [
            (0, "\"1970-01-01T00:00:00.000000Z\""),
            (951_782_400, "\"2000-02-29T00:00:00.000000Z\""),
            (1_795_612_201, "\"2026-11-25T13:10:01.000000Z\""),
            (4_107_542_399, "\"2100-02-28T23:59:59.000000Z\""),
        ];
        for (secs, expected) in cases {
            let mut out = Vec::new();
            json_timestamp(&mut out, UNIX_EPOCH + Duration::from_secs(secs));
            assert_eq!(String::from_utf8(out).unwrap(), expected, "{secs}");
        }
        let mut out = Vec::new();
        json_timestamp(&mut out, UNIX_EPOCH + Duration::from_micros(1_500_000));
        assert_eq!(String::from_utf8(out).unwrap(), "\"1970-01-01T00:00:01.500000Z\"");
        // And now is after the year this was written.
        let mut out = Vec::new();
        json_timestamp(&mut out, SystemTime::now());
        assert!(String::from_utf8(out).unwrap().as_str() > "\"2026");
    }

    /// Lines arrive whole and in order, batched into few writes, and the
    /// guard writes what is pending before it returns.
    #[test]
    fn lines_are_batched_in_order_and_flushed_on_drop() {
        #[derive(Clone, Default)]
        struct Out(Arc<Mutex<(Vec<u8>, usize)>>);
        impl Write for Out {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let mut o = self.0.lock().unwrap();
                o.0.extend_from_slice(buf);
                o.1 += 1;
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Out::default();
        let (sink, guard) = LogSink::start(out.clone()).unwrap();
        let lines: Vec<String> = (0..10_000).map(|i| format!("{{\"n\":{i}}}\n")).collect();
        for line in &lines {
            sink.append(line.as_bytes());
        }
        drop(guard);
        let (written, writes) = out.0.lock().unwrap().clone();
        assert_eq!(String::from_utf8(written).unwrap(), lines.concat());
        assert!(writes < 100, "{writes} writes for 10000 lines");
    }

    /// When the output stalls, pending lines stop at the bound: further
    /// lines are dropped and counted instead of growing memory or blocking
    /// the caller; once the output moves again, lines flow again.
    #[test]
    fn a_stalled_output_drops_and_counts_beyond_the_bound() {
        struct Stalled(std::sync::mpsc::Receiver<()>, Arc<AtomicU64>);
        impl Write for Stalled {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let _ = self.0.recv();
                self.1.fetch_add(buf.len() as u64, Ordering::Relaxed);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (release, stall) = std::sync::mpsc::channel();
        let written = Arc::new(AtomicU64::new(0));
        let (sink, guard) = LogSink::start(Stalled(stall, written.clone())).unwrap();
        let line = vec![b'x'; 1023].into_iter().chain([b'\n']).collect::<Vec<u8>>();
        let before = dropped_lines();
        let started = Instant::now();
        // Three times the bound: at most the bound waits in the sink and at
        // most the bound sits in the batch the stalled writer holds.
        let appended = 3 * MAX_PENDING / line.len();
        for _ in 0..appended {
            sink.append(&line);
        }
        assert!(started.elapsed() < Duration::from_secs(5), "appending blocked");
        let dropped = (dropped_lines() - before) as usize;
        assert!(dropped >= appended - 2 * MAX_PENDING / line.len(), "only {dropped} of {appended} lines dropped");
        assert!(sink.pending.lock().unwrap().buf.len() <= MAX_PENDING);
        // Let the output move: every line not dropped is written.
        drop(release);
        drop(guard);
        let kept = written.load(Ordering::Relaxed) as usize / line.len();
        assert_eq!(kept + dropped, appended);
    }

    /// A line is written within about one batch window, with no further
    /// line arriving to push it out.
    #[test]
    fn a_lone_line_is_written_promptly() {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        struct Out(std::sync::mpsc::Sender<Vec<u8>>);
        impl Write for Out {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let _ = self.0.send(buf.to_vec());
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (sink, _guard) = LogSink::start(Out(tx)).unwrap();
        sink.append(b"one\n");
        let got = rx.recv_timeout(Duration::from_secs(5)).expect("written without a second line");
        assert_eq!(got, b"one\n");
    }
}
