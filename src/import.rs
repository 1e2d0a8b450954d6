//! `portcullis import smokescreen ACL.yaml`: a Smokescreen egress ACL as
//! Portcullis roles, with a list of what does not translate.
//!
//! Smokescreen decides per service, in this order: the service's
//! `allowed_domains` allow; else `global_deny_list` denies; else
//! `global_allow_list` allows; else the action (`enforce` denies, `report`
//! allows and logs, `open` allows). Unknown services get the `default`
//! rule, or are denied without one. Each service becomes a role of that
//! name with the same mode; the global lists are folded into each role so
//! the order above holds (Portcullis checks a role's `deny` before its
//! `allow`), and the service is mapped from its client certificate's CN,
//! which is how Smokescreen names services by default.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use serde::Deserialize;

use crate::policy::domain::DomainPattern;
use crate::policy::Mode;

/// An ACL that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("{file}{}: {message}", line.map_or(String::new(), |l| format!(":{l}")))]
pub struct ImportError {
    /// The ACL file as named.
    pub file: String,
    /// The 1-based line, when the parser knows it.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

/// A Smokescreen v1 ACL file.
#[derive(Debug, Deserialize)]
struct Acl {
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    services: Vec<Service>,
    #[serde(default)]
    default: Option<Service>,
    #[serde(default)]
    global_allow_list: Vec<String>,
    #[serde(default)]
    global_deny_list: Vec<String>,
    /// Keys this importer does not know, reported as not translated.
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml_ng::Value>,
}

#[derive(Debug, Deserialize)]
struct Service {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    project: Option<String>,
    action: Action,
    #[serde(default)]
    allowed_domains: Vec<String>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Action {
    Enforce,
    Report,
    Open,
}

impl Action {
    fn mode(self) -> Mode {
        match self {
            Action::Enforce => Mode::Enforce,
            Action::Report => Mode::Report,
            Action::Open => Mode::Open,
        }
    }
}

/// One role produced from a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedRole {
    /// The Portcullis role name.
    pub name: String,
    /// The Smokescreen service name (`None` for the default rule).
    pub service: Option<String>,
    /// Smokescreen's `project`, kept as a comment.
    pub project: Option<String>,
    /// From the `action`.
    pub mode: Mode,
    /// `allow.domains`: the service's own, then the global allow list.
    pub allow: Vec<String>,
    /// `deny.domains`: the global deny list less what the service allows.
    pub deny: Vec<String>,
}

/// The translation: roles, and every part that did not translate (or
/// translates with a difference worth reading).
#[derive(Debug, Clone, Default)]
pub struct Imported {
    /// One role per service, then `default`.
    pub roles: Vec<ImportedRole>,
    /// Notes on what did not translate, one per line.
    pub untranslated: Vec<String>,
}

/// A Smokescreen glob Portcullis can express: an exact name or a leading
/// `*.` wildcard (both match one or more labels below the suffix).
fn pattern(glob: &str) -> Option<DomainPattern> {
    DomainPattern::parse(glob.trim_end_matches('.')).ok()
}

/// True when a Portcullis pattern matches every name `inner` matches.
fn covers(outer: &DomainPattern, inner: &DomainPattern) -> bool {
    let below = |name: &str, suffix: &str| name.len() > suffix.len() + 1 && name.ends_with(suffix) && name.as_bytes()[name.len() - suffix.len() - 1] == b'.';
    match (outer, inner) {
        (DomainPattern::Exact(a), DomainPattern::Exact(b)) => a == b,
        (DomainPattern::Wildcard(s), DomainPattern::Exact(n)) => below(n.as_str(), s.as_str()),
        (DomainPattern::Wildcard(s), DomainPattern::Wildcard(t)) => s == t || below(t.as_str(), s.as_str()),
        (DomainPattern::Exact(_), DomainPattern::Wildcard(_)) => false,
    }
}

/// True when some name matches both patterns.
fn overlaps(a: &DomainPattern, b: &DomainPattern) -> bool {
    covers(a, b) || covers(b, a)
}

/// Converts ACL text; `file` names it in errors.
pub fn smokescreen(text: &str, file: &str) -> Result<Imported, ImportError> {
    crate::input::check(text, file, crate::input::IMPORT)
        .map_err(|e| ImportError { file: e.file, line: e.line, message: e.reason })?;
    let acl: Acl = serde_yaml_ng::from_str(text).map_err(|e| ImportError {
        file: file.to_string(),
        line: e.location().map(|l| l.line()),
        message: e.to_string(),
    })?;
    let mut out = Imported::default();
    if let Some(v) = acl.version.as_deref().filter(|v| *v != "v1") {
        out.untranslated.push(format!("version {v:?}: only v1 ACLs are known; translated as v1"));
    }
    for key in acl.other.keys() {
        out.untranslated.push(format!("{key}: not a Smokescreen v1 ACL key this importer knows; ignored"));
    }
    let globals = |list: &[String], field: &str, notes: &mut Vec<String>| -> Vec<DomainPattern> {
        list.iter()
            .filter_map(|g| {
                let p = pattern(g);
                if p.is_none() {
                    notes.push(format!("{field}: {g:?}: only exact names and leading \"*.\" wildcards translate; dropped"));
                }
                p
            })
            .collect()
    };
    let global_deny = globals(&acl.global_deny_list, "global_deny_list", &mut out.untranslated);
    let global_allow = globals(&acl.global_allow_list, "global_allow_list", &mut out.untranslated);
    let mut seen = std::collections::BTreeSet::new();
    let default_name = crate::config::DEFAULT_ROLE;
    for (i, service) in acl.services.iter().enumerate() {
        let Some(name) = service.name.clone().filter(|n| !n.is_empty()) else {
            out.untranslated.push(format!("services[{i}]: no name; skipped"));
            continue;
        };
        let role_name = if name == default_name { format!("{name}-service") } else { name.clone() };
        if role_name != name {
            out.untranslated.push(format!(
                "services[{i}]: the service {name:?} becomes role {role_name:?} (`default` is the role for clients without an identity)"
            ));
        }
        if !seen.insert(role_name.clone()) {
            out.untranslated.push(format!("services[{i}]: service {name:?} is listed twice; the first is kept"));
            continue;
        }
        let role = translate(&format!("services[{i}]"), role_name, Some(name), service, &global_deny, &global_allow, &mut out.untranslated);
        out.roles.push(role);
    }
    match &acl.default {
        Some(rule) => {
            let role = translate("default", default_name.to_string(), None, rule, &global_deny, &global_allow, &mut out.untranslated);
            out.roles.push(role);
        }
        None => out.roles.push(ImportedRole {
            name: default_name.to_string(),
            service: None,
            project: None,
            mode: Mode::Enforce,
            allow: Vec::new(),
            deny: Vec::new(),
        }),
    }
    out.untranslated.push(
        "ports: Smokescreen does not restrict ports; every role allows CONNECT to 443 and HTTP to 80 (add others under allow.connect_ports / http_ports)".to_string(),
    );
    Ok(out)
}

fn translate(
    field: &str,
    name: String,
    service: Option<String>,
    rule: &Service,
    global_deny: &[DomainPattern],
    global_allow: &[DomainPattern],
    notes: &mut Vec<String>,
) -> ImportedRole {
    for key in rule.other.keys() {
        notes.push(format!("{field}.{key}: no Portcullis equivalent (Portcullis never decrypts, and does not chain proxies); ignored"));
    }
    let mut own = Vec::new();
    for glob in &rule.allowed_domains {
        match pattern(glob) {
            Some(p) => own.push(p),
            None => notes.push(format!("{field}.allowed_domains: {glob:?}: only exact names and leading \"*.\" wildcards translate; dropped")),
        }
    }
    // Smokescreen: the service's own list, then the global deny list, then
    // the global allow list. A global deny entry that overlaps an own entry
    // only partly cannot keep that order as a role deny entry.
    let mut deny = Vec::new();
    for d in global_deny {
        if own.iter().any(|o| covers(o, d)) {
            continue;
        }
        if let Some(o) = own.iter().find(|o| overlaps(o, d)) {
            notes.push(format!(
                "{field}: global_deny_list {d} overlaps allowed_domains {o}: Smokescreen allows the overlap, Portcullis denies it (a role's deny comes first)"
            ));
        }
        deny.push(d.to_string());
    }
    let mut allow: Vec<String> = own.iter().map(DomainPattern::to_string).collect();
    for g in global_allow {
        if global_deny.iter().any(|d| covers(d, g)) || own.iter().any(|o| covers(o, g)) {
            continue;
        }
        allow.push(g.to_string());
    }
    ImportedRole { name, service, project: rule.project.clone(), mode: rule.action.mode(), allow, deny }
}

impl fmt::Display for Imported {
    /// A config ready to validate and test: identity mapping and roles;
    /// what does not translate follows as comments.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        out.push_str("# Imported from a Smokescreen ACL by `portcullis import smokescreen`.\n");
        out.push_str("# Services are named by their client certificate's CN: serve the proxy port over TLS\n");
        out.push_str("# (tls: with client_ca) so that the mapping below applies.\n");
        let services: Vec<&ImportedRole> = self.roles.iter().filter(|r| r.service.is_some()).collect();
        if !services.is_empty() {
            out.push_str("identity:\n  certificates:\n");
            for r in &services {
                let _ = writeln!(out, "    - {{cn: {}, role: {}}}", quote(r.service.as_deref().unwrap_or_default()), quote(&r.name));
            }
        }
        out.push_str("roles:\n");
        for r in &self.roles {
            let _ = writeln!(out, "  {}:", quote(&r.name));
            if let Some(project) = &r.project {
                let _ = writeln!(out, "    # project: {project}");
            }
            let _ = writeln!(out, "    mode: {}", r.mode.as_str());
            let list = |items: &[String]| items.iter().map(|i| quote(i)).collect::<Vec<_>>().join(", ");
            let _ = writeln!(out, "    allow:\n      domains: [{}]", list(&r.allow));
            if !r.deny.is_empty() {
                let _ = writeln!(out, "    deny:\n      domains: [{}]", list(&r.deny));
            }
        }
        if !self.untranslated.is_empty() {
            out.push_str("# Does not translate (or translates with a difference):\n");
            for note in &self.untranslated {
                let _ = writeln!(out, "#   - {note}");
            }
        }
        f.write_str(&out)
    }
}

