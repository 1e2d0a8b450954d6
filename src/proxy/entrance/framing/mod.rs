//! Strict framing at the edge: the requests the proxy refuses as malformed
//! before any decision, and a watch on the client's bytes for what hyper's
//! parsed request no longer shows.
//!
//! hyper already answers 400/414/431 itself for a request line or header it
//! cannot parse, differing or signed Content-Length values, a
//! Transfer-Encoding that does not end in `chunked`, Transfer-Encoding on
//! HTTP/1.0 and obs-fold. It accepts, and this module refuses:
//! Content-Length together with Transfer-Encoding (hyper drops the
//! Content-Length, so only the wire still shows both: RFC 9112 6.3 lets a
//! server reject it, and a security boundary should), an HTTP/1.1 request
//! without Host or with an invalid Host (RFC 9112 3.2), and CONNECT with
//! content (RFC 9110 9.3.6), and more than one Host line (RFC 9112 3.2:
//! a server MUST answer 400; the next hop might read the other one).
//!
//! Every entrance runs the same [`check_head`]: the proxy port (absolute
//! form and CONNECT), redirected HTTP, and plain HTTP inside a tunnel.

mod wire;

use http::{header, HeaderMap, Method, Request, Version};

pub use crate::refusal::Refusal;
pub use wire::{WatchedIo, Wire};
/// The body framing rules, shared with plain HTTP inside a tunnel.
pub(crate) use wire::{body_framing, next_chunk_state, Chunk, Framing};

/// Where a request came in; the one difference between entrances is what
/// a CONNECT means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entrance {
    /// The proxy port: CONNECT opens a tunnel.
    Proxy,
    /// A redirected connection: a CONNECT is refused.
    Redirected,
    /// Plain HTTP inside a tunnel: a CONNECT names no host the tunnel
    /// allows, and is refused as such by the tunnel's host check.
    Tunnel,
}

/// Checks a parsed request head that came in at `entrance`; `conflicting`
/// says whether the wire showed both Content-Length and Transfer-Encoding
/// for it (see [`Wire`]).
pub fn check_head<B>(req: &Request<B>, conflicting: bool, entrance: Entrance) -> Result<(), Refusal> {
    if conflicting {
        return Err(Refusal::ConflictingFraming);
    }
    check_host(req.version(), req.headers())?;
    if req.method() == Method::CONNECT {
        if entrance == Entrance::Redirected {
            return Err(Refusal::ConnectRedirected);
        }
        if declares_content(req.headers()) {
            return Err(Refusal::ConnectWithBody);
        }
    }
    Ok(())
}

fn check_host(version: Version, headers: &HeaderMap) -> Result<(), Refusal> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        return match headers.contains_key(header::HOST) {
            true => Err(Refusal::DuplicateHost),
            false => match version {
                Version::HTTP_09 | Version::HTTP_10 => Ok(()),
                _ => Err(Refusal::MissingHost),
            },
        };
    };
    // RFC 9110 7.2: Host = uri-host [ ":" port ], so no userinfo either.
    match http::uri::Authority::try_from(host.as_bytes()) {
        Ok(authority) if !authority.as_str().contains('@') && valid_port(&authority) => Ok(()),
        _ => Err(Refusal::InvalidHost),
    }
}

/// The http crate accepts any digits as a port (and then reports none).
fn valid_port(authority: &http::uri::Authority) -> bool {
    let port = authority.as_str().rsplit_once(':').map(|(_, port)| port).filter(|port| !port.contains(']'));
    port.is_none_or(|port| port.is_empty() || authority.port_u16().is_some())
}

/// hyper has validated Content-Length by now (one value, digits only) and
/// removed it when Transfer-Encoding is present.
fn declares_content(headers: &HeaderMap) -> bool {
    let sized = headers
        .get(header::CONTENT_LENGTH)
        .is_some_and(|len| len.as_bytes().iter().any(|&b| b != b'0'));
    sized || headers.contains_key(header::TRANSFER_ENCODING)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri("http://a.test/").version(version);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn heads_are_checked() {
        const HTTP_10: Version = Version::HTTP_10;
        const HTTP_11: Version = Version::HTTP_11;
        type Case = (&'static str, Version, &'static [(&'static str, &'static str)], Result<(), Refusal>);
        let cases: [Case; 18] = [
            ("GET", HTTP_11, &[("host", "a.test")], Ok(())),
            ("GET", HTTP_11, &[("host", "a.test:8080")], Ok(())),
            ("GET", HTTP_11, &[("host", "[2001:db8::1]:443")], Ok(())),
            ("GET", HTTP_10, &[], Ok(())),
            ("GET", HTTP_11, &[], Err(Refusal::MissingHost)),
            ("GET", HTTP_11, &[("host", "")], Err(Refusal::InvalidHost)),
            ("GET", HTTP_11, &[("host", "a b")], Err(Refusal::InvalidHost)),
            ("GET", HTTP_11, &[("host", "a.test/x")], Err(Refusal::InvalidHost)),
            ("GET", HTTP_11, &[("host", "user:pw@a.test")], Err(Refusal::InvalidHost)),
            ("GET", HTTP_10, &[("host", "a.test:99999")], Err(Refusal::InvalidHost)),
            ("GET", HTTP_11, &[("host", "[::1]")], Ok(())),
            ("GET", HTTP_11, &[("host", "a.test"), ("host", "169.254.169.254")], Err(Refusal::DuplicateHost)),
            ("GET", HTTP_10, &[("host", "a.test"), ("host", "a.test")], Err(Refusal::DuplicateHost)),
            ("CONNECT", HTTP_11, &[("host", "a.test:443"), ("host", "b.test:443")], Err(Refusal::DuplicateHost)),
            ("CONNECT", HTTP_11, &[("host", "a.test:443"), ("content-length", "0")], Ok(())),
            ("CONNECT", HTTP_11, &[("host", "a.test:443"), ("content-length", "00")], Ok(())),
            ("CONNECT", HTTP_11, &[("host", "a.test:443"), ("content-length", "5")], Err(Refusal::ConnectWithBody)),
            ("CONNECT", HTTP_11, &[("host", "a.test:443"), ("transfer-encoding", "chunked")], Err(Refusal::ConnectWithBody)),
        ];
        for (method, version, headers, want) in cases {
            assert_eq!(check_head(&request(method, version, headers), false, Entrance::Proxy), want, "{method} {version:?} {headers:?}");
        }
        let fine = request("POST", Version::HTTP_11, &[("host", "a.test")]);
        assert_eq!(check_head(&fine, true, Entrance::Proxy), Err(Refusal::ConflictingFraming));
        let connect = request("CONNECT", Version::HTTP_11, &[("host", "a.test:443")]);
        assert_eq!(check_head(&connect, false, Entrance::Redirected), Err(Refusal::ConnectRedirected));
        assert_eq!(check_head(&connect, false, Entrance::Tunnel), Ok(()), "the tunnel's host check refuses it");
    }
}
