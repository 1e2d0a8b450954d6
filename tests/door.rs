//! The one door: a tunnel keeps the question it was admitted on, and a
//! reload asks it again (the identity derived again from the client's
//! evidence), including for a tunnel whose dial was still in flight when
//! the reload landed. `portcullis test` decides as the proxy does. Real
//! sockets on loopback; reloads publish a new snapshot in-process.

mod common;
#[path = "common/hostile.rs"]
mod hostile;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use common::*;
use portcullis::config::Config;
use portcullis::metrics::Metrics;
use portcullis::proxy::{Server, Snapshot, SnapshotHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

fn snapshot(yaml: &str, generation: u64) -> Snapshot {
    let config = Config::from_yaml_str(yaml, "door.yaml").expect("test config is valid");
    Snapshot::compile(&config, generation).expect("test config compiles")
}

/// The proxy in-process with `yaml`; its address, its reload handle and metrics.
async fn serve(yaml: &str) -> (SocketAddr, SnapshotHandle, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let server = Server::bind_with("127.0.0.1:0".parse().unwrap(), snapshot(yaml, 1), metrics.clone()).await.unwrap();
    let addr = server.local_addr().unwrap();
    let handle = server.snapshot_handle();
    tokio::spawn(server.run());
    (addr, handle, metrics)
}

/// `CONNECT authority` from the loopback address `source`.
async fn tunnel_from(proxy: SocketAddr, source: &str, authority: &str) -> (RawResponse, TcpStream) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source.parse::<IpAddr>().unwrap(), 0)).unwrap();
    let mut stream = socket.connect(proxy).await.unwrap();
    stream.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes()).await.unwrap();
    let resp = read_response(&mut stream).await;
    (resp, stream)
}

/// Waits until the tunnel is closed by the proxy (EOF or reset, no data).
async fn closed(mut tunnel: TcpStream, what: &str) {
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(STEP, tunnel.read(&mut buf)).await.unwrap_or_else(|_| panic!("{what}: still open"));
    assert!(matches!(read, Ok(0) | Err(_)), "{what}: closed, not data: {read:?}");
}

/// The red team's N1: a tunnel's role came from a source rule; a reload
/// that removes the rule (the role itself stays, and still allows the
/// destination) closes the tunnel, because the identity is derived again.
#[tokio::test]
async fn removing_a_clients_source_rule_closes_its_tunnel_on_reload() {
    let echo = start_tcp_echo().await;
    let yaml = |sources: &str| {
        format!(
            "allow_ranges: [127.0.0.1/32]\nidentity:\n  sources:\n{sources}roles:\n  default: {{}}\n  ci:\n    allow:\n      cidrs: [127.0.0.1/32]\n      connect_ports: [{}]\n",
            echo.port()
        )
    };
    let (proxy, reload, metrics) = serve(&yaml("    - {cidr: 127.0.0.2/32, role: ci}\n    - {cidr: 127.0.0.3/32, role: ci}\n")).await;
    let authority = echo.to_string();
    let (resp, doomed) = tunnel_from(proxy, "127.0.0.2", &authority).await;
    assert_eq!(resp.status, 200, "ci may reach the echo service");
    let (resp, kept) = tunnel_from(proxy, "127.0.0.3", &authority).await;
    assert_eq!(resp.status, 200);

    reload.store(Arc::new(snapshot(&yaml("    - {cidr: 127.0.0.3/32, role: ci}\n"), 2)));
    closed(doomed, "the tunnel of the client whose source rule was removed").await;
    assert_eq!(echo_through(kept, b"still ci").await, b"still ci", "the other client keeps its role and its tunnel");
    assert_eq!(metrics.revoked.with_label_values(&["tunnel"]).get(), 1);
    let (resp, _) = tunnel_from(proxy, "127.0.0.2", &authority).await;
    assert_eq!(resp.status, 403, "a new tunnel of that client is refused too");
}

