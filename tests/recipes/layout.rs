//! The Kestra and Argo recipes as network layouts, in namespaces of the
//! test's own (like tests/compose_layout.rs), with the recipes' own
//! Portcullis configs and redirect.sh settings:
//! - Kestra: task containers behind the Docker-in-Docker namespace (router
//!   mode), and Kestra's JVM on an internal link whose only way out is the
//!   explicit proxy;
//! - Argo on node mode: a workflow pod behind the node, its executor
//!   reaching the API server (excluded) and the MinIO carve-out.
//!
//! The test's own namespace is the world: tests/router/world.py's origin
//! (allowed.test), metadata canary and every other canary, plus stand-ins
//! for the API server and MinIO. Workloads run as root with every
//! capability in their own namespace, flush and reroute it, and try every
//! protocol (tests/router/attack.py); no canary may hear from them.

use super::{netns, path, repo, Killed};


use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use netns::{run, set_mode, sh, Netns};
use serde_json::Value as Json;
use serde_yaml_ng::Value;

const WORLD_ADDRS: [&str; 8] =
    ["11.0.0.10/32", "11.0.0.50/32", "11.0.0.53/32", "169.254.169.254/32", "2600::10/128", "2600::50/128", "10.96.0.1/32", "10.96.5.5/32"];
const ORIGIN: &str = "11.0.0.10";

/// A router namespace (dind, or a node) joined to the world, and one
/// workload namespace behind it on `iface`.
struct Lab {
    dir: PathBuf,
    hosts: PathBuf,
    router: Netns,
    workload: Netns,
    /// The router's address on the world link: Portcullis dials from it.
    router_addr: &'static str,
    /// The workload's addresses (IPv4, IPv6).
    workload_addrs: (&'static str, &'static str),
    children: Vec<Killed>,
}

fn addr(ns: Option<&Netns>, dev: &str, a: &str) {
    let args = ["ip", "addr", "add", a, "dev", dev];
    match ns {
        Some(ns) => ns.sh(&args),
        None => sh(&args),
    };
    let up = ["ip", "link", "set", dev, "up"];
    match ns {
        Some(ns) => ns.sh(&up),
        None => sh(&up),
    };
}

