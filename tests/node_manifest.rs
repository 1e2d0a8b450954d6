//! The node-mode DaemonSet and its policy, read as a cluster would get them.

#[path = "router/manifest.rs"]
mod manifest;

use manifest::{manifest_env, node_manifests};

/// The port tests/router.rs redirects to.
const TRANSPARENT_PORT: u16 = 15001;

/// deploy/kubernetes/node/: the init container runs the script in router
/// mode with NET_ADMIN/NET_RAW and is the only container with capabilities;
/// the proxy is non-root, read-only, node-critical and listens where the
/// script redirects; no uid is exempt; an update never runs two agents on
/// one node's ports.
#[test]
fn node_daemonset_gives_capabilities_only_to_the_redirect_step() {
    let docs = node_manifests();
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").expect("DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"].as_bool(), Some(true), "rules go in the node's namespace");
    assert_eq!(spec["priorityClassName"].as_str(), Some("system-node-critical"));
    assert_eq!(spec["securityContext"]["seccompProfile"]["type"].as_str(), Some("RuntimeDefault"));
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"].as_u64(), Some(0), "two agents would bind one node's ports");

    let init = spec["initContainers"].as_sequence().unwrap();
    assert_eq!(init.len(), 1);
    assert_eq!(init[0]["name"].as_str(), Some("redirect"));
    let caps = &init[0]["securityContext"]["capabilities"];
    assert_eq!(caps["add"], serde_yaml_ng::Value::from(vec!["NET_ADMIN", "NET_RAW"]));
    assert_eq!(caps["drop"], serde_yaml_ng::Value::from(vec!["ALL"]));
    assert_eq!(manifest_env("PORTCULLIS_MODE"), "router");
    let names: Vec<&str> = init[0]["env"].as_sequence().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert!(!names.contains(&"PORTCULLIS_UID"), "router mode exempts no uid: {names:?}");
    assert!(manifest_env("PORTCULLIS_FROM").split(' ').any(|i| i == "cali+"), "covers the interfaces tests/router.rs uses");

    let containers = spec["containers"].as_sequence().unwrap();
    for c in containers {
        let sc = &c["securityContext"];
        assert_eq!(sc["capabilities"]["drop"], serde_yaml_ng::Value::from(vec!["ALL"]), "{c:?}");
        assert!(sc["capabilities"].get("add").is_none(), "only the init container has capabilities: {c:?}");
        assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
        assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    }
    let proxy = containers.iter().find(|c| c["name"].as_str() == Some("portcullis")).expect("portcullis container");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert!(proxy[probe]["httpGet"]["path"].as_str().is_some(), "{probe}");
    }
    let config = docs.iter().find(|d| d["kind"] == "ConfigMap").expect("policy ConfigMap");
    let text = config["data"]["portcullis.yaml"].as_str().unwrap();
    let parsed = portcullis::config::Config::from_yaml_str(text, "deploy/kubernetes/node/policy.yaml").unwrap_or_else(|e| panic!("{e}"));
    let port = parsed.transparent_listen.expect("transparent_listen").port();
    assert_eq!(manifest_env("PORTCULLIS_TRANSPARENT_PORT"), port.to_string());
    assert_eq!(port, TRANSPARENT_PORT, "the port tests/router.rs runs");
    let volume = spec["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == "config").unwrap();
    assert_eq!(volume["configMap"]["name"], config["metadata"]["name"]);
}