/// A parent proxy that reports each CONNECT it reads on `asked`, answers
/// it once `gate` lets it, then relays to the destination it was asked for.
async fn start_gated_parent(gate: Arc<tokio::sync::Semaphore>, asked: tokio::sync::mpsc::UnboundedSender<String>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else { return };
            let (gate, asked) = (gate.clone(), asked.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let destination = text.split(' ').nth(1).unwrap_or_default().to_string();
                let _ = asked.send(destination.clone());
                let _permit = gate.acquire().await.unwrap();
                let Ok(mut upstream) = TcpStream::connect(destination.as_str()).await else { return };
                client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    addr
}

/// The red team's N2: a tunnel whose dial is still in flight when a reload
/// denies it must not open. Here the "dial" is a parent proxy that holds
/// its answer until the reload's revocation pass has demonstrably run.
#[tokio::test]
async fn a_tunnel_dialed_across_a_reload_that_denies_it_is_closed() {
    let (echo, other) = (start_tcp_echo().await, start_tcp_echo().await);
    let gate = Arc::new(tokio::sync::Semaphore::new(1));
    let (asked_tx, mut asked) = tokio::sync::mpsc::unbounded_channel();
    let parent = start_gated_parent(gate.clone(), asked_tx).await;
    let yaml = |ports: &str| {
        format!(
            "upstream_proxy:\n  url: http://{parent}\nallow_ranges: [127.0.0.1/32]\n\
             roles:\n  default:\n    allow:\n      cidrs: [127.0.0.1/32]\n      connect_ports: [{ports}]\n"
        )
    };
    let (proxy, reload, _) = serve(&yaml(&format!("{}, {}", echo.port(), other.port()))).await;
    // The first CONNECT takes the gate's only permit and keeps it while open.
    let (resp, witness) = tunnel_from(proxy, "127.0.0.1", &other.to_string()).await;
    assert_eq!(resp.status, 200);
    let in_flight = tokio::spawn(async move { tunnel_from(proxy, "127.0.0.1", &echo.to_string()).await });
    // Decided and being dialed: the parent has the second CONNECT.
    for _ in 0..2 {
        tokio::time::timeout(STEP, asked.recv()).await.expect("the parent is asked").unwrap();
    }
    // Both ports denied now; the witness tunnel's closing shows the
    // revocation pass ran while the second tunnel was still being dialed.
    reload.store(Arc::new(snapshot(&yaml("1"), 2)));
    closed(witness, "the open tunnel the reload denies").await;
    let (resp, _) = tokio::time::timeout(STEP, in_flight).await.expect("the delayed CONNECT is answered").unwrap();
    assert_eq!(
        (resp.status, resp.header("x-portcullis-deny")),
        (403, Some("revoked")),
        "the tunnel dialed across the reload is refused before any byte is relayed"
    );
}

/// `portcullis test` decides as the proxy does: with
/// `upstream_proxy.resolve: parent` a name the parent resolves needs no
/// entry in the case file's `resolve:` map, while a name that only a CIDR
/// rule could admit is denied, as on the proxy port.
#[test]
fn policy_tests_model_a_parent_that_resolves_names() {
    let config = temp_file(
        "door-test",
        "parent.yaml",
        "upstream_proxy:\n  url: http://127.0.0.1:3128\n  resolve: parent\n\
         roles:\n  default:\n    allow:\n      domains: [web.example]\n      cidrs: [8.8.8.0/24]\n",
    );
    let cases = temp_file(
        "door-test",
        "cases.yaml",
        "cases:\n  - {url: \"https://web.example/\", expect: allow}\n  - {url: \"https://cidr-only.example/\", expect: deny, reason: not-allowlisted}\n",
    );
    let (code, stdout, stderr) = portcullis(&["test", "--config", config.to_str().unwrap(), cases.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("2 cases: 2 passed, 0 failed"), "{stdout}");
}

/// Writes `n` bytes into a tunnel to an echo service and reads them back,
/// keeping the tunnel open: large enough that both directions switch to
/// splice(2), and each keeps its pipe until the tunnel ends.
async fn bulk_echo(stream: &mut TcpStream, n: usize) {
    let (mut r, mut w) = stream.split();
    let data = vec![7u8; n];
    let mut back = vec![0u8; n];
    let (written, read) = tokio::join!(w.write_all(&data), r.read_exact(&mut back));
    written.unwrap();
    read.unwrap();
}

/// The red team's N4: under an open-file limit just above what the limits
/// promise, one client within its limits holds 60 tunnels that each moved
/// a bulk transfer (splice pipes), and another client is still served,
/// plain HTTP and CONNECT alike. Pipes only use descriptors the limits did
/// not promise; beyond them, tunnels copy through user space.
#[tokio::test]
async fn bulk_tunnels_of_one_client_leave_descriptors_for_another() {
    use std::io::BufRead;
    let echo = start_tcp_echo().await;
    let origin = start_http_origin().await;
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n\
         limits:\n  max_connections: 100\n  max_connections_per_client: 60\n  max_tunnels: 100\n  max_tunnels_per_client: 60\n  max_idle_upstream: 20\n\
         allow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    allow: {{cidrs: [127.0.0.1/32], http_ports: [{}], connect_ports: [{}]}}\n",
        origin.port(),
        echo.port()
    );
    // 2 x 100 connections + 20 pooled + 64 reserved = 284 promised; the process gets 300.
    let path = temp_file("door-fds", "portcullis.yaml", &yaml);
    let mut child = std::process::Command::new("prlimit")
        .args(["--nofile=300:300", env!("CARGO_BIN_EXE_portcullis"), "run", "--config", path.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("prlimit (util-linux)");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a startup line").unwrap();
    assert!(first.contains("portcullis listening"), "{first}");
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
    // Port 0: the proxy binds it and names it in the startup line.
    let (proxy, _) = listening_addrs(&first);

    let mut held = Vec::new();
    for i in 0..60 {
        let (resp, mut tunnel) = tunnel_from(proxy, "127.0.0.5", &echo.to_string()).await;
        assert_eq!(resp.status, 200, "attacker tunnel {i} is within its limits");
        bulk_echo(&mut tunnel, 512 * 1024).await;
        held.push(tunnel);
    }
    let (resp, tunnel) = tunnel_from(proxy, "127.0.0.9", &echo.to_string()).await;
    assert_eq!(resp.status, 200, "the other client's CONNECT: {}", resp.text());
    assert_eq!(echo_through(tunnel, b"victim").await, b"victim");
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.9:0".parse().unwrap()).unwrap();
    let mut stream = socket.connect(proxy).await.unwrap();
    let request = format!("GET http://{origin}/ HTTP/1.1\r\nHost: {origin}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let resp = read_response(&mut stream).await;
    assert_eq!(resp.status, 200, "the other client's GET: {}", resp.text());
    drop(held);
    let _ = child.kill();
    let _ = child.wait();
}

/// The count of decision lines with `reason`, from the metrics.
fn refusals(metrics: &Metrics, reason: &str) -> u64 {
    let text = metrics.render();
    let needle = format!("reason=\"{reason}\"");
    text.lines()
        .filter(|l| l.starts_with("portcullis_requests_total") && l.contains(&needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Issue 29 and the red team's N8: plain HTTP inside a tunnel gets the
/// proxy port's framing check (two Host lines, Content-Length with
/// Transfer-Encoding: 400, counted, and the tunnel closes), and the
/// client's proxy credentials and `Connection`-named headers never reach
/// the origin.
#[tokio::test]
async fn http_inside_a_tunnel_is_framed_as_strictly_as_the_proxy_port() {
    let origin = start_http_origin().await;
    let (proxy, _, metrics) = serve(&format!(
        "allow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    allow:\n      cidrs: [127.0.0.1/32]\n      http_ports: [{}]\n",
        origin.port()
    ))
    .await;
    let authority = origin.to_string();
    let (resp, mut tunnel) = tunnel_from(proxy, "127.0.0.1", &authority).await;
    assert_eq!(resp.status, 200);
    let request = format!(
        "GET /headers HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: Basic c2VjcmV0\r\nConnection: x-secret\r\nX-Secret: 1\r\nX-Kept: 1\r\n\r\n"
    );
    tunnel.write_all(request.as_bytes()).await.unwrap();
    let resp = read_response(&mut tunnel).await;
    let seen = resp.text().to_ascii_lowercase();
    assert_eq!(resp.status, 200, "{seen}");
    assert!(seen.contains("x-kept: 1"), "{seen}");
    assert!(!seen.contains("proxy-authorization") && !seen.contains("x-secret"), "stripped: {seen}");

    for (code, request) in [
        ("duplicate-host", format!("GET /headers HTTP/1.1\r\nHost: {authority}\r\nHost: 169.254.169.254\r\n\r\n")),
        (
            "conflicting-framing",
            format!("POST /echo HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ),
    ] {
        let (resp, mut tunnel) = tunnel_from(proxy, "127.0.0.1", &authority).await;
        assert_eq!(resp.status, 200);
        tunnel.write_all(request.as_bytes()).await.unwrap();
        let resp = read_response(&mut tunnel).await;
        assert_eq!((resp.status, resp.header("x-portcullis-error")), (400, Some(code)), "{}", resp.text());
        closed(tunnel, code).await;
        hostile::eventually(&format!("{code} counted"), STEP, || refusals(&metrics, code) == 1).await;
    }
}