/// A YAML double-quoted string.
fn quote(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Smokescreen's documented ACL with global lists, translated, then
    /// decided by Portcullis the way Smokescreen decides it.
    #[test]
    fn global_lists_keep_smokescreen_order() {
        let acl = "---\nversion: v1\nservices:\n  - name: enforce-dummy-srv\n    project: usersec\n    action: enforce\n    allowed_domains: [example1.com, badexample1.com]\n  - name: open-dummy-srv\n    project: automation\n    action: open\ndefault:\n  project: other\n  action: report\n  allowed_domains: [default.example.com]\nglobal_allow_list: [goodexample1.com, conflictingexample.com]\nglobal_deny_list: [badexample1.com, conflictingexample.com]\n";
        let imported = smokescreen(acl, "acl.yaml").unwrap();
        let role = |n: &str| imported.roles.iter().find(|r| r.name == n).unwrap().clone();
        let enforce = role("enforce-dummy-srv");
        assert_eq!(enforce.allow, ["example1.com", "badexample1.com", "goodexample1.com"]);
        assert_eq!(enforce.deny, ["conflictingexample.com"]);
        assert_eq!(role("open-dummy-srv").mode, Mode::Open);
        assert_eq!(role("default").mode, Mode::Report);
        let config = imported.to_string();
        crate::policytest::compile_text(&config, "imported.yaml").unwrap_or_else(|e| panic!("{e}\n{config}"));
    }

    #[test]
    fn what_does_not_translate_is_listed() {
        let acl = "version: v1\nservices:\n  - name: a\n    project: p\n    action: enforce\n    allowed_domains: [\"service.*.amazonaws.com\", \"*.example.com\"]\n    mitm_domains: [{domain: \"*.example.com\"}]\nglobal_deny_list: [\"*.example.com\", x.example.com]\n";
        let imported = smokescreen(acl, "acl.yaml").unwrap();
        let notes = imported.untranslated.join("\n");
        for want in ["service.*.amazonaws.com", "mitm_domains", "ports:"] {
            assert!(notes.contains(want), "{want} in {notes}");
        }
        assert_eq!(imported.roles[0].deny, Vec::<String>::new(), "covered by the service's own *.example.com");
        let bad = smokescreen("services:\n  - name: a\n    action: block\n", "acl.yaml").unwrap_err();
        assert_eq!(bad.line, Some(3), "{bad}");
        assert!(bad.to_string().starts_with("acl.yaml:3: "), "{bad}");
    }
}
