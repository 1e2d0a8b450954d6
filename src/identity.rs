//! Who is asking: the role a client acts as, from (in this order) its TLS
//! client certificate, its `Proxy-Authorization` credentials, its source
//! address, else the `default` role.
//!
//! Secrets are never held in plain text: config carries SHA-256 digests (or
//! names a file or environment variable, hashed on load), and presented
//! credentials are hashed and compared in constant time.

use std::collections::HashMap;
use std::net::IpAddr;

use base64::Engine;
use http::HeaderValue;
use ipnet::IpNet;
use sha2::{Digest, Sha256};

pub use crate::config::{CertificateRule, CredentialRule, IdentityConfig, SourceRule};
use crate::policy::cidr::CidrTable;
use crate::policy::{DenyReason, Policy, RoleId};

/// The names a verified client certificate carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertNames {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub cn: Option<String>,
}

type Digest32 = [u8; 32];

#[derive(Debug, Clone)]
enum NameKind {
    Uri,
    Dns,
    Cn,
}

#[derive(Debug, Clone)]
struct CompiledCertRule {
    kind: NameKind,
    value: String,
    prefix: bool,
    role: RoleId,
}

impl CompiledCertRule {
    fn matches(&self, names: &CertNames) -> bool {
        let test = |v: &String| if self.prefix { v.starts_with(&self.value) } else { *v == self.value };
        match self.kind {
            NameKind::Uri => names.uris.iter().any(test),
            NameKind::Dns => names.dns.iter().any(test),
            NameKind::Cn => names.cn.as_ref().is_some_and(test),
        }
    }
}

/// Where a client's role came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    Certificate,
    Credentials,
    SourceAddress,
    Default,
}

impl IdentitySource {
    /// The label used in logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            IdentitySource::Certificate => "certificate",
            IdentitySource::Credentials => "credentials",
            IdentitySource::SourceAddress => "source",
            IdentitySource::Default => "default",
        }
    }
}

/// Compiled identity rules, valid for the policy they were compiled against.
#[derive(Debug, Clone)]
pub struct Identities {
    require_credentials: bool,
    challenge_unauthenticated: bool,
    certificates: Vec<CompiledCertRule>,
    basic: HashMap<String, (Digest32, RoleId)>,
    bearer: Vec<(Digest32, RoleId)>,
    sources: CidrTable<RoleId>,
}

fn sha256(bytes: &[u8]) -> Digest32 {
    Sha256::digest(bytes).into()
}

