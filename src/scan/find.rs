//! Finding destinations in a line of text: URLs, `host:port` and IP
//! literals, in every spelling the strict target parser accepts and in the
//! lenient spellings it refuses (`0xA9FEA9FE`, `2852039166`,
//! `0251.0376.0251.0376`, `169.254.43518`, percent-encoded or full-width
//! hosts), which `inet_aton`, curl's and browsers' URL parsers still read
//! as an address.
//!
//! Pure text in, typed findings out; deciding them is the caller's job.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::policy::RequestKind;
use crate::target::{Host, Target, TargetError};

/// A destination named in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The text as written (`http://0xA9FEA9FE/`, `minio:9000`, `10.0.0.1`).
    pub spelled: String,
    /// How the proxy would be asked for it.
    pub kind: RequestKind,
    /// The strictly parsed target, or why the target parser refuses it.
    pub target: Result<Target, Refused>,
    /// True when the text named no port and one was assumed (443 for a bare address).
    pub assumed_port: bool,
}

/// A spelling the target parser refuses (`invalid-target`), with what a
/// lenient resolver makes of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The host as written.
    pub host: String,
    /// The port asked for.
    pub port: u16,
    /// Why the strict parser refuses it.
    pub error: TargetError,
    /// The address `inet_aton` (and URL parsers that percent-decode and
    /// IDNA-map hosts first) read from it, if any.
    pub lenient: Option<IpAddr>,
}

/// The port a URL scheme implies, and how the proxy is asked for it
/// (`http`/`ws` are forwarded, everything else is a tunnel).
fn scheme_default(scheme: &str) -> Option<(RequestKind, Option<u16>)> {
    let kind_port = match scheme {
        "http" | "ws" => (RequestKind::Http, Some(80)),
        "https" | "wss" => (RequestKind::Connect, Some(443)),
        "ftp" => (RequestKind::Connect, Some(21)),
        "ssh" | "sftp" | "git+ssh" => (RequestKind::Connect, Some(22)),
        "git" => (RequestKind::Connect, Some(9418)),
        "redis" => (RequestKind::Connect, Some(6379)),
        "postgres" | "postgresql" => (RequestKind::Connect, Some(5432)),
        "mysql" | "jdbc:mysql" => (RequestKind::Connect, Some(3306)),
        "mongodb" => (RequestKind::Connect, Some(27017)),
        "amqp" => (RequestKind::Connect, Some(5672)),
        "amqps" => (RequestKind::Connect, Some(5671)),
        "ldap" => (RequestKind::Connect, Some(389)),
        "ldaps" => (RequestKind::Connect, Some(636)),
        "tcp" | "grpc" | "nats" | "kafka" | "smtp" => (RequestKind::Connect, None),
        _ => return None,
    };
    Some(kind_port)
}

/// Every destination in `line`. `image_line` marks a line whose value is a
/// container image reference (`image:`, `containerImage:`), where
/// `name:tag` is not a destination; URLs and addresses there still count.
pub fn find(line: &str, image_line: bool) -> Vec<Found> {
    let mut out = Vec::new();
    let mut covered = vec![false; line.len()];
    for (start, end, found) in urls(line) {
        covered[start..end].iter_mut().for_each(|c| *c = true);
        out.push(found);
    }
    for (start, end) in runs(line) {
        if covered[start..end].iter().any(|c| *c) {
            continue;
        }
        if let Some(found) = bare(&line[start..end], image_line) {
            out.push(found);
        }
    }
    out
}

/// True for a line whose YAML key names a container image.
pub fn is_image_line(line: &str) -> bool {
    let key = line.trim_start().trim_start_matches("- ").trim_start();
    key.split_once(':').is_some_and(|(k, _)| k.trim_matches(['"', '\'']).to_ascii_lowercase().ends_with("image"))
}

