//! Kestra's recipe (deploy/kestra/), checked as files: tests/recipes.rs
//! runs its layout in network namespaces.

use super::{documents, path, portcullis, repo};

use serde_yaml_ng::Value;

fn compose_env(service: &Value) -> std::collections::BTreeMap<String, String> {
    let mut service = service.clone();
    service.apply_merge().expect("YAML merge keys (compose's <<)");
    service["environment"]
        .as_mapping()
        .map(|m| m.iter().map(|(k, v)| (k.as_str().unwrap().to_string(), v.as_str().map_or_else(|| format!("{v:?}"), str::to_string))).collect())
        .unwrap_or_default()
}

/// Kestra: no host Docker socket; dind over TLS; redirect.sh in router mode
/// and Portcullis in dind's namespace on the task bridges, no resolver
/// opened and no exempt uid; Kestra only on internal networks with the
/// explicit proxy; forced defaults that keep every task runner on the task
/// network; the in-JVM script plugins removed; the example flow scans clean.
#[test]
fn kestra_recipe_is_consistent() {
    let text = std::fs::read_to_string(repo("deploy/kestra/docker-compose.yml")).unwrap();
    assert!(!text.lines().any(|l| !l.trim_start().starts_with('#') && l.contains("docker.sock")), "no host Docker socket");
    let compose = &documents("deploy/kestra/docker-compose.yml")[0];
    let services = &compose["services"];
    let kestra = &services["kestra"];
    assert!(kestra.get("user").is_none() && kestra.get("privileged").is_none());
    let networks: Vec<&str> = kestra["networks"].as_sequence().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    for net in &networks {
        assert_eq!(compose["networks"][*net]["internal"], Value::Bool(true), "Kestra's network {net} is internal");
    }
    let env = compose_env(kestra);
    assert_eq!(env["DOCKER_HOST"], "tcp://dind:2376");
    assert_eq!(env["DOCKER_TLS_VERIFY"], "1");
    assert_eq!(compose_env(&services["dind"])["DOCKER_TLS_CERTDIR"], "/certs");
    let explicit = services["portcullis"]["networks"].as_sequence().unwrap();
    assert!(explicit.contains(&Value::from("internal")) && explicit.contains(&Value::from("egress")));
    assert!(services["dind"]["networks"].as_sequence().unwrap().contains(&Value::from("dockerapi")));

    for svc in ["redirect", "portcullis-router"] {
        assert_eq!(services[svc]["network_mode"].as_str(), Some("service:dind"), "{svc} shares dind's namespace");
    }
    let redirect = compose_env(&services["redirect"]);
    assert_eq!(redirect["PORTCULLIS_MODE"], "router");
    let from: Vec<&str> = redirect["PORTCULLIS_FROM"].split_whitespace().collect();
    assert!(from.contains(&"docker0") && from.contains(&"br-+"), "{from:?}");
    assert!(services["dind-network"]["command"][0].as_str().unwrap().contains("com.docker.network.bridge.name=br-tasks"), "the task bridge matches br-+");
    for key in ["PORTCULLIS_DNS_RESOLVERS", "PORTCULLIS_UID", "PORTCULLIS_MARK", "PORTCULLIS_EXCLUDE"] {
        assert!(!redirect.contains_key(key), "{key}: nothing opened or exempt");
    }
    let router_config = services["portcullis-router"]["volumes"][0].as_str().unwrap().split(':').next().unwrap().replace("../compose/", "deploy/compose/");
    let router: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(repo(&router_config)).unwrap()).unwrap();
    assert!(router["transparent_listen"].as_str().unwrap().ends_with(&format!(":{}", redirect["PORTCULLIS_TRANSPARENT_PORT"])));
    let (code, out, err) = portcullis(&["validate", "--config", &path(&router_config)]);
    assert_eq!(code, 0, "{out}{err}");

    let app = &documents("deploy/kestra/application.yaml")[0];
    let defaults = app["kestra"]["plugins"]["defaults"].as_sequence().unwrap();
    let default_for = |ty: &str| defaults.iter().find(|d| d["type"].as_str() == Some(ty)).unwrap_or_else(|| panic!("no default for {ty}"));
    let http = default_for("io.kestra.plugin.core.http");
    assert_eq!(http["forced"], Value::Bool(true));
    let options = &http["values"]["options"];
    assert_eq!(options["proxyType"].as_str(), Some("HTTP"));
    assert_eq!(options["proxyAddress"].as_str(), Some("portcullis"), "the explicit proxy's service name");
    let explicit_config = Value::from(std::fs::read_to_string(repo("deploy/compose/portcullis.kestra.yaml")).unwrap());
    let explicit_config: Value = serde_yaml_ng::from_str(explicit_config.as_str().unwrap()).unwrap();
    let port = explicit_config["listen"].as_str().unwrap().rsplit(':').next().unwrap().parse::<u64>().unwrap();
    assert_eq!(options["proxyPort"].as_u64(), Some(port));
    let network = services["dind-network"]["command"][0].as_str().unwrap().split_whitespace().last().unwrap().to_string();
    for (ty, runner) in [("io.kestra", &default_for("io.kestra")["values"]["taskRunner"]), ("io.kestra.plugin.docker", &default_for("io.kestra.plugin.docker")["values"])] {
        assert_eq!(default_for(ty)["forced"], Value::Bool(true), "{ty}");
        assert_eq!(runner["networkMode"].as_str(), Some(network.as_str()), "{ty}");
        assert_eq!(runner["privileged"], Value::Bool(false), "{ty}");
        assert_eq!(runner["host"].as_str(), Some("tcp://dind:2376"), "{ty}");
    }
    assert_eq!(default_for("io.kestra")["values"]["taskRunner"]["type"].as_str(), Some("io.kestra.plugin.scripts.runner.docker.Docker"));
    assert!(defaults.iter().all(|d| d["values"].get("env").is_none()), "task containers need no proxy settings");
    let dockerfile = std::fs::read_to_string(repo("deploy/kestra/Dockerfile.kestra")).unwrap();
    let removed: Vec<&str> = dockerfile.lines().flat_map(|l| l.split_whitespace()).filter(|w| w.starts_with("/app/plugins/")).collect();
    for plugin in ["plugin-script-groovy-", "plugin-script-jython-", "plugin-script-nashorn-", "plugin-graalvm-"] {
        assert!(removed.iter().any(|r| r.contains(plugin)), "{plugin} removed: {removed:?}");
    }
    assert!(dockerfile.contains("RUN rm -f /app/plugins/"), "{dockerfile}");
    let (code, out, err) = portcullis(&["scan", "--config", &path(&router_config), &path("deploy/kestra/flows")]);
    assert_eq!(code, 0, "the example flows scan clean: {out}{err}");
    let (code, out, err) = portcullis(&["scan", "--config", &path("deploy/argo/node/portcullis.yaml"), "--role", "argo-workflows", &path("deploy/argo/node/example-workflow.yaml")]);
    assert_eq!(code, 0, "the example workflow scans clean: {out}{err}");
}
