//! The decision on one DNS query, before anything leaves: which questions
//! may be forwarded, for which client role, and how their answers are then
//! judged. Pure: no I/O.
//!
//! Only [`decide`] makes an [`Admission`], and the forwarder takes nothing
//! else: a question refused here cannot be sent upstream in any form.

use hickory_proto::rr::RecordType;

use crate::policy::{DenyReason, Mode, Policy, RoleId};
use crate::target::DomainName;

use super::rules::DnsRules;

/// One question, parsed strictly: a normalised name and its type (class IN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub name: DomainName,
    pub qtype: RecordType,
}

/// Why a question was admitted; the answer is judged accordingly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmittedBy {
    /// A domain rule of the role matches the name.
    Domain,
    /// `dns.always_answer` lists the name.
    AlwaysAnswer,
    /// A CIDR-only admission (`allow.resolve_unlisted_names`): the answer
    /// is returned only when every address is inside the role's CIDR rules.
    Cidr,
    /// The role is in open mode.
    Open,
    /// Not on the allow-list, but the role is in report mode.
    ReportOnly,
}

impl AdmittedBy {
    /// The reason label of an answered query.
    pub const fn as_str(self) -> &'static str {
        match self {
            AdmittedBy::Domain => "domain",
            AdmittedBy::AlwaysAnswer => "always-answer",
            AdmittedBy::Cidr => "cidr",
            AdmittedBy::Open => "open",
            AdmittedBy::ReportOnly => "report-only",
        }
    }
}

/// Why a query was not answered from upstream. One code per variant, shared
/// by the decision line and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsReason {
    /// The policy refuses the name, the client, or an address or name in
    /// the answer (the proxy's own reason codes).
    Policy(DenyReason),
    /// The query type is not forwarded for this name.
    TypeNotAllowed,
    /// The message is not a well-formed single-question query (FORMERR).
    Malformed,
    /// An opcode other than QUERY (NOTIMP).
    NotImplemented,
    /// The client is over its rate or in-flight limit, or the listener is full.
    OverLimit,
    /// No upstream resolver answered in time.
    UpstreamTimeout,
    /// The upstream failed (network error, bad or mismatched answer, SERVFAIL).
    UpstreamFailed,
    /// The answer does not fit `dns.listener.max_message_bytes`.
    AnswerTooLarge,
}

impl DnsReason {
    /// The reason code.
    pub const fn as_str(self) -> &'static str {
        match self {
            DnsReason::Policy(reason) => reason.as_str(),
            DnsReason::TypeNotAllowed => "type-not-allowed",
            DnsReason::Malformed => "malformed",
            DnsReason::NotImplemented => "not-implemented",
            DnsReason::OverLimit => "over-limit",
            DnsReason::UpstreamTimeout => "upstream-timeout",
            DnsReason::UpstreamFailed => "upstream-failed",
            DnsReason::AnswerTooLarge => "answer-too-large",
        }
    }

    /// True for a refusal by policy (answered REFUSED), as opposed to a
    /// failure (SERVFAIL) or bad input.
    pub const fn is_refusal(self) -> bool {
        matches!(self, DnsReason::Policy(_) | DnsReason::TypeNotAllowed)
    }
}

/// Permission to forward one question upstream, and how to judge its
/// answer. Only [`decide`] constructs one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    question: Question,
    role: RoleId,
    by: AdmittedBy,
}

impl Admission {
    /// The question as checked: exactly what may be asked upstream.
    pub fn question(&self) -> &Question {
        &self.question
    }

    /// The role the question was decided for.
    pub fn role(&self) -> RoleId {
        self.role
    }

    /// Why it was admitted.
    pub fn by(&self) -> AdmittedBy {
        self.by
    }
}

/// The decision on a question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Forward(Admission),
    Refuse(DnsReason),
}

/// Types answered for any admitted name.
const ADDRESS_AND_SERVICE_TYPES: [RecordType; 5] =
    [RecordType::A, RecordType::AAAA, RecordType::CNAME, RecordType::HTTPS, RecordType::SVCB];

/// Decides whether `question` from a client of `role` may be forwarded.
///
/// In order: names denied before resolution (metadata and the like), the
/// role's own deny entries, the query type, then the admission: the role's
/// domain rules or `dns.always_answer`, open mode, a CIDR-only role that
/// resolves unlisted names (address queries only), report mode. Everything
/// else is refused without a query.
pub fn decide(policy: &Policy, rules: &DnsRules, role_id: RoleId, question: &Question) -> Verdict {
    let name = &question.name;
    if let Some(kind) = policy.denied_name(name) {
        return Verdict::Refuse(DnsReason::Policy(DenyReason::DeniedName(kind)));
    }
    let role = policy.role(role_id);
    if role.denies_name(name) {
        return Verdict::Refuse(DnsReason::Policy(DenyReason::DeniedByRole));
    }
    let always = rules.always_answers(name);
    let type_allowed = match question.qtype {
        RecordType::PTR => always,
        t => ADDRESS_AND_SERVICE_TYPES.contains(&t) || rules.allows_type(role.name(), t),
    };
    if !type_allowed {
        return Verdict::Refuse(DnsReason::TypeNotAllowed);
    }
    let admit = |by| Verdict::Forward(Admission { question: question.clone(), role: role_id, by });
    if role.allows_name(name) {
        return admit(AdmittedBy::Domain);
    }
    if always {
        return admit(AdmittedBy::AlwaysAnswer);
    }
    let address_query = matches!(question.qtype, RecordType::A | RecordType::AAAA);
    match role.mode() {
        Mode::Open => admit(AdmittedBy::Open),
        _ if address_query && role.admits_unlisted_names_by_address() => admit(AdmittedBy::Cidr),
        Mode::Report => admit(AdmittedBy::ReportOnly),
        _ => Verdict::Refuse(DnsReason::Policy(DenyReason::NotAllowListed)),
    }
}
