//! The deployment files agree with each other and with the shipped config:
//! every YAML parses, every embedded Portcullis config is accepted by the
//! real loader, and ports and paths match across Dockerfile, compose,
//! Kubernetes manifests and Prometheus config. No container engine needed.

#[path = "common/iana.rs"]
mod iana;

use std::path::{Path, PathBuf};

use portcullis::config::Config;
use portcullis::snapshot::Snapshot;
use serde::Deserialize;
use serde_yaml_ng::Value;

const CONFIG_PATH: &str = "/etc/portcullis/portcullis.yaml";
/// The init container that runs deploy/transparent/redirect.sh.
const REDIRECT_INIT: &str = "redirect";
const REDIRECT_SCRIPT: &str = "deploy/transparent/redirect.sh";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// All documents of a (possibly multi-document) YAML file.
fn documents(rel: &str) -> Vec<Value> {
    let text = read(rel);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_files(dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path.strip_prefix(root()).unwrap().to_string_lossy().into_owned());
        }
    }
}

/// Walks a value by keys (strings) and sequence indexes (numbers as text).
fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, key| match key.parse::<usize>() {
        Ok(i) if v.is_sequence() => &v[i],
        _ => &v[*key],
    })
}

fn port_of(addr: &str) -> u16 {
    addr.parse::<std::net::SocketAddr>().unwrap_or_else(|e| panic!("{addr}: {e}")).port()
}

/// (proxy port, admin port) of the shipped default config.
fn shipped_ports() -> (u16, u16) {
    let c = Config::load(&root().join("config/portcullis.yaml")).unwrap();
    (c.listen.port(), c.admin_listen.port())
}

fn kubernetes_docs() -> Vec<(String, Value)> {
    let mut files = Vec::new();
    yaml_files(&root().join("deploy/kubernetes"), &mut files);
    assert!(files.len() >= 4, "expected sidecar, shared, networkpolicy and monitoring manifests: {files:?}");
    files.iter().flat_map(|f| documents(f).into_iter().map(move |d| (f.clone(), d))).collect()
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

#[test]
fn every_yaml_file_parses() {
    let mut files = vec!["docker-compose.yml".to_string()];
    yaml_files(&root().join("deploy"), &mut files);
    yaml_files(&root().join("config"), &mut files);
    assert!(files.len() >= 14, "{files:?}");
    for file in files {
        assert!(!documents(&file).is_empty(), "{file} has no document");
    }
}

/// Parses and compiles a config as start-up does, or panics with the refusal.
fn compile(text: &str, file: &str) -> Snapshot {
    let config = Config::from_yaml_str(text, file).unwrap_or_else(|e| panic!("{e}"));
    Snapshot::compile(&config, 1).unwrap_or_else(|e| panic!("{e}"))
}

/// Every Portcullis config shipped in deploy/ (files and ConfigMap data) is
/// accepted by the real loader.
#[test]
fn embedded_configs_are_valid() {
    for rel in [
        "deploy/compose/portcullis.yaml",
        "deploy/compose/portcullis.transparent.yaml",
        "deploy/compose/portcullis.kestra.yaml",
        "deploy/container/portcullis.yaml",
    ] {
        compile(&read(rel), rel);
    }
    let mut configmaps = 0;
    for (file, doc) in kubernetes_docs().iter().filter(|(_, d)| kind(d) == "ConfigMap") {
        let text = doc["data"]["portcullis.yaml"].as_str().unwrap_or_else(|| panic!("{file}: no portcullis.yaml key"));
        compile(text, file);
        configmaps += 1;
    }
    assert_eq!(configmaps, 4, "sidecar, shared, transparent-sidecar and node ConfigMaps");
}

/// The container image's config is the shipped policy, listening on all
/// interfaces of the container.
#[test]
fn container_config_is_the_shipped_policy() {
    let shipped: Value = serde_yaml_ng::from_str(&read("config/portcullis.yaml")).unwrap();
    let container: Value = serde_yaml_ng::from_str(&read("deploy/container/portcullis.yaml")).unwrap();
    for key in ["roles", "allow_ranges", "internal_ranges", "nat64_prefixes", "timeouts", "dns", "limits", "reload"] {
        assert_eq!(shipped[key], container[key], "{key} differs");
    }
    let (proxy, admin) = shipped_ports();
    assert_eq!(container["listen"].as_str(), Some(format!("0.0.0.0:{proxy}").as_str()));
    assert_eq!(container["admin_listen"].as_str(), Some(format!("0.0.0.0:{admin}").as_str()));
}

#[test]
fn dockerfile_builds_the_binary_and_exposes_the_ports() {
    let dockerfile = read("Dockerfile");
    let (proxy, admin) = shipped_ports();
    let expose = dockerfile.lines().find(|l| l.starts_with("EXPOSE")).expect("EXPOSE line");
    let exposed: Vec<u16> = expose.split_whitespace().skip(1).map(|p| p.parse().unwrap()).collect();
    assert_eq!(exposed, [proxy, admin]);
    assert!(dockerfile.contains("cargo build --release --locked --bin portcullis"));
    let manifest = read("Cargo.toml");
    assert!(manifest.contains("[[bin]]\nname = \"portcullis\""), "Cargo.toml must define the portcullis binary");
    assert!(dockerfile.contains(&format!("CMD [\"run\", \"--config\", \"{CONFIG_PATH}\"]")));
    assert!(dockerfile.contains(&format!("COPY deploy/container/portcullis.yaml {CONFIG_PATH}")));
    assert!(dockerfile.contains("USER 65532"), "the image runs as non-root");
    // Everything the builder stage copies exists in the repository.
    for line in dockerfile.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from")) {
        let sources: Vec<&str> = line.split_whitespace().skip(1).collect();
        for src in &sources[..sources.len() - 1] {
            assert!(root().join(src).exists(), "Dockerfile copies missing {src}");
        }
    }
}

