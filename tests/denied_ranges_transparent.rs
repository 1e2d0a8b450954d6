//! Every always-denied row, through the transparent listener: in a network
//! namespace of the test's own, TCP from an unprivileged client to port 80
//! of any address is redirected by iptables (IPv4) and ip6tables (IPv6) to
//! the proxy's transparent listener, which runs in-process as root and
//! whose own connections are not redirected (as in sidecar mode). A veth
//! pair into an empty namespace carries the default routes, so a connect
//! to every row's address is routed and then redirected. For an address inside each
//! denied row the client sends two plain HTTP requests: one naming the
//! address in `Host`, one HTTP/1.0 request without `Host`, judged by the
//! original destination the redirect recorded. What must happen comes from
//! tests/common/iana.rs (the registries' "Globally Reachable" column and
//! its documented exceptions), not from src/policy/registry.rs.
//!
//! Some addresses TCP cannot reach as themselves; they are listed in
//! [`UNREACHABLE`] with the reason, and the test checks that the connect
//! fails there with the errno the reason names (never silently skipped).
//! IPv4-compatible (::/96) and site-local (fec0::/10) destinations, which
//! REDIRECT in PREROUTING cannot translate (router mode, see
//! deploy/transparent/redirect.sh), are translated by REDIRECT in OUTPUT
//! (sidecar mode, this test) and so are checked here like any other row. A canary listens on port 80
//! of every address of the namespace: a wrong allow that dialed would land
//! on it, and it must see no connection.

mod common;
#[path = "common/iana.rs"]
mod iana;
#[path = "common/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Command;
use std::sync::Arc;

use common::*;
use netns::{in_own_netns, sh, Netns};
use portcullis::config::Config;
use portcullis::metrics::Metrics;
use portcullis::proxy::{Server, Snapshot};

/// Addresses whose TCP connect never leaves the client's kernel as a
/// connection to that address, the errno the connect fails with, and why.
/// The client must see exactly that failure for each (checked, not skipped).
const UNREACHABLE: &[(&str, &str, &str)] = &[
    ("224.0.0.0/4", "ENETUNREACH", "multicast: the kernel refuses a TCP connect to a multicast route"),
    ("255.255.255.255/32", "ENETUNREACH", "limited broadcast: the kernel refuses a TCP connect to a broadcast route"),
    ("ff00::/8", "ENETUNREACH", "IPv6 multicast: the kernel refuses a TCP connect to it"),
    ("fe80::/10", "EINVAL", "link-local needs a scope id; with one the connection is bound to its interface and REDIRECT cannot reroute it (deploy/transparent/redirect.sh)"),
];

/// Connects to 0.0.0.0 and :: go to the host itself: the kernel sends them
/// to 127.0.0.1 and ::1. With `Host` naming them they are judged as named
/// (`special`); without `Host` the original destination the redirect
/// recorded is the loopback address, denied as `loopback`.
const TO_LOOPBACK: &[&str] = &["0.0.0.0", "::"];

