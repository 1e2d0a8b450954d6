//! The proxy through real sockets: an in-process proxy on 127.0.0.1:0,
//! origins and a DNS server on loopback, raw TCP clients.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A policy that can reach the loopback origins: 127.0.0.1 carved out and
/// allow-listed, names under `*.test` allowed, ports given per test.
fn loopback_policy(dns: Option<std::net::SocketAddr>, ports: &[u16], mode: &str) -> String {
    let ports = ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
    let dns = dns.map(|a| format!("dns:\n  nameservers: [\"{a}\"]\n  timeout: 1s\n")).unwrap_or_default();
    format!(
        "{dns}timeouts:\n  upstream_connect: 2s\n  request_header: 2s\nallow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    mode: {mode}\n    allow:\n      domains: [\"*.test\", allowed.example]\n      cidrs: [127.0.0.1/32]\n      http_ports: [{ports}]\n      connect_ports: [{ports}]\n"
    )
}

#[tokio::test]
async fn forwards_http_and_strips_hop_by_hop_headers() {
    let origin = start_http_origin().await;
    let proxy = start_proxy(&loopback_policy(None, &[origin.port()], "enforce")).await;
    let request = format!(
        "GET http://127.0.0.1:{port}/headers?x=1 HTTP/1.1\r\n\
         Host: wrong.example\r\n\
         Proxy-Authorization: Basic c2VjcmV0OnNlY3JldA==\r\n\
         Proxy-Connection: keep-alive\r\n\
         Connection: keep-alive, X-Hop\r\n\
         X-Hop: must-not-pass\r\n\
         Keep-Alive: timeout=5\r\n\
         TE: trailers\r\n\
         Upgrade: websocket\r\n\
         X-End-To-End: kept\r\n\r\n",
        port = origin.port()
    );
    let resp = send_raw(proxy, &request).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = resp.text().to_lowercase();
    assert!(seen.starts_with("get /headers?x=1\n"), "origin-form expected: {seen}");
    assert!(seen.contains(&format!("host: 127.0.0.1:{}\n", origin.port())), "Host rewritten from the URI: {seen}");
    assert!(seen.contains("x-end-to-end: kept"), "{seen}");
    assert!(seen.contains("via: 1.1 portcullis"), "{seen}");
    for hop in ["proxy-authorization", "proxy-connection", "x-hop", "keep-alive", "te:", "upgrade", "secret"] {
        assert!(!seen.contains(hop), "{hop} leaked upstream: {seen}");
    }
    let via = resp.header("via").expect("Via on the response");
    assert!(via.starts_with("1.1 portcullis-") && via.len() == "1.1 portcullis-".len() + 8, "{via}");
    assert!(seen.contains(&format!("via: {via}\n")), "the same pseudonym both ways: {seen}");
}

#[tokio::test]
async fn streams_bodies_both_ways_with_keep_alive() {
    let origin = start_http_origin().await;
    let proxy = start_proxy(&loopback_policy(None, &[origin.port()], "enforce")).await;
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    let port = origin.port();
    // A chunked upload echoed back, then a large download, on one client connection.
    let payload = pattern(0, 3 * 1024 * 1024 + 17);
    let head = format!("POST http://127.0.0.1:{port}/echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nTransfer-Encoding: chunked\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let upload = payload.clone();
    let send = tokio::spawn(async move {
        for chunk in upload.chunks(100_000) {
            writer.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await.unwrap();
            writer.write_all(chunk).await.unwrap();
            writer.write_all(b"\r\n").await.unwrap();
        }
        writer.write_all(b"0\r\n\r\n").await.unwrap();
        writer
    });
    let mut stream = {
        // Read the echo while the upload is still being written: streaming, not buffering.
        let resp_head_and_body = async {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 65536];
            loop {
                let n = reader.read(&mut chunk).await.unwrap();
                assert!(n > 0, "proxy closed early");
                buf.extend_from_slice(&chunk[..n]);
                if buf.ends_with(b"\r\n0\r\n\r\n") {
                    return buf;
                }
            }
        };
        let raw = tokio::time::timeout(STEP, resp_head_and_body).await.expect("echo in time");
        let writer = send.await.unwrap();
        let text_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert!(raw.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&raw[..text_end]));
        let body = dechunk(&raw[text_end..]);
        assert_eq!(body.len(), payload.len());
        assert!(body == payload, "echoed body differs");
        reader.reunite(writer).unwrap()
    };
    let n = 5 * 1024 * 1024;
    stream
        .write_all(format!("GET http://127.0.0.1:{port}/bytes/{n} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let resp = read_response(&mut stream).await;
    assert_eq!(resp.status, 200);
    assert!(resp.body == pattern(0, n), "downloaded body differs");
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&data[..line_end]).unwrap(), 16).unwrap();
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[tokio::test]
async fn connect_relays_bytes_exactly() {
    let echo = start_tcp_echo().await;
    let proxy = start_proxy(&loopback_policy(None, &[echo.port()], "enforce")).await;
    let (resp, stream) = connect(proxy, &format!("127.0.0.1:{}", echo.port())).await;
    assert_eq!(resp.status, 200);
    // Large enough that both directions switch to splice(2) on Linux.
    let payload = pattern(7, 16 * 1024 * 1024);
    let echoed = echo_through(stream, &payload).await;
    assert_eq!(echoed.len(), payload.len());
    assert!(echoed == payload, "tunnel altered the bytes");
}