#[test]
fn compose_matches_the_config() {
    let compose = &documents("docker-compose.yml")[0];
    let (proxy, admin) = shipped_ports();
    let demo = Config::from_yaml_str(&read("deploy/compose/portcullis.yaml"), "compose").unwrap();
    assert_eq!((demo.listen.port(), demo.admin_listen.port()), (proxy, admin));
    let svc = &compose["services"]["portcullis"];
    let expose: Vec<u16> = svc["expose"].as_sequence().unwrap().iter().map(|p| p.as_str().unwrap().parse().unwrap()).collect();
    assert_eq!(expose, [proxy, admin]);
    let mounts: Vec<&str> = svc["volumes"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(mounts.contains(&format!("./deploy/compose/portcullis.yaml:{CONFIG_PATH}:ro").as_str()), "{mounts:?}");
    // The worker reaches the outside only through the proxy.
    let worker = &compose["services"]["worker"];
    assert_eq!(worker["networks"].as_sequence().unwrap(), &[Value::from("internal")]);
    assert_eq!(compose["networks"]["internal"]["internal"], Value::Bool(true));
    for var in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        assert_eq!(worker["environment"][var].as_str(), Some(format!("http://portcullis:{proxy}").as_str()), "{var}");
    }
    // The worker and the origin share no network: the proxy is on both,
    // and each of the two networks has no route out.
    let networks_of = |svc: &str| -> Vec<String> {
        let n = &compose["services"][svc]["networks"];
        match n.as_sequence() {
            Some(list) => list.iter().map(|v| v.as_str().unwrap().to_string()).collect(),
            None => n.as_mapping().unwrap().keys().map(|k| k.as_str().unwrap().to_string()).collect(),
        }
    };
    let (worker_nets, origin_nets, proxy_nets) = (networks_of("worker"), networks_of("origin"), networks_of("portcullis"));
    assert_eq!(origin_nets, ["upstream"]);
    assert!(worker_nets.iter().all(|n| !origin_nets.contains(n)), "the worker must not share a network with the origin");
    for net in worker_nets.iter().chain(&origin_nets) {
        assert!(proxy_nets.contains(net), "portcullis joins {net}");
        assert_eq!(compose["networks"][net.as_str()]["internal"], Value::Bool(true), "{net}");
    }
    // The carve-out is exactly the origin's address, inside its subnet.
    let origin_ip = at(&compose["services"]["origin"], &["networks", "upstream", "ipv4_address"]).as_str().unwrap();
    let subnet: ipnet::IpNet = at(&compose["networks"]["upstream"], &["ipam", "config", "0", "subnet"]).as_str().unwrap().parse().unwrap();
    assert!(subnet.contains(&origin_ip.parse::<std::net::IpAddr>().unwrap()));
    let carved: Vec<String> = demo.allow_ranges.iter().map(|c| c.net().to_string()).collect();
    assert_eq!(carved, [format!("{origin_ip}/32")]);
    let prometheus = &documents("deploy/compose/prometheus.yml")[0];
    let target = at(prometheus, &["scrape_configs", "0", "static_configs", "0", "targets", "0"]).as_str().unwrap();
    assert_eq!(target, format!("portcullis:{admin}"));
    let prom_mounts = compose["services"]["prometheus"]["volumes"].as_sequence().unwrap();
    assert!(prom_mounts.iter().any(|m| m.as_str().unwrap().starts_with("./deploy/compose/prometheus.yml:")));
}