impl Lab {
    /// `link`: the world<->router link's number; `iface`: the workload
    /// interface's name on the router; `net`: the workload's /24 and /64
    /// prefixes (router .1, workload `host`).
    fn build(tag: &str, link: u8, iface: &str, net: (&str, &str), host: (&'static str, &'static str)) -> Lab {
        let dir = std::env::temp_dir().join(format!("portcullis-recipes-{}/{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        set_mode(&dir, 0o755);
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, format!("127.0.0.1 localhost\n{ORIGIN} allowed.test\n10.96.5.5 minio.argo.svc.cluster.local\n")).unwrap();
        set_mode(&hosts, 0o644);
        let router_addr: &'static str = Box::leak(format!("10.255.{link}.2").into_boxed_str());
        let lab = Lab { dir, hosts, router: Netns::start(), workload: Netns::start(), router_addr, workload_addrs: host, children: vec![] };
        let (r, w) = (lab.router.pid(), lab.workload.pid());
        let world_if = format!("w-{tag}");
        sh(&["ip", "link", "add", &world_if, "type", "veth", "peer", "name", "uplink", "netns", &r]);
        addr(None, &world_if, &format!("10.255.{link}.1/24"));
        addr(None, &world_if, &format!("fd00:255:{link}::1/64"));
        addr(Some(&lab.router), "uplink", &format!("{router_addr}/24"));
        addr(Some(&lab.router), "uplink", &format!("fd00:255:{link}::2/64"));
        lab.router.sh(&["ip", "route", "add", "default", "via", &format!("10.255.{link}.1")]);
        lab.router.sh(&["ip", "-6", "route", "add", "default", "via", &format!("fd00:255:{link}::1")]);
        lab.router.sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]);
        sh(&["ip", "link", "add", iface, "netns", &r, "type", "veth", "peer", "name", "eth0", "netns", &w]);
        addr(Some(&lab.router), iface, &format!("{}.1/24", net.0));
        addr(Some(&lab.router), iface, &format!("{}::1/64", net.1));
        addr(Some(&lab.workload), "eth0", &format!("{}/24", host.0));
        addr(Some(&lab.workload), "eth0", &format!("{}/64", host.1));
        lab.workload.sh(&["ip", "route", "add", "default", "via", &format!("{}.1", net.0)]);
        lab.workload.sh(&["ip", "-6", "route", "add", "default", "via", &format!("{}::1", net.1)]);
        sh(&["ip", "route", "add", &format!("{}.0/24", net.0), "via", &format!("10.255.{link}.2")]);
        sh(&["ip", "-6", "route", "add", &format!("{}::/64", net.1), "via", &format!("fd00:255:{link}::2")]);
        lab
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        set_mode(&path, 0o644);
        path
    }

    fn start_world(&mut self) -> PathBuf {
        let cert = rcgen::generate_simple_self_signed(vec!["allowed.test".to_string()]).unwrap();
        let (crt, key) = (self.write("origin.crt", &cert.cert.pem()), self.write("origin.key", &cert.key_pair.serialize_pem()));
        let log = self.dir.join("world.log");
        let child = Command::new("python3")
            .arg(repo("tests/router/world.py"))
            .args(["world", crt.to_str().unwrap(), key.to_str().unwrap()])
            .stdout(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.children.push(Killed(child));
        wait_for("world.py ready", || events(&log).iter().any(|e| e["event"] == "ready"));
        log
    }

    /// redirect.sh in the router namespace with the recipe's `env`.
    fn redirect(&self, env: &[(String, String)]) {
        let mut cmd = self.router.cmd("sh");
        cmd.arg(path("deploy/transparent/redirect.sh"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = run(&mut cmd);
        assert!(out.status.success(), "redirect.sh: {}{}", text(&out), String::from_utf8_lossy(&out.stderr));
    }

    /// A command in the workload, as root, no proxy variables, the lab's hosts.
    fn client(&self, argv: &[&str]) -> Output {
        run(&mut self.workload.client(&self.hosts, argv))
    }

    /// The workload takes its own namespace apart and tries every way out,
    /// as root with every capability and after setuid.
    fn attack(&self) {
        let net = self.workload_addrs.0.rsplit_once('.').unwrap().0;
        for cmd in [
            &["nft", "flush", "ruleset"][..],
            &["iptables", "-t", "mangle", "-A", "OUTPUT", "-j", "MARK", "--set-mark", "0x1"],
            &["ip", "route", "add", "169.254.169.254/32", "via", &format!("{net}.1"), "dev", "eth0", "onlink"],
        ] {
            self.workload.sh(cmd);
        }
        let script = path("tests/router/attack.py");
        for uid in ["0", "62211", "65532", "1000"] {
            let out = self.client(&["python3", &script, "0x539", uid]);
            assert!(out.status.success() && text(&out).contains("\"done\""), "attack.py as {uid}: {}{}", text(&out), String::from_utf8_lossy(&out.stderr));
        }
    }

    /// Counts, in the world, every packet a workload address starts
    /// (replies to the world's own connections are not counted), except
    /// to `allowed` (destinations the recipe leaves to NetworkPolicy).
    fn watch(&self, allowed: &[&str]) {
        let except = if allowed.is_empty() { String::new() } else { format!(" ip daddr != {{ {} }}", allowed.join(", ")) };
        let rules = format!(
            "table inet watch {{\n chain pre {{\n  type filter hook prerouting priority -150; policy accept;\n  \
             ip saddr {}{except} ct direction original counter\n  ip6 saddr {} ct direction original counter\n }}\n}}\n",
            self.workload_addrs.0, self.workload_addrs.1
        );
        let mut nft = Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().unwrap();
        nft.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
        assert!(nft.wait().unwrap().success(), "nft watch table");
    }

    /// No packet from the workload and no canary reached the world; the
    /// origin heard only from Portcullis (the router's address, or `proxies`).
    fn assert_nothing_left(&self, world_log: &Path, proxies: &[&str]) {
        let counters = sh(&["nft", "list", "table", "inet", "watch"]);
        let leaked: Vec<&str> = counters.lines().filter(|l| l.contains("counter packets") && !l.contains("counter packets 0 ")).collect();
        assert!(leaked.is_empty(), "packets from the workload reached the world:\n{counters}");
        let canaries: Vec<Json> = events(world_log).into_iter().filter(|e| e["event"] != "ready" && e["event"] != "origin").collect();
        assert!(canaries.is_empty(), "world canaries reached: {canaries:?}");
        let origin: Vec<Json> = events(world_log).into_iter().filter(|e| e["event"] == "origin").collect();
        assert!(!origin.is_empty(), "the allowed origin was reached");
        for hit in origin {
            let src = hit["src"].as_str().unwrap_or_default();
            assert!(src == self.router_addr || proxies.contains(&src), "the origin is reached only from Portcullis: {hit}");
        }
    }
}

/// Portcullis in `ns` with `config`; returns once it listens, with the
/// file its decision log goes to.
fn start_proxy(ns: &Netns, dir: &Path, name: &str, config: &Path) -> (Killed, PathBuf) {
    let log = dir.join(format!("{name}.log"));
    let mut child = ns.cmd(env!("CARGO_BIN_EXE_portcullis")).args(["run", "--config"]).arg(config).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a startup line").unwrap();
    assert!(first.contains("portcullis listening"), "{name}: {first}");
    let mut file = std::fs::File::create(&log).unwrap();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = writeln!(file, "{line}");
        }
    });
    (Killed(child), log)
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(Instant::now() < deadline, "{what}: not within 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn events(log: &Path) -> Vec<Json> {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// A recipe's Portcullis config with the test's names pinned (no DNS
/// server in the lab) and allowed.test allowed for `role`.
fn lab_config(rel: &str, role: &str, pins: &[(&str, &str)]) -> String {
    let mut config: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(repo(rel)).unwrap()).unwrap();
    let mut statics = serde_yaml_ng::Mapping::new();
    for (name, ip) in pins {
        statics.insert(Value::from(*name), Value::Sequence(vec![Value::from(*ip)]));
    }
    config["dns"] = serde_yaml_ng::from_str("{nameservers: [\"11.0.0.53:53\"], timeout: 2s}").unwrap();
    config["dns"]["static"] = Value::Mapping(statics);
    config["reload"] = serde_yaml_ng::from_str("{watch: false}").unwrap();
    config["roles"][role]["allow"]["domains"].as_sequence_mut().unwrap().push(Value::from("allowed.test"));
    serde_yaml_ng::to_string(&config).unwrap()
}

