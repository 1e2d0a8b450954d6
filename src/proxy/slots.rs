//! Connection and tunnel slots, each charged to the client address that
//! opened it and bounded globally and per client. A slot is a guard: it is
//! released when the connection (or tunnel) it stands for ends, so the
//! counters and the `portcullis_active_*` gauges always equal what is open.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

use crate::config::Limits;
use crate::metrics::Metrics;

/// Which limit refused a connection or tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// `limits.max_connections`.
    Connections,
    /// `limits.max_connections_per_client`.
    ConnectionsPerClient,
    /// `limits.max_tunnels`.
    Tunnels,
    /// `limits.max_tunnels_per_client`.
    TunnelsPerClient,
}

impl LimitKind {
    /// The `reason` label of `portcullis_connections_refused_total`.
    pub const fn as_str(self) -> &'static str {
        match self {
            LimitKind::Connections => "global_limit",
            LimitKind::ConnectionsPerClient => "per_client_limit",
            LimitKind::Tunnels => "tunnel_limit",
            LimitKind::TunnelsPerClient => "per_client_tunnel_limit",
        }
    }
}

/// One family of slots (connections or tunnels): a global count and a
/// count per client address.
#[derive(Default)]
struct Counter {
    total: AtomicUsize,
    per_client: DashMap<IpAddr, usize>,
}

impl Counter {
    /// Takes a slot for `ip` when both counts are below their limits;
    /// otherwise says which limit was hit (`true`: the global one).
    fn acquire(&self, ip: IpAddr, max_total: usize, max_per_client: usize) -> Result<(), bool> {
        let mut count = self.per_client.entry(ip).or_insert(0);
        let refused = if *count >= max_per_client {
            Some(false)
        } else {
            let taken = self.total.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| (t < max_total).then_some(t + 1));
            taken.is_err().then_some(true)
        };
        if let Some(global) = refused {
            drop(count);
            self.per_client.remove_if(&ip, |_, c| *c == 0);
            return Err(global);
        }
        *count += 1;
        Ok(())
    }

    fn release(&self, ip: IpAddr) {
        self.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(mut count) = self.per_client.get_mut(&ip) {
            *count = count.saturating_sub(1);
        }
        self.per_client.remove_if(&ip, |_, c| *c == 0);
    }
}

/// Every open connection and tunnel of one proxy, by client address.
pub struct Slots {
    connections: Counter,
    tunnels: Counter,
    metrics: Arc<Metrics>,
}

impl Slots {
    /// Empty counters reporting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Slots { connections: Counter::default(), tunnels: Counter::default(), metrics })
    }

    /// A slot for a new client connection from `ip`.
    pub fn connection(self: &Arc<Self>, ip: IpAddr, limits: &Limits) -> Result<ConnectionSlot, LimitKind> {
        match self.connections.acquire(ip, limits.max_connections, limits.max_connections_per_client) {
            Ok(()) => {
                self.metrics.active_connections.inc();
                Ok(ConnectionSlot { slots: self.clone(), ip })
            }
            Err(global) => Err(self.refused(if global { LimitKind::Connections } else { LimitKind::ConnectionsPerClient })),
        }
    }

    /// A slot for a new tunnel from `ip`.
    pub fn tunnel(self: &Arc<Self>, ip: IpAddr, limits: &Limits) -> Result<TunnelSlot, LimitKind> {
        match self.tunnels.acquire(ip, limits.max_tunnels, limits.max_tunnels_per_client) {
            Ok(()) => {
                self.metrics.active_tunnels.inc();
                Ok(TunnelSlot { slots: self.clone(), ip })
            }
            Err(global) => Err(self.refused(if global { LimitKind::Tunnels } else { LimitKind::TunnelsPerClient })),
        }
    }

    fn refused(&self, kind: LimitKind) -> LimitKind {
        self.metrics.refused(kind.as_str()).inc();
        kind
    }
}

/// A client connection's place in the limits. Shared (`Arc`) between the
/// connection and the tunnel it turns into, so the slot is held until both
/// have ended.
pub struct ConnectionSlot {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.slots.metrics.active_connections.dec();
        self.slots.connections.release(self.ip);
    }
}

/// A tunnel's place in the tunnel limits, held by the tunnel task.
pub struct TunnelSlot {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Drop for TunnelSlot {
    fn drop(&mut self) {
        self.slots.metrics.active_tunnels.dec();
        self.slots.tunnels.release(self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_client: usize) -> Limits {
        Limits { max_connections: total, max_connections_per_client: per_client, ..Limits::default() }
    }

    #[test]
    fn slots_are_bounded_and_released() {
        let slots = Slots::new(Arc::new(Metrics::new()));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let l = limits(3, 2);
        let a1 = slots.connection(a, &l).unwrap();
        let _a2 = slots.connection(a, &l).unwrap();
        assert_eq!(slots.connection(a, &l).err(), Some(LimitKind::ConnectionsPerClient));
        let _b1 = slots.connection(b, &l).unwrap();
        assert_eq!(slots.connection(b, &l).err(), Some(LimitKind::Connections));
        drop(a1);
        let _b2 = slots.connection(b, &l).unwrap();
        assert_eq!(slots.metrics.active_connections.get(), 3);
        assert_eq!(slots.metrics.connections_refused.with_label_values(&["global_limit"]).get(), 1);
        assert_eq!(slots.metrics.connections_refused.with_label_values(&["per_client_limit"]).get(), 1);
    }

    #[test]
    fn refused_clients_leave_no_entry_behind() {
        let slots = Slots::new(Arc::new(Metrics::new()));
        let l = limits(0, 5);
        for i in 0..100u8 {
            assert!(slots.connection(IpAddr::from([10, 0, 0, i]), &l).is_err());
        }
        assert!(slots.connections.per_client.is_empty());
    }
}
