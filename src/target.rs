//! Strict parsing of the destination a client asks for.
//!
//! A target is either a DNS name (lower-cased, trailing dot stripped, IDNA to
//! ASCII) or a canonical IP literal, plus a port. Everything else is refused:
//! in particular the IPv4 spellings that `inet_aton` and some resolvers still
//! interpret (`2852039166`, `0xA9FEA9FE`, `0251.0376.0251.0376`,
//! `169.254.43518`, `127.1`, leading zeros), because a filter that reads them
//! one way and a resolver another is how SSRF filters are bypassed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The longest DNS name we accept (RFC 1035, without the trailing dot).
const MAX_NAME_LEN: usize = 253;
/// The longest DNS label (RFC 1035).
const MAX_LABEL_LEN: usize = 63;

/// Why a target was refused. Every variant maps to 400 `invalid-target`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("empty host")]
    EmptyHost,
    #[error("userinfo is not allowed in the authority")]
    Userinfo,
    #[error("percent-encoded host")]
    PercentEncoded,
    #[error("missing port")]
    MissingPort,
    #[error("invalid port")]
    InvalidPort,
    #[error("port 0 is not a destination")]
    PortZero,
    #[error("IPv6 zone identifiers are not allowed")]
    ZoneId,
    #[error("malformed IPv6 literal")]
    BadIpv6,
    #[error("non-canonical IPv4 literal")]
    NonCanonicalIpv4,
    #[error("invalid DNS name: {0}")]
    BadName(&'static str),
    #[error("unsupported scheme (only http:// is forwarded; use CONNECT for TLS)")]
    UnsupportedScheme,
    #[error("absolute-form URI required")]
    NotAbsolute,
}

/// A validated DNS name: ASCII, lower-case, no trailing dot, valid labels,
/// and not a numeric form that could be read as an IPv4 address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainName(Box<str>);

impl DomainName {
    /// Parses and normalises a host name (IDNA to ASCII, lower-case,
    /// trailing dot stripped).
    pub fn parse(input: &str) -> Result<Self, TargetError> {
        if input.is_empty() {
            return Err(TargetError::EmptyHost);
        }
        if input.contains('%') {
            return Err(TargetError::PercentEncoded);
        }
        let trimmed = input.strip_suffix('.').unwrap_or(input);
        let ascii = to_ascii(trimmed)?;
        validate_name(&ascii)?;
        Ok(DomainName(ascii.into_boxed_str()))
    }

    /// The normalised name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn to_ascii(input: &str) -> Result<String, TargetError> {
    // Lower-case first: an `XN--` label is punycode too and must be validated.
    let lower = input.to_ascii_lowercase();
    if lower.is_ascii() && !lower.contains("xn--") {
        return Ok(lower);
    }
    idna::domain_to_ascii_strict(input).map_err(|_| TargetError::BadName("IDNA conversion failed"))
}

fn validate_name(name: &str) -> Result<(), TargetError> {
    if name.is_empty() {
        return Err(TargetError::EmptyHost);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(TargetError::BadName("name longer than 253 bytes"));
    }
    let mut last = "";
    for label in name.split('.') {
        validate_label(label)?;
        last = label;
    }
    // WHATWG URL and inet_aton read a host whose last label is numeric as an
    // IPv4 address (`127.1`, `0x7f.1`, `2852039166`); such a host is never a
    // DNS name, and the canonical dotted-quad form was already tried.
    if is_numeric_label(last) {
        return Err(TargetError::NonCanonicalIpv4);
    }
    Ok(())
}

fn validate_label(label: &str) -> Result<(), TargetError> {
    if label.is_empty() {
        return Err(TargetError::BadName("empty label"));
    }
    if label.len() > MAX_LABEL_LEN {
        return Err(TargetError::BadName("label longer than 63 bytes"));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(TargetError::BadName("label starts or ends with a hyphen"));
    }
    // Underscores are not legal in host names but appear in real service
    // names (`_dmarc`, some SaaS hosts); they cannot spell an address.
    let ok = label
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !ok {
        return Err(TargetError::BadName("invalid character"));
    }
    Ok(())
}

