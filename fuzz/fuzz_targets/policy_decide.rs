//! Structure-aware config fuzzing and a differential check of `decide()`.
//!
//! `arbitrary` builds a configuration (internal ranges, NAT64 prefixes,
//! carve-outs for all or some roles, roles with modes, domain and CIDR
//! allow and deny rules, ports) from palettes that hit the registry rows,
//! transition forms and look-alike names, and renders it as YAML. The real
//! parser and `compile()` turn it into a `Policy`; a reference classifier
//! written here from the same values decides every query by linear scans
//! (longest matching prefix over a plain list, names by string suffix), and
//! any difference from `Policy::decide` fails. `pre_resolution` must agree
//! too: an IP literal is decided exactly as `decide` would, and a name it
//! refuses before DNS is refused whatever it resolves to.
//!
//! Shared with the code under test, on purpose: the registry rows (data),
//! `Transitions::judged` and `unwrap_rule` (the transition-form arithmetic,
//! fuzzed through `target_parse` and unit tests), and the target parser.
#![no_main]

use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use portcullis::config::Config;
use portcullis::policy::ranges::{Nat64Prefix, RangeKind, Transitions, DENIED_NAMES, DENIED_NAME_SUFFIXES};
use portcullis::policy::registry::{self, Treatment};
use portcullis::policy::{AllowedBy, Decision, DenyReason, Mode, PreResolution, RequestKind};
use portcullis::target::{Host, Target};

const LABELS: [&str; 12] =
    ["a", "b", "example", "com", "metadata", "google", "internal", "localhost", "xn--bcher-kva", "goog", "api", "Ex"];
const PORTS: [u16; 6] = [80, 443, 8080, 1, 65535, 22];
const NAT64_LENS: [u8; 6] = [32, 40, 48, 56, 64, 96];

/// Public addresses no registry row covers.
const PUBLIC: [IpAddr; 4] = [
    IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)),
    IpAddr::V4(Ipv4Addr::new(93, 184, 216, 34)),
    IpAddr::V6(Ipv6Addr::new(0x2606, 0x4700, 0, 0, 0, 0, 0, 0x1111)),
    IpAddr::V6(Ipv6Addr::new(0x2a00, 0x1450, 0x4001, 0x81c, 0, 0, 0, 0x200e)),
];

#[derive(Debug, Arbitrary)]
enum AddrSpec {
    /// First, so that the bytes-exhausted default is an allowable address.
    Public(u8),
    V4(u32),
    V6(u128),
    /// An address inside registry row `row`, at `offset` from its start.
    InRow(u8, u128),
    /// An address near the start of net number `net` of this config.
    InNet(u8, u32),
    /// An IPv4 address from another spec carried in a transition form.
    Mapped(Box<AddrSpec>),
    Nat64WellKnown(Box<AddrSpec>),
    SixToFour(Box<AddrSpec>),
    Teredo(Box<AddrSpec>),
    /// Carried in declared NAT64 prefix number `prefix`.
    InNat64(u8, Box<AddrSpec>),
}

#[derive(Debug, Arbitrary)]
struct NetSpec {
    base: AddrSpec,
    len: u8,
}

#[derive(Debug, Arbitrary)]
struct NameSpec {
    labels: Vec<u8>,
    wildcard: bool,
    trailing_dot: bool,
    upper: bool,
}

#[derive(Debug, Arbitrary)]
struct RoleSpec {
    mode: u8,
    sni_check: bool,
    allow_domains: Vec<NameSpec>,
    allow_cidrs: Vec<NetSpec>,
    resolve_unlisted: Option<bool>,
    http_ports: Option<Vec<u8>>,
    connect_ports: Option<Vec<u8>>,
    deny_domains: Vec<NameSpec>,
    deny_cidrs: Vec<NetSpec>,
}

#[derive(Debug, Arbitrary)]
struct CarveSpec {
    net: NetSpec,
    /// None: every role; otherwise role indices.
    roles: Option<Vec<u8>>,
}

#[derive(Debug, Arbitrary)]
enum HostSpec {
    Name(NameSpec),
    Ip(AddrSpec),
    /// A name under allow or deny domain rule `rule` of role `role`, with
    /// `label` in front (needed to match a wildcard).
    UnderRule { role: u8, rule: u8, deny: bool, label: Option<u8> },
}