/// URLs with a scheme we know the port of, or an explicit port: the byte
/// range each covers, and what it names. Templated hosts (`{{...}}`) name
/// nothing yet and are skipped.
fn urls(line: &str) -> Vec<(usize, usize, Found)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(at) = line[from..].find("://").map(|i| i + from) {
        from = at + 3;
        let start = line[..at]
            .char_indices()
            .rev()
            .take_while(|(_, c)| c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-' | ':'))
            .last()
            .map_or(at, |(i, _)| i);
        let scheme = line[start..at].trim_start_matches(|c: char| !c.is_ascii_alphabetic()).to_ascii_lowercase();
        let rest = &line[at + 3..];
        let end = rest.find(|c: char| c.is_whitespace() || "/?#\"'<>`(){},;|\\".contains(c)).unwrap_or(rest.len());
        let authority = &rest[..end];
        if authority.is_empty() || rest[end..].starts_with('{') || authority.contains('{') || authority.contains('$') {
            continue;
        }
        // A client sends userinfo as a header; the host is what follows it.
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let Some((kind, default)) = scheme_default(&scheme).or_else(|| has_port(host_port).then_some((RequestKind::Connect, None))) else {
            continue;
        };
        let found = Found {
            spelled: line[start..at + 3 + end].to_string(),
            kind,
            target: strict(host_port, default),
            assumed_port: false,
        };
        out.push((start, at + 3 + end, found));
        from = at + 3 + end;
    }
    out
}

fn has_port(authority: &str) -> bool {
    authority.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && !h.ends_with(':') && is_port(p))
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok_and(|n| n > 0)
}

/// Runs of characters that can spell an address or `host:port`, as byte ranges.
fn runs(line: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in line.char_indices().chain(std::iter::once((line.len(), ' '))) {
        let part = c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']' | '%');
        match (part, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    out
}

/// A run that is an IP literal, a lenient IPv4 spelling, or `host:port`.
fn bare(run: &str, image_line: bool) -> Option<Found> {
    let run = run.trim_start_matches(['.', ':', '-']).trim_end_matches(['.', ':', '-']);
    let bracketed_v6 = run.starts_with('[') && run.find(']').is_some_and(|close| run[..close].matches(':').count() >= 2);
    // Otherwise brackets are YAML's or JSON's flow sequences: `[10.0.0.1]`.
    let run = if bracketed_v6 { run } else { run.trim_start_matches('[').trim_end_matches(']') };
    if run.contains(['[', ']']) && !bracketed_v6 {
        return None;
    }
    if bracketed_v6 {
        let (host, port) = match run.rsplit_once("]:") {
            Some((h, p)) if is_port(p) => (format!("{h}]"), p.parse().ok()),
            _ => (run.to_string(), None),
        };
        return Some(literal(run, &host, port));
    }
    let colons = run.matches(':').count();
    if colons >= 2 {
        let ip = run.parse::<Ipv6Addr>().ok().filter(|_| run.bytes().any(|b| b.is_ascii_hexdigit()))?;
        let target = Target { host: Host::Ip(IpAddr::V6(ip)), port: 443 };
        return Some(Found { spelled: run.to_string(), kind: RequestKind::Connect, target: Ok(target), assumed_port: true });
    }
    if colons == 1 {
        let (host, port) = run.split_once(':')?;
        if !is_port(port) || !names_a_destination(host, image_line) {
            return None;
        }
        return Some(Found {
            spelled: run.to_string(),
            kind: RequestKind::Connect,
            target: strict(run, None),
            assumed_port: false,
        });
    }
    looks_like_address(run).then(|| literal(run, run, None))
}

/// A bare literal with or without a port: decided at 443 when none is given.
fn literal(spelled: &str, host: &str, port: Option<u16>) -> Found {
    let authority = format!("{host}:{}", port.unwrap_or(443));
    Found { spelled: spelled.to_string(), kind: RequestKind::Connect, target: strict(&authority, None), assumed_port: port.is_none() }
}

/// Whether `host` in `host:port` is worth deciding: an address in any
/// spelling, or, outside an image line, a name (`minio:9000`, Argo's
/// endpoint form). Images are pulled by the container runtime, not by the
/// workload, so `registry:5000/app:1.2` is not the workload's destination.
/// A bare number below 2^24 is a time or a ratio (`12:30`), not an address.
fn names_a_destination(host: &str, image_line: bool) -> bool {
    if host.is_empty() || host.starts_with('-') {
        return false;
    }
    if looks_like_address(host) || host.parse::<Ipv4Addr>().is_ok() {
        return true;
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return false;
    }
    !image_line && host.bytes().any(|b| b.is_ascii_alphabetic())
}

/// Dot-separated numeric parts that a lenient resolver reads as IPv4 and
/// that are unlikely to be anything else: four parts; a hex or
/// leading-zero octal part; a last part too big for one octet
/// (`169.254.43518`); or one number of at least 2^24 (`2852039166`).
/// Version numbers (`3.12`, `1.2.3`) stay out.
fn looks_like_address(text: &str) -> bool {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.len() > 4 || parts.iter().any(|p| p.is_empty()) || inet_aton(text).is_none() {
        return false;
    }
    let non_decimal = parts.iter().any(|p| p.len() > 1 && (p.starts_with('0')));
    let last_wide = parts.len() > 1 && parts.len() < 4 && part_value(parts[parts.len() - 1]).is_some_and(|v| v > 255);
    let one_big = parts.len() == 1 && part_value(parts[0]).is_some_and(|v| v >= 1 << 24);
    parts.len() == 4 || non_decimal || last_wide || one_big
}

/// Parses `host:port` (or `host` with `default_port`) as the proxy does;
/// a refusal carries the lenient reading.
fn strict(authority: &str, default_port: Option<u16>) -> Result<Target, Refused> {
    Target::parse_authority_with_default(authority, default_port).map_err(|error| {
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if is_port(p) && (!h.contains(':') || h.ends_with(']')) => (h, p.parse().unwrap_or(0)),
            _ => (authority, default_port.unwrap_or(0)),
        };
        let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
        Refused { host: host.to_string(), port, error, lenient: lenient_reading(host) }
    })
}

