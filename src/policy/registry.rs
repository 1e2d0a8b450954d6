//! The always-denied address table as data: every row of the IANA IPv4 and
//! IPv6 Special-Purpose Address Registries, plus the addresses that are
//! globally reachable but must never be reached through an egress proxy
//! (cloud metadata services, 6to4 relays, multicast, deprecated blocks).
//!
//! Registry rows were transcribed on 2026-11-30 from
//! <https://www.iana.org/assignments/iana-ipv4-special-registry/> (newest row
//! 192.88.99.2/32, RFC 6751) and
//! <https://www.iana.org/assignments/iana-ipv6-special-registry/> (newest row
//! 100:0:0:1::/64, RFC 9780). When the registries change, add the row here;
//! `every_registry_row_is_decided` in the policy tests walks each one.
//!
//! Rule: a row whose "Globally Reachable" is `False` is denied. Rows marked
//! `N/A` are transition forms (Teredo, 6to4), judged by the IPv4 address they
//! carry, as are the IPv4-mapped and NAT64 forms. A globally reachable row
//! is allowed only with a reason written beside it; reachable rows nested in
//! a denied block that name a *local* network service stay denied.

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
    /// A range the operator declared internal (`internal_ranges`).
    Internal,
    /// An address of the proxy host itself, or one of its listeners.
    SelfAddr,
}

impl RangeKind {
    /// Every kind.
    pub const ALL: [RangeKind; 7] = [
        RangeKind::Metadata,
        RangeKind::LinkLocal,
        RangeKind::Loopback,
        RangeKind::Private,
        RangeKind::Special,
        RangeKind::Internal,
        RangeKind::SelfAddr,
    ];

    /// The reason-code fragment for this kind.
    pub const fn as_str(self) -> &'static str {
        match self {
            RangeKind::Metadata => "metadata",
            RangeKind::LinkLocal => "link-local",
            RangeKind::Loopback => "loopback",
            RangeKind::Private => "private",
            RangeKind::Special => "special",
            RangeKind::Internal => "internal",
            RangeKind::SelfAddr => "self",
        }
    }
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
    /// `64:ff9b::/96` (RFC 6052), or a network-specific prefix declared in
    /// `nat64_prefixes`.
    Nat64,
    /// `2002::/16`, RFC 3056.
    SixToFour,
    /// `2001::/32`, RFC 4380: the client address, XOR-ed with all ones.
    Teredo,
}

/// Where a row comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A row of an IANA special-purpose registry, with its "Globally
    /// Reachable" column (`None` for `N/A`).
    Iana { reachable: Option<bool> },
    /// Not in the registries (or reachable there) but denied for this use.
    Extra,
}

/// What the proxy does with addresses in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treatment {
    /// Denied as this kind unless the operator carves it out.
    Deny(RangeKind),
    /// An IPv6 transition form: judged by the IPv4 address inside.
    Unwrap(Transition),
    /// Globally reachable and not denied; the text says why that is safe.
    Allow(&'static str),
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    pub prefix: &'static str,
    pub name: &'static str,
    /// The RFC or the operator documentation that defines the address.
    pub reference: &'static str,
    pub source: Source,
    pub treatment: Treatment,
}

use RangeKind::*;
use Source::{Extra, Iana};
use Treatment::{Allow, Deny, Unwrap};

const FALSE: Source = Iana { reachable: Some(false) };
const TRUE: Source = Iana { reachable: Some(true) };
const NA: Source = Iana { reachable: None };

const fn row(prefix: &'static str, name: &'static str, reference: &'static str, source: Source, treatment: Treatment) -> Row {
    Row { prefix, name, reference, source, treatment }
}