#[derive(Debug, Arbitrary)]
struct Query {
    role: u8,
    connect: bool,
    host: HostSpec,
    port: u8,
    /// A name resolves to `first` and `more` (to nothing when `unresolved`).
    first: AddrSpec,
    more: Vec<AddrSpec>,
    unresolved: bool,
}

#[derive(Debug, Arbitrary)]
struct Spec {
    /// First, so that short inputs still ask questions.
    queries: [Query; 3],
    internal: Vec<NetSpec>,
    nat64: Vec<(u8, u128)>,
    carve_outs: Vec<CarveSpec>,
    /// The first is `default`; at least one role always exists.
    default_role: RoleSpec,
    roles: Vec<RoleSpec>,
    more_queries: Vec<Query>,
}

/// The values the config is rendered from, resolved out of the spec.
struct Resolver<'a> {
    rows: Vec<IpNet>,
    nets: Vec<IpNet>,
    nat64: &'a [Nat64Prefix],
}

impl Resolver<'_> {
    fn addr(&self, spec: &AddrSpec, depth: u8) -> IpAddr {
        let v4 = |s: &AddrSpec| match self.addr(s, depth + 1) {
            IpAddr::V4(a) => a,
            IpAddr::V6(a) => Ipv4Addr::from(u128::from(a) as u32),
        };
        if depth > 3 {
            return IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        }
        match spec {
            AddrSpec::Public(i) => PUBLIC[usize::from(*i) % PUBLIC.len()],
            AddrSpec::V4(a) => IpAddr::V4(Ipv4Addr::from(*a)),
            AddrSpec::V6(a) => IpAddr::V6(Ipv6Addr::from(*a)),
            AddrSpec::InRow(i, off) => offset_in(self.rows[usize::from(*i) % self.rows.len()], *off),
            AddrSpec::InNet(i, off) => match self.nets.len() {
                0 => IpAddr::V4(Ipv4Addr::from(*off)),
                n => offset_in(self.nets[usize::from(*i) % n], u128::from(*off)),
            },
            AddrSpec::Mapped(s) => IpAddr::V6(v4(s).to_ipv6_mapped()),
            AddrSpec::Nat64WellKnown(s) => IpAddr::V6(Nat64Prefix::WELL_KNOWN.embed(v4(s))),
            AddrSpec::SixToFour(s) => {
                let o = v4(s).octets();
                IpAddr::V6(Ipv6Addr::new(0x2002, u16::from_be_bytes([o[0], o[1]]), u16::from_be_bytes([o[2], o[3]]), 0, 0, 0, 0, 1))
            }
            AddrSpec::Teredo(s) => {
                let x = !u32::from(v4(s));
                IpAddr::V6(Ipv6Addr::new(0x2001, 0, 0x4136, 0xe378, 0x8000, 0x63bf, (x >> 16) as u16, x as u16))
            }
            AddrSpec::InNat64(i, s) => match self.nat64.len() {
                0 => IpAddr::V6(Nat64Prefix::WELL_KNOWN.embed(v4(s))),
                n => IpAddr::V6(self.nat64[usize::from(*i) % n].embed(v4(s))),
            },
        }
    }

    fn net(&self, spec: &NetSpec) -> IpNet {
        let addr = self.addr(&spec.base, 0);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        // Mostly long prefixes, like real rules; sometimes anything.
        let len = if spec.len >= 128 { max - (spec.len % 9).min(max) } else { spec.len % (max + 1) };
        IpNet::new(addr, len).expect("length within the family").trunc()
    }
}

fn offset_in(net: IpNet, off: u128) -> IpAddr {
    match net {
        IpNet::V4(n) => {
            let size = 1u64 << (32 - n.prefix_len());
            IpAddr::V4(Ipv4Addr::from(u32::from(n.network()).wrapping_add((off as u64 % size) as u32)))
        }
        IpNet::V6(n) => {
            let off = if n.prefix_len() == 0 { off } else { off % (1u128 << (128 - n.prefix_len())) };
            IpAddr::V6(Ipv6Addr::from(u128::from(n.network()).wrapping_add(off)))
        }
    }
}

fn name_text(spec: &NameSpec) -> String {
    let mut labels: Vec<&str> = spec.labels.iter().take(4).map(|i| LABELS[usize::from(*i) % LABELS.len()]).collect();
    if labels.is_empty() {
        labels.push("example");
    }
    let mut text = labels.join(".");
    if spec.upper {
        text = text.to_ascii_uppercase();
    }
    if spec.trailing_dot {
        text.push('.');
    }
    text
}

