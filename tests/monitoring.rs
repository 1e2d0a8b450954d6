//! Monitoring as shipped in deploy/monitoring/: the alert rules (checked
//! and unit-tested with promtool), the Grafana dashboard (every query parses
//! and names only metrics the proxy exports), live tunnel metrics, and a real
//! Prometheus that scrapes a running proxy and evaluates the shipped rules.
//!
//! promtool and prometheus come from Debian's `prometheus` package (`.ci/run`
//! installs it). A missing binary fails these tests: it never skips them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use portcullis::app::App;
use serde::Deserialize;
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// How long Prometheus gets to start, scrape, and evaluate a rule.
const PROMETHEUS_STEP: Duration = Duration::from_secs(30);
/// How long a promtool run may take.
const PROMTOOL_LIMIT: Duration = Duration::from_secs(60);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn monitoring(rel: &str) -> PathBuf {
    root().join("deploy/monitoring").join(rel)
}

fn read_yaml(path: &Path) -> Yaml {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("portcullis-monitoring-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs a tool from the `prometheus` package on `input` to completion
/// within [`PROMTOOL_LIMIT`]; a missing binary is a failure, not a skip.
fn run_tool(program: &str, args: &[&str], dir: &Path, input: &str) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}): install Debian's `prometheus` package, as .ci/run does"));
    // Small inputs only: the pipe takes them whole, and closing it ends the input.
    let mut stdin = child.stdin.take().expect("stdin is piped");
    std::io::Write::write_all(&mut stdin, input.as_bytes()).unwrap();
    drop(stdin);
    let deadline = Instant::now() + PROMTOOL_LIMIT;
    let mut child = KillOnDrop(Some(child));
    loop {
        if child.get().try_wait().unwrap().is_some() {
            return child.into_inner().wait_with_output().unwrap();
        }
        assert!(Instant::now() < deadline, "{program} {args:?} did not finish within {PROMTOOL_LIMIT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `promtool` with `args` (and `input` on stdin), which must succeed;
/// returns its stdout.
fn promtool_with(args: &[&str], dir: &Path, input: &str) -> String {
    let out = run_tool("promtool", args, dir, input);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "promtool {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// `promtool` with `args`, which must succeed; returns its stdout.
fn promtool(args: &[&str], dir: &Path) -> String {
    promtool_with(args, dir, "")
}

/// A child process this test started, killed (by its own handle) when dropped.
struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    fn get(&mut self) -> &mut Child {
        self.0.as_mut().expect("the child is held until into_inner")
    }

    /// The child, no longer killed on drop (it has exited).
    fn into_inner(mut self) -> Child {
        self.0.take().expect("the child is held until into_inner")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Every rule of the shipped rule file.
fn rules() -> Vec<Yaml> {
    let file = read_yaml(&monitoring("portcullis-rules.yaml"));
    let groups = file["groups"].as_sequence().expect("groups");
    groups.iter().flat_map(|g| g["rules"].as_sequence().expect("rules").clone()).collect()
}

/// The alert names in the shipped rule file.
fn alert_names() -> Vec<String> {
    rules().iter().filter_map(|r| r["alert"].as_str().map(str::to_string)).collect()
}

/// Every `expr` of the shipped rule file.
fn rule_exprs() -> Vec<String> {
    rules().iter().map(|r| r["expr"].as_str().expect("every rule has an expr").to_string()).collect()
}

#[test]
fn alert_rules_are_valid_and_the_prometheusrule_carries_the_same_groups() {
    let out = promtool(&["check", "rules", "portcullis-rules.yaml"], &monitoring(""));
    assert!(out.contains(&format!("SUCCESS: {} rules found", alert_names().len())), "{out}");
    let file = read_yaml(&monitoring("portcullis-rules.yaml"));
    let object = read_yaml(&monitoring("portcullis-prometheusrule.yaml"));
    assert_eq!(object["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
    assert_eq!(object["kind"].as_str(), Some("PrometheusRule"));
    assert_eq!(object["spec"]["groups"], file["groups"], "the PrometheusRule and the rule file differ");
    let names = alert_names();
    let wanted = [
        "PortcullisMetadataAccessAttempted",
        "PortcullisTunnelSniRefused",
        "PortcullisReloadFailed",
        "PortcullisDenyRateSpike",
        "PortcullisUpstreamErrorRatio",
        "PortcullisConnectionsRefusedOverLimits",
        "PortcullisLogLinesDropped",
        "PortcullisDown",
        "PortcullisNotReady",
        "PortcullisDescriptorsNearLimit",
        "PortcullisDnsRefusedSpike",
    ];
    assert_eq!(names, wanted);
    let runbook = std::fs::read_to_string(root().join("docs/MONITORING.md")).unwrap();
    for name in &names {
        assert!(runbook.contains(&format!("### {name}")), "docs/MONITORING.md has no runbook for {name}");
    }
}

/// The compose demo's Prometheus mounts the shipped rule file where its
/// config loads it from, and that config passes `promtool check config`
/// (run on a copy that names the file in this checkout).
#[test]
fn the_compose_prometheus_loads_the_shipped_rules() {
    let compose = read_yaml(&root().join("docker-compose.yml"));
    let mounts = compose["services"]["prometheus"]["volumes"].as_sequence().expect("prometheus volumes");
    let mounted = mounts
        .iter()
        .filter_map(|m| m.as_str()?.strip_prefix("./deploy/monitoring/portcullis-rules.yaml:"))
        .map(|rest| rest.trim_end_matches(":ro").to_string())
        .next()
        .expect("the compose Prometheus mounts deploy/monitoring/portcullis-rules.yaml");
    let config_path = root().join("deploy/compose/prometheus.yml");
    let config = read_yaml(&config_path);
    let loaded: Vec<&str> = config["rule_files"].as_sequence().expect("rule_files").iter().filter_map(Yaml::as_str).collect();
    assert_eq!(loaded, [mounted.as_str()]);
    let dir = temp_dir("compose");
    let text = std::fs::read_to_string(&config_path).unwrap();
    let local = text.replace(&mounted, &monitoring("portcullis-rules.yaml").display().to_string());
    assert_ne!(local, text);
    std::fs::write(dir.join("prometheus.yml"), local).unwrap();
    let out = promtool(&["check", "config", "prometheus.yml"], &dir);
    assert!(out.contains(&format!("SUCCESS: {} rules found", alert_names().len())), "{out}");
}

/// One `alert_rule_test` entry of a promtool test file.
#[derive(Deserialize)]
struct AlertTest {
    alertname: String,
    exp_alerts: Vec<Yaml>,
}

#[derive(Deserialize)]
struct TestCase {
    alert_rule_test: Vec<AlertTest>,
}

#[derive(Deserialize)]
struct TestFile {
    tests: Vec<TestCase>,
}

#[test]
fn every_alert_has_unit_tests_that_fire_it_and_do_not_and_they_pass() {
    let dir = monitoring("tests");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml"))
        .collect();
    files.sort();
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for file in &files {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let parsed: TestFile = serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        for check in parsed.tests.iter().flat_map(|t| &t.alert_rule_test) {
            let set = if check.exp_alerts.is_empty() { &mut quiet } else { &mut fires };
            set.insert(check.alertname.clone());
        }
    }
    for name in alert_names() {
        assert!(fires.contains(&name), "no unit test makes {name} fire");
        assert!(quiet.contains(&name), "no unit test checks {name} stays quiet");
    }
    let mut args = vec!["test", "rules"];
    args.extend(files.iter().map(String::as_str));
    let out = promtool(&args, &dir);
    assert_eq!(out.matches("SUCCESS").count(), files.len(), "{out}");
}

/// The metric names a PromQL expression reads. Lexical, which is enough for
/// the shipped expressions (promtool has parsed them already): skips strings,
/// label matchers, ranges, grouping label lists, numbers and durations,
/// keywords, aggregations and function calls.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const AGGREGATIONS: &[&str] =
        &["sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile"];
    const KEYWORDS: &[&str] = &["and", "or", "unless", "offset", "bool"];
    const GROUPING: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    let chars: Vec<char> = expr.chars().collect();
    let skip_to = |from: usize, close: char| {
        let mut i = from + 1;
        let mut in_string = false;
        while i < chars.len() && (in_string || chars[i] != close) {
            match chars[i] {
                '\\' if in_string => i += 1,
                '"' => in_string = !in_string,
                _ => {}
            }
            i += 1;
        }
        i + 1
    };
    let mut names = BTreeSet::new();
    let mut grouping_next = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            i = skip_to(i, '"');
        } else if c == '{' {
            i = skip_to(i, '}');
        } else if c == '[' {
            i = skip_to(i, ']');
        } else if c == '(' && grouping_next {
            grouping_next = false;
            i = skip_to(i, ')');
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if GROUPING.contains(&word.as_str()) {
                grouping_next = true;
            } else if !(AGGREGATIONS.contains(&word.as_str()) || KEYWORDS.contains(&word.as_str()) || next == Some(&'(')) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn metric_names_are_read_from_promql() {
    let cases: &[(&str, &[&str])] = &[
        ("up{job=\"portcullis\"} == 0", &["up"]),
        ("sum by (le) (rate(a_bucket{x=~\"}[\"}[5m]))", &["a_bucket"]),
        ("histogram_quantile(0.99, sum by (le, job) (rate(b_bucket[1m])))", &["b_bucket"]),
        ("x / y > 0.8 and on (job, instance) z", &["x", "y", "z"]),
        ("increase(c[10m] offset 5m) > 1/60 or vector(0)", &["c"]),
        ("topk(10, sum without (role) (d))", &["d"]),
    ];
    for (expr, want) in cases {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(metric_names(expr), want, "{expr}");
    }
}

/// Every PromQL expression of the dashboard, with Grafana's variables
/// replaced by values Prometheus accepts, and the selectors of its
/// `label_values(...)` variable queries.
fn dashboard_exprs(dashboard: &Json) -> Vec<String> {
    let mut exprs = Vec::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("panel {} has no targets", panel["title"]));
        assert!(!targets.is_empty(), "panel {} has no targets", panel["title"]);
        exprs.extend(targets.iter().map(|t| t["expr"].as_str().expect("every target has an expr").to_string()));
    }
    for annotation in dashboard["annotations"]["list"].as_array().expect("annotations") {
        exprs.extend(annotation["expr"].as_str().map(str::to_string));
    }
    for variable in dashboard["templating"]["list"].as_array().expect("templating") {
        let Some(query) = variable["query"]["query"].as_str() else { continue };
        let selector = query
            .strip_prefix("label_values(")
            .and_then(|rest| rest.rsplit_once(','))
            .map(|(selector, _)| selector.to_string())
            .unwrap_or_else(|| panic!("variable {} is not a label_values() query: {query}", variable["name"]));
        exprs.push(selector);
    }
    exprs
        .into_iter()
        .map(|e| {
            e.replace("$__rate_interval", "5m")
                .replace("$__range", "6h")
                .replace("$__interval", "1m")
                .replace("$job", ".*")
                .replace("$instance", ".*")
                .replace("$role", ".*")
        })
        .collect()
}

#[test]
fn dashboard_is_importable_with_the_datasource_as_a_variable() {
    let dashboard: Json = serde_json::from_str(&std::fs::read_to_string(monitoring("portcullis-dashboard.json")).unwrap()).unwrap();
    assert!(dashboard["id"].is_null(), "an importable dashboard has no database id");
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let ds = variables.iter().find(|v| v["name"] == "DS_PROMETHEUS").expect("a DS_PROMETHEUS variable");
    assert_eq!((ds["type"].as_str(), ds["query"].as_str()), (Some("datasource"), Some("prometheus")));
    let mut titles = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap().iter().filter(|p| p["type"] != "row") {
        titles.push(panel["title"].as_str().unwrap().to_string());
        assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", panel["title"]);
        assert!(panel["description"].as_str().is_some_and(|d| !d.is_empty()), "{} has no description", panel["title"]);
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", panel["title"]);
        }
    }
    for wanted in [
        "Decisions by reason and role",
        "Deny rate",
        "Top deny reasons",
        "Upstream connect latency",
        "DNS latency",
        "Active connections and tunnels",
        "Relayed bytes",
        "Reloads",
        "Policy generation",
        "Refused connections",
    ] {
        assert!(titles.iter().any(|t| t == wanted), "no panel {wanted}: {titles:?}");
    }
}

/// Writes `exprs` as recording rules and has promtool parse them.
fn check_promql(exprs: &[String], dir: &Path) {
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let quoted = serde_json::to_string(expr).unwrap();
        rules.push_str(&format!("      - record: dashboard:query_{i}\n        expr: {quoted}\n"));
    }
    std::fs::write(dir.join("dashboard-rules.yaml"), rules).unwrap();
    let out = promtool(&["check", "rules", "dashboard-rules.yaml"], dir);
    assert!(out.contains(&format!("SUCCESS: {} rules found", exprs.len())), "{out}");
}

fn policy(ports: &[u16], dns: SocketAddr) -> String {
    let ports = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
    format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\ndns:\n  nameservers: [\"{dns}\"]\nallow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    allow:\n      cidrs: [127.0.0.1/32]\n      http_ports: [{ports}]\n      connect_ports: [{ports}]\n"
    )
}

/// Starts the whole app in-process on `yaml`; dropping the sender stops it.
async fn start_app(name: &str, yaml: &str) -> (SocketAddr, SocketAddr, oneshot::Sender<()>) {
    let dir = temp_dir(name);
    let path = dir.join("portcullis.yaml");
    std::fs::write(&path, yaml).unwrap();
    let app = App::start(&path).await.expect("app starts");
    let (proxy, admin) = (app.proxy_addr().unwrap(), app.admin_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run(async move {
        let _ = stopped.await;
    }));
    (proxy, admin, stop)
}

/// `GET path` over HTTP/1.0 (so the answer is not chunked and ends with
/// the connection): (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = match tokio::time::timeout(STEP, exchange).await {
        Ok(Ok(raw)) => raw,
        Ok(Err(e)) => return (0, e.to_string()),
        Err(_) => panic!("GET {path} from {addr} did not finish within {STEP:?}"),
    };
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, body.to_string())
}

