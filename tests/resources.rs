//! Resources are charged to the client that caused them: tunnels keep their
//! connection's slot and have limits of their own, and pooled upstream
//! connections are bounded and never shared between roles. Real sockets.

mod common;
#[path = "common/hostile.rs"]
mod hostile;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use hostile::{eventually, start_proxy_with_metrics as start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};


/// A connection to the proxy from a chosen loopback source address.
async fn connect_from(proxy: SocketAddr, source: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source.parse::<IpAddr>().unwrap(), 0)).unwrap();
    socket.connect(proxy).await.unwrap()
}

/// `CONNECT authority` from `source`; the stream is returned open.
async fn tunnel_from(proxy: SocketAddr, source: &str, authority: &str) -> (RawResponse, TcpStream) {
    let mut stream = connect_from(proxy, source).await;
    stream.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes()).await.unwrap();
    let resp = read_response(&mut stream).await;
    (resp, stream)
}

/// The red team's F1: with limits 5/3 one client opened 200 tunnels. Now a
/// tunnel keeps its connection's slot, tunnels have their own limits, and
/// another client is served throughout.
#[tokio::test]
async fn tunnels_count_against_connection_and_tunnel_limits() {
    let echo = start_tcp_echo().await;
    let port = echo.port();
    let (proxy, metrics) = start(&format!(
        "limits:\n  max_connections: 6\n  max_connections_per_client: 3\n  max_tunnels: 4\n  max_tunnels_per_client: 2\n\
         allow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    allow:\n      cidrs: [127.0.0.1/32]\n      connect_ports: [{port}]\n"
    ))
    .await;
    let authority = format!("127.0.0.1:{port}");
    let refused = |reason: &str| metrics.connections_refused.with_label_values(&[reason]).get();
    let mut held = Vec::new();
    for _ in 0..2 {
        let (resp, mut stream) = tunnel_from(proxy, "127.0.0.1", &authority).await;
        assert_eq!(resp.status, 200);
        stream.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping", "the tunnel relays");
        held.push(stream);
    }
    assert_eq!(metrics.active_tunnels.get(), 2);
    assert_eq!(metrics.active_connections.get(), 2, "each tunnel still holds its client connection's slot");

    let (resp, _) = tunnel_from(proxy, "127.0.0.1", &authority).await;
    assert_eq!((resp.status, resp.header("x-portcullis-error")), (503, Some("over-limit")), "third tunnel of one client");
    assert_eq!(refused("per_client_tunnel_limit"), 1);

    // The connection limit counts the tunnels: a third plain connection
    // fills the client's 3, a fourth is refused at accept.
    let mut third = connect_from(proxy, "127.0.0.1").await;
    third.write_all(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let resp = read_response(&mut third).await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("port-not-allowed")), "the third connection is served");
    let mut fourth = connect_from(proxy, "127.0.0.1").await;
    let resp = read_response(&mut fourth).await;
    assert_eq!((resp.status, resp.header("x-portcullis-error")), (503, Some("over-limit")));
    assert_eq!(refused("per_client_limit"), 1);

    // Another client is served, up to the global tunnel limit.
    for _ in 0..2 {
        let (resp, stream) = tunnel_from(proxy, "127.0.0.2", &authority).await;
        assert_eq!(resp.status, 200, "another client keeps being served");
        held.push(stream);
    }
    let (resp, _) = tunnel_from(proxy, "127.0.0.3", &authority).await;
    assert_eq!(resp.status, 503, "global tunnel limit");
    assert_eq!(refused("tunnel_limit"), 1);

    drop(held);
    drop(third);
    eventually("gauges back to zero", STEP, || metrics.active_tunnels.get() == 0 && metrics.active_connections.get() == 0).await;
}