/// A domain rule: (normalised name, wildcard).
fn pattern(spec: &NameSpec) -> (String, bool) {
    let name = name_text(spec).to_ascii_lowercase();
    (name.strip_suffix('.').unwrap_or(&name).to_string(), spec.wildcard)
}

fn ports(list: &Option<Vec<u8>>, default: u16) -> Vec<u16> {
    match list {
        None => vec![default],
        Some(l) => l.iter().take(4).map(|i| PORTS[usize::from(*i) % PORTS.len()]).collect(),
    }
}

const MODES: [Mode; 3] = [Mode::Enforce, Mode::Report, Mode::Open];

/// One role as the reference sees it.
struct RefRole {
    name: String,
    mode: Mode,
    sni_check: bool,
    allow_domains: Vec<(String, bool)>,
    allow_cidrs: Vec<IpNet>,
    resolve_unlisted: bool,
    http_ports: Vec<u16>,
    connect_ports: Vec<u16>,
    deny_domains: Vec<(String, bool)>,
    deny_cidrs: Vec<IpNet>,
    carve_outs: Vec<IpNet>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Verdict {
    Denied(RangeKind),
    NotDenied,
}

/// The reference: plain lists, scanned in full.
struct Reference {
    transitions: Transitions,
    /// In precedence order for an identical prefix: later wins.
    ranges: Vec<(IpNet, Verdict)>,
    roles: Vec<RefRole>,
}

fn matches_pattern(name: &str, (pattern, wildcard): &(String, bool)) -> bool {
    if *wildcard {
        name.len() > pattern.len() + 1 && name.ends_with(pattern.as_str()) && name.as_bytes()[name.len() - pattern.len() - 1] == b'.'
    } else {
        name == pattern
    }
}

impl Reference {
    fn denied_range(&self, role: &RefRole, addr: IpAddr) -> Option<RangeKind> {
        let judged = self.transitions.judged(addr);
        let mut best: Option<(u8, Verdict)> = None;
        let carve = role.carve_outs.iter().map(|n| (*n, Verdict::NotDenied));
        for (net, verdict) in self.ranges.iter().copied().chain(carve) {
            if net.contains(&judged) && best.is_none_or(|(len, _)| net.prefix_len() >= len) {
                best = Some((net.prefix_len(), verdict));
            }
        }
        match best {
            Some((_, Verdict::Denied(kind))) => Some(kind),
            _ => None,
        }
    }

    fn denied_name(name: &str) -> Option<RangeKind> {
        if let Some((_, kind)) = DENIED_NAMES.iter().find(|(n, _)| *n == name) {
            return Some(*kind);
        }
        DENIED_NAME_SUFFIXES
            .iter()
            .filter(|(suffix, _)| matches_pattern(name, &(suffix.to_string(), true)))
            .max_by_key(|(suffix, _)| suffix.len())
            .map(|(_, kind)| *kind)
    }

    fn decide(&self, role: usize, kind: RequestKind, host: &Host, port: u16, addrs: &[IpAddr]) -> Result<(AllowedBy, Option<DenyReason>), DenyReason> {
        let name = match host {
            Host::Name(n) => Some(n.as_str()),
            Host::Ip(_) => None,
        };
        if let Some(kind) = name.and_then(Self::denied_name) {
            return Err(DenyReason::DeniedName(kind));
        }
        let role = &self.roles[role];
        for addr in addrs {
            if let Some(kind) = self.denied_range(role, *addr) {
                return Err(DenyReason::DeniedRange(kind));
            }
        }
        let in_deny = |a: &IpAddr| role.deny_cidrs.iter().any(|n| n.contains(a) || n.contains(&self.transitions.judged(*a)));
        if name.is_some_and(|n| role.deny_domains.iter().any(|p| matches_pattern(n, p))) || addrs.iter().any(in_deny) {
            return Err(DenyReason::DeniedByRole);
        }
        let checked = if role.mode == Mode::Open { Ok(AllowedBy::Open) } else { self.allow_check(role, kind, name, port, addrs) };
        let (rule, would_deny) = match checked {
            Ok(rule) => (rule, None),
            Err(reason) if role.mode == Mode::Enforce => return Err(reason),
            Err(reason) => (AllowedBy::ReportOnly, Some(reason)),
        };
        if addrs.is_empty() {
            return Err(DenyReason::NotAllowListed);
        }
        Ok((rule, would_deny))
    }

