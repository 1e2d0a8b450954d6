//! Deciding redirected connections: the same decision as the explicit
//! proxy, with the permit narrowed to the original destination only when
//! that address was checked.

use super::*;
use crate::target::Target;

fn policy() -> Policy {
    let allow = AllowList::new(
        [DomainPattern::parse("allowed.test").unwrap()],
        ["11.0.0.50/32".parse().unwrap()],
        PortSet::new([80]),
        PortSet::new([443, 7000]),
    );
    Policy::new(vec![Role::new("default", Mode::Enforce, true, allow)], "default", &AddressPlan::default()).unwrap()
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn redirected_decisions() {
    let p = policy();
    let role = p.default_role();
    // (kind, target, resolved, original, Ok(addresses dialed) | Err(reason))
    type Case = (RequestKind, &'static str, &'static [&'static str], &'static str, Result<&'static [&'static str], DenyReason>);
    let cases: &[Case] = &[
        // The original destination is a checked address: only it is dialed.
        (RequestKind::TransparentTls, "allowed.test:443", &["11.0.0.10", "2600::10"], "11.0.0.10", Ok(&["11.0.0.10:443"])),
        (RequestKind::TransparentTls, "allowed.test:443", &["11.0.0.10", "2600::10"], "2600::10", Ok(&["[2600::10]:443"])),
        (RequestKind::TransparentHttp, "allowed.test:80", &["11.0.0.10"], "11.0.0.10", Ok(&["11.0.0.10:80"])),
        // Elsewhere (metadata, another host): the name's checked addresses.
        (RequestKind::TransparentTls, "allowed.test:443", &["11.0.0.10", "2600::10"], "169.254.169.254", Ok(&["11.0.0.10:443", "[2600::10]:443"])),
        (RequestKind::TransparentHttp, "allowed.test:80", &["11.0.0.10"], "11.0.0.20", Ok(&["11.0.0.10:80"])),
        // The name decides; the original address cannot rescue it.
        (RequestKind::TransparentTls, "unlisted.test:443", &["11.0.0.50"], "11.0.0.50", Ok(&["11.0.0.50:443"])),
        (RequestKind::TransparentTls, "unlisted.test:443", &["11.0.0.30"], "11.0.0.50", Err(DenyReason::NotAllowListed)),
        (RequestKind::TransparentTls, "allowed.test:443", &["169.254.169.254"], "169.254.169.254", Err(DenyReason::DeniedRange(RangeKind::Metadata))),
        // Ports per kind: HTTP ports for transparent-http, CONNECT ports otherwise.
        (RequestKind::TransparentHttp, "allowed.test:443", &["11.0.0.10"], "11.0.0.10", Err(DenyReason::PortNotAllowed)),
        (RequestKind::TransparentTcp, "11.0.0.50:7000", &["11.0.0.50"], "11.0.0.50", Ok(&["11.0.0.50:7000"])),
        (RequestKind::TransparentTcp, "11.0.0.40:7000", &["11.0.0.40"], "11.0.0.40", Err(DenyReason::NotAllowListed)),
        (RequestKind::TransparentTcp, "11.0.0.50:22", &["11.0.0.50"], "11.0.0.50", Err(DenyReason::PortNotAllowed)),
    ];
    for (kind, target, resolved, original, want) in cases {
        let t = Target::parse_authority(target).unwrap();
        let original: IpAddr = original.parse().unwrap();
        let got = match p.decide_redirected(role, *kind, &t, &ips(resolved), original) {
            Decision::Allow(permit) => Ok(permit.addrs().iter().map(|a| a.to_string()).collect::<Vec<_>>()),
            Decision::Deny { reason, .. } => Err(reason),
        };
        let want = want.map(|w| w.iter().map(|a| a.to_string()).collect::<Vec<_>>());
        assert_eq!(got, want, "{kind:?} {target} {resolved:?} original {original}");
    }
}

#[test]
fn transparent_kinds_have_their_own_labels() {
    let labels: Vec<&str> =
        [RequestKind::TransparentHttp, RequestKind::TransparentTls, RequestKind::TransparentTcp].map(RequestKind::as_str).into();
    assert_eq!(labels, ["transparent-http", "transparent-tls", "transparent-tcp"]);
}