/// The IANA IPv4 Special-Purpose Address Registry, every row.
pub const IANA_V4: &[Row] = &[
    row("0.0.0.0/8", "\"This network\"", "RFC 791 §3.2", FALSE, Deny(Special)),
    row("0.0.0.0/32", "\"This host on this network\"", "RFC 1122 §3.2.1.3", FALSE, Deny(Special)),
    row("10.0.0.0/8", "Private-Use", "RFC 1918", FALSE, Deny(Private)),
    row("100.64.0.0/10", "Shared Address Space", "RFC 6598", FALSE, Deny(Private)),
    row("127.0.0.0/8", "Loopback", "RFC 1122 §3.2.1.3", FALSE, Deny(Loopback)),
    row("169.254.0.0/16", "Link Local", "RFC 3927", FALSE, Deny(LinkLocal)),
    row("172.16.0.0/12", "Private-Use", "RFC 1918", FALSE, Deny(Private)),
    row("192.0.0.0/24", "IETF Protocol Assignments", "RFC 6890 §2.1", FALSE, Deny(Special)),
    row("192.0.0.0/29", "IPv4 Service Continuity Prefix", "RFC 7335", FALSE, Deny(Special)),
    row("192.0.0.8/32", "IPv4 dummy address", "RFC 7600", FALSE, Deny(Special)),
    // Reachable in the registry, but the anycast address of the local
    // network's PCP server (the NAT box itself): infrastructure, not the Internet.
    row("192.0.0.9/32", "Port Control Protocol Anycast", "RFC 7723", TRUE, Deny(Special)),
    // Same: the anycast address of a TURN relay run by the local network.
    row("192.0.0.10/32", "Traversal Using Relays around NAT Anycast", "RFC 8155", TRUE, Deny(Special)),
    row("192.0.0.170/32", "NAT64/DNS64 Discovery", "RFC 8880, RFC 7050 §2.2", FALSE, Deny(Special)),
    row("192.0.0.171/32", "NAT64/DNS64 Discovery", "RFC 8880, RFC 7050 §2.2", FALSE, Deny(Special)),
    row("192.0.2.0/24", "Documentation (TEST-NET-1)", "RFC 5737", FALSE, Deny(Special)),
    row("192.31.196.0/24", "AS112-v4", "RFC 7535", TRUE, Allow("AS112 DNS sink servers on the public Internet")),
    row("192.52.193.0/24", "AMT", "RFC 7450", TRUE, Allow("public Automatic Multicast Tunneling relays")),
    // Deprecated 6to4 relay anycast: a relay forwards into whatever IPv6
    // the packet names, past the checks made on the IPv4 address.
    row("192.88.99.0/24", "Deprecated (6to4 Relay Anycast)", "RFC 7526", NA, Deny(Special)),
    row("192.88.99.2/32", "6a44-relay anycast address", "RFC 6751", TRUE, Deny(Special)),
    row("192.168.0.0/16", "Private-Use", "RFC 1918", FALSE, Deny(Private)),
    row("192.175.48.0/24", "Direct Delegation AS112 Service", "RFC 7534", TRUE, Allow("AS112 DNS sink servers on the public Internet")),
    row("198.18.0.0/15", "Benchmarking", "RFC 2544", FALSE, Deny(Special)),
    row("198.51.100.0/24", "Documentation (TEST-NET-2)", "RFC 5737", FALSE, Deny(Special)),
    row("203.0.113.0/24", "Documentation (TEST-NET-3)", "RFC 5737", FALSE, Deny(Special)),
    row("240.0.0.0/4", "Reserved", "RFC 1112 §4", FALSE, Deny(Special)),
    row("255.255.255.255/32", "Limited Broadcast", "RFC 8190, RFC 919 §7", FALSE, Deny(Special)),
];

