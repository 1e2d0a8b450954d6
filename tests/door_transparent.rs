//! The one door on the transparent listener: a redirected relay lives
//! under the same lifetimes as a CONNECT tunnel (`tunnel_max_lifetime`,
//! revocation), and a reload asks a redirected TLS tunnel the question it
//! was admitted on (as TLS, never as a CONNECT). Each test runs in a
//! network namespace of its own: the client, an unprivileged process, is
//! redirected by iptables to the proxy, which runs in-process as root and
//! whose own connections are not redirected (as in sidecar mode); the
//! echo services live in a second namespace behind a veth pair.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use common::*;
use netns::{in_own_netns, sh, Netns};
use portcullis::config::Config;
use portcullis::metrics::Metrics;
use portcullis::proxy::{Server, Snapshot, SnapshotHandle};

/// Where the client's packets are headed (redirected), and where
/// `allowed.test` is pinned: two addresses of the world namespace, an
/// echo service on each.
const HEADED: &str = "10.9.9.8";
const ORIGIN: &str = "10.9.9.9";
const PORT: u16 = 7007;

/// A client that sends a TLS ClientHello naming `allowed.test` (mode
/// `tls`) or nothing (mode `tcp`), then a byte every 100 ms, echoed back.
/// It prints `relaying` once the echo works, and `closed` when the
/// connection ends; after `seconds` it gives up with `still open`.
const CLIENT: &str = r#"
import socket, ssl, sys, time
mode, host, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
s = socket.create_connection((host, port), timeout=5)
if mode == "tls":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="allowed.test")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    s.sendall(hello)
    got = b""
    while len(got) < len(hello):
        chunk = s.recv(65536)
        if not chunk:
            print("closed", flush=True); sys.exit(0)
        got += chunk
deadline = time.monotonic() + seconds
announced = False
while time.monotonic() < deadline:
    try:
        s.sendall(b"x")
        if s.recv(1) != b"x":
            break
    except OSError:
        break
    if not announced:
        print("relaying", flush=True); announced = True
    time.sleep(0.1)
else:
    print("still open", flush=True); sys.exit(1)
print("closed", flush=True)
"#;

fn snapshot(yaml: &str, generation: u64) -> Snapshot {
    let config = Config::from_yaml_str(yaml, "door.yaml").expect("test config is valid");
    Snapshot::compile(&config, generation).expect("test config compiles")
}

/// An echo service on every address given, port `PORT`.
const ECHO: &str = r#"
import socket, sys, threading
def echo(c):
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    c.close()
def serve(addr):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, int(sys.argv[1])))
    s.listen(16)
    while True:
        c, _ = s.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