/// The metrics text of the admin listener.
async fn scrape(admin: SocketAddr) -> String {
    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of one exposed series (see [`metric_value`]): a missing
/// series fails instead of reading as 0.
fn value(metrics: &str, series: &str) -> f64 {
    metric_value(metrics, series)
}

/// The value of a series that may not be exposed yet (for waits only).
fn sample_if_present(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The sample names the exposition can carry: every family, and for a
/// histogram its `_bucket`, `_sum` and `_count` series.
fn exported_names(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
        names.insert(name.to_string());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

/// Polls `check` until it returns `Some`, at most `limit`.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Traffic that makes every metric family appear: a tunnel by name (DNS,
/// connect latency, bytes, duration), a refused upstream, a metadata request.
async fn exercise(proxy: SocketAddr, admin: SocketAddr, echo: SocketAddr, closed: u16) {
    let (resp, mut tunnel) = connect(proxy, &format!("echo.test:{}", echo.port())).await;
    assert_eq!(resp.status, 200);
    tunnel.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(STEP, tunnel.read_exact(&mut back)).await.unwrap().unwrap();
    drop(tunnel);
    assert_eq!(connect(proxy, &format!("127.0.0.1:{closed}")).await.0.status, 502);
    assert_eq!(get(proxy, "http://169.254.169.254/latest/meta-data/").await.status, 403);
    wait_for("the tunnel is closed", STEP, || async {
        (value(&scrape(admin).await, "portcullis_active_tunnels") == 0.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_rule_queries_parse_and_name_only_exported_metrics() {
    let dashboard: Json = serde_json::from_str(&std::fs::read_to_string(monitoring("portcullis-dashboard.json")).unwrap()).unwrap();
    let exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() > 20, "{exprs:?}");
    let dir = temp_dir("dashboard");
    check_promql(&exprs, &dir);

    let echo = start_tcp_echo().await;
    let (refusing, _held_port) = refusing_addr();
    let closed = refusing.port();
    let dns = start_dns(&[("echo.test", &["127.0.0.1"])]).await;
    let (proxy, admin, _stop) = start_app("names", &policy(&[echo.port(), closed], dns.addr)).await;
    exercise(proxy, admin, echo, closed).await;
    let metrics = scrape(admin).await;
    // The exposition also passes promtool's naming and format lint.
    promtool_with(&["check", "metrics"], &dir, &metrics);
    let mut exported = exported_names(&metrics);
    // Prometheus's own series for every target.
    exported.insert("up".to_string());
    for expr in exprs.iter().chain(&rule_exprs()) {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "no metric in {expr}");
        for name in names {
            assert!(exported.contains(&name), "{name} (in {expr}) is not exported; the proxy exports {exported:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tunnels_report_bytes_while_open_and_once_in_total() {
    let echo = start_tcp_echo().await;
    let dns = start_dns(&[]).await;
    let (proxy, admin, _stop) = start_app("live", &policy(&[echo.port()], dns.addr)).await;
    let up = "portcullis_relayed_bytes_total{direction=\"client_to_upstream\"}";
    let down = "portcullis_relayed_bytes_total{direction=\"upstream_to_client\"}";
    let role_up = "portcullis_role_relayed_bytes_total{direction=\"client_to_upstream\",role=\"default\"}";
    let role_down = "portcullis_role_relayed_bytes_total{direction=\"upstream_to_client\",role=\"default\"}";
    let before = scrape(admin).await;
    assert_eq!((value(&before, up), value(&before, down)), (0.0, 0.0));

    let (resp, mut tunnel) = connect(proxy, &format!("127.0.0.1:{}", echo.port())).await;
    assert_eq!(resp.status, 200);
    let sent = pattern(0, 100_000);
    let opened = Instant::now();
    tunnel.write_all(&sent).await.unwrap();
    let mut back = vec![0u8; sent.len()];
    tokio::time::timeout(STEP, tunnel.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(back, sent);

    let live = wait_for("the open tunnel's bytes in the metrics", STEP, || async {
        let m = scrape(admin).await;
        (value(&m, up) == 100_000.0 && value(&m, down) == 100_000.0).then_some(m)
    })
    .await;
    assert!(opened.elapsed() < Duration::from_secs(6), "live bytes took {:?}", opened.elapsed());
    assert_eq!(value(&live, "portcullis_active_tunnels"), 1.0, "counted while the tunnel is open");
    assert_eq!((value(&live, role_up), value(&live, role_down)), (100_000.0, 100_000.0));
    assert_eq!(value(&live, "portcullis_tunnel_duration_seconds_count"), 0.0);

    tunnel.write_all(b"tail").await.unwrap();
    let mut tail = [0u8; 4];
    tokio::time::timeout(STEP, tunnel.read_exact(&mut tail)).await.unwrap().unwrap();
    drop(tunnel);
    let closed = wait_for("the tunnel's decision is counted", STEP, || async {
        let m = scrape(admin).await;
        let finished = "portcullis_requests_total{decision=\"allow\",kind=\"connect\",reason=\"none\",role=\"default\"}";
        // Absent until the tunnel's decision is counted: a wait, so absence
        // reads as "not yet" here, and the strict reads follow.
        (sample_if_present(&m, finished) == Some(1.0)).then_some(m)
    })
    .await;
    // Once each: the live flushes and the end-of-tunnel remainder add up
    // to what the log line reports, never more.
    assert_eq!((value(&closed, up), value(&closed, down)), (100_004.0, 100_004.0));
    assert_eq!((value(&closed, role_up), value(&closed, role_down)), (100_004.0, 100_004.0));
    assert_eq!(value(&closed, "portcullis_tunnel_duration_seconds_count"), 1.0);
    assert!(value(&closed, "portcullis_tunnel_duration_seconds_sum") > 0.0);
    let (open_fds, max_fds) = (value(&closed, "process_open_fds"), value(&closed, "process_max_fds"));
    assert!(open_fds > 3.0 && open_fds < max_fds, "descriptors {open_fds} of {max_fds}");
}

/// A Prometheus server from the `prometheus` package on loopback, with its
/// own storage, killed when dropped.
struct Prometheus {
    addr: SocketAddr,
    log: PathBuf,
    process: KillOnDrop,
}

impl Prometheus {
    /// Scrapes `admin` as job `portcullis` every second and evaluates the
    /// shipped rules every second.
    async fn start(admin: SocketAddr, dir: &Path) -> Prometheus {
        let rules = monitoring("portcullis-rules.yaml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: portcullis\n    static_configs:\n      - targets: [\"{admin}\"]\n",
            rules.display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let log = dir.join("prometheus.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let process = Command::new("prometheus")
            // Port 0: prometheus binds it and logs the port it got.
            .arg("--web.listen-address=127.0.0.1:0")
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run prometheus ({e}): install Debian's `prometheus` package, as .ci/run does"));
        let mut process = KillOnDrop(Some(process));
        let addr = wait_for("prometheus to listen", PROMETHEUS_STEP, || {
            let exited = process.get().try_wait().unwrap();
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(exited.is_none(), "prometheus exited ({exited:?}):\n{text}");
            let bound = text
                .lines()
                .filter(|l| l.contains("msg=\"Listening on\""))
                .find_map(|l| l.split("address=").nth(1)?.split_whitespace().next()?.parse::<SocketAddr>().ok());
            async move { bound }
        })
        .await;
        let mut prometheus = Prometheus { addr, log, process };
        wait_for("prometheus to be ready", PROMETHEUS_STEP, || {
            let exited = prometheus.process.get().try_wait().unwrap();
            assert!(exited.is_none(), "prometheus exited ({exited:?}):\n{}", prometheus.log_text());
            async move { (http_get(addr, "/-/ready").await.0 == 200).then_some(()) }
        })
        .await;
        prometheus
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /api/v1/<path>`: the `data` of a successful answer.
    async fn api(&self, path: &str) -> Json {
        let (status, body) = http_get(self.addr, &format!("/api/v1/{path}")).await;
        assert_eq!(status, 200, "{path}: {body}");
        let answer: Json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert_eq!(answer["status"], "success", "{path}: {body}");
        answer["data"].clone()
    }

    /// An instant query's result vector.
    async fn query(&self, promql: &str) -> Vec<Json> {
        let data = self.api(&format!("query?query={}", percent_encode(promql))).await;
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// Active alerts by name: (labels, state).
    async fn alerts(&self, name: &str) -> Vec<(BTreeMap<String, String>, String)> {
        let data = self.api("alerts").await;
        let alerts = data["alerts"].as_array().cloned().unwrap_or_default();
        alerts
            .iter()
            .filter(|a| a["labels"]["alertname"] == name)
            .map(|a| {
                let labels = serde_json::from_value(a["labels"].clone()).unwrap();
                (labels, a["state"].as_str().unwrap_or("").to_string())
            })
            .collect()
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_proxy_and_the_metadata_alert_fires() {
    let echo = start_tcp_echo().await;
    let dns = start_dns(&[]).await;
    let (proxy, admin, _stop) = start_app("prometheus-app", &policy(&[echo.port()], dns.addr)).await;
    let dir = temp_dir("prometheus");
    let prometheus = Prometheus::start(admin, &dir).await;

    wait_for("the portcullis target is up", PROMETHEUS_STEP, || async {
        let up = prometheus.query("up{job=\"portcullis\"}").await;
        (up.len() == 1 && up[0]["value"][1] == "1").then_some(())
    })
    .await;
    let names = prometheus.api("label/__name__/values").await;
    let names: BTreeSet<&str> = names.as_array().unwrap().iter().filter_map(Json::as_str).collect();
    for family in [
        "portcullis_active_connections",
        "portcullis_active_tunnels",
        "portcullis_build_info",
        "portcullis_config_reloads_total",
        "portcullis_connections_refused_total",
        "portcullis_dns_resolve_duration_seconds_bucket",
        "portcullis_draining",
        "portcullis_log_lines_dropped_total",
        "portcullis_policy_generation",
        "portcullis_relayed_bytes_total",
        "portcullis_revoked_total",
        "portcullis_tunnel_duration_seconds_bucket",
        "portcullis_upstream_connect_duration_seconds_bucket",
        "process_max_fds",
        "process_open_fds",
    ] {
        assert!(names.contains(family), "{family} was not scraped; got {names:?}");
    }

    // Every shipped rule is loaded and evaluates without error against real data.
    let alerts = alert_names();
    wait_for("every rule evaluated without error", PROMETHEUS_STEP, || async {
        let data = prometheus.api("rules").await;
        let rules: Vec<Json> = data["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap().clone()).collect();
        let ok: Vec<&str> = rules
            .iter()
            .filter(|r| r["health"] == "ok" && r["lastEvaluation"].as_str().is_some_and(|t| !t.starts_with("0001")))
            .filter_map(|r| r["name"].as_str())
            .collect();
        let bad: Vec<&Json> = rules.iter().filter(|r| r["health"] == "err").collect();
        assert!(bad.is_empty(), "rules fail to evaluate: {bad:?}");
        (ok.len() == alerts.len()).then_some(())
    })
    .await;
    let quiet = prometheus.api("alerts").await;
    assert_eq!(quiet["alerts"].as_array().map(Vec::len), Some(0), "a healthy proxy raises no alert: {quiet}");

    let denied = get(proxy, "http://169.254.169.254/latest/meta-data/").await;
    assert_eq!((denied.status, denied.header("x-portcullis-deny")), (403, Some("denied-range:metadata")));
    let (labels, state) = wait_for("the metadata alert", PROMETHEUS_STEP, || async {
        prometheus.alerts("PortcullisMetadataAccessAttempted").await.into_iter().next()
    })
    .await;
    assert!(state == "pending" || state == "firing", "{state}");
    assert_eq!(labels.get("role").map(String::as_str), Some("default"));
    assert_eq!(labels.get("severity").map(String::as_str), Some("critical"));
    assert_eq!(labels.get("job").map(String::as_str), Some("portcullis"));
    assert!(prometheus.alerts("PortcullisDown").await.is_empty());

    // Every dashboard query runs against the real data; the decision and
    // metadata panels show the request just made.
    let dashboard: Json = serde_json::from_str(&std::fs::read_to_string(monitoring("portcullis-dashboard.json")).unwrap()).unwrap();
    let mut answered = BTreeMap::new();
    for expr in dashboard_exprs(&dashboard) {
        let result = prometheus.query(&expr).await;
        answered.insert(expr, result);
    }
    let metadata_panel = answered
        .iter()
        .find(|(expr, _)| expr.contains("denied-(range|name):metadata"))
        .map(|(_, result)| result)
        .expect("a metadata panel");
    assert_eq!(metadata_panel.len(), 1);
    let attempts: f64 = metadata_panel[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(attempts > 0.0, "metadata attempts shown as {attempts}");
    // A rate needs two samples of the new series: wait for the next scrapes.
    let decisions = answered
        .keys()
        .find(|expr| expr.starts_with("sum by (role, decision, reason) (rate(portcullis_requests_total"))
        .expect("the decisions panel");
    wait_for("the metadata deny in the decisions panel", PROMETHEUS_STEP, || async {
        let result = prometheus.query(decisions).await;
        result
            .iter()
            .any(|s| s["metric"]["reason"] == "denied-range:metadata" && s["metric"]["role"] == "default")
            .then_some(())
    })
    .await;
    drop(prometheus);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `portcullis_requests_total` series of the exposition, as written.
fn request_series(metrics: &str) -> Vec<&str> {
    metrics.lines().filter(|l| l.starts_with("portcullis_requests_total{")).collect()
}

/// Every series the dashboard and the alert rules read exists from
/// start-up, at zero, before any request: per configured role and request
/// kind served, an allow and every deny reason (and for a report-mode role
/// the reasons it lets through), both relayed directions per role, every
/// upstream error code. The set is bounded by the config, and a role that
/// a reload adds gets its series with the reload. Through the real binary.
#[tokio::test]
async fn series_exist_from_start_at_zero_for_the_configured_roles() {
    const KINDS: [&str; 5] = ["http", "connect", "transparent-http", "transparent-tls", "transparent-tcp"];
    let dir = temp_dir("start-series");
    let yaml = "transparent_listen: 127.0.0.1:0\nroles:\n  default: {}\n  ci:\n    mode: report\n";
    let proxy = BinaryProxy::spawn(&dir.join("portcullis.yaml"), yaml).await;
    let metrics = proxy.metrics().await;

    let dashboard: Json = serde_json::from_str(&std::fs::read_to_string(monitoring("portcullis-dashboard.json")).unwrap()).unwrap();
    let mut exported = exported_names(&metrics);
    exported.insert("up".to_string());
    for expr in dashboard_exprs(&dashboard).iter().chain(&rule_exprs()) {
        for name in metric_names(expr) {
            assert!(exported.contains(&name), "{name} (in {expr}) is not exported before the first request");
        }
    }
    let zero = |series: &str| assert_eq!(metric_value(&metrics, series), 0.0, "{series}");
    for role in ["default", "ci"] {
        for kind in KINDS {
            zero(&format!("portcullis_requests_total{{decision=\"allow\",kind=\"{kind}\",reason=\"none\",role=\"{role}\"}}"));
            for reason in ["denied-range:metadata", "denied-name:metadata", "sni-mismatch", "not-tls", "not-allowlisted", "auth-failed"] {
                zero(&format!("portcullis_requests_total{{decision=\"deny\",kind=\"{kind}\",reason=\"{reason}\",role=\"{role}\"}}"));
            }
        }
        for direction in ["client_to_upstream", "upstream_to_client"] {
            zero(&format!("portcullis_role_relayed_bytes_total{{direction=\"{direction}\",role=\"{role}\"}}"));
        }
    }
    zero("portcullis_requests_total{decision=\"would_deny\",kind=\"connect\",reason=\"not-allowlisted\",role=\"ci\"}");
    assert!(!metrics.contains("decision=\"would_deny\",kind=\"connect\",reason=\"not-allowlisted\",role=\"default\""), "enforce mode lets nothing through");
    for code in ["resolve-failed", "upstream-refused", "upstream-connect-timeout", "parent-unreachable"] {
        zero(&format!("portcullis_upstream_errors_total{{kind=\"{code}\"}}"));
    }
    // 28 deny reasons + 1 allow per role and kind, 2 report-mode reasons per kind for `ci`.
    assert_eq!(request_series(&metrics).len(), 2 * 5 * 29 + 5 * 2, "bounded by roles and kinds");
    assert_eq!(metrics.lines().filter(|l| l.starts_with("portcullis_upstream_errors_total{")).count(), 11);

    proxy.rewrite(&format!("{yaml}  added: {{}}\n"));
    let reloaded = wait_until("the added role's series", || async {
        let m = proxy.metrics().await;
        m.contains("role=\"added\"").then_some(m)
    })
    .await;
    assert_eq!(request_series(&reloaded).len(), 3 * 5 * 29 + 5 * 2);
    assert_eq!(metric_value(&reloaded, "portcullis_requests_total{decision=\"allow\",kind=\"http\",reason=\"none\",role=\"added\"}"), 0.0);
}
