//! The listener's UDP path, a forwarder loop: one task owns the client
//! socket and the upstream sockets ([`InFlight`]) and does everything
//! inline, without a task per query. Client datagrams are read in batches
//! (`recvmmsg`) and decided; refusals are answered at once. Admitted
//! questions are asked upstream (built from the checked question alone,
//! under a fresh random id), sent in batches (`sendmmsg`). Answers are read
//! in batches, matched by socket, id and question (anything else is
//! dropped), judged, and the replies sent in a batch. A query past its
//! deadline is asked of the next nameserver, or answered SERVFAIL when none
//! is left. A truncated answer is asked again over TCP in a task of its own
//! (the rare path).

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use hickory_proto::op::Message;
use nix::sys::socket::{recvmmsg, sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::time::Sleep;

use super::decide::DnsReason;
use super::inflight::{InFlight, Key};
use super::limits::Slot;
use super::upstream_query::UpstreamQuery;
use super::{complete, receive, upstream, Forward, Received, Shared};
use crate::snapshot::Snapshot;

/// Datagrams read or sent per system call.
const BATCH: usize = 32;
/// Batches read from one socket before the others get their turn.
const ROUNDS: usize = 4;
/// The least buffer for an upstream answer (the EDNS size advertised).
const ANSWER_BUFFER: usize = 1232;

/// An admitted query in flight.
struct Pending {
    forward: Forward,
    /// The snapshot it was decided with; its answer is judged with it.
    snapshot: Arc<Snapshot>,
    /// Where the reply goes (the address the query came from).
    reply_to: SocketAddr,
    _slot: Slot,
    /// The upstream query; its id is set per attempt.
    query: UpstreamQuery,
    /// Which of the snapshot's nameservers is asked.
    server: usize,
    /// Why the query fails when no nameserver is left to ask.
    last: DnsReason,
    started: Instant,
}

/// Serves datagrams on `client` until dropped.
pub(super) async fn udp(client: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut forwarder = Forwarder {
        client,
        shared,
        table: InFlight::default(),
        queries: Vec::new(),
        replies: Vec::new(),
        bufs: Vec::new(),
        received: Vec::new(),
        serials: Vec::new(),
        timer: Box::pin(tokio::time::sleep(std::time::Duration::ZERO)),
        armed: false,
    };
    loop {
        forwarder.wait().await;
        forwarder.read_answers();
        forwarder.read_queries();
        forwarder.sweep();
        forwarder.send_queries().await;
        forwarder.send_replies().await;
        forwarder.table.prune(Instant::now());
    }
}

struct Forwarder {
    client: Arc<UdpSocket>,
    shared: Arc<Shared>,
    table: InFlight<Box<Pending>>,
    /// Upstream queries to send, where they wait.
    queries: Vec<Key>,
    /// Replies to send: where to, and the bytes.
    replies: Vec<(SocketAddr, Vec<u8>)>,
    /// One buffer per datagram of a batch, and what a batch read.
    bufs: Vec<Vec<u8>>,
    received: Vec<(usize, Option<SocketAddr>)>,
    serials: Vec<u64>,
    /// Fires at the earliest deadline of a query in flight (when `armed`).
    timer: Pin<Box<Sleep>>,
    armed: bool,
}

impl Forwarder {
    /// Waits until a socket is readable or a deadline has come.
    async fn wait(&mut self) {
        self.armed = match self.table.next_deadline() {
            Some(deadline) => {
                let deadline = tokio::time::Instant::from_std(deadline);
                if self.timer.deadline() != deadline || self.timer.is_elapsed() {
                    self.timer.as_mut().reset(deadline);
                }
                true
            }
            None => false,
        };
        let (client, table, timer, armed) = (&self.client, &self.table, &mut self.timer, self.armed);
        poll_fn(|cx| {
            let mut ready = client.poll_recv_ready(cx).is_ready();
            for upstream in table.sockets() {
                ready |= upstream.socket.poll_recv_ready(cx).is_ready();
            }
            ready |= armed && timer.as_mut().poll(cx).is_ready();
            if ready {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }

    /// The buffer size for one datagram: one byte more than the largest
    /// message, to tell an oversize query.
    fn buffer_size(&self) -> usize {
        (usize::from(self.shared.snapshot.load().dns.limits.max_message_bytes) + 1).max(ANSWER_BUFFER)
    }

    fn read_queries(&mut self) {
        let limits = self.shared.snapshot.load().dns.limits.clone();
        let size = self.buffer_size();
        let on_query = |forwarder: &mut Self, bytes: &[u8], from: Option<SocketAddr>| {
            if let Some(from) = from {
                forwarder.on_query(bytes, from, &limits);
            }
        };
        if let Err(e) = self.drain(size, |forwarder| Some(&*forwarder.client), on_query) {
            // ICMP errors from earlier sends surface here; keep serving.
            tracing::debug!(error = %e, "DNS listener: UDP receive failed");
        }
    }

    /// Reads up to [`ROUNDS`] batches of `size`-byte datagrams from the
    /// socket `socket` picks (none once it is gone), handing each one and
    /// its sender to `on`; stops early once a batch drained the queue. The
    /// error is the socket's.
    fn drain(
        &mut self,
        size: usize,
        socket: impl for<'a> Fn(&'a Self) -> Option<&'a UdpSocket>,
        mut on: impl FnMut(&mut Self, &[u8], Option<SocketAddr>),
    ) -> io::Result<()> {
        for _ in 0..ROUNDS {
            let (mut bufs, mut received) = (std::mem::take(&mut self.bufs), std::mem::take(&mut self.received));
            received.clear();
            let more = socket(self).map_or(Ok(false), |socket| read_batch(socket, &mut bufs, size, &mut received));
            for (buf, &(n, from)) in bufs.iter().zip(&received) {
                on(self, &buf[..n], from);
            }
            (self.bufs, self.received) = (bufs, received);
            if !more? {
                break;
            }
        }
        Ok(())
    }

    /// One client datagram: bounded, decided, answered or sent upstream.
    fn on_query(&mut self, bytes: &[u8], from: SocketAddr, limits: &crate::config::DnsListenerLimits) {
        if bytes.len() > usize::from(limits.max_message_bytes) {
            self.shared.metrics.dropped.with_label_values(&["too-large"]).inc();
            return;
        }
        let client = SocketAddr::new(from.ip().to_canonical(), from.port());
        let now = Instant::now();
        let Some(slot) = self.shared.limits.admit(client.ip(), limits, now) else {
            self.shared.metrics.dropped.with_label_values(&["over-limit"]).inc();
            return;
        };
        let snapshot = self.shared.snapshot.load_full();
        let forward = match receive(&self.shared, &snapshot, client, bytes, false) {
            Received::Dropped => return,
            Received::Answered(reply) => return self.replies.push((from, reply)),
            Received::Forward(forward) => forward,
        };
        let query = match UpstreamQuery::new(&forward.admission) {
            Ok(query) => query,
            Err(reason) => {
                let reply = complete(&self.shared, &snapshot, forward, Err(reason));
                return self.replies.push((from, reply));
            }
        };
        let pending = Pending { forward, snapshot, reply_to: from, _slot: slot, query, server: 0, last: DnsReason::UpstreamFailed, started: now };
        self.ask(Box::new(pending), now);
    }

    /// Sends `pending` to its nameserver, or to the next ones when a socket
    /// cannot be opened; answers it when none is left.
    fn ask(&mut self, mut pending: Box<Pending>, now: Instant) {
        loop {
            let Some(&server) = pending.snapshot.dns.upstreams.get(pending.server) else {
                let reason = pending.last;
                return self.finish(pending, Err(reason));
            };
            let deadline = now + pending.snapshot.dns.timeout;
            match self.table.start(server, pending, now, deadline) {
                Ok(key) => {
                    if let Some(pending) = self.table.get_mut(key) {
                        pending.query.set_id(key.id);
                    }
                    return self.queries.push(key);
                }
                Err((e, back)) => {
                    tracing::debug!(%server, error = %e, "upstream DNS socket failed");
                    pending = back;
                    pending.last = DnsReason::UpstreamFailed;
                    pending.server += 1;
                }
            }
        }
    }

    /// The query is done upstream: timed, judged and its reply queued.
    fn finish(&mut self, pending: Box<Pending>, upstream: Result<Message, DnsReason>) {
        self.shared.metrics.upstream.observe(pending.started.elapsed().as_secs_f64());
        let reply = complete(&self.shared, &pending.snapshot, pending.forward, upstream);
        self.replies.push((pending.reply_to, reply));
    }

    /// Asks the next nameserver for every query the socket `serial` held.
    fn fail_over(&mut self, serial: u64) {
        let now = Instant::now();
        for mut pending in self.table.fail(serial) {
            pending.last = DnsReason::UpstreamFailed;
            pending.server += 1;
            self.ask(pending, now);
        }
    }

    fn read_answers(&mut self) {
        let size = self.buffer_size();
        let mut serials = std::mem::take(&mut self.serials);
        serials.clear();
        serials.extend(self.table.sockets().iter().map(|s| s.serial));
        for &serial in &serials {
            let drained = self.drain(
                size,
                |forwarder| forwarder.table.socket(serial).map(|upstream| &upstream.socket),
                |forwarder, bytes, _| forwarder.on_answer(serial, bytes),
            );
            if let Err(e) = drained {
                // An ICMP error (port unreachable): the nameserver is not
                // there; its queries go to the next one.
                tracing::debug!(error = %e, "upstream DNS socket failed");
                self.fail_over(serial);
            }
        }
        self.serials = serials;
    }

    /// One upstream datagram: the answer to a query in flight on that
    /// socket under that id and for that question, or dropped.
    fn on_answer(&mut self, serial: u64, bytes: &[u8]) {
        let Ok(answer) = Message::from_vec(bytes) else { return };
        let key = Key { serial, id: answer.id() };
        let Some(pending) = self.table.take(key, |p| p.query.same_question(bytes)) else { return };
        if answer.truncated() {
            return self.over_tcp(pending);
        }
        self.finish(pending, Ok(answer));
    }

    /// Asks a question whose answer came back truncated again over TCP, in
    /// a task of its own; if that fails, the next nameservers are asked.
    fn over_tcp(&self, pending: Box<Pending>) {
        let (client, shared) = (self.client.clone(), self.shared.clone());
        tokio::spawn(async move {
            let rules = &pending.snapshot.dns;
            let server = rules.upstreams[pending.server];
            let max = usize::from(rules.limits.max_message_bytes);
            let asked = tokio::time::timeout(rules.timeout, upstream::exchange_tcp(server, &pending.query, max)).await;
            let next = |last| upstream::forward_from(&pending.forward.admission, rules, pending.server + 1, last, &shared.sockets);
            let answer = match asked {
                Ok(Ok(answer)) => Ok(answer),
                Ok(Err(e)) => {
                    tracing::debug!(%server, error = %e, "upstream DNS exchange failed");
                    next(DnsReason::UpstreamFailed).await
                }
                Err(_) => next(DnsReason::UpstreamTimeout).await,
            };
            shared.metrics.upstream.observe(pending.started.elapsed().as_secs_f64());
            let reply = complete(&shared, &pending.snapshot, pending.forward, answer);
            let _ = client.send_to(&reply, pending.reply_to).await;
        });
    }

    /// Queries past their deadline: asked of the next nameserver.
    fn sweep(&mut self) {
        let now = Instant::now();
        while let Some(mut pending) = self.table.expired(now) {
            pending.last = DnsReason::UpstreamTimeout;
            pending.server += 1;
            self.ask(pending, now);
        }
    }

    async fn send_queries(&mut self) {
        while !self.queries.is_empty() {
            let mut queries = std::mem::take(&mut self.queries);
            queries.sort_by_key(|key| key.serial);
            let mut failed = Vec::new();
            for group in queries.chunk_by(|a, b| a.serial == b.serial) {
                let serial = group[0].serial;
                // Gone when it failed meanwhile: its queries were moved on.
                let Some(upstream) = self.table.socket(serial) else { continue };
                let datagrams: Vec<(&[u8], Option<SocketAddr>)> =
                    group.iter().filter_map(|key| self.table.get(*key)).map(|p| (p.query.bytes(), None)).collect();
                if let Err((_, e)) = send_all(&upstream.socket, &datagrams).await {
                    tracing::debug!(error = %e, "upstream DNS socket failed");
                    failed.push(serial);
                }
            }
            failed.into_iter().for_each(|serial| self.fail_over(serial));
            queries.clear();
            if self.queries.is_empty() {
                self.queries = queries;
            }
        }
    }

    async fn send_replies(&mut self) {
        if self.replies.is_empty() {
            return;
        }
        let mut replies = std::mem::take(&mut self.replies);
        let datagrams: Vec<(&[u8], Option<SocketAddr>)> = replies.iter().map(|(to, b)| (&b[..], Some(*to))).collect();
        let mut from = 0;
        while let Err((at, e)) = send_all(&self.client, &datagrams[from..]).await {
            tracing::debug!(error = %e, client = %datagrams[from + at].1.map(|a| a.to_string()).unwrap_or_default(), "DNS listener: reply not sent");
            from += at + 1;
        }
        drop(datagrams);
        replies.clear();
        self.replies = replies;
    }
}

/// Reads a batch from `socket` into `bufs` (each `size` bytes), their
/// lengths and senders into `received`: `Ok(true)` when more may be waiting.
fn read_batch(socket: &UdpSocket, bufs: &mut Vec<Vec<u8>>, size: usize, received: &mut Vec<(usize, Option<SocketAddr>)>) -> io::Result<bool> {
    received.clear();
    match socket.try_io(Interest::READABLE, || recv_batch(socket.as_raw_fd(), bufs, size, received)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// Up to [`BATCH`] datagrams. A batch that is not full drained the
/// socket's queue when it was read, so it ends in `WouldBlock` too (with
/// `received` filled), which clears the socket's readiness and saves the
/// call that would only find the queue empty: a datagram that arrives
/// later raises a new edge-triggered event.
fn recv_batch(fd: RawFd, bufs: &mut Vec<Vec<u8>>, size: usize, received: &mut Vec<(usize, Option<SocketAddr>)>) -> io::Result<()> {
    bufs.resize_with(BATCH, Vec::new);
    for buf in bufs.iter_mut() {
        buf.resize(size, 0);
    }
    let mut slices: Vec<[IoSliceMut; 1]> = bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let results = recvmmsg(fd, &mut headers, slices.iter_mut(), MsgFlags::MSG_DONTWAIT, None).map_err(io::Error::from)?;
    received.extend(results.map(|m| (m.bytes, m.address.and_then(socket_addr))));
    if received.len() < BATCH {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    Ok(())
}

fn socket_addr(addr: SockaddrStorage) -> Option<SocketAddr> {
    match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
        (Some(v4), _) => Some(SocketAddr::V4((*v4).into())),
        (_, Some(v6)) => Some(SocketAddr::V6((*v6).into())),
        _ => None,
    }
}

/// Sends `datagrams` (to each one's address, or the connected peer) in
/// batches; waits for the socket when its buffer is full. On an error, the
/// index of the datagram not sent.
async fn send_all(socket: &UdpSocket, datagrams: &[(&[u8], Option<SocketAddr>)]) -> Result<(), (usize, io::Error)> {
    let mut at = 0;
    while at < datagrams.len() {
        let batch = &datagrams[at..datagrams.len().min(at + BATCH)];
        // Straight to the kernel (MSG_DONTWAIT): a UDP socket's buffer is
        // rarely full, and waiting on writability first would cost a turn
        // of the event loop for every new socket.
        match send_batch(socket.as_raw_fd(), batch) {
            Ok(sent) => at += sent.max(1),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let (bytes, to) = batch[0];
                let sent = match to {
                    Some(to) => socket.send_to(bytes, to).await,
                    None => socket.send(bytes).await,
                };
                sent.map_err(|e| (at, e))?;
                at += 1;
            }
            Err(e) => return Err((at, e)),
        }
    }
    Ok(())
}

fn send_batch(fd: RawFd, batch: &[(&[u8], Option<SocketAddr>)]) -> io::Result<usize> {
    let slices: Vec<[IoSlice; 1]> = batch.iter().map(|(b, _)| [IoSlice::new(b)]).collect();
    let addrs: Vec<Option<SockaddrStorage>> = batch.iter().map(|(_, to)| to.map(SockaddrStorage::from)).collect();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(batch.len(), None);
    let none: [ControlMessage; 0] = [];
    let sent = sendmmsg(fd, &mut headers, &slices, &addrs, none, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)?;
    Ok(sent.count())
}
