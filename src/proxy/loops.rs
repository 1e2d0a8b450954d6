//! The loop guard, for every entrance. A request or connection that has
//! already passed through this process would go round until a limit stops
//! it (a wrong exempt uid in sidecar mode looped a redirected request about
//! a hundred hops, to a 431). Three signs, each refused as `loop-detected`
//! with the likely cause named:
//!
//! - a request carrying this process's own `Via` (RFC 9110 7.6.3);
//! - a redirected connection whose original destination is one of this
//!   process's listeners (or a client that connected to the transparent
//!   port directly);
//! - a redirected connection that comes from one of this process's own
//!   upstream sockets: its outbound traffic was redirected back to it.

use std::net::SocketAddr;
use std::sync::Arc;

use dashmap::DashMap;
use http::header::{self, HeaderMap, HeaderValue};

use crate::orig_dst;

/// The likely cause of a redirected connection that loops back.
pub const SIDECAR_CAUSE: &str =
    "sidecar mode: Portcullis is not running as PORTCULLIS_UID, so redirect.sh sends its own connections back to it";

/// Why a connection or request is a loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loop {
    /// It carries this process's `Via`.
    Via,
    /// A redirected connection headed for one of this process's listeners.
    OwnListener,
    /// A redirected connection from one of this process's upstream sockets.
    OwnSocket,
}

impl Loop {
    /// What most likely made it, for the warning logged with the refusal.
    pub const fn cause(self) -> &'static str {
        match self {
            Loop::Via | Loop::OwnSocket => SIDECAR_CAUSE,
            Loop::OwnListener => {
                "the original destination is one of Portcullis's own listeners (a client connected to the transparent port directly, or the redirect excludes too little)"
            }
        }
    }
}

/// The `Via` value this proxy adds (RFC 9110 7.6.3): `1.1 portcullis-`
/// and a pseudonym drawn once per process, so a request that comes back
/// carrying it has looped through this very process (another Portcullis,
/// a parent proxy, has another pseudonym).
pub fn via() -> &'static HeaderValue {
    static VIA: std::sync::OnceLock<HeaderValue> = std::sync::OnceLock::new();
    VIA.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let pseudonym = h.finish() as u32;
        HeaderValue::try_from(format!("1.1 portcullis-{pseudonym:08x}")).expect("ASCII text is a valid header value")
    })
}

/// True when the request already passed through this process.
pub fn has_looped(headers: &HeaderMap) -> bool {
    let own = via().as_bytes();
    let ours = |v: &HeaderValue| v.as_bytes().split(|b| *b == b',').any(|hop| hop.trim_ascii() == own);
    headers.get_all(header::VIA).iter().any(ours)
}

/// The local addresses of this process's open upstream sockets.
#[derive(Default)]
pub struct Outbound {
    open: DashMap<SocketAddr, usize>,
}

impl Outbound {
    /// Records an upstream socket bound locally at `local` until the
    /// returned guard drops (with the socket).
    pub fn register(self: &Arc<Self>, local: SocketAddr) -> OutboundGuard {
        let local = canonical(local);
        *self.open.entry(local).or_insert(0) += 1;
        OutboundGuard { outbound: self.clone(), local }
    }

    fn contains(&self, peer: SocketAddr) -> bool {
        self.open.contains_key(&canonical(peer))
    }
}

/// An upstream socket's entry in [`Outbound`].
pub struct OutboundGuard {
    outbound: Arc<Outbound>,
    local: SocketAddr,
}

impl Drop for OutboundGuard {
    fn drop(&mut self) {
        if let Some(mut count) = self.outbound.open.get_mut(&self.local) {
            *count = count.saturating_sub(1);
        }
        self.outbound.open.remove_if(&self.local, |_, c| *c == 0);
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Whether a redirected connection from `peer`, accepted at `local` and
/// originally headed for `original`, loops: headed for one of `own`
/// listeners, or coming from one of this process's upstream sockets.
pub fn redirected(peer: SocketAddr, local: SocketAddr, original: SocketAddr, own: &[SocketAddr], outbound: &Outbound) -> Option<Loop> {
    if is_own_listener(original, local, own) {
        return Some(Loop::OwnListener);
    }
    outbound.contains(peer).then_some(Loop::OwnSocket)
}

/// True when `original` names one of this process's listeners, or the
/// connection's own local address (a client that connected to the
/// transparent port directly).
fn is_own_listener(original: SocketAddr, local: SocketAddr, own: &[SocketAddr]) -> bool {
    let original = canonical(original);
    if original == canonical(local) {
        return true;
    }
    own.iter().filter(|l| l.port() == original.port()).any(|l| {
        let ip = l.ip().to_canonical();
        ip == original.ip() || (ip.is_unspecified() && orig_dst::is_local_address(original.ip()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loops_are_told_apart() {
        let local: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        let own: Vec<SocketAddr> =
            ["127.0.0.1:3128", "0.0.0.0:9128", "[::]:15001"].iter().map(|a| a.parse().unwrap()).collect();
        let outbound = Arc::new(Outbound::default());
        let upstream = outbound.register("10.0.0.2:40000".parse().unwrap());
        let peer: SocketAddr = "10.0.0.2:50000".parse().unwrap();
        let cases = [
            ("127.0.0.1:15001", peer, Some(Loop::OwnListener)),
            ("[::ffff:127.0.0.1]:15001", peer, Some(Loop::OwnListener)),
            ("127.0.0.1:3128", peer, Some(Loop::OwnListener)),
            ("127.0.0.1:9128", peer, Some(Loop::OwnListener)),
            ("[::1]:15001", peer, Some(Loop::OwnListener)),
            ("11.0.0.10:3128", peer, None),
            ("11.0.0.10:443", peer, None),
            ("127.0.0.1:8080", peer, None),
            ("11.0.0.10:443", "10.0.0.2:40000".parse().unwrap(), Some(Loop::OwnSocket)),
            ("11.0.0.10:443", "[::ffff:10.0.0.2]:40000".parse().unwrap(), Some(Loop::OwnSocket)),
        ];
        for (original, peer, want) in cases {
            assert_eq!(redirected(peer, local, original.parse().unwrap(), &own, &outbound), want, "{original} from {peer}");
        }
        drop(upstream);
        let closed: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        assert_eq!(redirected(closed, local, "11.0.0.10:443".parse().unwrap(), &own, &outbound), None, "a closed socket is forgotten");
    }

    #[test]
    fn own_via_is_a_loop_and_others_are_not() {
        let mut headers = HeaderMap::new();
        headers.append(header::VIA, HeaderValue::from_static("1.1 squid, 1.1 portcullis-00000000"));
        assert!(!has_looped(&headers));
        headers.append(header::VIA, via().clone());
        assert!(has_looped(&headers));
    }
}
