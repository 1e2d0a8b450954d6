//! Routing for real networks through real sockets: Happy Eyeballs dialing,
//! pinned names and name-bound carve-outs.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A listener on `addr` whose accept queue is full and never drained: the
/// kernel drops further SYNs, so a connect to it hangs (a blackhole on
/// loopback, no netfilter needed). Keep the returned values alive.
async fn blackhole(addr: SocketAddr) -> (TcpListener, Vec<TcpStream>) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(addr).unwrap();
    let listener = socket.listen(0).unwrap();
    let mut queued = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => queued.push(s),
            _ => break,
        }
    }
    let probe = tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await;
    assert!(probe.is_err(), "the blackhole must not take another connection");
    (listener, queued)
}

/// A name whose first address never answers and whose second works is
/// reached after the stagger delay, not after the whole connect timeout.
#[tokio::test]
async fn a_blackholed_first_address_costs_only_the_stagger() {
    let origin = start_http_origin().await;
    let port = origin.port();
    let _hole = blackhole(SocketAddr::from(([127, 0, 0, 2], port))).await;
    let dns = start_dns(&[("eyeballs.test", &["127.0.0.2", "127.0.0.1"])]).await;
    let proxy = start_proxy(&format!(
        "dns:\n  nameservers: [\"{}\"]\n  timeout: 1s\ntimeouts:\n  upstream_connect: 8s\n  connect_stagger: 250ms\n\
         allow_ranges: [127.0.0.0/8]\nroles:\n  default:\n    allow:\n      domains: [eyeballs.test]\n      http_ports: [{port}]\n",
        dns.addr
    ))
    .await;
    let started = Instant::now();
    let resp = get(proxy, &format!("http://eyeballs.test:{port}/headers")).await;
    let took = started.elapsed();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(took < Duration::from_millis(250 + 1500), "took {took:?}; the connect timeout is 8 s");
    assert!(took >= Duration::from_millis(250), "took {took:?}: the second address waits for the stagger");
}

/// A carve-out bound to a name admits that name on its port and nothing
/// else: not the IP literal, not another name resolving to the same
/// address, not another port.
#[tokio::test]
async fn a_name_bound_carve_out_admits_only_its_name() {
    let (origin, other) = (start_http_origin().await, start_http_origin().await);
    let (port, other_port) = (origin.port(), other.port());
    let dns = start_dns(&[("vault.test", &["127.0.0.1"]), ("alias.test", &["127.0.0.1"])]).await;
    let proxy = start_proxy(&format!(
        "dns:\n  nameservers: [\"{dns}\"]\n  timeout: 1s\n\
         allow_ranges:\n  - {{cidr: 127.0.0.0/8, domains: [vault.test], ports: [{port}]}}\n\
         roles:\n  default:\n    allow:\n      domains: [vault.test, alias.test]\n      cidrs: [127.0.0.0/8]\n      http_ports: [{port}, {other_port}]\n",
        dns = dns.addr
    ))
    .await;
    let resp = get(proxy, &format!("http://vault.test:{port}/headers")).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    for url in [
        format!("http://127.0.0.1:{port}/"),
        format!("http://alias.test:{port}/"),
        format!("http://vault.test:{other_port}/"),
    ] {
        let resp = get(proxy, &url).await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("denied-range:loopback")), "{url}");
    }
}

/// Pinned names are answered from config without a DNS query, and their
/// answers are checked like any other.
#[tokio::test]
async fn pinned_names_need_no_dns_and_are_still_checked() {
    let origin = start_http_origin().await;
    let port = origin.port();
    let dns = start_dns(&[("pinned.test", &["127.0.0.9"])]).await;
    let proxy = start_proxy(&format!(
        "dns:\n  nameservers: [\"{dns}\"]\n  timeout: 1s\n  static:\n    pinned.test: [127.0.0.1]\n    PINNED-meta.test.: [169.254.169.254]\n\
         allow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    allow:\n      domains: [\"*.test\"]\n      http_ports: [{port}, 80]\n",
        dns = dns.addr
    ))
    .await;
    let resp = get(proxy, &format!("http://pinned.test:{port}/headers")).await;
    assert_eq!(resp.status, 200, "answered by the pin (the DNS server would say 127.0.0.9): {}", resp.text());
    let resp = get(proxy, "http://pinned-meta.test/").await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("denied-range:metadata")));
    assert!(dns.queries.lock().unwrap().is_empty(), "no query: {:?}", dns.queries.lock().unwrap());
}
