// Validates the custom resources the repository ships against the schemas
// of their operators, via the @kubernetes-models packages (generated from
// the CRDs): the ServiceMonitor and PrometheusRule (prometheus-operator)
// and the Argo recipes' workflowDefaults (Argo's Workflow spec), each
// wrapped in a Workflow. Run from the repository root with NODE_PATH
// pointing at a node_modules holding those packages and js-yaml.
// A deliberately broken object must be rejected first, so a validator that
// accepts everything fails this script.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.env.NODE_PATH;
const load = (path) => import(pathToFileURL(join(modules, path)).href);
const yaml = (await load("js-yaml/index.js")).default;
const { ServiceMonitor, PrometheusRule } = await load("@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/index.js");
const { Workflow } = await load("@kubernetes-models/argo-workflows/argoproj.io/v1alpha1/index.js");

const models = { ServiceMonitor, PrometheusRule };
let failed = 0;
let checked = 0;

function check(label, make) {
  checked += 1;
  try {
    make().validate();
    console.log(`ok   ${label}`);
  } catch (e) {
    failed += 1;
    console.log(`FAIL ${label}: ${e.message.split("\n")[0]}`);
  }
}

function docs(path) {
  return yaml.loadAll(readFileSync(path, "utf8")).filter(Boolean);
}

// Self-test: a wrong type in a ServiceMonitor endpoint must fail.
const monitor = docs("deploy/kubernetes/monitoring/servicemonitor.yaml")[0];
const broken = structuredClone(monitor);
broken.spec.endpoints[0].interval = "15seconds";
try {
  new ServiceMonitor(broken).validate();
  console.log("the validator accepted an invalid interval; it validates nothing");
  process.exit(1);
} catch {
  console.log("self-test: an invalid ServiceMonitor is rejected, as it must be");
}

for (const path of ["deploy/kubernetes/monitoring/servicemonitor.yaml", "deploy/monitoring/portcullis-prometheusrule.yaml"]) {
  for (const doc of docs(path)) {
    check(`${path} ${doc.kind}`, () => new models[doc.kind](doc));
  }
}
const argoConfigMaps = [
  "deploy/argo/sidecar/workflow-controller-configmap.yaml",
  "deploy/argo/workflow-controller-configmap.cooperative.yaml",
  "deploy/argo/node/workflow-controller-configmap.yaml",
];
for (const path of argoConfigMaps) {
  const cm = docs(path)[0];
  const defaults = yaml.load(cm.data.workflowDefaults);
  // A Workflow needs an entrypoint and templates; the defaults fill the rest.
  const spec = { ...defaults.spec, entrypoint: "main", templates: [{ name: "main", container: { name: "main", image: "busybox" } }] };
  check(`${path} workflowDefaults`, () => new Workflow({ metadata: { name: "defaults" }, spec }));
}
// Example Workflows shipped with the recipes, as written.
for (const path of ["deploy/argo/node/example-workflow.yaml"]) {
  for (const doc of docs(path)) {
    check(`${path} ${doc.kind}`, () => new Workflow(doc));
  }
}
console.log(`${checked} custom resources checked`);
process.exit(failed ? 1 : 0);
