//! The DNS listener (`dns_listen`): answers a workload's DNS queries only
//! for names its role may reach, so DNS stops being the channel left open
//! once TCP goes through the policy (docs/DNS.md).
//!
//! A query is parsed strictly ([`message`]), its client's role found by
//! source address as on the transparent listener, and decided before
//! anything leaves ([`decide`]): names denied before resolution, names the
//! role's rules do not admit, and types not answered are refused (REFUSED)
//! without a query upstream. An admitted question is asked upstream, built
//! from the checked question alone ([`upstream_query`]); the answer is
//! judged like a dial decision ([`answer`]) before the client sees it.
//! Every query gets one decision line and is counted ([`record`]).
//!
//! Over UDP one forwarder loop does all of it inline ([`forwarder`], with
//! its upstream sockets and queries in flight in [`inflight`]); over TCP
//! each query is a task that asks through a pool of sockets
//! ([`upstream`]). Both share [`receive`] and [`complete`].

pub mod answer;
pub mod decide;
mod forwarder;
mod inflight;
mod limits;
pub mod message;
pub mod record;
pub mod rules;
mod serve;
mod upstream;
mod upstream_query;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use hickory_proto::op::{Message, ResponseCode};
use tokio::net::{TcpListener, TcpSocket, UdpSocket};

use crate::metrics::Metrics;
use crate::policy::{Policy, RoleId};
use crate::snapshot::{Snapshot, SnapshotHandle};
use answer::Judged;
use decide::{AdmittedBy, DnsReason, Question, Verdict};
use message::BadQuery;
use record::{DnsMetrics, DnsOutcome, DnsRecord};
pub use inflight::UPSTREAM_SOCKET_USES;
pub use rules::DnsRules;

/// Decides `question` for `role`, and when it is admitted asks upstream and
/// judges the answer: what the listener would answer a client of `role`.
pub async fn ask(
    policy: &Policy,
    rules: &DnsRules,
    role: RoleId,
    question: &Question,
    metrics: Option<&DnsMetrics>,
) -> Result<(AdmittedBy, Judged), DnsReason> {
    ask_via(&upstream::Sockets::default(), policy, rules, role, question, metrics).await
}

/// [`ask`], forwarding through the listener's upstream sockets.
async fn ask_via(
    sockets: &upstream::Sockets,
    policy: &Policy,
    rules: &DnsRules,
    role: RoleId,
    question: &Question,
    metrics: Option<&DnsMetrics>,
) -> Result<(AdmittedBy, Judged), DnsReason> {
    let admission = match decide::decide(policy, rules, role, question) {
        Verdict::Forward(admission) => admission,
        Verdict::Refuse(reason) => return Err(reason),
    };
    let upstream = forward_timed(&admission, rules, sockets, metrics).await?;
    let judged = answer::judge(policy, &admission, &upstream, rules.max_ttl)?;
    Ok((admission.by(), judged))
}

/// Asks upstream for an admitted question, timing it into `metrics`.
async fn forward_timed(admission: &decide::Admission, rules: &DnsRules, sockets: &upstream::Sockets, metrics: Option<&DnsMetrics>) -> Result<Message, DnsReason> {
    let started = Instant::now();
    let upstream = upstream::forward(admission, rules, sockets).await;
    if let Some(metrics) = metrics {
        metrics.upstream.observe(started.elapsed().as_secs_f64());
    }
    upstream
}

/// State shared by both sockets of the listener.
struct Shared {
    snapshot: SnapshotHandle,
    metrics: DnsMetrics,
    limits: Arc<limits::ClientLimits>,
    sockets: upstream::Sockets,
}

/// The bound DNS listener: a UDP socket and a TCP listener on one address.
pub struct DnsListener {
    udp: UdpSocket,
    tcp: TcpListener,
    shared: Arc<Shared>,
}

impl DnsListener {
    /// Binds UDP and TCP on `addr` (the same port for both when `addr`'s
    /// port is 0), deciding with the proxy's current snapshot and counting
    /// into its metrics. The bounds are read from the snapshot in force at
    /// each query and connection, so they follow reloads.
    pub async fn bind(addr: SocketAddr, snapshot: SnapshotHandle, metrics: &Metrics) -> io::Result<Self> {
        let (udp, tcp) = bind_both(addr).await?;
        let shared = Arc::new(Shared {
            snapshot,
            metrics: metrics.dns.clone(),
            limits: Arc::default(),
            sockets: upstream::Sockets::default(),
        });
        Ok(DnsListener { udp, tcp, shared })
    }

    /// The address bound (UDP and TCP alike).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// Answers queries until `shutdown` completes.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) {
        let udp = Arc::new(self.udp);
        tokio::select! {
            () = forwarder::udp(udp, self.shared.clone()) => {}
            () = serve::tcp(self.tcp, self.shared.clone()) => {}
            () = shutdown => {}
        }
    }
}

async fn bind_both(addr: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    let tcp_on = |at: SocketAddr| -> io::Result<TcpListener> {
        let socket = if at.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.bind(at)?;
        socket.listen(1024)
    };
    if addr.port() != 0 {
        return Ok((UdpSocket::bind(addr).await?, tcp_on(addr)?));
    }
    // An ephemeral port free for both protocols.
    let mut last = None;
    for _ in 0..50 {
        let udp = UdpSocket::bind(addr).await?;
        match tcp_on(udp.local_addr()?) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no port free for both UDP and TCP")))
}

/// A client's query after parsing and the decision, before anything is
/// asked upstream.
// Made once per query and taken apart at once: boxing the large variant
// would only add an allocation per query.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Received {
    /// Not even a query header: dropped without an answer.
    Dropped,
    /// Answered at once (malformed, or refused before anything left): the
    /// encoded reply.
    Answered(Vec<u8>),
    /// Admitted: to be asked upstream, then finished by [`complete`].
    Forward(Forward),
}

