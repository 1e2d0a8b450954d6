//! Transparent interception end to end, through real sockets and the
//! shipped `deploy/transparent/redirect.sh`.
//!
//! Each test re-executes itself under `unshare -n`, so every address,
//! route and netfilter rule below lives in namespaces it created itself:
//! - the test's own namespace plays "the internet": origins, canaries and
//!   the DNS server, on addresses added to its loopback;
//! - a child namespace plays the pod: Portcullis (as the script's default
//!   exempt uid, 62211),
//!   the redirect rules, and clients (curl, Python, Java, Node, raw TCP) run
//!   as root with no proxy variables, resolving names from a bind-mounted
//!   hosts file (`unshare -m`).
//!
//! The two are joined by a veth pair. A canary is a listener that counts
//! connections; every canary must count zero at the end.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use netns::{in_own_netns, run, set_mode, sh, Netns};

/// redirect.sh's default exempt uid; the test relies on the default.
const PROXY_UID: &str = "62211";
const TRANSPARENT_PORT: u16 = 15001;
const NET_V4: &str = "10.77.0.1";
const POD_V4: &str = "10.77.0.2";
const NET_V6: &str = "fd77::1";
const POD_V6: &str = "fd77::2";
/// allowed.test (also 2600::10).
const ORIGIN: &str = "11.0.0.10";
const ORIGIN_V6: &str = "2600::10";
/// Another public address: SNI/Host say allowed.test, packets go here.
const ELSEWHERE: &str = "11.0.0.20";
const ELSEWHERE_V6: &str = "2600::20";
/// unlisted.test.
const UNLISTED: &str = "11.0.0.30";
/// Raw TCP: not allowed, and allowed by a CIDR rule.
const RAW_DENIED: &str = "11.0.0.40";
const RAW_ALLOWED: &str = "11.0.0.50";
const METADATA: &str = "169.254.169.254";
const METADATA_V6: &str = "fd00:ec2::254";

#[test]
fn clients_without_proxy_settings_are_intercepted_iptables() {
    in_own_netns("clients_without_proxy_settings_are_intercepted_iptables", || scenario("iptables", true));
}

#[test]
fn clients_without_proxy_settings_are_intercepted_nft() {
    in_own_netns("clients_without_proxy_settings_are_intercepted_nft", || scenario("nft", false));
}

