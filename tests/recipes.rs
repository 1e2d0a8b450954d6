//! The Argo Workflows and Kestra recipes (deploy/argo/, deploy/kestra/),
//! checked with the real tools: their Portcullis policies with the real
//! binary (`validate`, `test`, `scan`), their pod patches with Kubernetes'
//! own strategic merge (`kubectl patch --local`), their admission policies'
//! CEL with a real CEL implementation, and their network layouts in network
//! namespaces of the test's own.

mod common;

use common::portcullis;

use std::path::{Path, PathBuf};

use serde_yaml_ng::Value;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn path(rel: &str) -> String {
    repo(rel).to_str().expect("the repository path is UTF-8").to_string()
}

fn documents(rel: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Every recipe policy with its case file: valid, and every case passes.
/// A policy shipped inside a ConfigMap is its `data."portcullis.yaml"`.
const POLICIES: &[(&str, &str)] = &[
    ("deploy/argo/node/portcullis.yaml", "deploy/argo/node/portcullis.test.yaml"),
    ("deploy/argo/sidecar/portcullis.yaml", "deploy/argo/sidecar/portcullis.test.yaml"),
    ("deploy/argo/sidecar/portcullis-gke.yaml", "deploy/argo/sidecar/portcullis-gke.test.yaml"),
];

/// The policy file of `rel`: itself, or the one its ConfigMap carries
/// (written next to the test's other files).
fn policy_file(rel: &str) -> String {
    let doc = &documents(rel)[0];
    match doc["data"]["portcullis.yaml"].as_str() {
        Some(text) => {
            let name = rel.replace('/', "_");
            common::temp_file("recipes", &name, text).to_str().unwrap().to_string()
        }
        None => path(rel),
    }
}

#[test]
fn recipe_policies_validate_and_their_cases_pass() {
    for (rel, cases) in POLICIES {
        let config = policy_file(rel);
        let (code, stdout, stderr) = portcullis(&["validate", "--config", &config]);
        assert_eq!(code, 0, "{rel}: {stdout}{stderr}");
        let (code, stdout, stderr) = portcullis(&["test", "--config", &config, &path(cases)]);
        assert_eq!(code, 0, "{cases}: {stdout}{stderr}");
        assert!(!stdout.contains("FAIL"), "{stdout}");
        let passed = stdout.lines().filter(|l| l.starts_with("PASS ")).count();
        assert!(passed >= 7, "{cases}: {passed} cases ran:\n{stdout}");
    }
}

/// Argo on node mode: no podSpecPatch; every pod non-root with a non-zero
/// uid and seccomp, main containers without escalation or capabilities, no
/// token for main, the executor on its own least-privilege account, and the
/// namespace under Pod Security "restricted".
#[test]
fn argo_node_mode_defaults_are_what_restricted_asks() {
    let cm = &documents("deploy/argo/node/workflow-controller-configmap.yaml")[0];
    let defaults: Value = serde_yaml_ng::from_str(cm["data"]["workflowDefaults"].as_str().unwrap()).unwrap();
    let spec = &defaults["spec"];
    assert!(spec.get("podSpecPatch").is_none(), "node mode needs no podSpecPatch");
    assert_eq!(spec["automountServiceAccountToken"].as_bool(), Some(false));
    let executor_sa = spec["executor"]["serviceAccountName"].as_str().unwrap();
    let pod_sc = &spec["securityContext"];
    assert_eq!(pod_sc["runAsNonRoot"].as_bool(), Some(true));
    assert!(pod_sc["runAsUser"].as_u64().unwrap() > 0);
    assert_eq!(pod_sc["seccompProfile"]["type"].as_str(), Some("RuntimeDefault"));
    let executor: Value = serde_yaml_ng::from_str(cm["data"]["executor"].as_str().unwrap()).unwrap();
    assert!(executor["image"].as_str().unwrap().ends_with("-nonroot"));
    let containers = [&spec["templateDefaults"]["container"]["securityContext"], &spec["templateDefaults"]["script"]["securityContext"], &executor["securityContext"]];
    for sc in containers {
        assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false), "{sc:?}");
        assert_eq!(sc["capabilities"]["drop"].as_sequence().unwrap(), &[Value::from("ALL")]);
        assert!(sc["capabilities"].get("add").is_none());
    }

    let rbac = documents("deploy/argo/node/rbac.yaml");
    let by_kind = |kind: &str, name: &str| rbac.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name).unwrap_or_else(|| panic!("{kind} {name}"));
    let workflow_sa = spec["serviceAccountName"].as_str().unwrap();
    assert_eq!(by_kind("ServiceAccount", workflow_sa)["automountServiceAccountToken"].as_bool(), Some(false));
    assert!(!rbac.iter().any(|d| d["kind"] == "RoleBinding" && d["subjects"][0]["name"] == workflow_sa), "no Role for the workflow's account");
    let token = by_kind("Secret", &format!("{executor_sa}.service-account-token"));
    assert_eq!(token["metadata"]["annotations"]["kubernetes.io/service-account.name"].as_str(), Some(executor_sa));
    let binding = by_kind("RoleBinding", executor_sa);
    assert_eq!(binding["subjects"][0]["name"].as_str(), Some(executor_sa));
    let role = by_kind("Role", binding["roleRef"]["name"].as_str().unwrap());
    let rules = role["rules"].as_sequence().unwrap();
    assert_eq!(rules.len(), 1, "least privilege: one rule");
    assert_eq!(rules[0]["resources"].as_sequence().unwrap(), &[Value::from("workflowtaskresults")]);
    assert_eq!(rules[0]["verbs"].as_sequence().unwrap(), &[Value::from("create"), Value::from("patch")]);

    let ns = &documents("deploy/argo/node/namespace.yaml")[0];
    assert_eq!(ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].as_str(), Some("restricted"));
    let repos = &documents("deploy/argo/node/artifact-repositories.yaml")[0];
    assert_eq!(repos["metadata"]["namespace"], ns["metadata"]["name"]);
    assert_eq!(spec["artifactRepositoryRef"]["configMap"], repos["metadata"]["name"]);
}