/// An origin that answers every request with the client port it sees, so a
/// test can tell which upstream connection carried a request. The first
/// `together` requests are answered only once all of them have arrived, so
/// they are in flight at the same time.
async fn start_port_reporting_origin(together: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(together.max(1)));
    let waiting = Arc::new(AtomicUsize::new(together));
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else { return };
            let (barrier, waiting) = (barrier.clone(), waiting.clone());
            let service = hyper::service::service_fn(move |_req| {
                let (barrier, waiting) = (barrier.clone(), waiting.clone());
                async move {
                    if waiting.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| w.checked_sub(1)).is_ok() {
                        let _ = tokio::time::timeout(STEP, barrier.wait()).await;
                    }
                    let body = http_body_util::Full::new(bytes::Bytes::from(peer.port().to_string()));
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    addr
}

fn sha256_hex(secret: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The red team's F7: requests of two roles arrived on one upstream
/// connection. Now the pool is keyed by role.
#[tokio::test]
async fn two_roles_never_share_a_pooled_upstream_connection() {
    let origin = start_port_reporting_origin(0).await;
    let port = origin.port();
    let (proxy, _) = start(&format!(
        "allow_ranges: [127.0.0.1/32]\nidentity:\n  credentials:\n    - {{token_sha256: \"{}\", role: team-a}}\n    - {{token_sha256: \"{}\", role: team-b}}\n\
         roles:\n  default: {{}}\n  team-a:\n    allow: {{cidrs: [127.0.0.1/32], http_ports: [{port}]}}\n  team-b:\n    allow: {{cidrs: [127.0.0.1/32], http_ports: [{port}]}}\n",
        sha256_hex("token-a"),
        sha256_hex("token-b")
    ))
    .await;
    let ask = |token: &'static str| async move {
        let request = format!("GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer {token}\r\n\r\n");
        let resp = send_raw(proxy, &request).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        resp.text()
    };
    let (a1, a2) = (ask("token-a").await, ask("token-a").await);
    let (b1, b2) = (ask("token-b").await, ask("token-b").await);
    assert_eq!(a1, a2, "a role reuses its own pooled connection");
    assert_eq!(b1, b2, "a role reuses its own pooled connection");
    assert_ne!(a1, b1, "two roles never share one");
}

/// Eight requests in flight at once need eight upstream connections; once
/// done, the pool keeps at most `max_idle_upstream_per_destination` of them.
#[tokio::test]
async fn the_pool_keeps_at_most_its_bound() {
    let origin = start_port_reporting_origin(8).await;
    let port = origin.port();
    let (proxy, metrics) = start(&format!(
        "limits:\n  max_idle_upstream: 3\n  max_idle_upstream_per_destination: 2\nallow_ranges: [127.0.0.1/32]\n\
         roles:\n  default:\n    allow: {{cidrs: [127.0.0.1/32], http_ports: [{port}]}}\n"
    ))
    .await;
    let url = format!("http://127.0.0.1:{port}/");
    let requests: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(proxy, &url).await })
        })
        .collect();
    let mut ports = std::collections::HashSet::new();
    for r in requests {
        let resp = r.await.unwrap();
        assert_eq!(resp.status, 200);
        ports.insert(resp.text());
    }
    assert_eq!(ports.len(), 8, "all eight were in flight together");
    eventually("finished connections pooled", STEP, || metrics.upstream_idle.get() >= 1).await;
    assert!(metrics.upstream_idle.get() <= 2, "pool holds {}", metrics.upstream_idle.get());
}

/// A running binary whose stdout lines arrive on a channel. Its config
/// listens on port 0; the addresses come from its startup line.
struct Running {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Running {
    fn start(config: &std::path::Path) -> Running {
        Running::spawn(std::process::Command::new(env!("CARGO_BIN_EXE_portcullis")), config)
    }

    /// Runs the binary under `prlimit --nofile=N:N` (util-linux).
    fn start_with_nofile(config: &std::path::Path, nofile: u64) -> Running {
        let mut command = std::process::Command::new("prlimit");
        command.arg(format!("--nofile={nofile}:{nofile}")).arg(env!("CARGO_BIN_EXE_portcullis"));
        Running::spawn(command, config)
    }