/// The `environment` of a compose service, as pairs.
fn compose_env(service: &Value) -> Vec<(String, String)> {
    service["environment"].as_mapping().unwrap().iter().map(|(k, v)| (k.as_str().unwrap().to_string(), v.as_str().unwrap().to_string())).collect()
}

/// curl in `ns` (no proxy variables, the lab's hosts file): the status code, 000 when none.
fn curl_in(ns: &Netns, hosts: &Path, args: &[&str]) -> String {
    let mut argv = vec!["curl", "-sk", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}"];
    argv.extend_from_slice(args);
    text(&run(&mut ns.client(hosts, &argv)))
}

fn curl(lab: &Lab, args: &[&str]) -> String {
    curl_in(&lab.workload, &lab.hosts, args)
}

/// Kestra's layout: task containers behind dind's namespace (the recipe's
/// redirect service env and task policy), Kestra's JVM behind the explicit
/// proxy (the recipe's explicit policy) on an internal link.
#[test]
fn kestra_tasks_and_jvm_reach_only_what_the_policy_allows() {
    netns::in_own_netns("layout::kestra_tasks_and_jvm_reach_only_what_the_policy_allows", || {
        sh(&["ip", "link", "set", "lo", "up"]);
        for a in WORLD_ADDRS {
            sh(&["ip", "addr", "add", a, "dev", "lo"]);
        }
        let mut lab = Lab::build("kestra", 1, "br-tasks", ("172.31.0", "fd00:31"), ("172.31.0.2", "fd00:31::2"));
        lab.watch(&[]);
        let world = lab.start_world();
        let compose: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(repo("deploy/kestra/docker-compose.yml")).unwrap()).unwrap();
        let tasks_config = lab.write("tasks.yaml", &lab_config("deploy/compose/portcullis.kestra-tasks.yaml", "default", &[("allowed.test", ORIGIN)]));
        let (proxy, _) = start_proxy(&lab.router, &lab.dir, "tasks-proxy", &tasks_config);
        lab.children.push(proxy);
        lab.redirect(&compose_env(&compose["services"]["redirect"]));
        assert_eq!(curl(&lab, &["http://allowed.test/"]), "200");
        assert_eq!(curl(&lab, &["https://allowed.test/"]), "200");
        assert_eq!(curl(&lab, &["http://169.254.169.254/latest/meta-data/"]), "403");
        lab.attack();

        // Kestra's JVM: on an internal link whose only other end is the
        // explicit proxy (no route anywhere else).
        let (proxy, jvm) = (Netns::start(), Netns::start());
        sh(&["ip", "link", "add", "w-proxy", "type", "veth", "peer", "name", "uplink", "netns", &proxy.pid()]);
        addr(None, "w-proxy", "10.255.3.1/24");
        addr(Some(&proxy), "uplink", "10.255.3.2/24");
        proxy.sh(&["ip", "route", "add", "default", "via", "10.255.3.1"]);
        sh(&["ip", "link", "add", "internal", "netns", &proxy.pid(), "type", "veth", "peer", "name", "eth0", "netns", &jvm.pid()]);
        addr(Some(&proxy), "internal", "10.30.0.1/24");
        addr(Some(&jvm), "eth0", "10.30.0.2/24");
        let explicit = lab.write("explicit.yaml", &lab_config("deploy/compose/portcullis.kestra.yaml", "default", &[("allowed.test", ORIGIN)]));
        let (explicit, _) = start_proxy(&proxy, &lab.dir, "explicit", &explicit);
        lab.children.push(explicit);
        let via = ["-x", "http://10.30.0.1:3128"];
        assert_eq!(curl_in(&jvm, &lab.hosts, &[via[0], via[1], "http://allowed.test/"]), "200");
        assert_eq!(curl_in(&jvm, &lab.hosts, &[via[0], via[1], "https://allowed.test/"]), "200");
        assert_eq!(curl_in(&jvm, &lab.hosts, &[via[0], via[1], "http://169.254.169.254/latest/meta-data/"]), "403");
        for direct in ["http://allowed.test/", "http://169.254.169.254/", "http://11.0.0.50:8080/"] {
            assert_eq!(curl_in(&jvm, &lab.hosts, &[direct]), "000", "the JVM has no way out but the proxy: {direct}");
        }
        lab.assert_nothing_left(&world, &["10.255.3.2"]);
    });
}

