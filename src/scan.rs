//! `portcullis scan`: checks workflow definitions (Argo Workflows, Kestra
//! flows) and any other text before they run. Every URL, `host:port` and IP
//! literal in them is decided with the policy on `portcullis check`'s path
//! ([`Rules`]) without DNS: IP literals against every range, names the
//! config pins (`dns.static`) on their addresses, any other name as a
//! parent-resolved name is decided (the always-denied names, the role's
//! deny entries, ports and domain rules). Spellings the proxy refuses as `invalid-target` are
//! reported with the address lenient resolvers read from them.

pub mod find;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::config::PinnedName;
use crate::dns::ResolveError;
use crate::policy::{Decision, Policy, RoleId};
use crate::proxy::admit::{Before, Lookup, Rules};
use crate::target::{DomainName, Host, Target};
use find::{Found, Refused};

/// Why a scan could not run: bad input, exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("{path}: cannot read: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{file}:{line}: not valid YAML: {message}")]
    Yaml { file: String, line: usize, message: String },
}

/// One destination the policy would deny.
#[derive(Debug, Clone)]
pub struct Denied {
    /// The file it is written in, as given on the command line.
    pub file: String,
    /// Its 1-based line.
    pub line: usize,
    /// What was found there.
    pub found: Found,
    /// The line the report prints after `file:line: `.
    pub verdict: String,
}

/// What a scan found.
#[derive(Debug, Default)]
pub struct Report {
    /// Text files read.
    pub files: usize,
    /// Binary files passed over.
    pub skipped: Vec<String>,
    /// Destinations decided.
    pub targets: usize,
    /// Those the policy would deny, in file and line order.
    pub denied: Vec<Denied>,
}

/// Decides destinations for one role of one policy.
pub struct Scanner<'p> {
    policy: &'p Policy,
    role: RoleId,
    pinned: Pinned<'p>,
}

/// Scan's DNS: the names the config pins, and nothing leaves.
struct Pinned<'p>(&'p BTreeMap<PinnedName, Vec<IpAddr>>);

impl Pinned<'_> {
    fn get(&self, name: &DomainName) -> Option<&Vec<IpAddr>> {
        self.0.get(&PinnedName(name.as_str().to_string()))
    }
}

impl Lookup for Pinned<'_> {
    fn answer(&self, _: &DomainName) -> &'static str {
        "static"
    }

    async fn resolve(&self, name: &DomainName) -> Result<Vec<IpAddr>, ResolveError> {
        self.get(name).cloned().ok_or(ResolveError::NoAddresses)
    }
}

impl<'p> Scanner<'p> {
    /// A scanner deciding as `role`, with the config's pinned names.
    pub fn new(policy: &'p Policy, role: RoleId, pinned: &'p BTreeMap<PinnedName, Vec<IpAddr>>) -> Self {
        Scanner { policy, role, pinned: Pinned(pinned) }
    }

    /// Scans files and directories (recursively, hidden entries skipped).
    pub fn scan_paths(&self, paths: &[PathBuf]) -> Result<Report, ScanError> {
        let mut report = Report::default();
        let mut files = Vec::new();
        for path in paths {
            collect(path, &mut files)?;
        }
        for file in files {
            self.scan_file(&file, &mut report)?;
        }
        Ok(report)
    }

    fn scan_file(&self, path: &Path, report: &mut Report) -> Result<(), ScanError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| ScanError::Io { path: name.clone(), source })?;
        if bytes.contains(&0) {
            report.skipped.push(name);
            return Ok(());
        }
        let text = String::from_utf8_lossy(&bytes);
        if is_yaml(path) {
            check_yaml(&text, &name)?;
        }
        report.files += 1;
        for (i, line) in text.lines().enumerate() {
            for found in found_on(line) {
                report.targets += 1;
                if let Some(verdict) = self.verdict(&found) {
                    report.denied.push(Denied { file: name.clone(), line: i + 1, found, verdict });
                }
            }
        }
        Ok(())
    }

    /// The deny line for `found`, or `None` when the policy allows it.
    pub fn verdict(&self, found: &Found) -> Option<String> {
        let role = self.policy.role(self.role).name();
        let mut out = String::new();
        match &found.target {
            Ok(target) => {
                let decision = self.decide(found, target);
                let reason = denied(&decision)?;
                let _ = write!(out, "deny {} {target} role={role} reason={reason} rule={}", found.kind.as_str(), self.policy.describe(decision.rule()));
            }
            Err(refused) => {
                let _ = write!(out, "deny {} {}:{} role={role} reason=invalid-target ({})", found.kind.as_str(), refused.host, refused.port, refused.error);
                self.lenient(&mut out, found, refused);
            }
        }
        if found.assumed_port {
            out.push_str(" (no port written; decided at 443)");
        }
        let _ = write!(out, " written {:?}", found.spelled);
        Some(out)
    }

    fn decide(&self, found: &Found, target: &Target) -> Decision {
        let rules = Rules { policy: self.policy, parent: None };
        match rules.before_dns(self.role, found.kind, target, &self.pinned) {
            Before::Decided(decided) => decided.decision,
            Before::Resolve(name) => match self.pinned.get(name) {
                Some(addrs) => rules.with_addrs(self.role, found.kind, target, addrs, None),
                None => self.policy.decide_name_only(self.role, found.kind, target),
            },
        }
    }

    fn lenient(&self, out: &mut String, found: &Found, refused: &Refused) {
        let Some(addr) = refused.lenient else {
            out.push_str("; no lenient resolver reads an address from it");
            return;
        };
        let target = Target { host: Host::Ip(addr), port: refused.port };
        let decision = self.decide(found, &target);
        let shown = match addr {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        match denied(&decision) {
            Some(reason) => {
                let _ = write!(out, "; lenient resolvers (inet_aton, URL parsers) read {shown}, which the policy denies: {reason}");
            }
            None => {
                let _ = write!(out, "; lenient resolvers (inet_aton, URL parsers) read {shown}, which the policy would allow by its canonical spelling");
            }
        }
    }
}

