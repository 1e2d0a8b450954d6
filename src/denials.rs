//! "Why was I refused?": a bounded in-memory ring of recent policy denials,
//! served per caller on the admin port (`GET /v1/denials`, read by
//! `portcullis why`), and the fix hint each deny carries.
//!
//! Many clients hide a refused CONNECT's reason (curl says `CONNECT tunnel
//! failed, response 403`; a transparent TLS deny is a bare `access_denied`
//! alert). The ring keeps, for each denial, who was refused, so a caller can
//! ask for its own and never see another client's:
//!
//! - a request identified by `Proxy-Authorization` credentials is owned by
//!   those credentials (their SHA-256; the ring never holds them in clear),
//!   and only a caller presenting the same credentials to the admin port
//!   sees it, from any address;
//! - every other request (source-address rules, the default role, a client
//!   certificate, a redirected connection) is owned by its source address,
//!   and only an unauthenticated caller from that address sees it.
//!
//! The ring holds at most [`CAPACITY`] entries, oldest dropped first; a
//! caller gets at most [`MAX_LISTED`] of its own, newest first.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::policy::ranges::RangeKind;
use crate::policy::DenyReason;

/// Entries the ring keeps, across all clients.
pub const CAPACITY: usize = 1024;
/// Entries one answer lists at most.
pub const MAX_LISTED: usize = 50;

/// Who a denial belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Owner {
    /// A client known by its source address (canonical: a v4-mapped
    /// address is its IPv4 address).
    Source(IpAddr),
    /// A client that authenticated with these credentials (SHA-256 of the
    /// `Proxy-Authorization` value).
    Credentials([u8; 32]),
}

impl Owner {
    /// The owner for a client at `source` that presented `credentials`
    /// (the `Proxy-Authorization` value it was identified by, if any).
    pub fn of(source: IpAddr, credentials: Option<&[u8]>) -> Owner {
        match credentials {
            Some(value) => Owner::Credentials(credential_digest(value)),
            None => Owner::Source(source.to_canonical()),
        }
    }
}

/// The digest that stands for a `Proxy-Authorization` value.
pub fn credential_digest(value: &[u8]) -> [u8; 32] {
    Sha256::digest(value.trim_ascii()).into()
}

/// One refused request, as its client may see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// When it was refused.
    pub at: SystemTime,
    /// Whose it is.
    pub owner: Owner,
    /// The request kind (`http`, `connect`, `transparent-tls`, ...).
    pub kind: &'static str,
    /// The target host as parsed, and its port.
    pub host: String,
    pub port: u16,
    /// The reason code, as in `X-Portcullis-Deny`.
    pub reason: &'static str,
    /// The role it was decided as.
    pub role: String,
    /// The deciding rule, described as in the decision log.
    pub rule: String,
    /// What to change, or why nothing should (see [`fix_hint`]).
    pub fix: String,
}

/// The ring. Written on the deny path only (an allow never touches it).
#[derive(Debug)]
pub struct Denials {
    capacity: usize,
    ring: Mutex<VecDeque<Denial>>,
}

impl Default for Denials {
    fn default() -> Self {
        Denials::new(CAPACITY)
    }
}

impl Denials {
    /// An empty ring keeping at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Denials { capacity, ring: Mutex::new(VecDeque::with_capacity(capacity.min(CAPACITY))) }
    }

    /// Adds a denial, dropping the oldest when full.
    pub fn record(&self, denial: Denial) {
        if self.capacity == 0 {
            return;
        }
        // A panic while holding the lock leaves a ring that is still valid.
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == self.capacity {
            ring.pop_front();
        }
        ring.push_back(denial);
    }

    /// Entries held now (at most the capacity).
    pub fn len(&self) -> usize {
        self.ring.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when no denial is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `owner`'s denials, newest first, at most `limit`.
    pub fn of(&self, owner: &Owner, limit: usize) -> Vec<Denial> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter().rev().filter(|d| d.owner == *owner).take(limit).cloned().collect()
    }
}

/// `{"caller":…,"denials":[{"time":…,"kind":…,"host":…,"port":…,"reason":…,"role":…,"rule":…,"fix":…}]}`
pub fn to_json(caller: &str, denials: &[Denial]) -> String {
    use crate::logging::{json_str, json_timestamp, push_u64};
    let mut out = Vec::with_capacity(256 + 512 * denials.len());
    out.extend_from_slice(b"{\"caller\":");
    json_str(&mut out, caller);
    out.extend_from_slice(b",\"denials\":[");
    for (i, d) in denials.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"time\":");
        json_timestamp(&mut out, d.at);
        for (name, value) in [("kind", d.kind), ("host", d.host.as_str())] {
            out.extend_from_slice(format!(",\"{name}\":").as_bytes());
            json_str(&mut out, value);
        }
        out.extend_from_slice(b",\"port\":");
        push_u64(&mut out, u64::from(d.port));
        for (name, value) in [("reason", d.reason), ("role", d.role.as_str()), ("rule", d.rule.as_str()), ("fix", d.fix.as_str())] {
            out.extend_from_slice(format!(",\"{name}\":").as_bytes());
            json_str(&mut out, value);
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"]}\n");
    String::from_utf8(out).unwrap_or_default()
}

