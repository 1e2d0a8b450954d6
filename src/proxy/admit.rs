//! The one door. Every entrance (the proxy port's forwarded HTTP and
//! CONNECT, the transparent listener's HTTP, TLS and other TCP) parses what
//! it was given into an [`Ask`]: who (the identity evidence, not the role
//! it maps to), what kind of request, which target, and where a redirected
//! connection was headed. [`admit`] answers every `Ask` with the same
//! sequence: identify, then decide
//! ([`Rules::decide`](super::decide::Rules::decide));
//! [`admit_tunnel`] goes on for a tunnel: take a tunnel slot, dial,
//! register. A registered tunnel keeps its `Ask`, so a reload replays the
//! same question: the identity is derived again from the evidence, with
//! the same kind.

use std::net::IpAddr;
use std::sync::Arc;

use super::egress;
use super::error::{ProxyError, UpstreamError};
use super::loops::OutboundGuard;
use super::revoke::{Registration, Tunnels};
use super::slots::TunnelSlot;
use super::egress::upstream::Upstream;
use super::Shared;
use crate::snapshot::Snapshot;
use crate::access_log::{AccessRecord, Outcome};
use crate::dns::{ResolveError, Resolver};
use crate::identity::IdentitySource;
use crate::policy::{Decision, DenyReason, Permit, RoleId};
use crate::target::DomainName;

// The decision's types under the door's path too (callers written against it).
pub use super::decide::{Ask, Before, Decided, Evidence, Lookup, Rules};

/// The proxy's lookup: the resolver, each query timed into the metrics.
struct Timed<'a> {
    resolver: &'a Resolver,
    histogram: &'a prometheus::Histogram,
}

impl Lookup for Timed<'_> {
    fn answer(&self, name: &DomainName) -> &'static str {
        self.resolver.answer(name)
    }

    async fn resolve(&self, name: &DomainName) -> Result<Vec<IpAddr>, ResolveError> {
        let started = std::time::Instant::now();
        let resolved = self.resolver.resolve(name).await;
        self.histogram.observe(started.elapsed().as_secs_f64());
        resolved
    }
}

/// A request the door let through: the client's role and the permit.
pub struct Admitted {
    pub role: RoleId,
    pub permit: Permit,
}

/// A tunnel the door opened: its permit, the dialed upstream, its slot in
/// the tunnel limits and its registration for revocation.
pub struct Opened {
    pub admitted: Admitted,
    pub upstream: Upstream,
    /// The upstream socket's entry for the loop guard, held as long as it.
    pub outbound: Option<OutboundGuard>,
    pub slot: TunnelSlot,
    pub registration: Registration,
}

/// Answers a request `ask` that is forwarded on its own (plain HTTP, on
/// the proxy port or redirected): identifies the client from its evidence
/// and decides. Fills the decision line as it goes.
pub async fn admit(shared: &Shared, snapshot: &Snapshot, ask: &Ask, record: &mut AccessRecord) -> Result<Admitted, ProxyError> {
    let (role, source) = identify(snapshot, &ask.who, record).map_err(ProxyError::Denied)?;
    match decide(shared, snapshot, role, ask, record).await {
        Ok(permit) => Ok(Admitted { role, permit }),
        Err(ProxyError::Denied(reason)) if matches!(ask.who, Evidence::Proxy { .. }) => {
            Err(ProxyError::Denied(snapshot.identities.challenge(source, reason)))
        }
        Err(e) => Err(e),
    }
}