/// The reason a decision denies, counting report mode's would-deny.
fn denied(decision: &Decision) -> Option<String> {
    match decision {
        Decision::Deny { reason, .. } => Some(reason.to_string()),
        Decision::Allow(permit) => permit.would_deny().map(|r| format!("{r} (report mode: would deny)")),
    }
}

/// Destinations on one line: as written, and inside YAML/JSON double-quoted
/// strings after their escapes (`"http://\x31\x36\x39..."`) are decoded.
fn found_on(line: &str) -> Vec<Found> {
    let image = find::is_image_line(line);
    let mut found = find::find(line, image);
    if line.contains('\\') {
        for decoded in quoted_escapes(line) {
            for f in find::find(&decoded, image) {
                if !found.iter().any(|g| g.target == f.target) {
                    found.push(f);
                }
            }
        }
    }
    found
}

/// The double-quoted strings on `line` that carry escapes, decoded as YAML
/// (and JSON) read them.
fn quoted_escapes(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = line.chars();
    while chars.by_ref().any(|c| c == '"') {
        let mut text = String::new();
        let mut escaped = false;
        loop {
            match chars.next() {
                None | Some('"') => break,
                Some('\\') => {
                    escaped = true;
                    match chars.next() {
                        Some('x') => text.extend(hex_char(&mut chars, 2)),
                        Some('u') => text.extend(hex_char(&mut chars, 4)),
                        Some('U') => text.extend(hex_char(&mut chars, 8)),
                        Some('t') => text.push('\t'),
                        Some('n') => text.push('\n'),
                        Some('0') => text.push('\0'),
                        Some(c) => text.push(c),
                        None => break,
                    }
                }
                Some(c) => text.push(c),
            }
        }
        if escaped {
            out.push(text);
        }
    }
    out
}

fn hex_char(chars: &mut std::str::Chars<'_>, n: usize) -> Option<char> {
    let digits: String = chars.by_ref().take(n).collect();
    u32::from_str_radix(&digits, 16).ok().and_then(char::from_u32)
}

fn is_yaml(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

/// A workflow file that is not YAML is bad input, not a clean scan.
fn check_yaml(text: &str, file: &str) -> Result<(), ScanError> {
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        if let Err(e) = <serde::de::IgnoredAny as serde::Deserialize>::deserialize(doc) {
            let line = e.location().map_or(0, |l| l.line());
            return Err(ScanError::Yaml { file: file.to_string(), line, message: e.to_string() });
        }
    }
    Ok(())
}

/// Files under `path`, sorted; hidden entries (`.git`) are skipped.
fn collect(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), ScanError> {
    let io = |source| ScanError::Io { path: path.display().to_string(), source };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_dir() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path).map_err(io)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for entry in entries {
        if entry.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')) {
            continue;
        }
        collect(&entry, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_strings_are_decoded() {
        let cases: &[(&str, &[&str])] = &[
            (r#"url: "http://\x31\x36\x39.254.169.254/""#, &["http://169.254.169.254/"]),
            (r#"{"uri": "http:\/\/169.254.169.254\/"}"#, &["http://169.254.169.254/"]),
            (r#"x: "\u0031\u0030.0.0.1" and "plain""#, &["10.0.0.1"]),
            ("no escapes here", &[]),
        ];
        for (line, want) in cases {
            assert_eq!(quoted_escapes(line), want.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "{line}");
        }
    }
}