#[tokio::test]
async fn connect_half_close_still_delivers_the_answer() {
    let origin = start_tcp_count_then_reply().await;
    let proxy = start_proxy(&loopback_policy(None, &[origin.port()], "enforce")).await;
    let (resp, mut stream) = connect(proxy, &format!("127.0.0.1:{}", origin.port())).await;
    assert_eq!(resp.status, 200);
    stream.write_all(&[b'x'; 12345]).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(STEP, stream.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert_eq!(answer, "got 12345 bytes");
}

/// Denied destinations, each through plain HTTP and CONNECT. The proxy runs
/// without any carve-out, so even 127.0.0.1 is denied.
#[tokio::test]
async fn denied_destinations_get_403_with_reason() {
    let proxy = start_proxy(
        "roles:\n  default:\n    allow:\n      domains: [\"*.internal\", \"*.goog\"]\n      cidrs: [0.0.0.0/0, \"::/0\"]\n      http_ports: [80]\n      connect_ports: [443]\n",
    )
    .await;
    let cases = [
        ("169.254.169.254", "denied-range:metadata"),
        ("[fd00:ec2::254]", "denied-range:metadata"),
        ("[::ffff:a9fe:a9fe]", "denied-range:metadata"),
        ("[::ffff:169.254.169.254]", "denied-range:metadata"),
        ("[64:ff9b::a9fe:a9fe]", "denied-range:metadata"),
        ("[2002:a9fe:a9fe::1]", "denied-range:metadata"),
        ("100.100.100.200", "denied-range:metadata"),
        ("169.254.1.1", "denied-range:link-local"),
        ("[fe80::1]", "denied-range:link-local"),
        ("10.0.0.1", "denied-range:private"),
        ("192.168.1.1", "denied-range:private"),
        ("127.0.0.1", "denied-range:loopback"),
        ("[::1]", "denied-range:loopback"),
        ("0.0.0.0", "denied-range:special"),
        ("metadata.google.internal", "denied-name:metadata"),
        ("metadata.goog", "denied-name:metadata"),
        ("localhost", "denied-name:loopback"),
    ];
    for (host, reason) in cases {
        let resp = get(proxy, &format!("http://{host}/latest/meta-data/")).await;
        assert_eq!(resp.status, 403, "GET {host}");
        assert_eq!(resp.header("x-portcullis-deny"), Some(reason), "GET {host}");
        assert_eq!(resp.reason, format!("Forbidden (portcullis: {reason})"), "GET {host}");
        let body = resp.text();
        let lines: Vec<&str> = body.lines().collect();
        assert_eq!(lines[0], format!("portcullis: {reason}: destination denied by policy"), "GET {host}");
        assert!(lines[1].starts_with("host: ") && lines[2..] == ["port: 80", "role: default"], "{body}");
        assert!(!body.contains("meta-data"), "the path is never echoed: {body}");
        let (resp, _) = connect(proxy, &format!("{host}:443")).await;
        assert_eq!(resp.status, 403, "CONNECT {host}");
        assert_eq!(resp.header("x-portcullis-deny"), Some(reason), "CONNECT {host}");
        assert_eq!(resp.reason, format!("Forbidden (portcullis: {reason})"), "CONNECT {host}");
    }
}

#[tokio::test]
async fn allow_list_and_ports_are_enforced() {
    let dns = start_dns(&[("elsewhere.example", &["127.0.0.1"])]).await;
    let origin = start_http_origin().await;
    let proxy = start_proxy(&loopback_policy(Some(dns.addr), &[origin.port()], "enforce")).await;
    let resp = get(proxy, &format!("http://elsewhere.example:{}/", origin.port())).await;
    // Not allow-listed by name, but its address is inside an allowed CIDR.
    assert_eq!(resp.status, 200);
    let (resp, _) = connect(proxy, "not-listed.example:443").await;
    assert_eq!(resp.status, 403);
    assert_eq!(resp.header("x-portcullis-deny"), Some("port-not-allowed"));
    let (resp, _) = connect(proxy, &format!("127.0.0.1:{}", origin.port() ^ 1)).await;
    assert_eq!(resp.header("x-portcullis-deny"), Some("port-not-allowed"));
    let resp = get(proxy, &format!("http://8.8.8.8:{}/", origin.port())).await;
    assert_eq!(resp.status, 403);
    assert_eq!(resp.header("x-portcullis-deny"), Some("not-allowlisted"));
}

#[tokio::test]
async fn names_not_on_the_list_are_denied_without_dns() {
    let dns = start_dns(&[("other.example", &["8.8.8.8"])]).await;
    let proxy = start_proxy(&format!(
        "dns:\n  nameservers: [\"{}\"]\nroles:\n  default:\n    allow:\n      domains: [allowed.example]\n",
        dns.addr
    ))
    .await;
    let (resp, _) = connect(proxy, "other.example:443").await;
    assert_eq!(resp.status, 403);
    assert_eq!(resp.header("x-portcullis-deny"), Some("not-allowlisted"));
    assert!(dns.queries.lock().unwrap().is_empty(), "a name that cannot be allowed must not be resolved");
}

/// The name looks fine; what it resolves to is not.
#[tokio::test]
async fn names_resolving_into_denied_ranges_are_denied() {
    let dns = start_dns(&[
        ("metadata-alias.test", &["169.254.169.254"]),
        ("mixed.test", &["127.0.0.1", "10.0.0.1"]),
        ("v6-metadata.test", &["fd00:ec2::254"]),
        ("mapped.test", &["::ffff:169.254.169.254"]),
        ("good.test", &["127.0.0.1"]),
    ])
    .await;
    let origin = start_http_origin().await;
    let proxy = start_proxy(&loopback_policy(Some(dns.addr), &[origin.port(), 80, 443], "enforce")).await;
    let cases = [
        ("metadata-alias.test", "denied-range:metadata"),
        ("mixed.test", "denied-range:private"),
        ("v6-metadata.test", "denied-range:metadata"),
        ("mapped.test", "denied-range:metadata"),
    ];
    for (name, reason) in cases {
        let resp = get(proxy, &format!("http://{name}/")).await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some(reason)), "GET {name}");
        let (resp, _) = connect(proxy, &format!("{name}:443")).await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some(reason)), "CONNECT {name}");
    }
    let resp = get(proxy, &format!("http://good.test:{}/headers", origin.port())).await;
    assert_eq!(resp.status, 200);
    assert!(resp.text().contains(&format!("host: good.test:{}", origin.port())), "{}", resp.text());
}

