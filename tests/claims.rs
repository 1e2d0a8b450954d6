//! The security claims of README.md and SECURITY.md that other files prove
//! only in-process, proved again through the real binary and a real socket
//! (SECURITY.md, "Claims and the tests that prove them"). Each test is one
//! claim; the origins and name servers are in-process and record what
//! reaches them, so a negative check counts connections and queries rather
//! than trusting a status code.

mod common;
#[path = "common/hostile.rs"]
mod hostile;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use hostile::{read_until_closed, rustls_client_hello, start_logging_origin, start_recording_origin, start_scripted_dns, Rr, Script};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A role that may reach `*.test` and 127.0.0.1 on `ports`, with name servers.
fn policy(dns: Option<SocketAddr>, ports: &[u16], extra: &str) -> String {
    let ports = ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
    let dns = dns.map(|a| format!("dns:\n  nameservers: [\"{a}\"]\n  timeout: 300ms\n")).unwrap_or_default();
    format!(
        "{dns}{extra}allow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    allow:\n      domains: [\"*.test\"]\n      \
         cidrs: [127.0.0.1/32]\n      http_ports: [{ports}]\n      connect_ports: [{ports}]\n"
    )
}

async fn dials(proxy: &BinaryProxy) -> f64 {
    metric_value(&proxy.metrics().await, "portcullis_upstream_connect_duration_seconds_count")
}

/// Spellings some resolvers read as IPv4 and zone ids are 400
/// `invalid-target`; metadata and loopback names are 403 `denied-name`
/// before any query; nothing is dialed and the name server hears nothing.
#[tokio::test]
async fn ip_spellings_and_denied_names_are_refused_before_any_lookup() {
    let dns = start_dns(&[("localhost", &["127.0.0.1"]), ("metadata.google.internal", &["127.0.0.1"])]).await;
    let proxy = BinaryProxy::spawn(&temp_file("claims", "spellings.yaml", ""), &policy(Some(dns.addr), &[80, 443], "")).await;
    for host in ["2852039166", "0xA9FEA9FE", "0251.0376.0251.0376", "169.254.43518", "127.1", "010.0.0.1", "[fe80::1%25eth0]"] {
        let resp = get(proxy.addr, &format!("http://{host}/")).await;
        assert_eq!((resp.status, resp.header("x-portcullis-error")), (400, Some("invalid-target")), "GET {host}");
        let (resp, _) = connect(proxy.addr, &format!("{host}:443")).await;
        assert_eq!(resp.status, 400, "CONNECT {host}");
    }
    for (name, reason) in [
        ("localhost", "denied-name:loopback"),
        ("api.localhost", "denied-name:loopback"),
        ("metadata.google.internal", "denied-name:metadata"),
        ("metadata", "denied-name:metadata"),
        ("instance-data", "denied-name:metadata"),
    ] {
        let resp = get(proxy.addr, &format!("http://{name}/")).await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some(reason)), "GET {name}");
        let (resp, _) = connect(proxy.addr, &format!("{name}:443")).await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some(reason)), "CONNECT {name}");
    }
    assert!(dns.queries.lock().unwrap().is_empty(), "no lookup: {:?}", dns.queries.lock().unwrap());
    assert_eq!(dials(&proxy).await, 0.0, "nothing dialed");
}

