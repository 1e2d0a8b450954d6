//! Router mode in the load bench: the client in a "pod" namespace joined to
//! the bench's namespace (the node) by a veth pair, with
//! `deploy/transparent/redirect.sh` in router mode on the node. Three paths
//! from the same pod in the same run, so the veth costs every column alike:
//! direct (to the node's veth address, excluded from the rules), explicit
//! (CONNECT and absolute-form through Portcullis's proxy port) and router
//! (to the stand-in address, redirected in PREROUTING).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{bulk, bulk_label, http_load, row, STAND_IN, TRANSPARENT_PORT};

/// Set in the pod's process: "origin_port,source_port,proxy_port".
pub const CLIENT: &str = "PORTCULLIS_LOAD_ROUTER_CLIENT";
const NODE: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 1);
const POD: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 2);

/// On the node: wires a pod namespace, installs the router rules and runs
/// the client phases there (this bench binary again, under `nsenter`).
pub fn compare(origin_port: u16, source_port: u16, proxy_port: u16) {
    let mut holder = Command::new("unshare").args(["-n", "sleep", "600"]).spawn().expect("unshare -n");
    let pid = holder.id().to_string();
    let mine = std::fs::read_link("/proc/self/ns/net").expect("own netns");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_link(format!("/proc/{pid}/ns/net")).ok().is_none_or(|ns| ns == mine) {
        assert!(Instant::now() < deadline, "pod namespace did not appear");
        std::thread::sleep(Duration::from_millis(10));
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/transparent/redirect.sh");
    let script = script.to_string_lossy().into_owned();
    let node = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<String>>();
    let in_pod = |args: &[&str]| [&["nsenter", "-t", pid.as_str(), "-n", "--"][..], args].concat().iter().map(|a| a.to_string()).collect::<Vec<String>>();
    let steps: Vec<Vec<String>> = vec![
        node(&["ip", "link", "add", "rt-node", "type", "veth", "peer", "name", "rt-pod", "netns", &pid]),
        node(&["ip", "addr", "add", "10.254.0.1/24", "dev", "rt-node"]),
        node(&["ip", "link", "set", "rt-node", "up"]),
        in_pod(&["ip", "link", "set", "lo", "up"]),
        in_pod(&["ip", "addr", "add", "10.254.0.2/24", "dev", "rt-pod"]),
        in_pod(&["ip", "link", "set", "rt-pod", "up"]),
        in_pod(&["ip", "route", "add", "default", "via", "10.254.0.1"]),
        node(&["env", "-u", "PORTCULLIS_UID", "PORTCULLIS_MODE=router", "PORTCULLIS_FROM=rt-node", "PORTCULLIS_EXCLUDE=10.254.0.1", "sh", &script]),
    ];
    for step in steps {
        let status = Command::new(&step[0])
            .args(&step[1..])
            .env("PORTCULLIS_TRANSPARENT_PORT", TRANSPARENT_PORT.to_string())
            .stdout(Stdio::null())
            .status()
            .expect("run a router setup step");
        assert!(status.success(), "{step:?} failed");
    }
    let exe = std::env::current_exe().expect("the bench binary knows its path");
    let status = Command::new("nsenter")
        .args(["-t", &pid, "-n", "--"])
        .arg(exe)
        .env(CLIENT, format!("{origin_port},{source_port},{proxy_port}"))
        .status()
        .expect("run the pod's client");
    stop(&mut holder);
    assert!(status.success(), "router phases failed: {status}");
}

fn stop(holder: &mut Child) {
    let _ = holder.kill();
    let _ = holder.wait();
}

/// In the pod: HTTP at 50 clients and tunnel throughput, direct, explicit
/// and router, each row's ratio against direct from the same pod.
pub async fn client(spec: &str) {
    let ports: Vec<u16> = spec.split(',').map(|p| p.parse().expect("a port")).collect();
    let [origin, source, proxy] = ports[..] else { panic!("{CLIENT}: three ports, not {spec}") };
    let node = |port| SocketAddr::from((NODE, port));
    let stand_in = |port| SocketAddr::from((STAND_IN, port));
    println!();
    println!("from a pod over a veth, client {POD} (router mode; direct = same pod to the node's address):");
    let direct = http_load(node(origin), None, 50).await;
    let explicit = http_load(stand_in(origin), Some(node(proxy)), 50).await;
    let router = http_load(stand_in(origin), None, 50).await;
    row("pod explicit HTTP req/s, 50 clients", direct.rps, explicit.rps, "");
    row("pod router HTTP req/s, 50 clients", direct.rps, router.rps, &format!("router/explicit: {:.2}", router.rps / explicit.rps));
    println!("  p50/p99 latency µs: direct {:.0} / {:.0}, explicit {:.0} / {:.0}, router {:.0} / {:.0}", direct.p50, direct.p99, explicit.p50, explicit.p99, router.p50, router.p99);
    for (which, r) in [("direct", &direct), ("explicit", &explicit), ("router", &router)] {
        if r.failures > 0 {
            println!("  {which}: {} failures, first: {:?}", r.failures, r.first_failure);
        }
    }
    let direct = bulk(node(source), None).await;
    let explicit = bulk(stand_in(source), Some(node(proxy))).await;
    let router = bulk(stand_in(source), None).await;
    row(&format!("pod explicit tunnel MB/s ({})", bulk_label()), direct.0, explicit.0, "");
    row(&format!("pod router tunnel MB/s ({})", bulk_label()), direct.0, router.0, &format!("router/explicit: {:.2}", router.0 / explicit.0));
}
