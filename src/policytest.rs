//! Policy tests: `portcullis test --config FILE CASES.yaml...`.
//!
//! A case file names clients (a role, or an identity the config maps to a
//! role), targets and the expected decision; a `resolve:` map stands in for
//! DNS so a run is hermetic. Each case is decided by the proxy's own
//! decision ([`Rules::decide`], which also models a parent proxy that
//! resolves names itself), and its result names the deciding rule.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;

use crate::config::Config;
use crate::dns::ResolveError;
use crate::identity::{CertNames, Identities};
use crate::policy::{Decision, Policy, RequestKind, RoleId};
use crate::proxy::decide::{Lookup, Rules};
use crate::proxy::egress::parent::Parent;
use crate::snapshot::Snapshot;
use crate::source_lines::SourceLines;
use crate::target::{DomainName, Host, Target};

/// A case file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaseFileError {
    /// The file could not be read, is too large or too deep, or is not a
    /// valid case file; `line` is 1-based when known.
    #[error("{file}{}: {message}", line.map_or(String::new(), |l| format!(":{l}")))]
    Invalid { file: String, line: Option<usize>, message: String },
}

impl From<crate::input::InputError> for CaseFileError {
    fn from(e: crate::input::InputError) -> Self {
        CaseFileError::Invalid { file: e.file, line: e.line, message: e.reason }
    }
}

/// A case file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFileRaw {
    /// Stubbed DNS: name → addresses.
    #[serde(default)]
    resolve: BTreeMap<String, Vec<IpAddr>>,
    cases: Vec<CaseRaw>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseRaw {
    name: Option<String>,
    role: Option<String>,
    client: Option<ClientRaw>,
    /// `http://...` (forwarded), `https://...` or `host:port` (CONNECT).
    url: String,
    /// Overrides the kind the URL implies.
    kind: Option<KindRaw>,
    expect: Expect,
    /// The expected reason code of a deny.
    reason: Option<String>,
    /// Text the deciding rule must contain (e.g. `roles.ci.allow.domains[0]`).
    rule: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum KindRaw {
    Http,
    Connect,
}

/// A client identity, mapped to a role by the config's `identity:` rules.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientRaw {
    /// The source address.
    source: Option<IpAddr>,
    /// A `Proxy-Authorization: Basic` user (its password is not checked).
    user: Option<String>,
    /// Names a verified client certificate carries.
    cert: Option<CertRaw>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CertRaw {
    #[serde(default)]
    uri: Vec<String>,
    #[serde(default)]
    dns: Vec<String>,
    cn: Option<String>,
}

/// The decision a case expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// Allowed (in report mode, also what would have been denied).
    Allow,
    /// Denied.
    Deny,
}

impl Expect {
    /// `allow` or `deny`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Expect::Allow => "allow",
            Expect::Deny => "deny",
        }
    }
}

/// Who a case runs as.
#[derive(Debug, Clone)]
enum Client {
    Role(String),
    Identity { source: IpAddr, user: Option<String>, cert: Option<CertNames> },
}

/// One checked case, ready to run.
#[derive(Debug, Clone)]
pub struct Case {
    /// The case's name, or its URL.
    pub name: String,
    /// The case file it is written in.
    pub file: String,
    /// Its 1-based line there, when found.
    pub line: Option<usize>,
    client: Client,
    kind: RequestKind,
    target: Target,
    expect: Expect,
    reason: Option<String>,
    rule: Option<String>,
}

/// A parsed case file: its cases and its stubbed DNS.
#[derive(Debug, Clone)]
pub struct CaseFile {
    /// The file's name as given.
    pub file: String,
    /// Its cases, in order.
    pub cases: Vec<Case>,
    resolve: BTreeMap<String, Vec<IpAddr>>,
}

/// Parses what an operator types: an http(s) URL or a bare `host:port`.
pub fn parse_request(url: &str) -> Result<(RequestKind, Target), String> {
    let lower = url.to_ascii_lowercase();
    let (kind, parsed) = if lower.starts_with("https://") {
        let uri: http::Uri = format!("http://{}", &url[8..]).parse().map_err(|e| format!("{e}"))?;
        let authority = uri.authority().ok_or("missing host")?.as_str();
        let with_port = if uri.port().is_some() { authority.to_string() } else { format!("{authority}:443") };
        (RequestKind::Connect, Target::parse_authority(&with_port))
    } else if lower.starts_with("http://") {
        let uri: http::Uri = url.parse().map_err(|e| format!("{e}"))?;
        (RequestKind::Http, Target::parse_absolute(&uri))
    } else {
        (RequestKind::Connect, Target::parse_authority(url))
    };
    parsed.map(|t| (kind, t)).map_err(|e| format!("invalid-target: {e}"))
}