/// DNS rebinding (an allowed answer, then a metadata one, TTL 0), mixed
/// answers and CNAME chains into denied addresses, and a silent name
/// server: each request resolves once, checks every answer, and dials only
/// what it checked; a failed lookup is 502, never a dial.
#[tokio::test]
async fn dns_answers_are_checked_once_and_only_checked_addresses_are_dialed() {
    let dns = start_scripted_dns(
        vec![
            Script { name: "rebind.test", answers: vec![vec![Rr::Addr("127.0.0.1", 0)], vec![Rr::Addr("169.254.169.254", 0)]] },
            Script { name: "mixed.test", answers: vec![vec![Rr::Addr("127.0.0.1", 1), Rr::Addr("169.254.169.254", 1)]] },
            Script { name: "mixed-v6.test", answers: vec![vec![Rr::Addr("127.0.0.1", 1), Rr::Addr("fd00:ec2::254", 1)]] },
            Script { name: "chain.test", answers: vec![vec![Rr::Cname("hop.test", 1), Rr::Addr("10.1.2.3", 1)]] },
        ],
        false,
    )
    .await;
    let silent = start_scripted_dns(vec![Script { name: "slow.test", answers: vec![vec![Rr::Addr("127.0.0.1", 60)]] }], true).await;
    let (origin, heads) = start_logging_origin(false).await;
    let port = origin.port();
    let proxy = BinaryProxy::spawn(&temp_file("claims", "dns.yaml", ""), &policy(Some(dns.addr), &[port], "")).await;
    let url = format!("http://rebind.test:{port}/");
    assert_eq!(get(proxy.addr, &url).await.status, 200);
    for _ in 0..2 {
        let resp = get(proxy.addr, &url).await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("denied-range:metadata")));
        let (resp, _) = connect(proxy.addr, &format!("rebind.test:{port}")).await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("denied-range:metadata")));
    }
    assert_eq!(dns.count("rebind.test", "A"), 5, "one lookup per request, none at dial time");
    for (name, reason) in [("mixed.test", "denied-range:metadata"), ("mixed-v6.test", "denied-range:metadata"), ("chain.test", "denied-range:private")] {
        let resp = get(proxy.addr, &format!("http://{name}:{port}/")).await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some(reason)), "GET {name}");
        let (resp, _) = connect(proxy.addr, &format!("{name}:{port}")).await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some(reason)), "CONNECT {name}");
    }
    assert_eq!(heads.lock().unwrap().len(), 1, "only the checked request reached the origin");
    assert_eq!(dials(&proxy).await, 1.0, "exactly one dial");

    let dead = BinaryProxy::spawn(&temp_file("claims", "dead-dns.yaml", ""), &policy(Some(silent.addr), &[port], "")).await;
    let resp = get(dead.addr, &format!("http://slow.test:{port}/")).await;
    assert_eq!((resp.status, resp.header("x-portcullis-error")), (502, Some("resolve-failed")));
    assert!(silent.count("slow.test", "A") >= 1, "the server was asked");
    assert_eq!(dials(&dead).await, 0.0, "a failed lookup dials nothing");
}

/// Ambiguous framing is 400 and closes the connection, so a request
/// smuggled behind it never reaches the origin; the absolute-form URI, not
/// `Host`, decides the destination and the `Host` the origin sees; the
/// origin sees `Via` and no `X-Forwarded-For`.
#[tokio::test]
async fn smuggling_is_refused_and_the_uri_wins_over_host() {
    let (origin, heads) = start_logging_origin(false).await;
    let u = format!("http://127.0.0.1:{}", origin.port());
    let proxy = BinaryProxy::spawn(&temp_file("claims", "framing.yaml", ""), &policy(None, &[origin.port()], "")).await;
    let smuggled = format!("GET {u}/smuggled HTTP/1.1\r\nHost: x\r\n\r\n");
    for (name, request, code) in [
        ("CL.TE", format!("POST {u}/ HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"), Some("conflicting-framing")),
        ("two lengths", format!("POST {u}/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 41\r\n\r\nhello{smuggled}"), None),
        ("no Host", format!("GET {u}/ HTTP/1.1\r\n\r\n{smuggled}"), Some("missing-host")),
        ("two Hosts", format!("GET {u}/ HTTP/1.1\r\nHost: a.test\r\nHost: 169.254.169.254\r\n\r\n{smuggled}"), Some("duplicate-host")),
        ("CONNECT with a body", format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", origin.port()), Some("connect-with-body")),
    ] {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        let _ = stream.write_all(request.as_bytes()).await;
        let resp = read_response(&mut stream).await;
        assert_eq!((resp.status, resp.header("x-portcullis-error")), (400, code), "{name}");
        let (rest, closed) = read_until_closed(&mut stream, STEP).await;
        assert!(closed && rest.is_empty(), "{name}: closed, nothing after the 400: {:?}", String::from_utf8_lossy(&rest));
    }
    assert!(heads.lock().unwrap().is_empty(), "nothing reached the origin: {:?}", heads.lock().unwrap());

    let resp = send_raw(proxy.addr, &format!("GET {u}/a HTTP/1.1\r\nHost: metadata.google.internal\r\n\r\n")).await;
    assert_eq!(resp.status, 200);
    let seen = heads.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].matches("host: ").count(), 1, "{seen:?}");
    assert!(seen[0].contains(&format!("host: 127.0.0.1:{}\n", origin.port())), "Host from the URI: {seen:?}");
    // SECURITY.md, checklist: Via is added, X-Forwarded-For never is.
    assert!(seen[0].contains("\nvia: 1.1 portcullis-") && !seen[0].contains("x-forwarded-for"), "{seen:?}");
    let resp = send_raw(proxy.addr, &format!("GET http://169.254.169.254/ HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n", origin.port())).await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("denied-range:metadata")), "an allowed Host launders nothing");
    assert_eq!(heads.lock().unwrap().len(), 1);
}

