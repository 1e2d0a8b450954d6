//! The compose demos' network layout, rebuilt from the compose files with
//! network namespaces: the worker reaches the origin only through
//! Portcullis and never reaches the metadata canary.
//!
//! Each test re-executes itself under `unshare -n`; inside, every compose
//! service gets a namespace of its own and every compose network a bridge,
//! joined exactly as the file joins them (`networks:` per service,
//! `network_mode: service:X` sharing X's namespace). A network that is not
//! `internal: true` leads to "the world": one more namespace holding the
//! gateway, a metadata canary on 169.254.169.254 (counting connections)
//! and, for the transparent variant, the public origin. Docker's embedded
//! DNS is a hosts file per service naming the services it shares a network
//! with; Portcullis resolves the demo names through `dns.static`.

#[path = "common/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_yaml_ng::Value;

use netns::{in_own_netns, run, set_mode, sh, Netns};

const METADATA: &str = "169.254.169.254";
/// The transparent variant's origin, on the world side (a public address).
const PUBLIC_ORIGIN: &str = "11.0.0.10";

#[test]
fn cooperative_compose_worker_reaches_the_origin_only_through_portcullis() {
    in_own_netns("cooperative_compose_worker_reaches_the_origin_only_through_portcullis", cooperative);
}

#[test]
fn transparent_compose_worker_reaches_the_origin_only_through_portcullis() {
    in_own_netns("transparent_compose_worker_reaches_the_origin_only_through_portcullis", transparent);
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn compose(rel: &str) -> Value {
    let text = std::fs::read_to_string(root().join(rel)).unwrap();
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The networks a compose service joins (list or mapping form).
fn networks_of(service: &Value) -> Vec<String> {
    match &service["networks"] {
        Value::Sequence(list) => list.iter().map(|v| v.as_str().unwrap().to_string()).collect(),
        Value::Mapping(map) => map.keys().map(|k| k.as_str().unwrap().to_string()).collect(),
        Value::Null => vec!["default".to_string()],
        other => panic!("networks: {other:?}"),
    }
}

/// The compose layout as namespaces, bridges and addresses.
struct Layout {
    /// Namespace per service that owns one (not `network_mode: service:`).
    ns: BTreeMap<String, Netns>,
    /// Address per (service, network).
    addr: BTreeMap<(String, String), String>,
    world: Netns,
    files: PathBuf,
    children: Vec<Child>,
}

impl Drop for Layout {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.files);
    }
}

impl Layout {
    /// Builds the layout of `rel`: a bridge per network, a veth per
    /// (service, network), the world behind every non-internal network.
    fn build(rel: &str) -> Layout {
        sh(&["ip", "link", "set", "lo", "up"]);
        let file = compose(rel);
        let services = file["services"].as_mapping().unwrap();
        let files = std::env::temp_dir().join(format!("portcullis-compose-layout-{}", std::process::id()));
        std::fs::create_dir_all(&files).unwrap();
        set_mode(&files, 0o755);
        let mut layout =
            Layout { ns: BTreeMap::new(), addr: BTreeMap::new(), world: Netns::start(), files, children: Vec::new() };
        layout.world.sh(&["ip", "addr", "add", &format!("{METADATA}/32"), "dev", "lo"]);
        layout.world.sh(&["ip", "addr", "add", &format!("{PUBLIC_ORIGIN}/32"), "dev", "lo"]);
        let mut networks: Vec<String> = Vec::new();
        for (name, svc) in services {
            if svc.get("network_mode").is_some() {
                continue;
            }
            layout.ns.insert(name.as_str().unwrap().to_string(), Netns::start());
            for net in networks_of(svc) {
                if !networks.contains(&net) {
                    networks.push(net);
                }
            }
        }
        for (n, net) in networks.iter().enumerate() {
            let subnet = at(&file, &["networks", net, "ipam", "config", "0", "subnet"])
                .as_str()
                .map(|s| s.trim_end_matches(".0/24").to_string())
                .unwrap_or_else(|| format!("10.88.{n}"));
            let internal = at(&file, &["networks", net, "internal"]).as_bool() == Some(true);
            let bridge = format!("br{n}");
            sh(&["ip", "link", "add", &bridge, "type", "bridge"]);
            sh(&["ip", "link", "set", &bridge, "up"]);
            if !internal {
                layout.attach(&bridge, &format!("w{n}"), None, &format!("{subnet}.1"));
            }
            for (s, (name, svc)) in services.iter().enumerate() {
                let name = name.as_str().unwrap();
                if svc.get("network_mode").is_some() || !networks_of(svc).contains(net) {
                    continue;
                }
                let fixed = at(svc, &["networks", net, "ipv4_address"]).as_str().map(str::to_string);
                let ip = fixed.unwrap_or_else(|| format!("{subnet}.{}", 100 + s));
                layout.attach(&bridge, &format!("s{s}n{n}"), Some(name), &ip);
                if !internal {
                    layout.ns[name].sh(&["ip", "route", "add", "default", "via", &format!("{subnet}.1")]);
                }
                layout.addr.insert((name.to_string(), net.clone()), ip);
            }
        }
        layout
    }

