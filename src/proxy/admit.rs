//! The one door. Every entrance (the proxy port's forwarded HTTP and
//! CONNECT, the transparent listener's HTTP, TLS and other TCP) parses what
//! it was given into an [`Ask`]: who (the identity evidence, not the role
//! it maps to), what kind of request, which target, and where a redirected
//! connection was headed. [`admit`] answers every `Ask` with the same
//! sequence: identify, then decide; [`admit_tunnel`] goes on for a tunnel:
//! take a tunnel slot, dial, register.
//!
//! The decision itself is [`Rules::decide`]: `portcullis check`,
//! `portcullis test` and revocation call it too, with the real resolver, a
//! case file's table, or the address a tunnel already dialed. A registered
//! tunnel keeps its `Ask`, so a reload replays the same question: the
//! identity is derived again from the evidence, with the same kind.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::HeaderValue;

use super::egress;
use super::error::{ProxyError, UpstreamError};
use super::loops::OutboundGuard;
use super::parent::Parent;
use super::revoke::{Registration, Tunnels};
use super::slots::TunnelSlot;
use super::upstream::Upstream;
use super::{Shared, Snapshot};
use crate::access_log::{AccessRecord, Outcome};
use crate::dns::{ResolveError, Resolver};
use crate::identity::{CertNames, Identities, IdentitySource};
use crate::policy::{Decision, DenyReason, Permit, Policy, PreResolution, RequestKind, RoleId};
use crate::target::{DomainName, Target};

/// What a client presented to show who it is. Kept with a tunnel, so a
/// reload derives the role again from it: a removed credential or source
/// rule takes the tunnel's role away too.
#[derive(Clone)]
pub enum Evidence {
    /// A client of the proxy port: its source address, the names of its
    /// certificate (TLS proxy port) and its `Proxy-Authorization`.
    Proxy { source: IpAddr, cert: Option<Arc<CertNames>>, credentials: Option<HeaderValue> },
    /// A connection redirected to the transparent listener: its source
    /// address alone.
    Redirected { source: IpAddr },
}

impl Evidence {
    /// The client's address, to which slots are charged.
    pub fn source(&self) -> IpAddr {
        match self {
            Evidence::Proxy { source, .. } | Evidence::Redirected { source } => *source,
        }
    }

    /// The role this evidence earns under `identities` and `policy`.
    pub fn identify(&self, identities: &Identities, policy: &Policy) -> Result<(RoleId, IdentitySource), DenyReason> {
        match self {
            Evidence::Proxy { source, cert, credentials } => {
                identities.identify(policy, cert.as_deref(), credentials.as_ref(), *source)
            }
            Evidence::Redirected { source } => identities.identify_source(policy, *source),
        }
    }
}

/// One question to the door: who asks, for what kind of request, to which
/// target, and (for a redirected connection) where its packets were headed.
#[derive(Clone)]
pub struct Ask {
    pub who: Evidence,
    pub kind: RequestKind,
    pub target: Target,
    pub original: Option<SocketAddr>,
}

impl Ask {
    /// True for the kinds that become a tunnel (relayed bytes) rather than
    /// one forwarded request.
    pub fn is_tunnel(&self) -> bool {
        matches!(self.kind, RequestKind::Connect | RequestKind::TransparentTls | RequestKind::TransparentTcp)
    }
}

/// Where a decision gets a name's addresses.
pub trait Lookup {
    /// Where `name`'s answer comes from, for the decision line's `answer`:
    /// `static` for a name config pins (answered from config and checked,
    /// so never handed to a parent unresolved), else the lookup's own label.
    fn answer(&self, name: &DomainName) -> &'static str;

    /// Every address of `name`.
    fn resolve(&self, name: &DomainName) -> impl Future<Output = Result<Vec<IpAddr>, ResolveError>> + Send;
}

impl Lookup for Resolver {
    fn answer(&self, name: &DomainName) -> &'static str {
        if self.pinned(name).is_some() { "static" } else { "dns" }
    }

    async fn resolve(&self, name: &DomainName) -> Result<Vec<IpAddr>, ResolveError> {
        Resolver::resolve(self, name).await
    }
}

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

/// What decides: the policy, and the parent proxy, which resolves some
/// names itself (`upstream_proxy.resolve: parent`).
#[derive(Clone, Copy)]
pub struct Rules<'a> {
    pub policy: &'a Policy,
    pub parent: Option<&'a Parent>,
}