impl CaseFile {
    /// Reads and checks a case file.
    pub fn load(path: &Path) -> Result<Self, CaseFileError> {
        let text = crate::input::read(path, crate::input::CASES).map_err(CaseFileError::from)?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Checks case-file text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, CaseFileError> {
        let invalid = |line: Option<usize>, message: String| CaseFileError::Invalid { file: file.to_string(), line, message };
        crate::input::check(text, file, crate::input::CASES)?;
        let raw: CaseFileRaw =
            serde_yaml_ng::from_str(text).map_err(|e| invalid(e.location().map(|l| l.line()), e.to_string()))?;
        let lines = SourceLines::index(file, text);
        // A file that tests nothing must not pass: a mistyped list or an
        // emptied file would otherwise read as "0 passed, 0 failed".
        if raw.cases.is_empty() {
            return Err(invalid(lines.key("cases").map(|l| l as usize), "no cases: a case file needs at least one".to_string()));
        }
        let mut cases = Vec::with_capacity(raw.cases.len());
        for (i, case) in raw.cases.into_iter().enumerate() {
            let line = lines.item("cases", i).map(|l| l as usize);
            cases.push(Case::check(case, file, line).map_err(|m| invalid(line, format!("cases[{i}]: {m}")))?);
        }
        let mut resolve = BTreeMap::new();
        for (name, addrs) in raw.resolve {
            let key = crate::target::DomainName::parse(&name)
                .map_err(|e| invalid(lines.item("resolve", 0).map(|l| l as usize), format!("resolve: {name:?}: {e}")))?;
            resolve.insert(key.as_str().to_string(), addrs);
        }
        Ok(CaseFile { file: file.to_string(), cases, resolve })
    }
}

impl Case {
    fn check(raw: CaseRaw, file: &str, line: Option<usize>) -> Result<Case, String> {
        let (implied, target) = parse_request(&raw.url).map_err(|e| format!("url {:?}: {e}", raw.url))?;
        let kind = match raw.kind {
            Some(KindRaw::Http) => RequestKind::Http,
            Some(KindRaw::Connect) => RequestKind::Connect,
            None => implied,
        };
        let client = match (raw.role, raw.client) {
            (Some(role), None) => Client::Role(role),
            (None, Some(c)) => Client::Identity {
                source: c.source.unwrap_or(IpAddr::from([127, 0, 0, 1])),
                user: c.user,
                cert: c.cert.map(|c| CertNames { uris: c.uri, dns: c.dns, cn: c.cn }),
            },
            (None, None) => Client::Role(crate::config::DEFAULT_ROLE.to_string()),
            (Some(_), Some(_)) => return Err("give either role or client, not both".to_string()),
        };
        if raw.expect == Expect::Allow && raw.reason.is_some() {
            return Err("reason is for expect: deny".to_string());
        }
        Ok(Case {
            name: raw.name.unwrap_or_else(|| raw.url.clone()),
            file: file.to_string(),
            line,
            client,
            kind,
            target,
            expect: raw.expect,
            reason: raw.reason,
            rule: raw.rule,
        })
    }
}

/// What a case got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `allow` or `deny`.
    pub decision: Expect,
    /// The reason code of a deny (or of what report mode let through).
    pub reason: Option<String>,
    /// The role the case ran as.
    pub role: String,
    /// The deciding rule, described.
    pub rule: String,
}

/// A case and what it got.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The case that ran.
    pub case: Case,
    /// What it got.
    pub got: Outcome,
    /// Why it failed; `None` when it passed.
    pub failure: Option<String>,
}

/// The config under test: the policy, how clients map to roles, and what
/// the proxy would hand to its parent unresolved.
pub struct PolicyUnderTest {
    policy: Policy,
    identities: Identities,
    users: BTreeMap<String, String>,
    parent: Option<Parent>,
    pinned: BTreeMap<String, Vec<IpAddr>>,
    role_names: Vec<String>,
}