/// The IANA IPv6 Special-Purpose Address Registry, every row.
pub const IANA_V6: &[Row] = &[
    row("::1/128", "Loopback Address", "RFC 4291", FALSE, Deny(Loopback)),
    row("::/128", "Unspecified Address", "RFC 4291", FALSE, Deny(Special)),
    row("::ffff:0:0/96", "IPv4-mapped Address", "RFC 4291", FALSE, Unwrap(Transition::Mapped)),
    row("64:ff9b::/96", "IPv4-IPv6 Translat.", "RFC 6052", TRUE, Unwrap(Transition::Nat64)),
    // Local-use NAT64: the position of the IPv4 address depends on the
    // network's prefix length, so it is denied unless the operator declares
    // the prefix in `nat64_prefixes` (then unwrapped with that length).
    row("64:ff9b:1::/48", "IPv4-IPv6 Translat.", "RFC 8215", FALSE, Deny(Special)),
    row("100::/64", "Discard-Only Address Block", "RFC 6666", FALSE, Deny(Special)),
    row("100:0:0:1::/64", "Dummy IPv6 Prefix", "RFC 9780", FALSE, Deny(Special)),
    row("2001::/23", "IETF Protocol Assignments", "RFC 2928", FALSE, Deny(Special)),
    row("2001::/32", "TEREDO", "RFC 4380, RFC 8190", NA, Unwrap(Transition::Teredo)),
    // Reachable in the registry, but anycast addresses of services run by
    // the local network (PCP server, TURN relay, SRP registrar).
    row("2001:1::1/128", "Port Control Protocol Anycast", "RFC 7723", TRUE, Deny(Special)),
    row("2001:1::2/128", "Traversal Using Relays around NAT Anycast", "RFC 8155", TRUE, Deny(Special)),
    row("2001:1::3/128", "DNS-SD Service Registration Protocol Anycast", "RFC 9665", TRUE, Deny(Special)),
    row("2001:2::/48", "Benchmarking", "RFC 5180, RFC Errata 1752", FALSE, Deny(Special)),
    row("2001:3::/32", "AMT", "RFC 7450", TRUE, Allow("public Automatic Multicast Tunneling relays")),
    row("2001:4:112::/48", "AS112-v6", "RFC 7535", TRUE, Allow("AS112 DNS sink servers on the public Internet")),
    row("2001:10::/28", "Deprecated (previously ORCHID)", "RFC 4843", FALSE, Deny(Special)),
    row("2001:20::/28", "ORCHIDv2", "RFC 7343", TRUE, Allow("overlay identifiers; public by definition, nothing internal lives there")),
    row("2001:30::/28", "Drone Remote ID Protocol Entity Tags (DETs) Prefix", "RFC 9374", TRUE, Allow("public drone identifiers")),
    row("2001:db8::/32", "Documentation", "RFC 3849", FALSE, Deny(Special)),
    row("2002::/16", "6to4", "RFC 3056", NA, Unwrap(Transition::SixToFour)),
    row("2620:4f:8000::/48", "Direct Delegation AS112 Service", "RFC 7534", TRUE, Allow("AS112 DNS sink servers on the public Internet")),
    row("3fff::/20", "Documentation", "RFC 9637", FALSE, Deny(Special)),
    row("5f00::/16", "Segment Routing (SRv6) SIDs", "RFC 9602", FALSE, Deny(Special)),
    row("fc00::/7", "Unique-Local", "RFC 4193, RFC 8190", FALSE, Deny(Private)),
    row("fe80::/10", "Link-Local Unicast", "RFC 4291", FALSE, Deny(LinkLocal)),
];

