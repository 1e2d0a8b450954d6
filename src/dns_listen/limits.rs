//! Per-client bounds on the DNS listener: queries per second (a token
//! bucket with a burst of one second's worth) and queries in flight, per
//! source address, plus the listener's total in flight.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

/// The listener's clients and its total in flight.
pub struct ClientLimits {
    clients: DashMap<IpAddr, Client>,
    total: Arc<Semaphore>,
}

/// One admitted query's place in the limits; released when dropped.
pub struct Slot {
    limits: Arc<ClientLimits>,
    client: IpAddr,
    _total: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(mut client) = self.limits.clients.get_mut(&self.client) {
            client.in_flight = client.in_flight.saturating_sub(1);
        }
    }
}

impl ClientLimits {
    /// Limits with room for `max_in_flight` queries in total.
    pub fn new(max_in_flight: usize) -> Arc<Self> {
        Arc::new(ClientLimits { clients: DashMap::new(), total: Arc::new(Semaphore::new(max_in_flight)) })
    }

    /// Takes a slot for one query from `client`, or `None` when the client
    /// is over its rate or in-flight limit or the listener is full.
    pub fn admit(self: &Arc<Self>, client: IpAddr, limits: &DnsListenerLimits, now: Instant) -> Option<Slot> {
        let total = self.total.clone().try_acquire_owned().ok()?;
        if self.clients.len() >= MAX_CLIENTS && !self.clients.contains_key(&client) {
            self.clients.retain(|_, c| c.in_flight > 0 || now.duration_since(c.refilled).as_secs() < 1);
            if self.clients.len() >= MAX_CLIENTS {
                return None;
            }
        }
        let rate = f64::from(limits.max_queries_per_second_per_client);
        let mut entry = self.clients.entry(client).or_insert(Client { tokens: rate, refilled: now, in_flight: 0 });
        let c = entry.value_mut();
        c.tokens = (c.tokens + now.duration_since(c.refilled).as_secs_f64() * rate).min(rate);
        c.refilled = now;
        if c.tokens < 1.0 || c.in_flight >= limits.max_in_flight_per_client {
            return None;
        }
        c.tokens -= 1.0;
        c.in_flight += 1;
        drop(entry);
        Some(Slot { limits: self.clone(), client, _total: total })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_in_flight_and_total_are_bounded() {
        let config = DnsListenerLimits { max_queries_per_second_per_client: 3, max_in_flight_per_client: 2, ..Default::default() };
        let limits = ClientLimits::new(3);
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
}