/// A case file's DNS: names pinned in the config first, as the proxy's
/// resolver answers them, then the file's `resolve:` map.
struct CaseAnswers<'a> {
    pinned: &'a BTreeMap<String, Vec<IpAddr>>,
    resolve: &'a BTreeMap<String, Vec<IpAddr>>,
}

impl Lookup for CaseAnswers<'_> {
    fn answer(&self, name: &DomainName) -> &'static str {
        if self.pinned.contains_key(name.as_str()) { "static" } else { "cases" }
    }

    async fn resolve(&self, name: &DomainName) -> Result<Vec<IpAddr>, ResolveError> {
        let name = name.as_str();
        self.pinned.get(name).or_else(|| self.resolve.get(name)).cloned().ok_or(ResolveError::NoAddresses)
    }
}

impl PolicyUnderTest {
    /// Compiles the config's policy and identity rules.
    pub fn new(config: &Config) -> Result<Self, String> {
        let Snapshot { policy, identities, parent, .. } = Snapshot::compile(config, 1).map_err(|e| e.to_string())?;
        let users = config
            .identity
            .credentials
            .iter()
            .filter_map(|c| c.user.clone().map(|u| (u, c.role.clone())))
            .collect();
        let pinned = config.dns.pinned.iter().map(|(name, addrs)| (name.0.as_str().to_string(), addrs.clone())).collect();
        let role_names = config.roles.keys().cloned().collect();
        Ok(PolicyUnderTest { policy, identities, users, parent, pinned, role_names })
    }

    /// The compiled policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    fn role(&self, client: &Client) -> Result<RoleId, Outcome> {
        let refused = |role: &str, reason: &str, rule: &str| Outcome {
            decision: Expect::Deny,
            reason: Some(reason.to_string()),
            role: role.to_string(),
            rule: rule.to_string(),
        };
        match client {
            Client::Role(name) => {
                self.policy.role_id(name).ok_or_else(|| refused(name, "unknown-role", "the role is not defined in the config"))
            }
            Client::Identity { user: Some(user), .. } => match self.users.get(user) {
                Some(role) => self.policy.role_id(role).ok_or_else(|| refused(role, "unknown-role", "identity.credentials")),
                None => Err(refused("", "auth-failed", "identity.credentials: no such user")),
            },
            Client::Identity { source, cert, user: None } => self
                .identities
                .identify(&self.policy, cert.as_ref(), None, *source)
                .map(|(role, _)| role)
                .map_err(|reason| refused("", reason.as_str(), "identity.require_credentials")),
        }
    }

    /// Refuses cases this config cannot decide, so they cannot pass by
    /// accident: a role the config does not define (it would be denied as
    /// `unknown-role`), and a name the policy must resolve that the file's
    /// `resolve:` map lacks (it would be denied as `resolve-failed`, which
    /// the proxy answers as a 502 error, not a policy deny), unless the case
    /// expects exactly `reason: resolve-failed`.
    pub fn check_decidable(&self, file: &CaseFile) -> Result<(), CaseFileError> {
        for case in &file.cases {
            let invalid = |message: String| CaseFileError::Invalid {
                file: case.file.clone(),
                line: case.line,
                message: format!("case {:?}: {message}", case.name),
            };
            if let Client::Role(name) = &case.client {
                if self.policy.role_id(name).is_none() {
                    let defined = self.role_names.join(", ");
                    return Err(invalid(format!("role {name:?} is not defined in the config (its roles: {defined})")));
                }
            }
            let Ok(role) = self.role(&case.client) else { continue };
            let crate::policy::PreResolution::Resolve(name) = self.policy.pre_resolution(role, case.kind, &case.target) else { continue };
            let expects_failure = case.reason.as_deref() == Some("resolve-failed");
            let answered = file.resolve.contains_key(name.as_str()) || self.pinned.contains_key(name.as_str());
            let parent_resolves = self.parent.as_ref().is_some_and(|p| p.resolves(self.policy.role(role).name(), case.kind, name));
            if !answered && !parent_resolves && !expects_failure {
                return Err(invalid(format!(
                    "{name} must be resolved to be decided, and the file's resolve: map has no entry for it \
                     (add one, or expect `reason: resolve-failed`)"
                )));
            }
        }
        Ok(())
    }

    /// Decides one case against the stubbed DNS of its file.
    pub async fn run(&self, case: &Case, resolve: &BTreeMap<String, Vec<IpAddr>>) -> CaseResult {
        let got = self.decide(case, resolve).await;
        let failure = judge(case, &got);
        CaseResult { case: case.clone(), got, failure }
    }

    /// The proxy's own decision ([`Rules::decide`]), with the case file
    /// for DNS and the config's parent proxy.
    async fn decide(&self, case: &Case, resolve: &BTreeMap<String, Vec<IpAddr>>) -> Outcome {
        let role = match self.role(&case.client) {
            Ok(role) => role,
            Err(outcome) => return outcome,
        };
        let role_name = self.policy.role(role).name().to_string();
        let rules = Rules { policy: &self.policy, parent: self.parent.as_ref() };
        let lookup = CaseAnswers { pinned: &self.pinned, resolve };
        match rules.decide(role, case.kind, &case.target, None, &lookup).await {
            Ok(decided) => outcome_of(&self.policy, &decided.decision, role_name),
            Err(_) => Outcome {
                decision: Expect::Deny,
                reason: Some("resolve-failed".to_string()),
                role: role_name,
                rule: format!("{} is not in the case file's resolve: map", case.target.host.to_text()),
            },
        }
    }

    /// Runs every case of every file, in order.
    pub async fn run_all(&self, files: &[CaseFile]) -> Vec<CaseResult> {
        let mut results = Vec::new();
        for file in files {
            for case in &file.cases {
                results.push(self.run(case, &file.resolve).await);
            }
        }
        results
    }
}

