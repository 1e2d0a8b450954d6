//! The always-denied address ranges and names, and the unwrapping of IPv6
//! transition forms to the IPv4 address they carry.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// What kind of special-purpose range an address or name falls in. Appears
/// in deny reasons, log lines and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RangeKind {
    /// Cloud instance metadata and control-plane endpoints.
    Metadata,
    /// Link-local (169.254/16, fe80::/10).
    LinkLocal,
    /// Loopback (127/8, ::1).
    Loopback,
    /// Private and shared address space (RFC 1918, CGNAT, ULA).
    Private,
    /// Every other special-purpose range (documentation, multicast, reserved...).
    Special,
}

impl RangeKind {
    /// The reason-code fragment for this kind.
    pub const fn as_str(self) -> &'static str {
        match self {
            RangeKind::Metadata => "metadata",
            RangeKind::LinkLocal => "link-local",
            RangeKind::Loopback => "loopback",
            RangeKind::Private => "private",
            RangeKind::Special => "special",
        }
    }
}

/// The IPv4 ranges denied unless carved out (DESIGN.md).
pub const DENIED_V4: &[(&str, RangeKind)] = &[
    ("0.0.0.0/8", RangeKind::Special),
    ("10.0.0.0/8", RangeKind::Private),
    ("100.64.0.0/10", RangeKind::Private),
    ("100.100.100.200/32", RangeKind::Metadata), // Alibaba Cloud
    ("127.0.0.0/8", RangeKind::Loopback),
    ("169.254.0.0/16", RangeKind::LinkLocal),
    ("169.254.169.254/32", RangeKind::Metadata), // AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle
    ("169.254.170.2/32", RangeKind::Metadata),   // AWS ECS task metadata
    ("169.254.170.23/32", RangeKind::Metadata),  // AWS EKS Pod Identity agent
    ("172.16.0.0/12", RangeKind::Private),
    ("192.0.0.0/24", RangeKind::Special),
    ("192.0.0.192/32", RangeKind::Metadata), // Oracle Cloud
    ("192.0.2.0/24", RangeKind::Special),
    ("192.88.99.0/24", RangeKind::Special),
    ("192.168.0.0/16", RangeKind::Private),
    ("198.18.0.0/15", RangeKind::Special),
    ("198.51.100.0/24", RangeKind::Special),
    ("203.0.113.0/24", RangeKind::Special),
    ("224.0.0.0/4", RangeKind::Special),
    ("240.0.0.0/4", RangeKind::Special),
    ("255.255.255.255/32", RangeKind::Special),
    ("168.63.129.16/32", RangeKind::Metadata), // Azure wireserver
];

/// The IPv6 ranges denied unless carved out (DESIGN.md). Transition forms
/// are not listed: they are judged by the IPv4 address they carry.
pub const DENIED_V6: &[(&str, RangeKind)] = &[
    ("::/128", RangeKind::Special),
    ("::1/128", RangeKind::Loopback),
    ("fc00::/7", RangeKind::Private),
    ("fd00:ec2::254/128", RangeKind::Metadata), // AWS IMDS over IPv6
    ("fd00:ec2::23/128", RangeKind::Metadata),  // AWS EKS Pod Identity agent over IPv6
    ("fe80::/10", RangeKind::LinkLocal),
    ("fec0::/10", RangeKind::Special),
    ("ff00::/8", RangeKind::Special),
    ("2001:db8::/32", RangeKind::Special),
    ("100::/64", RangeKind::Special),
];

/// Names denied before any resolution: they reach metadata services or the
/// proxy host itself however the resolver answers.
pub const DENIED_NAMES: &[(&str, RangeKind)] = &[
    ("localhost", RangeKind::Loopback),
    ("localhost.localdomain", RangeKind::Loopback),
    ("ip6-localhost", RangeKind::Loopback),
    ("ip6-loopback", RangeKind::Loopback),
    ("metadata", RangeKind::Metadata),
    ("metadata.google.internal", RangeKind::Metadata),
    ("metadata.goog", RangeKind::Metadata),
    ("metadata.azure.com", RangeKind::Metadata),
    ("instance-data", RangeKind::Metadata),
    ("instance-data.ec2.internal", RangeKind::Metadata),
    ("metadata.tencentyun.com", RangeKind::Metadata),
    ("metadata.packet.net", RangeKind::Metadata),
];

/// Name suffixes denied before resolution (`*.localhost`, RFC 6761).
pub const DENIED_NAME_SUFFIXES: &[(&str, RangeKind)] = &[
    ("localhost", RangeKind::Loopback),
    ("metadata.google.internal", RangeKind::Metadata),
];