for addr in sys.argv[2:]:
    threading.Thread(target=serve, args=(addr,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// The world: a namespace behind a veth pair holding both addresses, an
/// echo service on each. Its addresses are not this host's, so the proxy
/// may reach them.
struct World {
    _ns: Netns,
    echo: Child,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.echo.kill();
        let _ = self.echo.wait();
    }
}

fn start_world() -> World {
    sh(&["ip", "link", "set", "lo", "up"]);
    let ns = Netns::start();
    let pid = ns.pid();
    sh(&["ip", "link", "add", "door-net", "type", "veth", "peer", "name", "door-world", "netns", &pid]);
    sh(&["ip", "addr", "add", "10.9.9.1/24", "dev", "door-net"]);
    sh(&["ip", "link", "set", "door-net", "up"]);
    for addr in [HEADED, ORIGIN] {
        ns.sh(&["ip", "addr", "add", &format!("{addr}/24"), "dev", "door-world"]);
    }
    ns.sh(&["ip", "link", "set", "door-world", "up"]);
    let script = temp_file("door-transparent", "echo.py", ECHO);
    let mut echo = ns
        .cmd("/usr/bin/python3")
        .arg(&script)
        .args([&PORT.to_string(), HEADED, ORIGIN])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the echo service");
    let mut ready = String::new();
    BufReader::new(echo.stdout.take().unwrap()).read_line(&mut ready).unwrap();
    assert_eq!(ready.trim(), "ready");
    World { _ns: ns, echo }
}

/// The proxy and its transparent listener, in-process; the reload handle.
async fn start_transparent(yaml: &str) -> SnapshotHandle {
    start_transparent_with(yaml, Arc::new(Metrics::new())).await
}

async fn start_transparent_with(yaml: &str, metrics: Arc<Metrics>) -> SnapshotHandle {
    start_transparent_redirecting(yaml, metrics, &["-m", "owner", "!", "--uid-owner", "0"]).await
}

/// [`start_transparent_with`], the redirect rule matching `owner` (empty:
/// every uid, the proxy's own connections included).
async fn start_transparent_redirecting(yaml: &str, metrics: Arc<Metrics>, owner: &[&str]) -> SnapshotHandle {
    let server = Server::bind_with("127.0.0.1:0".parse().unwrap(), snapshot(yaml, 1), metrics).await.unwrap();
    let own = [server.local_addr().unwrap()];
    let transparent = server.bind_transparent("0.0.0.0:0".parse().unwrap(), &own).await.unwrap();
    let port = transparent.local_addr().unwrap().port().to_string();
    let mut rule = vec!["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", HEADED];
    rule.extend_from_slice(owner);
    rule.extend_from_slice(&["-j", "REDIRECT", "--to-ports", &port]);
    sh(&rule);
    let handle = server.snapshot_handle();
    tokio::spawn(server.run());
    tokio::spawn(transparent.run_until(std::future::pending()));
    handle
}

/// The client, as an unprivileged user, headed for `HEADED:PORT`; its
/// stdout lines arrive on the returned channel.
fn spawn_client(mode: &str, seconds: u32) -> (std::process::Child, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let script = temp_file("door-transparent", "client.py", CLIENT);
    netns::set_mode(&script, 0o644);
    let mut child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3"])
        .arg(&script)
        .args([mode, HEADED, &PORT.to_string(), &seconds.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the client with setpriv and /usr/bin/python3");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

async fn next_line(lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(STEP * 2, lines.recv()).await.expect("the client reports").unwrap_or_default()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// The red team's N3: a redirected TCP connection that keeps sending is
/// closed at `tunnel_max_lifetime`, like a CONNECT tunnel.
#[test]
fn a_transparent_relay_stops_at_tunnel_max_lifetime() {
    in_own_netns("a_transparent_relay_stops_at_tunnel_max_lifetime", || {
        let _world = start_world();
        runtime().block_on(async {
            let yaml = format!(
                "timeouts:\n  tunnel_max_lifetime: 1s\nallow_ranges: [10.9.9.0/24]\n\
                 roles:\n  default:\n    allow:\n      cidrs: [10.9.9.0/24]\n      connect_ports: [{PORT}]\n"
            );
            start_transparent(&yaml).await;
            let (mut child, mut lines) = spawn_client("tcp", 8);
            assert_eq!(next_line(&mut lines).await, "relaying", "the redirected connection is relayed");
            assert_eq!(next_line(&mut lines).await, "closed", "and closed at its maximum lifetime");
            assert!(child.wait().unwrap().success());
        })
    });
}

/// A reload that moves a port from `connect_ports` to `http_ports` closes
/// a redirected TLS tunnel on it: the tunnel is asked again as the TLS
/// connection it is (a CONNECT to that port would still be allowed).
#[test]
fn a_reload_asks_a_transparent_tls_tunnel_again_as_tls() {
    in_own_netns("a_reload_asks_a_transparent_tls_tunnel_again_as_tls", || {
        let _world = start_world();
        runtime().block_on(async {
            let yaml = |list: &str| {
                format!(
                    "dns:\n  static:\n    allowed.test: [{ORIGIN}]\nallow_ranges: [10.9.9.0/24]\n\
                     roles:\n  default:\n    allow:\n      domains: [allowed.test]\n      {list}: [{PORT}]\n"
                )
            };
            let reload = start_transparent(&yaml("connect_ports")).await;
            let (mut child, mut lines) = spawn_client("tls", 20);
            assert_eq!(next_line(&mut lines).await, "relaying", "SNI allowed.test is relayed to its checked address");
            reload.store(Arc::new(snapshot(&yaml("http_ports"), 2)));
            assert_eq!(next_line(&mut lines).await, "closed", "the reload revokes the redirected TLS tunnel");
            assert!(child.wait().unwrap().success());
        })
    });
}

/// Sends one raw request (`\\r\\n` written as such in the argument) to
/// `host:port` and prints the answer's status line and its
/// `X-Portcullis-Error` value.
const RAW: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(sys.argv[3].encode().decode("unicode_escape").encode("latin-1"))
answer = b""
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        answer += chunk
except socket.timeout:
    pass
head = answer.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
error = [l.split(":", 1)[1].strip() for l in head[1:] if l.lower().startswith("x-portcullis-error:")]
print(head[0], error[0] if error else "-", flush=True)
"#;

/// Issue 29 and the red team's N9 on the transparent HTTP entrance: two
/// Host lines and a CONNECT request are refused with 400 before any
/// decision, each counted with its code, and nothing is forwarded.
#[test]
fn redirected_http_is_framed_as_strictly_as_the_proxy_port() {
    in_own_netns("redirected_http_is_framed_as_strictly_as_the_proxy_port", || {
        let _world = start_world();
        runtime().block_on(async {
            let yaml = "dns:\n  static:\n    allowed.test: [10.9.9.9]\nallow_ranges: [10.9.9.0/24]\n\
                        roles:\n  default:\n    allow:\n      domains: [allowed.test]\n      http_ports: [7007]\n";
            let metrics = Arc::new(Metrics::new());
            start_transparent_with(yaml, metrics.clone()).await;
            let script = temp_file("door-transparent", "raw.py", RAW);
            netns::set_mode(&script, 0o644);
            for (code, request) in [
                ("duplicate-host", "GET / HTTP/1.1\\r\\nHost: allowed.test\\r\\nHost: 169.254.169.254\\r\\n\\r\\n"),
                ("connect-redirected", "CONNECT allowed.test:443 HTTP/1.1\\r\\nHost: allowed.test:443\\r\\n\\r\\n"),
            ] {
                let out = Command::new("setpriv")
                    .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3"])
                    .arg(&script)
                    .args([HEADED, &PORT.to_string(), request])
                    .output()
                    .expect("run the raw client");
                let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
                assert_eq!(answer, format!("HTTP/1.1 400 Bad Request (portcullis: {code}) {code}"), "{request}");
                let counted = metrics.render().lines().any(|l| {
                    l.starts_with("portcullis_requests_total") && l.contains(&format!("reason=\"{code}\"")) && l.ends_with(" 1")
                });
                assert!(counted, "{code} counted:\n{}", metrics.render());
            }
        })
    });
}

/// Issue 23's loop guard: in sidecar mode with the wrong exempt uid the
/// proxy's own connections are redirected back to it. The first one that
/// comes back is refused as `loop-detected` (one refusal, one decision
/// line), and the client gets an answer at once instead of a hundred hops
/// and a 431.
#[test]
fn a_connection_redirected_back_from_the_proxy_itself_is_a_loop() {
    in_own_netns("a_connection_redirected_back_from_the_proxy_itself_is_a_loop", || {
        let _world = start_world();
        runtime().block_on(async {
            let yaml = "dns:\n  static:\n    allowed.test: [10.9.9.8]\nallow_ranges: [10.9.9.0/24]\n\
                        roles:\n  default:\n    allow:\n      domains: [allowed.test]\n      http_ports: [7007]\n";
            let metrics = Arc::new(Metrics::new());
            start_transparent_redirecting(yaml, metrics.clone(), &[]).await;
            let script = temp_file("door-transparent", "raw.py", RAW);
            let out = Command::new("/usr/bin/python3")
                .arg(&script)
                .args([HEADED, &PORT.to_string(), "GET / HTTP/1.1\\r\\nHost: allowed.test\\r\\n\\r\\n"])
                .output()
                .expect("run the raw client");
            let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
            assert!(answer.starts_with("HTTP/1.1 502 "), "the client is answered at once: {answer}");
            let text = metrics.render();
            let value = |needle: &str| {
                text.lines().filter(|l| l.contains(needle) && !l.starts_with('#')).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum::<f64>()
            };
            assert_eq!(value("reason=\"transparent_loop\""), 1.0, "one loop, refused at its first return:\n{text}");
            assert_eq!(value("reason=\"loop-detected\""), 1.0, "with its decision line:\n{text}");
        })
    });
}