/// A keep-alive origin on `addr` that answers every request with `tag` and
/// counts the connections it accepted.
async fn tagged_origin(addr: SocketAddr, tag: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                while hostile::read_head(&mut stream).await.is_some() {
                    let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{tag}", tag.len());
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// Upstream keep-alive connections are pooled by the checked address,
/// never by name: once a name's answer moves to another address, the next
/// request dials that address instead of reusing the connection to the old one.
#[tokio::test]
async fn pooled_connections_follow_the_checked_address_not_the_name() {
    let (old, old_conns) = tagged_origin("127.0.0.1:0".parse().unwrap(), "old").await;
    let (new, new_conns) = tagged_origin(SocketAddr::from(([127, 0, 0, 3], old.port())), "new").await;
    let dns = start_scripted_dns(
        vec![Script { name: "moving.test", answers: vec![vec![Rr::Addr("127.0.0.1", 0)], vec![Rr::Addr("127.0.0.3", 0)]] }],
        false,
    )
    .await;
    let yaml = format!(
        "dns:\n  nameservers: [\"{}\"]\nallow_ranges: [127.0.0.1/32, 127.0.0.3/32]\nroles:\n  default:\n    allow:\n      \
         domains: [moving.test]\n      http_ports: [{}]\n",
        dns.addr,
        old.port()
    );
    let proxy = BinaryProxy::spawn(&temp_file("claims", "pool.yaml", ""), &yaml).await;
    let url = format!("http://moving.test:{}/", old.port());
    assert_eq!(get(proxy.addr, &url).await.text(), "old");
    assert_eq!(dials(&proxy).await, 1.0);
    assert_eq!(get(proxy.addr, &url).await.text(), "new", "the name now answers 127.0.0.3: dialed there");
    assert_eq!((old_conns.load(Ordering::SeqCst), new_conns.load(Ordering::SeqCst)), (1, 1));
    assert_eq!(dials(&proxy).await, 2.0, "a new dial, not the pooled connection to 127.0.0.1");
    assert!(!proxy.lines_with(&[&format!("\"dialed\":\"{new}\"")], 1).await.is_empty(), "the decision line names {new}");
    assert_eq!(get(proxy.addr, &url).await.text(), "new");
    assert_eq!(dials(&proxy).await, 2.0, "the connection to 127.0.0.3 is pooled and reused");
}

/// A tunnel allowed by a domain rule relays only a ClientHello naming the
/// CONNECT host, and plain HTTP in a tunnel only while every request names
/// it: anything else is closed before a byte reaches the origin.
#[tokio::test]
async fn tunnels_relay_only_what_names_the_connect_host() {
    let dns = start_dns(&[("allowed.test", &["127.0.0.1"])]).await;
    let (origin, conns) = start_recording_origin().await;
    let port = origin.port();
    let proxy = BinaryProxy::spawn(&temp_file("claims", "sni.yaml", ""), &policy(Some(dns.addr), &[port], "")).await;
    let closed_without_a_byte = [
        ("SNI of another name", rustls_client_hello("forbidden.example")),
        ("SNI of a suffix", rustls_client_hello("test")),
        ("not TLS", b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()),
        ("plain HTTP naming another host", b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n".to_vec()),
        ("plain HTTP naming another port", b"GET / HTTP/1.1\r\nHost: allowed.test:1\r\n\r\n".to_vec()),
        ("plain HTTP with an absolute target naming another host", format!("GET http://other.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n").into_bytes()),
    ];
    for (name, bytes) in closed_without_a_byte {
        let (resp, mut tunnel) = connect(proxy.addr, &format!("allowed.test:{port}")).await;
        assert_eq!(resp.status, 200, "{name}");
        tunnel.write_all(&bytes).await.unwrap();
        let (_, closed) = read_until_closed(&mut tunnel, STEP).await;
        assert!(closed, "{name}: the tunnel is closed");
    }
    // Accepted connections are recorded as they come: not one byte went
    // through any of the dials.
    let got = conns.lock().unwrap().clone();
    assert!(got.iter().all(Vec::is_empty), "bytes reached the origin: {got:?}");
    for reason in ["sni-mismatch", "not-tls", "host-mismatch"] {
        assert!(!proxy.lines_with(&[&format!("\"reason\":\"{reason}\"")], 1).await.is_empty(), "{reason} logged");
    }
    let hello = rustls_client_hello("allowed.test");
    let (resp, mut tunnel) = connect(proxy.addr, &format!("allowed.test:{port}")).await;
    assert_eq!(resp.status, 200);
    tunnel.write_all(&hello).await.unwrap();
    hostile::eventually("the matching hello is relayed", STEP, || conns.lock().unwrap().iter().any(|c| c.as_slice() == hello.as_slice())).await;
}

/// `mode: report` lets an allow-list violation through as `would_deny`
/// but never an always-denied range or name.
#[tokio::test]
async fn report_mode_never_lifts_the_always_denied_ranges() {
    let (origin, heads) = start_logging_origin(false).await;
    let yaml = format!(
        "allow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    mode: report\n    allow:\n      domains: [nothing.example]\n      \
         http_ports: [80, {port}]\n      connect_ports: [443, {port}]\n",
        port = origin.port()
    );
    let proxy = BinaryProxy::spawn(&temp_file("claims", "report.yaml", ""), &yaml).await;
    let resp = get(proxy.addr, &format!("http://127.0.0.1:{}/", origin.port())).await;
    assert_eq!(resp.status, 200, "an allow-list violation passes in report mode");
    assert_eq!(proxy.lines_with(&["\"decision\":\"would_deny\""], 1).await.len(), 1);
    for (target, reason) in [
        ("169.254.169.254", "denied-range:metadata"),
        ("10.0.0.1", "denied-range:private"),
        ("[fd00:ec2::254]", "denied-range:metadata"),
        ("metadata.google.internal", "denied-name:metadata"),
    ] {
        let resp = get(proxy.addr, &format!("http://{target}/")).await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some(reason)), "GET {target}");
        let (resp, _) = connect(proxy.addr, &format!("{target}:443")).await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some(reason)), "CONNECT {target}");
    }
    assert_eq!(heads.lock().unwrap().len(), 1, "only the report-mode request reached the origin");
}

