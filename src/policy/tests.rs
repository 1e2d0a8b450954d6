use super::*;
use crate::target::Target;

fn policy(mode: Mode, domains: &[&str], cidrs: &[&str], carve_outs: &[&str]) -> Policy {
    let allow = AllowList::new(
        domains.iter().map(|d| DomainPattern::parse(d).unwrap()),
        cidrs.iter().map(|c| c.parse().unwrap()),
        PortSet::new([80]),
        PortSet::new([443]),
    );
    let carve: Vec<IpNet> = carve_outs.iter().map(|c| c.parse().unwrap()).collect();
    let plan = AddressPlan { carve_outs: carve, ..AddressPlan::default() };
    Policy::new(vec![Role::new("default", mode, true, allow)], "default", &plan).unwrap()
}

/// The deny reason of a decision made before resolution.
fn pre_reason(r: &PreResolution) -> Option<DenyReason> {
    match r {
        PreResolution::Decided(d) => d.deny_reason(),
        PreResolution::Resolve(_) => None,
    }
}

#[test]
fn every_denied_range_and_transition_form() {
    use RangeKind::*;
    let p = policy(Mode::Enforce, &[], &["0.0.0.0/0", "::/0"], &[]);
    let cases: &[(&str, Option<RangeKind>)] = &[
        ("0.0.0.0", Some(Special)),
        ("0.255.255.255", Some(Special)),
        ("10.0.0.1", Some(Private)),
        ("10.255.255.255", Some(Private)),
        ("100.64.0.1", Some(Private)),
        ("100.127.255.255", Some(Private)),
        ("100.100.100.200", Some(Metadata)),
        ("100.128.0.0", None),
        ("127.0.0.1", Some(Loopback)),
        ("127.255.255.254", Some(Loopback)),
        ("169.254.0.1", Some(LinkLocal)),
        ("169.254.169.254", Some(Metadata)),
        ("169.254.170.2", Some(Metadata)),
        ("172.16.0.1", Some(Private)),
        ("172.31.255.255", Some(Private)),
        ("172.32.0.0", None),
        ("192.0.0.1", Some(Special)),
        ("192.0.0.192", Some(Metadata)),
        ("192.0.2.1", Some(Special)),
        ("192.88.99.1", Some(Special)),
        ("192.168.1.1", Some(Private)),
        ("198.18.0.1", Some(Special)),
        ("198.19.255.255", Some(Special)),
        ("198.51.100.7", Some(Special)),
        ("203.0.113.9", Some(Special)),
        ("224.0.0.1", Some(Special)),
        ("239.255.255.255", Some(Special)),
        ("240.0.0.1", Some(Special)),
        ("255.255.255.255", Some(Special)),
        ("168.63.129.16", Some(Metadata)),
        ("168.63.129.17", None),
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("::", Some(Special)),
        ("::1", Some(Loopback)),
        ("fc00::1", Some(Private)),
        ("fdff:ffff::1", Some(Private)),
        ("fd00:ec2::254", Some(Metadata)),
        ("fe80::1", Some(LinkLocal)),
        ("febf::1", Some(LinkLocal)),
        ("fec0::1", Some(Special)),
        ("ff02::1", Some(Special)),
        ("2001:db8::1", Some(Special)),
        ("100::1", Some(Special)),
        ("100:0:0:1::1", Some(Special)),
        ("100:0:0:2::1", None),
        ("2606:4700:4700::1111", None),
        // Transition forms, judged by the IPv4 address they carry.
        ("::ffff:169.254.169.254", Some(Metadata)),
        ("::ffff:a9fe:a9fe", Some(Metadata)),
        ("::ffff:10.0.0.1", Some(Private)),
        ("::ffff:127.0.0.1", Some(Loopback)),
        ("::ffff:8.8.8.8", None),
        ("::ffff:0:a9fe:a9fe", Some(Metadata)),
        ("::a9fe:a9fe", Some(Metadata)),
        ("::127.0.0.1", Some(Loopback)),
        ("::8.8.8.8", None),
        ("64:ff9b::a9fe:a9fe", Some(Metadata)),
        ("64:ff9b::192.168.0.1", Some(Private)),
        ("64:ff9b::8.8.8.8", None),
        ("64:ff9b:1::a00:1", Some(Special)),
        ("64:ff9b:1::808:808", Some(Special)),
        ("2002:a9fe:a9fe::", Some(Metadata)),
        ("2002:7f00:1::1", Some(Loopback)),
        ("2002:0808:0808::1", None),
        ("2001:0:4136:e378:8000:63bf:5601:5601", Some(Metadata)),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", Some(Private)),
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", None),
    ];
    for (addr, want) in cases {
        let ip: IpAddr = addr.parse().unwrap();
        assert_eq!(p.denied_range(ip), *want, "{addr}");
        let target = Target { host: Host::Ip(ip), port: 80 };
        let decision = p.decide(p.default_role(), RequestKind::Http, &target, &[ip]);
        match want {
            Some(kind) => assert_eq!(decision.deny_reason(), Some(DenyReason::DeniedRange(*kind)), "{addr}"),
            None => assert!(matches!(decision, Decision::Allow(_)), "{addr}: {decision:?}"),
        }
    }
}