#[path = "common/netns.rs"]
mod netns;

/// An origin on `addr` that answers every connection with `200 ok` and
/// counts them; serves until the test process ends.
fn counting_origin(addr: &str) -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(addr).unwrap();
    let local = listener.local_addr().unwrap();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut head = [0u8; 1024];
            let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            let _ = conn.read(&mut head);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    (local, hits)
}

/// A process killed (and reaped) when the test is done with it, panicking or not.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET `url` through the explicit proxy at `proxy`: the status line.
fn get_via(proxy: &str, url: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    write!(s, "GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().next().unwrap_or_default().to_string()
}

/// `upstream.mark` is set on the proxy's upstream sockets: a netfilter rule
/// that sends every unmarked connection to the origin elsewhere (as the
/// sidecar rules do) lets the proxy's marked connection through, refuses a
/// direct one, and refuses the proxy's own when no mark is configured.
#[test]
fn upstream_mark_is_set_on_every_upstream_socket() {
    netns::in_own_netns("upstream_mark_is_set_on_every_upstream_socket", || {
        netns::sh(&["ip", "link", "set", "lo", "up"]);
        let (origin, hits) = counting_origin("127.0.0.1:8080");
        // Unmarked TCP to the origin goes to the discard port, where nothing listens.
        netns::sh(&["iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.1", "--dport", "8080",
            "-m", "mark", "!", "--mark", "0x539", "-j", "REDIRECT", "--to-ports", "9"]);
        assert!(std::net::TcpStream::connect(origin).is_err(), "the rule refuses an unmarked connection");
        let url = format!("http://{origin}/");
        for (mark, want, port) in [("upstream: {mark: 0x539}\n", "HTTP/1.1 200 OK", 3128), ("", "HTTP/1.1 502", 3129)] {
            let config = common::temp_file("recipes-mark", &format!("mark{port}.yaml"), &format!(
                "listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:0\n{mark}allow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    allow:\n      cidrs: [127.0.0.1/32]\n      http_ports: [8080]\n"
            ));
            let (child, _log, _) = common::run_binary(&config);
            let _proxy = Killed(child);
            let status = get_via(&format!("127.0.0.1:{port}"), &url);
            assert!(status.starts_with(want), "{mark:?}: {status}");
        }
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1, "only the marked connection reached the origin");
    });
}