    fn allow_check(&self, role: &RefRole, kind: RequestKind, name: Option<&str>, port: u16, addrs: &[IpAddr]) -> Result<AllowedBy, DenyReason> {
        // Plain HTTP on http_ports; a tunnel on connect_ports, or on
        // http_ports when it carries plain HTTP (checked inside the tunnel).
        let allowed = match kind {
            RequestKind::Http => role.http_ports.contains(&port),
            _ => role.connect_ports.contains(&port) || role.http_ports.contains(&port),
        };
        if !allowed {
            return Err(DenyReason::PortNotAllowed);
        }
        if let Some(name) = name {
            if role.allow_domains.iter().any(|p| matches_pattern(name, p)) {
                return Ok(AllowedBy::Domain);
            }
            if !role.resolve_unlisted {
                return Err(DenyReason::NotAllowListed);
            }
        }
        let allowed = |a: &IpAddr| role.allow_cidrs.iter().any(|n| n.contains(&self.transitions.judged(*a)));
        if !addrs.is_empty() && addrs.iter().all(allowed) {
            return Ok(AllowedBy::Cidr);
        }
        Err(DenyReason::NotAllowListed)
    }
}

fn yaml_list(out: &mut String, indent: &str, key: &str, items: &[String]) {
    let _ = writeln!(out, "{indent}{key}: [{}]", items.iter().map(|i| format!("\"{i}\"")).collect::<Vec<_>>().join(", "));
}

/// Every value of the spec in the form the config and the reference use.
struct Built {
    yaml: String,
    reference: Option<Reference>,
    resolver_rows: Vec<IpNet>,
    nets: Vec<IpNet>,
    nat64: Vec<Nat64Prefix>,
}

fn build(spec: &Spec) -> Built {
    let rows: Vec<IpNet> = registry::rows().map(|r| r.net()).collect();
    let nat64: Vec<Nat64Prefix> = spec
        .nat64
        .iter()
        .take(3)
        .filter_map(|(len, bits)| {
            let len = NAT64_LENS[usize::from(*len) % NAT64_LENS.len()];
            let net = ipnet::Ipv6Net::new(Ipv6Addr::from(*bits), len).expect("valid length").trunc();
            Nat64Prefix::new(net).ok()
        })
        .collect();
    let mut r = Resolver { rows: rows.clone(), nets: Vec::new(), nat64: &nat64 };
    let net = |s: &NetSpec, r: &mut Resolver| {
        let n = r.net(s);
        r.nets.push(n);
        n
    };
    let internal: Vec<IpNet> = spec.internal.iter().take(4).map(|s| net(s, &mut r)).collect();
    let mut roles: Vec<(&RoleSpec, String)> = vec![(&spec.default_role, "default".to_string())];
    roles.extend(spec.roles.iter().take(3).enumerate().map(|(i, s)| (s, format!("r{i}"))));
    let role_nets: Vec<(Vec<IpNet>, Vec<IpNet>)> = roles
        .iter()
        .map(|(s, _)| {
            let allow = s.allow_cidrs.iter().take(6).map(|c| net(c, &mut r)).collect();
            let deny = s.deny_cidrs.iter().take(3).map(|c| net(c, &mut r)).collect();
            (allow, deny)
        })
        .collect();
    let carve_outs: Vec<(IpNet, Option<Vec<usize>>)> = spec
        .carve_outs
        .iter()
        .take(4)
        .map(|c| (net(&c.net, &mut r), c.roles.as_ref().map(|l| l.iter().take(3).map(|i| usize::from(*i) % roles.len()).collect())))
        .collect();

    let mut yaml = String::new();
    yaml_list(&mut yaml, "", "internal_ranges", &internal.iter().map(|n| n.to_string()).collect::<Vec<_>>());
    yaml_list(&mut yaml, "", "nat64_prefixes", &nat64.iter().map(|n| n.net().to_string()).collect::<Vec<_>>());
    yaml.push_str("allow_ranges:\n");
    for (n, for_roles) in &carve_outs {
        match for_roles {
            None => {
                let _ = writeln!(yaml, "  - \"{n}\"");
            }
            Some(l) => {
                let names: Vec<&str> = l.iter().map(|i| roles[*i].1.as_str()).collect();
                let _ = writeln!(yaml, "  - {{cidr: \"{n}\", roles: [{}]}}", names.join(", "));
            }
        }
    }
    if carve_outs.is_empty() {
        yaml.truncate(yaml.len() - "allow_ranges:\n".len());
    }
    yaml.push_str("roles:\n");
    // The rule CIDRs as the proxy will hold them: transition forms unwrapped
    // at parse time, then inside declared NAT64 prefixes at compile time.
    let transitions = Transitions::new(nat64.iter().copied());
    let unwrap = |n: &IpNet| Transitions::default().unwrap_rule(*n).and_then(|n| transitions.unwrap_rule(n)).ok();
    let unwrap_all = |l: &[IpNet]| l.iter().map(unwrap).collect::<Option<Vec<IpNet>>>();
    let mut ref_roles = Vec::new();
    let mut valid = true;
    for (i, ((s, name), (allow, deny))) in roles.iter().zip(&role_nets).enumerate() {
        let mode = MODES[usize::from(s.mode) % 3];
        let _ = writeln!(yaml, "  {name}:\n    mode: {}\n    sni_check: {}\n    allow:", mode.as_str(), s.sni_check);
        let allow_domains: Vec<&NameSpec> = s.allow_domains.iter().take(5).collect();
        let domain_text = |d: &&NameSpec| if d.wildcard { format!("*.{}", name_text(d)) } else { name_text(d) };
        yaml_list(&mut yaml, "      ", "domains", &allow_domains.iter().map(domain_text).collect::<Vec<_>>());
        yaml_list(&mut yaml, "      ", "cidrs", &allow.iter().map(|n| n.to_string()).collect::<Vec<_>>());
        if let Some(b) = s.resolve_unlisted {
            let _ = writeln!(yaml, "      resolve_unlisted_names: {b}");
        }
        let (http, connect) = (ports(&s.http_ports, 80), ports(&s.connect_ports, 443));
        if s.http_ports.is_some() {
            let _ = writeln!(yaml, "      http_ports: {http:?}");
        }
        if s.connect_ports.is_some() {
            let _ = writeln!(yaml, "      connect_ports: {connect:?}");
        }
        let deny_domains: Vec<&NameSpec> = s.deny_domains.iter().take(3).collect();
        yaml.push_str("    deny:\n");
        yaml_list(&mut yaml, "      ", "domains", &deny_domains.iter().map(domain_text).collect::<Vec<_>>());
        yaml_list(&mut yaml, "      ", "cidrs", &deny.iter().map(|n| n.to_string()).collect::<Vec<_>>());
        let own_carve_outs: Vec<IpNet> = carve_outs.iter().filter(|(_, l)| l.as_ref().is_some_and(|l| l.contains(&i))).map(|(n, _)| *n).collect();
        let (Some(allow_cidrs), Some(deny_cidrs), Some(carve_outs)) = (unwrap_all(allow), unwrap_all(deny), unwrap_all(&own_carve_outs)) else {
            valid = false;
            continue;
        };
        ref_roles.push(RefRole {
            name: name.clone(),
            mode,
            sni_check: s.sni_check,
            allow_domains: allow_domains.iter().map(|d| pattern(d)).collect(),
            allow_cidrs,
            resolve_unlisted: s.resolve_unlisted.unwrap_or(true),
            http_ports: http,
            connect_ports: connect,
            deny_domains: deny_domains.iter().map(|d| pattern(d)).collect(),
            deny_cidrs,
            carve_outs,
        });
    }
    let global_carve: Vec<IpNet> = carve_outs.iter().filter(|(_, l)| l.is_none()).map(|(n, _)| *n).collect();
    let (Some(internal), Some(global_carve)) = (unwrap_all(&internal), unwrap_all(&global_carve)) else {
        return Built { yaml, reference: None, resolver_rows: rows, nets: r.nets, nat64 };
    };
    let deny_prefixes: Vec<IpNet> = registry::rows().filter(|r| matches!(r.treatment, Treatment::Deny(_))).map(|r| r.net()).collect();
    let mut ranges: Vec<(IpNet, Verdict)> = registry::rows()
        .filter_map(|r| match r.treatment {
            Treatment::Deny(kind) => Some((r.net(), Verdict::Denied(kind))),
            _ => None,
        })
        .collect();
    // A globally reachable row is an exception only inside a denied row
    // (one with the very same prefix stays denied).
    let nested = |net: IpNet| deny_prefixes.iter().any(|d| *d != net && d.contains(&net));
    ranges.extend(
        registry::rows()
            .filter(|r| matches!(r.treatment, Treatment::Allow(_)) && nested(r.net()))
            .map(|r| (r.net(), Verdict::NotDenied)),
    );
    ranges.extend(internal.iter().map(|n| (*n, Verdict::Denied(RangeKind::Internal))));
    ranges.extend(global_carve.iter().map(|n| (*n, Verdict::NotDenied)));
    let reference = valid.then_some(Reference { transitions, ranges, roles: ref_roles });
    Built { yaml, reference, resolver_rows: rows, nets: r.nets, nat64 }
}

fuzz_target!(|spec: Spec| {
    let built = build(&spec);
    // The generated config names no file; the policy half of the compile
    // step is what is under test (config_parse covers the rest).
    let parsed = serde_yaml_ng::from_str::<Config>(&built.yaml)
        .map_err(|e| e.to_string())
        .and_then(|c| portcullis::snapshot::compile_policy(&c).map_err(|e| e.to_string()));
    let Some(reference) = built.reference else {
        assert!(parsed.is_err(), "a rule that cannot be unwrapped was accepted:\n{}", built.yaml);
        return;
    };
    // Refusals the reference does not model: a carve-out over no denied range.
    let Ok(policy) = parsed else { return };
    let r = Resolver { rows: built.resolver_rows, nets: built.nets, nat64: &built.nat64 };
    for q in spec.queries.iter().chain(spec.more_queries.iter().take(13)) {
        let role_index = usize::from(q.role) % reference.roles.len();
        let role = policy.role_id(&reference.roles[role_index].name).expect("every configured role exists");
        let kind = if q.connect { RequestKind::Connect } else { RequestKind::Http };
        let port = PORTS[usize::from(q.port) % PORTS.len()];
        let authority = match &q.host {
            HostSpec::Name(n) => format!("{}:{port}", name_text(n)),
            HostSpec::Ip(a) => SocketAddr::new(r.addr(a, 0), port).to_string(),
            HostSpec::UnderRule { role, rule, deny, label } => {
                let role = &reference.roles[usize::from(*role) % reference.roles.len()];
                let rules = if *deny { &role.deny_domains } else { &role.allow_domains };
                let Some((name, _)) = rules.get(usize::from(*rule) % rules.len().max(1)) else { continue };
                match label {
                    Some(l) => format!("{}.{name}:{port}", LABELS[usize::from(*l) % LABELS.len()]),
                    None => format!("{name}:{port}"),
                }
            }
        };
        let Ok(target) = Target::parse_authority(&authority) else { continue };
        let addrs: Vec<IpAddr> = match &target.host {
            Host::Ip(ip) => vec![*ip],
            Host::Name(_) if q.unresolved => Vec::new(),
            Host::Name(_) => std::iter::once(&q.first).chain(q.more.iter().take(3)).map(|a| r.addr(a, 0)).collect(),
        };
        let got = policy.decide(role, kind, &target, &addrs);
        let want = reference.decide(role_index, kind, &target.host, port, &addrs);
        let context = || format!("{kind:?} {authority} {addrs:?} as {}\n{}", reference.roles[role_index].name, built.yaml);
        match (&got, want) {
            (Decision::Deny { reason: g, .. }, Err(w)) => assert_eq!(*g, w, "{}", context()),
            (Decision::Allow(p), Ok((rule, would_deny))) => {
                assert_eq!((p.rule(), p.would_deny()), (rule, would_deny), "{}", context());
                let sockets: Vec<SocketAddr> = addrs.iter().map(|a| SocketAddr::new(a.to_canonical(), port)).collect();
                assert_eq!(p.addrs(), sockets, "{}", context());
                let sni = reference.roles[role_index].sni_check && rule == AllowedBy::Domain;
                assert_eq!(p.sni_check(), sni, "{}", context());
            }
            (got, want) => panic!("decide gave {got:?}, the reference {want:?}: {}", context()),
        }
        match policy.pre_resolution(role, kind, &target) {
            PreResolution::Decided(early) if matches!(target.host, Host::Ip(_)) => assert_eq!(early, got, "{}", context()),
            PreResolution::Decided(Decision::Deny { .. }) => {
                assert!(matches!(got, Decision::Deny { .. }), "refused before DNS, allowed after: {}", context());
            }
            PreResolution::Decided(allow) => panic!("a name allowed before resolution: {allow:?}: {}", context()),
            PreResolution::Resolve(_) => assert!(matches!(target.host, Host::Name(_)), "asked to resolve an IP literal"),
        }
    }
});