/// Argo on node mode: a workflow pod in the workflows namespace's pool
/// (role argo-workflows) behind the node, with the recipe's node policy.
/// The executor reaches the API server stand-in (the Service IP excluded,
/// left to NetworkPolicy) and MinIO by its name on 9000 (the carve-out);
/// MinIO's address by literal, the metadata service and every canary stay
/// out of reach, whatever root in the pod does.
#[test]
fn argo_pod_reaches_api_server_and_minio_and_nothing_else() {
    netns::in_own_netns("layout::argo_pod_reaches_api_server_and_minio_and_nothing_else", || {
        sh(&["ip", "link", "set", "lo", "up"]);
        for a in WORLD_ADDRS {
            sh(&["ip", "addr", "add", a, "dev", "lo"]);
        }
        let (api, api_hits) = super::counting_origin("10.96.0.1:443");
        let (_minio, minio_hits) = super::counting_origin("10.96.5.5:9000");
        let mut lab = Lab::build("argo", 2, "vpod1", ("10.244.64", "fd00:244:64"), ("10.244.64.7", "fd00:244:64::7"));
        lab.watch(&[&api.ip().to_string()]);
        let world = lab.start_world();
        let mut config: Value = serde_yaml_ng::from_str(&lab_config(
            "deploy/argo/node/portcullis.yaml",
            "argo-workflows",
            &[("allowed.test", ORIGIN), ("minio.argo.svc.cluster.local", "10.96.5.5")],
        ))
        .unwrap();
        // The lab's pod prefix is IPv6 too; the recipe's pools are examples.
        config["identity"]["sources"].as_sequence_mut().unwrap().push(serde_yaml_ng::from_str("{cidr: \"fd00:244:64::/64\", role: argo-workflows}").unwrap());
        let config = lab.write("node.yaml", &serde_yaml_ng::to_string(&config).unwrap());
        let (proxy, proxy_log) = start_proxy(&lab.router, &lab.dir, "node-proxy", &config);
        lab.children.push(proxy);
        let env = [("PORTCULLIS_MODE", "router"), ("PORTCULLIS_FROM", "vpod+"), ("PORTCULLIS_TRANSPARENT_PORT", "15001"), ("PORTCULLIS_EXCLUDE", "10.96.0.1")];
        lab.redirect(&env.map(|(k, v)| (k.to_string(), v.to_string())));

        // The executor (argoexec runs as 8737): the API server directly, MinIO by name.
        let exec = |args: &[&str]| {
            let mut argv = vec!["setpriv", "--reuid", "8737", "--regid", "8737", "--clear-groups", "curl", "-sk", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}"];
            argv.extend_from_slice(args);
            text(&lab.client(&argv))
        };
        assert_eq!(exec(&["http://10.96.0.1:443/apis/argoproj.io/v1alpha1/namespaces/workflows/workflowtaskresults"]), "200");
        assert_eq!(exec(&["http://minio.argo.svc.cluster.local:9000/argo-artifacts/key"]), "200");
        assert_eq!(exec(&["http://10.96.5.5:9000/argo-artifacts/key"]), "403", "MinIO by literal stays internal");
        assert_eq!(exec(&["http://169.254.169.254/computeMetadata/v1/"]), "403");
        assert_eq!(exec(&["https://allowed.test/"]), "200");
        let decisions = events(&proxy_log);
        let minio = decisions.iter().find(|e| e.to_string().contains("minio.argo.svc.cluster.local")).expect("a decision line for MinIO");
        assert!(minio.to_string().contains("argo-workflows"), "decided as the namespace's role: {minio}");
        assert_eq!(minio_hits.load(std::sync::atomic::Ordering::SeqCst), 1, "MinIO reached once, by name");
        assert_eq!(api_hits.load(std::sync::atomic::Ordering::SeqCst), 1, "the API server reached directly");
        lab.attack();
        lab.assert_nothing_left(&world, &[]);
        assert_eq!(minio_hits.load(std::sync::atomic::Ordering::SeqCst), 1, "nothing else reached MinIO");
    });
}
