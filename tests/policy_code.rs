//! Policy as code through the real binary: `test` (exit codes, JUnit XML),
//! `check --explain`, `suggest` from a generated decision log (applied and
//! re-tested), and `import smokescreen` followed by `test`.

mod common;
#[path = "common/iana.rs"]
mod iana;

use common::portcullis;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde_yaml_ng::Value;


fn temp_file(name: &str, text: &str) -> PathBuf {
    common::temp_file("policy-code", name, text)
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

const CONFIG: &str = "\
identity:
  sources:
    - {cidr: 10.42.0.0/16, role: ci}
roles:
  default:
    allow:
      domains: [example.com]
  ci:
    allow:
      domains:
        - pkg.example
        - \"*.pkg.example\"
      cidrs: [8.8.8.0/24]
    deny:
      cidrs: [8.8.4.4/32]
";

const PASSING: &str = "\
resolve:
  mirror.pkg.example: [93.184.216.34]
  example.com: [93.184.216.34]
cases:
  - name: ci reaches its mirror
    role: ci
    url: https://mirror.pkg.example/
    expect: allow
    rule: roles.ci.allow.domains[1]
  - name: a client in the ci range is ci
    client: {source: 10.42.7.3}
    url: https://mirror.pkg.example/
    expect: allow
  - name: everyone else is default
    client: {source: 192.0.2.10}
    url: https://mirror.pkg.example/
    expect: deny
    reason: not-allowlisted
  - {url: http://example.com/, expect: allow}
  - {url: http://169.254.169.254/, role: ci, expect: deny, reason: denied-range:metadata}
";

const FAILING: &str = "\
resolve:
  mirror.pkg.example: [93.184.216.34]
cases:
  - name: wrong on purpose
    url: https://mirror.pkg.example/
    expect: allow
  - name: right
    role: ci
    url: https://mirror.pkg.example/
    expect: allow
  - name: wrong reason
    role: ci
    url: 8.8.4.4:443
    expect: deny
    reason: not-allowlisted
";

#[test]
fn test_files_pass_fail_and_write_junit() {
    let config = temp_file("config.yaml", CONFIG);
    let passing = temp_file("passing.yaml", PASSING);
    let failing = temp_file("failing.yaml", FAILING);
    let junit = std::env::temp_dir().join(format!("portcullis-junit-{}.xml", std::process::id()));

    let (code, stdout, stderr) = portcullis(&["test", "--config", path(&config), path(&passing), "--junit", path(&junit)]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("5 cases: 5 passed, 0 failed"), "{stdout}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.starts_with("<?xml"), "{xml}");
    assert!(xml.contains("<testsuites name=\"portcullis test\" tests=\"5\" failures=\"0\">"), "{xml}");
    assert!(!xml.contains("<failure"), "{xml}");

    let (code, stdout, _) =
        portcullis(&["test", "--config", path(&config), path(&passing), path(&failing), "--junit", path(&junit)]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("8 cases: 6 passed, 2 failed"), "{stdout}");
    let failing_name = path(&failing);
    let first = stdout.lines().find(|l| l.contains("wrong on purpose")).unwrap();
    assert!(first.starts_with(&format!("FAIL {failing_name}:4: wrong on purpose")), "{first}");
    assert!(first.contains("expected allow, got deny (not-allowlisted) role=default rule=default-deny"), "{first}");
    let reason = stdout.lines().find(|l| l.contains("wrong reason")).unwrap();
    assert!(
        reason.contains("expected deny (not-allowlisted), got deny (denied-by-role) role=ci rule=roles.ci.deny.cidrs[0] (8.8.4.4/32) at"),
        "{reason}"
    );
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("tests=\"8\" failures=\"2\""), "{xml}");
    assert_eq!(xml.matches("<testsuite ").count(), 2, "one suite per file: {xml}");
    assert_eq!(xml.matches("<failure ").count(), 2, "{xml}");
    assert!(xml.contains("name=\"wrong on purpose\""), "{xml}");
    assert!(xml.contains("message=\"expected allow, got deny (not-allowlisted)"), "{xml}");

    let bad = temp_file("bad.yaml", "cases:\n  - {url: https://a.example/, expect: allow}\n  - {url: https://a.example/, expect: perhaps}\n");
    let (code, _, stderr) = portcullis(&["test", "--config", path(&config), path(&bad)]);
    assert_eq!(code, 2);
    assert!(stderr.contains(&format!("{}:3: ", path(&bad))) && stderr.contains("unknown variant `perhaps`"), "{stderr}");
    let undefined = temp_file("undefined.yaml", "cases:\n  - url: https://a.example/\n    expect: allow\n  - url: \"http://[::1\"\n    expect: deny\n");
    let (code, _, stderr) = portcullis(&["test", "--config", path(&config), path(&undefined)]);
    assert_eq!(code, 2);
    assert!(stderr.contains(&format!("{}:4: cases[1]: url", path(&undefined))), "{stderr}");
    let empty = temp_file("empty.yaml", "cases: []\n");
    let (code, stdout, stderr) = portcullis(&["test", "--config", path(&config), path(&empty)]);
    assert_eq!(code, 2, "a case file with no cases tests nothing: {stdout}");
    assert!(stderr.contains(&format!("{}:1: no cases", path(&empty))), "{stderr}");
    let (code, _, stderr) = portcullis(&["test", "--config", "/nonexistent/p.yaml", path(&passing)]);
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/p.yaml: cannot read"), "{stderr}");
}

/// The shipped config's own tests pass (as .ci/run runs them).
#[test]
fn shipped_policy_tests_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, stdout, stderr) = portcullis(&[
        "test",
        "--config",
        path(&root.join("config/portcullis.yaml")),
        path(&root.join("config/portcullis.test.yaml")),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    let cases = cases_in(&root.join("config/portcullis.test.yaml"));
    assert!(stdout.ends_with(&format!("{cases} cases: {cases} passed, 0 failed\n")), "every case ran: {stdout}");
}

/// How many cases a case file holds (one `url` key per case), counted from
/// the text, so a run that parsed fewer cannot pass for complete.
fn cases_in(file: &Path) -> usize {
    let text = std::fs::read_to_string(file).unwrap();
    let cases: usize = text.lines().map(|l| l.matches(" url: ").count() + l.matches("{url: ").count()).sum();
    assert!(cases > 0, "{}: no cases found", file.display());
    cases
}

#[test]
fn check_explain_lists_every_rule_consulted() {
    let config = temp_file("explain.yaml", CONFIG);
    let config = path(&config);
    let steps = |stdout: &str| -> Vec<String> {
        stdout.lines().filter(|l| l.trim_start().chars().next().is_some_and(|c| c.is_ascii_digit())).map(|l| l.trim().to_string()).collect()
    };

    let (code, stdout, _) = portcullis(&["check", "--explain", "--config", config, "--role", "ci", "8.8.8.8:443"]);
    assert_eq!(code, 0, "{stdout}");
    let got = steps(&stdout);
    let want = [
        "1. always-denied ranges: 8.8.8.8: outside every range",
        "2. own listeners: 8.8.8.8: no match",
        "3. role deny.cidrs: 8.8.8.8: no match",
        "4. roles.ci.mode: enforce",
        "5. port 443: allowed by roles.ci.allow.connect_ports ([443])",
        "6. allow.cidrs: 8.8.8.8: allowed by roles.ci.allow.cidrs[0] (8.8.8.0/24) at",
    ];
    assert_eq!(got.len(), want.len(), "{stdout}");
    for (got, want) in got.iter().zip(want) {
        assert!(got.starts_with(want), "want {want:?}, got {got:?}");
    }
    let line = format!("{config}:13");
    assert!(stdout.contains(&format!("rule=roles.ci.allow.cidrs[0] (8.8.8.0/24) at {line}")), "{stdout}");

    let (code, stdout, _) = portcullis(&["check", "--explain", "--config", config, "--role", "ci", "8.8.4.4:443"]);
    assert_eq!(code, 1, "{stdout}");
    let got = steps(&stdout);
    assert_eq!(got.len(), 3, "{stdout}");
    assert!(got[2].starts_with("3. role deny.cidrs: 8.8.4.4: denied by roles.ci.deny.cidrs[0] (8.8.4.4/32) at"), "{stdout}");
    assert!(stdout.contains("reason=denied-by-role rule=roles.ci.deny.cidrs[0] (8.8.4.4/32)"), "{stdout}");

    let (code, stdout, _) = portcullis(&["check", "--explain", "--config", config, "http://[::ffff:169.254.169.254]/"]);
    assert_eq!(code, 1, "{stdout}");
    let got = steps(&stdout);
    assert_eq!(got.len(), 1, "the first denied range ends the walk: {stdout}");
    assert!(
        got[0].starts_with("1. always-denied ranges: ::ffff:169.254.169.254 (judged as 169.254.169.254): denied by always-denied:metadata (169.254.169.254/32)"),
        "{stdout}"
    );
    assert!(stdout.contains("reason=denied-range:metadata rule=always-denied:metadata (169.254.169.254/32)"), "{stdout}");
}

/// Decision lines as `portcullis run` writes them (the fields suggest reads).
fn log_line(decision: &str, reason: &str, kind: &str, host: &str, port: u16, role: &str) -> String {
    format!(
        "{{\"timestamp\":\"2026-11-30T12:00:00.000000Z\",\"level\":\"INFO\",\"target\":\"portcullis::access\",\"client\":\"10.42.0.9:5555\",\"method\":\"CONNECT\",\"kind\":\"{kind}\",\"host\":\"{host}\",\"port\":{port},\"dialed\":\"\",\"decision\":\"{decision}\",\"reason\":\"{reason}\",\"role\":\"{role}\",\"identity\":\"source\",\"mode\":\"report\",\"rule\":\"default-deny\",\"status\":200,\"bytes_in\":0,\"bytes_out\":0,\"duration_ms\":1.0}}"
    )
}

/// Adds the suggested rules under `roles` of `config` (lists appended,
/// port lists replaced) and switches every role to enforce.
fn apply(config: &str, suggestion: &str) -> String {
    let mut config: Value = serde_yaml_ng::from_str(config).unwrap();
    let suggestion: Value = serde_yaml_ng::from_str(suggestion).unwrap();
    let roles = config["roles"].as_mapping_mut().unwrap();
    for (name, add) in suggestion["roles"].as_mapping().unwrap() {
        let role = roles.get_mut(name).unwrap().as_mapping_mut().unwrap();
        let allow = role.entry("allow".into()).or_insert(Value::Mapping(Default::default())).as_mapping_mut().unwrap();
        for (field, value) in add["allow"].as_mapping().unwrap() {
            match (allow.get_mut(field), value) {
                (Some(Value::Sequence(have)), Value::Sequence(more)) if !field.as_str().unwrap().ends_with("ports") => {
                    have.extend(more.iter().cloned())
                }
                _ => {
                    allow.insert(field.clone(), value.clone());
                }
            }
        }
    }
    for (_, role) in roles.iter_mut() {
        role.as_mapping_mut().unwrap().insert("mode".into(), "enforce".into());
    }
    serde_yaml_ng::to_string(&config).unwrap()
}

/// A generated report-mode log: the suggestion, applied (and the role
/// switched to enforce), allows every would_deny request, wildcards stay
/// at or below the registrable domain, and nothing suggested lies in an
/// always-denied range.
#[test]
fn suggest_applied_turns_every_would_deny_into_allow() {
    let config_text = "roles:\n  default: {}\n  ci:\n    mode: report\n    allow:\n      domains: [github.com]\n";
    let config = temp_file("suggest.yaml", config_text);
    let mut log = Vec::new();
    let mut resolve = Vec::new();
    let mut wanted: Vec<(String, u16)> = Vec::new();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let parents = ["cdn.example.com", "api.stripe.com", "files.example.org", "bucket.s3.amazonaws.com", "github.io"];
    for i in 0..60 {
        let parent = parents[next(parents.len() as u64) as usize];
        let host = format!("n{}.{parent}", next(6));
        let port = if i % 10 == 0 { 8443 } else { 443 };
        let reason = if port == 8443 { "port-not-allowed" } else { "not-allowlisted" };
        log.push(log_line("would_deny", reason, "connect", &host, port, "ci"));
        resolve.push(format!("  {host}: [93.184.216.{}]", 1 + i % 200));
        wanted.push((host, port));
    }
    for literal in ["1.1.1.1", "8.8.8.8", "[2606:4700:4700::1111]"] {
        log.push(log_line("would_deny", "not-allowlisted", "connect", literal, 443, "ci"));
        wanted.push((literal.to_string(), 443));
    }
    log.push(log_line("would_deny", "port-not-allowed", "connect", "github.com", 8443, "ci"));
    wanted.push(("github.com".to_string(), 8443));
    resolve.push("  github.com: [140.82.112.3]".to_string());
    for (host, reason) in [("169.254.169.254", "denied-range:metadata"), ("metadata.google.internal", "denied-name:metadata"), ("10.0.0.7", "denied-range:private")] {
        log.push(log_line("deny", reason, "http", host, 80, "ci"));
    }
    // A literal the report-mode proxy let through but that a carve-out-less
    // policy denies: a log from another config must not make suggest widen it.
    log.push(log_line("would_deny", "not-allowlisted", "connect", "192.168.1.20", 443, "ci"));
    log.push(log_line("allow", "", "connect", "github.com", 443, "ci"));
    let log_path = temp_file("decisions.jsonl", &(log.join("\n") + "\n"));

    let (code, suggestion, stderr) = portcullis(&["suggest", "--config", path(&config), "--log", path(&log_path), "--role", "ci"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(suggestion.contains("# Blocked regardless"), "{suggestion}");
    for blocked in ["169.254.169.254:80 denied-range:metadata", "metadata.google.internal:80 denied-name:metadata", "192.168.1.20:443 denied-range:private"] {
        assert!(suggestion.contains(blocked), "{blocked} listed as blocked: {suggestion}");
    }
    let parsed: Value = serde_yaml_ng::from_str(&suggestion).unwrap();
    let allow = &parsed["roles"]["ci"]["allow"];
    let domains: Vec<&str> = allow["domains"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    for d in &domains {
        assert!(!["*.com", "*.example.com", "*.org", "*.amazonaws.com", "*.s3.amazonaws.com", "*.github.io"].contains(d), "too wide: {d}");
    }
    assert!(domains.contains(&"*.cdn.example.com"), "{domains:?}");
    assert!(domains.iter().any(|d| d.ends_with(".github.io") && !d.starts_with("*.")), "github.io names stay exact: {domains:?}");
    let cidrs: Vec<IpNet> = allow["cidrs"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap().parse().unwrap()).collect();
    assert_eq!(cidrs.len(), 3, "{cidrs:?}");
    for net in &cidrs {
        for (denied, _) in portcullis::policy::ranges::denied_ranges() {
            assert!(!denied.contains(net) && !net.contains(&denied), "{net} overlaps always-denied {denied}");
        }
        // And against the hand-typed registries, which do not come from the
        // table the product compiles.
        for row in iana::rows().filter(|r| matches!(r.expected(), iana::Expect::Deny(_))) {
            let denied = row.net();
            assert!(!denied.contains(net) && !net.contains(&denied), "{net} overlaps {} ({})", row.prefix, row.name);
        }
    }
    assert_eq!(allow["connect_ports"], serde_yaml_ng::from_str::<Value>("[443, 8443]").unwrap());

    let applied = temp_file("applied.yaml", &apply(config_text, &suggestion));
    let mut cases = format!("resolve:\n{}\ncases:\n", resolve.join("\n"));
    let unique: BTreeSet<(String, u16)> = wanted.into_iter().collect();
    for (host, port) in &unique {
        cases.push_str(&format!("  - {{role: ci, url: \"{host}:{port}\", expect: allow}}\n"));
    }
    for url in ["http://169.254.169.254/", "http://metadata.google.internal/", "http://10.0.0.7/", "192.168.1.20:443"] {
        cases.push_str(&format!("  - {{role: ci, url: \"{url}\", expect: deny}}\n"));
    }
    let cases_path = temp_file("suggested.cases.yaml", &cases);
    let (code, stdout, stderr) = portcullis(&["test", "--config", path(&applied), path(&cases_path)]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains(&format!("{} cases: {} passed, 0 failed", unique.len() + 4, unique.len() + 4)), "{stdout}");
    assert!(!stdout.contains("report mode"), "every case decided in enforce mode: {stdout}");
}

#[test]
fn suggest_refuses_bad_input() {
    let config = temp_file("suggest-bad.yaml", "roles:\n  default: {}\n");
    let log = temp_file("bad.jsonl", "{\"target\":\"portcullis::access\"}\nnot json\n");
    let (code, _, stderr) = portcullis(&["suggest", "--config", path(&config), "--log", path(&log)]);
    assert_eq!(code, 2);
    assert!(stderr.contains(&format!("{}:2: not a decision log line", path(&log))), "{stderr}");
    let (code, _, stderr) = portcullis(&["suggest", "--config", path(&config), "--log", path(&log), "--role", "nobody"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("role \"nobody\" is not defined"), "{stderr}");
}

/// Smokescreen ACLs (fixtures modelled on its documented examples) are
/// imported; cases written from Smokescreen's own decision order hold for
/// the imported config, and what does not translate is listed.
#[test]
fn imported_smokescreen_acls_decide_as_smokescreen_does() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smokescreen");
    for (acl, cases, untranslated) in [
        ("with_global_lists.yaml", "with_global_lists.cases.yaml", &["ports:"][..]),
        ("no_default.yaml", "no_default.cases.yaml", &["service.*.amazonaws.com", "mitm_domains", "ports:"][..]),
    ] {
        let (code, imported, stderr) = portcullis(&["import", "smokescreen", path(&fixtures.join(acl))]);
        assert_eq!(code, 0, "{acl}: {stderr}");
        let notes: Vec<&str> = imported.lines().skip_while(|l| !l.starts_with("# Does not translate")).collect();
        for want in untranslated {
            assert!(notes.iter().any(|n| n.contains(want)), "{acl}: {want} listed in {notes:?}");
        }
        let config = temp_file(&format!("imported-{acl}"), &imported);
        let (code, stdout, stderr) = portcullis(&["validate", "--config", path(&config)]);
        assert_eq!(code, 0, "{acl}: {stdout}{stderr}\n{imported}");
        let (code, stdout, stderr) = portcullis(&["test", "--config", path(&config), path(&fixtures.join(cases))]);
        assert_eq!(code, 0, "{acl}: {stdout}{stderr}\n{imported}");
        assert!(!stdout.contains("FAIL"), "{stdout}");
        let n = cases_in(&fixtures.join(cases));
        assert!(stdout.ends_with(&format!("{n} cases: {n} passed, 0 failed\n")), "every case ran: {stdout}");
    }
    let broken = temp_file("broken-acl.yaml", "version: v1\nservices:\n  - name: a\n    action: allow-everything\n");
    let (code, _, stderr) = portcullis(&["import", "smokescreen", path(&broken)]);
    assert_eq!(code, 2);
    assert!(stderr.contains(&format!("{}:4: ", path(&broken))) && stderr.contains("unknown variant"), "{stderr}");
}

/// The deciding rule is for operators: a denied client sees the reason
/// code, never the rule, its line or the config's file name.
#[tokio::test]
async fn responses_never_carry_the_rule() {
    let proxy = common::start_proxy(
        "roles:\n  default:\n    allow:\n      domains: [allowed.test]\n      cidrs: [8.8.8.0/24]\n    deny:\n      cidrs: [8.8.8.8/32]\n",
    )
    .await;
    for (url, reason) in [
        ("http://169.254.169.254/latest/meta-data/", "denied-range:metadata"),
        ("http://8.8.8.8/", "denied-by-role"),
        ("http://8.8.4.4:8080/", "port-not-allowed"),
    ] {
        let resp = common::get(proxy, url).await;
        assert_eq!(resp.status, 403, "{url}");
        assert_eq!(resp.header("x-portcullis-deny"), Some(reason), "{url}");
        let body = String::from_utf8_lossy(&resp.body);
        let head: String = resp.headers.iter().map(|(n, v)| format!("{n}: {v}\n")).collect();
        for leak in ["roles.", "always-denied", "test.yaml", "deny.cidrs", "allow_ranges", "rule"] {
            assert!(!body.contains(leak) && !head.contains(leak), "{url}: {leak:?} in\n{head}\n{body}");
        }
    }
}

/// The red team's N11: `suggest` never proposes a public suffix itself
/// (from the PSL's ICANN or private section, or a multi-tenant host the
/// PSL does not list, such as `storage.googleapis.com`), nor a wildcard
/// over another tenant's names; those requests are listed apart. A name
/// under no known suffix (an internal one) is still proposed.
#[test]
fn suggest_never_proposes_a_public_suffix_or_a_wildcard_over_tenants() {
    let config = temp_file("suggest-psl.yaml", "roles:\n  default: {}\n  ci:\n    mode: report\n");
    let suffixes = ["com", "co.uk", "github.io", "storage.googleapis.com", "s3.amazonaws.com"];
    let tenants = ["a.storage.googleapis.com", "b.storage.googleapis.com", "x.s3.amazonaws.com", "y.s3.amazonaws.com"];
    let log: Vec<String> = suffixes
        .iter()
        .chain(&tenants)
        .chain(&["a.example.com", "b.example.com", "intranet"])
        .map(|host| log_line("would_deny", "not-allowlisted", "connect", host, 443, "ci"))
        .collect();
    let log_path = temp_file("suggest-psl.jsonl", &(log.join("\n") + "\n"));
    let (code, suggestion, stderr) = portcullis(&["suggest", "--config", path(&config), "--log", path(&log_path), "--role", "ci"]);
    assert_eq!(code, 0, "{stderr}");
    let parsed: Value = serde_yaml_ng::from_str(&suggestion).unwrap();
    let domains: BTreeSet<&str> =
        parsed["roles"]["ci"]["allow"]["domains"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let want: BTreeSet<&str> = tenants.iter().copied().chain(["*.example.com", "intranet"]).collect();
    assert_eq!(domains, want, "{suggestion}");
    let apart: Vec<&str> = suggestion.lines().skip_while(|l| !l.starts_with("# Not suggested: public suffixes")).collect();
    for suffix in suffixes {
        assert!(apart.iter().any(|l| l.contains(&format!("role ci: {suffix}:443"))), "{suffix} listed apart: {suggestion}");
    }
}