#[test]
fn kubernetes_manifests_match_the_config() {
    let (proxy, admin) = shipped_ports();
    let docs = kubernetes_docs();
    let mut portcullis_containers = 0;
    for (file, doc) in docs.iter().filter(|(_, d)| kind(d) == "Deployment") {
        let spec = &doc["spec"]["template"]["spec"];
        let mut containers: Vec<&Value> = spec["containers"].as_sequence().unwrap().iter().collect();
        if let Some(init) = spec["initContainers"].as_sequence() {
            // Every init container is a native sidecar, except the one-shot
            // interception setup of the transparent pattern.
            for c in init.iter().filter(|c| c["name"].as_str() != Some(REDIRECT_INIT)) {
                assert_eq!(c["restartPolicy"].as_str(), Some("Always"), "{file}: native sidecar");
                containers.push(c);
            }
        }
        for c in containers.into_iter().filter(|c| c["name"].as_str() == Some("portcullis")) {
            portcullis_containers += 1;
            let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
            assert_eq!(args, ["run", "--config", CONFIG_PATH], "{file}");
            let ports: Vec<u64> = c["ports"].as_sequence().unwrap().iter().map(|p| p["containerPort"].as_u64().unwrap()).collect();
            assert!(ports.contains(&u64::from(admin)), "{file}: admin port");
            for probe in ["readinessProbe", "livenessProbe"] {
                assert_eq!(c[probe]["httpGet"]["port"].as_u64(), Some(u64::from(admin)), "{file}: {probe}");
            }
            assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
            assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
            let mount = &c["volumeMounts"][0];
            assert_eq!(mount["mountPath"].as_str(), Some("/etc/portcullis"), "{file}: directory mount, so ConfigMap updates reach the file");
            assert!(mount.get("subPath").is_none(), "{file}: subPath mounts never update");
            let sc = &c["securityContext"];
            assert_eq!((sc["runAsNonRoot"].as_bool(), sc["readOnlyRootFilesystem"].as_bool()), (Some(true), Some(true)), "{file}");
        }
        // A worker next to a sidecar points its proxy variables at it; a
        // transparently intercepted worker has none.
        for c in spec["containers"].as_sequence().unwrap().iter().filter(|c| c["name"].as_str() == Some("worker")) {
            if file.contains("transparent") {
                assert!(c.get("env").is_none(), "{file}: the intercepted worker is unchanged, no proxy env");
                continue;
            }
            let env = c["env"].as_sequence().unwrap();
            let proxy_var = env.iter().find(|e| e["name"].as_str() == Some("HTTPS_PROXY")).unwrap();
            assert_eq!(proxy_var["value"].as_str(), Some(format!("http://127.0.0.1:{proxy}").as_str()));
        }
    }
    assert_eq!(portcullis_containers, 3, "sidecar, shared and transparent-sidecar Deployments");

    let service = docs.iter().find(|(_, d)| kind(d) == "Service").map(|(_, d)| d).expect("a Service");
    let svc_ports: Vec<(String, u64)> = service["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_string(), p["port"].as_u64().unwrap()))
        .collect();
    assert_eq!(svc_ports, [("proxy".to_string(), u64::from(proxy)), ("admin".to_string(), u64::from(admin))]);

    let monitor = docs.iter().find(|(_, d)| kind(d) == "ServiceMonitor").map(|(_, d)| d).expect("a ServiceMonitor");
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"].as_str(), Some("admin"));
    assert_eq!(endpoint["path"].as_str(), Some("/metrics"));

    let policies: Vec<&Value> = docs.iter().filter(|(_, d)| kind(d) == "NetworkPolicy").map(|(_, d)| d).collect();
    let worker_policy = policies
        .iter()
        .find(|p| p["spec"]["podSelector"]["matchLabels"]["portcullis.io/egress"].as_str() == Some("proxy"))
        .expect("a policy for worker pods");
    let egress = worker_policy["spec"]["egress"].as_sequence().unwrap();
    let allowed_ports: Vec<u64> =
        egress.iter().flat_map(|rule| rule["ports"].as_sequence().unwrap().iter().map(|p| p["port"].as_u64().unwrap())).collect();
    assert_eq!(allowed_ports, [u64::from(proxy), 53, 53], "workers reach only the proxy and DNS");
    let proxy_policy = policies
        .iter()
        .find(|p| p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"].as_str() == Some("portcullis"))
        .expect("a policy for the proxy pods");
    let ingress_ports: Vec<u64> = proxy_policy["spec"]["ingress"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|rule| rule["ports"].as_sequence().unwrap().iter().map(|p| p["port"].as_u64().unwrap()))
        .collect();
    assert_eq!(ingress_ports, [u64::from(proxy), u64::from(admin)]);

    let kinds: Vec<&str> = docs.iter().map(|(_, d)| kind(d)).collect();
    for want in ["PodDisruptionBudget", "HorizontalPodAutoscaler"] {
        assert!(kinds.contains(&want), "missing {want}");
    }
    // The ConfigMaps' listeners use the same ports as the shipped config.
    for (file, doc) in docs.iter().filter(|(_, d)| kind(d) == "ConfigMap") {
        let c = Config::from_yaml_str(doc["data"]["portcullis.yaml"].as_str().unwrap(), file).unwrap();
        assert_eq!((port_of(&c.listen.to_string()), c.admin_listen.port()), (proxy, admin), "{file}");
    }
}

/// The port a config's `transparent_listen` uses; the config must enable it.
fn transparent_port(text: &str, file: &str) -> u16 {
    let config = Config::from_yaml_str(text, file).unwrap_or_else(|e| panic!("{e}"));
    config.transparent_listen.unwrap_or_else(|| panic!("{file}: transparent_listen is not set")).port()
}

/// A container's or compose service's environment, as (name, value).
fn env_vars(env: &Value) -> Vec<(String, String)> {
    match env {
        Value::Sequence(list) => list
            .iter()
            .map(|e| (e["name"].as_str().unwrap().to_string(), e["value"].as_str().unwrap_or("").to_string()))
            .collect(),
        Value::Mapping(map) => map.iter().map(|(k, v)| (k.as_str().unwrap().to_string(), v.as_str().unwrap().to_string())).collect(),
        _ => panic!("redirect settings missing: {env:?}"),
    }
}

fn setting<'a>(env: &'a [(String, String)], name: &str) -> &'a str {
    env.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("{name} not set: {env:?}"))
}

