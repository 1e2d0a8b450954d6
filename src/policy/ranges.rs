//! The always-denied address ranges and names, and the unwrapping of IPv6
//! transition forms to the IPv4 address they carry.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::registry::{self, Treatment};
pub use super::registry::{RangeKind, Transition};

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

/// The always-denied ranges as `(prefix, kind)` pairs, from the registry
/// rows (`registry.rs`) whose treatment is `Deny`.
pub fn denied_ranges() -> impl Iterator<Item = (IpNet, RangeKind)> {
    registry::rows().filter_map(|row| match row.treatment {
        Treatment::Deny(kind) => Some((row.net(), kind)),
        _ => None,
    })
}

/// Globally reachable rows nested inside a denied row: they must be looked
/// up as "not denied" ahead of the block around them.
pub fn reachable_exceptions() -> impl Iterator<Item = IpNet> {
    registry::rows().filter_map(|row| match row.treatment {
        Treatment::Allow(_) if denied_ranges().any(|(d, _)| d != row.net() && d.contains(&row.net())) => Some(row.net()),
        _ => None,
    })
}

/// A NAT64 prefix (RFC 6052 §2.2): the IPv4 address starts right after the
/// prefix and skips bits 64..72 (the `u` octet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nat64Prefix(Ipv6Net);

impl Nat64Prefix {
    /// The well-known prefix `64:ff9b::/96`.
    pub const WELL_KNOWN: Nat64Prefix =
        Nat64Prefix(match Ipv6Net::new(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96) {
            Ok(net) => net,
            Err(_) => panic!("valid prefix"),
        });

    /// Accepts the prefix lengths RFC 6052 defines (32, 40, 48, 56, 64, 96)
    /// with no host bits set, outside the other transition forms.
    pub fn new(net: Ipv6Net) -> Result<Self, String> {
        if ![32, 40, 48, 56, 64, 96].contains(&net.prefix_len()) {
            return Err(format!("NAT64 prefix {net} must be /32, /40, /48, /56, /64 or /96 (RFC 6052 §2.2)"));
        }
        if net.trunc() != net {
            return Err(format!("NAT64 prefix {net} has host bits set; did you mean {}?", net.trunc()));
        }
        if let Some((t, _)) = builtin_ipv4(net.network()) {
            return Err(format!("NAT64 prefix {net} lies inside the built-in {t:?} form, which is already unwrapped"));
        }
        Ok(Nat64Prefix(net))
    }

    /// The prefix.
    pub fn net(&self) -> Ipv6Net {
        self.0
    }

    fn extract(&self, addr: Ipv6Addr) -> Option<Ipv4Addr> {
        self.0.contains(&addr).then(|| embedded_at(addr, self.0.prefix_len()))
    }

    /// The IPv6 address that carries `v4` under this prefix.
    pub fn embed(&self, v4: Ipv4Addr) -> Ipv6Addr {
        let mut octets = self.0.network().octets();
        let mut at = usize::from(self.0.prefix_len() / 8);
        for byte in v4.octets() {
            if at == 8 {
                at += 1;
            }
            octets[at] = byte;
            at += 1;
        }
        Ipv6Addr::from(octets)
    }
}

/// The four octets that start at bit `start` (a multiple of 8), skipping
/// octet 8, the `u` octet of RFC 6052.
fn embedded_at(addr: Ipv6Addr, start: u8) -> Ipv4Addr {
    let octets = addr.octets();
    let mut v4 = [0u8; 4];
    let mut at = usize::from(start / 8);
    for byte in &mut v4 {
        if at == 8 {
            at += 1;
        }
        *byte = octets[at];
        at += 1;
    }
    Ipv4Addr::from(v4)
}

/// The IPv4 address a built-in transition form carries, if `addr` is one.
/// `::` and `::1` are not treated as IPv4-compatible: they are judged as
/// IPv6 addresses in their own right. `64:ff9b:1::/48` is not built in: the
/// place of its IPv4 address depends on the network (see `nat64_prefixes`).
pub fn builtin_ipv4(addr: Ipv6Addr) -> Option<(Transition, Ipv4Addr)> {
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
    if seg[0] == 0x2002 {
        return Some((Transition::SixToFour, embedded_at(addr, 16)));
    }
    if seg[0] == 0x2001 && seg[1] == 0 {
        return Some((Transition::Teredo, Ipv4Addr::from(!(bits as u32))));
    }
    None
}

