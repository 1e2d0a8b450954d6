//! Revocation: a decision is not forever. Every open tunnel is registered
//! with the [`Ask`] it was admitted on and the address it dialed; after
//! each reload the new snapshot answers every tunnel's `Ask` again (the
//! identity derived again from its evidence, the same kind), and re-decides
//! every pooled upstream connection. Those it denies are closed (reason
//! `revoked`).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;

use super::decide::Ask;
use super::Shared;
use crate::policy::{Decision, Policy, RequestKind};

/// How often the published snapshot is checked for a new generation.
const CHECK_EVERY: Duration = Duration::from_millis(200);

/// What an open tunnel was admitted on, and how to close it.
struct OpenTunnel {
    ask: Ask,
    /// The checked address dialed; `None` when a parent proxy resolved the name.
    dialed: Option<IpAddr>,
    revoke: Notify,
}

/// Every open tunnel, by registration id.
#[derive(Default)]
pub struct Tunnels {
    open: DashMap<u64, Arc<OpenTunnel>>,
    next: AtomicU64,
}

impl Tunnels {
    /// Registers a tunnel admitted on `ask` and connected to `dialed`
    /// (`None` when a parent proxy resolved the name); it is unregistered
    /// when the returned value drops.
    pub fn register(shared: &Arc<Shared>, ask: Ask, dialed: Option<IpAddr>) -> Registration {
        let id = shared.tunnels.next.fetch_add(1, Ordering::Relaxed);
        let tunnel = Arc::new(OpenTunnel { ask, dialed, revoke: Notify::new() });
        shared.tunnels.open.insert(id, tunnel.clone());
        Registration { shared: shared.clone(), id, tunnel }
    }
}

/// A tunnel's entry in [`Tunnels`].
pub struct Registration {
    shared: Arc<Shared>,
    id: u64,
    tunnel: Arc<OpenTunnel>,
}

impl Registration {
    /// Completes when a reload denies this tunnel.
    pub async fn revoked(&self) {
        self.tunnel.revoke.notified().await
    }

    /// True when the snapshot in force still admits this tunnel's `Ask`.
    pub fn still_allowed(&self, shared: &Shared) -> bool {
        shared.snapshot.load().still_allows(&self.tunnel.ask, self.tunnel.dialed)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.tunnels.open.remove(&self.id);
    }
}

/// True when `policy` still lets `role` send plain HTTP to `target` at
/// `addr` over a pooled connection.
fn pooled_allowed(policy: &Policy, role: &str, target: &crate::target::Target, addr: std::net::SocketAddr) -> bool {
    let Some(role) = policy.role_id(role) else { return false };
    matches!(policy.decide(role, RequestKind::Http, target, &[addr.ip()]), Decision::Allow(_))
}

/// Answers every open tunnel's `Ask` again, and re-decides every pooled
/// connection, against the snapshot in force; closes what it denies.
fn revoke_denied(shared: &Shared) {
    let snapshot = shared.snapshot.load_full();
    let mut tunnels = 0;
    for entry in shared.tunnels.open.iter() {
        let t = entry.value();
        if !snapshot.still_allows(&t.ask, t.dialed) {
            t.revoke.notify_one();
            tunnels += 1;
        }
    }
    let policy = &snapshot.policy;
    let pooled = shared.pool.retain(|role, target, addr| pooled_allowed(policy, role, target, addr));
    shared.metrics.revoked.with_label_values(&["tunnel"]).inc_by(tunnels);
    shared.metrics.revoked.with_label_values(&["pooled"]).inc_by(pooled as u64);
    if tunnels + pooled as u64 > 0 {
        tracing::info!(generation = snapshot.generation, tunnels, pooled, "revoked what the reloaded policy denies");
    }
}

/// Watches for new snapshots and revokes after each one.
pub async fn on_reload(shared: Arc<Shared>) {
    let mut seen = shared.snapshot.load().generation;
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let generation = shared.snapshot.load().generation;
        if generation != seen {
            seen = generation;
            // The limits may have changed: pipes keep out of what they promise.
            #[cfg(target_os = "linux")]
            super::relay::splice::promise(shared.snapshot.load().limits.fds_needed());
            revoke_denied(&shared);
        }
    }
}