#[tokio::test]
async fn resolution_failure_is_502_not_a_deny() {
    let dns = start_dns(&[]).await;
    let proxy = start_proxy(&loopback_policy(Some(dns.addr), &[80, 443], "enforce")).await;
    let resp = get(proxy, "http://nowhere.test/").await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.header("x-portcullis-error"), Some("resolve-failed"));
    assert_eq!(resp.header("x-portcullis-deny"), None);
}

#[tokio::test]
async fn malformed_targets_get_400() {
    let proxy = start_proxy(&loopback_policy(None, &[80, 443], "enforce")).await;
    let connects = [
        "2852039166:443",
        "0xA9FEA9FE:443",
        "0251.0376.0251.0376:443",
        "169.254.43518:443",
        "127.1:443",
        "010.0.0.1:443",
        "user@allowed.example:443",
        "allowed.example:0",
    ];
    for target in connects {
        // A valid Host, so that the target itself is judged (a Host
        // carrying userinfo is refused first, as `invalid-host`).
        let resp = send_raw(proxy, &format!("CONNECT {target} HTTP/1.1\r\nHost: allowed.example\r\n\r\n")).await;
        assert_eq!(resp.status, 400, "CONNECT {target}");
        assert_eq!(resp.header("x-portcullis-error"), Some("invalid-target"), "CONNECT {target}");
    }
    let gets = ["http://2852039166/", "http://0x7f.1/", "http://127.1/", "http://[fe80::1%25eth0]/", "http://user:pw@allowed.example/"];
    for url in gets {
        let resp = get(proxy, url).await;
        assert_eq!(resp.status, 400, "GET {url}");
    }
    // Rejected by the HTTP parser itself, still a 400 and the proxy keeps serving.
    for target in ["allowed.example:99999", "%61llowed.example:443", "[fe80::1%eth0]:443"] {
        let resp = send_raw(proxy, &format!("CONNECT {target} HTTP/1.1\r\nHost: x\r\n\r\n")).await;
        assert_eq!(resp.status, 400, "CONNECT {target}");
    }
    let resp = get(proxy, "http://169.254.169.254/").await;
    assert_eq!(resp.status, 403);
}

