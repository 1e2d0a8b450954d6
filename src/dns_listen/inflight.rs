//! The UDP forwarder's upstream side: the sockets it holds towards the
//! nameservers and the queries in flight on them, keyed by (socket, id),
//! with their deadlines.
//!
//! Several queries share a socket, each under its own random id (never two
//! alike on one socket). A socket is retired after [`UPSTREAM_SOCKET_USES`]
//! queries or [`MAX_AGE`], whichever comes first: it takes no new query
//! and is closed once its last one is answered or expired, and the next
//! query opens a socket on a fresh port the kernel picks. A socket whose
//! queries are all answered is kept for the next ones (at most [`MAX_IDLE`]).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

/// Queries one upstream socket carries before it is retired, so that no
/// source port serves long (the same bound as the pooled sockets of the
/// TCP listener's path): an attacker who learnt a port, say through a side
/// channel such as SAD DNS's ICMP rate limit, has at most this many
/// queries to forge answers to on it.
pub const UPSTREAM_SOCKET_USES: u32 = 64;
/// Queries in flight on one socket at once: an off-path forger's odds per
/// forged datagram are this over 65536, on a port he must also guess.
pub const MAX_PER_SOCKET: usize = 32;
/// A socket older than this takes no new query, however few it carried
/// (a slow trickle of queries would otherwise keep one port open for long).
const MAX_AGE: Duration = Duration::from_secs(10);
/// Idle sockets kept for the next queries; with the TCP path's pool this
/// makes up `DnsListenerLimits::IDLE_UPSTREAM_SOCKETS`.
pub const MAX_IDLE: usize = crate::config::DnsListenerLimits::IDLE_UPSTREAM_SOCKETS / 2;

/// Where a query waits: its socket (by serial number, never reused) and id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub serial: u64,
    pub id: u16,
}

/// One UDP socket connected to a nameserver, from a port the kernel picked.
pub struct UpstreamSocket {
    pub serial: u64,
    pub socket: UdpSocket,
    server: SocketAddr,
    uses: u32,
    in_flight: usize,
    opened: Instant,
}

impl UpstreamSocket {
    fn open(serial: u64, server: SocketAddr, now: Instant) -> io::Result<Self> {
        let local: IpAddr = if server.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
        let socket = std::net::UdpSocket::bind(SocketAddr::new(local, 0))?;
        // Connected: datagrams from anywhere but the server are never read.
        socket.connect(server)?;
        socket.set_nonblocking(true)?;
        Ok(UpstreamSocket { serial, socket: UdpSocket::from_std(socket)?, server, uses: 0, in_flight: 0, opened: now })
    }

    /// True when it may take another query.
    fn takes(&self, server: SocketAddr, now: Instant) -> bool {
        self.server == server && !self.retired(now) && self.in_flight < MAX_PER_SOCKET
    }

    fn retired(&self, now: Instant) -> bool {
        self.uses >= UPSTREAM_SOCKET_USES || now.duration_since(self.opened) >= MAX_AGE
    }
}

/// The upstream sockets and the queries in flight on them (`T` is what the
/// forwarder keeps per query). Bounded by its caller: every query in it
/// holds a slot of `max_in_flight`, and a socket stays open only while it
/// carries a query or is among the [`MAX_IDLE`] idle ones.
pub struct InFlight<T> {
    sockets: Vec<UpstreamSocket>,
    next_serial: u64,
    pending: HashMap<Key, (Instant, T)>,
    /// Deadlines, earliest first; an entry whose query has left the table
    /// (or was asked again under another key) is skipped when met.
    deadlines: BinaryHeap<Reverse<(Instant, Key)>>,
}

impl<T> Default for InFlight<T> {
    fn default() -> Self {
        InFlight { sockets: Vec::new(), next_serial: 0, pending: HashMap::new(), deadlines: BinaryHeap::new() }
    }
}

impl<T> InFlight<T> {
    /// The open sockets.
    pub fn sockets(&self) -> &[UpstreamSocket] {
        &self.sockets
    }

    /// The socket with `serial`, while it is open.
    pub fn socket(&self, serial: u64) -> Option<&UpstreamSocket> {
        self.sockets.iter().find(|s| s.serial == serial)
    }

    /// Puts `entry` in flight towards `server` until `deadline`: on a
    /// socket that takes it, else on a new one, under an id not in use on
    /// that socket. The key says where to send it. When no socket can be
    /// opened the entry is given back with the error.
    pub fn start(&mut self, server: SocketAddr, entry: T, now: Instant, deadline: Instant) -> Result<Key, (io::Error, T)> {
        let at = match self.sockets.iter().position(|s| s.takes(server, now)) {
            Some(at) => at,
            None => {
                let opened = match UpstreamSocket::open(self.next_serial, server, now) {
                    Ok(opened) => opened,
                    Err(e) => return Err((e, entry)),
                };
                self.sockets.push(opened);
                self.next_serial += 1;
                self.sockets.len() - 1
            }
        };
        let socket = &mut self.sockets[at];
        let key = loop {
            // At most MAX_PER_SOCKET of 65536 ids are taken: this ends at once.
            let key = Key { serial: socket.serial, id: super::upstream_query::random_id() };
            if !self.pending.contains_key(&key) {
                break key;
            }
        };
        socket.uses += 1;
        socket.in_flight += 1;
        self.pending.insert(key, (deadline, entry));
        self.deadlines.push(Reverse((deadline, key)));
        Ok(key)
    }

    /// The query in flight at `key`.
    pub fn get(&self, key: Key) -> Option<&T> {
        self.pending.get(&key).map(|(_, entry)| entry)
    }

