//! The question and its decision, without I/O of its own: an [`Ask`]
//! (who, by their identity evidence; what kind; which target; where a
//! redirected connection was headed) and [`Rules::decide`], the one
//! decision sequence the proxy, `portcullis check`, `portcullis test` and
//! revocation all call, each with its own [`Lookup`] (the real resolver,
//! a case file's table, the address a tunnel already dialed).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::HeaderValue;

use super::egress::parent::Parent;
use crate::snapshot::Snapshot;
use crate::dns::{ResolveError, Resolver};
use crate::identity::{CertNames, Identities, IdentitySource};
use crate::policy::{Decision, DenyReason, Policy, PreResolution, RequestKind, RoleId};
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
