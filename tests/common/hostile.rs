//! Hostile peers for the hardening tests: a DNS server whose answers are
//! scripted per query, origins that misbehave in one precise way, and the
//! proxy started with access to its metrics. Everything binds loopback.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

use portcullis::config::Config;
use portcullis::metrics::Metrics;
use portcullis::proxy::Server;

/// Starts the proxy like `common::start_proxy`, also returning its metrics.
pub async fn start_proxy_with_metrics(yaml: &str) -> (SocketAddr, Arc<Metrics>) {
    let yaml = format!("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n{yaml}");
    let config = Config::from_yaml_str(&yaml, "test.yaml").expect("test config is valid");
    let server = Server::bind(&config).await.expect("bind proxy");
    let addr = server.local_addr().expect("bound");
    let metrics = server.metrics();
    tokio::spawn(server.run());
    (addr, metrics)
}

/// Polls `check` every 10 ms until it holds; panics after `within`.
pub async fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One resource record in a scripted answer.
#[derive(Debug, Clone)]
pub enum Rr {
    /// An A or AAAA record (by the address family), with its TTL.
    Addr(&'static str, u32),
    /// A CNAME to another name, with its TTL.
    Cname(&'static str, u32),
}

/// The answers for one name: the n-th query for the name (per record type)
/// gets `answers[n]`, and every later query the last one.
pub struct Script {
    pub name: &'static str,
    pub answers: Vec<Vec<Rr>>,
}

/// A DNS server on loopback (UDP and TCP on the same port) answering from
/// scripts. With `silent`, it reads every query and never answers.
pub struct ScriptedDns {
    pub addr: SocketAddr,
    /// Queries received, as (lower-case name with trailing dot, "A"/"AAAA"/...).
    pub log: Arc<Mutex<Vec<(String, String)>>>,
}

impl ScriptedDns {
    /// How many queries of type `rtype` were received for `name`.
    pub fn count(&self, name: &str, rtype: &str) -> usize {
        let fqdn = format!("{name}.");
        self.log.lock().unwrap().iter().filter(|(n, t)| *n == fqdn && t == rtype).count()
    }
}

pub async fn start_scripted_dns(scripts: Vec<Script>, silent: bool) -> ScriptedDns {
    let (udp, tcp) = bind_udp_and_tcp().await;
    let addr = udp.local_addr().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let scripts: Arc<HashMap<String, Vec<Vec<Rr>>>> =
        Arc::new(scripts.into_iter().map(|s| (format!("{}.", s.name), s.answers)).collect());
    let seen: Arc<Mutex<HashMap<(String, String), usize>>> = Arc::default();
    // TCP: hold connections open without answering (silent), or refuse by closing.
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = tcp.accept().await {
            if silent && held.len() < 64 {
                held.push(stream);
            }
        }
    });
    let log2 = log.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = udp.recv_from(&mut buf).await else { return };
            let Some(reply) = answer(&buf[..n], &scripts, &seen, &log2) else { continue };
            if !silent {
                let _ = udp.send_to(&reply, peer).await;
            }
        }
    });
    ScriptedDns { addr, log }
}

/// A UDP socket and a TCP listener on the same loopback port.
async fn bind_udp_and_tcp() -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let socket = TcpSocket::new_v4().unwrap();
        if socket.bind(addr).is_ok() {
            if let Ok(tcp) = socket.listen(16) {
                return (udp, tcp);
            }
        }
    }
    panic!("no loopback port free for both UDP and TCP");
}

fn answer(
    query: &[u8],
    scripts: &HashMap<String, Vec<Vec<Rr>>>,
    seen: &Mutex<HashMap<(String, String), usize>>,
    log: &Mutex<Vec<(String, String)>>,
) -> Option<Vec<u8>> {
    use hickory_proto::op::{Message, MessageType, ResponseCode};
    use hickory_proto::rr::{rdata, Name, RData, Record, RecordType};

    let query = Message::from_vec(query).ok()?;
    let mut reply = Message::new();
    reply.set_id(query.id()).set_message_type(MessageType::Response).set_recursion_available(true);
    reply.set_recursion_desired(query.recursion_desired());
    let mut known = false;
    for q in query.queries() {
        reply.add_query(q.clone());
        let name = q.name().to_ascii().to_lowercase();
        let rtype = q.query_type().to_string();
        log.lock().unwrap().push((name.clone(), rtype.clone()));
        let Some(answers) = scripts.get(&name) else { continue };
        known = true;
        let n = {
            let mut seen = seen.lock().unwrap();
            let n = seen.entry((name.clone(), rtype)).or_insert(0);
            *n += 1;
            *n - 1
        };
        let Some(rrs) = answers.get(n).or(answers.last()) else { continue };
        let mut owner = q.name().clone();
        for rr in rrs {
            match rr {
                Rr::Cname(target, ttl) => {
                    let target = Name::from_ascii(format!("{target}.")).ok()?;
                    reply.add_answer(Record::from_rdata(owner.clone(), *ttl, RData::CNAME(rdata::CNAME(target.clone()))));
                    owner = target;
                }
                Rr::Addr(ip, ttl) => {
                    let rdata = match (ip.parse::<IpAddr>().ok()?, q.query_type()) {
                        (IpAddr::V4(v4), RecordType::A) => RData::A(rdata::A(v4)),
                        (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(rdata::AAAA(v6)),
                        _ => continue,
                    };
                    reply.add_answer(Record::from_rdata(owner.clone(), *ttl, rdata));
                }
            }
        }
    }
    if !known {
        reply.set_response_code(ResponseCode::NXDomain);
    }
    reply.to_vec().ok()
}

/// What a hostile origin does with each connection it accepts.
#[derive(Debug, Clone, Copy)]
pub enum Misbehaviour {
    /// Reads the request head, then never answers.
    Stall,
    /// Reads the request head, then closes without a byte.
    CloseEarly,
    /// Sends a head announcing 1 MiB, 1000 bytes of it, then a TCP reset.
    ResetMidBody,
    /// Sends a head announcing 1 MiB, 1000 bytes of it, then nothing.
    StallMidBody,
    /// Sends a response head with one header of this many bytes.
    GiantHeader(usize),
}

/// An origin on loopback that misbehaves as told; counts accepted connections.
pub async fn start_hostile_origin(how: Misbehaviour) -> (SocketAddr, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(Mutex::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            *counter.lock().unwrap() += 1;
            tokio::spawn(misbehave(stream, how));
        }
    });
    (addr, accepted)
}

