//! The header step of the request path: arbitrary `name: value` lines
//! (what hyper hands over after parsing a head) through hop-by-hop
//! stripping. Never panics; no hop-by-hop header, nor any header the
//! Connection header named, survives.
#![no_main]

use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use portcullis::proxy::forward::strip_hop_by_hop;

const HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(&line[..colon]), HeaderValue::from_bytes(line[colon + 1..].trim_ascii())) else {
            continue;
        };
        headers.append(name, value);
    }
    let named: Vec<HeaderName> = headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    strip_hop_by_hop(&mut headers);
    for name in HOP {
        assert!(!headers.contains_key(name), "{name} survived");
    }
    for name in named {
        assert!(!headers.contains_key(&name), "{name} named in Connection survived");
    }
});