fn is_numeric_label(label: &str) -> bool {
    let hex = label.strip_prefix("0x");
    match hex {
        Some(digits) => digits.bytes().all(|b| b.is_ascii_hexdigit()),
        None => label.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// A destination host: a DNS name or an IP literal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Name(DomainName),
    Ip(IpAddr),
}

impl Host {
    /// The host as `Display` writes it, built without the `fmt` machinery
    /// for names and IPv4 (the request path needs it for every request).
    pub fn to_text(&self) -> String {
        match self {
            Host::Name(name) => String::from(name.as_str()),
            Host::Ip(IpAddr::V4(ip)) => {
                let mut text = Vec::with_capacity(15);
                push_ipv4(&mut text, *ip);
                String::from_utf8(text).expect("digits and dots are UTF-8")
            }
            v6 => v6.to_string(),
        }
    }

    /// Parses a host as it appears in an authority (IPv6 in brackets).
    pub fn parse(input: &str) -> Result<Self, TargetError> {
        if input.is_empty() {
            return Err(TargetError::EmptyHost);
        }
        if let Some(inner) = input.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or(TargetError::BadIpv6)?;
            return parse_ipv6_literal(inner).map(|ip| Host::Ip(IpAddr::V6(ip)));
        }
        if input.contains(':') {
            return Err(TargetError::BadIpv6);
        }
        if let Ok(ip) = input.parse::<Ipv4Addr>() {
            return Ok(Host::Ip(IpAddr::V4(ip)));
        }
        DomainName::parse(input).map(Host::Name)
    }

    /// Parses a bare host as an operator types it (IPv6 with or without brackets).
    pub fn parse_bare(input: &str) -> Result<Self, TargetError> {
        if !input.starts_with('[') && input.contains(':') {
            return parse_ipv6_literal(input).map(|ip| Host::Ip(IpAddr::V6(ip)));
        }
        Host::parse(input)
    }
}

fn parse_ipv6_literal(inner: &str) -> Result<Ipv6Addr, TargetError> {
    if inner.contains('%') {
        return Err(TargetError::ZoneId);
    }
    inner.parse::<Ipv6Addr>().map_err(|_| TargetError::BadIpv6)
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name.as_str()),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
        }
    }
}

/// Writes `ip` as `Display` does, without the `fmt` machinery: the
/// request path and the decision line write addresses for every request.
pub fn push_ipv4(out: &mut Vec<u8>, ip: Ipv4Addr) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        if octet >= 100 {
            out.push(b'0' + octet / 100);
        }
        if octet >= 10 {
            out.push(b'0' + octet / 10 % 10);
        }
        out.push(b'0' + octet % 10);
    }
}

/// A parsed destination: host and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: Host,
    pub port: u16,
}

impl Target {
    /// Parses a CONNECT authority, `host:port` (the port is required, RFC 9110 9.3.6).
    pub fn parse_authority(authority: &str) -> Result<Self, TargetError> {
        Self::parse_authority_with_default(authority, None)
    }

