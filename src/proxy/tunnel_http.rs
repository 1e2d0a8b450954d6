//! Plain HTTP inside a CONNECT tunnel: the plain-text analogue of the SNI
//! check. Clients such as undici's `EnvHttpProxyAgent` tunnel `http://` URLs
//! with `CONNECT host:80`; such a tunnel is allowed when its first request
//! head names the CONNECT host, in `Host` and in an absolute-form target.
//!
//! Only the first request head is read, as only the ClientHello is for TLS:
//! later requests on the same tunnel are relayed unread.

use crate::policy::DenyReason;
use crate::target::Target;

/// Header fields read at most in a tunnel's first request head.
const MAX_HEADERS: usize = 100;

/// What the first bytes of a tunnel are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Not enough bytes yet to tell.
    Incomplete,
    /// A TLS record (handshake content type).
    Tls,
    /// A complete HTTP/1.x request head; `Ok` when it names the CONNECT target.
    Http(Result<(), DenyReason>),
    /// Neither.
    Other,
}

/// Classifies the bytes a tunnel's client has sent so far against the
/// CONNECT `target`.
pub fn classify(buf: &[u8], target: &Target) -> Start {
    match buf.first() {
        None => return Start::Incomplete,
        Some(22) => return Start::Tls,
        Some(_) => {}
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => Start::Http(names_target(&req, target)),
        Ok(httparse::Status::Partial) => Start::Incomplete,
        Err(_) => Start::Other,
    }
}

/// Exactly one `Host`, naming the CONNECT host and port (the port defaults
/// to the CONNECT port, which is what a client that tunnels to it means);
/// an absolute-form target must name them too, since an origin obeys it
/// over `Host` (RFC 9112 3.2.2). A CONNECT inside the tunnel names nothing.
fn names_target(req: &httparse::Request<'_, '_>, target: &Target) -> Result<(), DenyReason> {
    let names = |authority: &str| Target::parse_host_header(authority, target.port).is_ok_and(|t| t == *target);
    let mut hosts = req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("host"));
    let host = match (hosts.next(), hosts.next()) {
        (Some(h), None) => std::str::from_utf8(h.value).map_err(|_| DenyReason::HostMismatch)?,
        _ => return Err(DenyReason::HostMismatch),
    };
    if !names(host.trim()) {
        return Err(DenyReason::HostMismatch);
    }
    let path = req.path.unwrap_or("");
    if path.starts_with('/') || path == "*" {
        return Ok(());
    }
    match path.parse::<http::Uri>().ok().and_then(|uri| uri.authority().cloned()) {
        Some(authority) if req.method != Some("CONNECT") && names(authority.as_str()) => Ok(()),
        _ => Err(DenyReason::HostMismatch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_are_classified_against_the_connect_target() {
        let target = Target::parse_authority("origin.test:80").unwrap();
        let mismatch = Start::Http(Err(DenyReason::HostMismatch));
        for (bytes, expected) in [
            (&b""[..], Start::Incomplete),
            (b"\x16\x03\x01\x02\x00", Start::Tls),
            (b"GET / HTTP/1.1\r\nHost: origin.test\r\n", Start::Incomplete),
            (b"GET / HTTP/1.1\r\nHost: origin.test\r\n\r\n", Start::Http(Ok(()))),
            (b"GET /a?b HTTP/1.1\r\nhost: ORIGIN.test:80\r\n\r\n", Start::Http(Ok(()))),
            (b"POST /x HTTP/1.0\r\nHost: origin.test\r\nContent-Length: 3\r\n\r\nabc", Start::Http(Ok(()))),
            (b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n", Start::Http(Ok(()))),
            (b"OPTIONS * HTTP/1.1\r\nHost: origin.test\r\n\r\n", Start::Http(Ok(()))),
            (b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n", mismatch.clone()),
            (b"GET / HTTP/1.1\r\nHost: origin.test:8080\r\n\r\n", mismatch.clone()),
            (b"GET / HTTP/1.1\r\nHost: origin.test.evil\r\n\r\n", mismatch.clone()),
            (b"GET / HTTP/1.1\r\n\r\n", mismatch.clone()),
            (b"GET / HTTP/1.1\r\nHost: origin.test\r\nHost: other.test\r\n\r\n", mismatch.clone()),
            (b"GET http://other.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n", mismatch.clone()),
            (b"CONNECT other.test:80 HTTP/1.1\r\nHost: origin.test\r\n\r\n", mismatch.clone()),
            (b"GET / HTTP/1.1\r\nHost: user@origin.test\r\n\r\n", mismatch.clone()),
            (b"SSH-2.0-OpenSSH_9.6\r\n", Start::Other),
            (b"\x00\x01binary", Start::Other),
        ] {
            assert_eq!(classify(bytes, &target), expected, "{:?}", String::from_utf8_lossy(bytes));
        }
    }
}
