//! ECH on the transparent path, in a network namespace of the test's own:
//! an origin on 11.0.0.10:443 (added to loopback, so carved out of the
//! proxy's own addresses), and a netfilter rule
//! that redirects connections from 127.0.0.2 to it onto the transparent
//! listener. A ClientHello offering ECH is refused (`ech-refused`) unless
//! the role has `allow_ech`; then it reaches the origin, decided on its
//! outer name.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::common::{send_raw, temp_file, STEP};
use super::hello;
use super::netns::sh;
use portcullis::app::App;

const ORIGIN: &str = "11.0.0.10";

pub fn scenario() {
    sh(&["ip", "link", "set", "lo", "up"]);
    sh(&["ip", "addr", "add", &format!("{ORIGIN}/32"), "dev", "lo"]);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let received = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let origin = std::net::TcpListener::bind((ORIGIN, 443)).unwrap();
    let log = received.clone();
    std::thread::spawn(move || {
        for stream in origin.incoming() {
            let Ok(mut stream) = stream else { return };
            stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut got = Vec::new();
            let _ = stream.read_to_end(&mut got);
            log.lock().unwrap().push(got);
        }
    });
    let ech_hello = hello::with_ech("public.test");
    for allow_ech in [false, true] {
        let yaml = format!(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\ntransparent_listen: 127.0.0.1:0\n\
             dns:\n  static:\n    public.test: [{ORIGIN}]\n\
             allow_ranges: [{ORIGIN}/32]\n\
             roles:\n  default:\n    allow_ech: {allow_ech}\n    allow:\n      domains: [public.test]\n"
        );
        let path = temp_file(&format!("dns-ech-{allow_ech}"), "portcullis.yaml", &yaml);
        let (transparent, admin) = runtime.block_on(async {
            let app = App::start(&path).await.expect("starts");
            let addrs = (app.transparent_addr().unwrap().unwrap(), app.admin_addr().unwrap());
            tokio::spawn(app.run(std::future::pending()));
            addrs
        });
        let port = transparent.port().to_string();
        sh(&["iptables", "-t", "nat", "-F", "OUTPUT"]);
        sh(&["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-s", "127.0.0.2", "-d", ORIGIN, "--dport", "443", "-j", "REDIRECT", "--to-ports", &port]);
        let mut client = connect_from("127.0.0.2", SocketAddr::new(ORIGIN.parse().unwrap(), 443));
        client.write_all(&ech_hello).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        client.set_read_timeout(Some(STEP)).unwrap();
        let mut back = Vec::new();
        let _ = client.read_to_end(&mut back);
        let metrics = runtime.block_on(send_raw(admin, "GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n")).text();
        let refused = "portcullis_requests_total{decision=\"deny\",kind=\"transparent-tls\",reason=\"ech-refused\",role=\"default\"} 1";
        if allow_ech {
            let deadline = Instant::now() + STEP;
            while !received.lock().unwrap().contains(&ech_hello) {
                assert!(Instant::now() < deadline, "the origin never got the ClientHello: {metrics}");
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(!metrics.contains(refused), "{metrics}");
        } else {
            assert_eq!(back, [21, 3, 3, 0, 2, 2, 49], "an access_denied alert; {metrics}");
            assert!(metrics.contains(refused), "{metrics}");
            assert!(received.lock().unwrap().is_empty(), "nothing reached the origin");
        }
    }
}

/// A blocking TCP connection from `source` (a loopback address) to `to`.
fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
        let stream = tokio::time::timeout(STEP, socket.connect(to)).await.expect("connect in time").unwrap();
        let stream = stream.into_std().unwrap();
        stream.set_nonblocking(false).unwrap();
        stream
    })
}
