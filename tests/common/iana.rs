//! An independent copy of the IANA IPv4 and IPv6 Special-Purpose Address
//! Registries, typed by hand from the registry pages (not copied from
//! src/policy/registry.rs), with their "Globally Reachable" column. It is
//! the oracle for what the always-denied table must do: a row whose column
//! is False is denied; a row whose column is True is allowed; the
//! exceptions, each with its documented reason, are listed in
//! [`EXCEPTIONS`]. The rows that are not in the registries but that
//! README.md lists as always denied (metadata addresses, multicast,
//! site-local, the older IPv6 transition forms) are in [`DOCUMENTED`].
//! The deny kinds are README.md's kind table.
//!
//! Used by tests/denied_ranges.rs (through the proxy socket) and by
//! src/policy/tests/oracle.rs (`every_registry_row_is_decided`).
#![allow(dead_code)]

use std::net::IpAddr;

use ipnet::IpNet;

/// The registry's "Globally Reachable" column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    False,
    True,
    /// `N/A` in the registry (the transition forms and the 6to4 relay block).
    NotApplicable,
    /// Not a registry row: README.md's additions.
    NotInRegistry,
}

/// What the proxy must do with addresses in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Refused with `denied-range:<kind>`.
    Deny(&'static str),
    /// Not refused by the always-denied table.
    Allow,
    /// A transition form: judged by the IPv4 address it carries
    /// (see [`CARRIED`]).
    ByIpv4Inside,
}

/// One registry row: its prefix, name, column, the kind README.md gives
/// its addresses when denied, and addresses inside it that no more
/// specific row covers.
pub struct Row {
    pub prefix: &'static str,
    pub name: &'static str,
    pub column: Column,
    pub kind: &'static str,
    pub inside: &'static [&'static str],
}