/// The Dockerfile's `redirect` stage ships the script itself, unmodified,
/// as its entry point.
#[test]
fn redirect_image_runs_the_shipped_script() {
    let dockerfile = read("Dockerfile");
    let stage: Vec<&str> = dockerfile
        .lines()
        .skip_while(|l| !l.starts_with("FROM ") || !l.ends_with(" AS redirect"))
        .take_while(|l| !l.starts_with("FROM ") || l.ends_with(" AS redirect"))
        .collect();
    assert!(stage.iter().any(|l| *l == format!("COPY {REDIRECT_SCRIPT} /usr/local/bin/redirect.sh")), "{stage:?}");
    assert!(stage.iter().any(|l| l.starts_with("ENTRYPOINT") && l.contains("/usr/local/bin/redirect.sh")), "{stage:?}");
    let last_from = dockerfile.lines().rfind(|l| l.starts_with("FROM ")).unwrap();
    assert!(last_from.contains("distroless"), "the proxy image stays the default (last) target: {last_from}");
}

/// Kubernetes: the init container has only NET_ADMIN/NET_RAW and exempts
/// the uid the Portcullis sidecar runs as; the sidecar listens where the
/// script redirects; the worker runs under another uid.
#[test]
fn transparent_sidecar_is_consistent() {
    let file = "deploy/kubernetes/transparent-sidecar/worker.yaml";
    let docs = documents(file);
    let config = docs.iter().find(|d| kind(d) == "ConfigMap").expect("ConfigMap");
    let port = transparent_port(config["data"]["portcullis.yaml"].as_str().unwrap(), file);
    let spec = &docs.iter().find(|d| kind(d) == "Deployment").expect("Deployment")["spec"]["template"]["spec"];
    let init = spec["initContainers"].as_sequence().unwrap();
    assert_eq!(init[0]["name"].as_str(), Some(REDIRECT_INIT), "interception is set up before anything else starts");
    let redirect = &init[0];
    assert!(redirect.get("restartPolicy").is_none(), "a one-shot init container");
    let caps = &redirect["securityContext"]["capabilities"];
    assert_eq!(caps["drop"], Value::from(vec!["ALL"]));
    assert_eq!(caps["add"], Value::from(vec!["NET_ADMIN", "NET_RAW"]));
    assert_eq!(redirect["securityContext"]["allowPrivilegeEscalation"], Value::Bool(false));
    let env = env_vars(&redirect["env"]);
    assert_eq!(setting(&env, "PORTCULLIS_TRANSPARENT_PORT"), port.to_string());
    let proxy = init.iter().find(|c| c["name"].as_str() == Some("portcullis")).expect("portcullis sidecar");
    let proxy_uid = proxy["securityContext"]["runAsUser"].as_u64().unwrap();
    assert_eq!(setting(&env, "PORTCULLIS_UID"), proxy_uid.to_string(), "the sidecar runs as the exempt uid");
    for worker in spec["containers"].as_sequence().unwrap() {
        assert_ne!(worker["securityContext"]["runAsUser"].as_u64(), Some(proxy_uid), "a worker under the exempt uid would bypass");
    }
}