/// The always-denied ranges as `(prefix, kind)` pairs.
pub fn denied_ranges() -> impl Iterator<Item = (IpNet, RangeKind)> {
    DENIED_V4.iter().chain(DENIED_V6).map(|(net, kind)| {
        let net: IpNet = net.parse().expect("built-in range table is valid CIDR");
        (net, *kind)
    })
}

/// An IPv6 transition mechanism whose addresses carry an IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// `::ffff:0:0/96`, RFC 4291.
    Mapped,
    /// `::ffff:0:0:0/96`, SIIT (RFC 6145).
    Translated,
    /// `::/96`, deprecated IPv4-compatible, RFC 4291.
    Compatible,
    /// `64:ff9b::/96` (RFC 6052) and `64:ff9b:1::/48` (RFC 8215).
    Nat64,
    /// `2002::/16`, RFC 3056.
    SixToFour,
    /// `2001::/32`, RFC 4380: the client address, XOR-ed with all ones.
    Teredo,
}

/// The IPv4 address an IPv6 transition form carries, if `addr` is one.
/// `::` and `::1` are not treated as IPv4-compatible: they are judged as
/// IPv6 addresses in their own right.
pub fn embedded_ipv4(addr: Ipv6Addr) -> Option<(Transition, Ipv4Addr)> {
    let bits = u128::from(addr);
    let low32 = Ipv4Addr::from(bits as u32);
    let seg = addr.segments();
    if bits >> 32 == 0xffff {
        return Some((Transition::Mapped, low32));
    }
    if bits >> 32 == 0xffff_0000 {
        return Some((Transition::Translated, low32));
    }
    if bits >> 32 == 0 && bits > 1 {
        return Some((Transition::Compatible, low32));
    }
    if bits >> 32 == 0x0064_ff9b_u128 << 64 {
        return Some((Transition::Nat64, low32));
    }
    if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1 {
        return Some((Transition::Nat64, low32));
    }
    if seg[0] == 0x2002 {
        let v4 = ((seg[1] as u32) << 16) | seg[2] as u32;
        return Some((Transition::SixToFour, Ipv4Addr::from(v4)));
    }
    if seg[0] == 0x2001 && seg[1] == 0 {
        return Some((Transition::Teredo, Ipv4Addr::from(!(bits as u32))));
    }
    None
}

/// The address an IP should be judged by: IPv4 for IPv4 and for IPv6
/// transition forms, the IPv6 address otherwise.
pub fn judged_address(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match embedded_ipv4(v6) {
            Some((_, v4)) => IpAddr::V4(v4),
            None => addr,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwraps_transition_forms() {
        let cases: &[(&str, Option<(Transition, &str)>)] = &[
            ("::ffff:169.254.169.254", Some((Transition::Mapped, "169.254.169.254"))),
            ("::ffff:a9fe:a9fe", Some((Transition::Mapped, "169.254.169.254"))),
            ("::ffff:0:a9fe:a9fe", Some((Transition::Translated, "169.254.169.254"))),
            ("::a9fe:a9fe", Some((Transition::Compatible, "169.254.169.254"))),
            ("::127.0.0.1", Some((Transition::Compatible, "127.0.0.1"))),
            ("64:ff9b::a9fe:a9fe", Some((Transition::Nat64, "169.254.169.254"))),
            ("64:ff9b:1::a00:1", Some((Transition::Nat64, "10.0.0.1"))),
            ("2002:a9fe:a9fe::1", Some((Transition::SixToFour, "169.254.169.254"))),
            ("2002:0a00:0001::", Some((Transition::SixToFour, "10.0.0.1"))),
            // Teredo: server 65.54.227.120, client 169.254.169.254 XOR-ed.
            ("2001:0:4136:e378:8000:63bf:5601:5601", Some((Transition::Teredo, "169.254.169.254"))),
            ("::", None),
            ("::1", None),
            ("2606:4700::1111", None),
            ("fd00:ec2::254", None),
        ];
        for (input, want) in cases {
            let got = embedded_ipv4(input.parse().unwrap());
            let want = want.map(|(t, v4)| (t, v4.parse::<Ipv4Addr>().unwrap()));
            assert_eq!(got, want, "{input}");
        }
    }

    #[test]
    fn built_in_tables_parse() {
        assert_eq!(denied_ranges().count(), DENIED_V4.len() + DENIED_V6.len());
    }
}