/// Answers a tunnel `ask` (CONNECT, a redirected TLS or TCP connection):
/// [`admit`], then takes a tunnel slot, dials the permit and registers the
/// tunnel with its `Ask` for revocation. A tunnel registered while a
/// reload was in flight is checked against the newest policy before it is
/// handed back, so nothing is relayed on a decision a reload revoked.
pub async fn admit_tunnel(shared: &Arc<Shared>, snapshot: &Snapshot, ask: &Ask, record: &mut AccessRecord) -> Result<Opened, ProxyError> {
    let admitted = admit(shared, snapshot, ask, record).await?;
    // Taken before dialing, so a client over its tunnel limit costs no
    // upstream socket.
    let slot = shared.slots.tunnel(ask.who.source(), &snapshot.limits).map_err(ProxyError::OverLimit)?;
    let (upstream, addr) = egress::open(snapshot, &shared.metrics, ask.kind, &ask.target, admitted.role, &admitted.permit).await?;
    let outbound = upstream.local_addr().ok().map(|local| shared.outbound.register(local));
    record.dialed = Some(addr);
    // A name the parent resolved is re-decided on the name alone.
    let dialed = (!admitted.permit.name_only()).then_some(addr.ip());
    let registration = Tunnels::register(shared, ask.clone(), dialed);
    if snapshot.generation != shared.snapshot.load().generation && !registration.still_allowed(shared) {
        // A reload landed while this tunnel was being dialed; its
        // revocation pass may have run before the tunnel was registered.
        return Err(ProxyError::Denied(DenyReason::Revoked));
    }
    Ok(Opened { admitted, upstream, outbound, slot, registration })
}

/// The role `who` earns in `snapshot`, written into the decision line.
pub fn identify(snapshot: &Snapshot, who: &Evidence, record: &mut AccessRecord) -> Result<(RoleId, IdentitySource), DenyReason> {
    let (role, source) = who.identify(&snapshot.identities, &snapshot.policy)?;
    let role_of = snapshot.policy.role(role);
    record.identity = source.as_str();
    if let (IdentitySource::Credentials, Evidence::Proxy { credentials: Some(presented), .. }) = (source, who) {
        record.credentials = Some(crate::denials::credential_digest(presented.as_bytes()));
    }
    record.role = role_of.name().to_string();
    record.mode = role_of.mode();
    Ok((role, source))
}

/// The answer to a request whose target could not be parsed: a client
/// that cannot be identified is told that first (it must authenticate
/// whatever it asks for); otherwise the target's error.
pub fn unparsed(snapshot: &Snapshot, who: &Evidence, record: &mut AccessRecord, err: ProxyError) -> ProxyError {
    match identify(snapshot, who, record) {
        Err(reason) => ProxyError::Denied(reason),
        Ok(_) => err,
    }
}

/// Decides `ask` for `role` on the snapshot's resolver, recording the rule,
/// the outcome and where the addresses came from.
async fn decide(shared: &Shared, snapshot: &Snapshot, role: RoleId, ask: &Ask, record: &mut AccessRecord) -> Result<Permit, ProxyError> {
    let lookup = Timed { resolver: &snapshot.resolver, histogram: &shared.metrics.dns_resolve };
    let decided = match snapshot.rules().decide(role, ask.kind, &ask.target, ask.original, &lookup).await {
        Ok(decided) => decided,
        Err(unresolved) => {
            record.answer = unresolved.answer;
            return Err(UpstreamError::Resolve(unresolved.error).into());
        }
    };
    record.answer = decided.answer;
    let policy = &snapshot.policy;
    match decided.decision {
        Decision::Deny { reason, rule } => {
            record.rule = Some(policy.rule_ref(rule));
            // For the deny's carve-out hint: the address that was denied.
            if let DenyReason::DeniedRange(_) = reason {
                record.denied_addr = decided.addrs.iter().copied().find(|a| policy.denied_range_for(role, *a).is_some());
            }
            Err(ProxyError::Denied(reason))
        }
        Decision::Allow(permit) => {
            record.rule = Some(policy.rule_ref(permit.rule_id()));
            record.outcome = match permit.would_deny() {
                Some(reason) => Outcome::WouldDeny(reason),
                None => Outcome::Allow,
            };
            Ok(permit)
        }
    }
}