/// `PORTCULLIS_DNS_PORT` in sidecar mode, both backends in turn: UDP DNS to
/// any resolver lands on that port in the pod, not at the resolver; TCP DNS
/// is redirected there too; `--check` and `--remove` see and take exactly
/// what was installed.
#[test]
fn sidecar_dns_goes_to_the_dns_port() {
    in_own_netns("sidecar_dns_goes_to_the_dns_port", || {
        sh(&["ip", "link", "set", "lo", "up"]);
        let pod = Pod::start();
        wire(&pod);
        let resolver = std::net::UdpSocket::bind(sock(NET_V4, 53)).unwrap();
        resolver.set_nonblocking(true).unwrap();
        let files = Files::new();
        let log = files.dir.join("dns-port.log");
        let world_py = format!("{}/tests/router/world.py", env!("CARGO_MANIFEST_DIR"));
        let mut stand_in = pod.cmd("python3").args([&world_py, "dns", "5353"]).stdout(std::fs::File::create(&log).unwrap()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("ready") {
            assert!(Instant::now() < deadline, "DNS stand-in not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/transparent/redirect.sh");
        let redirect = |backend: &str, args: &[&str]| {
            run(pod.cmd("sh").arg(&script).args(args).env("PORTCULLIS_DNS_PORT", "5353").env("PORTCULLIS_BACKEND", backend))
        };
        let query = "import socket, sys\n\
                     q = bytes.fromhex('123401000001000000000000') + bytes([len(sys.argv[1])]) + sys.argv[1].encode() + bytes.fromhex('0000010001')\n\
                     socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(q, (sys.argv[2], 53))\n\
                     s = socket.create_connection((sys.argv[2], 53), timeout=5)\n\
                     s.sendall(len(q).to_bytes(2, 'big') + q)\n";
        for backend in ["iptables", "nft"] {
            let out = redirect(backend, &[]);
            assert!(out.status.success(), "{backend}: {}", String::from_utf8_lossy(&out.stderr));
            assert!(redirect(backend, &["--check"]).status.success(), "{backend}: --check");
            let name = format!("via{backend}");
            let out = run(pod.cmd("python3").args(["-c", query, &name, NET_V4]));
            // TCP 53 is redirected to 5353, where only UDP listens: refused.
            assert!(String::from_utf8_lossy(&out.stderr).contains("ConnectionRefusedError"), "{backend}: {out:?}");
            let deadline = Instant::now() + Duration::from_secs(10);
            while !std::fs::read_to_string(&log).unwrap().contains(&name) {
                assert!(Instant::now() < deadline, "{backend}: the UDP query did not reach PORTCULLIS_DNS_PORT");
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(resolver.recv_from(&mut [0u8; 512]).is_err(), "{backend}: a query reached the resolver itself");
            assert!(redirect(backend, &["--remove"]).status.success(), "{backend}: --remove");
            assert!(!redirect(backend, &["--check"]).status.success(), "{backend}: --check after --remove");
            let left = format!("{}{}{}", pod.sh(&["iptables-save"]), pod.sh(&["ip6tables-save"]), pod.sh(&["nft", "list", "ruleset"]));
            assert!(!left.contains("PORTCULLIS") && !left.contains("portcullis") && !left.contains("tcp-reset"), "{backend} left:\n{left}");
        }
        let _ = stand_in.kill();
        let _ = stand_in.wait();
    });
}

/// The pod: a network namespace of its own, and the proxy running in it.
struct Pod {
    ns: Netns,
    proxy: Option<Child>,
}

impl Pod {
    fn start() -> Pod {
        Pod { ns: Netns::start(), proxy: None }
    }

    /// `nsenter` into the pod's network namespace.
    fn cmd(&self, program: &str) -> Command {
        self.ns.cmd(program)
    }

    fn sh(&self, args: &[&str]) -> String {
        self.ns.sh(args)
    }

    /// A client command in the pod, as root, with no proxy variables and
    /// the test's hosts file in a private mount namespace.
    fn client(&self, hosts: &Path, program: &[&str]) -> Command {
        self.ns.client(hosts, program)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(proxy) = &mut self.proxy {
            let _ = proxy.kill();
            let _ = proxy.wait();
        }
    }
}

/// Connection counters of every canary listener, by name.
type Canaries = HashMap<&'static str, Arc<AtomicUsize>>;

/// Origins, canaries and DNS in the test's namespace, served by `rt`.
fn start_internet(rt: &tokio::runtime::Runtime) -> Canaries {
    for addr in [ORIGIN, ELSEWHERE, UNLISTED, RAW_DENIED, RAW_ALLOWED, METADATA] {
        sh(&["ip", "addr", "add", &format!("{addr}/32"), "dev", "lo"]);
    }
    for addr in [ORIGIN_V6, ELSEWHERE_V6, METADATA_V6] {
        sh(&["ip", "-6", "addr", "add", &format!("{addr}/128"), "dev", "lo", "nodad"]);
    }
    rt.block_on(async {
        common::start_dns_on(
            format!("{NET_V4}:53").parse().unwrap(),
            &[("allowed.test", &[ORIGIN, ORIGIN_V6]), ("unlisted.test", &[UNLISTED])],
        )
        .await;
        let tls = tls_acceptor();
        for ip in [ORIGIN, ORIGIN_V6] {
            spawn_origin(sock(ip, 80), None).await;
            spawn_origin(sock(ip, 443), Some(tls.clone())).await;
        }
        common::start_tcp_echo_on(sock(RAW_ALLOWED, 7000)).await;
        let mut canaries = Canaries::new();
        for (name, ip, port) in [
            ("elsewhere:443", ELSEWHERE, 443),
            ("elsewhere:80", ELSEWHERE, 80),
            ("elsewhere6:443", ELSEWHERE_V6, 443),
            ("metadata:80", METADATA, 80),
            ("metadata:443", METADATA, 443),
            ("metadata6:80", METADATA_V6, 80),
            ("unlisted:80", UNLISTED, 80),
            ("unlisted:443", UNLISTED, 443),
            ("raw-denied:7000", RAW_DENIED, 7000),
        ] {
            canaries.insert(name, spawn_canary(sock(ip, port)).await);
        }
        canaries.insert("udp-elsewhere:9999", spawn_udp_canary(sock(ELSEWHERE, 9999)).await);
        canaries
    })
}

fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let cert = rcgen::generate_simple_self_signed(vec!["allowed.test".to_string()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(cert.cert.der().to_vec())], key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// An HTTP(S) origin answering `origin local=<addr> host=<Host>`, so a
/// client can tell which address served it.
async fn spawn_origin(addr: SocketAddr, tls: Option<tokio_rustls::TlsAcceptor>) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| async move {
                    let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("").to_string();
                    let body = format!("origin local={addr} host={host}\n");
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body))))
                });
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    None => {
                        let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
                    }
                    Some(tls) => {
                        if let Ok(stream) = tls.accept(stream).await {
                            let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
                        }
                    }
                }
            });
        }
    });
}

