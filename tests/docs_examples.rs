//! The documentation cannot drift from the binary: every `console` block of
//! README.md and docs/*.md is run and its output compared, the README's
//! reason-code table is checked against the codes in the source, and the
//! decision-log sample against a line the real binary writes.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every docs/*.md, in a stable order.
fn documents() -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    docs.insert(0, repo().join("README.md"));
    docs
}

/// One runnable example: the command after `$ ` and the output shown under it.
struct Example {
    at: String,
    command: String,
    output: String,
}

/// The `$ ` commands of every fenced `console` block of `text`.
fn console_examples(file: &str, text: &str) -> Vec<Example> {
    let mut examples: Vec<Example> = Vec::new();
    let mut in_console = false;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_console = !in_console && line.trim() == "```console";
            continue;
        }
        if !in_console {
            continue;
        }
        match (line.strip_prefix("$ "), examples.last_mut()) {
            (Some(command), _) => {
                examples.push(Example { at: format!("{file}:{}", i + 1), command: command.to_string(), output: String::new() })
            }
            (None, Some(example)) => {
                example.output.push_str(line);
                example.output.push('\n');
            }
            (None, None) => panic!("{file}:{}: a console block must start with a `$ ` command", i + 1),
        }
    }
    examples
}

/// Every `console` example runs from the repository root, with the binary
/// under test first on `PATH`, and prints exactly what the document shows.
#[test]
fn console_examples_print_what_the_docs_show() {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_portcullis")).parent().unwrap().to_path_buf();
    let path = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())))
        .unwrap();
    let mut ran = 0;
    let mut failures = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        let name = doc.strip_prefix(repo()).unwrap().display().to_string();
        for example in console_examples(&name, &text) {
            let out = Command::new("bash")
                .args(["-c", &format!("{} 2>&1", example.command)])
                .current_dir(repo())
                .env("PATH", &path)
                .env_remove("RUST_LOG")
                .output()
                .unwrap_or_else(|e| panic!("{}: cannot run bash: {e}", example.at));
            let got = String::from_utf8_lossy(&out.stdout);
            if got != example.output {
                failures.push(format!("{}: $ {}\n--- shown\n{}--- printed\n{got}", example.at, example.command, example.output));
            }
            ran += 1;
        }
    }
    assert!(failures.is_empty(), "{} of {ran} examples drifted:\n\n{}", failures.len(), failures.join("\n"));
    // The README, POLICY.md and MONITORING.md examples: a marker lost in an
    // edit must not turn this test into one that checks nothing.
    assert!(ran >= 8, "only {ran} console examples found");
}

/// The reason codes the source can emit: the string literals of the
/// `as_str`/`code` tables of the reason enums, wherever they live.
fn codes_in_source() -> BTreeSet<String> {
    const REASON_TYPES: &[&str] = &["DenyReason", "Refusal", "UpstreamError", "ProxyError"];
    let mut codes = BTreeSet::new();
    let mut stack = vec![repo().join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                collect_codes(&std::fs::read_to_string(&path).unwrap(), REASON_TYPES, &mut codes);
            }
        }
    }
    codes
}

fn collect_codes(text: &str, types: &[&str], codes: &mut BTreeSet<String>) {
    let (mut current_type, mut current_fn) = (String::new(), String::new());
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("impl") && line.starts_with("impl") {
            let head = trimmed.split('{').next().unwrap_or("");
            let target = head.rsplit(" for ").next().unwrap_or(head);
            current_type = target.split_whitespace().last().unwrap_or("").split('<').next().unwrap_or("").to_string();
            current_fn.clear();
        } else if let Some(rest) = trimmed.split(" fn ").nth(1).or_else(|| trimmed.strip_prefix("fn ")) {
            current_fn = rest.split('(').next().unwrap_or("").to_string();
        }
        if !types.contains(&current_type.as_str()) || !(current_fn == "as_str" || current_fn == "code") {
            continue;
        }
        let Some((_, literal)) = line.split_once("=> \"") else { continue };
        let code = literal.split('"').next().unwrap_or("");
        if !code.is_empty() && code.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b':') {
            codes.insert(code.to_string());
        }
    }
}

/// The codes the README's reason table names (first column).
fn codes_in_readme_table() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = readme.split("\n## Reason codes\n").nth(1).expect("README has a Reason codes section");
    let section = section.split("\n## ").next().unwrap();
    let mut codes = BTreeSet::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let first = row.split('|').nth(1).unwrap_or("");
        codes.extend(first.split('`').skip(1).step_by(2).map(str::to_string));
    }
    codes
}

#[test]
fn readme_reason_table_lists_every_code_the_binary_can_emit() {
    let emitted = codes_in_source();
    // Enough that a scanner broken by a refactor cannot pass with nothing.
    assert!(emitted.len() >= 50, "only {} codes found in src/: {emitted:?}", emitted.len());
    for code in ["not-allowlisted", "denied-range:metadata", "conflicting-framing", "resolve-failed", "over-limit", "loop-detected"] {
        assert!(emitted.contains(code), "the scan missed {code}: {emitted:?}");
    }
    let listed = codes_in_readme_table();
    let missing: Vec<_> = emitted.difference(&listed).collect();
    let stale: Vec<_> = listed.difference(&emitted).collect();
    assert!(missing.is_empty(), "README's reason table lacks {missing:?}");
    assert!(stale.is_empty(), "README's reason table lists codes the binary never emits: {stale:?}");
}

/// The sample decision line in docs/CONFIGURATION.md is what the real
/// binary writes for that request, field for field (but the time, the
/// client's port and the duration), and the sample log the runbooks use has
/// the same fields on every decision line.
#[tokio::test]
async fn decision_log_sample_is_a_real_line() {
    let doc = std::fs::read_to_string(repo().join("docs/CONFIGURATION.md")).unwrap();
    let section = doc.split("\n## The decision log\n").nth(1).expect("CONFIGURATION.md has the decision log section");
    let sample = section.split("```json\n").nth(1).and_then(|s| s.split("\n```").next()).expect("a json sample");
    let sample: serde_json::Value = serde_json::from_str(sample).expect("the sample is JSON");

    let path = common::temp_file("docs-examples", "log.yaml", "");
    let proxy = common::BinaryProxy::spawn(&path, "roles:\n  default: {}\n").await;
    let resp = common::get(proxy.addr, &format!("http://{}/latest/meta-data/", sample["host"].as_str().unwrap())).await;
    assert_eq!(resp.status, 403);
    let lines = proxy.lines_with(&["\"target\":\"portcullis::access\""], 1).await;
    let real: serde_json::Value = serde_json::from_str(lines.first().expect("a decision line")).unwrap();
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<BTreeSet<_>>();
    assert_eq!(keys(&sample), keys(&real), "the sample's fields");
    for (key, value) in real.as_object().unwrap() {
        match key.as_str() {
            "timestamp" | "duration_ms" => {}
            "client" => assert!(value.as_str().unwrap().starts_with("127.0.0.1:"), "{value}"),
            _ => assert_eq!(&sample[key], value, "field {key}"),
        }
    }
    let log = std::fs::read_to_string(repo().join("docs/examples/decisions.jsonl")).unwrap();
    let mut decisions = 0;
    for line in log.lines() {
        let value: serde_json::Value = serde_json::from_str(line).expect("JSON lines");
        if value["target"] == "portcullis::access" {
            assert_eq!(keys(&value), keys(&real), "docs/examples/decisions.jsonl: {line}");
            decisions += 1;
        }
    }
    assert!(decisions >= 4 && decisions < log.lines().count(), "decision lines and the process's own lines");
}