#[test]
fn denied_names_before_resolution() {
    let p = policy(Mode::Report, &["*.internal", "localhost"], &[], &[]);
    let cases: &[(&str, RangeKind)] = &[
        ("metadata.google.internal", RangeKind::Metadata),
        ("METADATA.google.internal.", RangeKind::Metadata),
        ("metadata", RangeKind::Metadata),
        ("metadata.goog", RangeKind::Metadata),
        ("instance-data", RangeKind::Metadata),
        ("localhost", RangeKind::Loopback),
        ("foo.localhost", RangeKind::Loopback),
    ];
    for (name, kind) in cases {
        let target = Target::parse_authority(&format!("{name}:80")).unwrap();
        let got = p.pre_resolution(p.default_role(), RequestKind::Http, &target);
        assert_eq!(pre_reason(&got), Some(DenyReason::DeniedName(*kind)), "{name}");
    }
}

#[test]
fn one_denied_address_denies_the_name() {
    let p = policy(Mode::Enforce, &["example.com"], &[], &[]);
    let target = Target::parse_authority("example.com:443").unwrap();
    let addrs: Vec<IpAddr> = vec!["93.184.216.34".parse().unwrap(), "169.254.169.254".parse().unwrap()];
    assert_eq!(
        p.decide(p.default_role(), RequestKind::Connect, &target, &addrs).deny_reason(),
        Some(DenyReason::DeniedRange(RangeKind::Metadata))
    );
    let Decision::Allow(permit) = p.decide(p.default_role(), RequestKind::Connect, &target, &addrs[..1]) else {
        panic!("public address of an allowed name must be allowed");
    };
    assert_eq!(permit.addrs(), &["93.184.216.34:443".parse::<SocketAddr>().unwrap()]);
    assert_eq!(permit.rule(), AllowedBy::Domain);
}

#[test]
fn allow_list_and_ports() {
    let p = policy(Mode::Enforce, &["example.com", "*.github.com"], &["8.8.8.0/24"], &[]);
    let role = p.default_role();
    let public: IpAddr = "93.184.216.34".parse().unwrap();
    let cases: &[(&str, RequestKind, &[IpAddr], Result<AllowedBy, DenyReason>)] = &[
        ("example.com:80", RequestKind::Http, &[public], Ok(AllowedBy::Domain)),
        ("example.com:443", RequestKind::Connect, &[public], Ok(AllowedBy::Domain)),
        ("example.com:443", RequestKind::Http, &[public], Err(DenyReason::PortNotAllowed)),
        ("example.com:22", RequestKind::Connect, &[public], Err(DenyReason::PortNotAllowed)),
        ("api.github.com:443", RequestKind::Connect, &[public], Ok(AllowedBy::Domain)),
        ("evil.com:443", RequestKind::Connect, &[public], Err(DenyReason::NotAllowListed)),
        ("dns.example.net:443", RequestKind::Connect, &["8.8.8.8".parse().unwrap()], Ok(AllowedBy::Cidr)),
        ("8.8.8.8:443", RequestKind::Connect, &["8.8.8.8".parse().unwrap()], Ok(AllowedBy::Cidr)),
        ("[::ffff:8.8.8.8]:443", RequestKind::Connect, &["::ffff:8.8.8.8".parse().unwrap()], Ok(AllowedBy::Cidr)),
        ("8.8.4.4:443", RequestKind::Connect, &["8.8.4.4".parse().unwrap()], Err(DenyReason::NotAllowListed)),
    ];
    for (authority, kind, addrs, want) in cases {
        let target = Target::parse_authority(authority).unwrap();
        let got = match p.decide(role, *kind, &target, addrs) {
            Decision::Allow(permit) => Ok(permit.rule()),
            Decision::Deny { reason, .. } => Err(reason),
        };
        assert_eq!(got, *want, "{authority} {kind:?}");
    }
}