/// Rows outside the registries: other special-purpose blocks and every
/// cloud's metadata and control-plane addresses, each with its source.
pub const EXTRA: &[Row] = &[
    row("224.0.0.0/4", "Multicast", "RFC 5771", Extra, Deny(Special)),
    row("ff00::/8", "Multicast", "RFC 4291 §2.7", Extra, Deny(Special)),
    row("fec0::/10", "Site-local (deprecated)", "RFC 3879", Extra, Deny(Special)),
    row("::/96", "IPv4-compatible (deprecated)", "RFC 4291 §2.5.5.1", Extra, Unwrap(Transition::Compatible)),
    row("::ffff:0:0:0/96", "IPv4-translated (SIIT)", "RFC 2765 §2.1", Extra, Unwrap(Transition::Translated)),
    row(
        "169.254.169.254/32",
        "Instance metadata: AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle, Hetzner, Linode/Akamai, IBM Cloud VPC, Exoscale, Vultr",
        "docs.aws.amazon.com/AWSEC2/latest/UserGuide/instancedata-data-retrieval.html; cloud.google.com/compute/docs/metadata/overview; \
         learn.microsoft.com/azure/virtual-machines/instance-metadata-service; docs.openstack.org/nova/latest/user/metadata.html; \
         docs.digitalocean.com/reference/api/metadata/; docs.oracle.com/iaas/Content/Compute/Tasks/gettingmetadata.htm; \
         docs.hetzner.cloud/#server-metadata; techdocs.akamai.com/cloud-computing/docs/metadata-service-api; \
         cloud.ibm.com/docs/vpc?topic=vpc-imd-about",
        Extra,
        Deny(Metadata),
    ),
    row("169.254.170.2/32", "AWS ECS task metadata and credentials", "docs.aws.amazon.com/AmazonECS/latest/developerguide/task-metadata-endpoint-v2.html", Extra, Deny(Metadata)),
    row("169.254.170.23/32", "AWS EKS Pod Identity agent", "docs.aws.amazon.com/eks/latest/userguide/pod-id-how-it-works.html", Extra, Deny(Metadata)),
    row("169.254.42.42/32", "Scaleway instance metadata", "www.scaleway.com/en/docs/instances/how-to/use-boot-modes/ (scw-metadata, http://169.254.42.42/conf)", Extra, Deny(Metadata)),
    row("169.254.0.23/32", "Tencent Cloud metadata (metadata.tencentyun.com)", "www.tencentcloud.com/document/product/213/4934", Extra, Deny(Metadata)),
    row("100.100.100.200/32", "Alibaba Cloud ECS metadata", "www.alibabacloud.com/help/en/ecs/user-guide/view-instance-metadata", Extra, Deny(Metadata)),
    row("192.0.0.192/32", "Oracle Cloud legacy metadata", "docs.oracle.com/iaas/Content/Compute/Tasks/gettingmetadata.htm", Extra, Deny(Metadata)),
    row("168.63.129.16/32", "Azure WireServer and platform DNS", "learn.microsoft.com/azure/virtual-network/what-is-ip-address-168-63-129-16", Extra, Deny(Metadata)),
    row("fd00:ec2::254/128", "AWS IMDS over IPv6", "docs.aws.amazon.com/AWSEC2/latest/UserGuide/instancedata-data-retrieval.html", Extra, Deny(Metadata)),
    row("fd00:ec2::23/128", "AWS EKS Pod Identity agent over IPv6", "docs.aws.amazon.com/eks/latest/userguide/pod-id-how-it-works.html", Extra, Deny(Metadata)),
    row("fd20:ce::254/128", "GCP metadata server over IPv6", "cloud.google.com/compute/docs/metadata/querying-metadata", Extra, Deny(Metadata)),
    row("fd00:42::42/128", "Scaleway instance metadata over IPv6", "www.scaleway.com/en/docs/instances/ (metadata API, [fd00:42::42])", Extra, Deny(Metadata)),
    row("fd00:a9fe:a9fe::1/128", "Linode/Akamai metadata over IPv6", "techdocs.akamai.com/cloud-computing/docs/metadata-service-api", Extra, Deny(Metadata)),
    row("fe80::a9fe:a9fe/128", "OpenStack metadata over IPv6", "docs.openstack.org/neutron/latest/admin/config-ipv6.html (metadata over IPv6)", Extra, Deny(Metadata)),
];

impl Row {
    /// The row's prefix.
    pub fn net(&self) -> IpNet {
        self.prefix.parse().expect("registry rows are valid CIDR (tested)")
    }
}

/// Every row: both registries, then the extras.
pub fn rows() -> impl Iterator<Item = &'static Row> {
    IANA_V4.iter().chain(IANA_V6).chain(EXTRA)
}
