//! Revocation: a decision is not forever. Every open tunnel is registered
//! with what it was decided on (role, target, dialed address); after each
//! reload the new policy re-decides every tunnel and pooled upstream
//! connection, and those it denies are closed (reason `revoked`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;

use super::Shared;
use crate::policy::{Decision, Policy, RequestKind};
use crate::target::Target;

/// How often the published snapshot is checked for a new generation.
const CHECK_EVERY: Duration = Duration::from_millis(200);

/// What an open tunnel was decided on, and how to close it.
struct OpenTunnel {
    role: Arc<str>,
    target: Target,
    /// The checked address dialed; `None` when a parent proxy resolved the name.
    checked: Option<SocketAddr>,
    revoke: Arc<Notify>,
}

/// Every open tunnel, by registration id.
#[derive(Default)]
pub struct Tunnels {
    open: DashMap<u64, OpenTunnel>,
    next: AtomicU64,
}

impl Tunnels {
    /// Registers a tunnel to `target` at the `checked` address (`None`
    /// when a parent proxy resolved the name); it is unregistered when the
    /// returned value drops. `notified()` on the registration completes
    /// when a reload revokes it.
    pub fn register(shared: &Arc<Shared>, role: Arc<str>, target: Target, checked: Option<SocketAddr>) -> Registration {
        let id = shared.tunnels.next.fetch_add(1, Ordering::Relaxed);
        let revoke = Arc::new(Notify::new());
        shared.tunnels.open.insert(id, OpenTunnel { role, target, checked, revoke: revoke.clone() });
        Registration { shared: shared.clone(), id, revoke }
    }
}

/// A tunnel's entry in [`Tunnels`].
pub struct Registration {
    shared: Arc<Shared>,
    id: u64,
    revoke: Arc<Notify>,
}

impl Registration {
    /// Completes when a reload denies this tunnel.
    pub async fn revoked(&self) {
        self.revoke.notified().await
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.tunnels.open.remove(&self.id);
    }
}

/// True when `policy` still allows `role` to reach `target` at the
/// `checked` address, or on the name alone when the parent resolved it.
fn still_allowed(policy: &Policy, role: &str, kind: RequestKind, target: &Target, checked: Option<SocketAddr>) -> bool {
    let Some(role) = policy.role_id(role) else { return false };
    let decision = match checked {
        Some(addr) => policy.decide(role, kind, target, &[addr.ip()]),
        None => policy.decide_name_only(role, kind, target),
    };
    matches!(decision, Decision::Allow(_))
}

/// Re-decides every open tunnel and pooled connection against the
/// snapshot in force; closes what it denies.
fn revoke_denied(shared: &Shared) {
    let snapshot = shared.snapshot.load_full();
    let policy = &snapshot.policy;
    let mut tunnels = 0;
    for entry in shared.tunnels.open.iter() {
        let t = entry.value();
        if !still_allowed(policy, &t.role, RequestKind::Connect, &t.target, t.checked) {
            t.revoke.notify_one();
            tunnels += 1;
        }
    }
    let pooled = shared.pool.retain(|role, target, addr| still_allowed(policy, role, RequestKind::Http, target, Some(addr)));
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
            revoke_denied(&shared);
        }
    }
}