async fn spawn_canary(addr: SocketAddr) -> Arc<AtomicUsize> {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            eprintln!("CANARY {addr} reached from {peer}");
            counter.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    count
}

async fn spawn_udp_canary(addr: SocketAddr) -> Arc<AtomicUsize> {
    let socket = tokio::net::UdpSocket::bind(addr).await.unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while socket.recv_from(&mut buf).await.is_ok() {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    count
}

/// The veth pair between the test's namespace and the pod, with routes.
fn wire(pod: &Pod) {
    let pid = pod.ns.pid();
    sh(&["ip", "link", "add", "tp-net", "type", "veth", "peer", "name", "tp-pod", "netns", &pid]);
    sh(&["ip", "addr", "add", &format!("{NET_V4}/24"), "dev", "tp-net"]);
    sh(&["ip", "-6", "addr", "add", &format!("{NET_V6}/64"), "dev", "tp-net", "nodad"]);
    sh(&["ip", "link", "set", "tp-net", "up"]);
    pod.sh(&["ip", "addr", "add", &format!("{POD_V4}/24"), "dev", "tp-pod"]);
    pod.sh(&["ip", "-6", "addr", "add", &format!("{POD_V6}/64"), "dev", "tp-pod", "nodad"]);
    pod.sh(&["ip", "link", "set", "tp-pod", "up"]);
    pod.sh(&["ip", "route", "add", "default", "via", NET_V4]);
    pod.sh(&["ip", "-6", "route", "add", "default", "via", NET_V6]);
}

struct Files {
    dir: PathBuf,
}

impl Files {
    fn new() -> Files {
        let dir = std::env::temp_dir().join(format!("portcullis-transparent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        set_mode(&dir, 0o755);
        Files { dir }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        set_mode(&path, 0o644);
        path
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts Portcullis in the pod under the exempt uid, and waits for /readyz.
fn start_proxy(pod: &mut Pod, files: &Files) -> PathBuf {
    let config = files.write(
        "portcullis.yaml",
        &format!(
            "listen: 127.0.0.1:3128\n\
             admin_listen: {POD_V4}:9128\n\
             transparent_listen: \"[::]:{TRANSPARENT_PORT}\"\n\
             reload: {{watch: false}}\n\
             dns: {{nameservers: [\"{NET_V4}:53\"]}}\n\
             roles:\n  default:\n    allow:\n      domains: [allowed.test]\n      cidrs: [{RAW_ALLOWED}/32]\n      \
             http_ports: [80]\n      connect_ports: [443, 7000]\n"
        ),
    );
    let log = files.dir.join("proxy.log");
    let stdout = std::fs::File::create(&log).unwrap();
    let proxy = pod
        .cmd("setpriv")
        .args(["--reuid", PROXY_UID, "--regid", PROXY_UID, "--clear-groups", env!("CARGO_BIN_EXE_portcullis"), "run", "--config"])
        .arg(&config)
        .stdout(stdout)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start portcullis in the pod");
    pod.proxy = Some(proxy);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !admin_get("/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
        assert!(Instant::now() < deadline, "portcullis did not become ready: {}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(50));
    }
    log
}

/// GET on the admin listener (reached over the veth, from outside the pod).
fn admin_get(path: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect_timeout(&sock(POD_V4, 9128), Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}

fn redirect(pod: &Pod, backend: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/transparent/redirect.sh");
    let out = run(pod
        .cmd("sh")
        .arg(&script)
        .env("PORTCULLIS_TRANSPARENT_PORT", TRANSPARENT_PORT.to_string())
        .env("PORTCULLIS_DNS_RESOLVERS", NET_V4)
        .env("PORTCULLIS_BACKEND", backend));
    assert!(out.status.success(), "redirect.sh failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// One client's result for one case.
#[derive(Debug, Clone)]
struct Seen {
    status: i64,
    deny: String,
    body: String,
}

fn parse_results(client: &str, out: &Output) -> HashMap<String, Seen> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{client} exited {}: {stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{client}: {e}: {line}"));
            let seen = Seen {
                status: v["status"].as_i64().unwrap_or(-2),
                deny: v["deny"].as_str().unwrap_or("").to_string(),
                body: format!("{}{}", v["body"].as_str().unwrap_or(""), v["error"].as_str().unwrap_or("")),
            };
            (v["case"].as_str().unwrap_or("").to_string(), seen)
        })
        .collect()
}

/// curl, one invocation per case; `-i` output parsed into the same shape.
fn curl(pod: &Pod, hosts: &Path, cases: &[(&str, &str)], extra: &[&str]) -> HashMap<String, Seen> {
    let mut results = HashMap::new();
    for (case, url) in cases {
        let mut args = vec!["curl", "-sSik", "-m", "10", "-g"];
        args.extend_from_slice(extra);
        args.push(url);
        let out = run(&mut pod.client(hosts, &args));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let seen = if out.status.success() {
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(-2);
            let deny = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-portcullis-deny:").map(|v| v.trim().to_string()))
                .unwrap_or_default();
            Seen { status, deny, body: body.to_string() }
        } else {
            Seen { status: -1, deny: String::new(), body: String::from_utf8_lossy(&out.stderr).into_owned() }
        };
        results.insert(case.to_string(), seen);
    }
    results
}

/// `program tests/transparent/<script> args...` as a pod client.
fn script_client(pod: &Pod, hosts: &Path, program: &str, script: &str, args: &[String]) -> Command {
    let script = format!("{}/tests/transparent/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut argv = vec![program, script.as_str()];
    argv.extend(args.iter().map(String::as_str));
    pod.client(hosts, &argv)
}

/// The cases every client runs, by name and URL.
const WEB_CASES: [(&str, &str); 6] = [
    ("https-allowed", "https://allowed.test/"),
    ("http-allowed", "http://allowed.test/"),
    ("http-metadata", "http://169.254.169.254/latest/meta-data/"),
    ("https-metadata", "https://169.254.169.254/"),
    ("http-unlisted", "http://unlisted.test/"),
    ("https-unlisted", "https://unlisted.test/"),
];

/// What every client must see for [`WEB_CASES`].
fn check_web(client: &str, results: &HashMap<String, Seen>) {
    let get = |case: &str| results.get(case).cloned().unwrap_or_else(|| panic!("{client}: no result for {case}: {results:?}"));
    let ok = get("https-allowed");
    assert_eq!(ok.status, 200, "{client} https-allowed: {ok:?}");
    assert!(ok.body.contains(&format!("local={ORIGIN}:443 host=allowed.test")), "{client} https-allowed: {ok:?}");
    let ok = get("http-allowed");
    assert_eq!(ok.status, 200, "{client} http-allowed: {ok:?}");
    assert!(ok.body.contains(&format!("local={ORIGIN}:80 host=allowed.test")), "{client} http-allowed: {ok:?}");
    let denied = get("http-metadata");
    assert_eq!((denied.status, denied.deny.as_str()), (403, "denied-range:metadata"), "{client}: {denied:?}");
    let denied = get("http-unlisted");
    assert_eq!((denied.status, denied.deny.as_str()), (403, "not-allowlisted"), "{client}: {denied:?}");
    for case in ["https-metadata", "https-unlisted"] {
        let closed = get(case);
        assert_eq!(closed.status, -1, "{client} {case} must fail (connection closed): {closed:?}");
    }
}

fn scenario(backend: &str, every_client: bool) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    sh(&["ip", "link", "set", "lo", "up"]);
    let mut pod = Pod::start();
    wire(&pod);
    let canaries = start_internet(&rt);
    let files = Files::new();
    let hosts = files.write("hosts", &format!("127.0.0.1 localhost\n{ORIGIN} allowed.test\n{UNLISTED} unlisted.test\n"));
    let log = start_proxy(&mut pod, &files);
    redirect(&pod, backend);

    // curl: the web cases, then IPv6, then SNI/Host naming an allowed host
    // while the packets go to another address.
    check_web("curl", &curl(&pod, &hosts, &WEB_CASES, &[]));
    let v6 = curl(
        &pod,
        &hosts,
        &[
            ("https-allowed6", "https://allowed.test/"),
            ("http-allowed6", "http://allowed.test/"),
        ],
        &["-6", "--resolve", &format!("allowed.test:443:[{ORIGIN_V6}]"), "--resolve", &format!("allowed.test:80:[{ORIGIN_V6}]")],
    );
    assert!(v6["https-allowed6"].body.contains(&format!("local=[{ORIGIN_V6}]:443")), "{v6:?}");
    assert!(v6["http-allowed6"].body.contains(&format!("local=[{ORIGIN_V6}]:80")), "{v6:?}");
    let meta6 = curl(&pod, &hosts, &[("http-metadata6", &format!("http://[{METADATA_V6}]/"))], &[]);
    assert_eq!(meta6["http-metadata6"].deny, "denied-range:metadata", "{meta6:?}");
    // IPv6 destinations that PREROUTING's REDIRECT cannot translate are
    // translated in OUTPUT: Portcullis decides them, nothing hangs.
    let odd6 = curl(&pod, &hosts, &[("compat", "http://[::10.0.0.1]/"), ("site-local", "http://[fec0::1]/")], &[]);
    for case in ["compat", "site-local"] {
        assert_eq!(odd6[case].status, 403, "{case}: {odd6:?}");
    }
    for (ip, port) in [(ELSEWHERE, 443), (ELSEWHERE, 80), (ELSEWHERE_V6, 443)] {
        let bracketed = if ip.contains(':') { format!("[{ip}]") } else { ip.to_string() };
        let scheme = if port == 443 { "https" } else { "http" };
        let seen = curl(
            &pod,
            &hosts,
            &[("elsewhere", &format!("{scheme}://allowed.test/"))],
            &["--resolve", &format!("allowed.test:{port}:{bracketed}")],
        );
        let seen = &seen["elsewhere"];
        assert_eq!(seen.status, 200, "SNI/Host allowed.test to {ip}:{port}: {seen:?}");
        let served_by_checked = seen.body.contains(&format!("local={ORIGIN}:{port}"))
            || seen.body.contains(&format!("local=[{ORIGIN_V6}]:{port}"));
        assert!(served_by_checked, "to {ip}:{port}, served by a checked address of allowed.test: {seen:?}");
    }

    // Python: urllib for the web cases; sockets for raw TCP, TLS with a
    // chosen SNI, UDP and DNS.
    let py = |args: &[String]| parse_results("python", &run(&mut script_client(&pod, &hosts, "python3", "client.py", args)));
    let web: Vec<String> = WEB_CASES.iter().map(|(c, u)| format!("{c}={u}")).collect();
    check_web("python", &py(&web));
    let raw = py(&[
        format!("raw-allowed=tcp://{RAW_ALLOWED}:7000"),
        format!("raw-denied=tcp://{RAW_DENIED}:7000"),
        format!("tls-elsewhere=tls://{ELSEWHERE}:443/allowed.test"),
        format!("tls-elsewhere6=tls://[{ELSEWHERE_V6}]:443/allowed.test"),
        format!("keepalive=keepalive://{ORIGIN}:80/allowed.test,unlisted.test,allowed.test"),
        format!("udp-dropped=udp://{ELSEWHERE}:9999"),
        format!("dns-allowed=dns://{NET_V4}:53/allowed.test"),
    ]);
    assert_eq!(raw["raw-allowed"].body, "ping\n", "raw TCP to an allowed CIDR: {raw:?}");
    assert!(raw["raw-denied"].body.is_empty() || raw["raw-denied"].status == -1, "raw TCP denied: {raw:?}");
    for case in ["tls-elsewhere", "tls-elsewhere6"] {
        assert_eq!(raw[case].status, 200, "{case}: {raw:?}");
        assert!(raw[case].body.contains(":443 host=allowed.test"), "{case}: {raw:?}");
    }
    assert_eq!(raw["keepalive"].body, "200,403,200", "each request on a connection is decided on its own Host: {raw:?}");
    assert_eq!(raw["dns-allowed"].status, 1, "DNS to the configured resolver passes: {raw:?}");

    if every_client {
        let java = run(&mut script_client(&pod, &hosts, "java", "Client.java", &web));
        check_web("java", &parse_results("java", &java));
        let mut node = script_client(&pod, &hosts, "node", "client.mjs", &web);
        // The origin's certificate is a test one; SNI is what matters.
        node.env("NODE_TLS_REJECT_UNAUTHORIZED", "0");
        check_web("node", &parse_results("node", &run(&mut node)));
    }

    // Loop guard: straight to the transparent port (loopback is not redirected).
    let looped = curl(&pod, &hosts, &[("loop", &format!("http://127.0.0.1:{TRANSPARENT_PORT}/"))], &[]);
    assert_eq!(looped["loop"].status, -1, "a connection to the transparent port itself is refused: {looped:?}");

    std::thread::sleep(Duration::from_millis(300));
    for (name, count) in &canaries {
        assert_eq!(count.load(Ordering::SeqCst), 0, "canary {name} was reached");
    }
    check_log(&log);
    check_metrics();
    drop(pod);
    drop(rt);
}

/// The decision log: transparent kinds with original_dst, both addresses
/// logged when they differ, and no line from the proxy's own outbound
/// connections (they would come back as looped connections).
fn check_log(log: &Path) {
    let text = std::fs::read_to_string(log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "portcullis::access")
        .collect();
    let find = |kind: &str, original: &str, decision: &str| {
        lines
            .iter()
            .find(|v| v["kind"] == kind && v["original_dst"] == original && v["decision"] == decision)
            .unwrap_or_else(|| panic!("no {kind} {decision} line for {original} in:\n{text}"))
    };
    find("transparent-http", &format!("{ORIGIN}:80"), "allow");
    find("transparent-http", &format!("{METADATA}:80"), "deny");
    let elsewhere = find("transparent-tls", &format!("{ELSEWHERE}:443"), "allow");
    assert_eq!(elsewhere["host"], "allowed.test", "{elsewhere}");
    let dialed = elsewhere["dialed"].as_str().unwrap_or("");
    assert!(dialed == format!("{ORIGIN}:443") || dialed == format!("[{ORIGIN_V6}]:443"), "{elsewhere}");
    find("transparent-tls", &format!("{UNLISTED}:443"), "deny");
    find("transparent-tls", &format!("[{ORIGIN_V6}]:443"), "allow");
    let raw = find("transparent-tcp", &format!("{RAW_DENIED}:7000"), "deny");
    assert_eq!(raw["reason"], "not-allowlisted", "{raw}");
    find("transparent-tcp", &format!("{RAW_ALLOWED}:7000"), "allow");
    find("transparent-http", "[::a00:1]:80", "deny");
    find("transparent-http", "[fec0::1]:80", "deny");
    assert!(lines.iter().all(|v| v["kind"].as_str().is_some_and(|k| k.starts_with("transparent-"))), "{text}");
}

fn check_metrics() {
    let metrics = admin_get("/metrics").expect("metrics");
    let value = |needles: &[&str]| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("portcullis_") && needles.iter().all(|n| l.contains(n)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    for kind in ["transparent-http", "transparent-tls", "transparent-tcp"] {
        let kind = format!("kind=\"{kind}\"");
        assert!(value(&[&kind, "decision=\"deny\""]) >= 1.0, "{kind} denials counted:\n{metrics}");
        assert!(value(&[&kind, "decision=\"allow\""]) >= 1.0, "{kind} allows counted:\n{metrics}");
    }
    assert_eq!(value(&["reason=\"transparent_loop\""]), 1.0, "exactly the one direct connection looped:\n{metrics}");
}