/// A client that opens connections and never finishes a head is cut off
/// after `request_header`, and one client's connections are bounded:
/// another client is served throughout.
#[tokio::test]
async fn slow_and_greedy_clients_cannot_hold_the_proxy() {
    let (origin, _) = start_logging_origin(false).await;
    let slowloris = "timeouts:\n  request_header: 500ms\n";
    let proxy = BinaryProxy::spawn(&temp_file("claims", "slow.yaml", ""), &policy(None, &[origin.port()], slowloris)).await;
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET http://127.0.0.1/ HTTP/1.1\r\nHost:").await.unwrap();
    let (_, closed) = read_until_closed(&mut slow, STEP).await;
    assert!(closed, "an unfinished head is cut off");

    let greedy = "limits:\n  max_connections_per_client: 2\n";
    let proxy = BinaryProxy::spawn(&temp_file("claims", "limits.yaml", ""), &policy(None, &[origin.port()], greedy)).await;
    let url = format!("http://127.0.0.1:{}/", origin.port());
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    let over = wait_until("the held connections are counted", || async {
        let resp = get(proxy.addr, &url).await;
        (resp.status == 503).then_some(resp)
    })
    .await;
    assert_eq!(over.header("x-portcullis-error"), Some("over-limit"));
    let other = tokio::net::TcpSocket::new_v4().unwrap();
    other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut other = other.connect(proxy.addr).await.unwrap();
    other.write_all(format!("GET {url} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut other).await.status, 200, "another client is served");
    drop(held);
    wait_until("the client is served again once its connections close", || async {
        (get(proxy.addr, &url).await.status == 200).then_some(())
    })
    .await;
}
