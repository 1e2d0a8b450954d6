//! The real binary: `check`, `validate` and `run`.

mod common;

use common::portcullis;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/portcullis.yaml")
}


fn temp_file(name: &str, text: &str) -> PathBuf {
    common::temp_file("cli", name, text)
}

#[test]
fn check_decides_without_a_server() {
    let config = shipped_config();
    let config = config.to_str().unwrap();
    let cases: &[(&str, i32, &str)] = &[
        ("http://[::ffff:169.254.169.254]/", 1, "reason=denied-range:metadata"),
        ("http://169.254.169.254/latest/meta-data/", 1, "reason=denied-range:metadata"),
        ("https://metadata.google.internal/", 1, "reason=denied-name:metadata"),
        ("https://evil.example.net/", 1, "reason=not-allowlisted"),
        ("https://example.com:8443/", 1, "reason=port-not-allowed"),
        ("http://0xA9FEA9FE/", 1, "invalid-target"),
        ("10.1.2.3:443", 1, "reason=denied-range:private"),
    ];
    assert_checks(config, cases);
}

/// `check` of each URL against `config` exits with its code and prints its text.
fn assert_checks(config: &str, cases: &[(&str, i32, &str)]) {
    for (url, code, want) in cases {
        let (got, stdout, stderr) = portcullis(&["check", "--config", config, url]);
        assert_eq!(got, *code, "{url}: {stdout}{stderr}");
        assert!(stdout.contains(want), "{url}: {stdout}");
    }
}

