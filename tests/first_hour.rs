//! What a new user meets first, through the real binary: `--version`,
//! `test` refusing cases it cannot decide, and `validate` warning about
//! allow rules that can never match.

mod common;

use common::portcullis;

use std::path::PathBuf;

fn temp_file(name: &str, text: &str) -> PathBuf {
    common::temp_file("first-hour", name, text)
}

#[test]
fn version_names_the_release_and_the_git_revision() {
    let (code, stdout, _) = portcullis(&["--version"]);
    assert_eq!(code, 0);
    let expected_prefix = format!("portcullis {} (", env!("CARGO_PKG_VERSION"));
    assert!(stdout.starts_with(&expected_prefix) && stdout.trim_end().ends_with(')'), "{stdout}");
    let revision = &stdout.trim_end()[expected_prefix.len()..stdout.trim_end().len() - 1];
    // Built from a checkout: the short commit hash (maybe `-dirty`); a
    // build without .git says `unknown`, never an empty pair of brackets.
    let hash = revision.trim_end_matches("-dirty");
    assert!(hash == "unknown" || (hash.len() == 12 && hash.bytes().all(|b| b.is_ascii_hexdigit())), "{revision:?}");
}

/// The default role also allows by address, so an unlisted name must be
/// resolved to be decided.
const CONFIG: &str = "roles:\n  default:\n    allow:\n      domains: [\"*.pkg.example\"]\n      cidrs: [93.184.216.0/24]\n  ci:\n    allow:\n      domains: [mirror.pkg.example]\n";

/// A misspelt role or a name missing from `resolve:` used to make an
/// `expect: deny` case pass; now the file is refused as bad input (exit 2)
/// naming the case's line, and nothing is reported as passed.
#[test]
fn test_refuses_cases_it_cannot_decide() {
    let config = temp_file("policy.yaml", CONFIG);
    let config = config.to_str().unwrap();
    let refused: &[(&str, &str, &str)] = &[
        (
            "misspelt-role.yaml",
            "resolve:\n  evil.example.net: [203.0.113.9]\ncases:\n  - role: cii\n    url: https://evil.example.net/\n    expect: deny\n",
            "misspelt-role.yaml:4: case \"https://evil.example.net/\": role \"cii\" is not defined in the config (its roles: ci, default)",
        ),
        (
            "missing-resolve.yaml",
            "resolve:\n  mirror.pkg.example: [93.184.216.34]\ncases:\n  - url: https://mirror.pkg.example/\n    expect: allow\n  - name: typo in the resolve map\n    url: https://evil.example.net/\n    expect: deny\n",
            "missing-resolve.yaml:6: case \"typo in the resolve map\": evil.example.net must be resolved to be decided, and the file's resolve: map has no entry for it",
        ),
    ];
    for (name, cases, want) in refused {
        let path = temp_file(name, cases);
        let (code, stdout, stderr) = portcullis(&["test", "--config", config, path.to_str().unwrap()]);
        assert_eq!(code, 2, "{name}: {stdout}{stderr}");
        assert!(stderr.contains(want), "{name}: {stderr}");
        assert!(!stdout.contains("PASS"), "{name}: {stdout}");
    }
    // The same shapes that can be decided still run: a defined role, a
    // resolved name, a name the policy denies before resolving, and a case
    // that expects exactly the resolution failure.
    let decidable = temp_file(
        "decidable.yaml",
        "resolve:\n  mirror.pkg.example: [93.184.216.34]\ncases:\n  - role: ci\n    url: https://mirror.pkg.example/\n    expect: allow\n  - url: https://metadata.google.internal/\n    expect: deny\n    reason: denied-name:metadata\n  - url: https://nowhere.pkg.example/\n    expect: deny\n    reason: resolve-failed\n",
    );
    let (code, stdout, stderr) = portcullis(&["test", "--config", config, decidable.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.ends_with("3 cases: 3 passed, 0 failed\n"), "{stdout}");
}

/// `allow.cidrs: [10.0.0.0/8]` is valid but admits nothing without a
/// carve-out, and `http_ports: [443]` never sees a request: `validate`
/// still says ok (exit 0) and warns about both, with the line.
#[test]
fn validate_warns_about_allow_rules_that_never_match() {
    let config = temp_file(
        "never.yaml",
        "roles:\n  default:\n    allow:\n      cidrs: [8.8.8.0/24, 10.0.0.0/8]\n      http_ports: [80, 443]\n",
    );
    let shown = config.display().to_string();
    let (code, stdout, stderr) = portcullis(&["validate", "--config", &shown]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, format!("{shown}: ok\n"));
    let warnings: Vec<&str> = stderr.lines().collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    assert!(
        warnings[0].starts_with(&format!(
            "warning: {shown}: line 4: roles.default.allow.cidrs[1]: 10.0.0.0/8 lies inside an always-denied range (private)"
        )) && warnings[0].contains("allow_ranges"),
        "{stderr}"
    );
    assert!(
        warnings[1].starts_with(&format!("warning: {shown}: line 5: roles.default.allow.http_ports[1]: port 443 is the HTTPS port")),
        "{stderr}"
    );
    // With the carve-out the README shows, the cidr rule can match: no warning.
    let carved = temp_file(
        "carved.yaml",
        "allow_ranges:\n  - {cidr: 10.1.2.3/32, domains: [mirror.corp.example], ports: [443]}\nroles:\n  default:\n    allow:\n      cidrs: [10.0.0.0/8]\n",
    );
    let (code, _, stderr) = portcullis(&["validate", "--config", carved.to_str().unwrap()]);
    assert_eq!((code, stderr.as_str()), (0, ""));
}