#[test]
fn mapped_addresses_are_dialed_as_ipv4() {
    let p = policy(Mode::Enforce, &[], &["8.8.8.0/24"], &[]);
    let target = Target::parse_authority("[::ffff:8.8.8.8]:443").unwrap();
    let PreResolution::Decided(Decision::Allow(permit)) = p.pre_resolution(p.default_role(), RequestKind::Connect, &target) else {
        panic!("allowed literal");
    };
    assert_eq!(permit.addrs(), &["8.8.8.8:443".parse::<SocketAddr>().unwrap()]);
}

#[test]
fn pre_resolution_skips_dns_only_when_the_answer_cannot_matter() {
    let enforce = policy(Mode::Enforce, &["example.com"], &[], &[]);
    let with_cidrs = policy(Mode::Enforce, &["example.com"], &["8.8.8.0/24"], &[]);
    let report = policy(Mode::Report, &["example.com"], &[], &[]);
    let other = Target::parse_authority("other.com:443").unwrap();
    let allowed = Target::parse_authority("example.com:443").unwrap();
    let bad_port = Target::parse_authority("example.com:8443").unwrap();
    let deny = |r| Some(r);
    let resolve = |t: &Target| match &t.host {
        Host::Name(n) => format!("resolve {n}"),
        Host::Ip(_) => unreachable!(),
    };
    let k = RequestKind::Connect;
    assert_eq!(pre_reason(&enforce.pre_resolution(enforce.default_role(), k, &other)), deny(DenyReason::NotAllowListed));
    assert_eq!(pre_reason(&enforce.pre_resolution(enforce.default_role(), k, &bad_port)), deny(DenyReason::PortNotAllowed));
    let show = |r: PreResolution| match r {
        PreResolution::Resolve(n) => format!("resolve {n}"),
        PreResolution::Decided(d) => format!("{d:?}"),
    };
    assert_eq!(show(enforce.pre_resolution(enforce.default_role(), k, &allowed)), resolve(&allowed));
    assert_eq!(show(with_cidrs.pre_resolution(with_cidrs.default_role(), k, &other)), resolve(&other));
    assert_eq!(show(report.pre_resolution(report.default_role(), k, &other)), resolve(&other));
}

#[test]
fn report_mode_allows_soft_denies_only() {
    let p = policy(Mode::Report, &["example.com"], &[], &[]);
    let role = p.default_role();
    let target = Target::parse_authority("other.com:443").unwrap();
    let Decision::Allow(permit) = p.decide(role, RequestKind::Connect, &target, &["93.184.216.34".parse().unwrap()]) else {
        panic!("report mode allows");
    };
    assert_eq!(permit.would_deny(), Some(DenyReason::NotAllowListed));
    assert_eq!(permit.rule(), AllowedBy::ReportOnly);
    let meta = Target::parse_authority("169.254.169.254:80").unwrap();
    assert_eq!(
        p.decide(role, RequestKind::Http, &meta, &["169.254.169.254".parse().unwrap()]).deny_reason(),
        Some(DenyReason::DeniedRange(RangeKind::Metadata))
    );
}

#[test]
fn carve_outs_apply_only_where_as_specific() {
    let p = policy(Mode::Enforce, &[], &["127.0.0.1/32", "169.254.0.0/16"], &["127.0.0.1/32", "169.254.0.0/16"]);
    assert_eq!(p.denied_range("127.0.0.1".parse().unwrap()), None);
    assert_eq!(p.denied_range("127.0.0.2".parse().unwrap()), Some(RangeKind::Loopback));
    assert_eq!(p.denied_range("::ffff:127.0.0.1".parse().unwrap()), None);
    assert_eq!(p.denied_range("169.254.1.1".parse().unwrap()), None);
    // The /32 metadata entry is more specific than the /16 carve-out.
    assert_eq!(p.denied_range("169.254.169.254".parse().unwrap()), Some(RangeKind::Metadata));
    let unrelated = policy(Mode::Enforce, &[], &[], &[]);
    assert_eq!(unrelated.denied_range("127.0.0.1".parse().unwrap()), Some(RangeKind::Loopback));
}