#[test]
fn check_allows_with_exit_0() {
    let path = temp_file(
        "allow.yaml",
        "allow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    allow:\n      cidrs: [127.0.0.1/32, 8.8.8.0/24]\n",
    );
    let (code, stdout, _) = portcullis(&["check", "--config", path.to_str().unwrap(), "http://127.0.0.1/"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.starts_with("allow http 127.0.0.1:80") && stdout.contains("by=cidr rule=roles.default.allow.cidrs[0] (127.0.0.1/32)"), "{stdout}");
    let (code, stdout, _) = portcullis(&["check", "--config", path.to_str().unwrap(), "https://[::ffff:8.8.8.8]/"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("addrs=8.8.8.8:443"), "{stdout}");
}

/// With `upstream_proxy.resolve: parent`, `check` decides a name the
/// parent resolves as the proxy does: on the name alone, without DNS (the
/// configured name server does not exist).
#[test]
fn check_leaves_names_to_a_parent_that_resolves_them() {
    let path = temp_file(
        "parent-resolves.yaml",
        "dns:\n  nameservers: [\"127.0.0.1:9\"]\n  timeout: 500ms\nupstream_proxy:\n  url: http://127.0.0.1:3128\n  resolve: parent\n\
         roles:\n  default:\n    allow:\n      domains: [web.example]\n      cidrs: [8.8.8.0/24]\n",
    );
    let cases: &[(&str, i32, &str)] = &[
        ("https://web.example/", 0, "addrs=resolved-by-parent"),
        ("https://cidr-only.example/", 1, "reason=not-allowlisted"),
        ("8.8.8.8:443", 0, "addrs=8.8.8.8:443"),
        ("10.1.2.3:443", 1, "reason=denied-range:private"),
    ];
    assert_checks(path.to_str().unwrap(), cases);
}

#[test]
fn validate_accepts_shipped_and_refuses_bad_config() {
    let (code, stdout, _) = portcullis(&["validate", "--config", shipped_config().to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}");
    let bad = temp_file("bad.yaml", "roles:\n  default:\n    allow:\n      domains: [ok.example]\n      cidr: [1.2.3.0/24]\n");
    let (code, _, stderr) = portcullis(&["validate", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(stderr.contains(bad.to_str().unwrap()), "names the file: {stderr}");
    assert!(stderr.contains("line 5"), "names the line: {stderr}");
    assert!(stderr.contains("unknown field `cidr`"), "names the field and reason: {stderr}");
    let (code, _, stderr) = portcullis(&["validate", "--config", "/nonexistent.yaml"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent.yaml: cannot read"), "{stderr}");
}

/// `validate` runs the compile step start-up runs: checks across fields
/// (with the line of the value) and the TLS material (files are read).
#[test]
fn validate_compiles_as_start_up_does() {
    let carve = temp_file("carve.yaml", "listen: 127.0.0.1:0
allow_ranges: [8.8.8.0/24]
roles:
  default: {}
");
    let (code, _, stderr) = portcullis(&["validate", "--config", carve.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("allow_ranges[0]: 8.8.8.0/24 is not inside any always-denied"), "{stderr}");
    assert!(stderr.contains("at line 2"), "names the line: {stderr}");
    let tls = temp_file("tls.yaml", "tls:\n  cert: /nonexistent/cert.pem\n  key: /nonexistent/key.pem\nroles:\n  default: {}\n");
    let (code, _, stderr) = portcullis(&["validate", "--config", tls.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("tls.cert: cannot load /nonexistent/cert.pem"), "{stderr}");
}

/// `portcullis run` serves on the configured address, logs one JSON line
/// per request, and denies the metadata address.
#[tokio::test]
async fn run_serves_and_logs_one_line_per_request() {
    let path = temp_file("run.yaml", "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nroles:\n  default: {}\n");
    let (mut child, mut lines, (proxy, _)) = common::run_binary(&path);
    assert_eq!(proxy.ip(), std::net::IpAddr::from([127, 0, 0, 1]), "serves on the configured address");
    let resp = common::get(proxy, "http://169.254.169.254/latest/meta-data/").await;
    assert_eq!(resp.status, 403);
    assert_eq!(resp.header("x-portcullis-deny"), Some("denied-range:metadata"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let line = lines.next().expect("an access line").unwrap();
        if line.contains("portcullis::access") || Instant::now() > deadline {
            break line;
        }
    };
    child.kill().unwrap();
    let _ = child.wait();
    for field in [
        "\"client\":\"127.0.0.1:",
        "\"method\":\"GET\"",
        "\"host\":\"169.254.169.254\"",
        "\"port\":80",
        "\"decision\":\"deny\"",
        "\"reason\":\"denied-range:metadata\"",
        "\"mode\":\"enforce\"",
        "\"role\":\"default\"",
        "\"identity\":\"default\"",
        "\"rule\":\"always-denied:metadata (169.254.169.254/32)\"",
        "\"status\":403",
        "\"dialed\":\"\"",
        "\"bytes_in\":0",
        "\"duration_ms\":",
    ] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
}

#[test]
fn check_evaluates_as_a_named_role() {
    let path = temp_file(
        "roles.yaml",
        "roles:\n  default: {}\n  ci:\n    allow:\n      domains: [\"*.pkg.example\"]\n",
    );
    let config = path.to_str().unwrap();
    let (code, stdout, _) = portcullis(&["check", "--config", config, "--role", "ci", "https://mirror.pkg.example:8443/"]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("role=ci reason=port-not-allowed"), "{stdout}");
    let (code, stdout, _) = portcullis(&["check", "--config", config, "https://mirror.pkg.example/"]);
    assert_eq!(code, 1);
    assert!(stdout.contains("role=default reason=not-allowlisted"), "{stdout}");
    let (code, _, stderr) = portcullis(&["check", "--config", config, "--role", "nobody", "https://x.example/"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("role \"nobody\" is not defined"), "{stderr}");
}

/// The red team's N10: every YAML and JSON input of the CLIs has a nesting
/// and a size bound, checked before the parser runs (100,000 nested `[`
/// took the YAML parser 22 s). Each is refused at once, with the file, the
/// line and the reason, exit code 2.
#[test]
fn deep_or_large_inputs_are_refused_before_parsing() {
    let config = temp_file("n10-config.yaml", "listen: 127.0.0.1:0\nroles:\n  default:\n    allow:\n      domains: [a.example]\n");
    let config = config.to_str().unwrap();
    let deep_flow = format!("cases: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let deep_map = format!("version: v1\nservices: {}1{}\n", "{a: ".repeat(50_000), "}".repeat(50_000));
    let deep_config = format!("listen: 127.0.0.1:0\nroles:\n  default:\n    allow:\n      domains: {}a.example{}\n", "[".repeat(10_000), "]".repeat(10_000));
    let deep_log = format!("{}\n{}1{}\n", r#"{"target":"portcullis::access","decision":"deny"}"#, "[".repeat(100_000), "]".repeat(100_000));
    let (cases, acl, bad_config, log) = (
        temp_file("n10-cases.yaml", &deep_flow),
        temp_file("n10-acl.yaml", &deep_map),
        temp_file("n10-deep-config.yaml", &deep_config),
        temp_file("n10-log.jsonl", &deep_log),
    );
    let (cases, acl, bad_config, log) = (cases.to_str().unwrap(), acl.to_str().unwrap(), bad_config.to_str().unwrap(), log.to_str().unwrap());
    let runs: [(&[&str], String); 5] = [
        (&["test", "--config", config, cases], format!("{cases}:1: nested deeper than the 32 levels allowed for a case file")),
        (&["import", "smokescreen", acl], format!("{acl}:2: nested deeper than the 32 levels allowed for an imported policy")),
        (&["validate", "--config", bad_config], format!("{bad_config}: nested deeper than the 32 levels allowed for a config file at line 5")),
        (&["test", "--config", bad_config, cases], format!("{bad_config}: nested deeper than the 32 levels allowed for a config file at line 5")),
        (&["suggest", "--config", config, "--log", log], format!("{log}:2: not a decision log line: nested deeper than the 32 levels allowed for a decision log")),
    ];
    for (args, want) in runs {
        let started = Instant::now();
        let (code, _, stderr) = portcullis(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(&want), "{args:?}: want {want:?} in {stderr}");
        assert!(started.elapsed() < Duration::from_secs(10), "{args:?} took {:?}", started.elapsed());
    }
    // Sizes: a file that never ends is cut at the bound, not read to the end.
    let runs: [(&[&str], &str); 3] = [
        (&["test", "--config", config, "/dev/zero"], "/dev/zero: larger than the 16777216 bytes allowed for a case file"),
        (&["import", "smokescreen", "/dev/zero"], "/dev/zero: larger than the 16777216 bytes allowed for an imported policy"),
        (&["validate", "--config", "/dev/zero"], "/dev/zero: larger than the 134217728 bytes allowed for a config file"),
    ];
    for (args, want) in runs {
        let (code, _, stderr) = portcullis(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: want {want:?} in {stderr}");
    }
}