/// The outcome of a decision, its rule described.
pub fn outcome_of(policy: &Policy, decision: &Decision, role: String) -> Outcome {
    let rule = policy.describe(decision.rule()).to_string();
    match decision {
        Decision::Deny { reason, .. } => Outcome { decision: Expect::Deny, reason: Some(reason.as_str().to_string()), role, rule },
        Decision::Allow(permit) => Outcome {
            decision: Expect::Allow,
            reason: permit.would_deny().map(|r| r.as_str().to_string()),
            role,
            rule,
        },
    }
}

fn judge(case: &Case, got: &Outcome) -> Option<String> {
    let expected = match &case.reason {
        Some(reason) => format!("{} ({reason})", case.expect.as_str()),
        None => case.expect.as_str().to_string(),
    };
    let wrong_decision = got.decision != case.expect;
    let wrong_reason = case.reason.as_ref().is_some_and(|r| got.reason.as_ref() != Some(r));
    let wrong_rule = case.rule.as_ref().is_some_and(|r| !got.rule.contains(r.as_str()));
    if wrong_decision || wrong_reason {
        return Some(format!("expected {expected}, got {got}"));
    }
    if wrong_rule {
        return Some(format!("expected rule {:?}, got {got}", case.rule.as_deref().unwrap_or_default()));
    }
    None
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.decision.as_str())?;
        match (&self.reason, self.decision) {
            (Some(reason), Expect::Deny) => write!(f, " ({reason})")?,
            (Some(reason), Expect::Allow) => write!(f, " (report mode: would deny, {reason})")?,
            (None, _) => {}
        }
        if !self.role.is_empty() {
            write!(f, " role={}", self.role)?;
        }
        write!(f, " rule={}", self.rule)
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.file, self.name)?,
            None => write!(f, "{}: {}", self.file, self.name)?,
        }
        let host = match &self.target.host {
            Host::Name(n) => n.to_string(),
            Host::Ip(ip) => ip.to_string(),
        };
        write!(f, " [{} {host}:{}]", self.kind.as_str(), self.target.port)
    }
}

