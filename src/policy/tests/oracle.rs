//! The always-denied table checked against a hand-typed copy of the IANA
//! special-purpose registries (tests/common/iana.rs), not against the data
//! it is compiled from.

use super::*;

/// The IPv6 address that carries `v4` in a transition form (test helper).
fn carrying(t: ranges::Transition, v4: std::net::Ipv4Addr) -> IpAddr {
    use ranges::Transition::*;
    let v4bits = u32::from(v4) as u128;
    let bits: u128 = match t {
        Mapped => 0xffff << 32 | v4bits,
        Translated => 0xffff_0000 << 32 | v4bits,
        Compatible => v4bits,
        Nat64 => 0x0064_ff9b << 96 | v4bits,
        SixToFour => 0x2002 << 112 | v4bits << 80 | 1,
        Teredo => 0x2001_0000_4136_e378_8000_63bf_0000_0000 | (!u32::from(v4)) as u128,
    };
    IpAddr::V6(bits.into())
}

// The oracle: a hand-typed copy of the IANA registries' "Globally
// Reachable" column and README.md's additions, shared with the socket test
// tests/denied_ranges.rs. It is not derived from `registry`.
#[path = "../../../tests/common/iana.rs"]
mod iana;

/// The table in the code holds exactly the rows of the hand-typed
/// registries, each with the same "Globally Reachable" column: a row added,
/// dropped, mistyped or re-marked on either side fails here.
#[test]
fn the_table_has_every_registry_row_with_its_column() {
    use registry::Source;
    let code: std::collections::BTreeSet<(IpNet, Option<bool>)> = registry::IANA_V4
        .iter()
        .chain(registry::IANA_V6)
        .map(|row| match row.source {
            Source::Iana { reachable } => (row.net(), reachable),
            Source::Extra => panic!("{} is in a registry list but marked extra", row.prefix),
        })
        .collect();
    let typed: std::collections::BTreeSet<(IpNet, Option<bool>)> = iana::IPV4
        .iter()
        .chain(iana::IPV6)
        .map(|row| {
            let reachable = match row.column {
                iana::Column::False => Some(false),
                iana::Column::True => Some(true),
                iana::Column::NotApplicable => None,
                iana::Column::NotInRegistry => panic!("{} is not a registry row", row.prefix),
            };
            (row.net(), reachable)
        })
        .collect();
    assert_eq!(code.difference(&typed).collect::<Vec<_>>(), Vec::<&(IpNet, Option<bool>)>::new(), "in the code, not in the registries");
    assert_eq!(typed.difference(&code).collect::<Vec<_>>(), Vec::<&(IpNet, Option<bool>)>::new(), "in the registries, not in the code");
    assert_eq!((iana::IPV4.len(), iana::IPV6.len()), (26, 25), "registry rows");
}

/// Walks every row of the hand-typed registries and README.md's
/// additions: the first, a middle and the last address of each, and the
/// addresses typed inside it, get the outcome the oracle gives (the most
/// specific typed row: its column, or its listed exception). Transition
/// forms are judged by the IPv4 address they carry: the typed examples, and
/// a metadata, a private and a public address built into every form.
#[test]
fn every_registry_row_is_decided() {
    use iana::Expect;
    let p = policy(Mode::Open, &[], &[], &[]);
    let got = |addr: IpAddr| p.denied_range(addr).map(RangeKind::as_str);
    let (mut denied, mut allowed) = (0, 0);
    for row in iana::rows() {
        let net = row.net();
        let (first, last) = match net {
            IpNet::V4(n) => (u32::from(n.network()) as u128, u32::from(n.broadcast()) as u128),
            IpNet::V6(n) => (u128::from(n.network()), u128::from(n.broadcast())),
        };
        let edges = [first, first + (last - first) / 2, last].map(|point| match net {
            IpNet::V4(_) => IpAddr::V4((point as u32).into()),
            IpNet::V6(_) => IpAddr::V6(point.into()),
        });
        let typed = row.inside.iter().map(|a| a.parse::<IpAddr>().unwrap());
        for addr in edges.into_iter().chain(typed) {
            // A transition address the oracle does not list: below.
            let Some(expect) = iana::expected(addr) else { continue };
            match expect {
                Expect::Deny(kind) => {
                    assert_eq!(got(addr), Some(kind), "{addr} (row {} {})", row.prefix, row.name);
                    denied += 1;
                }
                Expect::Allow => {
                    assert_eq!(got(addr), None, "{addr} (row {} {})", row.prefix, row.name);
                    allowed += 1;
                }
                Expect::ByIpv4Inside => unreachable!("iana::expected resolves transition forms"),
            }
        }
    }
    for (text, carried) in iana::CARRIED {
        assert_eq!(got(text.parse().unwrap()), *carried, "{text}");
    }
    let transitions = [
        ("::ffff:0:0/96", ranges::Transition::Mapped),
        ("::ffff:0:0:0/96", ranges::Transition::Translated),
        ("::/96", ranges::Transition::Compatible),
        ("64:ff9b::/96", ranges::Transition::Nat64),
        ("2002::/16", ranges::Transition::SixToFour),
        ("2001::/32", ranges::Transition::Teredo),
    ];
    let mut judged: Vec<&str> = iana::rows().filter(|r| r.expected() == Expect::ByIpv4Inside).map(|r| r.prefix).collect();
    let mut built = transitions.map(|(prefix, _)| prefix).to_vec();
    judged.sort();
    built.sort();
    assert_eq!(judged, built, "every transition row of the oracle is built below");
    for (prefix, t) in transitions {
        let net: IpNet = prefix.parse().unwrap();
        for (v4, want) in [("169.254.169.254", Some("metadata")), ("10.1.2.3", Some("private")), ("8.8.8.8", None)] {
            let addr = carrying(t, v4.parse().unwrap());
            assert!(net.contains(&addr), "{prefix}: the test helper built {addr}");
            assert_eq!(got(addr), want, "{addr} ({prefix} carrying {v4})");
        }
    }
    assert!(denied > 150 && allowed >= 8, "{denied} denied and {allowed} allowed addresses checked");
}
