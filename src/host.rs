//! Facts about the host the proxy runs on: the addresses of its network
//! interfaces (so the proxy never proxies to itself) and its file
//! descriptor limit (so the configured limits can actually be served).

use std::net::IpAddr;

/// The addresses of every network interface, as the kernel reports them
/// now. Empty where they cannot be read.
#[cfg(target_os = "linux")]
pub fn interface_addrs() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    let mut out: Vec<IpAddr> = addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(not(target_os = "linux"))]
pub fn interface_addrs() -> Vec<IpAddr> {
    Vec::new()
}

/// The open-file limit: raises the soft limit to the hard one (as Go and
/// nginx do) and returns the soft limit in force afterwards.
#[cfg(unix)]
pub fn raise_nofile_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}

#[cfg(not(unix))]
pub fn raise_nofile_limit() -> Option<u64> {
    None
}

/// The open-file (soft) limit in force now, as a reload checks against.
#[cfg(unix)]
pub fn nofile_limit() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok().map(|(soft, _)| soft)
}

#[cfg(not(unix))]
pub fn nofile_limit() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_an_interface_address() {
        // Every namespace this runs in (CI's loopback-only one included) has lo up.
        assert!(interface_addrs().iter().any(|a| a.is_loopback()), "{:?}", interface_addrs());
    }
}