#[path = "recipes/argo_pods.rs"]
mod argo_pods;
#[path = "recipes/admission.rs"]
mod admission;
#[path = "recipes/kestra.rs"]
mod kestra;
#[path = "recipes/layout.rs"]
mod layout;

use serde_json::json;

type Json = serde_json::Value;

fn to_json(v: &Value) -> Json {
    serde_json::to_value(v).expect("YAML that is JSON")
}

/// The sidecar variant's controller config: workflow defaults, executor
/// config and the workflow-level podSpecPatch, as JSON.
fn sidecar_config() -> (Json, Json, Json) {
    let cm = &documents("deploy/argo/sidecar/workflow-controller-configmap.yaml")[0];
    let defaults: Value = serde_yaml_ng::from_str(cm["data"]["workflowDefaults"].as_str().unwrap()).unwrap();
    let executor: Value = serde_yaml_ng::from_str(cm["data"]["executor"].as_str().unwrap()).unwrap();
    let patch: Value = serde_yaml_ng::from_str(defaults["spec"]["podSpecPatch"].as_str().expect("a podSpecPatch string")).unwrap();
    (to_json(&defaults), to_json(&executor), to_json(&patch))
}

/// A directory for this test process's files.
fn work_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("portcullis-recipes-{}/{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `kubectl patch --local --type strategic`: Kubernetes' own strategic
/// merge (k8s.io/apimachinery strategicpatch, with the Pod's patch metadata)
/// of `patch` (a pod spec patch, as Argo's podSpecPatch) onto `pod`.
fn strategic_merge(pod: &Json, spec_patch: &Json, dir: &Path, name: &str) -> Json {
    let pod_file = dir.join(format!("{name}.pod.json"));
    let patch_file = dir.join(format!("{name}.patch.json"));
    std::fs::write(&pod_file, pod.to_string()).unwrap();
    std::fs::write(&patch_file, json!({"spec": spec_patch}).to_string()).unwrap();
    let out = std::process::Command::new("kubectl")
        .args(["patch", "--local", "--type", "strategic", "-o", "json", "-f"])
        .arg(&pod_file)
        .arg("--patch-file")
        .arg(&patch_file)
        .output()
        .expect("kubectl (Debian's kubernetes-client; .ci/run installs it)");
    assert!(out.status.success(), "kubectl patch {name}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("kubectl's output for {name}: {e}"))
}

fn names(list: &Json) -> Vec<&str> {
    list.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect()
}

fn merged_pod(step: argo_pods::Step, dir: &Path) -> Json {
    let (defaults, executor, patch) = sidecar_config();
    let pod = argo_pods::pod(step, &defaults, &executor);
    strategic_merge(&pod, &patch, dir, &format!("{step:?}"))
}

/// The recipe's podSpecPatch merged by Kubernetes' own code onto the pods
/// Argo builds for `container:` and `script:` steps: `redirect` first, the
/// native sidecar second, Argo's `init` after both; env and volumes intact.
#[test]
fn sidecar_patch_merges_redirect_first_with_kubernetes_own_code() {
    let dir = work_dir("merge");
    let (_, _, patch) = sidecar_config();
    for step in [argo_pods::Step::Container, argo_pods::Step::Script] {
        let merged = merged_pod(step, &dir);
        let spec = &merged["spec"];
        assert_eq!(names(&spec["initContainers"]), ["redirect", "portcullis", "init"], "{step:?}");
        assert_eq!(names(&spec["containers"]), ["wait", "main"], "{step:?}");
        let redirect = &spec["initContainers"][0];
        assert_eq!(redirect["env"], patch["initContainers"][0]["env"], "{step:?}: the redirect env is the recipe's");
        assert_eq!(redirect["securityContext"]["capabilities"]["add"], json!(["NET_ADMIN", "NET_RAW"]));
        let sidecar = &spec["initContainers"][1];
        assert_eq!(sidecar["restartPolicy"], "Always", "{step:?}: a native sidecar");
        assert_eq!(sidecar["securityContext"]["capabilities"]["add"], json!(["NET_ADMIN"]), "SO_MARK needs NET_ADMIN");
        let init = &spec["initContainers"][2];
        assert_eq!(init["env"][3], json!({"name": "ARGO_CONTAINER_NAME", "value": "init"}), "{step:?}: Argo's env kept");
        let main = &spec["containers"][1];
        assert_eq!(main["securityContext"]["capabilities"]["drop"], json!(["ALL"]), "{step:?}");
        let mut volumes = names(&spec["volumes"]);
        volumes.sort();
        let mut want = vec!["exec-sa-token", "portcullis-config", "portcullis-xtables-lock", "tmp-dir-argo", "var-run-argo"];
        if step == argo_pods::Step::Script {
            want.insert(0, "argo-staging");
        }
        assert_eq!(volumes, want, "{step:?}");
        assert_eq!(spec["automountServiceAccountToken"], json!(false), "{step:?}: main gets no token");
    }
}

/// The sidecar variant's parts agree: the mark redirect.sh exempts is the
/// one Portcullis sets, the redirect port is its transparent listener, the
/// probes hit its admin port, and it loads the ConfigMap the recipe ships.
/// (That the admission policy pins these same values is proven by it
/// admitting the merged pods.)
#[test]
fn sidecar_recipe_is_consistent() {
    let (_, _, patch) = sidecar_config();
    let env: std::collections::BTreeMap<&str, &str> =
        patch["initContainers"][0]["env"].as_array().unwrap().iter().map(|e| (e["name"].as_str().unwrap(), e["value"].as_str().unwrap())).collect();
    let sidecar = &patch["initContainers"][1];
    let configmap = patch["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "portcullis-config").unwrap()["configMap"]["name"].clone();
    for rel in ["deploy/argo/sidecar/portcullis.yaml", "deploy/argo/sidecar/portcullis-gke.yaml"] {
        let doc = &documents(rel)[0];
        assert_eq!(to_json(&doc["metadata"]["name"]), configmap, "{rel}");
        let config: Value = serde_yaml_ng::from_str(doc["data"]["portcullis.yaml"].as_str().unwrap()).unwrap();
        let mark = config["upstream"]["mark"].as_u64().expect("upstream.mark");
        let exempt = env["PORTCULLIS_MARK"];
        assert_eq!(u64::from_str_radix(exempt.trim_start_matches("0x"), 16).unwrap(), mark, "{rel}: PORTCULLIS_MARK {exempt} vs upstream.mark {mark}");
        let transparent = config["transparent_listen"].as_str().unwrap();
        assert!(transparent.ends_with(&format!(":{}", env["PORTCULLIS_TRANSPARENT_PORT"])), "{rel}: {transparent}");
        let admin = config["admin_listen"].as_str().unwrap().rsplit(':').next().unwrap().parse::<u64>().unwrap();
        for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
            assert_eq!(sidecar[probe]["httpGet"]["port"].as_u64(), Some(admin), "{probe}");
        }
    }
    assert_eq!(sidecar["args"], json!(["run", "--config", "/etc/portcullis/portcullis.yaml"]));
    assert!(!env.contains_key("PORTCULLIS_UID"), "exemption by mark, not by uid");
}

/// The sidecar variant's exemption, end to end: redirect.sh with
/// PORTCULLIS_MARK (iptables and nft) and Portcullis setting upstream.mark
/// as root in the same namespace. Workload processes (root without
/// capabilities, any uid, the old exempt uids included) are redirected:
/// the allowed origin is reached through the policy, a denied one is
/// refused and never reached, and setting the mark is refused (EPERM).
#[test]
fn sidecar_exempts_portcullis_by_mark_only() {
    netns::in_own_netns("sidecar_exempts_portcullis_by_mark_only", || {
        netns::sh(&["ip", "link", "set", "lo", "up"]);
        // "The world": addresses outside 127/8, which sidecar mode leaves direct.
        for addr in ["10.99.0.1/32", "10.99.0.2/32"] {
            netns::sh(&["ip", "addr", "add", addr, "dev", "lo"]);
        }
        let (origin, origin_hits) = counting_origin("10.99.0.1:8080");
        let (canary, canary_hits) = counting_origin("10.99.0.2:8080");
        let config = common::temp_file("recipes-sidecar", "mark.yaml",
            "listen: 127.0.0.1:3128\nadmin_listen: 127.0.0.1:9128\ntransparent_listen: 0.0.0.0:15001\nupstream: {mark: 0x539}\n\
             allow_ranges: [10.99.0.1/32]\nroles:\n  default:\n    allow:\n      cidrs: [10.99.0.1/32]\n      http_ports: [8080]\n");
        let client = r#"
import socket, sys, os
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.socket()
try:
    s.setsockopt(socket.SOL_SOCKET, 36, 0x539)  # SO_MARK
    print("mark-set")
except OSError as e:
    print("mark-refused", e.errno)
s.settimeout(5)
s.connect((addr, port))
s.sendall(b"GET / HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n" % (addr.encode(), port))
print(s.recv(200).split(b"\r\n")[0].decode())
"#;
        for backend in ["iptables", "nft"] {
            let out = netns::run(std::process::Command::new("sh").arg(path("deploy/transparent/redirect.sh"))
                .env("PORTCULLIS_MARK", "0x539").env("PORTCULLIS_BACKEND", backend).env("PORTCULLIS_TRANSPARENT_PORT", "15001"));
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success() && said.contains("exempt mark 0x539"), "{backend}: {said}{}", String::from_utf8_lossy(&out.stderr));
            let (child, _log, _) = common::run_binary(&config);
            let _proxy = Killed(child);
            for uid in ["0", "1000", "62211", "65532"] {
                for (target, want) in [(origin, "HTTP/1.1 200 OK"), (canary, "HTTP/1.1 403")] {
                    let out = netns::run(std::process::Command::new("setpriv")
                        .args(["--reuid", uid, "--regid", uid, "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "/usr/bin/python3", "-c", client])
                        .arg(target.ip().to_string()).arg(target.port().to_string()));
                    let said = String::from_utf8_lossy(&out.stdout);
                    assert!(said.starts_with("mark-refused 1\n"), "{backend} uid {uid}: setting the mark needs NET_ADMIN: {said}{}", String::from_utf8_lossy(&out.stderr));
                    assert!(said.contains(want), "{backend} uid {uid} -> {target}: want {want}: {said}{}", String::from_utf8_lossy(&out.stderr));
                }
            }
            let removed = netns::run(std::process::Command::new("sh").arg(path("deploy/transparent/redirect.sh")).arg("--remove")
                .env("PORTCULLIS_MARK", "0x539").env("PORTCULLIS_BACKEND", backend));
            assert!(removed.status.success(), "{}", String::from_utf8_lossy(&removed.stderr));
        }
        assert_eq!(origin_hits.load(std::sync::atomic::Ordering::SeqCst), 8, "every allowed request went through Portcullis to the origin");
        assert_eq!(canary_hits.load(std::sync::atomic::Ordering::SeqCst), 0, "the denied destination was never reached");
    });
}

/// The `argo` namespace walls Argo's security guide asks for: default deny;
/// argo-server open to the ingress controller on 2746; argo-server egress to
/// the artifact store and the database, the controller's to the database;
/// Prometheus from another namespace on the controller's metrics port; and
/// no egress rule that reaches link-local (metadata) addresses.
#[test]
fn argo_namespace_walls_cover_the_guide() {
    let docs = documents("deploy/argo/networkpolicy-argo.yaml");
    let policy = |name: &str| docs.iter().find(|d| d["metadata"]["name"] == name).unwrap_or_else(|| panic!("NetworkPolicy {name}"));
    let ports = |rules: &Value| -> Vec<u64> {
        rules.as_sequence().unwrap().iter().flat_map(|r| r["ports"].as_sequence().unwrap().iter().map(|p| p["port"].as_u64().unwrap())).collect()
    };
    for d in &docs {
        assert_eq!(d["metadata"]["namespace"].as_str(), Some("argo"), "{:?}", d["metadata"]["name"]);
    }
    let deny = policy("argo-default-deny");
    assert_eq!(deny["spec"]["podSelector"], Value::Mapping(Default::default()));
    assert!(deny["spec"].get("ingress").is_none() && deny["spec"].get("egress").is_none());
    assert_eq!(ports(&policy("argo-server-ingress")["spec"]["ingress"]), [2746]);
    let server = ports(&policy("argo-server-egress")["spec"]["egress"]);
    for port in [9000, 443, 5432] {
        assert!(server.contains(&port), "argo-server egress to {port}: {server:?}");
    }
    assert!(ports(&policy("workflow-controller-egress")["spec"]["egress"]).contains(&5432));
    let metrics = &policy("workflow-controller-metrics")["spec"]["ingress"][0];
    assert_eq!(ports(&policy("workflow-controller-metrics")["spec"]["ingress"]), [9090]);
    assert!(metrics["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"].as_str().is_some(), "Prometheus's namespace");
    for d in &docs {
        for rule in d["spec"]["egress"].as_sequence().into_iter().flatten() {
            for peer in rule["to"].as_sequence().unwrap() {
                let Some(cidr) = peer["ipBlock"]["cidr"].as_str() else { continue };
                let net: ipnet::IpNet = cidr.parse().unwrap();
                let except: Vec<ipnet::IpNet> = peer["ipBlock"]["except"].as_sequence().into_iter().flatten().map(|e| e.as_str().unwrap().parse().unwrap()).collect();
                let metadata: std::net::IpAddr = "169.254.169.254".parse().unwrap();
                assert!(!net.contains(&metadata) || except.iter().any(|e| e.contains(&metadata)), "{:?}: {cidr} reaches metadata", d["metadata"]["name"]);
            }
        }
    }
}

/// docs/SEEDS.md: every row marked done names at least one test, and every
/// test it names exists (`file::test` or `file::module::test` under tests/).
#[test]
fn every_done_seed_row_names_tests_that_exist() {
    let seeds = std::fs::read_to_string(repo("docs/SEEDS.md")).unwrap();
    let mut done = 0;
    for row in seeds.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| #") && !l.starts_with("|---")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        let (status, proof) = (cells[2], cells[cells.len() - 1]);
        if !status.starts_with("done") {
            continue;
        }
        done += 1;
        let named: Vec<&str> = proof.split('`').skip(1).step_by(2).filter(|n| n.contains("::")).collect();
        assert!(!named.is_empty(), "a done row without a test: {row}");
        for name in named {
            let mut parts: Vec<&str> = name.split("::").collect();
            let test = parts.pop().unwrap();
            if test == "*" {
                continue;
            }
            let file = match parts.as_slice() {
                [file] => format!("tests/{file}.rs"),
                [file, module] => format!("tests/{file}/{module}.rs"),
                _ => panic!("{name}: expected file::test or file::module::test"),
            };
            let source = std::fs::read_to_string(repo(&file)).unwrap_or_else(|e| panic!("{name}: {file}: {e}"));
            assert!(source.contains(&format!("fn {test}()")), "{name}: no test `{test}` in {file}");
        }
    }
    assert!(done >= 15, "{done} done rows");
}
