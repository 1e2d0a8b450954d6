//! The node-mode manifests (deploy/kubernetes/node/) as YAML values, for
//! tests/router.rs (which runs their settings) and tests/node_manifest.rs.
#![allow(dead_code)]

use std::path::Path;

/// The node DaemonSet's and its ConfigMap's documents.
pub fn node_manifests() -> Vec<serde_yaml_ng::Value> {
    let mut docs = Vec::new();
    for file in ["portcullis-node.yaml", "policy.yaml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/node").join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            docs.push(serde::Deserialize::deserialize(doc).unwrap());
        }
    }
    docs
}

/// A setting of the node DaemonSet's `redirect` init container.
pub fn manifest_env(name: &str) -> String {
    let docs = node_manifests();
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").expect("DaemonSet");
    let init = &ds["spec"]["template"]["spec"]["initContainers"][0];
    let env = init["env"].as_sequence().unwrap();
    let var = env.iter().find(|e| e["name"].as_str() == Some(name)).unwrap_or_else(|| panic!("{name} not in {env:?}"));
    var["value"].as_str().unwrap_or_else(|| panic!("{name} has no literal value")).to_string()
}