/// The address a lenient client reads from a host the proxy refuses:
/// percent-decoded, IDNA-mapped (full-width digits and dots), trailing dot
/// dropped, then `inet_aton`; a bracketed IPv6 loses its zone id.
pub fn lenient_reading(host: &str) -> Option<IpAddr> {
    let decoded = percent_decode(host)?;
    if let Some(inner) = decoded.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        let without_zone = inner.split('%').next().unwrap_or(inner);
        return without_zone.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let mapped = idna::domain_to_ascii(&decoded).unwrap_or(decoded);
    inet_aton(mapped.strip_suffix('.').unwrap_or(&mapped)).map(IpAddr::V4)
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// One part of an `inet_aton` address: `0x` hex, leading-zero octal, or decimal.
fn part_value(part: &str) -> Option<u64> {
    let lower = part.to_ascii_lowercase();
    let (digits, radix) = match lower.strip_prefix("0x") {
        Some(hex) => (hex, 16),
        None if lower.len() > 1 && lower.starts_with('0') => (&lower[1..], 8),
        None => (lower.as_str(), 10),
    };
    if digits.is_empty() && radix == 16 {
        return Some(0);
    }
    if digits.is_empty() || digits.len() > 11 {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// glibc's `inet_aton`: one to four parts, the last filling the remaining bytes.
pub fn inet_aton(text: &str) -> Option<Ipv4Addr> {
    let parts: Vec<u64> = text.split('.').map(part_value).collect::<Option<_>>()?;
    let (last, head) = parts.split_last()?;
    if head.len() > 3 || head.iter().any(|p| *p > 255) {
        return None;
    }
    let room = 8 * (4 - head.len() as u32);
    if room < 64 && *last >= 1u64 << room {
        return None;
    }
    let high = head.iter().enumerate().fold(0u64, |acc, (i, p)| acc | p << (24 - 8 * i));
    Some(Ipv4Addr::from((high | last) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(line: &str) -> Vec<String> {
        find(line, is_image_line(line))
            .into_iter()
            .map(|f| match f.target {
                Ok(t) => format!("{}:{t}", f.kind.as_str()),
                Err(r) => format!("invalid:{}:{}->{}", r.host, r.port, r.lenient.map_or("-".into(), |a| a.to_string())),
            })
            .collect()
    }

    #[test]
    fn finds_every_spelling() {
        let cases: &[(&str, &[&str])] = &[
            ("url: http://169.254.169.254/latest", &["http:169.254.169.254:80"]),
            ("curl https://example.com:8443/x", &["connect:example.com:8443"]),
            ("curl http://0xA9FEA9FE/", &["invalid:0xA9FEA9FE:80->169.254.169.254"]),
            ("uri: \"http://2852039166/\"", &["invalid:2852039166:80->169.254.169.254"]),
            ("wget 0251.0376.0251.0376", &["invalid:0251.0376.0251.0376:443->169.254.169.254"]),
            ("see http://169.254.43518/", &["invalid:169.254.43518:80->169.254.169.254"]),
            ("http://%31%36%39.254.169.254/", &["invalid:%31%36%39.254.169.254:80->169.254.169.254"]),
            ("http://169.254.169.254./", &["invalid:169.254.169.254.:80->169.254.169.254"]),
            ("http://\u{ff11}\u{ff16}\u{ff19}.254.169.254/", &["invalid:\u{ff11}\u{ff16}\u{ff19}.254.169.254:80->169.254.169.254"]),
            ("http://user:pw@10.0.0.1:8080/", &["http:10.0.0.1:8080"]),
            ("http://[::ffff:a9fe:a9fe]/", &["http:[::ffff:169.254.169.254]:80"]),
            ("http://[fd00:ec2::254]/latest", &["http:[fd00:ec2::254]:80"]),
            ("endpoint: minio:9000", &["connect:minio:9000"]),
            ("host 10.0.0.7 and fd00:ec2::254 too", &["connect:10.0.0.7:443", "connect:[fd00:ec2::254]:443"]),
            ("metadata.google.internal:80", &["connect:metadata.google.internal:80"]),
            ("image: redis:7", &[]),
            ("image: registry.local:5000/app:1.2", &[]),
            ("image: 10.0.0.5:5000/app", &["connect:10.0.0.5:5000"]),
            ("at 12:30:00 version 3.12 and 1.2.3", &[]),
            ("args: [\"-s\", [python], [10.0.0.9]]", &["connect:10.0.0.9:443"]),
            ("nc [fe80::1%eth0]:80", &["invalid:[fe80::1%eth0]:80->fe80::1"]),
            ("url: http://{{inputs.parameters.host}}/x", &[]),
            ("s3://bucket/key gs://bucket", &[]),
        ];
        for (line, want) in cases {
            assert_eq!(hosts(line), want.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "{line}");
        }
    }

    #[test]
    fn inet_aton_reads_like_glibc() {
        let cases: &[(&str, Option<[u8; 4]>)] = &[
            ("0xA9FEA9FE", Some([169, 254, 169, 254])),
            ("2852039166", Some([169, 254, 169, 254])),
            ("0251.0376.0251.0376", Some([169, 254, 169, 254])),
            ("169.254.43518", Some([169, 254, 169, 254])),
            ("169.16689662", Some([169, 254, 169, 254])),
            ("127.1", Some([127, 0, 0, 1])),
            ("0x7f.1", Some([127, 0, 0, 1])),
            ("256.1.1.1", None),
            ("4294967296", None),
            ("08.1.1.1", None),
            ("1.2.3.4.5", None),
        ];
        for (text, want) in cases {
            assert_eq!(inet_aton(text), want.map(Ipv4Addr::from), "{text}");
        }
    }
}