    /// The query in flight at `key`, to change.
    pub fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        self.pending.get_mut(&key).map(|(_, entry)| entry)
    }

    /// Takes the query at `key` out when `matches` says the answer is its.
    pub fn take(&mut self, key: Key, matches: impl FnOnce(&T) -> bool) -> Option<T> {
        if !self.pending.get(&key).is_some_and(|(_, entry)| matches(entry)) {
            return None;
        }
        self.remove(key)
    }

    fn remove(&mut self, key: Key) -> Option<T> {
        let (_, entry) = self.pending.remove(&key)?;
        if let Some(socket) = self.sockets.iter_mut().find(|s| s.serial == key.serial) {
            socket.in_flight -= 1;
        }
        Some(entry)
    }

    /// The earliest deadline of a query still in flight.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse((deadline, key))) = self.deadlines.peek().copied() {
            if self.pending.get(&key).is_some_and(|(d, _)| *d == deadline) {
                return Some(deadline);
            }
            self.deadlines.pop();
        }
        None
    }

    /// Takes out a query whose deadline has passed at `now`.
    pub fn expired(&mut self, now: Instant) -> Option<T> {
        let deadline = self.next_deadline()?;
        if deadline > now {
            return None;
        }
        let Reverse((_, key)) = self.deadlines.pop()?;
        self.remove(key)
    }

    /// Retires the socket `serial` (it failed) and takes out its queries.
    pub fn fail(&mut self, serial: u64) -> Vec<T> {
        let keys: Vec<Key> = self.pending.keys().filter(|k| k.serial == serial).copied().collect();
        let failed = keys.into_iter().filter_map(|k| self.remove(k)).collect();
        self.sockets.retain(|s| s.serial != serial);
        failed
    }

    /// Closes retired sockets that carry nothing, and the longest-open idle
    /// ones beyond [`MAX_IDLE`].
    pub fn prune(&mut self, now: Instant) {
        self.sockets.retain(|s| s.in_flight > 0 || !s.retired(now));
        let mut idle = self.sockets.iter().filter(|s| s.in_flight == 0).count();
        if idle > MAX_IDLE {
            self.sockets.retain(|s| {
                let close = s.in_flight == 0 && idle > MAX_IDLE;
                idle -= usize::from(close);
                !close
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Queries share a socket per nameserver up to its bounds, under
    /// distinct ids; a worn socket is closed once it carries nothing.
    #[tokio::test]
    async fn sockets_are_shared_bounded_and_retired() {
        let mut table = InFlight::<u32>::default();
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        let keys: Vec<Key> = (0..MAX_PER_SOCKET as u32 + 1).map(|i| table.start(server(9), i, now, later).unwrap()).collect();
        assert_eq!(table.sockets().len(), 2, "a full socket takes no more");
        let first = keys[0].serial;
        assert!(keys[..MAX_PER_SOCKET].iter().all(|k| k.serial == first));
        let ids: std::collections::HashSet<u16> = keys[..MAX_PER_SOCKET].iter().map(|k| k.id).collect();
        assert_eq!(ids.len(), MAX_PER_SOCKET, "never two alike on one socket");
        table.start(server(10), 99, now, later).unwrap();
        assert_eq!(table.sockets().len(), 3, "never a socket connected to another server");
        assert_eq!(table.take(keys[0], |e| *e == 1), None, "an answer that does not match is not taken");
        assert_eq!(table.take(keys[0], |e| *e == 0), Some(0));
        assert_eq!(table.take(keys[0], |_| true), None, "taken once");
        for key in &keys[1..MAX_PER_SOCKET] {
            table.take(*key, |_| true).unwrap();
        }
        // The first socket is idle with uses left: kept, and takes queries again.
        table.prune(now);
        assert_eq!(table.sockets().len(), 3);
        let mut uses = MAX_PER_SOCKET as u32;
        while uses < UPSTREAM_SOCKET_USES {
            let key = table.start(server(9), 0, now, later).unwrap();
            assert_eq!(key.serial, first);
            table.take(key, |_| true).unwrap();
            uses += 1;
        }
        assert_ne!(table.start(server(9), 0, now, later).unwrap().serial, first, "worn out after its share");
        table.prune(now);
        assert!(table.socket(first).is_none(), "a retired, idle socket is closed");
        assert!(table.sockets().iter().all(|s| s.uses <= UPSTREAM_SOCKET_USES));
    }

    #[tokio::test]
    async fn deadlines_expire_in_order_and_failed_sockets_give_back_their_queries() {
        let mut table = InFlight::<&str>::default();
        let now = Instant::now();
        let at = |ms| now + Duration::from_millis(ms);
        let b = table.start(server(9), "b", now, at(20)).unwrap();
        table.start(server(9), "a", now, at(10)).unwrap();
        let c = table.start(server(10), "c", now, at(30)).unwrap();
        assert_eq!(table.next_deadline(), Some(at(10)));
        assert_eq!(table.expired(at(5)), None);
        assert_eq!(table.expired(at(25)), Some("a"));
        assert_eq!(table.take(b, |_| true), Some("b"));
        assert_eq!(table.expired(at(25)), None, "an answered query does not expire");
        assert_eq!(table.fail(c.serial), vec!["c"]);
        assert!(table.socket(c.serial).is_none());
        assert_eq!((table.pending.len(), table.next_deadline()), (0, None));
        // Idle sockets beyond the bound are closed.
        let keys: Vec<Key> = (0..MAX_IDLE + 3).map(|i| table.start(server(11 + i as u16), "x", now, at(10)).unwrap()).collect();
        keys.into_iter().for_each(|k| assert!(table.take(k, |_| true).is_some()));
        table.prune(now);
        assert_eq!(table.sockets().len(), MAX_IDLE, "the longest-open idle ones closed");
    }
}
