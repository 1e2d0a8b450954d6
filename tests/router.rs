//! Router mode end to end: Portcullis and `deploy/transparent/redirect.sh`
//! (`PORTCULLIS_MODE=router`) in the namespace that routes the workloads'
//! traffic, and workloads that are root in their own namespace.
//!
//! Each test re-executes itself under `unshare -n`; inside, every address,
//! link and rule lives in namespaces it created:
//! - the test's own namespace is "the world": the allowed origin, canaries
//!   for TCP, UDP, UDP-Lite, SCTP, ICMP and raw IP, a resolver logging every
//!   query (`tests/router/world.py`), and a netfilter counter of every packet
//!   a pod address starts;
//! - "node" routes between the world and two pods, and runs Portcullis (as a
//!   plain uid: router mode exempts nothing), the rules, a kubelet canary and
//!   a stand-in for the DNS listener on `PORTCULLIS_DNS_PORT`;
//! - pods "a" and "b", joined to the node by veth pairs with their own
//!   CIDRs, and so their own roles. In them, as root with every capability,
//!   the test flushes netfilter, changes routes, sets marks and switches
//!   uids before trying every way out (`tests/router/attack.py`).

#[path = "common/netns.rs"]
mod netns;
#[path = "router/manifest.rs"]
mod manifest;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use manifest::manifest_env;
use netns::{in_own_netns, run, set_mode, sh, Netns};

const TRANSPARENT_PORT: u16 = 15001;
const DNS_PORT: u16 = 5353;
const KUBELET_PORT: u16 = 10250;
const INGRESS_PORT: u16 = 8080;
/// The world's and the node's ends of their link.
const WORLD_LINK: (&str, &str) = ("10.255.0.1", "fd00:255::1");
const NODE_LINK: (&str, &str) = ("10.255.0.2", "fd00:255::2");
/// allowed.test.
const ORIGIN: &str = "11.0.0.10";
const WORLD_ADDRS: [&str; 6] = ["11.0.0.10/32", "11.0.0.50/32", "11.0.0.53/32", "169.254.169.254/32", "2600::10/128", "2600::50/128"];
const PROXY_UID: &str = "65532";

/// One workload namespace and its link to the node.
struct PodNet {
    name: &'static str,
    /// The node's end of the veth pair, named as Calico names them: the
    /// node manifest's `PORTCULLIS_FROM` (`cali+ ...`) must cover it.
    iface: &'static str,
    node: (&'static str, &'static str),
    pod: (&'static str, &'static str),
    cidr: (&'static str, &'static str),
    role: &'static str,
}

const PODS: [PodNet; 2] = [
    PodNet {
        name: "a",
        iface: "cali-a",
        node: ("10.1.0.1", "fd01::1"),
        pod: ("10.1.0.2", "fd01::2"),
        cidr: ("10.1.0.0/24", "fd01::/64"),
        role: "team-a",
    },
    PodNet {
        name: "b",
        iface: "cali-b",
        node: ("10.2.0.1", "fd02::1"),
        pod: ("10.2.0.2", "fd02::2"),
        cidr: ("10.2.0.0/24", "fd02::/64"),
        role: "team-b",
    },
];

/// Where redirected connections are sent.
#[derive(Clone, Copy, PartialEq)]
enum To {
    /// REDIRECT: the ingress interface's own address (pods behind
    /// addressed veths or a bridge: Flannel, kindnet, docker0).
    IngressAddress,
    /// DNAT to `PORTCULLIS_ROUTER_ADDRS`, the node's addresses; pod "b" is
    /// wired as Calico wires pods: no address on the node's end, proxy ARP,
    /// routes via 169.254.1.1 and a link-local gateway.
    RouterAddrs,
}

#[test]
fn router_mode_contains_root_workloads_iptables() {
    in_own_netns("router_mode_contains_root_workloads_iptables", || scenario("iptables", To::IngressAddress));
}

#[test]
fn router_mode_contains_root_workloads_nft() {
    in_own_netns("router_mode_contains_root_workloads_nft", || scenario("nft", To::IngressAddress));
}