/// The config lines that let `host` (a DNS name) reach `addr`, an address
/// in a private, special, internal or loopback range, on `port` for `role`:
/// a carve-out bound to the name and port, and the name on the role's
/// allow-list. `None` where a carve-out is not the answer (metadata,
/// link-local and the proxy's own addresses are never carved out, and an
/// address literal cannot be bound to a name).
pub fn carve_out_lines(reason: DenyReason, host: &str, port: u16, role: &str, addr: Option<IpAddr>) -> Option<String> {
    let DenyReason::DeniedRange(RangeKind::Private | RangeKind::Special | RangeKind::Internal | RangeKind::Loopback) = reason
    else {
        return None;
    };
    let addr = addr?;
    if host.parse::<IpAddr>().is_ok() || host.starts_with('[') {
        return None;
    }
    let prefix = if addr.is_ipv4() { 32 } else { 128 };
    Some(format!(
        "to allow this internal name, carve its address out for it (portcullis config, reloaded on save):\n\
         allow_ranges:\n  - {{cidr: {addr}/{prefix}, domains: [{host}], ports: [{port}]}}\n\
         roles:\n  {role}:\n    allow:\n      domains: [{host}]   # added to the role's list\n"
    ))
}

/// What the client (or its operator) can do about a deny: the carve-out
/// lines for an internal name, else one sentence per reason.
pub fn fix_hint(reason: DenyReason, host: &str, port: u16, role: &str, addr: Option<IpAddr>) -> String {
    if let Some(lines) = carve_out_lines(reason, host, port, role, addr) {
        return lines;
    }
    let mut hint = String::new();
    let _ = match reason {
        DenyReason::DeniedRange(RangeKind::Metadata | RangeKind::LinkLocal) | DenyReason::DeniedName(_) => write!(
            hint,
            "never allowed: cloud metadata, link-local and localhost destinations are always denied; nothing to configure"
        ),
        DenyReason::DeniedRange(RangeKind::SelfAddr) => {
            write!(hint, "never allowed: {host}:{port} is this proxy itself (a request would loop)")
        }
        DenyReason::DeniedRange(_) => write!(
            hint,
            "the address is in an always-denied range: reach it by a DNS name and carve the address out for that name \
             (allow_ranges with domains and ports); an address literal is never carved out by name"
        ),
        DenyReason::NotAllowListed => {
            write!(hint, "add {host} (or a *.suffix rule) to roles.{role}.allow.domains")
        }
        DenyReason::PortNotAllowed => write!(
            hint,
            "add port {port} to roles.{role}.allow.connect_ports (https://, CONNECT) or roles.{role}.allow.http_ports (http://)"
        ),
        DenyReason::DeniedByRole => write!(hint, "roles.{role}.deny lists this destination; remove it there if it is meant to be reached"),
        DenyReason::AuthRequired => {
            write!(hint, "send credentials: put user:password in the proxy URL (http://user:password@proxy:3128)")
        }
        DenyReason::AuthFailed => write!(hint, "the credentials were not accepted: check them against identity.credentials"),
        DenyReason::SniMismatch => write!(
            hint,
            "the TLS ClientHello named another host than the CONNECT: connect by the same name (or set roles.{role}.sni_check: false)"
        ),
        DenyReason::SniMissing => write!(hint, "the client sent no TLS server name: connect by name, not by address"),
        DenyReason::NotTls => write!(
            hint,
            "the tunnel to a name-allowed host did not start with TLS: use https://, or allow the address by allow.cidrs"
        ),
        DenyReason::SniTimeout => write!(hint, "the client sent no TLS ClientHello in time after CONNECT"),
        DenyReason::InvalidTarget => write!(hint, "send a DNS name or a canonical IP address with a valid port"),
        DenyReason::Revoked => write!(hint, "a policy reload withdrew the allow that let this connection open"),
        DenyReason::HostMismatch => {
            write!(hint, "inside a CONNECT to an http port, every request's Host must name the CONNECT host {host}:{port}")
        }
        DenyReason::NotHttp => write!(
            hint,
            "a CONNECT to an http_ports port must carry plain HTTP; list port {port} in roles.{role}.allow.connect_ports to tunnel TLS or other TCP"
        ),
        DenyReason::EchRefused => write!(
            hint,
            "the TLS ClientHello offered Encrypted ClientHello, which hides the real server name: turn ECH off in the client, \
             or set roles.{role}.allow_ech: true to decide on the outer name (docs/DNS.md)"
        ),
    };
    hint
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denial(owner: Owner, host: &str) -> Denial {
        Denial {
            at: SystemTime::UNIX_EPOCH,
            owner,
            kind: "connect",
            host: host.to_string(),
            port: 443,
            reason: "not-allowlisted",
            role: "default".to_string(),
            rule: "default-deny".to_string(),
            fix: fix_hint(DenyReason::NotAllowListed, host, 443, "default", None),
        }
    }

    #[test]
    fn ring_keeps_the_newest_up_to_capacity_and_lists_only_the_owners() {
        let a = Owner::of("127.0.0.2".parse().unwrap(), None);
        let b = Owner::of("::ffff:127.0.0.3".parse().unwrap(), None);
        let alice = Owner::of("127.0.0.2".parse().unwrap(), Some(b"Basic YWxpY2U6cHc="));
        assert_eq!(b, Owner::Source("127.0.0.3".parse().unwrap()), "v4-mapped is the IPv4 owner");
        assert_ne!(a, alice, "credentials own their denials, not the address they came from");
        let ring = Denials::new(4);
        for i in 0..10 {
            ring.record(denial(if i % 2 == 0 { a } else { b }, &format!("h{i}.example")));
            assert!(ring.len() <= 4);
        }
        assert_eq!(ring.len(), 4);
        let hosts = |owner| ring.of(&owner, 10).into_iter().map(|d| d.host).collect::<Vec<_>>();
        assert_eq!(hosts(a), ["h8.example", "h6.example"]);
        assert_eq!(hosts(b), ["h9.example", "h7.example"]);
        assert!(hosts(alice).is_empty());
        assert_eq!(ring.of(&a, 1).len(), 1);
        assert!(Denials::new(0).is_empty());
    }

    #[test]
    fn internal_names_get_their_carve_out_and_others_a_sentence() {
        let private = DenyReason::DeniedRange(RangeKind::Private);
        let lines = carve_out_lines(private, "mirror.corp.example", 8443, "ci", Some("10.1.2.3".parse().unwrap()));
        assert_eq!(
            lines.as_deref(),
            Some(
                "to allow this internal name, carve its address out for it (portcullis config, reloaded on save):\n\
                 allow_ranges:\n  - {cidr: 10.1.2.3/32, domains: [mirror.corp.example], ports: [8443]}\n\
                 roles:\n  ci:\n    allow:\n      domains: [mirror.corp.example]   # added to the role's list\n"
            )
        );
        let v6 = carve_out_lines(DenyReason::DeniedRange(RangeKind::Internal), "svc.example", 443, "default", Some("fd00::7".parse().unwrap()));
        assert!(v6.is_some_and(|l| l.contains("{cidr: fd00::7/128, domains: [svc.example], ports: [443]}")));
        for (reason, host, addr) in [
            (DenyReason::DeniedRange(RangeKind::Metadata), "metadata.example", Some("169.254.169.254")),
            (DenyReason::DeniedRange(RangeKind::LinkLocal), "ll.example", Some("169.254.1.1")),
            (DenyReason::DeniedRange(RangeKind::Private), "10.1.2.3", Some("10.1.2.3")),
            (DenyReason::DeniedRange(RangeKind::Private), "mirror.corp.example", None),
            (DenyReason::NotAllowListed, "mirror.corp.example", Some("10.1.2.3")),
        ] {
            assert_eq!(carve_out_lines(reason, host, 443, "ci", addr.map(|a| a.parse().unwrap())), None, "{reason} {host}");
        }
        assert_eq!(
            fix_hint(DenyReason::NotAllowListed, "api.example.com", 443, "ci", None),
            "add api.example.com (or a *.suffix rule) to roles.ci.allow.domains"
        );
        assert!(fix_hint(DenyReason::DeniedRange(RangeKind::Metadata), "169.254.169.254", 80, "ci", None).starts_with("never allowed"));
    }

    #[test]
    fn json_lists_every_field() {
        let owner = Owner::Source("127.0.0.2".parse().unwrap());
        let text = to_json("127.0.0.2", &[denial(owner, "a\"b.example")]);
        let value: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(value["caller"], "127.0.0.2");
        let entry = &value["denials"][0];
        assert_eq!(entry["time"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(entry["host"], "a\"b.example");
        assert_eq!(entry["port"], 443);
        assert_eq!(entry["reason"], "not-allowlisted");
        assert_eq!(entry.as_object().unwrap().len(), 8, "{entry}");
        assert_eq!(to_json("x", &[]), "{\"caller\":\"x\",\"denials\":[]}\n");
    }
}
