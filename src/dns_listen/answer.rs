//! Judging an upstream answer before the client sees it, like a dial
//! decision: only the chain that starts at the question's name is kept,
//! every name on it is judged, A and AAAA addresses are checked against the
//! always-denied ranges (and, for a CIDR-only admission, the role's CIDR
//! rules), and HTTPS/SVCB records lose their `ech` parameter.

use std::net::IpAddr;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::svcb::{IpHint, SvcParamKey, SvcParamValue, SVCB};
use hickory_proto::rr::rdata::HTTPS;
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::policy::ranges::RangeKind;
use crate::policy::{DenyReason, Policy};
use crate::target::DomainName;

use super::decide::{AdmittedBy, Admission, DnsReason};

/// The longest CNAME chain followed from the question's name.
const MAX_CHAIN: usize = 8;

/// What the client gets: the upstream's code, the kept answer records and
/// the SOA of a negative answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authority: Vec<Record>,
}

/// Judges `upstream` (already matched to the question) for `admission`;
/// TTLs are capped at `max_ttl`. An answer any part of which is denied is
/// refused whole, with the reason.
pub fn judge(policy: &Policy, admission: &Admission, upstream: &Message, max_ttl: u32) -> Result<Judged, DnsReason> {
    let rcode = upstream.response_code();
    if !matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain) {
        return Err(DnsReason::UpstreamFailed);
    }
    let question = admission.question();
    let mut owner = Name::from_ascii(format!("{}.", question.name)).map_err(|_| DnsReason::UpstreamFailed)?;
    let mut answers = Vec::new();
    for _ in 0..MAX_CHAIN {
        let at_owner = |r: &&Record| r.name() == &owner && r.dns_class() == hickory_proto::rr::DNSClass::IN;
        let cname = upstream.answers().iter().filter(at_owner).find(|r| r.record_type() == RecordType::CNAME).cloned();
        if question.qtype != RecordType::CNAME {
            for record in upstream.answers().iter().filter(at_owner).filter(|r| r.record_type() == question.qtype) {
                if let Some(kept) = judge_record(policy, admission, record)? {
                    answers.push(kept);
                }
            }
        }
        let Some(cname) = cname else { break };
        let RData::CNAME(target) = cname.data() else { break };
        judge_name(policy, admission, &target.0)?;
        owner = target.0.clone();
        answers.push(cname);
        if question.qtype == RecordType::CNAME {
            break;
        }
    }
    let authority = upstream.name_servers().iter().filter(|r| r.record_type() == RecordType::SOA).cloned().collect();
    let mut judged = Judged { rcode, answers, authority };
    for record in judged.answers.iter_mut().chain(judged.authority.iter_mut()) {
        record.set_ttl(record.ttl().min(max_ttl));
    }
    Ok(judged)
}

/// A name met in the answer (a CNAME or SVCB target): denied when it is
/// denied before resolution or by the role's deny entries.
fn judge_name(policy: &Policy, admission: &Admission, name: &Name) -> Result<(), DnsReason> {
    let text = name.to_ascii();
    // A target the proxy could not even parse as a host name reaches nothing.
    let Ok(parsed) = DomainName::parse(&text) else { return Err(DnsReason::UpstreamFailed) };
    if let Some(kind) = policy.denied_name(&parsed) {
        return Err(DnsReason::Policy(DenyReason::DeniedName(kind)));
    }
    if policy.role(admission.role()).denies_name(&parsed) {
        return Err(DnsReason::Policy(DenyReason::DeniedByRole));
    }
    Ok(())
}

/// The address check of a dial decision, by how the question was admitted.
fn judge_addr(policy: &Policy, admission: &Admission, addr: IpAddr) -> Result<(), DenyReason> {
    let role = admission.role();
    match (policy.denied_range_for(role, addr), admission.by()) {
        // Cluster-internal names resolve into internal ranges by design;
        // only metadata and loopback answers are never handed out for them.
        (Some(kind @ (RangeKind::Metadata | RangeKind::Loopback)), AdmittedBy::AlwaysAnswer) => Err(DenyReason::DeniedRange(kind)),
        (Some(_), AdmittedBy::AlwaysAnswer) => Ok(()),
        (Some(kind), _) => Err(DenyReason::DeniedRange(kind)),
        (None, AdmittedBy::Cidr) if !policy.role(role).allows_addr(policy.transitions(), addr) => Err(DenyReason::NotAllowListed),
        (None, _) => Ok(()),
    }
}

/// One record of the question's type: an address is checked (a denied
/// one refuses the whole answer); an HTTPS/SVCB record loses `ech` and
/// denied address hints, or is dropped when its target is denied.
fn judge_record(policy: &Policy, admission: &Admission, record: &Record) -> Result<Option<Record>, DnsReason> {
    let addr = match record.data() {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        RData::HTTPS(https) => return Ok(service(policy, admission, &https.0).map(|s| with_data(record, RData::HTTPS(HTTPS(s))))),
        RData::SVCB(svcb) => return Ok(service(policy, admission, svcb).map(|s| with_data(record, RData::SVCB(s)))),
        _ => None,
    };
    if let Some(addr) = addr {
        judge_addr(policy, admission, addr).map_err(DnsReason::Policy)?;
    }
    Ok(Some(record.clone()))
}

fn with_data(record: &Record, data: RData) -> Record {
    Record::from_rdata(record.name().clone(), record.ttl(), data)
}

/// An HTTPS/SVCB record without its `ech` parameter and without hints the
/// policy denies; `None` when its target name is denied or `ech` is
/// mandatory for it.
fn service(policy: &Policy, admission: &Admission, svcb: &SVCB) -> Option<SVCB> {
    let target = svcb.target_name();
    if !target.is_root() && judge_name(policy, admission, target).is_err() {
        return None;
    }
    let mut params = Vec::with_capacity(svcb.svc_params().len());
    for (key, value) in svcb.svc_params() {
        let kept = match value {
            SvcParamValue::EchConfigList(_) => None,
            SvcParamValue::Mandatory(m) if m.0.contains(&SvcParamKey::EchConfigList) => return None,
            SvcParamValue::Ipv4Hint(hint) => {
                let kept: Vec<_> = hint.0.iter().copied().filter(|a| judge_addr(policy, admission, IpAddr::V4(a.0)).is_ok()).collect();
                (!kept.is_empty()).then_some(SvcParamValue::Ipv4Hint(IpHint(kept)))
            }
            SvcParamValue::Ipv6Hint(hint) => {
                let kept: Vec<_> = hint.0.iter().copied().filter(|a| judge_addr(policy, admission, IpAddr::V6(a.0)).is_ok()).collect();
                (!kept.is_empty()).then_some(SvcParamValue::Ipv6Hint(IpHint(kept)))
            }
            other => Some(other.clone()),
        };
        if let Some(value) = kept {
            params.push((*key, value));
        }
    }
    Some(SVCB::new(svcb.svc_priority(), target.clone(), params))
}