/// JUnit XML for CI systems: one test suite per case file.
pub fn junit_xml(results: &[CaseResult]) -> String {
    let failures = results.iter().filter(|r| r.failure.is_some()).count();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(out, "<testsuites name=\"portcullis test\" tests=\"{}\" failures=\"{failures}\">", results.len());
    let mut files: Vec<&str> = results.iter().map(|r| r.case.file.as_str()).collect();
    files.dedup();
    for file in files {
        let suite: Vec<&CaseResult> = results.iter().filter(|r| r.case.file == file).collect();
        let failed = suite.iter().filter(|r| r.failure.is_some()).count();
        let _ = writeln!(
            out,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failed}\" errors=\"0\">",
            xml_escape(file),
            suite.len()
        );
        for r in suite {
            let line = r.case.line.map_or(String::new(), |l| format!(" line=\"{l}\""));
            let _ = write!(
                out,
                "    <testcase classname=\"{}\" name=\"{}\" file=\"{}\"{line}",
                xml_escape(file),
                xml_escape(&r.case.name),
                xml_escape(file)
            );
            match &r.failure {
                None => {
                    let _ = writeln!(out, ">\n      <system-out>{}</system-out>\n    </testcase>", xml_escape(&r.got.to_string()));
                }
                Some(failure) => {
                    let _ = writeln!(
                        out,
                        ">\n      <failure message=\"{}\" type=\"policy\">{}</failure>\n    </testcase>",
                        xml_escape(failure),
                        xml_escape(&r.case.to_string())
                    );
                }
            }
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

/// Escapes text for an XML attribute or element; control characters XML
/// 1.0 cannot carry are dropped.
fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 => {}
            c => out.push(c),
        }
    }
    out
}

/// Shared with the suggestion and import commands: a policy compiled from
/// config text, for checking what a change would do.
pub fn compile_text(text: &str, file: &str) -> Result<PolicyUnderTest, String> {
    let config = Config::from_yaml_str(text, file).map_err(|e| e.to_string())?;
    PolicyUnderTest::new(&config)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "roles:\n  default:\n    allow:\n      domains: [example.com]\n  ci:\n    mode: report\n";

    #[tokio::test]
    async fn cases_pass_fail_and_name_the_rule() {
        let put = compile_text(CONFIG, "p.yaml").unwrap();
        let file = CaseFile::parse(
            "resolve:\n  example.com: [93.184.216.34]\n  other.net: [8.8.8.8]\ncases:\n\
             - {url: https://example.com/, expect: allow, rule: \"roles.default.allow.domains[0]\"}\n\
             - {url: https://other.net/, expect: deny, reason: not-allowlisted}\n\
             - {url: https://other.net/, role: ci, expect: allow}\n\
             - {url: http://169.254.169.254/, expect: allow}\n\
             - {url: https://unstubbed.example/, role: ci, expect: allow}\n",
            "c.yaml",
        )
        .unwrap();
        let results = put.run_all(&[file]).await;
        let failed: Vec<Option<usize>> = results.iter().filter(|r| r.failure.is_some()).map(|r| r.case.line).collect();
        assert_eq!(failed, [Some(8), Some(9)], "{results:#?}");
        assert!(results[3].failure.as_ref().unwrap().contains("expected allow, got deny (denied-range:metadata)"));
        assert!(results[3].got.rule.contains("169.254.169.254/32"), "{}", results[3].got.rule);
        assert_eq!(results[4].got.reason.as_deref(), Some("resolve-failed"));
        let xml = junit_xml(&results);
        assert!(xml.contains("tests=\"5\" failures=\"2\""), "{xml}");
    }

    #[test]
    fn bad_case_files_name_file_line_and_reason() {
        let cases: &[(&str, Option<usize>, &str)] = &[
            ("cases:\n  - {url: https://a.example/, expect: maybe}\n", Some(2), "unknown variant `maybe`"),
            ("cases:\n  - url: https://a.example/\n    expect: allow\n  - url: \"http://0x7f.1/\"\n    expect: deny\n", Some(4), "invalid-target"),
            ("cases:\n  - {url: a.example:443, expect: allow, role: x, client: {user: u}}\n", Some(2), "either role or client"),
            ("cases:\n  - {url: a.example:443, expect: allow, reason: not-allowlisted}\n", Some(2), "reason is for expect: deny"),
            ("cases:\n  - {url: a.example:443, expct: allow}\n", Some(2), "unknown field `expct`"),
            ("resolve: {}\ncases: []\n", Some(2), "no cases"),
        ];
        for (text, line, reason) in cases {
            match CaseFile::parse(text, "bad.yaml") {
                Err(CaseFileError::Invalid { file, line: got, message }) => {
                    assert_eq!(file, "bad.yaml");
                    assert_eq!(got, *line, "{message}");
                    assert!(message.contains(reason), "{message}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn xml_is_escaped() {
        assert_eq!(xml_escape("a<b>&\"'\u{1}c"), "a&lt;b&gt;&amp;&quot;&apos;c");
    }
}
