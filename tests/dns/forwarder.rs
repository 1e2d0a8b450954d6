//! The listener's UDP forwarder loop through real sockets: many queries in
//! flight from many clients, failover from a nameserver that never answers,
//! forged and late answers, and the rotation of upstream sockets.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{rdata, Name, RData, Record, RecordType};
use portcullis::dns_listen::UPSTREAM_SOCKET_USES;
use tokio::net::UdpSocket;

use super::common::STEP;
use super::{config, records, start, until, upstream};

/// Limits high enough for every test client (all on 127.0.0.1) at once.
const LIMITS: &str = "  listener: {max_in_flight: 512, max_in_flight_per_client: 512, max_queries_per_second_per_client: 100000}\n";

/// A query for `name` A under `id`, recursion desired.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The next datagram on `socket`: its id, code and A addresses.
async fn reply(socket: &UdpSocket) -> (u16, ResponseCode, Vec<String>) {
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(STEP, socket.recv(&mut buf)).await.expect("a reply in time").unwrap();
    let message = Message::from_vec(&buf[..n]).expect("a DNS message");
    let addrs = message.answers().iter().filter_map(|r| match r.data() { RData::A(a) => Some(a.0.to_string()), _ => None }).collect();
    (message.id(), message.response_code(), addrs)
}

async fn client(dns: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(dns).await.unwrap();
    socket
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_queries_in_flight_from_many_clients_are_each_answered_under_their_own_id() {
    const CLIENTS: u16 = 8;
    const EACH: u16 = 8;
    let up = upstream::start(&records()).await;
    let dns = start("forwarder-many", &config("127.0.0.1:0", up.addr, LIMITS)).await.dns;
    let mut sockets = Vec::new();
    for _ in 0..CLIENTS {
        sockets.push(client(dns).await);
    }
    // Every query leaves before any reply is read; each name has its own answer.
    for (c, socket) in (0u16..).zip(&sockets) {
        for q in 0..EACH {
            socket.send(&query(c << 8 | q, &format!("ip-11-0-{c}-{q}.allowed.test"))).await.unwrap();
        }
    }
    for (c, socket) in (0u16..).zip(&sockets) {
        let mut got = Vec::new();
        for _ in 0..EACH {
            let (id, rcode, addrs) = reply(socket).await;
            assert_eq!(rcode, ResponseCode::NoError, "query {id:#x}");
            got.push((id, addrs));
        }
        got.sort();
        let want: Vec<(u16, Vec<String>)> = (0..EACH).map(|q| (c << 8 | q, vec![format!("11.0.{c}.{q}")])).collect();
        assert_eq!(got, want, "client {c}: every reply under its query's id, with its own answer");
    }
    assert_eq!(up.seen().len(), usize::from(CLIENTS * EACH), "each asked upstream once: {:?}", up.seen());
}

/// The first nameserver never answers: each query is asked of the second
/// when its deadline passes, and one that no nameserver answers gets
/// SERVFAIL (`upstream-timeout`) without holding up the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_nameserver_fails_over_and_a_query_past_every_one_gets_servfail() {
    let up = upstream::start(&records()).await;
    let hole = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let heard: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = heard.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = hole.recv(&mut buf).await {
            if let Some(q) = Message::from_vec(&buf[..n]).ok().and_then(|m| m.queries().first().cloned()) {
                log.lock().unwrap().push(q.name().to_ascii());
            }
        }
    });
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\ndns_listen: 127.0.0.1:0\n\
         dns:\n  nameservers: [\"{hole_addr}\", \"{}\"]\n  timeout: 1s\n{LIMITS}\
         roles:\n  default:\n    allow:\n      domains: [allowed.test, \"*.allowed.test\"]\n",
        up.addr
    );
    let running = start("forwarder-failover", &yaml).await;
    let socket = client(running.dns).await;
    socket.send(&query(1, "silent.1.allowed.test")).await.unwrap();
    socket.send(&query(2, "allowed.test")).await.unwrap();
    assert_eq!(reply(&socket).await, (2, ResponseCode::NoError, vec!["11.0.0.10".to_string()]), "answered by the second nameserver");
    assert_eq!(reply(&socket).await, (1, ResponseCode::ServFail, vec![]), "no nameserver answered");
    until("the silent nameserver to have heard both", async || heard.lock().unwrap().len() == 2).await;
    assert_eq!(*heard.lock().unwrap(), ["silent.1.allowed.test.", "allowed.test."]);
    assert_eq!((up.count("allowed.test", "A"), up.count("silent.1.allowed.test", "A")), (1, 1), "{:?}", up.seen());
    let metrics = running.metrics().await;
    for series in [
        "portcullis_dns_queries_total{decision=\"error\",qtype=\"A\",reason=\"upstream-timeout\",role=\"default\"} 1",
        "portcullis_dns_queries_total{decision=\"allow\",qtype=\"A\",reason=\"domain\",role=\"default\"} 1",
        "portcullis_dns_upstream_duration_seconds_count 2",
    ] {
        assert!(metrics.contains(series), "{series} missing from\n{metrics}");
    }
}