const fn row(prefix: &'static str, name: &'static str, column: Column, kind: &'static str, inside: &'static [&'static str]) -> Row {
    Row { prefix, name, column, kind, inside }
}

use Column::{False, NotApplicable as NA, NotInRegistry as Readme, True};

/// IANA IPv4 Special-Purpose Address Registry (iana-ipv4-special-registry),
/// one entry per address block (192.0.0.170 and .171 share a registry row).
pub const IPV4: &[Row] = &[
    row("0.0.0.0/8", "\"This network\"", False, "special", &["0.1.2.3", "0.255.255.255"]),
    row("0.0.0.0/32", "\"This host on this network\"", False, "special", &["0.0.0.0"]),
    row("10.0.0.0/8", "Private-Use", False, "private", &["10.20.30.40", "10.255.255.254"]),
    row("100.64.0.0/10", "Shared Address Space", False, "private", &["100.64.0.1", "100.127.255.254"]),
    row("127.0.0.0/8", "Loopback", False, "loopback", &["127.1.2.3"]),
    row("169.254.0.0/16", "Link Local", False, "link-local", &["169.254.1.1", "169.254.255.254"]),
    row("172.16.0.0/12", "Private-Use", False, "private", &["172.16.0.1", "172.31.255.254"]),
    row("192.0.0.0/24", "IETF Protocol Assignments", False, "special", &["192.0.0.100", "192.0.0.255"]),
    row("192.0.0.0/29", "IPv4 Service Continuity Prefix", False, "special", &["192.0.0.1", "192.0.0.7"]),
    row("192.0.0.8/32", "IPv4 dummy address", False, "special", &["192.0.0.8"]),
    row("192.0.0.9/32", "Port Control Protocol Anycast", True, "special", &["192.0.0.9"]),
    row("192.0.0.10/32", "Traversal Using Relays around NAT Anycast", True, "special", &["192.0.0.10"]),
    row("192.0.0.170/32", "NAT64/DNS64 Discovery", False, "special", &["192.0.0.170"]),
    row("192.0.0.171/32", "NAT64/DNS64 Discovery", False, "special", &["192.0.0.171"]),
    row("192.0.2.0/24", "Documentation (TEST-NET-1)", False, "special", &["192.0.2.55"]),
    row("192.31.196.0/24", "AS112-v4", True, "", &["192.31.196.1"]),
    row("192.52.193.0/24", "AMT", True, "", &["192.52.193.1"]),
    row("192.88.99.0/24", "Deprecated (6to4 Relay Anycast)", NA, "special", &["192.88.99.1", "192.88.99.254"]),
    row("192.88.99.2/32", "6a44-relay anycast address", True, "special", &["192.88.99.2"]),
    row("192.168.0.0/16", "Private-Use", False, "private", &["192.168.1.1", "192.168.255.254"]),
    row("192.175.48.0/24", "Direct Delegation AS112 Service", True, "", &["192.175.48.1"]),
    row("198.18.0.0/15", "Benchmarking", False, "special", &["198.18.0.1", "198.19.255.254"]),
    row("198.51.100.0/24", "Documentation (TEST-NET-2)", False, "special", &["198.51.100.7"]),
    row("203.0.113.0/24", "Documentation (TEST-NET-3)", False, "special", &["203.0.113.9"]),
    row("240.0.0.0/4", "Reserved", False, "special", &["240.0.0.1", "254.255.255.254"]),
    row("255.255.255.255/32", "Limited Broadcast", False, "special", &["255.255.255.255"]),
];

/// IANA IPv6 Special-Purpose Address Registry (iana-ipv6-special-registry).
pub const IPV6: &[Row] = &[
    row("::1/128", "Loopback Address", False, "loopback", &["::1"]),
    row("::/128", "Unspecified Address", False, "special", &["::"]),
    row("::ffff:0:0/96", "IPv4-mapped Address", False, "", &[]),
    row("64:ff9b::/96", "IPv4-IPv6 Translat.", True, "", &[]),
    row("64:ff9b:1::/48", "IPv4-IPv6 Translat.", False, "special", &["64:ff9b:1::a9fe:a9fe", "64:ff9b:1::808:808"]),
    row("100::/64", "Discard-Only Address Block", False, "special", &["100::1"]),
    row("100:0:0:1::/64", "Dummy IPv6 Prefix", False, "special", &["100:0:0:1::1"]),
    row("2001::/23", "IETF Protocol Assignments", False, "special", &["2001:100::1", "2001:1ff:ffff::1"]),
    row("2001::/32", "TEREDO", NA, "", &[]),
    row("2001:1::1/128", "Port Control Protocol Anycast", True, "special", &["2001:1::1"]),
    row("2001:1::2/128", "Traversal Using Relays around NAT Anycast", True, "special", &["2001:1::2"]),
    row("2001:1::3/128", "DNS-SD Service Registration Protocol Anycast", True, "special", &["2001:1::3"]),
    row("2001:2::/48", "Benchmarking", False, "special", &["2001:2::1"]),
    row("2001:3::/32", "AMT", True, "", &["2001:3::1"]),
    row("2001:4:112::/48", "AS112-v6", True, "", &["2001:4:112::1"]),
    row("2001:10::/28", "Deprecated (previously ORCHID)", False, "special", &["2001:10::1"]),
    row("2001:20::/28", "ORCHIDv2", True, "", &["2001:20::1"]),
    row("2001:30::/28", "Drone Remote ID Protocol Entity Tags (DETs) Prefix", True, "", &["2001:30::1"]),
    row("2001:db8::/32", "Documentation", False, "special", &["2001:db8::1"]),
    row("2002::/16", "6to4", NA, "", &[]),
    row("2620:4f:8000::/48", "Direct Delegation AS112 Service", True, "", &["2620:4f:8000::1"]),
    row("3fff::/20", "Documentation", False, "special", &["3fff::1"]),
    row("5f00::/16", "Segment Routing (SRv6) SIDs", False, "special", &["5f00::1"]),
    row("fc00::/7", "Unique-Local", False, "private", &["fc00::1", "fdff:ffff::1"]),
    row("fe80::/10", "Link-Local Unicast", False, "link-local", &["fe80::1", "febf::1"]),
];

/// Always denied though not in the registries (README.md, "Always-denied
/// ranges": metadata addresses, multicast, site-local, older transition forms).
pub const DOCUMENTED: &[Row] = &[
    row("224.0.0.0/4", "Multicast", Readme, "special", &["224.0.0.1", "239.255.255.250"]),
    row("ff00::/8", "Multicast", Readme, "special", &["ff02::1", "ff0e::1"]),
    row("fec0::/10", "Site-local (deprecated)", Readme, "special", &["fec0::1"]),
    row("::/96", "IPv4-compatible (deprecated)", Readme, "", &[]),
    row("::ffff:0:0:0/96", "IPv4-translated (SIIT)", Readme, "", &[]),
    row("169.254.169.254/32", "Instance metadata (AWS, GCP, Azure, OpenStack, ...)", Readme, "metadata", &["169.254.169.254"]),
    row("169.254.170.2/32", "AWS ECS task metadata", Readme, "metadata", &["169.254.170.2"]),
    row("169.254.170.23/32", "AWS EKS Pod Identity", Readme, "metadata", &["169.254.170.23"]),
    row("169.254.42.42/32", "Scaleway metadata", Readme, "metadata", &["169.254.42.42"]),
    row("169.254.0.23/32", "Tencent metadata", Readme, "metadata", &["169.254.0.23"]),
    row("100.100.100.200/32", "Alibaba metadata", Readme, "metadata", &["100.100.100.200"]),
    row("192.0.0.192/32", "Oracle metadata", Readme, "metadata", &["192.0.0.192"]),
    row("168.63.129.16/32", "Azure wireserver", Readme, "metadata", &["168.63.129.16"]),
    row("fd00:ec2::254/128", "AWS IMDS over IPv6", Readme, "metadata", &["fd00:ec2::254"]),
    row("fd00:ec2::23/128", "AWS EKS Pod Identity over IPv6", Readme, "metadata", &["fd00:ec2::23"]),
    row("fd20:ce::254/128", "GCP metadata over IPv6", Readme, "metadata", &["fd20:ce::254"]),
    row("fd00:42::42/128", "Scaleway metadata over IPv6", Readme, "metadata", &["fd00:42::42"]),
    row("fd00:a9fe:a9fe::1/128", "Linode metadata over IPv6", Readme, "metadata", &["fd00:a9fe:a9fe::1"]),
    row("fe80::a9fe:a9fe/128", "OpenStack metadata over IPv6", Readme, "metadata", &["fe80::a9fe:a9fe"]),
];

/// Where the column alone does not give the outcome, and why (README.md,
/// "Always-denied ranges" and the decision steps).
pub const EXCEPTIONS: &[(&str, Expect, &str)] = &[
    ("::ffff:0:0/96", Expect::ByIpv4Inside, "IPv4-mapped: judged by the IPv4 address inside"),
    ("64:ff9b::/96", Expect::ByIpv4Inside, "NAT64 well-known prefix: judged by the IPv4 address inside"),
    ("2001::/32", Expect::ByIpv4Inside, "Teredo (N/A): judged by the client IPv4 address inside"),
    ("2002::/16", Expect::ByIpv4Inside, "6to4 (N/A): judged by the IPv4 address inside"),
    ("::/96", Expect::ByIpv4Inside, "IPv4-compatible: judged by the IPv4 address inside"),
    ("::ffff:0:0:0/96", Expect::ByIpv4Inside, "SIIT: judged by the IPv4 address inside"),
    ("192.88.99.0/24", Expect::Deny("special"), "6to4 relay anycast (N/A): a relay forwards past the IPv4 checks"),
    ("192.0.0.9/32", Expect::Deny("special"), "reachable, but the local network's PCP server"),
    ("192.0.0.10/32", Expect::Deny("special"), "reachable, but the local network's TURN relay"),
    ("192.88.99.2/32", Expect::Deny("special"), "reachable, but a 6a44 relay anycast address"),
    ("2001:1::1/128", Expect::Deny("special"), "reachable, but the local network's PCP server"),
    ("2001:1::2/128", Expect::Deny("special"), "reachable, but the local network's TURN relay"),
    ("2001:1::3/128", Expect::Deny("special"), "reachable, but the local network's SRP registrar"),
];

/// Transition-form addresses and the outcome of the IPv4 address each
/// carries (computed by hand: Teredo carries the client address with every
/// bit inverted in its last 32 bits).
pub const CARRIED: &[(&str, Option<&str>)] = &[
    ("::ffff:169.254.169.254", Some("metadata")),
    ("::ffff:172.16.0.1", Some("private")),
    ("::ffff:127.0.0.2", Some("loopback")), // .2: tests/denied_ranges.rs carves 127.0.0.1 out
    ("::ffff:8.8.8.8", None),
    ("::ffff:0:a9fe:a9fe", Some("metadata")), // SIIT 169.254.169.254
    ("::ffff:0:a00:1", Some("private")),      // SIIT 10.0.0.1
    ("::ffff:0:808:808", None),               // SIIT 8.8.8.8
    ("::a9fe:aa02", Some("metadata")),        // compatible 169.254.170.2
    ("::6440:1", Some("private")),            // compatible 100.64.0.1
    ("::7f00:2", Some("loopback")),           // compatible 127.0.0.2
    ("::808:808", None),                      // compatible 8.8.8.8
    ("64:ff9b::a83f:8110", Some("metadata")), // NAT64 168.63.129.16
    ("64:ff9b::ac10:1", Some("private")),     // NAT64 172.16.0.1
    ("64:ff9b::808:808", None),
    ("2002:a9fe:aa17::1", Some("metadata")), // 6to4 169.254.170.23
    ("2002:c0a8:101::1", Some("private")),   // 6to4 192.168.1.1
    ("2002:e000:1::1", Some("special")),     // 6to4 224.0.0.1
    ("2002:808:808::1", None),
    ("2001:0:4136:e378:8000:63bf:5601:5601", Some("metadata")), // Teredo 169.254.169.254
    ("2001:0:4136:e378:8000:63bf:57c0:7eef", Some("metadata")), // Teredo 168.63.129.16
    ("2001:0:4136:e378:8000:63bf:f5fe:fdfc", Some("private")),  // Teredo 10.1.2.3
    ("2001:0:4136:e378:8000:63bf:9bbf:fffe", Some("private")),  // Teredo 100.64.0.1
    ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", None),             // Teredo 8.8.8.8
];

/// Every row: both registries, then README.md's additions.
pub fn rows() -> impl Iterator<Item = &'static Row> {
    IPV4.iter().chain(IPV6).chain(DOCUMENTED)
}