    /// A veth from `bridge` into a service's namespace (or the world's).
    fn attach(&self, bridge: &str, link: &str, service: Option<&str>, ip: &str) {
        let ns = service.map_or(&self.world, |s| &self.ns[s]);
        let inner = format!("{link}i");
        sh(&["ip", "link", "add", link, "type", "veth", "peer", "name", &inner, "netns", &ns.pid()]);
        sh(&["ip", "link", "set", link, "master", bridge, "up"]);
        ns.sh(&["ip", "addr", "add", &format!("{ip}/24"), "dev", &inner]);
        ns.sh(&["ip", "link", "set", &inner, "up"]);
    }

    /// Docker's embedded DNS, as a hosts file: the services that share a
    /// network with `service`, under their service names.
    fn hosts_for(&self, service: &str, extra: &str) -> PathBuf {
        let mine: Vec<&String> = self.addr.keys().filter(|(s, _)| s == service).map(|(_, n)| n).collect();
        let mut text = String::from("127.0.0.1 localhost\n");
        for ((other, net), ip) in &self.addr {
            if other != service && mine.contains(&net) {
                text.push_str(&format!("{ip} {other}\n"));
            }
        }
        text.push_str(extra);
        self.write(&format!("hosts-{service}"), &text)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.files.join(name);
        std::fs::write(&path, text).unwrap();
        set_mode(&path, 0o644);
        path
    }

    /// Starts `cmd` with stdout and stderr in `<files>/<log>`.
    fn spawn(&mut self, mut cmd: Command, log: &str) -> PathBuf {
        let path = self.files.join(log);
        let out = std::fs::File::create(&path).unwrap();
        cmd.stdout(out.try_clone().unwrap()).stderr(out);
        self.children.push(cmd.spawn().unwrap_or_else(|e| panic!("{log}: {e}")));
        path
    }

    /// A canary on the world's metadata address, ports 80 and 443; each
    /// connection it accepts is a line in the returned log.
    fn start_canary(&mut self) -> PathBuf {
        let script = self.write(
            "canary.py",
            "import socket, sys, threading\n\
             def serve(s):\n    while True:\n        c, a = s.accept(); print('reached', s.getsockname(), a, flush=True); c.close()\n\
             socks = []\n\
             for port in (80, 443):\n    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n    \
             s.bind((sys.argv[1], port)); s.listen(); socks.append(s)\n\
             print('ready', flush=True)\n\
             for s in socks: threading.Thread(target=serve, args=(s,)).start()\n",
        );
        let mut cmd = self.world.cmd("python3");
        cmd.arg("-u").arg(&script).arg(METADATA);
        let log = self.spawn(cmd, "canary.log");
        wait_for("canary", || std::fs::read_to_string(&log).unwrap_or_default().starts_with("ready"));
        std::fs::write(&log, "").unwrap();
        log
    }

    /// An HTTP origin (python's http.server) on `ip`:80 in `ns`; its log
    /// has one line per request with the client address.
    fn start_origin(&mut self, ns: Option<&str>, ip: &str) -> PathBuf {
        let dir = self.files.join(format!("www-{ip}"));
        std::fs::create_dir_all(&dir).unwrap();
        set_mode(&dir, 0o755);
        std::fs::write(dir.join("index.html"), "origin ok\n").unwrap();
        let target = ns.map_or(&self.world, |s| &self.ns[s]);
        let probe = |ns: &Netns| ns.cmd("curl").args(["-s", "-m", "2", "--noproxy", "*", &format!("http://{ip}/")]).output();
        assert!(probe(target).is_ok_and(|o| !o.status.success()), "nothing listens on {ip}:80 before the origin starts");
        let mut cmd = target.cmd("python3");
        // A compose service listens on all its interfaces (as the whoami
        // image does); the world's origin only on its public address.
        let bind = if ns.is_some() { "0.0.0.0" } else { ip };
        cmd.args(["-u", "-m", "http.server", "80", "--bind", bind]).current_dir(&dir);
        let log = self.spawn(cmd, &format!("origin-{ip}.log"));
        let target = ns.map_or(&self.world, |s| &self.ns[s]);
        wait_for("origin", || probe(target).is_ok_and(|o| o.status.success()));
        log
    }