#[test]
fn carve_out_overlap_check() {
    for (net, want) in [("127.0.0.1/32", true), ("8.8.8.0/24", false), ("0.0.0.0/0", true), ("2001:4860::/32", false), ("fd00::/8", true)] {
        assert_eq!(AddressPlan::default().overlaps_denied_range(&net.parse().unwrap()), want, "{net}");
    }
}

#[test]
fn missing_default_role_is_an_error() {
    let allow = AllowList::new([], [], PortSet::new([80]), PortSet::new([443]));
    let err = Policy::new(vec![Role::new("team-a", Mode::Enforce, true, allow)], "default", &AddressPlan::default()).unwrap_err();
    assert_eq!(err, PolicyError::MissingRole("default".into()));
}

#[test]
fn reason_codes_are_distinct() {
    use std::collections::HashSet;
    let codes: HashSet<&str> = DenyReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(codes.len(), DenyReason::ALL.len());
}

// The always-denied table against an independent oracle.
mod oracle;

#[test]
fn internal_ranges_and_nat64_prefixes() {
    let allow = AllowList::new([], ["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()], PortSet::new([80]), PortSet::new([443]));
    let plan = AddressPlan {
        carve_outs: vec!["10.96.5.0/24".parse().unwrap()],
        internal: vec!["10.96.0.0/12".parse().unwrap(), "34.118.224.0/20".parse().unwrap(), "2600:1f14:abc::/48".parse().unwrap()],
        nat64: vec![ranges::Nat64Prefix::new("2001:db8:64::/96".parse().unwrap()).unwrap()],
        ..AddressPlan::default()
    };
    let p = Policy::new(vec![Role::new("default", Mode::Enforce, true, allow)], "default", &plan).unwrap();
    let cases: &[(&str, Option<RangeKind>)] = &[
        ("34.118.230.1", Some(RangeKind::Internal)),
        ("34.118.240.1", None),
        ("10.96.0.1", Some(RangeKind::Internal)),
        ("10.96.5.9", None),
        ("10.112.0.1", Some(RangeKind::Private)),
        ("2600:1f14:abc::7", Some(RangeKind::Internal)),
        ("::ffff:34.118.230.1", Some(RangeKind::Internal)),
        ("2001:db8:64::a9fe:a9fe", Some(RangeKind::Metadata)),
        ("2001:db8:64::2276:e601", Some(RangeKind::Internal)),
        ("2001:db8:64::808:808", None),
        // Not declared: a documentation address, denied as itself.
        ("2001:db8:65::808:808", Some(RangeKind::Special)),
    ];
    for (addr, want) in cases {
        let ip: IpAddr = addr.parse().unwrap();
        assert_eq!(p.denied_range(ip), *want, "{addr}");
        let target = Target { host: Host::Ip(ip), port: 443 };
        let got = p.decide(p.default_role(), RequestKind::Connect, &target, &[ip]);
        match want {
            Some(kind) => assert_eq!(got.deny_reason(), Some(DenyReason::DeniedRange(*kind)), "{addr}"),
            None => assert!(matches!(got, Decision::Allow(_)), "{addr}: {got:?}"),
        }
    }
}

#[test]
fn role_deny_cidrs_match_raw_and_judged_addresses() {
    let allow = AllowList::new([], [], PortSet::new([80]), PortSet::new([443]));
    let deny = DenyList::new([], ["8.8.8.0/24".parse().unwrap(), "2606:4700::/32".parse().unwrap(), "2000::/3".parse().unwrap()]);
    let p = Policy::new(vec![Role::new("default", Mode::Open, true, allow).with_deny(deny)], "default", &AddressPlan::default())
        .unwrap();
    for (addr, denied) in [
        ("8.8.8.8", true),
        ("::ffff:8.8.8.8", true),
        ("64:ff9b::808:808", true),
        ("2002:808:808::1", true),
        ("2606:4700::1111", true),
        // 6to4 of a public IPv4 outside 8.8.8/24: inside the raw 2000::/3 deny.
        ("2002:101:101::1", true),
        ("1.1.1.1", false),
    ] {
        let ip: IpAddr = addr.parse().unwrap();
        let target = Target { host: Host::Ip(ip), port: 443 };
        let got = p.decide(p.default_role(), RequestKind::Connect, &target, &[ip]);
        assert_eq!(got.deny_reason() == Some(DenyReason::DeniedByRole), denied, "{addr}: {got:?}");
    }
}

#[test]
fn unlisted_names_are_not_resolved_when_cidrs_admit_literals_only() {
    let allow = |resolve| {
        AllowList::new(
            [DomainPattern::parse("example.com").unwrap()],
            ["8.8.8.0/24".parse().unwrap()],
            PortSet::new([80]),
            PortSet::new([443]),
        )
        .resolve_unlisted(resolve)
    };
    let build = |resolve| {
        Policy::new(vec![Role::new("default", Mode::Enforce, true, allow(resolve))], "default", &AddressPlan::default())
            .unwrap()
    };
    let (resolving, literal_only) = (build(true), build(false));
    let other = Target::parse_authority("exfil.example.net:443").unwrap();
    let listed = Target::parse_authority("example.com:443").unwrap();
    let literal = Target::parse_authority("8.8.8.8:443").unwrap();
    let k = RequestKind::Connect;
    assert!(matches!(resolving.pre_resolution(resolving.default_role(), k, &other), PreResolution::Resolve(_)));
    assert_eq!(
        pre_reason(&literal_only.pre_resolution(literal_only.default_role(), k, &other)),
        Some(DenyReason::NotAllowListed)
    );
    assert!(matches!(literal_only.pre_resolution(literal_only.default_role(), k, &listed), PreResolution::Resolve(_)));
    assert!(matches!(
        literal_only.pre_resolution(literal_only.default_role(), k, &literal),
        PreResolution::Decided(Decision::Allow(_))
    ));
    // Even given addresses inside the CIDR rule, the name is not admitted.
    let inside: IpAddr = "8.8.8.8".parse().unwrap();
    assert_eq!(
        literal_only.decide(literal_only.default_role(), k, &other, &[inside]).deny_reason(),
        Some(DenyReason::NotAllowListed)
    );
    assert!(matches!(resolving.decide(resolving.default_role(), k, &other, &[inside]), Decision::Allow(_)));
}

/// The proxy never proxies to itself: host addresses the built-in table
/// does not deny become `self` (an exact carve-out lifts them), and its
/// listening sockets are `self` whatever is carved out.
#[test]
fn own_addresses_and_listeners_are_denied() {
    let allow = AllowList::new([], ["0.0.0.0/0".parse().unwrap()], PortSet::new([80, 3128, 9128]), PortSet::new([443, 3128, 9128]));
    let plan = AddressPlan {
        carve_outs: vec!["127.0.0.0/8".parse().unwrap(), "10.0.0.0/8".parse().unwrap(), "8.8.4.4/32".parse().unwrap()],
        self_addrs: vec!["127.0.0.1".parse().unwrap(), "10.1.2.3".parse().unwrap(), "8.8.8.8".parse().unwrap(), "8.8.4.4".parse().unwrap()],
        listeners: vec!["0.0.0.0:3128".parse().unwrap(), "127.0.0.1:9128".parse().unwrap()],
        ..AddressPlan::default()
    };
    let p = Policy::new(vec![Role::new("default", Mode::Enforce, true, allow)], "default", &plan).unwrap();
    let selfish = Some(DenyReason::DeniedRange(RangeKind::SelfAddr));
    let cases: &[(&str, bool)] = &[
        ("8.8.8.8:443", true),              // a public host address
        ("[::ffff:8.8.8.8]:443", true),     // however spelled
        ("8.8.4.4:443", false),             // exactly carved out
        ("10.1.2.3:443", true),             // a wider carve-out does not expose the host
        ("10.1.2.4:443", false),            // while the rest of it is carved out
        ("127.0.0.1:80", false),            // loopback carved out
        ("127.0.0.1:3128", true),           // but the proxy port on it is the proxy
        ("10.1.2.3:3128", true),            // 0.0.0.0:3128 listens on every host address
        ("8.8.4.4:3128", true),
        ("127.0.0.1:9128", true),           // the admin listener
        ("8.8.4.4:9128", false),            // admin listens on loopback only
        ("10.9.9.9:3128", false),           // not a host address
    ];
    for (authority, denied) in cases {
        let target = Target::parse_authority(authority).unwrap();
        let Host::Ip(ip) = target.host else { unreachable!() };
        let got = p.decide(p.default_role(), RequestKind::Connect, &target, &[ip]);
        assert_eq!(got.deny_reason() == selfish, *denied, "{authority}: {got:?}");
    }
}

#[test]
fn tunnel_ports_and_what_a_tunnel_may_start_with() {
    let role = |mode: Mode, http: &[u16], connect: &[u16]| {
        let allow = AllowList::new(
            [DomainPattern::parse("example.com").unwrap()],
            [],
            PortSet::new(http.iter().copied()),
            PortSet::new(connect.iter().copied()),
        );
        Policy::new(vec![Role::new("default", mode, true, allow)], "default", &AddressPlan::default()).unwrap()
    };
    let addrs: &[IpAddr] = &["93.184.216.34".parse().unwrap()];
    let cases = [
        (Mode::Enforce, RequestKind::Connect, 443, Ok(TunnelStart::Any)),
        (Mode::Enforce, RequestKind::Connect, 80, Ok(TunnelStart::CheckedHttp)),
        (Mode::Enforce, RequestKind::Connect, 8080, Ok(TunnelStart::AnyOrCheckedHttp)),
        (Mode::Enforce, RequestKind::Connect, 22, Err(DenyReason::PortNotAllowed)),
        (Mode::Enforce, RequestKind::Http, 80, Ok(TunnelStart::Any)),
        (Mode::Enforce, RequestKind::Http, 443, Err(DenyReason::PortNotAllowed)),
        (Mode::Report, RequestKind::Connect, 80, Ok(TunnelStart::AnyOrCheckedHttp)),
        (Mode::Open, RequestKind::Connect, 22, Ok(TunnelStart::Any)),
    ];
    for (mode, kind, port, expected) in cases {
        let p = role(mode, &[80, 8080], &[443, 8080]);
        let target = Target::parse_authority(&format!("example.com:{port}")).unwrap();
        let got = match p.decide(p.default_role(), kind, &target, addrs) {
            Decision::Allow(permit) => Ok(permit.tunnel_start()),
            Decision::Deny { reason, .. } => Err(reason),
        };
        assert_eq!(got, expected, "{mode:?} {kind:?} {port}");
    }
}

/// Every decision names the rule that made it, and `explain` decides the
/// same way while listing what it consulted.
#[test]
fn decisions_name_their_rule() {
    use provenance::{RoleRule::*, RuleId};
    let allow = AllowList::new(
        ["a.example", "*.b.example"].iter().map(|d| DomainPattern::parse(d).unwrap()),
        ["8.8.8.0/24", "1.1.1.0/24"].iter().map(|c| c.parse().unwrap()),
        PortSet::new([80]),
        PortSet::new([443]),
    );
    let deny = DenyList::new([DomainPattern::parse("bad.b.example").unwrap()], ["1.1.1.1/32".parse().unwrap()]);
    let report = AllowList::new([], [], PortSet::new([80]), PortSet::new([443]));
    let plan = AddressPlan {
        internal: vec!["34.118.0.0/16".parse().unwrap(), "34.119.0.0/16".parse().unwrap()],
        listeners: vec!["0.0.0.0:3128".parse().unwrap()],
        ..AddressPlan::default()
    };
    let roles = vec![Role::new("default", Mode::Enforce, true, allow).with_deny(deny), Role::new("ci", Mode::Report, true, report)];
    let p = Policy::new(roles, "default", &plan).unwrap();
    let ci = p.role_id("ci").unwrap();
    let row = |prefix: &str| RuleId::Range(provenance::RangeSource::Registry(registry::rows().position(|r| r.prefix == prefix).unwrap() as u16));
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let cases: &[(RoleId, &str, &[IpAddr], RuleId, &str)] = &[
        (p.default_role(), "a.example:443", &[ip("93.184.216.34")], RuleId::Role(0, AllowDomain(0)), "roles.default.allow.domains[0] (a.example)"),
        (p.default_role(), "x.b.example:443", &[ip("93.184.216.34")], RuleId::Role(0, AllowDomain(1)), "roles.default.allow.domains[1] (*.b.example)"),
        (p.default_role(), "bad.b.example:443", &[ip("93.184.216.34")], RuleId::Role(0, DenyDomain(0)), "roles.default.deny.domains[0] (bad.b.example)"),
        (p.default_role(), "1.1.1.2:443", &[ip("1.1.1.2")], RuleId::Role(0, AllowCidr(1)), "roles.default.allow.cidrs[1] (1.1.1.0/24)"),
        (p.default_role(), "1.1.1.1:443", &[ip("1.1.1.1")], RuleId::Role(0, DenyCidr(0)), "roles.default.deny.cidrs[0] (1.1.1.1/32)"),
        (p.default_role(), "a.example:8443", &[ip("93.184.216.34")], RuleId::Role(0, Ports(RequestKind::Connect)), "roles.default.allow.connect_ports ([443])"),
        (p.default_role(), "other.example:443", &[ip("93.184.216.34")], RuleId::Role(0, DefaultDeny), "default-deny (role default: no allow rule matched)"),
        (p.default_role(), "a.example:443", &[ip("93.184.216.34"), ip("10.0.0.1")], row("10.0.0.0/8"), "always-denied:private (10.0.0.0/8)"),
        (p.default_role(), "[::ffff:169.254.169.254]:443", &[ip("::ffff:169.254.169.254")], row("169.254.169.254/32"), "always-denied:metadata (169.254.169.254/32)"),
        (p.default_role(), "34.119.1.1:443", &[ip("34.119.1.1")], RuleId::Range(provenance::RangeSource::Internal(1)), "internal_ranges[1] (34.119.0.0/16)"),
        (p.default_role(), "localhost:443", &[ip("127.0.0.1")], RuleId::DeniedName(0), "always-denied:loopback (name localhost)"),
        (p.default_role(), "x.localhost:443", &[ip("127.0.0.1")], RuleId::DeniedName(ranges::DENIED_NAMES.len() as u16), "always-denied:loopback (name *.localhost)"),
        (ci, "other.example:443", &[ip("93.184.216.34")], RuleId::Role(1, DefaultDeny), "default-deny (role ci: no allow rule matched)"),
        (p.default_role(), "a.example:443", &[], RuleId::NoAddresses, "no-addresses (the name resolved to nothing)"),
    ];
    for (role, authority, addrs, rule, text) in cases {
        let target = Target::parse_authority(authority).unwrap();
        let decision = p.decide(*role, RequestKind::Connect, &target, addrs);
        assert_eq!(decision.rule(), *rule, "{authority}: {decision:?}");
        assert_eq!(p.describe(decision.rule()).to_string(), *text, "{authority}");
        let (explained, steps) = p.explain(*role, RequestKind::Connect, &target, addrs);
        assert_eq!(explained, decision, "{authority}");
        assert!(!steps.is_empty(), "{authority}");
    }
    // The proxy's own listener on a public host address.
    let own = AddressPlan { listeners: vec!["8.8.8.8:443".parse().unwrap()], ..AddressPlan::default() };
    let allow = AllowList::new([], ["8.8.8.0/24".parse().unwrap()], PortSet::new([80]), PortSet::new([443]));
    let p = Policy::new(vec![Role::new("default", Mode::Enforce, true, allow)], "default", &own).unwrap();
    let target = Target::parse_authority("8.8.8.8:443").unwrap();
    let decision = p.decide(p.default_role(), RequestKind::Connect, &target, &[ip("8.8.8.8")]);
    assert_eq!(p.describe(decision.rule()).to_string(), "always-denied:self (listener 8.8.8.8:443)");
}

/// A carve-out bound to a name lifts the range for that name only, and
/// `explain` says so; the IP literal is still denied by the registry row.
#[test]
fn name_bound_carve_outs_show_in_the_trace() {
    let allow = AllowList::new([DomainPattern::parse("registry.corp.example").unwrap()], ["10.0.0.0/8".parse().unwrap()], PortSet::new([80]), PortSet::new([443]));
    let plan = AddressPlan {
        named: vec![NamedCarveOut {
            net: "10.20.0.0/16".parse().unwrap(),
            domains: vec![DomainPattern::parse("registry.corp.example").unwrap()],
            ports: vec![],
            roles: vec![],
        }],
        ..AddressPlan::default()
    };
    let p = Policy::new(vec![Role::new("default", Mode::Enforce, true, allow)], "default", &plan).unwrap();
    let addr: IpAddr = "10.20.1.2".parse().unwrap();
    let named = Target::parse_authority("registry.corp.example:443").unwrap();
    let (decision, steps) = p.explain(p.default_role(), RequestKind::Connect, &named, &[addr]);
    assert!(matches!(decision, Decision::Allow(_)), "{decision:?}");
    let text = p.catalog().describe_step(steps[1]).to_string();
    assert_eq!(
        text,
        "always-denied ranges: 10.20.1.2: not denied, carved out for the requested name by allow_ranges (10.20.0.0/16, domains: registry.corp.example)"
    );
    let literal = Target::parse_authority("10.20.1.2:443").unwrap();
    let decision = p.decide(p.default_role(), RequestKind::Connect, &literal, &[addr]);
    assert_eq!(p.describe(decision.rule()).to_string(), "always-denied:private (10.0.0.0/8)");
}

/// For a parent that resolves names, a name is decided on the name alone:
/// only a domain rule admits it, the denied names, the role's deny domains
/// and the ports still apply, and the permit holds no address. An IP
/// literal is decided against every range as always.
#[test]
fn names_the_parent_resolves_are_decided_on_the_name_alone() {
    let allow = |domains: &[&str]| {
        AllowList::new(
            domains.iter().map(|d| DomainPattern::parse(d).unwrap()),
            ["8.8.8.0/24".parse().unwrap()],
            PortSet::new([80]),
            PortSet::new([443]),
        )
    };
    let deny = DenyList::new([DomainPattern::parse("blocked.example.com").unwrap()], []);
    let p = Policy::new(
        vec![
            Role::new("default", Mode::Enforce, true, allow(&["*.example.com"])).with_deny(deny),
            Role::new("audit", Mode::Report, true, allow(&[])),
            Role::new("open", Mode::Open, true, allow(&[])),
        ],
        "default",
        &AddressPlan::default(),
    )
    .unwrap();
    let (enforce, report, open) = (p.default_role(), p.role_id("audit").unwrap(), p.role_id("open").unwrap());
    use DenyReason::*;
    type Case = (RoleId, RequestKind, &'static str, Result<Option<DenyReason>, DenyReason>);
    let cases: [Case; 11] = [
        (enforce, RequestKind::Connect, "api.example.com:443", Ok(None)),
        (enforce, RequestKind::Http, "api.example.com:80", Ok(None)),
        (enforce, RequestKind::Http, "api.example.com:443", Err(PortNotAllowed)),
        // Only a CIDR rule could admit it, and there is no address to check.
        (enforce, RequestKind::Connect, "dns.google:443", Err(NotAllowListed)),
        (enforce, RequestKind::Connect, "blocked.example.com:443", Err(DeniedByRole)),
        (enforce, RequestKind::Connect, "metadata.google.internal:443", Err(DeniedName(RangeKind::Metadata))),
        (enforce, RequestKind::Connect, "8.8.8.8:443", Ok(None)),
        (enforce, RequestKind::Connect, "10.0.0.1:443", Err(DeniedRange(RangeKind::Private))),
        (enforce, RequestKind::Http, "169.254.169.254:80", Err(DeniedRange(RangeKind::Metadata))),
        (report, RequestKind::Connect, "dns.google:443", Ok(Some(NotAllowListed))),
        (open, RequestKind::Connect, "dns.google:443", Ok(None)),
    ];
    for (role, kind, target, want) in cases {
        let t = Target::parse_authority(target).unwrap();
        let got = match p.decide_name_only(role, kind, &t) {
            Decision::Allow(permit) => {
                let literal = matches!(t.host, Host::Ip(_));
                assert_eq!(permit.name_only(), !literal, "{target}");
                assert_eq!(permit.addrs().len(), usize::from(literal), "{target}");
                Ok(permit.would_deny())
            }
            Decision::Deny { reason, .. } => Err(reason),
        };
        assert_eq!(got, want, "{target} as {kind:?}");
    }
}

/// A carve-out bound to a name is for its role, name and port only.
#[test]
fn name_bindings_are_found_by_role_name_and_port() {
    let allow = || AllowList::new([], [], PortSet::new([80]), PortSet::new([443]));
    let plan = AddressPlan {
        named: vec![NamedCarveOut {
            net: "10.0.5.0/24".parse().unwrap(),
            domains: vec![DomainPattern::parse("vault.corp.example").unwrap()],
            ports: vec![8200],
            roles: vec!["ci".to_string()],
        }],
        ..AddressPlan::default()
    };
    let p = Policy::new(
        vec![Role::new("default", Mode::Enforce, true, allow()), Role::new("ci", Mode::Enforce, true, allow())],
        "default",
        &plan,
    )
    .unwrap();
    let ci = p.role_id("ci").unwrap();
    for (role, target, bound) in [
        (ci, "vault.corp.example:8200", true),
        (ci, "vault.corp.example:443", false),
        (ci, "other.corp.example:8200", false),
        (ci, "10.0.5.1:8200", false),
        (p.default_role(), "vault.corp.example:8200", false),
    ] {
        assert_eq!(p.binds_name(role, &Target::parse_authority(target).unwrap()), bound, "{target}");
    }
}
