//! Per-client bounds on the DNS listener: queries per second (a token
//! bucket with a burst of one second's worth) and queries in flight, per
//! source address, plus the listener's total in flight and its open TCP
//! connections. Every bound is read from the snapshot in force at each
//! admission, so a reload changes them without restarting the listener.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;

use crate::config::DnsListenerLimits;

/// Client entries kept at most; idle ones are dropped first. Beyond it
/// (a flood of spoofed sources) new clients wait for room.
const MAX_CLIENTS: usize = 16_384;

#[derive(Debug)]
struct Client {
    tokens: f64,
    refilled: Instant,
    in_flight: usize,
}

/// The listener's clients, its total in flight and its TCP connections.
#[derive(Default)]
pub struct ClientLimits {
    clients: DashMap<IpAddr, Client>,
    total: Count,
    tcp_connections: Count,
}

/// A number of things held at once, bounded by a limit given at each
/// [`Count::take`] (the limit in force then: lowering it refuses new ones
/// until enough are released, and never cuts what is held).
#[derive(Default)]
struct Count(AtomicUsize);

impl Count {
    fn take(&self, limit: usize) -> bool {
        if self.0.fetch_add(1, Ordering::AcqRel) < limit {
            return true;
        }
        self.0.fetch_sub(1, Ordering::AcqRel);
        false
    }

    fn release(&self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One admitted query's place in the limits; released when dropped.
pub struct Slot {
    limits: Arc<ClientLimits>,
    client: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(mut client) = self.limits.clients.get_mut(&self.client) {
            client.in_flight = client.in_flight.saturating_sub(1);
        }
        self.limits.total.release();
    }
}

/// One open TCP connection's place in `max_tcp_connections`; released when dropped.
pub struct TcpSlot(Arc<ClientLimits>);

impl Drop for TcpSlot {
    fn drop(&mut self) {
        self.0.tcp_connections.release();
    }
}

impl ClientLimits {
    /// Takes a place for one more TCP connection, or `None` when
    /// `max_tcp_connections` are open.
    pub fn admit_tcp(self: &Arc<Self>, limits: &DnsListenerLimits) -> Option<TcpSlot> {
        self.tcp_connections.take(limits.max_tcp_connections).then(|| TcpSlot(self.clone()))
    }

    /// Takes a slot for one query from `client`, or `None` when the client
    /// is over its rate or in-flight limit or the listener is full.
    pub fn admit(self: &Arc<Self>, client: IpAddr, limits: &DnsListenerLimits, now: Instant) -> Option<Slot> {
        if !self.total.take(limits.max_in_flight) {
            return None;
        }
        if !self.charge(client, limits, now) {
            self.total.release();
            return None;
        }
        Some(Slot { limits: self.clone(), client })
    }

    /// Charges one query to `client`, unless it is over its rate or
    /// in-flight limit or no room is left for a new client.
    fn charge(&self, client: IpAddr, limits: &DnsListenerLimits, now: Instant) -> bool {
        if self.clients.len() >= MAX_CLIENTS && !self.clients.contains_key(&client) {
            self.clients.retain(|_, c| c.in_flight > 0 || now.duration_since(c.refilled).as_secs() < 1);
            if self.clients.len() >= MAX_CLIENTS {
                return false;
            }
        }
        let rate = f64::from(limits.max_queries_per_second_per_client);
        let mut entry = self.clients.entry(client).or_insert(Client { tokens: rate, refilled: now, in_flight: 0 });
        let c = entry.value_mut();
        c.tokens = (c.tokens + now.duration_since(c.refilled).as_secs_f64() * rate).min(rate);
        c.refilled = now;
        if c.tokens < 1.0 || c.in_flight >= limits.max_in_flight_per_client {
            return false;
        }
        c.tokens -= 1.0;
        c.in_flight += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_in_flight_and_total_are_bounded() {
        let config = DnsListenerLimits { max_queries_per_second_per_client: 3, max_in_flight_per_client: 2, max_in_flight: 3, ..Default::default() };
        let limits = Arc::new(ClientLimits::default());
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        let first = limits.admit(a, &config, t0).expect("first");
        let second = limits.admit(a, &config, t0).expect("second");
        assert!(limits.admit(a, &config, t0).is_none(), "two in flight is a's limit");
        drop(second);
        let third = limits.admit(a, &config, t0).expect("a slot was released");
        drop((first, third));
        assert!(limits.admit(a, &config, t0).is_none(), "three per second, all spent");
        assert!(limits.admit(a, &config, t0 + Duration::from_millis(400)).is_some(), "refilled one");
        let held: Vec<Slot> = (0..2).filter_map(|_| limits.admit(b, &config, t0)).collect();
        assert_eq!(held.len(), 2);
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        assert!(limits.admit(c, &config, t0).is_some(), "one left of three in total");
        let _hold = limits.admit(c, &config, t0).unwrap();
        assert!(limits.admit("10.0.0.4".parse().unwrap(), &config, t0).is_none(), "total of three in flight");
    }

    /// A reload hands `admit` other limits: the new ones hold from the next
    /// query and connection on, and what is held is never cut.
    #[test]
    fn totals_follow_the_limits_in_force() {
        let limits = Arc::new(ClientLimits::default());
        let at = |max_in_flight, max_tcp_connections| DnsListenerLimits { max_in_flight, max_tcp_connections, ..Default::default() };
        let t0 = Instant::now();
        let client = |i: u8| IpAddr::from([10, 0, 1, i]);
        let held: Vec<Slot> = (0..2).filter_map(|i| limits.admit(client(i), &at(2, 1), t0)).collect();
        assert_eq!(held.len(), 2);
        assert!(limits.admit(client(2), &at(2, 1), t0).is_none(), "two in total");
        let more = limits.admit(client(2), &at(4, 1), t0).expect("raised to four");
        assert!(limits.admit(client(3), &at(1, 1), t0).is_none(), "lowered below what is held: nothing new");
        drop((held, more));
        assert!(limits.admit(client(3), &at(1, 1), t0).is_some(), "all released");
        let tcp = limits.admit_tcp(&at(1, 1)).expect("one connection");
        assert!(limits.admit_tcp(&at(1, 1)).is_none());
        let second = limits.admit_tcp(&at(1, 2)).expect("raised to two");
        drop((tcp, second));
        let again: Vec<TcpSlot> = (0..3).filter_map(|_| limits.admit_tcp(&at(1, 3))).collect();
        assert_eq!(again.len(), 3, "released on drop");
    }
}