    /// Starts Portcullis in `service`'s namespace as `uid` with `config`
    /// and waits for /readyz; returns the decision log.
    fn start_proxy(&mut self, service: &str, uid: &str, config: &str) -> PathBuf {
        let path = self.write("portcullis.yaml", config);
        let mut cmd = self.ns[service].cmd("setpriv");
        cmd.args(["--reuid", uid, "--regid", uid, "--clear-groups", env!("CARGO_BIN_EXE_portcullis"), "run", "--config"])
            .arg(&path);
        let log = self.spawn(cmd, "portcullis.log");
        let ready = || {
            let out = self.ns[service].cmd("curl").args(["-s", "-m", "2", "http://127.0.0.1:9128/readyz"]).output();
            out.is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("ready"))
        };
        wait_for("portcullis /readyz", ready);
        log
    }
}

fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, key| match key.parse::<usize>() {
        Ok(i) if v.is_sequence() => &v[i],
        _ => &v[*key],
    })
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(Instant::now() < deadline, "{what} did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A shipped Portcullis config with names pinned (`dns.static`), since
/// the namespaces have no resolver.
fn with_static_names(rel: &str, names: &[(&str, &str)]) -> String {
    let text = std::fs::read_to_string(root().join(rel)).unwrap();
    let pins: String = names.iter().map(|(n, ip)| format!("    {n}: [{ip}]\n")).collect();
    assert!(text.contains("\ndns:\n"), "{rel} has a dns section");
    text.replacen("\ndns:\n", &format!("\ndns:\n  static:\n{pins}"), 1)
}

/// The result of one curl: (exit code, status line and headers, body).
fn curl(cmd: &mut Command) -> (i32, String, String) {
    let out = run(cmd);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (out.status.code().unwrap_or(-1), head.to_string(), body.to_string())
}

/// The status code of a response head, or 0.
fn status(head: &str) -> u16 {
    head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Requests in an origin's log, but for its own readiness probe (made
/// from inside its namespace, so from its own address).
fn requests_in(log: &Path, origin: &str) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap();
    text.lines().filter(|l| l.contains("\"GET ") && !l.starts_with(&format!("{origin} "))).map(str::to_string).collect()
}

fn decision_lines(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "portcullis::access")
        .collect()
}

/// docker-compose.yml: the worker with its proxy variables, on `internal`;
/// the origin on `upstream`; Portcullis on both and on `egress`.
fn cooperative() {
    let mut layout = Layout::build("docker-compose.yml");
    let file = compose("docker-compose.yml");
    let origin_ip = layout.addr[&("origin".to_string(), "upstream".to_string())].clone();
    let canary = layout.start_canary();
    let origin_log = layout.start_origin(Some("origin"), &origin_ip);
    let config = with_static_names("deploy/compose/portcullis.yaml", &[("origin", &origin_ip)]);
    let proxy_log = layout.start_proxy("portcullis", "0", &config);
    let hosts = layout.hosts_for("worker", "");

    let worker = |args: &[&str], with_env: bool| {
        let mut argv = vec!["curl", "-si", "-m", "5"];
        argv.extend_from_slice(args);
        let mut cmd = layout.ns["worker"].client(&hosts, &argv);
        if with_env {
            for (k, v) in file["services"]["worker"]["environment"].as_mapping().unwrap() {
                cmd.env(k.as_str().unwrap(), v.as_str().unwrap());
            }
        }
        curl(&mut cmd)
    };
    let (code, head, body) = worker(&["http://origin/"], true);
    assert_eq!((code, status(&head)), (0, 200), "through the proxy: {head}{body}");
    assert_eq!(body, "origin ok\n");
    let (_, head, _) = worker(&[&format!("http://{METADATA}/latest/meta-data/")], true);
    assert_eq!(status(&head), 403, "{head}");
    assert!(head.to_ascii_lowercase().contains("x-portcullis-deny: denied-range:metadata"), "{head}");
    // Without the proxy: the origin's name does not resolve, its address
    // and the metadata address have no route.
    for url in ["http://origin/".to_string(), format!("http://{origin_ip}/"), format!("http://{METADATA}/")] {
        let (code, head, _) = worker(&["--noproxy", "*", &url], false);
        assert_ne!(code, 0, "{url} reached directly: {head}");
    }
    let (code, head, _) = worker(&[&format!("http://{origin_ip}/")], false);
    assert_ne!(code, 0, "no variables, no way out: {head}");

    std::thread::sleep(Duration::from_millis(300));
    let proxy_ip = &layout.addr[&("portcullis".to_string(), "upstream".to_string())];
    let seen = requests_in(&origin_log, &origin_ip);
    assert_eq!(seen.len(), 1, "exactly the proxied request reached the origin: {seen:?}");
    assert!(seen[0].starts_with(&format!("{proxy_ip} ")), "from Portcullis's address: {seen:?}");
    assert_eq!(std::fs::read_to_string(&canary).unwrap(), "", "the metadata canary was reached");
    let lines = decision_lines(&proxy_log);
    assert!(lines.iter().any(|v| v["host"] == "origin" && v["decision"] == "allow"), "{lines:?}");
    assert!(lines.iter().any(|v| v["reason"] == "denied-range:metadata"), "{lines:?}");
}