/// The transition forms in force: the built-in ones and the operator's
/// network-specific NAT64 prefixes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transitions {
    nat64: Box<[Nat64Prefix]>,
}

impl Transitions {
    /// The built-in forms plus `nat64` network-specific prefixes.
    pub fn new(nat64: impl IntoIterator<Item = Nat64Prefix>) -> Self {
        Transitions { nat64: nat64.into_iter().collect() }
    }

    /// The IPv4 address `addr` carries, if it is a transition form.
    #[inline]
    pub fn embedded_ipv4(&self, addr: Ipv6Addr) -> Option<(Transition, Ipv4Addr)> {
        builtin_ipv4(addr).or_else(|| self.nat64.iter().find_map(|p| p.extract(addr).map(|v4| (Transition::Nat64, v4))))
    }

    /// The address an IP is judged by: IPv4 for IPv4 and for IPv6
    /// transition forms, the IPv6 address otherwise.
    #[inline]
    pub fn judged(&self, addr: IpAddr) -> IpAddr {
        match addr {
            IpAddr::V4(_) => addr,
            IpAddr::V6(v6) => match self.embedded_ipv4(v6) {
                Some((_, v4)) => IpAddr::V4(v4),
                None => addr,
            },
        }
    }

    /// A CIDR rule written as a transition prefix (`::ffff:10.0.0.0/104`,
    /// `2002:a00::/24`, a prefix inside a declared NAT64 prefix) rewritten
    /// as the IPv4 range it stands for, since addresses are judged by their
    /// IPv4 form and the IPv6 spelling would never match. Prefixes that
    /// cover a whole form, or any Teredo prefix (its IPv4 address sits
    /// behind the server's), are refused.
    pub fn unwrap_rule(&self, net: IpNet) -> Result<IpNet, String> {
        let IpNet::V6(v6) = net else { return Ok(net) };
        let (len, network) = (v6.prefix_len(), v6.network());
        let found = match self.embedded_ipv4(network) {
            Some(found) => found,
            // `::/96` and longer prefixes at `::` (but `::` and `::1` themselves).
            None if u128::from(network) <= 1 && (96..127).contains(&len) => (Transition::Compatible, Ipv4Addr::UNSPECIFIED),
            None => return Ok(net),
        };
        let (transition, v4) = found;
        let block_len = match transition {
            Transition::Teredo => 32,
            Transition::SixToFour => 16,
            Transition::Nat64 => self.nat64.iter().find(|p| p.0.contains(&network)).map_or(96, |p| p.0.prefix_len()),
            Transition::Mapped | Transition::Translated | Transition::Compatible => 96,
        };
        if len < block_len {
            return Ok(net); // wider than the form: an IPv6 rule that happens to contain it
        }
        if transition == Transition::Teredo {
            return Err(format!(
                "{net} is a Teredo prefix; Teredo addresses are judged by the IPv4 client address they carry, \
                 so write that IPv4 range instead"
            ));
        }
        // Bits of the rule's prefix that fall on the IPv4 address (RFC 6052
        // skips bits 64..72).
        let u_octet = len.clamp(64, 72) - block_len.clamp(64, 72);
        let v4_len = (len - block_len - u_octet).min(32);
        if v4_len == 0 {
            return Err(format!(
                "{net} covers a whole IPv6 transition form ({transition:?}); its addresses are judged by the IPv4 \
                 address they carry, so write the IPv4 range instead"
            ));
        }
        let v4 = Ipv4Net::new(v4, v4_len).expect("prefix length is at most 32").trunc();
        Ok(IpNet::V4(v4))
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
            ("64:ff9b:1::a00:1", None),
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
            let got = builtin_ipv4(input.parse().unwrap());
            let want = want.map(|(t, v4)| (t, v4.parse::<Ipv4Addr>().unwrap()));
            assert_eq!(got, want, "{input}");
        }
    }

    #[test]
    fn registry_rows_are_exact_prefixes() {
        for row in registry::rows() {
            let net: IpNet = row.prefix.parse().unwrap_or_else(|_| panic!("{} parses", row.prefix));
            assert_eq!(net.trunc(), net, "{} has host bits set", row.prefix);
        }
    }

    #[test]
    fn network_specific_nat64_prefixes() {
        // RFC 6052 §2.4 examples: 192.0.2.33 under each prefix length.
        let cases = [
            ("2001:db8::/32", "2001:db8:c000:221::"),
            ("2001:db8:100::/40", "2001:db8:1c0:2:21::"),
            ("2001:db8:122::/48", "2001:db8:122:c000:2:2100::"),
            ("2001:db8:122:300::/56", "2001:db8:122:3c0:0:221::"),
            ("2001:db8:122:344::/64", "2001:db8:122:344:c0:2:2100:0"),
            ("2001:db8:122:344::/96", "2001:db8:122:344::192.0.2.33"),
        ];
        let v4: Ipv4Addr = "192.0.2.33".parse().unwrap();
        for (prefix, addr) in cases {
            let nsp = Nat64Prefix::new(prefix.parse().unwrap()).unwrap();
            let addr: Ipv6Addr = addr.parse().unwrap();
            assert_eq!(nsp.embed(v4), addr, "{prefix}");
            let t = Transitions::new([nsp]);
            assert_eq!(t.embedded_ipv4(addr), Some((Transition::Nat64, v4)), "{prefix}");
            assert_eq!(Transitions::default().embedded_ipv4(addr), None, "{prefix} is not built in");
        }
        for bad in ["2001:db8::/33", "2001:db8::1/96", "2002::/32", "64:ff9b::/96"] {
            assert!(Nat64Prefix::new(bad.parse().unwrap()).is_err(), "{bad}");
        }
    }

    #[test]
    fn transition_prefix_rules_are_unwrapped_or_refused() {
        let nsp = Nat64Prefix::new("2001:db8:64::/96".parse().unwrap()).unwrap();
        let nsp48 = Nat64Prefix::new("64:ff9b:1::/48".parse().unwrap()).unwrap();
        let t = Transitions::new([nsp, nsp48]);
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("::ffff:10.0.0.0/104", Ok("10.0.0.0/8")),
            ("::ffff:169.254.169.254/128", Ok("169.254.169.254/32")),
            ("::ffff:0:10.0.0.0/104", Ok("10.0.0.0/8")),
            ("::10.0.0.0/104", Ok("10.0.0.0/8")),
            ("64:ff9b::a00:0/104", Ok("10.0.0.0/8")),
            ("2002:a00::/24", Ok("10.0.0.0/8")),
            ("2002:a9fe:a9fe::/48", Ok("169.254.169.254/32")),
            ("2002:a9fe:a9fe:1::/64", Ok("169.254.169.254/32")),
            ("2001:db8:64::a00:0/104", Ok("10.0.0.0/8")),
            ("64:ff9b:1:a00::/56", Ok("10.0.0.0/8")),
            ("64:ff9b:1:a9fe:a9:fe00::/88", Ok("169.254.169.254/32")),
            ("::ffff:0:0/96", Err("covers a whole")),
            ("64:ff9b::/96", Err("covers a whole")),
            ("2002::/16", Err("covers a whole")),
            ("::/96", Err("covers a whole")),
            ("2001::/32", Err("Teredo")),
            ("2001:0:4136:e378::/64", Err("Teredo")),
            // Not transition prefixes: left as they are.
            ("::/0", Ok("::/0")),
            ("2001::/16", Ok("2001::/16")),
            ("2000::/3", Ok("2000::/3")),
            ("::1/128", Ok("::1/128")),
            ("::/128", Ok("::/128")),
            ("2606:4700::/32", Ok("2606:4700::/32")),
            ("10.0.0.0/8", Ok("10.0.0.0/8")),
        ];
        for (rule, want) in cases {
            let got = t.unwrap_rule(rule.parse().unwrap());
            match (want, &got) {
                (Ok(want), Ok(net)) => assert_eq!(net.to_string(), *want, "{rule}"),
                (Err(want), Err(msg)) => assert!(msg.contains(want), "{rule}: {msg}"),
                _ => panic!("{rule}: got {got:?}, want {want:?}"),
            }
        }
    }
}