    fn spawn(mut command: std::process::Command, config: &std::path::Path) -> Running {
        use std::io::BufRead;
        let mut child = command.args(["run", "--config", config.to_str().unwrap()]).stdout(std::process::Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut running = Running { child, lines, addr: ([0, 0, 0, 0], 0).into(), admin: ([0, 0, 0, 0], 0).into() };
        (running.addr, running.admin) = listening_addrs(&running.wait_for("portcullis listening"));
        running
    }

    /// Writes the config `yaml(proxy port, admin port)` with the ports the
    /// process bound (it started on port 0) and waits for the reload: the
    /// policy then knows its own listeners (a listener on port 0 has no
    /// port to deny) and the port lists can name them. No port is freed
    /// and bound again.
    fn pin_own_ports(&self, path: &std::path::Path, yaml: impl Fn(u16, u16) -> String) {
        let staged = path.with_extension("staged");
        std::fs::write(&staged, yaml(self.addr.port(), self.admin.port())).unwrap();
        std::fs::rename(&staged, path).unwrap();
        self.wait_for("config reloaded");
    }

    /// The next line containing `needle` (bounded by [`STEP`]).
    fn wait_for(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| panic!("no line with {needle}"));
            if line.contains(needle) {
                return line;
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A reload that removes a destination closes an open tunnel to it (after
/// the reload, as events, not against a clock); the decision line says
/// `revoked` and the counter moves. A tunnel the new policy still allows
/// stays open.
#[tokio::test]
async fn a_reload_revokes_tunnels_it_denies() {
    let (denied_echo, kept_echo) = (start_tcp_echo().await, start_tcp_echo().await);
    let yaml = |ports: &str| {
        format!(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nreload:\n  interval: 100ms\n\
             allow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    allow:\n      cidrs: [127.0.0.1/32]\n      connect_ports: [{ports}]\n"
        )
    };
    let path = temp_file("revoke", "portcullis.yaml", &yaml(&format!("{}, {}", denied_echo.port(), kept_echo.port())));
    let running = Running::start(&path);
    let proxy = running.addr;
    let (resp, mut doomed) = connect(proxy, &format!("127.0.0.1:{}", denied_echo.port())).await;
    assert_eq!(resp.status, 200);
    doomed.write_all(b"alive").await.unwrap();
    let mut echo = [0u8; 5];
    tokio::time::timeout(STEP, doomed.read_exact(&mut echo)).await.unwrap().unwrap();
    assert_eq!(&echo, b"alive", "the tunnel relays until the reload");
    let (resp, mut kept) = connect(proxy, &format!("127.0.0.1:{}", kept_echo.port())).await;
    assert_eq!(resp.status, 200);

    let staged = path.with_extension("new");
    std::fs::write(&staged, yaml(&kept_echo.port().to_string())).unwrap();
    std::fs::rename(&staged, &path).unwrap();
    // Events, in order, not a wall-clock bound: the reload, then the close.
    running.wait_for("config reloaded");
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(STEP, doomed.read(&mut buf)).await.expect("the revoked tunnel is closed");
    assert!(matches!(read, Ok(0) | Err(_)), "closed, not data: {read:?}");
    let line = running.wait_for("\"reason\":\"revoked\"");
    assert!(line.contains(&format!("\"port\":{}", denied_echo.port())), "{line}");

    kept.write_all(b"still here").await.unwrap();
    let mut echo = [0u8; 10];
    tokio::time::timeout(STEP, kept.read_exact(&mut echo)).await.unwrap().unwrap();
    assert_eq!(&echo, b"still here", "a tunnel the new policy allows stays open");

    let metrics = send_raw(running.admin, "GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n").await.text();
    assert_eq!(metric_value(&metrics, "portcullis_revoked_total{kind=\"tunnel\"}"), 1.0);
}

/// The red team's F4: nested CONNECTs through the proxy's own port. Its
/// listening sockets are `denied-range:self` even where loopback is carved
/// out, and a request carrying this process's `Via` is a loop (508).
#[tokio::test]
async fn the_proxy_never_proxies_to_itself() {
    let origin = start_http_origin().await;
    let yaml = |proxy_port: u16, admin_port: u16| {
        // Before the pin the port is 0, which no port list may hold.
        let ports = match proxy_port {
            0 => format!("[{}]", origin.port()),
            own => format!("[{own}, {}]", origin.port()),
        };
        format!(
            "listen: 127.0.0.1:{proxy_port}\nadmin_listen: 127.0.0.1:{admin_port}\nreload:\n  interval: 100ms\n\
             allow_ranges: [127.0.0.0/8]\nroles:\n  default:\n    mode: open\n    allow: {{http_ports: {ports}, connect_ports: {ports}}}\n"
        )
    };
    let path = temp_file("self", "portcullis.yaml", &yaml(0, 0));
    let running = Running::start(&path);
    running.pin_own_ports(&path, yaml);
    let (proxy, proxy_port) = (running.addr, running.addr.port());

    for authority in [format!("127.0.0.1:{proxy_port}"), format!("[::ffff:127.0.0.1]:{proxy_port}")] {
        let (resp, _) = connect(proxy, &authority).await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("denied-range:self")), "CONNECT {authority}");
        let resp = get(proxy, &format!("http://{authority}/")).await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("denied-range:self")), "GET {authority}");
    }