#[tokio::test]
async fn origin_form_requests_get_405() {
    let proxy = start_proxy(&loopback_policy(None, &[80], "enforce")).await;
    let resp = send_raw(proxy, "GET /index.html HTTP/1.1\r\nHost: example.com\r\n\r\n").await;
    assert_eq!(resp.status, 405);
    assert_eq!(resp.header("x-portcullis-error"), Some("origin-form"));
}

#[tokio::test]
async fn upstream_refusal_is_502() {
    let (refusing, _held_port) = refusing_addr();
    let port = refusing.port();
    let proxy = start_proxy(&loopback_policy(None, &[port], "enforce")).await;
    let resp = get(proxy, &format!("http://127.0.0.1:{port}/")).await;
    assert_eq!((resp.status, resp.header("x-portcullis-error")), (502, Some("upstream-refused")));
    let (resp, _) = connect(proxy, &format!("127.0.0.1:{port}")).await;
    assert_eq!((resp.status, resp.header("x-portcullis-error")), (502, Some("upstream-refused")));
}

#[tokio::test]
async fn report_mode_allows_would_deny_but_not_denied_ranges() {
    let dns = start_dns(&[("unlisted.example", &["127.0.0.1"])]).await;
    let origin = start_http_origin().await;
    // Report mode with an allow-list that matches nothing the test uses.
    let proxy = start_proxy(&format!(
        "dns:\n  nameservers: [\"{}\"]\nallow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    mode: report\n    allow:\n      domains: [only.example]\n      http_ports: [80]\n",
        dns.addr
    ))
    .await;
    let resp = get(proxy, &format!("http://unlisted.example:{}/headers", origin.port())).await;
    assert_eq!(resp.status, 200, "report mode lets a not-allowlisted, wrong-port request through");
    let resp = get(proxy, "http://169.254.169.254/").await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("denied-range:metadata")));
    let resp = get(proxy, "http://127.0.0.2/").await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("denied-range:loopback")));
}

#[tokio::test]
async fn slow_request_head_is_cut_off() {
    let proxy = start_proxy("timeouts:\n  request_header: 300ms\nroles:\n  default: {}\n").await;
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(b"GET http://allowed.example/ HTTP/1.1\r\nX-Slow: ").await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(STEP, stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the proxy must close a connection that does not finish its head");
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(5), "{elapsed:?}");
    // And it keeps serving others.
    let resp = get(proxy, "http://169.254.169.254/").await;
    assert_eq!(resp.status, 403);
}

