//! A test upstream resolver on loopback (UDP and TCP on one port) that
//! answers from a table and records every question it is asked, so a test
//! can prove that a refused name never reached it. Names under `tcp-only.`
//! are answered over UDP truncated (TC, no records), forcing TCP; names
//! under `silent.` are recorded and never answered (a query held in flight);
//! a name `ip-11-0-X-Y.` followed by anything is answered A 11.0.X.Y.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::svcb::{Alpn, EchConfigList, IpHint, SvcParamKey, SvcParamValue, SVCB};
use hickory_proto::rr::rdata::{self, HTTPS};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, UdpSocket};

/// One record the upstream serves.
#[derive(Clone, Debug)]
pub enum Rr {
    Addr(&'static str),
    Cname(&'static str),
    Txt(&'static str),
    /// An HTTPS record (priority 1, target "."), with `alpn=h2`, an
    /// `ipv4hint` and an `ech` parameter.
    Https { hint: &'static str },
}

/// The running upstream.
pub struct Upstream {
    pub addr: SocketAddr,
    /// Every question received: (lower-case name without the trailing dot, type).
    seen: Arc<Mutex<Vec<(String, String)>>>,
    /// The source port of every UDP query received, in order.
    ports: Arc<Mutex<Vec<u16>>>,
}

impl Upstream {
    /// Every question received, in order.
    pub fn seen(&self) -> Vec<(String, String)> {
        self.seen.lock().unwrap().clone()
    }

    /// True when any question named `name` (or a name under it) was received.
    pub fn saw_any_under(&self, name: &str) -> bool {
        let suffix = format!(".{name}");
        self.seen().iter().any(|(n, _)| n == name || n.ends_with(&suffix))
    }

    /// The source port of every UDP query received, in order.
    pub fn ports(&self) -> Vec<u16> {
        self.ports.lock().unwrap().clone()
    }

    /// How many questions for `name` of type `rtype` were received.
    pub fn count(&self, name: &str, rtype: &str) -> usize {
        self.seen().iter().filter(|(n, t)| n == name && t == rtype).count()
    }
}

type Table = HashMap<String, Vec<Rr>>;

/// Starts the upstream on 127.0.0.1 (an ephemeral port free for UDP and TCP).
pub async fn start(records: &[(&'static str, Rr)]) -> Upstream {
    start_on("127.0.0.1:0".parse().unwrap(), records).await
}

/// [`start`] on a given address.
pub async fn start_on(bind: SocketAddr, records: &[(&'static str, Rr)]) -> Upstream {
    let mut table: Table = HashMap::new();
    for (name, rr) in records {
        table.entry(name.to_string()).or_default().push(rr.clone());
    }
    let table = Arc::new(table);
    let (udp, tcp) = bind_both(bind).await;
    let addr = udp.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let (t, s) = (table.clone(), seen.clone());
    let tcp_seen = seen.clone();
    let ports: Arc<Mutex<Vec<u16>>> = Arc::default();
    let udp_ports = ports.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        loop {
            let Ok((n, peer)) = udp.recv_from(&mut buf).await else { return };
            udp_ports.lock().unwrap().push(peer.port());
            if let Some(reply) = answer(&buf[..n], &t, &s, true) {
                let _ = udp.send_to(&reply, peer).await;
            }
        }
    });
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = tcp.accept().await {
            let (t, s) = (table.clone(), tcp_seen.clone());
            tokio::spawn(async move {
                while let Ok(len) = stream.read_u16().await {
                    let mut buf = vec![0u8; usize::from(len)];
                    if stream.read_exact(&mut buf).await.is_err() {
                        return;
                    }
                    let Some(reply) = answer(&buf, &t, &s, false) else { return };
                    let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&reply);
                    if stream.write_all(&framed).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Upstream { addr, seen, ports }
}

async fn bind_both(bind: SocketAddr) -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind(bind).await.unwrap();
        let socket = TcpSocket::new_v4().unwrap();
        if socket.bind(udp.local_addr().unwrap()).is_ok() {
            if let Ok(tcp) = socket.listen(64) {
                return (udp, tcp);
            }
        }
    }
    panic!("no port free for both UDP and TCP");
}

fn answer(query: &[u8], table: &Table, seen: &Mutex<Vec<(String, String)>>, udp: bool) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    let q = query.queries().first()?.clone();
    let name = q.name().to_ascii().trim_end_matches('.').to_lowercase();
    seen.lock().unwrap().push((name.clone(), q.query_type().to_string()));
    if name.starts_with("silent.") {
        return None;
    }
    let mut reply = Message::new();
    reply.set_id(query.id()).set_message_type(MessageType::Response).set_recursion_available(true);
    reply.set_recursion_desired(query.recursion_desired());
    reply.add_query(q.clone());
    if udp && name.starts_with("tcp-only.") {
        reply.set_truncated(true);
        return reply.to_vec().ok();
    }
    if let Some(addr) = echoed_address(&name).filter(|_| q.query_type() == RecordType::A) {
        reply.add_answer(Record::from_rdata(q.name().clone(), 300, RData::A(rdata::A(addr))));
        return reply.to_vec().ok();
    }
    if !table.contains_key(&name) {
        reply.set_response_code(ResponseCode::NXDomain);
        return reply.to_vec().ok();
    }
    let mut owner = name;
    for _ in 0..8 {
        let rrs = table.get(&owner).cloned().unwrap_or_default();
        let owner_name = Name::from_ascii(format!("{owner}.")).unwrap();
        let mut next = None;
        for rr in rrs {
            let data = match (&rr, q.query_type()) {
                (Rr::Cname(target), _) => {
                    next = Some(target.to_string());
                    RData::CNAME(rdata::CNAME(Name::from_ascii(format!("{target}.")).unwrap()))
                }
                (Rr::Addr(ip), t) => match (ip.parse::<IpAddr>().unwrap(), t) {
                    (IpAddr::V4(v4), RecordType::A) => RData::A(rdata::A(v4)),
                    (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(rdata::AAAA(v6)),
                    _ => continue,
                },
                (Rr::Txt(text), RecordType::TXT) => RData::TXT(rdata::TXT::new(vec![text.to_string()])),
                (Rr::Https { hint }, RecordType::HTTPS) => RData::HTTPS(HTTPS(https_record(hint))),
                _ => continue,
            };
            reply.add_answer(Record::from_rdata(owner_name.clone(), 300, data));
        }
        match next {
            Some(target) if q.query_type() != RecordType::CNAME => owner = target,
            _ => break,
        }
    }
    reply.to_vec().ok()
}

/// 11.0.X.Y for a name starting `ip-11-0-X-Y.`.
fn echoed_address(name: &str) -> Option<std::net::Ipv4Addr> {
    let label = name.split('.').next()?.strip_prefix("ip-")?;
    let octets: Vec<u8> = label.split('-').map(|o| o.parse().ok()).collect::<Option<_>>()?;
    <[u8; 4]>::try_from(octets).ok().filter(|o| o[..2] == [11, 0]).map(std::net::Ipv4Addr::from)
}

fn https_record(hint: &str) -> SVCB {
    SVCB::new(
        1,
        Name::root(),
        vec![
            (SvcParamKey::Alpn, SvcParamValue::Alpn(Alpn(vec!["h2".to_string()]))),
            (SvcParamKey::Ipv4Hint, SvcParamValue::Ipv4Hint(IpHint(vec![rdata::A(hint.parse().unwrap())]))),
            (SvcParamKey::EchConfigList, SvcParamValue::EchConfigList(EchConfigList(b"\x00\x45\xfe\x0d\x00\x41not-a-real-ech-config".to_vec()))),
        ],
    )
}