#[test]
fn router_mode_with_addressless_pod_interfaces_iptables() {
    in_own_netns("router_mode_with_addressless_pod_interfaces_iptables", || scenario("iptables", To::RouterAddrs));
}

#[test]
fn router_mode_with_addressless_pod_interfaces_nft() {
    in_own_netns("router_mode_with_addressless_pod_interfaces_nft", || scenario("nft", To::RouterAddrs));
}

/// Where a helper process runs.
#[derive(Clone, Copy)]
enum Place {
    World,
    Node,
    Pod(&'static str),
}

/// The namespaces, files and background processes of one scenario.
struct Lab {
    node: Netns,
    pods: Vec<Netns>,
    dir: PathBuf,
    hosts: PathBuf,
    to: To,
    children: Vec<Child>,
    proxy: Option<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in self.children.iter_mut().chain(self.proxy.as_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Lab {
    fn build(to: To) -> Lab {
        let dir = std::env::temp_dir().join(format!("portcullis-router-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        set_mode(&dir, 0o755);
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, format!("127.0.0.1 localhost\n{ORIGIN} allowed.test\n")).unwrap();
        set_mode(&hosts, 0o644);
        let lab = Lab { node: Netns::start(), pods: vec![Netns::start(), Netns::start()], dir, hosts, to, children: vec![], proxy: None };
        lab.wire();
        lab
    }

    /// world <-> node <-> pods, with routes both ways.
    fn wire(&self) {
        sh(&["ip", "link", "set", "lo", "up"]);
        for addr in WORLD_ADDRS {
            sh(&["ip", "addr", "add", addr, "dev", "lo"]);
        }
        let node = self.node.pid();
        sh(&["ip", "link", "add", "w-node", "type", "veth", "peer", "name", "n-world", "netns", &node]);
        address(None, "w-node", WORLD_LINK.0, WORLD_LINK.1);
        address(Some(&self.node), "n-world", NODE_LINK.0, NODE_LINK.1);
        self.node.sh(&["ip", "route", "add", "default", "via", WORLD_LINK.0]);
        self.node.sh(&["ip", "-6", "route", "add", "default", "via", WORLD_LINK.1]);
        set_sysctl(&self.node, "net/ipv4/ip_forward");
        set_sysctl(&self.node, "net/ipv6/conf/all/forwarding");
        for (net, pod) in PODS.iter().zip(&self.pods) {
            sh(&["ip", "link", "add", net.iface, "netns", &node, "type", "veth", "peer", "name", "eth0", "netns", &pod.pid()]);
            if self.to == To::RouterAddrs && net.name == "b" {
                calico_style(&self.node, pod, net);
            } else {
                address(Some(&self.node), net.iface, net.node.0, net.node.1);
                address(Some(pod), "eth0", net.pod.0, net.pod.1);
                pod.sh(&["ip", "route", "add", "default", "via", net.node.0]);
                pod.sh(&["ip", "-6", "route", "add", "default", "via", net.node.1]);
            }
            sh(&["ip", "route", "add", net.cidr.0, "via", NODE_LINK.0]);
            sh(&["ip", "-6", "route", "add", net.cidr.1, "via", NODE_LINK.1]);
        }
    }

    fn pod(&self, name: &str) -> &Netns {
        &self.pods[PODS.iter().position(|p| p.name == name).unwrap()]
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        set_mode(&path, 0o644);
        path
    }

    /// Starts `tests/router/world.py ARGS` in `place` with
    /// its JSON lines going to `NAME.log`; waits for its "ready" line.
    fn start_world_py(&mut self, place: Place, name: &str, args: &[&str]) -> PathBuf {
        let log = self.dir.join(format!("{name}.log"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/router/world.py");
        let mut cmd = match place {
            Place::World => Command::new("python3"),
            Place::Node => self.node.cmd("python3"),
            Place::Pod(name) => self.pod(name).cmd("python3"),
        };
        let child = cmd
            .arg(script)
            .args(args)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        self.children.push(child);
        wait_for(&format!("{name} ready"), || events(&log).iter().any(|e| e["event"] == "ready"));
        log
    }

    fn start_proxy(&mut self) -> PathBuf {
        let mut sources = String::new();
        for net in &PODS {
            for cidr in [net.cidr.0, net.cidr.1] {
                sources += &format!("    - {{cidr: \"{cidr}\", role: {}}}\n", net.role);
            }
        }
        let allow = "    allow: {domains: [allowed.test], http_ports: [80], connect_ports: [443]}\n";
        let config = self.write(
            "portcullis.yaml",
            &format!(
                "listen: 127.0.0.1:3128\n\
                 admin_listen: {}:9128\n\
                 transparent_listen: \"[::]:{TRANSPARENT_PORT}\"\n\
                 reload: {{watch: false}}\n\
                 dns: {{nameservers: [\"11.0.0.53:53\"], static: {{allowed.test: [{ORIGIN}]}}}}\n\
                 identity:\n  sources:\n{sources}\
                 roles:\n  default: {{}}\n  team-a:\n{allow}  team-b:\n{allow}",
                NODE_LINK.0
            ),
        );
        let log = self.dir.join("proxy.log");
        let proxy = self
            .node
            .cmd("setpriv")
            .args(["--reuid", PROXY_UID, "--regid", PROXY_UID, "--clear-groups", env!("CARGO_BIN_EXE_portcullis"), "run", "--config"])
            .arg(&config)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start portcullis on the node");
        self.proxy = Some(proxy);
        wait_for("portcullis /readyz", || admin_get("/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")));
        log
    }

    fn stop_proxy(&mut self) {
        let mut proxy = self.proxy.take().expect("running");
        proxy.kill().unwrap();
        proxy.wait().unwrap();
    }

    /// redirect.sh on the node, router mode, with `args` (`--check`, ...),
    /// the interfaces named as the node manifest names them.
    fn redirect(&self, backend: &str, args: &[&str]) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/transparent/redirect.sh");
        let mut cmd = self.node.cmd("sh");
        cmd.arg(script)
            .args(args)
            .env("PORTCULLIS_MODE", "router")
            .env("PORTCULLIS_FROM", manifest_env("PORTCULLIS_FROM"))
            .env("PORTCULLIS_TRANSPARENT_PORT", TRANSPARENT_PORT.to_string())
            .env("PORTCULLIS_DNS_PORT", DNS_PORT.to_string())
            .env("PORTCULLIS_BACKEND", backend);
        if self.to == To::RouterAddrs {
            // As the downward API's status.hostIPs spells them.
            cmd.env("PORTCULLIS_ROUTER_ADDRS", format!("{},{}", NODE_LINK.0, NODE_LINK.1));
        }
        run(&mut cmd)
    }

    /// A command in a pod, as root, no proxy variables, the test's hosts file.
    fn client(&self, pod: &str, argv: &[&str]) -> Output {
        run(&mut self.pod(pod).client(&self.hosts, argv))
    }
}

fn address(ns: Option<&Netns>, dev: &str, v4: &str, v6: &str) {
    let cmds: [&[&str]; 3] = [
        &["ip", "addr", "add", &format!("{v4}/24"), "dev", dev],
        &["ip", "-6", "addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"],
        &["ip", "link", "set", dev, "up"],
    ];
    for cmd in cmds {
        match ns {
            Some(ns) => ns.sh(cmd),
            None => sh(cmd),
        };
    }
}

/// Sets a network sysctl of `ns` to 1 (/proc/sys/net is per namespace;
/// no procps needed).
fn set_sysctl(ns: &Netns, key: &str) {
    ns.sh(&["sh", "-c", &format!("echo 1 > /proc/sys/{key}")]);
}

/// Pod "b" as Calico wires a pod: a /32 and a /128, default routes via
/// 169.254.1.1 (answered by proxy ARP) and the node's link-local address;
/// the node's end of the pair has no address but that link-local one.
fn calico_style(node: &Netns, pod: &Netns, net: &PodNet) {
    set_sysctl(node, &format!("net/ipv4/conf/{}/proxy_arp", net.iface));
    node.sh(&["ip", "-6", "addr", "add", "fe80::1/64", "dev", net.iface, "nodad"]);
    node.sh(&["ip", "link", "set", net.iface, "up"]);
    node.sh(&["ip", "route", "add", &format!("{}/32", net.pod.0), "dev", net.iface]);
    node.sh(&["ip", "-6", "route", "add", &format!("{}/128", net.pod.1), "dev", net.iface]);
    pod.sh(&["ip", "addr", "add", &format!("{}/32", net.pod.0), "dev", "eth0"]);
    pod.sh(&["ip", "-6", "addr", "add", &format!("{}/128", net.pod.1), "dev", "eth0", "nodad"]);
    pod.sh(&["ip", "link", "set", "eth0", "up"]);
    pod.sh(&["ip", "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"]);
    pod.sh(&["ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"]);
    pod.sh(&["ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0"]);
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(Instant::now() < deadline, "{what}: not within 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The JSON lines of a log written by world.py or Portcullis.
fn events(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn admin_get(path: &str) -> Option<String> {
    let addr: SocketAddr = format!("{}:9128", NODE_LINK.0).parse().unwrap();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A self-signed certificate for allowed.test, as PEM files.
fn origin_cert(lab: &Lab) -> (PathBuf, PathBuf) {
    let cert = rcgen::generate_simple_self_signed(vec!["allowed.test".to_string()]).unwrap();
    (lab.write("origin.crt", &cert.cert.pem()), lab.write("origin.key", &cert.key_pair.serialize_pem()))
}

/// Counts, in the world, every packet a pod address starts (conntrack's
/// original direction): replies to the world's own connections are not
/// counted, anything else from a pod is a leak whatever its protocol.
fn watch_world() {
    let v4: Vec<&str> = PODS.iter().map(|p| p.cidr.0).collect();
    let v6: Vec<&str> = PODS.iter().map(|p| p.cidr.1).collect();
    let rules = format!(
        "table inet watch {{\n chain pre {{\n  type filter hook prerouting priority -150; policy accept;\n  \
         ip saddr {{ {} }} ct direction original counter\n  ip6 saddr {{ {} }} ct direction original counter\n }}\n}}\n",
        v4.join(", "),
        v6.join(", ")
    );
    let mut nft = Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().unwrap();
    nft.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
    assert!(nft.wait().unwrap().success(), "nft watch table");
}

fn assert_nothing_left_a_pod(world_log: &Path) {
    let counters = sh(&["nft", "list", "table", "inet", "watch"]);
    let leaked: Vec<&str> = counters.lines().filter(|l| l.contains("counter packets") && !l.contains("counter packets 0 ")).collect();
    assert!(leaked.is_empty(), "packets from a pod reached the world:\n{counters}");
    let canaries: Vec<Value> = events(world_log).into_iter().filter(|e| e["event"] != "ready" && e["event"] != "origin").collect();
    assert!(canaries.is_empty(), "world canaries reached: {canaries:?}");
    for hit in events(world_log).iter().filter(|e| e["event"] == "origin") {
        assert_eq!(hit["src"], NODE_LINK.0, "the origin is reached only from Portcullis on the node: {hit}");
    }
}

/// The pod's own netfilter flushed, its routes changed (a fwmark table, a
/// host route to the metadata address) and every packet marked: none of it
/// may matter.
fn subvert(pod: &Netns) {
    let gateway = |family: &str| {
        let route = pod.sh(&["ip", family, "route", "show", "default"]);
        route.split_whitespace().skip_while(|w| *w != "via").nth(1).expect("a default route").to_string()
    };
    let (gw4, gw6) = (gateway("-4"), gateway("-6"));
    for cmd in [
        &["nft", "flush", "ruleset"][..],
        &["iptables", "-F"],
        &["iptables", "-t", "nat", "-F"],
        &["ip6tables", "-F"],
        &["iptables", "-t", "mangle", "-A", "OUTPUT", "-j", "MARK", "--set-mark", "0x1"],
        &["ip", "rule", "add", "fwmark", "0x1", "lookup", "100"],
        &["ip", "route", "add", "default", "via", &gw4, "dev", "eth0", "onlink", "table", "100"],
        &["ip", "route", "add", "169.254.169.254/32", "via", &gw4, "dev", "eth0", "onlink"],
        &["ip", "-6", "route", "replace", "default", "via", &gw6, "dev", "eth0", "metric", "1"],
    ] {
        pod.sh(cmd);
    }
}

/// attack.py in a pod as root, then after setuid to other uids (the old
/// and the new sidecar exempt uid, a plain one); each run must finish.
fn attack(lab: &Lab, pod: &str) {
    let script = format!("{}/tests/router/attack.py", env!("CARGO_MANIFEST_DIR"));
    for uid in ["0", "62211", "65532", "1000"] {
        let out = lab.client(pod, &["python3", &script, "0x1", uid]);
        let text = stdout(&out);
        assert!(out.status.success() && text.contains("\"done\""), "attack.py as {uid} in pod {pod}: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// curl in a pod: (exit code, response head and body).
fn curl(lab: &Lab, pod: &str, url: &str) -> (i32, String) {
    let out = lab.client(pod, &["curl", "-sSik", "-m", "10", "-g", url]);
    (out.status.code().unwrap_or(-1), format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr)))
}

/// Python's urllib in a pod, no proxy settings (tests/transparent/client.py).
fn python_web(lab: &Lab, pod: &str, cases: &[&str]) -> Vec<Value> {
    let script = format!("{}/tests/transparent/client.py", env!("CARGO_MANIFEST_DIR"));
    let mut argv = vec!["python3", script.as_str()];
    argv.extend_from_slice(cases);
    let out = lab.client(pod, &argv);
    assert!(out.status.success(), "client.py: {}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    stdout(&out).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// A TCP connection to `addr`, reading until the peer closes.
fn connect_read(addr: &str, port: u16) -> String {
    let addr = SocketAddr::new(addr.parse().unwrap(), port);
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text
}

/// Python connects from a pod; prints "ADDR refused|connected|ERROR".
const CONNECT_PY: &str = r"import socket, sys
for a in sys.argv[1:]:
    s = socket.socket(socket.AF_INET6 if ':' in a else socket.AF_INET)
    s.settimeout(10)
    try:
        s.connect((a, 80)); s.sendall(b'GET / HTTP/1.0\r\n\r\n'); print(a, 'connected', s.recv(100).split(b'\r\n')[0])
    except ConnectionRefusedError: print(a, 'refused')
    except OSError as e: print(a, type(e).__name__)
";

fn scenario(backend: &str, to: To) {
    let mut lab = Lab::build(to);
    watch_world();
    let (cert, key) = origin_cert(&lab);
    let world_log = lab.start_world_py(Place::World, "world", &["world", cert.to_str().unwrap(), key.to_str().unwrap()]);
    let kubelet_log = lab.start_world_py(Place::Node, "kubelet", &["canary", &KUBELET_PORT.to_string()]);
    let node_dns_log = lab.start_world_py(Place::Node, "node-dns", &["dns", &DNS_PORT.to_string()]);
    let ingress_log = lab.start_world_py(Place::Pod("a"), "ingress", &["echo", &INGRESS_PORT.to_string()]);
    let proxy_log = lab.start_proxy();

    // Installed, checked, installed again: the same rules, not twice.
    let out = lab.redirect(backend, &[]);
    assert!(out.status.success(), "redirect.sh: {}", String::from_utf8_lossy(&out.stderr));
    let first = lab.redirect(backend, &["--check"]);
    assert!(first.status.success(), "--check after install: {}", String::from_utf8_lossy(&first.stderr));
    assert!(lab.redirect(backend, &[]).status.success());
    let second = lab.redirect(backend, &["--check"]);
    assert_eq!(stdout(&first), stdout(&second), "a second run changed the rules");
    assert!(!stdout(&first).contains("uid-owner") && !stdout(&first).contains("skuid"), "router mode exempts no uid: {}", stdout(&first));
    assert!(!stdout(&first).contains("mark"), "router mode exempts no mark: {}", stdout(&first));

    // Ingress: a probe on the node and a client in the world reach the pod's
    // listener and get its reply (conntrack's reply direction passes).
    let pod_a = &PODS[0];
    let probe = run(lab.node.cmd("python3").args(["-c", "import socket,sys; print(socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).recv(10).decode())", pod_a.pod.0, &INGRESS_PORT.to_string()]));
    assert_eq!(stdout(&probe).trim(), "pong", "probe from the node: {}", String::from_utf8_lossy(&probe.stderr));
    assert_eq!(connect_read(pod_a.pod.0, INGRESS_PORT), "pong\n", "world client to the pod over IPv4");
    assert_eq!(connect_read(pod_a.pod.1, INGRESS_PORT), "pong\n", "world client to the pod over IPv6");
    assert_eq!(events(&ingress_log).iter().filter(|e| e["event"] == "ingress").count(), 3);

    // The allowed origin, by name, no proxy variables: curl and Python.
    for net in &PODS {
        for (url, local) in [("http://allowed.test/", "11.0.0.10:80"), ("https://allowed.test/", "11.0.0.10:443")] {
            let (code, text) = curl(&lab, net.name, url);
            assert_eq!(code, 0, "curl {url} from pod {}: {text}", net.name);
            assert!(text.starts_with("HTTP/1.1 200") && text.contains(&format!("origin local={local} host=allowed.test")), "{url}: {text}");
        }
    }
    let py = python_web(&lab, "b", &["http=http://allowed.test/", "https=https://allowed.test/", "metadata=http://169.254.169.254/"]);
    let case = |name: &str| py.iter().find(|v| v["case"] == name).unwrap_or_else(|| panic!("{name}: {py:?}")).clone();
    assert_eq!(case("http")["status"], 200, "{py:?}");
    assert_eq!(case("https")["status"], 200, "{py:?}");
    assert!(case("https")["body"].as_str().unwrap().contains("local=11.0.0.10:443"), "{py:?}");
    assert_eq!((case("metadata")["status"].as_i64(), case("metadata")["deny"].as_str()), (Some(403), Some("denied-range:metadata")), "{py:?}");

    // The node's own addresses: decided by the policy, never served.
    for addr in [pod_a.node.0, NODE_LINK.0] {
        let (_, text) = curl(&lab, "a", &format!("http://{addr}:{KUBELET_PORT}/"));
        assert!(text.starts_with("HTTP/1.1 403") && text.to_ascii_lowercase().contains("x-portcullis-deny:"), "{addr}: {text}");
    }
    let (_, text) = curl(&lab, "a", &format!("http://[{}]:{KUBELET_PORT}/", pod_a.node.1));
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");

    // Portcullis's own listener as a destination: a loop, refused and logged.
    let (code, text) = curl(&lab, "a", &format!("http://{}:{TRANSPARENT_PORT}/", pod_a.node.0));
    assert!(code != 0 || !text.starts_with("HTTP/1.1 200"), "the transparent port itself: {text}");

    // IPv6 destinations REDIRECT cannot translate: refused at once, not
    // hung; DNAT to the node's address has no such limit, and Portcullis
    // decides them.
    let out = lab.client("a", &["python3", "-c", CONNECT_PY, "::10.0.0.1", "fec0::1"]);
    let seen = stdout(&out);
    let lines: Vec<&str> = seen.lines().collect();
    match to {
        To::IngressAddress => assert_eq!(lines, ["::10.0.0.1 refused", "fec0::1 refused"], "{}", String::from_utf8_lossy(&out.stderr)),
        To::RouterAddrs => {
            let denied = [("::10.0.0.1", "denied-range:private"), ("fec0::1", "denied-range:special")];
            assert_eq!(lines.len(), denied.len(), "{seen}");
            for (line, (addr, reason)) in lines.iter().zip(denied) {
                let ok = line.starts_with(&format!("{addr} connected b'HTTP/1.")) && line.contains(" 403 ") && line.contains(reason);
                assert!(ok, "{addr}: {line}");
            }
        }
    }

    // Root in the pod undoes what it can in its own namespace, then tries
    // every way out, as several uids.
    for pod in &lab.pods {
        subvert(pod);
    }
    for net in &PODS {
        attack(&lab, net.name);
    }
    // DNS to the world's resolver went to the node's DNS port instead.
    let asked = || events(&node_dns_log).into_iter().filter(|e| e["name"] == "udp-exfil.example").count();
    wait_for("each pod's UDP DNS query lands on PORTCULLIS_DNS_PORT", || asked() >= PODS.len());

    // Each pod's decisions carry its own role.
    let decisions: Vec<Value> = events(&proxy_log).into_iter().filter(|v| v["target"] == "portcullis::access").collect();
    for net in &PODS {
        let mine: Vec<&Value> = decisions
            .iter()
            .filter(|v| {
                let client = v["client"].as_str().unwrap_or("");
                client.starts_with(&format!("{}:", net.pod.0)) || client.starts_with(&format!("[{}]:", net.pod.1))
            })
            .collect();
        assert!(mine.len() >= 4, "decisions for pod {}: {decisions:?}", net.name);
        // A loop is refused before the client is identified.
        for v in mine.into_iter().filter(|v| v["reason"] != "loop-detected") {
            assert_eq!(v["role"], net.role, "pod {}: {v}", net.name);
        }
    }
    let looped = format!("{}:{TRANSPARENT_PORT}", pod_a.node.0);
    let refused = decisions.iter().find(|v| v["original_dst"] == looped.as_str());
    assert_eq!(refused.map(|v| v["reason"].clone()), Some(Value::from("loop-detected")), "{looped}: {decisions:?}");
    if to == To::RouterAddrs {
        for dst in ["[::a00:1]:80", "[fec0::1]:80"] {
            assert!(decisions.iter().any(|v| v["original_dst"] == dst && v["decision"] == "deny"), "no deny line for {dst}: {decisions:?}");
        }
    }
    let canary = decisions.iter().find(|v| v["original_dst"] == format!("{}:{KUBELET_PORT}", NODE_LINK.0));
    assert_eq!(canary.map(|v| v["decision"].clone()), Some(Value::from("deny")), "the node's address as a destination: {decisions:?}");
    let served = events(&kubelet_log).into_iter().filter(|e| e["event"] != "ready").count();
    assert_eq!(served, 0, "the node's own listener was reached from a pod");

    // Portcullis stopped: redirected connections are refused; nothing is
    // forwarded around it.
    let origin_hits = events(&world_log).iter().filter(|e| e["event"] == "origin").count();
    lab.stop_proxy();
    for url in ["http://allowed.test/", "https://allowed.test/", "http://169.254.169.254/"] {
        let (code, text) = curl(&lab, "a", url);
        assert_ne!(code, 0, "{url} with Portcullis stopped: {text}");
    }
    attack(&lab, "b");
    assert_eq!(events(&world_log).iter().filter(|e| e["event"] == "origin").count(), origin_hits, "origin reached with Portcullis down");
    assert_nothing_left_a_pod(&world_log);

    // --remove takes away exactly what was installed.
    let out = lab.redirect(backend, &["--remove"]);
    assert!(out.status.success(), "--remove: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!lab.redirect(backend, &["--check"]).status.success(), "--check after --remove must fail");
    let left = format!("{}{}{}", lab.node.sh(&["iptables-save"]), lab.node.sh(&["ip6tables-save"]), lab.node.sh(&["nft", "list", "ruleset"]));
    assert!(!left.to_ascii_lowercase().contains("portcullis"), "left behind:\n{left}");
}
