#!/usr/bin/env python3
"""Validates every Kubernetes object under deploy/kubernetes, deploy/argo and
deploy/kestra (YAML documents with apiVersion and kind; Portcullis policies
and test cases beside them are not Kubernetes objects) against the Kubernetes JSON schemas (kubernetes-validate, strict: unknown
fields are errors) for the oldest supported and the newest version.

The Argo recipes' pod fragments are validated too: the enforcing variant's
podSpecPatch and the cooperative variant's template env, each wrapped in a
Pod. Custom resources (ServiceMonitor, PrometheusRule) have no schema in
kubernetes-validate and are listed, not validated. Before anything else the
validator must reject a misspelt field, so a validator that accepts
everything fails this script.
"""
import copy
import glob
import sys

import kubernetes_validate
import yaml

# 1.29: native sidecars (restartPolicy: Always on init containers).
VERSIONS = ["1.29.0", "1.37.0"]
# Kinds that exist from a later version than the oldest: validated from there.
SINCE = {"ValidatingAdmissionPolicy": "1.30.0", "ValidatingAdmissionPolicyBinding": "1.30.0"}
CUSTOM = {"ServiceMonitor", "PrometheusRule", "Workflow"}


def documents():
    files = sorted(
        glob.glob("deploy/kubernetes/**/*.yaml", recursive=True)
        + glob.glob("deploy/argo/**/*.yaml", recursive=True)
        + glob.glob("deploy/kestra/**/*.yaml", recursive=True)
    )
    for path in files:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc and "apiVersion" in doc and "kind" in doc:
                    yield path, doc


def pod(name, spec):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def argo_pods(path, doc):
    """Pods built from the Argo controller ConfigMap's workflowDefaults."""
    text = doc.get("data", {}).get("workflowDefaults")
    if not text:
        return
    spec = yaml.safe_load(text)["spec"]
    main = {"name": "main", "image": "busybox"}
    if "podSpecPatch" in spec:
        patch = yaml.safe_load(spec["podSpecPatch"])
        yield f"{path} podSpecPatch", pod("argo-patched", {**patch, "containers": [main]})
    pod_fields = {k: spec[k] for k in ("securityContext", "automountServiceAccountToken", "serviceAccountName") if k in spec}
    executor = yaml.safe_load(doc.get("data", {}).get("executor") or "{}")
    for kind, template in spec.get("templateDefaults", {}).items():
        containers = [{**main, **template}]
        if executor:
            containers.append({"name": "wait", **executor})
        yield f"{path} templateDefaults.{kind}", pod("argo-defaults", {**pod_fields, "containers": containers})


def check(label, doc, version):
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except Exception as e:  # the package raises several error types
        print(f"FAIL {label} ({doc.get('kind')}) against {version}: {str(e).splitlines()[0]}")
        return False
    return True


def self_test(docs):
    path, deployment = next((p, d) for p, d in docs if d.get("kind") == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesytem"] = True
    if check(f"{path} (misspelt on purpose)", broken, VERSIONS[0]):
        sys.exit("the validator accepted a misspelt field; it validates nothing")
    print("self-test: a misspelt field is rejected, as it must be")


def main():
    docs = list(documents())
    self_test(docs)
    ok = True
    checked = 0
    for path, doc in docs:
        if doc.get("kind") in CUSTOM:
            print(f"skip {path} {doc['kind']}: custom resource, no Kubernetes schema")
            continue
        targets = [(path, doc)] + list(argo_pods(path, doc))
        since = SINCE.get(doc.get("kind"))
        for version in [since] + VERSIONS[1:] if since else VERSIONS:
            for label, target in targets:
                ok &= check(label, target, version)
                checked += 1
    print(f"{checked} validations, versions {', '.join(VERSIONS)}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