/// An admitted query waiting for its upstream answer.
pub(crate) struct Forward {
    pub(crate) query: message::Query,
    pub(crate) admission: decide::Admission,
    record: DnsRecord,
}

/// Parses `bytes` from `client`, finds its role and decides the question
/// with `snapshot`; refusals and malformed queries are answered at once.
fn receive(shared: &Shared, snapshot: &Snapshot, client: SocketAddr, bytes: &[u8], tcp: bool) -> Received {
    let max = snapshot.dns.limits.max_message_bytes;
    let mut record = DnsRecord::new(client, tcp);
    let query = match message::parse_query(bytes) {
        Ok(query) => query,
        Err(BadQuery::Unanswerable) => {
            shared.metrics.dropped.with_label_values(&["unanswerable"]).inc();
            return Received::Dropped;
        }
        Err(BadQuery::Answerable { id, reason, parsed }) => {
            let reply = match parsed.as_deref() {
                Some(query) => {
                    record.name = query.queries().first().map(|q| q.name().to_ascii()).unwrap_or_default();
                    record.qtype = query.queries().first().map(|q| q.query_type());
                    refuse(shared, record, query, reason, max)
                }
                None => {
                    record.outcome = DnsOutcome::Deny(reason);
                    finish(shared, record, &message::bare_response(id, message::rcode_of(reason)), None, max)
                }
            };
            return Received::Answered(reply);
        }
    };
    record.name = query.question.name.to_string();
    record.qtype = Some(query.question.qtype);
    let verdict = match snapshot.identities.identify_source(&snapshot.policy, client.ip()) {
        Ok((role, source)) => {
            record.role = snapshot.policy.role(role).name().to_string();
            record.identity = source.as_str();
            decide::decide(&snapshot.policy, &snapshot.dns, role, &query.question)
        }
        Err(reason) => Verdict::Refuse(DnsReason::Policy(reason)),
    };
    match verdict {
        Verdict::Forward(admission) => Received::Forward(Forward { query, admission, record }),
        Verdict::Refuse(reason) => Received::Answered(refuse(shared, record, &query.message, reason, max)),
    }
}

/// Finishes an admitted query with its upstream answer (or why there is
/// none), judged with the snapshot it was decided with.
fn complete(shared: &Shared, snapshot: &Snapshot, forward: Forward, upstream: Result<Message, DnsReason>) -> Vec<u8> {
    let Forward { query, admission, mut record } = forward;
    let max = snapshot.dns.limits.max_message_bytes;
    match upstream.and_then(|answer| answer::judge(&snapshot.policy, &admission, &answer, snapshot.dns.max_ttl)) {
        Ok(judged) => {
            record.outcome = DnsOutcome::Allow(admission.by());
            record.answers = judged.answers.len();
            let reply = message::response(&query.message, judged.rcode, judged.answers, judged.authority, max);
            finish(shared, record, &reply, Some(&query.message), max)
        }
        Err(reason) => refuse(shared, record, &query.message, reason, max),
    }
}

/// Answers `query` with the code for `reason`, no records.
fn refuse(shared: &Shared, mut record: DnsRecord, query: &Message, reason: DnsReason, max: u16) -> Vec<u8> {
    record.outcome = DnsOutcome::Deny(reason);
    let reply = message::response(query, message::rcode_of(reason), Vec::new(), Vec::new(), max);
    finish(shared, record, &reply, Some(query), max)
}

/// Answers one query from `client` (the TCP listener's path): decided,
/// forwarded through the pooled sockets when admitted, judged. `None`
/// drops it (not even a header).
async fn handle(shared: &Shared, client: SocketAddr, bytes: &[u8], tcp: bool) -> Option<Vec<u8>> {
    let snapshot = shared.snapshot.load_full();
    match receive(shared, &snapshot, client, bytes, tcp) {
        Received::Dropped => None,
        Received::Answered(reply) => Some(reply),
        Received::Forward(forward) => {
            let upstream = forward_timed(&forward.admission, &snapshot.dns, &shared.sockets, Some(&shared.metrics)).await;
            Some(complete(shared, &snapshot, forward, upstream))
        }
    }
}

/// Encodes `reply` within the client's size limit (SERVFAIL when it cannot
/// fit over TCP), then logs and counts the query.
fn finish(shared: &Shared, mut record: DnsRecord, reply: &Message, query: Option<&Message>, max: u16) -> Vec<u8> {
    let udp = !record.tcp;
    let limit = message::size_limit(query, udp, max);
    let mut rcode = reply.response_code();
    let bytes = message::encode(reply, limit, udp).unwrap_or_else(|| {
        record.outcome = DnsOutcome::Deny(DnsReason::AnswerTooLarge);
        record.answers = 0;
        rcode = ResponseCode::ServFail;
        let failed = message::bare_response(reply.id(), rcode);
        // A header alone always fits (512 is the least any limit is).
        failed.to_vec().unwrap_or_default()
    });
    record.rcode = rcode_name(rcode);
    record.emit(Some(&shared.metrics));
    bytes
}

/// The response code as dig and the decision line spell it.
pub fn rcode_name(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NotImp => "NOTIMP",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests;