    /// Parses an absolute-form `http://host[:port]/...` request target.
    pub fn parse_absolute(uri: &http::Uri) -> Result<Self, TargetError> {
        let authority = uri.authority().ok_or(TargetError::NotAbsolute)?;
        match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("http") => {}
            Some(_) => return Err(TargetError::UnsupportedScheme),
            None => return Err(TargetError::NotAbsolute),
        }
        Self::parse_authority_with_default(authority.as_str(), Some(80))
    }

    /// Parses a `Host` header value, `host[:port]`, with `default_port`
    /// when it names none.
    pub fn parse_host_header(value: &str, default_port: u16) -> Result<Self, TargetError> {
        Self::parse_authority_with_default(value, Some(default_port))
    }

    /// Parses `host[:port]`, with `default_port` when the port is left out.
    pub fn parse_authority_with_default(
        authority: &str,
        default_port: Option<u16>,
    ) -> Result<Self, TargetError> {
        if authority.contains('@') {
            return Err(TargetError::Userinfo);
        }
        if authority.contains('%') {
            return Err(TargetError::PercentEncoded);
        }
        let (host, port) = split_host_port(authority)?;
        let port = match port {
            Some(p) => parse_port(p)?,
            None => default_port.ok_or(TargetError::MissingPort)?,
        };
        Ok(Target {
            host: Host::parse(host)?,
            port,
        })
    }

    /// The `Host` header value for this target, omitting the default port.
    pub fn host_header(&self, default_port: u16) -> String {
        let mut header = self.host.to_text();
        if self.port != default_port {
            use std::fmt::Write as _;
            let _ = write!(header, ":{}", self.port);
        }
        header
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

fn split_host_port(authority: &str) -> Result<(&str, Option<&str>), TargetError> {
    if authority.starts_with('[') {
        let close = authority.find(']').ok_or(TargetError::BadIpv6)?;
        let (host, rest) = authority.split_at(close + 1);
        return match rest {
            "" => Ok((host, None)),
            _ => rest
                .strip_prefix(':')
                .map(|p| (host, Some(p)))
                .ok_or(TargetError::BadIpv6),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Ok((host, Some(port))),
        None => Ok((authority, None)),
    }
}

fn parse_port(text: &str) -> Result<u16, TargetError> {
    if text.is_empty() {
        return Err(TargetError::MissingPort);
    }
    if text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TargetError::InvalidPort);
    }
    let port: u32 = text.parse().map_err(|_| TargetError::InvalidPort)?;
    match port {
        0 => Err(TargetError::PortZero),
        1..=65535 => Ok(port as u16),
        _ => Err(TargetError::InvalidPort),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Host {
        Host::Name(DomainName::parse(s).unwrap())
    }

    /// The hand-built text is exactly what `Display` writes.
    #[test]
    fn host_text_matches_display() {
        for host in ["0.0.0.0", "9.10.99.100", "255.255.255.255", "169.254.169.254", "1.2.3.4", "example.com", "[::1]", "[::ffff:10.0.0.1]", "[2001:db8::1]"] {
            let host = Host::parse(host).unwrap();
            assert_eq!(host.to_text(), host.to_string());
        }
    }

    #[test]
    fn accepted_authorities() {
        let cases: &[(&str, Host, u16)] = &[
            ("example.com:443", name("example.com"), 443),
            ("EXAMPLE.com.:443", name("example.com"), 443),
            ("a-b.example:8443", name("a-b.example"), 8443),
            ("_svc.example.com:443", name("_svc.example.com"), 443),
            ("1.2.3.4:443", Host::Ip("1.2.3.4".parse().unwrap()), 443),
            ("169.254.169.254:80", Host::Ip("169.254.169.254".parse().unwrap()), 80),
            ("[::1]:443", Host::Ip("::1".parse().unwrap()), 443),
            ("[::ffff:169.254.169.254]:443", Host::Ip("::ffff:a9fe:a9fe".parse().unwrap()), 443),
            ("[fd00:ec2::254]:80", Host::Ip("fd00:ec2::254".parse().unwrap()), 80),
            ("xn--bcher-kva.example:443", name("bücher.example"), 443),
            ("host1.example:65535", name("host1.example"), 65535),
            ("0x.example:443", name("0x.example"), 443),
        ];
        for (input, host, port) in cases {
            let t = Target::parse_authority(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(&t.host, host, "{input}");
            assert_eq!(t.port, *port, "{input}");
        }
    }

    #[test]
    fn idna_names_are_converted() {
        assert_eq!(DomainName::parse("Bücher.Example").unwrap().as_str(), "xn--bcher-kva.example");
    }

    #[test]
    fn rejected_authorities() {
        use TargetError::*;
        let cases: &[(&str, TargetError)] = &[
            ("2852039166:80", NonCanonicalIpv4),
            ("0xA9FEA9FE:80", NonCanonicalIpv4),
            ("0xa9fea9fe:80", NonCanonicalIpv4),
            ("0251.0376.0251.0376:80", NonCanonicalIpv4),
            ("169.254.43518:80", NonCanonicalIpv4),
            ("127.1:80", NonCanonicalIpv4),
            ("127.0.1:80", NonCanonicalIpv4),
            ("010.0.0.1:80", NonCanonicalIpv4),
            ("169.254.169.0254:80", NonCanonicalIpv4),
            ("0x7f.0.0.1:80", NonCanonicalIpv4),
            ("1.2.3.4.5:80", NonCanonicalIpv4),
            ("256.1.1.1:80", NonCanonicalIpv4),
            ("foo.0x10:80", NonCanonicalIpv4),
            ("user@example.com:443", Userinfo),
            ("user:pw@example.com:443", Userinfo),
            ("exa%6dple.com:443", PercentEncoded),
            (":443", EmptyHost),
            ("example.com", MissingPort),
            ("example.com:", MissingPort),
            ("example.com:0", PortZero),
            ("example.com:65536", InvalidPort),
            ("example.com:99999999", InvalidPort),
            ("example.com:+443", InvalidPort),
            ("example.com:44a", InvalidPort),
            ("[fe80::1%eth0]:443", PercentEncoded),
            ("[fe80::1%25eth0]:443", PercentEncoded),
            ("[::1:443", BadIpv6),
            ("[::1]x:443", BadIpv6),
            ("[zz::1]:443", BadIpv6),
            ("::1:443", BadIpv6),
            ("-bad.example:443", BadName("label starts or ends with a hyphen")),
            ("a..b:443", BadName("empty label")),
            ("a b.example:443", BadName("invalid character")),
            ("a!b.example:443", BadName("invalid character")),
        ];
        for (input, want) in cases {
            assert_eq!(Target::parse_authority(input).as_ref(), Err(want), "{input}");
        }
    }

    #[test]
    fn zone_ids_rejected_even_without_percent_check() {
        assert_eq!(parse_ipv6_literal("fe80::1%eth0"), Err(TargetError::ZoneId));
    }

    #[test]
    fn long_names_rejected() {
        let label = "a".repeat(64);
        assert!(DomainName::parse(&format!("{label}.example")).is_err());
        let long = vec!["abcdefghi"; 26].join(".");
        assert!(long.len() > MAX_NAME_LEN);
        assert!(DomainName::parse(&long).is_err());
    }

    #[test]
    fn absolute_form() {
        let cases: &[(&str, Result<(&str, u16), TargetError>)] = &[
            ("http://example.com/path?q=1", Ok(("example.com", 80))),
            ("http://example.com:8080/", Ok(("example.com", 8080))),
            ("HTTP://Example.COM/", Ok(("example.com", 80))),
            ("http://[::ffff:169.254.169.254]/", Ok(("[::ffff:169.254.169.254]", 80))),
            ("https://example.com/", Err(TargetError::UnsupportedScheme)),
            ("ftp://example.com/", Err(TargetError::UnsupportedScheme)),
            ("http://user@example.com/", Err(TargetError::Userinfo)),
            ("http://2852039166/", Err(TargetError::NonCanonicalIpv4)),
            ("http://example.com:0/", Err(TargetError::PortZero)),
            ("/just/a/path", Err(TargetError::NotAbsolute)),
        ];
        for (input, want) in cases {
            let uri: http::Uri = input.parse().unwrap();
            let got = Target::parse_absolute(&uri);
            let want = want.clone().map(|(host, port)| Target {
                host: Host::parse(host).unwrap(),
                port,
            });
            assert_eq!(got, want, "{input}");
        }
    }

    #[test]
    fn host_header_omits_default_port() {
        let t = Target::parse_authority("[::1]:80").unwrap();
        assert_eq!(t.host_header(80), "[::1]");
        let t = Target::parse_authority("example.com:8080").unwrap();
        assert_eq!(t.host_header(80), "example.com:8080");
    }
}
