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
