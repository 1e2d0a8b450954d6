//! `portcullis scan` through the real binary: workflow files that name the
//! metadata service in several spellings are reported line by line, clean
//! files pass, and bad input is exit code 2.

mod common;

use common::portcullis;

use std::path::{Path, PathBuf};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn scan(args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["scan"];
    all.extend_from_slice(args);
    portcullis(&all)
}

fn path(rel: &str) -> String {
    repo(rel).to_str().expect("the repository path is UTF-8").to_string()
}

#[test]
fn every_metadata_spelling_is_reported_with_file_and_line() {
    let config = path("config/portcullis.yaml");
    let flows = path("tests/fixtures/scan/flows");
    let (code, stdout, stderr) = scan(&["--config", &config, &flows]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    let argo = "argo-metadata.yaml";
    let kestra = "kestra-metadata.yml";
    // (file, line, what the line must say)
    let want: &[(&str, usize, &str)] = &[
        (argo, 14, "deny http 169.254.169.254:80 role=default reason=denied-range:metadata"),
        (argo, 17, "0xA9FEA9FE:80 role=default reason=invalid-target (non-canonical IPv4 literal); lenient resolvers (inet_aton, URL parsers) read 169.254.169.254, which the policy denies: denied-range:metadata"),
        (argo, 29, "2852039166:80 role=default reason=invalid-target (non-canonical IPv4 literal); lenient resolvers (inet_aton, URL parsers) read 169.254.169.254"),
        (argo, 30, "0251.0376.0251.0376:80 role=default reason=invalid-target (non-canonical IPv4 literal); lenient resolvers (inet_aton, URL parsers) read 169.254.169.254"),
        (argo, 31, "deny http [::ffff:169.254.169.254]:80 role=default reason=denied-range:metadata"),
        (argo, 34, "deny http 169.254.169.254:80 role=default reason=denied-range:metadata"),
        (kestra, 6, "deny http metadata.google.internal:80 role=default reason=denied-name:metadata"),
        (kestra, 9, "deny http 169.254.170.2:80 role=default reason=denied-range:metadata"),
        (kestra, 14, "169.254.43518:443 role=default reason=invalid-target (non-canonical IPv4 literal); lenient resolvers (inet_aton, URL parsers) read 169.254.169.254"),
        (kestra, 15, "deny connect [fd00:ec2::254]:443 role=default reason=denied-range:metadata"),
        (kestra, 16, "%31%36%39.254.169.254:80 role=default reason=invalid-target (percent-encoded host); lenient resolvers (inet_aton, URL parsers) read 169.254.169.254"),
        ("notes.txt", 2, "deny connect 10.0.3.4:5432 role=default reason=denied-range:private"),
    ];
    let lines: Vec<&str> = stdout.lines().filter(|l| l.contains(": deny ")).collect();
    for (file, line, text) in want {
        let prefix = format!("{flows}/{file}:{line}: ");
        assert!(
            lines.iter().any(|l| l.starts_with(&prefix) && l.contains(text)),
            "missing {file}:{line}: {text}\n{stdout}"
        );
    }
    assert_eq!(lines.len(), want.len(), "exactly these, nothing allowed is reported:\n{stdout}");
    assert!(stdout.ends_with("3 files, 16 destinations, 12 would be denied\n"), "{stdout}");
}

#[test]
fn a_clean_flow_exits_0_and_a_role_decides() {
    let dir = std::env::temp_dir().join(format!("portcullis-scan-{}/clean", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("flow.yml"), "id: fine\nnamespace: t\ntasks:\n  - id: a\n    uri: https://github.com/x\n").unwrap();
    let dir = dir.to_str().unwrap().to_string();
    let (code, stdout, stderr) = scan(&["--config", &path("config/portcullis.yaml"), &dir]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(stdout, "1 files, 1 destinations, 0 would be denied\n");

    let config = common::temp_file(
        "scan",
        "roles.yaml",
        "roles:\n  default:\n    allow:\n      domains: [example.com]\n  ci:\n    allow:\n      domains: [github.com]\n",
    );
    let config = config.to_str().unwrap();
    let (code, stdout, _) = scan(&["--config", config, "--role", "ci", &dir]);
    assert_eq!(code, 0, "{stdout}");
    let (code, stdout, _) = scan(&["--config", config, &dir]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("flow.yml:5: deny connect github.com:443 role=default reason=not-allowlisted"), "{stdout}");
}

#[test]
fn bad_input_exits_2() {
    let config = path("config/portcullis.yaml");
    let (code, _, stderr) = scan(&["--config", &config, &path("tests/fixtures/scan/broken.yaml")]);
    assert_eq!(code, 2);
    assert!(stderr.contains("broken.yaml:5: not valid YAML"), "{stderr}");
    let (code, _, stderr) = scan(&["--config", &config, "--role", "nobody", &path("tests/fixtures/scan/flows")]);
    assert_eq!(code, 2);
    assert!(stderr.contains("role \"nobody\" is not defined"), "{stderr}");
    let (code, _, stderr) = scan(&["--config", &config, &path("tests/fixtures/scan/no-such-dir")]);
    assert_eq!(code, 2);
    assert!(stderr.contains("no-such-dir: cannot read"), "{stderr}");
    let (code, _, _) = scan(&["--config", &path("tests/fixtures/scan/broken.yaml"), &path("tests/fixtures/scan/flows")]);
    assert_eq!(code, 2, "a config that does not load is bad input");
}

/// The scan command a CI snippet runs, its `$VARS` expanded from the
/// snippet's own variables, as arguments after `scan`.
fn snippet_command(command: &str, vars: &serde_yaml_ng::Mapping) -> Vec<String> {
    let from = command.find("scan --config").expect("the snippet runs portcullis scan");
    command[from + "scan".len()..]
        .split_whitespace()
        .map(|word| {
            let word = word.trim_matches('"');
            match word.strip_prefix('$') {
                Some(name) => vars[name].as_str().unwrap_or_else(|| panic!("{name} is set by the snippet")).to_string(),
                None => word.to_string(),
            }
        })
        .collect()
}

#[test]
fn ci_snippets_fail_a_flows_directory_naming_metadata() {
    let github: serde_yaml_ng::Value = serde_yaml_ng::from_str(&std::fs::read_to_string(repo("deploy/ci/github-actions-scan.yml")).unwrap()).unwrap();
    let job = &github["jobs"]["scan"];
    let run = job["steps"].as_sequence().unwrap().iter().find_map(|s| s["run"].as_str()).unwrap();
    let gh = snippet_command(run, job["env"].as_mapping().unwrap());
    let gitlab: serde_yaml_ng::Value = serde_yaml_ng::from_str(&std::fs::read_to_string(repo("deploy/ci/gitlab-ci-scan.yml")).unwrap()).unwrap();
    let job = &gitlab["portcullis-scan"];
    let script = job["script"].as_sequence().unwrap().iter().filter_map(|s| s.as_str()).find(|s| s.starts_with("portcullis scan")).unwrap();
    let gl = snippet_command(script, job["variables"].as_mapping().unwrap());
    for (name, args) in [("github", gh), ("gitlab", gl)] {
        // A checkout laid out as the snippet expects: the policy and a flows directory.
        let root = std::env::temp_dir().join(format!("portcullis-scan-{}/{name}", std::process::id()));
        let policy = root.join(&args[1]);
        let flows = root.join(args.last().unwrap());
        std::fs::create_dir_all(policy.parent().unwrap()).unwrap();
        std::fs::create_dir_all(&flows).unwrap();
        std::fs::copy(repo("config/portcullis.yaml"), &policy).unwrap();
        std::fs::copy(repo("tests/fixtures/scan/flows/kestra-metadata.yml"), flows.join("flow.yml")).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis")).arg("scan").args(&args).current_dir(&root).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{name}: {args:?}: {stdout}");
        assert!(stdout.contains("/flow.yml:6: deny http metadata.google.internal:80 role=default"), "{name}: {stdout}");
        std::fs::remove_file(flows.join("flow.yml")).unwrap();
        std::fs::write(flows.join("ok.yml"), "id: ok\nnamespace: t\ntasks: [{id: a, type: io.kestra.plugin.core.http.Request, uri: \"https://pypi.org/simple/\"}]\n").unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis")).arg("scan").args(&args).current_dir(&root).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{name}: {}", String::from_utf8_lossy(&out.stdout));
    }
}

/// A name the config pins (`dns.static`) is decided on its pinned
/// addresses, as the proxy decides it: one pinned into a private range is
/// reported; other names are decided without DNS.
#[test]
fn pinned_names_are_decided_on_their_addresses() {
    let config = common::temp_file(
        "scan",
        "pinned.yaml",
        "dns:\n  static:\n    db.example.com: [10.0.0.5]\n    api.example.com: [93.184.216.34]\nroles:\n  default:\n    allow:\n      domains: [\"*.example.com\"]\n",
    );
    let flow = common::temp_file("scan", "pinned-flow.yml", "tasks:\n  - uri: https://db.example.com/\n  - uri: https://api.example.com/\n  - uri: https://other.example.com/\n");
    let (code, stdout, stderr) = scan(&["--config", config.to_str().unwrap(), flow.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.contains("pinned-flow.yml:2: deny connect db.example.com:443 role=default reason=denied-range:private"), "{stdout}");
    assert!(stdout.ends_with("1 files, 3 destinations, 1 would be denied\n"), "{stdout}");
}
