//! Dialing a permitted address: Happy Eyeballs over the permit's checked
//! addresses, within one overall timeout. Only a [`Permit`] names an
//! address here, so nothing unchecked can be dialed.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::config::Timeouts;
use crate::metrics::Metrics;
use crate::policy::Permit;
use crate::proxy::error::UpstreamError;

/// Opens a TCP connection to a reachable address of `permit` within one
/// overall `upstream_connect` timeout, racing the addresses Happy Eyeballs
/// style (RFC 8305): families interleaved, the next attempt started after
/// `connect_stagger` or as soon as one fails, the first to connect kept.
/// The permit is the only way to name an address here: nothing unchecked
/// can be dialed.
/// `mark` is `upstream.mark`, set on each socket before it connects.
pub async fn dial(permit: &Permit, timeouts: &Timeouts, mark: Option<u32>, metrics: &Metrics) -> Result<(TcpStream, SocketAddr), UpstreamError> {
    let started = Instant::now();
    let dialed = dial_any(permit, timeouts.upstream_connect.0, timeouts.connect_stagger.0, mark).await;
    metrics.upstream_connect.observe(started.elapsed().as_secs_f64());
    dialed
}

/// The addresses in RFC 8305 §4 order: the family of the first answer
/// first, then the two families alternating, each in answer order.
fn interleaved(addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let first_v6 = addrs.first().is_some_and(|a| a.is_ipv6());
    let (lead, other): (Vec<SocketAddr>, Vec<SocketAddr>) = addrs.iter().partition(|a| a.is_ipv6() == first_v6);
    let mut out = Vec::with_capacity(addrs.len());
    let (mut lead, mut other) = (lead.into_iter(), other.into_iter());
    loop {
        match (lead.next(), other.next()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
}

async fn dial_any(permit: &Permit, timeout: Duration, stagger: Duration, mark: Option<u32>) -> Result<(TcpStream, SocketAddr), UpstreamError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut waiting = interleaved(permit.addrs()).into_iter();
    let Some(first) = waiting.next() else { return Err(UpstreamError::ConnectTimeout) };
    let connected = |stream: TcpStream, addr| {
        let _ = stream.set_nodelay(true);
        Ok((stream, addr))
    };
    if waiting.len() == 0 {
        // One address: nothing to race, so no task and no timer but the deadline.
        return match tokio::time::timeout_at(deadline, connect_marked(first, mark)).await {
            Ok(Ok(stream)) => connected(stream, first),
            Ok(Err(e)) => Err(dial_failure(e)),
            Err(_) => Err(UpstreamError::ConnectTimeout),
        };
    }
    // Dropping the set aborts the attempts that lost the race. Attempts
    // start at once (a zero-length timer would wait for the timer wheel's
    // next millisecond tick), the next one after `stagger` or as soon as
    // an attempt fails.
    let mut attempts = tokio::task::JoinSet::new();
    let attempt = |addr: SocketAddr| async move { (addr, connect_marked(addr, mark).await) };
    attempts.spawn(attempt(first));
    let next_attempt = tokio::time::sleep(stagger);
    let expired = tokio::time::sleep_until(deadline);
    tokio::pin!(next_attempt, expired);
    loop {
        tokio::select! {
            () = &mut next_attempt, if waiting.len() > 0 => {
                if let Some(addr) = waiting.next() {
                    attempts.spawn(attempt(addr));
                }
                next_attempt.as_mut().reset(tokio::time::Instant::now() + stagger);
            }
            Some(joined) = attempts.join_next() => match joined {
                Ok((addr, Ok(stream))) => return connected(stream, addr),
                Ok((addr, Err(e))) => {
                    tracing::debug!(%addr, error = %e, "connect attempt failed");
                    match waiting.next() {
                        Some(next) => {
                            attempts.spawn(attempt(next));
                            next_attempt.as_mut().reset(tokio::time::Instant::now() + stagger);
                        }
                        // The last attempt's failure stands for all of them.
                        None if attempts.is_empty() => return Err(dial_failure(e)),
                        None => {}
                    }
                }
                Err(_) => {}
            },
            () = &mut expired => return Err(UpstreamError::ConnectTimeout),
        }
    }
}

/// Connects to `addr`, first setting `SO_MARK` to `mark` when one is given
/// (sidecar mode exempts the proxy's packets by this mark).
pub async fn connect_marked(addr: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    let Some(mark) = mark else { return TcpStream::connect(addr).await };
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    #[cfg(target_os = "linux")]
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &mark).map_err(|e| {
        io::Error::new(io::ErrorKind::PermissionDenied, format!("upstream.mark: cannot set SO_MARK {mark:#x} ({e}); it needs CAP_NET_ADMIN"))
    })?;
    #[cfg(not(target_os = "linux"))]
    return Err(io::Error::new(io::ErrorKind::Unsupported, format!("upstream.mark {mark:#x}: SO_MARK is Linux only")));
    socket.connect(addr).await
}

/// A failed connect as the error a response reports.
fn dial_failure(e: io::Error) -> UpstreamError {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => UpstreamError::Refused,
        _ => UpstreamError::Unreachable(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_interleaved_by_family() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let input = [a("[2001:db8::1]:1"), a("[2001:db8::2]:1"), a("192.0.2.1:1"), a("[2001:db8::3]:1"), a("192.0.2.2:1")];
        let want = [a("[2001:db8::1]:1"), a("192.0.2.1:1"), a("[2001:db8::2]:1"), a("192.0.2.2:1"), a("[2001:db8::3]:1")];
        assert_eq!(interleaved(&input), want);
        let v4_first = [a("192.0.2.1:1"), a("[2001:db8::1]:1"), a("[2001:db8::2]:1")];
        assert_eq!(interleaved(&v4_first), [a("192.0.2.1:1"), a("[2001:db8::1]:1"), a("[2001:db8::2]:1")]);
        assert!(interleaved(&[]).is_empty());
    }
}
