//! The sidecar variant's admission policies (deploy/argo/sidecar/admission.yaml)
//! evaluated with cel-python against the merged pods and each bypass.

use super::{argo_pods, merged_pod, names, path, sidecar_config, strategic_merge, work_dir, Json};

use std::path::Path;

use serde_json::json;

/// The Python with cel-python that .ci/run installs (a venv outside the repository).
fn cel_python() -> String {
    std::env::var("CEL_VENV")
        .map(|v| format!("{v}/bin/python"))
        .unwrap_or_else(|_| std::env::temp_dir().join("portcullis-cel/bin/python").to_str().unwrap().to_string())
}

/// Runs the admission policies of `policies` over `objects` (name, object)
/// with cel-python (tests/recipes/vap.py): name -> the verdict line's tail.
fn admission(policies: &str, objects: &[(&str, Json)], dir: &Path) -> std::collections::BTreeMap<String, String> {
    let mut cmd = std::process::Command::new(cel_python());
    cmd.arg(path("tests/recipes/vap.py")).arg(path(policies));
    for (name, obj) in objects {
        let file = dir.join(format!("{name}.json"));
        std::fs::write(&file, obj.to_string()).unwrap();
        cmd.arg(file);
    }
    let out = cmd.output().expect("cel-python's venv (.ci/run installs it; CEL_VENV names another)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "vap.py: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
        .lines()
        .map(|l| {
            let (verdict, rest) = l.split_once(' ').unwrap();
            let (file, why) = rest.split_once(": ").unwrap_or((rest, ""));
            let name = Path::new(file).file_stem().unwrap().to_str().unwrap().to_string();
            (name, format!("{verdict} {why}").trim_end().to_string())
        })
        .collect()
}

/// Each verdict is the expected one: `ADMIT`, or `REFUSE` with the text
/// of the first validation that refused.
fn assert_verdicts(got: &std::collections::BTreeMap<String, String>, want: &[(&str, &str)]) {
    for (name, verdict) in want {
        let line = got.get(*name).unwrap_or_else(|| panic!("no verdict for {name}: {got:?}"));
        assert!(line.starts_with(verdict), "{name}: want {verdict:?}, got {line:?}");
    }
    assert_eq!(got.len(), want.len());
}

/// The sidecar variant's admission policies, evaluated with a real CEL
/// implementation: the recipe's merged pods are admitted; the known
/// bypasses (a template patch that excludes everything, one that deletes
/// `redirect`, a swapped policy, the exempt uid, NET_RAW kept, ...) are
/// refused, each by the validation that names it.
#[test]
fn admission_policies_admit_the_recipe_and_refuse_each_bypass() {
    let dir = work_dir("admission");
    let a = merged_pod(argo_pods::Step::Container, &dir);
    let b = merged_pod(argo_pods::Step::Script, &dir);
    let patched = |name: &str, patch: Json| strategic_merge(&a, &patch, &dir, name);
    let edited = |f: &dyn Fn(&mut Json)| {
        let mut pod = a.clone();
        f(&mut pod);
        pod
    };
    let main_sc = |sc: Json| json!({"containers": [{"name": "main", "securityContext": sc}]});
    let hardened = json!({"runAsNonRoot": true, "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}});
    let (defaults, executor, patch) = sidecar_config();
    let with_fetch = |sc: Option<Json>| {
        let mut pod = argo_pods::pod(argo_pods::Step::Container, &defaults, &executor);
        let mut fetch = json!({"name": "fetch", "image": "curlimages/curl:8.11.1", "command": ["curl", "-s", "https://example.com/"]});
        if let Some(sc) = sc {
            fetch["securityContext"] = sc;
        }
        pod["spec"]["initContainers"].as_array_mut().unwrap().push(fetch);
        pod
    };
    let c_ok = strategic_merge(&with_fetch(Some(hardened.clone())), &patch, &dir, "c-ok");
    let c_bare = strategic_merge(&with_fetch(None), &patch, &dir, "c-bare");
    assert_eq!(names(&c_ok["spec"]["initContainers"]), ["redirect", "portcullis", "init", "fetch"]);
    let objects = vec![
        ("a-container", a.clone()),
        ("b-script", b),
        ("c-template-init-hardened", c_ok),
        ("c-template-init-bare", c_bare),
        ("d-exclude-everything", patched("d", json!({"initContainers": [{"name": "redirect", "env": [{"name": "PORTCULLIS_EXCLUDE", "value": "0.0.0.0/0 ::/0"}]}]}))),
        ("e-delete-redirect", patched("e", json!({"initContainers": [{"name": "redirect", "$patch": "delete"}]}))),
        ("f-swap-policy", patched("f", json!({"volumes": [{"name": "portcullis-config", "configMap": {"name": "my-own-policy"}}]}))),
        ("g-exempt-uid", patched("g", main_sc(json!({"runAsUser": 65532})))),
        ("h-net-raw-added", patched("h", main_sc(json!({"capabilities": {"add": ["NET_RAW"]}})))),
        ("i-net-raw-kept", patched("i", main_sc(json!({"capabilities": {"drop": ["CHOWN"]}})))),
        ("j-net-admin-lowercase", patched("j", main_sc(json!({"capabilities": {"add": ["net_admin"]}})))),
        ("k-root", patched("k", main_sc(json!({"runAsUser": 0})))),
        ("l-escalation", patched("l", main_sc(json!({"allowPrivilegeEscalation": true})))),
        ("m-privileged", patched("m", main_sc(json!({"privileged": true})))),
        ("n-redirect-image", patched("n", json!({"initContainers": [{"name": "redirect", "image": "busybox"}]}))),
        ("o-redirect-command", patched("o", json!({"initContainers": [{"name": "redirect", "command": ["true"]}]}))),
        ("p-redirect-not-first", edited(&|pod| pod["spec"]["initContainers"].as_array_mut().unwrap().swap(0, 2))),
        ("q-host-network", edited(&|pod| pod["spec"]["hostNetwork"] = json!(true))),
        ("r-sidecar-args", patched("r", json!({"initContainers": [{"name": "portcullis", "args": ["run", "--config", "/tmp/mine.yaml"]}]}))),
        ("s-env-from", patched("s", json!({"initContainers": [{"name": "redirect", "envFrom": [{"configMapRef": {"name": "mine"}}]}]}))),
        ("t-wait-root", edited(&|pod| pod["spec"]["containers"][0]["securityContext"]["runAsUser"] = json!(0))),
        ("u-ephemeral-net-raw", edited(&|pod| pod["spec"]["ephemeralContainers"] = json!([{"name": "debug", "image": "busybox", "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"], "add": ["NET_RAW"]}}}]))),
        ("v-unlabelled", edited(&|pod| pod["metadata"]["labels"] = json!({}))),
    ];
    let got = admission("deploy/argo/sidecar/admission.yaml", &objects, &dir);
    let uid = "REFUSE portcullis-sidecar-pods: workload containers must run as a set non-root uid";
    let caps = "REFUSE portcullis-sidecar-pods: workload containers must drop NET_RAW";
    let escalation = "REFUSE portcullis-sidecar-pods: workload containers must set allowPrivilegeEscalation: false";
    let first = "REFUSE portcullis-sidecar-pods: the redirect init container must be the first";
    let fixed = "REFUSE portcullis-sidecar-pods: the redirect init container's image, command and args are fixed";
    let env = "REFUSE portcullis-sidecar-pods: the redirect init container's env is fixed";
    let sidecar = "REFUSE portcullis-sidecar-pods: the portcullis sidecar must be the second init container";
    assert_verdicts(&got, &[
        ("a-container", "ADMIT"),
        ("b-script", "ADMIT"),
        ("c-template-init-hardened", "ADMIT"),
        ("c-template-init-bare", escalation),
        ("d-exclude-everything", env),
        ("e-delete-redirect", first),
        ("f-swap-policy", "REFUSE portcullis-sidecar-pods: the policy volume must be the ConfigMap portcullis-transparent"),
        ("g-exempt-uid", uid),
        ("h-net-raw-added", caps),
        ("i-net-raw-kept", caps),
        ("j-net-admin-lowercase", caps),
        ("k-root", uid),
        ("l-escalation", escalation),
        ("m-privileged", escalation),
        ("n-redirect-image", fixed),
        ("o-redirect-command", fixed),
        ("p-redirect-not-first", first),
        ("q-host-network", "REFUSE portcullis-sidecar-pods: workflow pods may not use the host network"),
        ("r-sidecar-args", sidecar),
        ("s-env-from", env),
        ("t-wait-root", uid),
        ("u-ephemeral-net-raw", caps),
        ("v-unlabelled", "IGNORE"),
    ]);
}