/// Compose: the worker and the script share Portcullis's network
/// namespace, the script runs before the worker with NET_ADMIN/NET_RAW,
/// and exempts the uid Portcullis runs as.
#[test]
fn transparent_compose_is_consistent() {
    let rel = "deploy/compose/docker-compose.transparent.yml";
    let compose = &documents(rel)[0];
    let services = &compose["services"];
    let proxy = &services["portcullis"];
    let mounts: Vec<&str> = proxy["volumes"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let mounted = mounts
        .iter()
        .find_map(|m| m.strip_suffix(&format!(":{CONFIG_PATH}:ro")))
        .unwrap_or_else(|| panic!("no config mounted: {mounts:?}"));
    let config_rel = format!("deploy/compose/{}", mounted.trim_start_matches("./"));
    let port = transparent_port(&read(&config_rel), &config_rel);
    let proxy_uid = proxy["user"].as_str().unwrap().split(':').next().unwrap();
    let redirect = &services[REDIRECT_INIT];
    assert_eq!(redirect["build"]["target"].as_str(), Some("redirect"));
    assert_eq!(redirect["network_mode"].as_str(), Some("service:portcullis"));
    assert_eq!(redirect["cap_add"], Value::from(vec!["NET_ADMIN", "NET_RAW"]));
    let env = env_vars(&redirect["environment"]);
    assert_eq!(setting(&env, "PORTCULLIS_UID"), proxy_uid);
    assert_eq!(setting(&env, "PORTCULLIS_TRANSPARENT_PORT"), port.to_string());
    let worker = &services["worker"];
    assert_eq!(worker["network_mode"].as_str(), Some("service:portcullis"));
    assert_eq!(worker["depends_on"][REDIRECT_INIT]["condition"].as_str(), Some("service_completed_successfully"));
    assert!(worker.get("environment").is_none(), "no proxy variables");
    assert_ne!(worker["user"].as_str().unwrap().split(':').next(), Some(proxy_uid));
    // Build contexts point at the repository root (the Dockerfile).
    for svc in [proxy, redirect] {
        let context = svc["build"].as_str().or(svc["build"]["context"].as_str()).unwrap();
        assert!(root().join("deploy/compose").join(context).join("Dockerfile").exists(), "{context}");
    }
    assert!(root().join(REDIRECT_SCRIPT).exists());
}

/// Every object of the Kubernetes manifests and the Argo recipe.
fn cluster_docs() -> Vec<(String, Value)> {
    let mut docs = kubernetes_docs();
    let mut argo = Vec::new();
    yaml_files(&root().join("deploy/argo"), &mut argo);
    docs.extend(argo.iter().flat_map(|f| documents(f).into_iter().map(move |d| (f.clone(), d))));
    docs
}

/// The `workflowDefaults` Workflow body of an Argo controller ConfigMap.
fn workflow_defaults(rel: &str) -> Value {
    let doc = documents(rel).into_iter().find(|d| kind(d) == "ConfigMap").unwrap_or_else(|| panic!("{rel}: no ConfigMap"));
    assert_eq!(doc["metadata"]["name"].as_str(), Some("workflow-controller-configmap"), "{rel}");
    let text = doc["data"]["workflowDefaults"].as_str().unwrap_or_else(|| panic!("{rel}: no workflowDefaults"));
    serde_yaml_ng::from_str(text).unwrap_or_else(|e| panic!("{rel} workflowDefaults: {e}"))
}

/// Images the repository builds: compose services with a `build` section.
fn built_images() -> Vec<String> {
    let mut images = Vec::new();
    for rel in ["docker-compose.yml", "deploy/compose/docker-compose.transparent.yml", "deploy/kestra/docker-compose.yml"] {
        let compose = &documents(rel)[0];
        for (_, svc) in compose["services"].as_mapping().unwrap() {
            if svc.get("build").is_some() {
                images.push(svc["image"].as_str().unwrap_or_else(|| panic!("{rel}: a built service names its image")).to_string());
            }
        }
    }
    images
}

/// Pod specs of the Deployments, and the containers of each (init included).
fn pod_specs(docs: &[(String, Value)]) -> Vec<(String, Value)> {
    docs.iter().filter(|(_, d)| kind(d) == "Deployment").map(|(f, d)| (f.clone(), d["spec"]["template"]["spec"].clone())).collect()
}

fn containers_of(spec: &Value) -> Vec<&Value> {
    ["initContainers", "containers"].iter().filter_map(|k| spec[*k].as_sequence()).flatten().collect()
}

/// No manifest pulls an image nothing builds: ours are the images the
/// Dockerfile builds (named as in the compose files), the rest are public
/// third-party images used by the examples.
#[test]
fn manifests_reference_only_images_built_here_or_third_party() {
    let built = built_images();
    assert!(built.contains(&"portcullis:local".to_string()) && built.contains(&"portcullis-redirect:local".to_string()), "{built:?}");
    let mut images = Vec::new();
    for (file, spec) in pod_specs(&cluster_docs()) {
        images.extend(containers_of(&spec).iter().map(|c| (file.clone(), c["image"].as_str().unwrap().to_string())));
    }
    let patch = argo_patch();
    images.extend(containers_of(&patch).iter().map(|c| ("argo".to_string(), c["image"].as_str().unwrap().to_string())));
    for (file, image) in images {
        let ours = image.contains("portcullis");
        assert!(!ours || built.contains(&image), "{file}: {image} is not built by any compose file or the Dockerfile");
        assert!(ours || image.starts_with("curlimages/curl:"), "{file}: unexpected third-party image {image}");
    }
}

/// Pod Security "restricted" for every pod but the NET_ADMIN init step;
/// no service-account token; the HPA, not the Deployment, sets replicas.
#[test]
fn pods_are_hardened_and_the_hpa_owns_replicas() {
    let docs = kubernetes_docs();
    for (file, spec) in pod_specs(&docs) {
        assert_eq!(spec["automountServiceAccountToken"], Value::Bool(false), "{file}");
        assert_eq!(spec["securityContext"]["seccompProfile"]["type"].as_str(), Some("RuntimeDefault"), "{file}");
        for c in containers_of(&spec).into_iter().filter(|c| c["name"].as_str() != Some(REDIRECT_INIT)) {
            let sc = &c["securityContext"];
            assert_eq!(sc["runAsNonRoot"], Value::Bool(true), "{file}: {:?}", c["name"]);
            assert_eq!(sc["allowPrivilegeEscalation"], Value::Bool(false), "{file}: {:?}", c["name"]);
            assert_eq!(sc["capabilities"]["drop"], Value::from(vec!["ALL"]), "{file}: {:?}", c["name"]);
            assert!(sc["capabilities"].get("add").is_none(), "{file}: {:?}", c["name"]);
        }
    }
    for (_, hpa) in docs.iter().filter(|(_, d)| kind(d) == "HorizontalPodAutoscaler") {
        let target = hpa["spec"]["scaleTargetRef"]["name"].as_str().unwrap();
        let (file, deployment) = docs
            .iter()
            .find(|(_, d)| kind(d) == "Deployment" && d["metadata"]["name"].as_str() == Some(target))
            .expect("the HPA's Deployment");
        assert!(deployment["spec"].get("replicas").is_none(), "{file}: the HPA owns replicas");
    }
}

/// The proxy's own egress excepts every metadata address Portcullis
/// itself denies (the registry's metadata rows), and opens DNS exactly.
#[test]
fn proxy_network_policy_excepts_every_metadata_address() {
    use portcullis::policy::ranges::RangeKind;
    use portcullis::policy::registry::{rows, Treatment};
    let file = "deploy/kubernetes/shared/networkpolicy.yaml";
    let docs = documents(file);
    let policy = docs.iter().find(|p| p["metadata"]["name"].as_str() == Some("portcullis")).expect("the proxy policy");
    let egress = policy["spec"]["egress"].as_sequence().unwrap();
    let mut excepted: Vec<ipnet::IpNet> = Vec::new();
    for rule in egress {
        for peer in rule["to"].as_sequence().unwrap() {
            let block = &peer["ipBlock"];
            let Some(cidr) = block["cidr"].as_str() else { continue };
            let cidr: ipnet::IpNet = cidr.parse().unwrap();
            if rule.get("ports").is_some() {
                // A port-scoped ipBlock is the NodeLocal DNSCache exception: DNS only.
                let ports: Vec<u64> = rule["ports"].as_sequence().unwrap().iter().map(|p| p["port"].as_u64().unwrap()).collect();
                assert_eq!(ports, [53, 53], "{file}: {cidr}");
                assert_eq!(cidr.prefix_len(), cidr.max_prefix_len(), "{file}: one resolver address, not a range");
                continue;
            }
            assert_eq!(cidr.prefix_len(), 0, "{file}: the open rule is the whole family");
            excepted.extend(block["except"].as_sequence().unwrap().iter().map(|e| e.as_str().unwrap().parse::<ipnet::IpNet>().unwrap()));
        }
    }
    let metadata: Vec<_> = rows().filter(|r| matches!(r.treatment, Treatment::Deny(RangeKind::Metadata))).collect();
    assert!(metadata.len() >= 10, "{}", metadata.len());
    for row in metadata {
        let net = row.net();
        assert!(excepted.iter().any(|e| e.contains(&net)), "{file}: {} ({}) is not excepted", row.prefix, row.name);
    }
    // And the metadata addresses README.md lists, typed apart from the
    // registry: one missing from both would pass the loop above.
    for row in iana::rows().filter(|r| r.kind == "metadata") {
        let net = row.net();
        assert!(excepted.iter().any(|e| e.contains(&net)), "{file}: {} ({}) is not excepted", row.prefix, row.name);
    }
}

/// The workers' policy, applied in worker namespaces, names the proxy's
/// namespace; it allows the proxy port and DNS only.
#[test]
fn worker_network_policy_crosses_namespaces() {
    let (proxy, _) = shipped_ports();
    let file = "deploy/kubernetes/workers/networkpolicy.yaml";
    let policy = &documents(file)[0];
    assert!(policy["metadata"].get("namespace").is_none(), "{file}: applied in each worker namespace");
    let to_proxy = &policy["spec"]["egress"][0]["to"][0];
    assert_eq!(to_proxy["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"].as_str(), Some(PROXY_NAMESPACE));
    assert_eq!(to_proxy["podSelector"]["matchLabels"]["app.kubernetes.io/name"].as_str(), Some("portcullis"));
    assert_eq!(policy["spec"]["egress"][0]["ports"][0]["port"].as_u64(), Some(u64::from(proxy)));
    for rule in policy["spec"]["egress"].as_sequence().unwrap() {
        for peer in rule["to"].as_sequence().unwrap() {
            assert!(peer.get("namespaceSelector").is_some(), "{file}: a podSelector alone means this namespace only: {peer:?}");
        }
    }
}

/// The namespace the shared proxy is applied in.
const PROXY_NAMESPACE: &str = "egress";

/// The pod spec patch the enforcing Argo recipe adds to every workflow pod.
fn argo_patch() -> Value {
    let defaults = workflow_defaults("deploy/argo/sidecar/workflow-controller-configmap.yaml");
    let patch = defaults["spec"]["podSpecPatch"].as_str().expect("a workflow-level podSpecPatch (a string)");
    serde_yaml_ng::from_str(patch).unwrap_or_else(|e| panic!("podSpecPatch: {e}"))
}

// Argo, sidecar variant: tests/recipes.rs (sidecar_recipe_is_consistent).

/// Argo, cooperative: `container` and `script` templates and the executor
/// get the same proxy, the shared Service in the namespace the workers'
/// policy names; the pod label is the one that policy selects; NO_PROXY
/// keeps the service CIDR (the API server's Service IP) direct.
#[test]
fn argo_cooperative_recipe_is_consistent() {
    let (proxy, _) = shipped_ports();
    let rel = "deploy/argo/workflow-controller-configmap.cooperative.yaml";
    let defaults = workflow_defaults(rel);
    let url = format!("http://portcullis.{PROXY_NAMESPACE}.svc:{proxy}");
    let vars = |env: &Value| env_vars(env);
    let container = vars(&defaults["spec"]["templateDefaults"]["container"]["env"]);
    let script = vars(&defaults["spec"]["templateDefaults"]["script"]["env"]);
    assert_eq!(container, script, "script templates get what container templates get");
    for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        assert_eq!(setting(&container, name), url, "{name}");
    }
    let no_proxy = setting(&container, "NO_PROXY");
    assert_eq!(no_proxy, setting(&container, "no_proxy"));
    assert!(no_proxy.split(',').any(|e| e.parse::<ipnet::IpNet>().is_ok()), "a CIDR for the service range: {no_proxy}");
    let doc = documents(rel).into_iter().find(|d| kind(d) == "ConfigMap").unwrap();
    let executor: Value = serde_yaml_ng::from_str(doc["data"]["executor"].as_str().expect("executor config")).unwrap();
    let executor = vars(&executor["env"]);
    assert_eq!(setting(&executor, "HTTPS_PROXY"), url);
    assert_eq!(setting(&executor, "NO_PROXY"), no_proxy);
    let workers = &documents("deploy/kubernetes/workers/networkpolicy.yaml")[0];
    let label = &workers["spec"]["podSelector"]["matchLabels"];
    assert_eq!(&defaults["spec"]["podMetadata"]["labels"], label, "workflow pods fall under the workers' policy");
    let api = &documents("deploy/argo/networkpolicy-executor.yaml")[0];
    assert_eq!(&api["spec"]["podSelector"]["matchLabels"], label);
    let ports: Vec<u64> = api["spec"]["egress"][0]["ports"].as_sequence().unwrap().iter().map(|p| p["port"].as_u64().unwrap()).collect();
    assert_eq!(ports, [443, 6443]);
}

// Kestra: tests/recipes.rs (kestra_recipe_is_consistent).