fn parse_digest(hex: &str, field: &str) -> Result<Digest32, String> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{field}: expected 64 hex digits (a SHA-256 digest, e.g. from `printf %s SECRET | sha256sum`)"));
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| format!("{field}: {e}"))?;
    }
    Ok(out)
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &Digest32, b: &Digest32) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Identities {
    /// Compiles the rules, resolving role names against `policy` and reading
    /// token files and variables. Errors name the field.
    pub fn compile(config: &IdentityConfig, policy: &Policy) -> Result<Self, String> {
        let role = |name: &str, field: String| {
            policy.role_id(name).ok_or_else(|| format!("{field}.role: role {name:?} is not defined under roles"))
        };
        let mut certificates = Vec::new();
        for (i, rule) in config.certificates.iter().enumerate() {
            let field = format!("identity.certificates[{i}]");
            let (kind, value) = match (&rule.uri, &rule.dns, &rule.cn) {
                (Some(v), None, None) => (NameKind::Uri, v),
                (None, Some(v), None) => (NameKind::Dns, v),
                (None, None, Some(v)) => (NameKind::Cn, v),
                _ => return Err(format!("{field}: give exactly one of uri, dns, cn")),
            };
            let (value, prefix) = match value.strip_suffix('*') {
                Some(p) => (p.to_string(), true),
                None => (value.clone(), false),
            };
            certificates.push(CompiledCertRule { kind, value, prefix, role: role(&rule.role, field)? });
        }
        let mut basic = HashMap::new();
        let mut bearer = Vec::new();
        for (i, rule) in config.credentials.iter().enumerate() {
            let field = format!("identity.credentials[{i}]");
            let role_id = role(&rule.role, field.clone())?;
            match rule {
                CredentialRule { user: Some(user), password_sha256: Some(hash), token_sha256: None, token_file: None, token_env: None, .. } => {
                    let digest = parse_digest(hash, &format!("{field}.password_sha256"))?;
                    if basic.insert(user.clone(), (digest, role_id)).is_some() {
                        return Err(format!("{field}.user: user {user:?} is listed twice"));
                    }
                }
                CredentialRule { user: None, password_sha256: None, token_sha256: Some(hash), token_file: None, token_env: None, .. } => {
                    bearer.push((parse_digest(hash, &format!("{field}.token_sha256"))?, role_id));
                }
                CredentialRule { user: None, password_sha256: None, token_sha256: None, token_file: Some(path), token_env: None, .. } => {
                    let token = std::fs::read_to_string(path)
                        .map_err(|e| format!("{field}.token_file: cannot read {}: {e}", path.display()))?;
                    bearer.push((sha256(token.trim().as_bytes()), role_id));
                }
                CredentialRule { user: None, password_sha256: None, token_sha256: None, token_file: None, token_env: Some(var), .. } => {
                    let token = std::env::var(var).map_err(|_| format!("{field}.token_env: variable {var} is not set"))?;
                    bearer.push((sha256(token.trim().as_bytes()), role_id));
                }
                _ => {
                    return Err(format!(
                        "{field}: give either user with password_sha256 (Basic), or one of token_sha256, token_file, token_env (Bearer)"
                    ))
                }
            }
        }
        let mut sources: Vec<(IpNet, RoleId)> = Vec::new();
        for (i, rule) in config.sources.iter().enumerate() {
            sources.push((rule.cidr.0, role(&rule.role, format!("identity.sources[{i}]"))?));
        }
        if config.challenge_unauthenticated && basic.is_empty() && bearer.is_empty() {
            return Err("identity.challenge_unauthenticated: no identity.credentials are configured, so a challenge could not be answered".into());
        }
        Ok(Identities {
            require_credentials: config.require_credentials,
            challenge_unauthenticated: config.challenge_unauthenticated,
            certificates,
            basic,
            bearer,
            sources: CidrTable::new(sources),
        })
    }

    /// The role of a client, or why it must authenticate (407).
    pub fn identify(
        &self,
        policy: &Policy,
        cert: Option<&CertNames>,
        proxy_authorization: Option<&HeaderValue>,
        source: IpAddr,
    ) -> Result<(RoleId, IdentitySource), DenyReason> {
        if let Some(names) = cert {
            if let Some(rule) = self.certificates.iter().find(|r| r.matches(names)) {
                return Ok((rule.role, IdentitySource::Certificate));
            }
        }
        // With no credentials configured, a Proxy-Authorization header (sent
        // by clients whose proxy URL has userinfo) identifies nobody; it is
        // still stripped before forwarding.
        let has_credentials = !self.basic.is_empty() || !self.bearer.is_empty();
        if let (Some(header), true) = (proxy_authorization, has_credentials) {
            return self.check_credentials(header).map(|role| (role, IdentitySource::Credentials));
        }
        if self.require_credentials {
            return Err(DenyReason::AuthRequired);
        }
        if let Some(role) = self.sources.lookup(source.to_canonical()) {
            return Ok((*role, IdentitySource::SourceAddress));
        }
        Ok((policy.default_role(), IdentitySource::Default))
    }

    /// The role of a client known only by its source address: a connection
    /// redirected to the transparent listener carries no credentials and no
    /// certificate. When credentials are required, a source without a
    /// source rule is refused (it has no way to present any).
    pub fn identify_source(&self, policy: &Policy, source: IpAddr) -> Result<(RoleId, IdentitySource), DenyReason> {
        if let Some(role) = self.sources.lookup(source.to_canonical()) {
            return Ok((*role, IdentitySource::SourceAddress));
        }
        if self.require_credentials {
            return Err(DenyReason::AuthRequired);
        }
        Ok((policy.default_role(), IdentitySource::Default))
    }

    /// What a deny of a client identified as `source` becomes: with
    /// `challenge_unauthenticated`, a policy deny of a client that presented
    /// no identity turns into a challenge (407 `auth-required`).
    pub fn challenge(&self, source: IdentitySource, reason: DenyReason) -> DenyReason {
        let policy_deny = !matches!(reason, DenyReason::AuthRequired | DenyReason::AuthFailed);
        if self.challenge_unauthenticated && source == IdentitySource::Default && policy_deny {
            DenyReason::AuthRequired
        } else {
            reason
        }
    }

    fn check_credentials(&self, header: &HeaderValue) -> Result<RoleId, DenyReason> {
        let text = header.to_str().map_err(|_| DenyReason::AuthFailed)?;
        let (scheme, value) = text.split_once(' ').ok_or(DenyReason::AuthFailed)?;
        let value = value.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD.decode(value).map_err(|_| DenyReason::AuthFailed)?;
            let decoded = String::from_utf8(decoded).map_err(|_| DenyReason::AuthFailed)?;
            let (user, password) = decoded.split_once(':').ok_or(DenyReason::AuthFailed)?;
            let presented = sha256(password.as_bytes());
            return match self.basic.get(user) {
                Some((digest, role)) if constant_time_eq(digest, &presented) => Ok(*role),
                _ => Err(DenyReason::AuthFailed),
            };
        }
        if scheme.eq_ignore_ascii_case("bearer") {
            let presented = sha256(value.as_bytes());
            // Compare against every token so timing does not reveal which matched.
            let mut found = None;
            for (digest, role) in &self.bearer {
                if constant_time_eq(digest, &presented) {
                    found = Some(*role);
                }
            }
            return found.ok_or(DenyReason::AuthFailed);
        }
        Err(DenyReason::AuthFailed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_and_constant_time_compare() {
        let d = sha256(b"s3cret");
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(parse_digest(&hex, "f").unwrap(), d);
        assert!(parse_digest("abc", "f").is_err());
        assert!(parse_digest(&"g".repeat(64), "f").is_err());
        assert!(constant_time_eq(&d, &d));
        let mut other = d;
        other[31] ^= 1;
        assert!(!constant_time_eq(&d, &other));
    }
}
