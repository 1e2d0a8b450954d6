"""Evaluates ValidatingAdmissionPolicies (admissionregistration.k8s.io/v1)
against objects the way the API server does, with a real CEL
implementation (cel-python): the policy's matchConstraints (resources,
objectSelector), its variables in order, then every validation; an
evaluation error counts as a refusal (failurePolicy: Fail).

Usage: python vap.py POLICIES.yaml OBJECT.json...
Prints one line per object: `ADMIT <file>`, `REFUSE <file>: <policy>: <message>`,
or `IGNORE <file>` when no policy matches it.
"""
import json
import sys

import celpy
import yaml
from celpy import celtypes


def upper_ascii(s):
    # Kubernetes' CEL strings library.
    return celtypes.StringType(str(s).upper())


ENV = celpy.Environment()
FUNCTIONS = {"upperAscii": upper_ascii}

# resource -> kind, for the resources the recipe's policies name.
KINDS = {"pods": "Pod", "workflows": "Workflow", "workflowtemplates": "WorkflowTemplate",
         "clusterworkflowtemplates": "ClusterWorkflowTemplate", "cronworkflows": "CronWorkflow"}


def evaluate(expr, activation):
    program = ENV.program(ENV.compile(expr), functions=FUNCTIONS)
    return program.evaluate(activation)


def matches(policy, obj):
    constraints = policy["spec"]["matchConstraints"]
    kinds = {KINDS[r.split("/")[0]] for rule in constraints["resourceRules"] for r in rule["resources"]}
    if obj.get("kind") not in kinds:
        return False
    labels = obj.get("metadata", {}).get("labels", {})
    for expr in constraints.get("objectSelector", {}).get("matchExpressions", []):
        if expr["operator"] == "Exists" and expr["key"] not in labels:
            return False
    return True


def refusal(policy, obj):
    """The message of the first failed validation, or None when admitted."""
    activation = {"object": celpy.json_to_cel(obj)}
    variables = {}
    for var in policy["spec"].get("variables", []):
        activation["variables"] = celtypes.MapType(variables)
        try:
            variables[celtypes.StringType(var["name"])] = evaluate(var["expression"], activation)
        except Exception as e:  # an evaluation error fails closed
            return f"variable {var['name']}: evaluation error: {e}"
    activation["variables"] = celtypes.MapType(variables)
    for v in policy["spec"]["validations"]:
        try:
            result = evaluate(v["expression"], activation)
        except Exception as e:
            return f"{v.get('message', v['expression'])} (evaluation error: {e})"
        if isinstance(result, Exception) or result is not celtypes.BoolType(True):
            if isinstance(result, Exception) or not bool(result):
                return v.get("message", v["expression"])
    return None


def main():
    with open(sys.argv[1]) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    policies = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
    bound = {d["spec"]["policyName"] for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding" and "Deny" in d["spec"]["validationActions"]}
    for path in sys.argv[2:]:
        with open(path) as f:
            obj = json.load(f)
        matched = [p for p in policies if p["metadata"]["name"] in bound and matches(p, obj)]
        if not matched:
            print(f"IGNORE {path}")
            continue
        refused = [(p["metadata"]["name"], refusal(p, obj)) for p in matched]
        refused = [(n, m) for n, m in refused if m]
        if refused:
            print(f"REFUSE {path}: {refused[0][0]}: {refused[0][1]}")
        else:
            print(f"ADMIT {path}")


if __name__ == "__main__":
    main()