/// For each address: connect to port 80, send a request (`host` mode:
/// `Host` names the address; `bare` mode: HTTP/1.0 without `Host`), print
/// `<addr> <mode> <status> <X-Portcullis-Deny or ->`, or `<addr> <mode>
/// connect-failed <errno name>` when the connect fails.
const CLIENT: &str = r#"
import errno, socket, sys
for addr in sys.argv[1:]:
    literal = "[" + addr + "]" if ":" in addr else addr
    for mode, request in (("host", "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % literal),
                          ("bare", "GET / HTTP/1.0\r\n\r\n")):
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect((addr, 80))
        except OSError as e:
            print(addr, mode, "connect-failed", errno.errorcode.get(e.errno, str(e)), flush=True)
            s.close()
            continue
        s.sendall(request.encode())
        answer = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except OSError:
            pass
        s.close()
        head = answer.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        status = head[0].split(" ")[1] if head[0].startswith("HTTP/") else "no-answer"
        deny = [l.split(":", 1)[1].strip() for l in head[1:] if l.lower().startswith("x-portcullis-deny:")]
        print(addr, mode, status, deny[0] if deny else "-", flush=True)
"#;

fn unreachable_reason(addr: IpAddr) -> Option<(&'static str, &'static str)> {
    UNREACHABLE.iter().find(|(net, ..)| net.parse::<ipnet::IpNet>().unwrap().contains(&addr)).map(|(_, errno, why)| (*errno, *why))
}

#[test]
fn every_always_denied_row_is_denied_through_the_transparent_listener() {
    in_own_netns("every_always_denied_row_is_denied_through_the_transparent_listener", || {
        sh(&["ip", "link", "set", "lo", "up"]);
        // Routes for every address: a veth pair whose far end sits in an
        // empty namespace (nothing there answers, nothing routes on), with
        // one address per family on the near end and the default routes.
        let far = Netns::start();
        sh(&["ip", "link", "add", "ranges0", "type", "veth", "peer", "name", "ranges1", "netns", &far.pid()]);
        far.sh(&["ip", "link", "set", "ranges1", "up"]);
        sh(&["ip", "link", "set", "ranges0", "up"]);
        sh(&["ip", "addr", "add", "10.200.0.1/32", "dev", "ranges0"]);
        sh(&["ip", "-6", "addr", "add", "fd99::1/128", "dev", "ranges0", "nodad"]);
        sh(&["ip", "route", "add", "default", "dev", "ranges0"]);
        sh(&["ip", "-6", "route", "add", "default", "dev", "ranges0"]);
        // The canary: port 80 on every address of the namespace, both families.
        let canary = std::net::TcpListener::bind("[::]:80").expect("bind the canary on [::]:80");
        canary.set_nonblocking(true).unwrap();

        let mut wanted: Vec<(IpAddr, &'static str, String)> = Vec::new();
        for (addr, kind, row) in iana::denied_addresses() {
            wanted.push((addr, kind, format!("{} {}", row.prefix, row.name)));
        }
        // The transition forms, judged by the IPv4 address they carry (an
        // IPv4-mapped destination is an IPv4 connection to that address).
        for (text, carried) in iana::CARRIED {
            let Some(kind) = carried else { continue };
            wanted.push((text.parse().unwrap(), kind, "a transition form".to_string()));
        }
        assert!(wanted.len() >= 90, "{} addresses", wanted.len());
        for (net, ..) in UNREACHABLE {
            assert!(wanted.iter().any(|(a, ..)| unreachable_reason(*a).is_some() && net.parse::<ipnet::IpNet>().unwrap().contains(a)), "{net} is tried");
        }

        let metrics = Arc::new(Metrics::new());
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let lines = runtime.block_on(async {
            let yaml = "roles:\n  default:\n    mode: open\n    allow:\n      http_ports: [80]\n";
            let config = Config::from_yaml_str(yaml, "ranges.yaml").expect("test config is valid");
            let snapshot = Snapshot::compile(&config, 1).expect("test config compiles");
            let server = Server::bind_with("127.0.0.1:0".parse().unwrap(), snapshot, metrics.clone()).await.unwrap();
            let own = [server.local_addr().unwrap()];
            let transparent = server.bind_transparent("[::]:0".parse().unwrap(), &own).await.unwrap();
            let port = transparent.local_addr().unwrap().port().to_string();
            for ipt in ["iptables", "ip6tables"] {
                sh(&[ipt, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "80", "-m", "owner", "!", "--uid-owner", "0", "-j", "REDIRECT", "--to-ports", &port]);
            }
            tokio::spawn(server.run());
            tokio::spawn(transparent.run_until(std::future::pending()));
            let script = temp_file("denied-ranges-transparent", "client.py", CLIENT);
            netns::set_mode(&script, 0o644);
            let addrs: Vec<String> = wanted.iter().map(|(a, ..)| a.to_string()).collect();
            let out = tokio::task::spawn_blocking(move || {
                Command::new("timeout")
                    .args(["50", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3"])
                    .arg(&script)
                    .args(&addrs)
                    .output()
                    .expect("run the client with timeout, setpriv and /usr/bin/python3")
            })
            .await
            .unwrap();
            assert!(out.status.success(), "client: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).into_owned()
        });

        let answers: BTreeMap<(String, String), String> = lines
            .lines()
            .filter_map(|l| {
                let mut words = l.splitn(3, ' ');
                Some(((words.next()?.to_string(), words.next()?.to_string()), words.next()?.to_string()))
            })
            .collect();
        let mut refused_by_proxy = BTreeMap::<String, usize>::new();
        let mut unreachable = 0;
        let mut problems = Vec::new();
        for (addr, kind, row) in &wanted {
            for mode in ["host", "bare"] {
                let got = answers.get(&(addr.to_string(), mode.to_string())).map(String::as_str).unwrap_or("no line");
                let want = if let Some((errno, why)) = unreachable_reason(*addr) {
                    if got == format!("connect-failed {errno}") {
                        unreachable += 1;
                        continue;
                    }
                    format!("connect-failed {errno} ({why})")
                } else if mode == "bare" && TO_LOOPBACK.contains(&addr.to_string().as_str()) {
                    "403 denied-range:loopback".to_string()
                } else {
                    format!("403 denied-range:{kind}")
                };
                if got == want {
                    *refused_by_proxy.entry(want.split_once(' ').unwrap().1.to_string()).or_default() += 1;
                } else {
                    problems.push(format!("{addr} ({row}) {mode}: got `{got}`, want `{want}`"));
                }
            }
        }
        assert!(problems.is_empty(), "{} of {} wrong:\n{}", problems.len(), wanted.len() * 2, problems.join("\n"));
        let listed = wanted.iter().filter(|(a, ..)| unreachable_reason(*a).is_some()).count();
        assert_eq!(unreachable, 2 * listed, "every unreachable address failed to connect, both requests");
        // The decision behind each 403: one refusal counted per request, by reason.
        let text = metrics.render();
        for (reason, count) in &refused_by_proxy {
            let counted: f64 = text
                .lines()
                .filter(|l| l.starts_with("portcullis_requests_total") && l.contains(&format!("reason=\"{reason}\"")))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            assert_eq!(counted, *count as f64, "{reason} counted once per refused request:\n{text}");
        }
        match canary.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("a connection reached the canary on port 80: {other:?}"),
        }
    });
}