async fn misbehave(mut stream: TcpStream, how: Misbehaviour) {
    if read_head(&mut stream).await.is_none() {
        return;
    }
    match how {
        Misbehaviour::Stall => {
            // Hold the connection (bounded) and say nothing.
            let mut sink = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(30), async {
                while stream.read(&mut sink).await.unwrap_or(0) > 0 {}
            })
            .await;
        }
        Misbehaviour::CloseEarly => drop(stream),
        Misbehaviour::ResetMidBody => {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n").await;
            let _ = stream.write_all(&[b'x'; 1000]).await;
            let _ = stream.flush().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            #[allow(deprecated)] // blocking on drop is the point: send RST now
            let _ = stream.set_linger(Some(Duration::ZERO));
            drop(stream);
        }
        Misbehaviour::StallMidBody => {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n").await;
            let _ = stream.write_all(&[b'x'; 1000]).await;
            let mut sink = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(30), async {
                while stream.read(&mut sink).await.unwrap_or(0) > 0 {}
            })
            .await;
        }
        Misbehaviour::GiantHeader(size) => {
            let head = format!("HTTP/1.1 200 OK\r\nx-giant: {}\r\ncontent-length: 2\r\n\r\nok", "a".repeat(size));
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(head.as_bytes())).await;
        }
    }
}

/// Reads up to the end of a request head (bounded), returning it.
pub async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(10), async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 1 << 20 {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Some(())
    })
    .await
    .ok()??;
    Some(head)
}

/// A TCP origin that records every byte it receives per connection; the
/// log has one entry per accepted connection, updated as bytes arrive.
pub async fn start_recording_origin() -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let conns = log.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let index = {
                let mut conns = conns.lock().unwrap();
                conns.push(Vec::new());
                conns.len() - 1
            };
            let conns = conns.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::time::timeout(Duration::from_secs(30), async {
                    loop {
                        let n = stream.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        conns.lock().unwrap()[index].extend_from_slice(&buf[..n]);
                        let _ = stream.write_all(b"ack").await;
                    }
                })
                .await;
            });
        }
    });
    (addr, log)
}

/// Reads until EOF or error (bounded by `within`); returns what arrived and
/// whether the stream ended (EOF or reset) in time.
pub async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let ended = tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (got, ended)
}

/// An HTTP origin that logs each request head (`METHOD URI` then
/// `name: value` lines, lower-case) and answers `ok`. With `collect`, it
/// reads the whole request body before answering `got N bytes`.
pub async fn start_logging_origin(collect: bool) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    use http_body_util::{BodyExt, Full};

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let heads = log.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let heads = heads.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let heads = heads.clone();
                    async move {
                        let mut text = format!("{} {}\n", req.method(), req.uri());
                        for (name, value) in req.headers() {
                            text.push_str(&format!("{}: {}\n", name, value.to_str().unwrap_or("<binary>")));
                        }
                        heads.lock().unwrap().push(text.to_lowercase());
                        let answer = if collect {
                            let body = req.into_body().collect().await.map(|b| b.to_bytes().len());
                            format!("got {} bytes", body.unwrap_or(0))
                        } else {
                            "ok".to_string()
                        };
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(bytes::Bytes::from(answer))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, log)
}

/// ClientHello bytes exactly as a real TLS client (rustls) sends them for `name`.
pub fn rustls_client_hello(name: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).expect("valid server name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("writing to a Vec cannot fail");
    }
    out
}

/// A minimal hand-encoded ClientHello without any extension (so no SNI).
pub fn client_hello_without_sni() -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    let mut msg = vec![1, 0, 0, body.len() as u8];
    msg.extend_from_slice(&body);
    let mut record = vec![22, 3, 1, 0, msg.len() as u8];
    record.extend_from_slice(&msg);
    record
}
