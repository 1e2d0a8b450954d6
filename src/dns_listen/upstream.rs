//! Asking upstream one query at a time, for queries that came in over TCP
//! and for `portcullis check dns:` (the UDP listener has its own loop,
//! [`super::forwarder`]): over UDP under a fresh random id from a small pool
//! of connected sockets ([`Sockets`]), and over TCP when the answer comes
//! back truncated.
//!
//! It takes an [`Admission`] and sends the query built from the checked
//! question alone ([`UpstreamQuery`]): no byte of the client's message is
//! sent, so nothing the policy did not admit can leave this way.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;

use hickory_proto::op::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::decide::{Admission, DnsReason};
use super::rules::DnsRules;
use super::upstream_query::{UpstreamQuery, UPSTREAM_PAYLOAD};


/// Asks the upstreams in order, each within `rules.timeout`, until one
/// answers the question; the answer's id, flags and question are checked.
pub async fn forward(admission: &Admission, rules: &DnsRules, sockets: &Sockets) -> Result<Message, DnsReason> {
    forward_from(admission, rules, 0, DnsReason::UpstreamFailed, sockets).await
}

/// [`forward`], from the `first`th upstream on; `last` is the reason when
/// none is left to ask.
pub(super) async fn forward_from(admission: &Admission, rules: &DnsRules, first: usize, mut last: DnsReason, sockets: &Sockets) -> Result<Message, DnsReason> {
    let query = UpstreamQuery::new(admission)?;
    for server in rules.upstreams.iter().skip(first) {
        let max = usize::from(rules.limits.max_message_bytes);
        match tokio::time::timeout(rules.timeout, exchange(sockets, *server, &query, max)).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(e)) => {
                tracing::debug!(%server, error = %e, "upstream DNS exchange failed");
                last = DnsReason::UpstreamFailed;
            }
            Err(_) => last = DnsReason::UpstreamTimeout,
        }
    }
    Err(last)
}

/// Why one exchange with one server failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum ExchangeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("answer over {0} bytes")]
    TooLarge(usize),
    #[error("answer does not parse")]
    Malformed,
}

/// Queries a socket answers before it is closed and replaced by one on a
/// fresh random port, so that no source port serves for long.
const MAX_USES: u32 = 64;
/// Idle sockets kept for the next queries (counted in the descriptor
/// budget, with the UDP forwarder's idle ones).
const MAX_IDLE: usize = crate::config::DnsListenerLimits::IDLE_UPSTREAM_SOCKETS - super::inflight::MAX_IDLE;

/// Connected UDP sockets to the upstream resolvers, each bound to a port
/// the kernel picked at random. A query takes one for itself (never two
/// queries on one socket at once) and gives it back once answered; a
/// socket whose query failed or timed out is closed, so a late answer can
/// only ever be read by the query it belongs to or dropped. Each socket
/// serves at most [`MAX_USES`] queries. Saves the bind, connect and close
/// of a socket per query.
#[derive(Default)]
pub struct Sockets {
    idle: Mutex<Vec<Pooled>>,
}

struct Pooled {
    socket: UdpSocket,
    server: SocketAddr,
    uses: u32,
}

impl Sockets {
    /// An idle socket connected to `server`, or a new one.
    async fn take(&self, server: SocketAddr) -> std::io::Result<Pooled> {
        let found = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.iter().rposition(|p| p.server == server).map(|i| idle.swap_remove(i))
        };
        if let Some(pooled) = found {
            return Ok(pooled);
        }
        let local: IpAddr = if server.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
        let socket = UdpSocket::bind(SocketAddr::new(local, 0)).await?;
        // Connected: datagrams from anywhere but the server are never read.
        socket.connect(server).await?;
        Ok(Pooled { socket, server, uses: 0 })
    }

    /// Keeps a socket whose query was answered, unless it has served its
    /// share. With [`MAX_IDLE`] kept already the longest idle one is closed,
    /// so sockets to a nameserver a reload removed do not stay.
    fn give_back(&self, mut pooled: Pooled) {
        pooled.uses += 1;
        if pooled.uses >= MAX_USES {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() >= MAX_IDLE {
            idle.remove(0);
        }
        idle.push(pooled);
    }
}

/// One exchange with `server`: UDP, then TCP if the answer is truncated.
async fn exchange(sockets: &Sockets, server: SocketAddr, query: &UpstreamQuery, max: usize) -> Result<Message, ExchangeError> {
    let pooled = sockets.take(server).await?;
    pooled.socket.send(query.bytes()).await?;
    let mut buf = vec![0u8; max.max(usize::from(UPSTREAM_PAYLOAD))];
    let answer = loop {
        let n = pooled.socket.recv(&mut buf).await?;
        // Anything that is not the answer to this query is ignored: a
        // duplicate of an earlier answer on this socket carries an earlier
        // id, and a forged one must guess both the port and the id.
        if query.is_answered_by(&buf[..n]) {
            if let Ok(answer) = Message::from_vec(&buf[..n]) {
                break answer;
            }
        }
    };
    // Only reached with the answer read: a socket dropped by an error or
    // the caller's timeout is closed instead.
    sockets.give_back(pooled);
    if !answer.truncated() {
        return Ok(answer);
    }
    exchange_tcp(server, query, max).await
}

/// Asks `query` over TCP (after a truncated answer over UDP).
pub(super) async fn exchange_tcp(server: SocketAddr, query: &UpstreamQuery, max: usize) -> Result<Message, ExchangeError> {
    let bytes = query.bytes();
    let mut stream = TcpStream::connect(server).await?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await?;
    let len = usize::from(stream.read_u16().await?);
    if len > max {
        return Err(ExchangeError::TooLarge(max));
    }
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    if !query.is_answered_by(&buf) {
        return Err(ExchangeError::Malformed);
    }
    Message::from_vec(&buf).map_err(|_| ExchangeError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sockets are reused per nameserver, retired after [`MAX_USES`], and
    /// a full pool makes room for the newest.
    #[tokio::test]
    async fn pooled_sockets_are_reused_retired_and_rotated() {
        let (a, b): (SocketAddr, SocketAddr) = ("127.0.0.1:9".parse().unwrap(), "127.0.0.1:10".parse().unwrap());
        let sockets = Sockets::default();
        let first = sockets.take(a).await.unwrap();
        let port = first.socket.local_addr().unwrap().port();
        sockets.give_back(first);
        let again = sockets.take(a).await.unwrap();
        assert_eq!((again.socket.local_addr().unwrap().port(), again.uses), (port, 1), "the idle socket is reused");
        assert_eq!(sockets.take(b).await.unwrap().uses, 0, "never a socket connected to another server");
        let worn = Pooled { uses: MAX_USES - 1, ..again };
        sockets.give_back(worn);
        assert_eq!(sockets.take(a).await.unwrap().uses, 0, "retired after its share of queries");
        let many: Vec<Pooled> = take_many(&sockets, a, MAX_IDLE).await;
        many.into_iter().for_each(|p| sockets.give_back(p));
        sockets.give_back(sockets.take(b).await.unwrap());
        assert_eq!(sockets.take(b).await.unwrap().uses, 1, "room made for b in a full pool");
        assert_eq!(sockets.idle.lock().unwrap().len(), MAX_IDLE - 1);
    }

    async fn take_many(sockets: &Sockets, server: SocketAddr, n: usize) -> Vec<Pooled> {
        let mut taken = Vec::new();
        for _ in 0..n {
            taken.push(sockets.take(server).await.unwrap());
        }
        taken
    }
}