/// Bytes sent right behind the CONNECT head, before the 200 arrives, are
/// relayed first and exactly once.
#[tokio::test]
async fn connect_relays_bytes_sent_with_the_request_head() {
    let echo = start_tcp_echo().await;
    let proxy = start_proxy(&loopback_policy(None, &[echo.port()], "enforce")).await;
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    let authority = format!("127.0.0.1:{}", echo.port());
    stream
        .write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\nearly bytes|").as_bytes())
        .await
        .unwrap();
    let resp = read_response(&mut stream).await;
    assert_eq!(resp.status, 200);
    stream.write_all(b"late bytes").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut echoed = String::new();
    tokio::time::timeout(STEP, stream.read_to_string(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(echoed, "early bytes|late bytes");
}

/// A CONNECT to a port of `http_ports` only (undici tunnels `http://` URLs
/// so): plain HTTP naming the CONNECT host is served, request by request;
/// a request naming another host (first or later), or bytes that are not an
/// HTTP request, close the tunnel.
#[tokio::test]
async fn plain_http_in_a_tunnel_must_name_the_connect_host() {
    let dns = start_dns(&[("origin.test", &["127.0.0.1"])]).await;
    let origin = start_http_origin().await;
    let port = origin.port();
    let proxy = start_proxy(&format!(
        "dns:\n  nameservers: [\"{}\"]\ntimeouts:\n  request_header: 1s\nallow_ranges: [127.0.0.1/32]\ndeny_message: \"ask in #egress\"\nroles:\n  default:\n    allow:\n      domains: [origin.test]\n      http_ports: [{port}]\n      connect_ports: [443]\n",
        dns.addr
    ))
    .await;
    let authority = format!("origin.test:{port}");
    let (resp, mut stream) = connect(proxy, &authority).await;
    assert_eq!(resp.status, 200);
    stream.write_all(format!("GET /headers HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes()).await.unwrap();
    let relayed = read_response(&mut stream).await;
    assert_eq!(relayed.status, 200);
    assert!(relayed.text().starts_with("GET /headers\n"), "{}", relayed.text());
    // The same tunnel carries more requests, each checked.
    stream.write_all(format!("POST /echo HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 5\r\n\r\nhello").as_bytes()).await.unwrap();
    let echoed = read_response(&mut stream).await;
    assert_eq!((echoed.status, echoed.text().as_str()), (200, "hello"));
    stream.write_all(b"GET /headers HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n").await.unwrap();
    let later = read_response(&mut stream).await;
    assert_eq!((later.status, later.header("x-portcullis-deny")), (403, Some("host-mismatch")));
    assert_eq!(later.header("connection"), Some("close"));
    let expected_end = format!("port: {port}\nrole: default\nask in #egress\n");
    assert!(later.text().ends_with(&expected_end), "{}", later.text());

    let (_, mut stream) = connect(proxy, &authority).await;
    stream.write_all(b"GET /headers HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n").await.unwrap();
    let refused = read_response(&mut stream).await;
    assert_eq!((refused.status, refused.header("x-portcullis-deny")), (403, Some("host-mismatch")));
    assert_eq!(refused.reason, "Forbidden (portcullis: host-mismatch)");

    let (_, mut stream) = connect(proxy, &authority).await;
    stream.write_all(b"\x16\x03\x01\x00\x05hello").await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(STEP, stream.read_to_end(&mut rest)).await.expect("closed in time");
    assert!(read.is_err() || rest.is_empty(), "not-http: closed without an answer, got {rest:?}");

    // A port in neither list is still refused before any tunnel.
    let (resp, _) = connect(proxy, "origin.test:8443").await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("port-not-allowed")));
}

/// The deny body names the code, the target as parsed and the role, with
/// the operator's line (the role's own over the global one); as JSON when
/// Accept asks. Failures carry no operator line.
#[tokio::test]
async fn deny_bodies_in_text_and_json_with_the_operators_line() {
    let proxy = start_proxy(
        "deny_message: \"ask in #egress\"\nroles:\n  default:\n    deny_message: \"default role: file a ticket\"\n    allow:\n      domains: [allowed.example]\n",
    )
    .await;
    // Userinfo in the URI is refused as an invalid target, and not echoed.
    let with_userinfo = "GET http://user:secret@denied.example/private?token=1 HTTP/1.1\r\nHost: denied.example\r\nAccept: application/json\r\n\r\n";
    let invalid = send_raw(proxy, with_userinfo).await;
    assert_eq!(invalid.status, 400);
    assert!(!invalid.text().contains("secret") && !invalid.text().contains("token"), "{}", invalid.text());
    let request = "GET http://denied.example/private?token=1 HTTP/1.1\r\nHost: denied.example\r\nAccept: text/html, application/json\r\n\r\n";
    let resp = send_raw(proxy, request).await;
    assert_eq!(resp.status, 403);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    let body: serde_json::Value = serde_json::from_slice(&resp.body).expect("a JSON body");
    assert_eq!(
        body,
        serde_json::json!({
            "reason": "not-allowlisted",
            "message": "destination denied by policy",
            "host": "denied.example",
            "port": 80,
            "role": "default",
            "deny_message": "default role: file a ticket",
        })
    );
    let text = get(proxy, "http://denied.example/private?token=1").await;
    assert_eq!(text.header("content-type"), Some("text/plain; charset=utf-8"));
    assert!(text.text().ends_with("role: default\ndefault role: file a ticket\n"), "{}", text.text());
    assert!(!text.text().contains("private") && !text.text().contains("token"), "{}", text.text());
}

/// A plain-HTTP tunnel whose origin switches protocols (101) goes on as a
/// raw tunnel in both directions.
#[tokio::test]
async fn plain_http_tunnel_relays_an_upgrade() {
    let dns = start_dns(&[("origin.test", &["127.0.0.1"])]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await.unwrap() == 0 {
                return;
            }
            head.push(byte[0]);
        }
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\nhi").await.unwrap();
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    });
    let proxy = start_proxy(&format!(
        "dns:\n  nameservers: [\"{}\"]\nallow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    allow:\n      domains: [origin.test]\n      http_ports: [{port}]\n",
        dns.addr
    ))
    .await;
    let (resp, mut stream) = connect(proxy, &format!("origin.test:{port}")).await;
    assert_eq!(resp.status, 200);
    stream
        .write_all(format!("GET /ws HTTP/1.1\r\nHost: origin.test:{port}\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let switched = read_response(&mut stream).await;
    assert_eq!(switched.status, 101);
    let mut greeting = [0u8; 2];
    tokio::time::timeout(STEP, stream.read_exact(&mut greeting)).await.unwrap().unwrap();
    assert_eq!(&greeting, b"hi");
    stream.write_all(b"echo me").await.unwrap();
    let mut echoed = [0u8; 7];
    tokio::time::timeout(STEP, stream.read_exact(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(&echoed, b"echo me");
}

/// A plain-HTTP tunnel whose client stalls mid-body is closed after
/// `timeouts.tunnel_idle`, like a raw tunnel.
#[tokio::test]
async fn plain_http_tunnel_with_a_stalled_body_is_closed_when_idle() {
    let dns = start_dns(&[("origin.test", &["127.0.0.1"])]).await;
    let origin = start_http_origin().await;
    let port = origin.port();
    let proxy = start_proxy(&format!(
        "dns:\n  nameservers: [\"{}\"]\ntimeouts:\n  tunnel_idle: 300ms\nallow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    allow:\n      domains: [origin.test]\n      http_ports: [{port}]\n",
        dns.addr
    ))
    .await;
    let (_, mut stream) = connect(proxy, &format!("origin.test:{port}")).await;
    let started = std::time::Instant::now();
    stream
        .write_all(format!("POST /echo HTTP/1.1\r\nHost: origin.test:{port}\r\nContent-Length: 10\r\n\r\nab").as_bytes())
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(STEP, stream.read_to_end(&mut rest)).await.expect("closed within the step");
    assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());
}