/// A decision and how it was reached.
pub struct Decided {
    pub decision: Decision,
    /// Where the name's addresses came from: `dns`, `static`, a test's
    /// table, `parent` (not resolved here), or empty (no name to resolve,
    /// or denied before resolving).
    pub answer: &'static str,
    /// The addresses the name resolved to (empty when none were asked for).
    pub addrs: Vec<IpAddr>,
}

/// A name that could not be resolved, and where its answer was sought.
#[derive(Debug)]
pub struct Unresolved {
    pub error: ResolveError,
    pub answer: &'static str,
}

/// The first step of a decision: decided without DNS, or the name to resolve.
pub enum Before<'t> {
    Decided(Decided),
    Resolve(&'t DomainName),
}

impl Rules<'_> {
    /// Decides `role`'s request: what can be decided without DNS first,
    /// then on every address `lookup` gives for the name. `original` is
    /// where a redirected connection was headed; an allowed permit is
    /// narrowed to it when it is one of the checked addresses.
    pub async fn decide(
        &self,
        role: RoleId,
        kind: RequestKind,
        target: &Target,
        original: Option<SocketAddr>,
        lookup: &impl Lookup,
    ) -> Result<Decided, Unresolved> {
        let name = match self.before_dns(role, kind, target, lookup) {
            Before::Decided(decided) => return Ok(decided),
            Before::Resolve(name) => name,
        };
        let answer = lookup.answer(name);
        let addrs = lookup.resolve(name).await.map_err(|error| Unresolved { error, answer })?;
        let decision = self.with_addrs(role, kind, target, &addrs, original);
        Ok(Decided { decision, answer, addrs })
    }

    /// What is decided before any lookup: IP literals, names denied
    /// whatever they resolve to, and names the parent proxy resolves.
    pub fn before_dns<'t>(&self, role: RoleId, kind: RequestKind, target: &'t Target, lookup: &impl Lookup) -> Before<'t> {
        let decided = |decision, answer| Before::Decided(Decided { decision, answer, addrs: Vec::new() });
        match self.policy.pre_resolution(role, kind, target) {
            PreResolution::Decided(decision) => decided(decision, ""),
            PreResolution::Resolve(name) if self.parent_resolves(role, kind, target, name, lookup) => {
                decided(self.policy.decide_name_only(role, kind, target), "parent")
            }
            PreResolution::Resolve(name) => Before::Resolve(name),
        }
    }

    /// The decision on a name's addresses.
    pub fn with_addrs(&self, role: RoleId, kind: RequestKind, target: &Target, addrs: &[IpAddr], original: Option<SocketAddr>) -> Decision {
        match original {
            None => self.policy.decide(role, kind, target, addrs),
            Some(original) => self.policy.decide_redirected(role, kind, target, addrs, original.ip()),
        }
    }

    /// True when `name` is handed to the parent proxy unresolved
    /// (`upstream_proxy.resolve: parent`, and the request leaves through
    /// the parent) and nothing in this config needs its addresses: a pinned
    /// name is answered from config and checked, and a name a carve-out is
    /// bound to must be resolved here for the carve-out to apply.
    fn parent_resolves(&self, role: RoleId, kind: RequestKind, target: &Target, name: &DomainName, lookup: &impl Lookup) -> bool {
        let Some(parent) = self.parent else { return false };
        parent.resolves(self.policy.role(role).name(), kind, name) && lookup.answer(name) != "static" && !self.policy.binds_name(role, target)
    }
}

impl Snapshot {
    /// What decides in this snapshot.
    pub fn rules(&self) -> Rules<'_> {
        Rules { policy: &self.policy, parent: self.parent.as_ref() }
    }

    /// True when `ask`, once admitted with an upstream at `dialed` (`None`:
    /// the parent resolved the name), is still allowed by this snapshot:
    /// the identity derived again from the evidence, the same kind, target
    /// and original destination, the addresses already dialed.
    pub fn still_allows(&self, ask: &Ask, dialed: Option<IpAddr>) -> bool {
        let Ok((role, _)) = ask.who.identify(&self.identities, &self.policy) else { return false };
        let rules = self.rules();
        let decision = match rules.before_dns(role, ask.kind, &ask.target, &self.resolver) {
            Before::Decided(decided) => decided.decision,
            Before::Resolve(_) => match dialed {
                Some(ip) => rules.with_addrs(role, ask.kind, &ask.target, &[ip], ask.original),
                None => self.policy.decide_name_only(role, ask.kind, &ask.target),
            },
        };
        matches!(decision, Decision::Allow(_))
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
    let (upstream, addr) = egress::open(snapshot, &shared.metrics, ask, &admitted).await?;
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
