//! Idle keep-alive connections to origins.
//!
//! Keyed by the role and the address that was checked and dialed (never by
//! name), so a pooled connection is only reused for a request of the same
//! role whose own decision permitted that same address: two roles never
//! share an upstream connection (connection-bound authentication such as
//! NTLM stays with its role). Bounded per key and in total; at a bound the
//! connection idle the longest is closed first. Each entry remembers the
//! target it was opened for, so a reload can re-decide it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use hyper::client::conn::http1::SendRequest;
use prometheus::IntGauge;

use super::upload::CountedBody;
use crate::target::Target;

/// The sending half of an upstream HTTP/1 connection.
pub type Sender = SendRequest<CountedBody>;

/// Who may reuse a pooled connection: the same role, to the same address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub role: Arc<str>,
    pub addr: SocketAddr,
}

struct Idle {
    sender: Sender,
    since: Instant,
    target: Target,
}

/// Bounds on the pool, read from the current snapshot at each checkin.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    pub max_total: usize,
    pub max_per_key: usize,
}

/// The pool. Lookups lock one shard of the map, never the whole pool.
pub struct UpstreamPool {
    idle: DashMap<PoolKey, Vec<Idle>>,
    /// Connections held, across all keys.
    total: AtomicUsize,
    idle_timeout: Duration,
    /// Mirrors `total` for the metrics.
    gauge: IntGauge,
}

impl UpstreamPool {
    /// An empty pool whose connections expire after `idle_timeout`;
    /// `gauge` follows the number of connections held.
    pub fn new(idle_timeout: Duration, gauge: IntGauge) -> Self {
        UpstreamPool { idle: DashMap::new(), total: AtomicUsize::new(0), idle_timeout, gauge }
    }

    /// How long an idle connection is kept.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    fn taken(&self) {
        let before = self.total.fetch_sub(1, Ordering::AcqRel);
        self.gauge.set(before as i64 - 1);
    }

    fn added(&self) {
        let before = self.total.fetch_add(1, Ordering::AcqRel);
        self.gauge.set(before as i64 + 1);
    }

    /// An open idle connection of `role` to one of `addrs`, the most
    /// recently used first. It may not have signalled readiness yet.
    pub fn checkout(&self, role: &Arc<str>, addrs: &[SocketAddr]) -> Option<(Sender, SocketAddr)> {
        for addr in addrs {
            let key = PoolKey { role: role.clone(), addr: *addr };
            let Some(mut entry) = self.idle.get_mut(&key) else { continue };
            while let Some(idle) = entry.pop() {
                self.taken();
                if idle.since.elapsed() < self.idle_timeout && !idle.sender.is_closed() {
                    return Some((idle.sender, *addr));
                }
            }
        }
        None
    }

    /// Keeps a connection whose response has been read completely. At the
    /// per-key or total bound, the connection idle the longest goes.
    pub fn checkin(&self, key: PoolKey, target: Target, sender: Sender, limits: PoolLimits) {
        if sender.is_closed() || limits.max_per_key == 0 || limits.max_total == 0 {
            return;
        }
        while self.total.load(Ordering::Acquire) >= limits.max_total && self.evict_oldest() {}
        let mut entry = self.idle.entry(key).or_default();
        while entry.len() >= limits.max_per_key {
            entry.remove(0);
            self.taken();
        }
        entry.push(Idle { sender, since: Instant::now(), target });
        self.added();
    }

    /// Closes the connection idle the longest; false when the pool is empty.
    fn evict_oldest(&self) -> bool {
        let oldest = self
            .idle
            .iter()
            .filter_map(|e| e.value().first().map(|idle| (idle.since, e.key().clone())))
            .min_by_key(|(since, _)| *since);
        let Some((_, key)) = oldest else { return false };
        if let Some(mut entry) = self.idle.get_mut(&key) {
            if !entry.is_empty() {
                entry.remove(0);
                self.taken();
            }
        }
        self.idle.remove_if(&key, |_, v| v.is_empty());
        true
    }

    /// Closes every connection `keep` rejects (given the role, the target it
    /// was opened for and the dialed address), and expired or closed ones.
    /// Returns how many were closed because `keep` rejected them.
    pub fn retain(&self, mut keep: impl FnMut(&str, &Target, SocketAddr) -> bool) -> usize {
        let timeout = self.idle_timeout;
        let mut rejected = 0;
        self.idle.retain(|key, conns| {
            conns.retain(|idle| {
                let alive = idle.since.elapsed() < timeout && !idle.sender.is_closed();
                let kept = alive && keep(&key.role, &idle.target, key.addr);
                if alive && !kept {
                    rejected += 1;
                }
                if !kept {
                    self.taken();
                }
                kept
            });
            !conns.is_empty()
        });
        rejected
    }

    /// Drops expired and closed connections, and empty entries, so memory
    /// does not grow with the number of distinct destinations.
    pub fn reap(&self) {
        self.retain(|_, _, _| true);
    }

    /// Number of idle connections held.
    pub fn idle_count(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}
