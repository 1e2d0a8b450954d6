//! The original destination of a connection that netfilter redirected to
//! this process (`REDIRECT`/`DNAT`): `SO_ORIGINAL_DST` for IPv4 and
//! `IP6T_SO_ORIGINAL_DST` for IPv6, read through nix's safe socket options.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::TcpStream;

/// Where the client meant to connect before its connection was redirected.
///
/// The family of the *connection* (not of the listening socket) picks the
/// option: a dual-stack listener sees IPv4 clients as `::ffff:a.b.c.d`, and
/// their conntrack entry is an IPv4 one. A connection that was not
/// redirected reports its own local address (or fails when conntrack does
/// not track it); the caller refuses both through its loop guard.
#[cfg(target_os = "linux")]
pub fn original_destination(stream: &TcpStream) -> io::Result<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    let local = stream.local_addr()?;
    if local.ip().to_canonical().is_ipv4() {
        let raw = getsockopt(stream, sockopt::OriginalDst).map_err(io::Error::from)?;
        let ip = Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr));
        Ok(SocketAddr::new(IpAddr::V4(ip), u16::from_be(raw.sin_port)))
    } else {
        let raw = getsockopt(stream, sockopt::Ip6tOriginalDst).map_err(io::Error::from)?;
        let ip = Ipv6Addr::from(raw.sin6_addr.s6_addr);
        Ok(SocketAddr::new(IpAddr::V6(ip), u16::from_be(raw.sin6_port)))
    }
}

/// Without netfilter there is no original destination to read.
#[cfg(not(target_os = "linux"))]
pub fn original_destination(_stream: &TcpStream) -> io::Result<SocketAddr> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "SO_ORIGINAL_DST needs Linux netfilter"))
}

/// True when `ip` is an address of one of this network namespace's
/// interfaces (the loop guard's question for a listener on `0.0.0.0`/`::`).
#[cfg(target_os = "linux")]
pub fn is_local_address(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    if ip.is_loopback() {
        return true;
    }
    let Ok(interfaces) = nix::ifaddrs::getifaddrs() else { return false };
    interfaces.filter_map(|i| i.address).any(|a| {
        let v4 = a.as_sockaddr_in().map(|s| IpAddr::V4(s.ip()));
        let v6 = a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip()));
        v4.or(v6) == Some(ip)
    })
}

/// Without interface enumeration, only loopback is known to be local.
#[cfg(not(target_os = "linux"))]
pub fn is_local_address(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// A connection nobody redirected has no NAT'ed destination: either
    /// conntrack reports the local address itself, or the option fails the
    /// way the kernel fails it for an untracked socket: ENOENT (conntrack
    /// has no entry for it) or ENOPROTOOPT (conntrack for the family is not
    /// loaded). Never another address, never another error. Both families.
    #[tokio::test]
    async fn unredirected_connection_reports_itself_or_nothing() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let _client = TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            match original_destination(&server) {
                Ok(original) => assert_eq!(original, addr),
                Err(e) => {
                    let untracked = [nix::errno::Errno::ENOENT as i32, nix::errno::Errno::ENOPROTOOPT as i32];
                    assert!(e.raw_os_error().is_some_and(|code| untracked.contains(&code)), "{bind}: {e}");
                }
            }
        }
    }
}