/// An answer `rewrite` made from the query `asked`, with one A record.
fn answer(asked: &Message, addr: [u8; 4], rewrite: impl FnOnce(&mut Message)) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(asked.id()).set_message_type(MessageType::Response).set_recursion_available(true);
    let q = asked.queries()[0].clone();
    m.add_answer(Record::from_rdata(q.name().clone(), 60, RData::A(rdata::A(addr.into()))));
    m.add_query(q);
    rewrite(&mut m);
    m.to_vec().unwrap()
}

/// Before each true answer the nameserver sends answers under another id,
/// for another question, a query instead of a response, and the true
/// answer from another port; after it a late duplicate. The client only
/// ever sees the true answer, once, under its own id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_late_answers_are_ignored() {
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server_addr = server.local_addr().unwrap();
    let other_port = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok((n, listener)) = server.recv_from(&mut buf).await {
            let Ok(asked) = Message::from_vec(&buf[..n]) else { continue };
            let _ = other_port.send_to(&answer(&asked, [11, 0, 0, 69], |_| {}), listener).await;
            let forged = [
                answer(&asked, [11, 0, 0, 66], |m| {
                    m.set_id(asked.id() ^ 1);
                }),
                answer(&asked, [11, 0, 0, 67], |m| {
                    let other = Query::query(Name::from_ascii("other.allowed.test.").unwrap(), RecordType::A);
                    *m.queries_mut() = vec![other];
                }),
                answer(&asked, [11, 0, 0, 70], |m| {
                    m.set_message_type(MessageType::Query);
                }),
                answer(&asked, [11, 0, 0, 10], |_| {}),
                answer(&asked, [11, 0, 0, 68], |_| {}),
            ];
            for datagram in forged {
                let _ = server.send_to(&datagram, listener).await;
            }
        }
    });
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\ndns_listen: 127.0.0.1:0\n\
         dns:\n  nameservers: [\"{server_addr}\"]\n  timeout: 5s\n{LIMITS}\
         roles:\n  default:\n    allow:\n      domains: [allowed.test]\n"
    );
    let dns = start("forwarder-forged", &yaml).await.dns;
    let socket = client(dns).await;
    // Each reply read is the next query's: a stray one from a late
    // duplicate would arrive first.
    for id in 7..10 {
        socket.send(&query(id, "allowed.test")).await.unwrap();
        assert_eq!(reply(&socket).await, (id, ResponseCode::NoError, vec!["11.0.0.10".to_string()]));
    }
}

/// Sequential queries share an upstream socket until it has carried
/// `UPSTREAM_SOCKET_USES`, then move to one on a fresh port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_port_serves_a_bounded_number_of_queries() {
    let up = upstream::start(&records()).await;
    let dns = start("forwarder-rotation", &config("127.0.0.1:0", up.addr, LIMITS)).await.dns;
    let socket = client(dns).await;
    let uses = UPSTREAM_SOCKET_USES as usize;
    let total = 3 * uses + 1;
    for id in 0..total as u16 {
        socket.send(&query(id, "allowed.test")).await.unwrap();
        assert_eq!(reply(&socket).await, (id, ResponseCode::NoError, vec!["11.0.0.10".to_string()]));
    }
    let ports = up.ports();
    assert_eq!(ports.len(), total);
    let mut per_port: HashMap<u16, usize> = HashMap::new();
    for port in ports {
        *per_port.entry(port).or_default() += 1;
    }
    assert!(per_port.values().all(|&n| n <= uses), "a port served more than {uses}: {per_port:?}");
    assert!(per_port.len() >= 4, "{per_port:?}");
    assert!(per_port.values().any(|&n| n == uses), "a socket is shared up to its bound: {per_port:?}");
}
