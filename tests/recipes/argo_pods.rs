//! Argo workflow pods as the controller builds them (workflow/controller/
//! workflowpod.go: containers [wait, main], initContainers [init] plus the
//! template's, the executor containers from the controller's `executor`
//! config, main from templateDefaults, the pod securityContext and service
//! accounts from workflowDefaults), for the recipe's podSpecPatch to be
//! merged onto with `kubectl patch --local --type strategic`.

use serde_json::{json, Value};

pub const EXECUTOR_TOKEN_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// What a step is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Step {
    /// A `container:` template.
    Container,
    /// A `script:` template: the init container stages the source.
    Script,
}

fn executor_env(name: &str) -> Value {
    json!([
        {"name": "ARGO_POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
        {"name": "ARGO_POD_UID", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.uid"}}},
        {"name": "ARGO_WORKFLOW_NAME", "value": "wf-x"},
        {"name": "ARGO_CONTAINER_NAME", "value": name},
    ])
}

/// The pod for `step` under the workflow defaults and executor config of a
/// controller ConfigMap (both as parsed YAML, converted to JSON).
pub fn pod(step: Step, defaults: &Value, executor: &Value) -> Value {
    let spec = &defaults["spec"];
    let kind = if step == Step::Container { "container" } else { "script" };
    let main_sc = spec["templateDefaults"][kind]["securityContext"].clone();
    let exec_sc = executor["securityContext"].clone();
    let image = executor["image"].as_str().expect("the executor image").to_string();
    let var_run_argo = json!({"name": "var-run-argo", "mountPath": "/var/run/argo"});
    let token = json!({"name": "exec-sa-token", "mountPath": EXECUTOR_TOKEN_MOUNT, "readOnly": true});
    let mut main = json!({
        "name": "main", "image": "python:3.12-slim", "securityContext": main_sc,
        "env": [{"name": "ARGO_CONTAINER_NAME", "value": "main"}],
        "volumeMounts": [var_run_argo.clone()], "terminationMessagePolicy": "FallbackToLogsOnError",
    });
    let mut init = json!({
        "name": "init", "image": image, "command": ["argoexec", "init", "--loglevel", "info"],
        "env": executor_env("init"), "securityContext": exec_sc.clone(),
        "volumeMounts": [var_run_argo.clone(), token.clone()],
    });
    let mut volumes = vec![
        json!({"name": "var-run-argo", "emptyDir": {}}),
        json!({"name": "tmp-dir-argo", "emptyDir": {}}),
        json!({"name": "exec-sa-token", "secret": {"secretName": "argo-executor.service-account-token"}}),
    ];
    match step {
        Step::Container => main["command"] = json!(["/var/run/argo/argoexec", "emissary", "--", "curl", "-s", "https://example.com/"]),
        Step::Script => {
            main["command"] = json!(["/var/run/argo/argoexec", "emissary", "--", "python"]);
            main["args"] = json!(["/argo/staging/script"]);
            let staging = json!({"name": "argo-staging", "mountPath": "/argo/staging"});
            main["volumeMounts"].as_array_mut().unwrap().insert(0, staging.clone());
            init["volumeMounts"].as_array_mut().unwrap().insert(0, staging);
            volumes.push(json!({"name": "argo-staging", "emptyDir": {}}));
        }
    }
    let wait = json!({
        "name": "wait", "image": image, "command": ["argoexec", "wait", "--loglevel", "info"],
        "env": executor_env("wait"), "securityContext": exec_sc,
        "volumeMounts": [{"name": "tmp-dir-argo", "mountPath": "/tmp", "subPath": "0"}, var_run_argo, token],
    });
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("wf-x-{kind}"), "namespace": "workflows", "labels": {"workflows.argoproj.io/workflow": "wf-x"}},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": spec["serviceAccountName"],
            "automountServiceAccountToken": spec["automountServiceAccountToken"],
            "securityContext": spec["securityContext"],
            "volumes": volumes,
            "initContainers": [init],
            "containers": [wait, main],
        }
    })
}