/// No podSpecPatch in any Argo object that can carry one, wherever it sits.
#[test]
fn admission_refuses_podspecpatch_in_every_argo_object() {
    let dir = work_dir("argo-objects");
    let patch = "initContainers: [{name: redirect, $patch: delete}]";
    let step = |inline: Json| json!([[{"name": "s", "inline": inline}]]);
    let wf = |kind: &str, spec: Json| json!({"apiVersion": "argoproj.io/v1alpha1", "kind": kind, "metadata": {"name": "x"}, "spec": spec});
    let plain = json!({"entrypoint": "main", "templates": [{"name": "main", "container": {"image": "busybox"}}]});
    let objects = vec![
        ("workflow-clean", wf("Workflow", plain.clone())),
        ("template-clean", wf("WorkflowTemplate", plain.clone())),
        ("cron-clean", wf("CronWorkflow", json!({"schedule": "* * * * *", "workflowSpec": plain.clone()}))),
        ("workflow-level", wf("Workflow", json!({"entrypoint": "main", "podSpecPatch": patch, "templates": []}))),
        ("template-level", wf("WorkflowTemplate", json!({"templates": [{"name": "main", "podSpecPatch": patch, "container": {"image": "busybox"}}]}))),
        ("template-defaults", wf("ClusterWorkflowTemplate", json!({"templateDefaults": {"podSpecPatch": patch}, "templates": []}))),
        ("cron-workflow-level", wf("CronWorkflow", json!({"schedule": "* * * * *", "workflowSpec": {"podSpecPatch": patch}}))),
        ("cron-template", wf("CronWorkflow", json!({"schedule": "* * * * *", "workflowSpec": {"templates": [{"name": "m", "podSpecPatch": patch}]}}))),
        ("inline-step", wf("ClusterWorkflowTemplate", json!({"templates": [{"name": "main", "steps": step(json!({"podSpecPatch": patch, "container": {"image": "busybox"}}))}]}))),
        ("inline-dag", wf("Workflow", json!({"templates": [{"name": "main", "dag": {"tasks": [{"name": "t", "inline": {"podSpecPatch": patch}}]}}]}))),
    ];
    let got = admission("deploy/argo/sidecar/admission.yaml", &objects, &dir);
    let refused = "REFUSE argo-no-podspecpatch:";
    assert_verdicts(&got, &[
        ("workflow-clean", "ADMIT"),
        ("template-clean", "ADMIT"),
        ("cron-clean", "ADMIT"),
        ("workflow-level", refused),
        ("template-level", refused),
        ("template-defaults", refused),
        ("cron-workflow-level", refused),
        ("cron-template", refused),
        ("inline-step", refused),
        ("inline-dag", refused),
    ]);
}