/// deploy/compose/docker-compose.transparent.yml: the worker shares
/// Portcullis's namespace, where redirect.sh (run with the redirect
/// service's settings) sends its connections to the transparent listener.
fn transparent() {
    let rel = "deploy/compose/docker-compose.transparent.yml";
    let mut layout = Layout::build(rel);
    let file = compose(rel);
    let services = &file["services"];
    assert_eq!(services["worker"]["network_mode"].as_str(), Some("service:portcullis"));
    assert_eq!(services["redirect"]["network_mode"].as_str(), Some("service:portcullis"));
    let canary = layout.start_canary();
    let origin_log = layout.start_origin(None, PUBLIC_ORIGIN);
    let config = with_static_names("deploy/compose/portcullis.transparent.yaml", &[("example.com", PUBLIC_ORIGIN)]);
    let uid = services["portcullis"]["user"].as_str().unwrap().split(':').next().unwrap().to_string();
    let proxy_log = layout.start_proxy("portcullis", &uid, &config);

    let mut redirect = layout.ns["portcullis"].cmd("sh");
    redirect.arg(root().join("deploy/transparent/redirect.sh"));
    for (k, v) in services["redirect"]["environment"].as_mapping().unwrap() {
        redirect.env(k.as_str().unwrap(), v.as_str().unwrap());
    }
    let out = run(&mut redirect);
    assert!(out.status.success(), "redirect.sh: {}", String::from_utf8_lossy(&out.stderr));

    let hosts = layout.hosts_for("portcullis", &format!("{PUBLIC_ORIGIN} example.com\n"));
    let worker_uid = services["worker"]["user"].as_str().unwrap().split(':').next().unwrap().to_string();
    let worker = |url: &str| {
        let argv = ["setpriv", "--reuid", &worker_uid, "--regid", &worker_uid, "--clear-groups", "curl", "-si", "-m", "5", url];
        curl(&mut layout.ns["portcullis"].client(&hosts, &argv))
    };
    let (code, head, body) = worker("http://example.com/");
    assert_eq!((code, status(&head)), (0, 200), "intercepted and allowed: {head}{body}");
    assert_eq!(body, "origin ok\n");
    let (_, head, _) = worker(&format!("http://{METADATA}/latest/meta-data/"));
    assert!(head.to_ascii_lowercase().contains("x-portcullis-deny: denied-range:metadata"), "{head}");
    let (code, head, _) = worker(&format!("https://{METADATA}/"));
    assert_ne!(code, 0, "TLS to the metadata address is closed: {head}");
    let (_, head, _) = worker(&format!("http://{PUBLIC_ORIGIN}/"));
    assert_eq!(status(&head), 403, "the origin by address is not allow-listed: {head}");

    std::thread::sleep(Duration::from_millis(300));
    let seen = requests_in(&origin_log, PUBLIC_ORIGIN);
    assert_eq!(seen.len(), 1, "only the allowed request reached the origin: {seen:?}");
    assert_eq!(std::fs::read_to_string(&canary).unwrap(), "", "the metadata canary was reached");
    let lines = decision_lines(&proxy_log);
    let allowed = lines
        .iter()
        .find(|v| v["decision"] == "allow")
        .unwrap_or_else(|| panic!("no allow line: {lines:?}"));
    assert_eq!(allowed["kind"], "transparent-http", "{allowed}");
    assert_eq!(allowed["original_dst"], format!("{PUBLIC_ORIGIN}:80"), "{allowed}");
    assert!(lines.iter().all(|v| v["kind"].as_str().is_some_and(|k| k.starts_with("transparent-"))), "{lines:?}");
}