    let url = format!("http://127.0.0.1:{}/headers", origin.port());
    let resp = get(proxy, &url).await;
    assert_eq!(resp.status, 200);
    let via = resp.header("via").expect("the proxy adds Via").to_string();
    assert!(resp.text().contains(&format!("via: {via}")), "the origin sees the same Via: {}", resp.text());
    let looped = send_raw(proxy, &format!("GET {url} HTTP/1.1\r\nHost: x\r\nVia: 1.1 other-proxy, {via}\r\n\r\n")).await;
    assert_eq!((looped.status, looped.header("x-portcullis-error")), (508, Some("loop-detected")));
    let foreign = send_raw(proxy, &format!("GET {url} HTTP/1.1\r\nHost: x\r\nVia: 1.1 portcullis-00000000\r\n\r\n")).await;
    assert_eq!(foreign.status, 200, "another Portcullis in the chain is not a loop");
}

/// Open descriptors of a process; fails when /proc cannot tell (a 0 would
/// make every bound on it pass).
fn open_fds(pid: u32) -> usize {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap_or_else(|e| panic!("cannot read /proc/{pid}/fd: {e}"));
    let n = dir.count();
    assert!(n > 0, "/proc/{pid}/fd lists nothing; a running proxy holds at least its listeners");
    n
}

/// Keep-alive HTTP origins on `n` ports.
async fn start_origins(n: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    for _ in 0..n {
        ports.push(start_port_reporting_origin(0).await.port());
    }
    ports
}

/// One hostile client against a proxy with 256 descriptors: it piles up
/// tunnels and connections, fills the pool through an `open` role across
/// many origins, and nests CONNECTs through the proxy itself. Each attempt
/// stops at its limit, a second client is served throughout, and
/// afterwards the gauges and the descriptors return to where they were.
#[tokio::test]
async fn one_client_cannot_exhaust_a_proxy_with_few_descriptors() {
    let echo = start_tcp_echo().await;
    let origins = start_origins(12).await;
    let yaml = |proxy_port: u16, admin_port: u16| {
        let mut ports: Vec<String> = origins.iter().map(|p| p.to_string()).collect();
        ports.push(echo.port().to_string());
        if proxy_port != 0 {
            ports.push(proxy_port.to_string());
        }
        let ports = ports.join(", ");
        format!(
        "listen: 127.0.0.1:{proxy_port}\nadmin_listen: 127.0.0.1:{admin_port}\nreload:\n  interval: 100ms\n\
         limits:\n  max_connections: 60\n  max_connections_per_client: 30\n  max_tunnels: 40\n  max_tunnels_per_client: 20\n  \
         max_idle_upstream: 8\n  max_idle_upstream_per_destination: 2\n\
         allow_ranges: [127.0.0.0/8]\nidentity:\n  sources:\n    - {{cidr: 127.0.0.2/32, role: ci}}\n\
         roles:\n  default:\n    allow: {{cidrs: [127.0.0.1/32], http_ports: [{ports}], connect_ports: [{ports}]}}\n  \
         ci:\n    mode: open\n    allow: {{http_ports: [{ports}], connect_ports: [{ports}]}}\n"
        )
    };
    // 2 x 60 + 8 + 64 = 192 descriptors needed; the process gets 256.
    let path = temp_file("exhaust", "portcullis.yaml", &yaml(0, 0));
    let running = Running::start_with_nofile(&path, 256);
    running.pin_own_ports(&path, yaml);
    let pid = running.child.id();
    let (proxy, admin) = (running.addr, running.admin);
    let victim_url = format!("http://127.0.0.1:{}/", origins[0]);
    let victim = || async { get_from_source(proxy, "127.0.0.3", &victim_url).await.status };
    assert_eq!(victim().await, 200);
    let baseline_fds = open_fds(pid);

    // Tunnels: 20 granted, the rest refused, never more.
    let mut held = Vec::new();
    let mut refused_tunnels = 0;
    for _ in 0..35 {
        let (resp, stream) = tunnel_from(proxy, "127.0.0.2", &format!("127.0.0.1:{}", echo.port())).await;
        match resp.status {
            200 => held.push(stream),
            503 => refused_tunnels += 1,
            other => panic!("tunnel answered {other}"),
        }
    }
    assert_eq!((held.len(), refused_tunnels), (20, 15));
    assert_eq!(victim().await, 200, "the victim is served while the attacker holds its tunnels");

    // Plain connections: the attacker's 30 slots are full after 10 more.
    let mut refused_connections = 0;
    for _ in 0..20 {
        let mut stream = connect_from(proxy, "127.0.0.2").await;
        stream.write_all(b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        match read_response(&mut stream).await.status {
            503 => refused_connections += 1,
            _ => held.push(stream),
        }
    }
    assert_eq!(refused_connections, 10);
    assert_eq!(victim().await, 200);

    // The pool: one keep-alive connection of the open role visits every
    // origin twice over; at most 8 idle connections stay.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + STEP;
    let mut keep_alive = loop {
        // The freed slot is released once the proxy sees the close.
        let mut stream = connect_from(proxy, "127.0.0.2").await;
        stream.write_all(format!("GET http://127.0.0.1:{}/ HTTP/1.1\r\nHost: x\r\n\r\n", origins[0]).as_bytes()).await.unwrap();
        if read_response(&mut stream).await.status == 200 {
            break stream;
        }
        assert!(tokio::time::Instant::now() < deadline, "the freed slot never came back");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    for port in origins.iter().chain(&origins) {
        keep_alive.write_all(format!("GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        assert_eq!(read_response(&mut keep_alive).await.status, 200);
    }

    // Nested CONNECT through the proxy's own port: refused before dialing.
    let (resp, _) = tunnel_from(proxy, "127.0.0.3", &proxy.to_string()).await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("denied-range:self")));
    assert_eq!(victim().await, 200);

    let metrics = parse_sample_lines(&send_raw(admin, "GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n").await.text());
    assert!(metrics["portcullis_upstream_idle_connections"] <= 8.0, "{metrics:?}");
    assert_eq!(metrics["portcullis_active_tunnels"], 20.0);
    // The reading is live (20 tunnels hold at least two sockets each), so
    // the settle check below means something; the kernel enforces the 256.
    let busy_fds = open_fds(pid);
    assert!(busy_fds >= baseline_fds + 40, "{busy_fds} descriptors open under load, {baseline_fds} before");

    drop(held);
    drop(keep_alive);
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let metrics = parse_sample_lines(&send_raw(admin, "GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n").await.text());
        // The scrape itself is not a proxy connection; only the proxy's count.
        let settled = metrics["portcullis_active_tunnels"] == 0.0 && metrics["portcullis_active_connections"] == 0.0;
        // Pooled upstream sockets may stay (bounded above); the rest is closed.
        let fds_back = open_fds(pid) <= baseline_fds + 8;
        if settled && fds_back {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not settled: {metrics:?}, fds {} (baseline {baseline_fds})", open_fds(pid));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `GET url` from a chosen loopback source address.
async fn get_from_source(proxy: SocketAddr, source: &str, url: &str) -> RawResponse {
    let mut stream = connect_from(proxy, source).await;
    stream.write_all(format!("GET {url} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    read_response(&mut stream).await
}

/// Unlabelled samples of a metrics page, by name.
fn parse_sample_lines(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.contains('{'))
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(name, value)| Some((name.to_string(), value.trim().parse().ok()?)))
        .collect()
}

/// Refuses a config whose limits cannot fit the open-file limit, with the numbers.
#[test]
fn limits_that_cannot_fit_the_descriptor_limit_are_refused() {
    let path = temp_file("nofile", "portcullis.yaml", "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nlimits:\n  max_connections: 500\n  max_idle_upstream: 64\nroles:\n  default: {}\n");
    let out = std::process::Command::new("prlimit")
        .args(["--nofile=256:256", env!("CARGO_BIN_EXE_portcullis"), "run", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr.contains("limits need up to 1128 file descriptors") && stderr.contains("open-file limit is 256"), "{stderr}");
    assert!(stderr.contains("lower limits.max_connections to 64"), "{stderr}");
}

/// The red team's N7: a reload is held to the descriptor budget start-up
/// is held to. Under `prlimit --nofile=256`, a reload that raises
/// `max_connections` past what 256 descriptors can serve is refused with
/// the numbers, counted, and the old policy keeps serving; a reload within
/// the budget is then taken.
#[tokio::test]
async fn a_reload_past_the_descriptor_limit_is_refused_and_the_old_policy_stays() {
    let origin = start_http_origin().await;
    let yaml = |max_connections: u32, mode: &str| {
        format!(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nallow_ranges: [127.0.0.0/8]\n\
             limits:\n  max_connections: {max_connections}\n  max_idle_upstream: 16\n\
             roles:\n  default:\n    mode: {mode}\n    allow: {{http_ports: [{}]}}\n",
            origin.port()
        )
    };
    let path = temp_file("reload-nofile", "portcullis.yaml", &yaml(64, "open"));
    let running = Running::start_with_nofile(&path, 256);
    let url = format!("http://127.0.0.1:{}/", origin.port());
    assert_eq!(get(running.addr, &url).await.status, 200, "allowed by the first policy");
    let replace = |text: String| {
        let staged = path.with_extension("staged");
        std::fs::write(&staged, text).unwrap();
        std::fs::rename(&staged, &path).unwrap();
    };

    replace(yaml(500, "enforce"));
    let refused = running.wait_for("config reload refused");
    assert!(refused.contains("limits need up to 1080 file descriptors") && refused.contains("open-file limit is 256"), "{refused}");
    assert_eq!(get(running.addr, &url).await.status, 200, "the old policy still serves");
    let metrics = send_raw(running.admin, "GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n").await.text();
    assert_eq!(metric_value(&metrics, "portcullis_config_reloads_total{result=\"failure\"}"), 1.0);
    assert_eq!(metric_value(&metrics, "portcullis_policy_generation"), 1.0);

    replace(yaml(64, "enforce"));
    running.wait_for("config reloaded");
    let denied = get(running.addr, &url).await;
    assert_eq!((denied.status, denied.header("x-portcullis-deny")), (403, Some("not-allowlisted")), "the policy within the budget is in force");
}

/// A proxy told to listen on port 0 still knows its own ports: the policy
/// is compiled with the addresses the kernel chose, at start and at every
/// reload of a file that still says 0, so a request to them is `self`.
#[tokio::test]
async fn listeners_on_port_zero_are_still_self() {
    let yaml = "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nreload:\n  interval: 100ms\n\
                allow_ranges: [127.0.0.0/8]\nroles:\n  default:\n    mode: open\n";
    let path = temp_file("self-zero", "portcullis.yaml", yaml);
    let running = Running::start(&path);
    let check = |phase: &'static str| {
        let (proxy, admin) = (running.addr, running.admin);
        async move {
            for own in [proxy, admin] {
                let (resp, _) = connect(proxy, &own.to_string()).await;
                assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("denied-range:self")), "{phase}: CONNECT {own}");
                let resp = get(proxy, &format!("http://{own}/metrics")).await;
                assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("denied-range:self")), "{phase}: GET {own}");
            }
        }
    };
    check("at start").await;
    let staged = path.with_extension("staged");
    std::fs::write(&staged, format!("{yaml}deny_message: reloaded\n")).unwrap();
    std::fs::rename(&staged, &path).unwrap();
    running.wait_for("config reloaded");
    check("after a reload").await;
}