impl Row {
    pub fn net(&self) -> IpNet {
        self.prefix.parse().unwrap_or_else(|e| panic!("{}: {e}", self.prefix))
    }

    /// What the row's column (or its listed exception) says must happen.
    pub fn expected(&self) -> Expect {
        if let Some((_, expect, _)) = EXCEPTIONS.iter().find(|(prefix, ..)| *prefix == self.prefix) {
            return *expect;
        }
        match self.column {
            Column::False | Column::NotInRegistry => Expect::Deny(self.kind),
            Column::True => Expect::Allow,
            Column::NotApplicable => panic!("{}: an N/A row needs an entry in EXCEPTIONS", self.prefix),
        }
    }
}

/// Every address listed inside a denied row, with the row's denied kind and
/// the row. Checks what both denied-range tests rely on: a denied row lists
/// at least one address, and each lies inside its row and in no more
/// specific one.
pub fn denied_addresses() -> Vec<(IpAddr, &'static str, &'static Row)> {
    let mut out = Vec::new();
    for row in rows() {
        let Expect::Deny(kind) = row.expected() else { continue };
        assert!(!row.inside.is_empty(), "{}: a denied row needs an address to try", row.prefix);
        for inside in row.inside {
            let addr: IpAddr = inside.parse().unwrap();
            assert!(row.net().contains(&addr), "{inside} is not inside {}", row.prefix);
            assert_eq!(most_specific(addr).unwrap().prefix, row.prefix, "{inside} lies in a more specific row");
            out.push((addr, kind, row));
        }
    }
    out
}

/// The most specific row containing `addr` (the table's own rule).
pub fn most_specific(addr: IpAddr) -> Option<&'static Row> {
    rows().filter(|row| row.net().contains(&addr)).max_by_key(|row| row.net().prefix_len())
}

/// What must happen to `addr`: its most specific row's outcome, or for a
/// transition form the outcome listed in [`CARRIED`] (`None` when the
/// address is neither in a row nor listed).
pub fn expected(addr: IpAddr) -> Option<Expect> {
    let expect = most_specific(addr).map_or(Expect::Allow, Row::expected);
    if expect != Expect::ByIpv4Inside {
        return Some(expect);
    }
    let (_, carried) = CARRIED.iter().find(|(a, _)| a.parse::<IpAddr>().ok() == Some(addr))?;
    Some(carried.map_or(Expect::Allow, Expect::Deny))
}
