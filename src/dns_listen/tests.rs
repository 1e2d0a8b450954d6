//! Table tests of the decision and of answer judging, without sockets.

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::svcb::{Alpn, EchConfigList, IpHint, Mandatory, SvcParamKey, SvcParamValue, SVCB};
use hickory_proto::rr::rdata::{self, HTTPS};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use super::answer::judge;
use super::decide::{decide, AdmittedBy, Admission, DnsReason, Question, Verdict};
use super::rules::DnsRules;
use crate::config::Config;
use crate::policy::ranges::RangeKind;
use crate::policy::{DenyReason, Policy};
use crate::target::DomainName;

const CONFIG: &str = "dns:\n  always_answer: [\"*.svc.cluster.local\", \"*.10.in-addr.arpa\"]\n  allow_types: [MX]\n  max_ttl: 60s\n\
roles:\n  default:\n    allow:\n      domains: [allowed.test, \"*.allowed.test\"]\n    deny:\n      domains: [blocked.allowed.test]\n\
\x20 open:\n    mode: open\n\
\x20 report:\n    mode: report\n    allow:\n      domains: [allowed.test]\n\
\x20 cidr:\n    allow:\n      cidrs: [11.0.0.0/24]\n\
\x20 literal:\n    allow:\n      cidrs: [11.0.0.0/24]\n      resolve_unlisted_names: false\n\
\x20 txt:\n    dns:\n      allow_types: [TXT, TYPE65280]\n    allow:\n      domains: [allowed.test]\n\
\x20 no-extra:\n    dns:\n      allow_types: []\n    allow:\n      domains: [allowed.test]\n";

fn compiled() -> (Policy, DnsRules) {
    let config = Config::from_yaml_str(CONFIG, "dns.yaml").unwrap();
    (crate::snapshot::compile_policy(&config).unwrap(), DnsRules::compile(&config).unwrap())
}

fn question(name: &str, qtype: RecordType) -> Question {
    Question { name: DomainName::parse(name).unwrap(), qtype }
}

fn admit(policy: &Policy, rules: &DnsRules, role: &str, name: &str, qtype: RecordType) -> Admission {
    match decide(policy, rules, policy.role_id(role).unwrap(), &question(name, qtype)) {
        Verdict::Forward(admission) => admission,
        Verdict::Refuse(reason) => panic!("{role} {name}: refused {reason:?}"),
    }
}

#[test]
fn questions_are_decided_before_anything_leaves() {
    use RecordType::*;
    let (policy, rules) = compiled();
    let refused = |r: DenyReason| Err(DnsReason::Policy(r));
    let cases: Vec<(&str, &str, RecordType, Result<AdmittedBy, DnsReason>)> = vec![
        ("default", "allowed.test", A, Ok(AdmittedBy::Domain)),
        ("default", "www.allowed.test", HTTPS, Ok(AdmittedBy::Domain)),
        ("default", "www.allowed.test", SVCB, Ok(AdmittedBy::Domain)),
        ("default", "allowed.test", CNAME, Ok(AdmittedBy::Domain)),
        ("default", "allowed.test", MX, Ok(AdmittedBy::Domain)),
        ("default", "allowed.test", TXT, Err(DnsReason::TypeNotAllowed)),
        ("default", "allowed.test", ANY, Err(DnsReason::TypeNotAllowed)),
        ("default", "allowed.test", NULL, Err(DnsReason::TypeNotAllowed)),
        ("default", "allowed.test", PTR, Err(DnsReason::TypeNotAllowed)),
        ("default", "4.3.2.10.in-addr.arpa", PTR, Ok(AdmittedBy::AlwaysAnswer)),
        ("default", "4.3.2.1.in-addr.arpa", PTR, Err(DnsReason::TypeNotAllowed)),
        ("default", "api.ns.svc.cluster.local", AAAA, Ok(AdmittedBy::AlwaysAnswer)),
        ("default", "blocked.allowed.test", A, refused(DenyReason::DeniedByRole)),
        ("default", "metadata.google.internal", A, refused(DenyReason::DeniedName(RangeKind::Metadata))),
        ("default", "localhost", AAAA, refused(DenyReason::DeniedName(RangeKind::Loopback))),
        ("default", "x.attacker.example", A, refused(DenyReason::NotAllowListed)),
        ("open", "anything.example", TXT, Err(DnsReason::TypeNotAllowed)),
        ("open", "anything.example", A, Ok(AdmittedBy::Open)),
        ("open", "metadata.google.internal", A, refused(DenyReason::DeniedName(RangeKind::Metadata))),
        ("report", "allowed.test", A, Ok(AdmittedBy::Domain)),
        ("report", "unlisted.example", A, Ok(AdmittedBy::ReportOnly)),
        ("cidr", "unlisted.example", A, Ok(AdmittedBy::Cidr)),
        ("cidr", "unlisted.example", AAAA, Ok(AdmittedBy::Cidr)),
        ("cidr", "unlisted.example", HTTPS, refused(DenyReason::NotAllowListed)),
        ("literal", "unlisted.example", A, refused(DenyReason::NotAllowListed)),
        ("literal", "api.ns.svc.cluster.local", A, Ok(AdmittedBy::AlwaysAnswer)),
        // A role's own dns.allow_types replaces the global list.
        ("txt", "allowed.test", TXT, Ok(AdmittedBy::Domain)),
        ("txt", "allowed.test", Unknown(65280), Ok(AdmittedBy::Domain)),
        ("txt", "allowed.test", MX, Err(DnsReason::TypeNotAllowed)),
        ("txt", "allowed.test", NULL, Err(DnsReason::TypeNotAllowed)),
        ("txt", "unlisted.example", TXT, refused(DenyReason::NotAllowListed)),
        ("txt", "metadata.google.internal", TXT, refused(DenyReason::DeniedName(RangeKind::Metadata))),
        ("no-extra", "allowed.test", MX, Err(DnsReason::TypeNotAllowed)),
        ("no-extra", "allowed.test", A, Ok(AdmittedBy::Domain)),
    ];
    for (role, name, qtype, want) in cases {
        let got = match decide(&policy, &rules, policy.role_id(role).unwrap(), &question(name, qtype)) {
            Verdict::Forward(admission) => {
                assert_eq!(admission.question(), &question(name, qtype), "the question forwarded is the one checked");
                Ok(admission.by())
            }
            Verdict::Refuse(reason) => Err(reason),
        };
        assert_eq!(got, want, "{role} {name} {qtype}");
    }
}

fn name(text: &str) -> Name {
    Name::from_ascii(format!("{text}.")).unwrap()
}

fn upstream(records: Vec<(&str, u32, RData)>, rcode: ResponseCode) -> Message {
    let mut message = Message::new();
    message.set_message_type(MessageType::Response).set_response_code(rcode);
    for (owner, ttl, data) in records {
        message.add_answer(Record::from_rdata(name(owner), ttl, data));
    }
    message
}

fn a(ip: &str) -> RData {
    RData::A(rdata::A(ip.parse().unwrap()))
}

fn cname(target: &str) -> RData {
    RData::CNAME(rdata::CNAME(name(target)))
}

/// What the client would see: the data of each answer, or the reason.
fn judged(policy: &Policy, admission: &Admission, records: Vec<(&str, u32, RData)>) -> Result<Vec<String>, DnsReason> {
    let message = upstream(records, ResponseCode::NoError);
    judge(policy, admission, &message, 60).map(|j| j.answers.iter().map(|r| format!("{} {}", r.ttl(), r.data())).collect())
}

#[test]
fn answers_are_judged_like_dial_decisions() {
    let (policy, rules) = compiled();
    let domain = admit(&policy, &rules, "default", "allowed.test", RecordType::A);
    let svc = admit(&policy, &rules, "default", "api.ns.svc.cluster.local", RecordType::A);
    let cidr = admit(&policy, &rules, "cidr", "unlisted.example", RecordType::A);
    let denied = |r| Err(DnsReason::Policy(r));
    let metadata = DenyReason::DeniedRange(RangeKind::Metadata);
    let cases: Vec<(&str, &Admission, Vec<(&str, u32, RData)>, Result<Vec<String>, DnsReason>)> = vec![
        ("plain, TTL capped", &domain, vec![("allowed.test", 300, a("11.0.0.10"))], Ok(vec!["60 11.0.0.10".into()])),
        ("rebinding to metadata", &domain, vec![("allowed.test", 5, a("11.0.0.10")), ("allowed.test", 5, a("169.254.169.254"))], denied(metadata)),
        ("a private address", &domain, vec![("allowed.test", 5, a("10.1.2.3"))], denied(DenyReason::DeniedRange(RangeKind::Private))),
        ("loopback", &domain, vec![("allowed.test", 5, a("127.0.0.1"))], denied(DenyReason::DeniedRange(RangeKind::Loopback))),
        (
            "a chain through an unlisted name",
            &domain,
            vec![("allowed.test", 5, cname("edge.cdn.example")), ("edge.cdn.example", 5, a("11.0.0.20"))],
            Ok(vec!["5 edge.cdn.example.".into(), "5 11.0.0.20".into()]),
        ),
        (
            "a chain into a denied name",
            &domain,
            vec![("allowed.test", 5, cname("metadata.google.internal")), ("metadata.google.internal", 5, a("11.0.0.20"))],
            denied(DenyReason::DeniedName(RangeKind::Metadata)),
        ),
        (
            "records off the chain are dropped",
            &domain,
            vec![("allowed.test", 5, a("11.0.0.10")), ("evil.example", 5, a("11.0.0.99")), ("other.allowed.test", 5, a("11.0.0.98"))],
            Ok(vec!["5 11.0.0.10".into()]),
        ),
        ("always_answer: internal addresses pass", &svc, vec![("api.ns.svc.cluster.local", 5, a("10.96.0.10"))], Ok(vec!["5 10.96.0.10".into()])),
        ("always_answer: metadata never", &svc, vec![("api.ns.svc.cluster.local", 5, a("169.254.169.254"))], denied(metadata)),
        ("cidr: inside", &cidr, vec![("unlisted.example", 5, a("11.0.0.40"))], Ok(vec!["5 11.0.0.40".into()])),
        ("cidr: one outside", &cidr, vec![("unlisted.example", 5, a("11.0.0.40")), ("unlisted.example", 5, a("12.0.0.1"))], denied(DenyReason::NotAllowListed)),
    ];
    for (what, admission, records, want) in cases {
        assert_eq!(judged(&policy, admission, records), want, "{what}");
    }
    let failed = upstream(Vec::new(), ResponseCode::ServFail);
    assert_eq!(judge(&policy, &domain, &failed, 60), Err(DnsReason::UpstreamFailed));
    let nx = upstream(Vec::new(), ResponseCode::NXDomain);
    assert_eq!(judge(&policy, &domain, &nx, 60).map(|j| j.rcode), Ok(ResponseCode::NXDomain));
}

#[test]
fn service_records_lose_ech_and_denied_hints() {
    let (policy, rules) = compiled();
    let admission = admit(&policy, &rules, "default", "allowed.test", RecordType::HTTPS);
    let hints = |ips: &[&str]| SvcParamValue::Ipv4Hint(IpHint(ips.iter().map(|i| rdata::A(i.parse().unwrap())).collect()));
    let ech = SvcParamValue::EchConfigList(EchConfigList(vec![0, 4, 1, 2, 3, 4]));
    let https = |target: &str, params: Vec<(SvcParamKey, SvcParamValue)>| RData::HTTPS(HTTPS(SVCB::new(1, Name::from_ascii(target).unwrap(), params)));
    let alpn = (SvcParamKey::Alpn, SvcParamValue::Alpn(Alpn(vec!["h2".into()])));
    let records = vec![
        ("allowed.test", 5, https(".", vec![alpn.clone(), (SvcParamKey::Ipv4Hint, hints(&["11.0.0.1", "169.254.169.254"])), (SvcParamKey::EchConfigList, ech.clone())])),
        ("allowed.test", 5, https("metadata.google.internal.", vec![alpn.clone()])),
        ("allowed.test", 5, https(".", vec![(SvcParamKey::Mandatory, SvcParamValue::Mandatory(Mandatory(vec![SvcParamKey::EchConfigList]))), (SvcParamKey::EchConfigList, ech)])),
        ("allowed.test", 5, https(".", vec![alpn, (SvcParamKey::Ipv4Hint, hints(&["10.0.0.1"]))])),
    ];
    let got = judged(&policy, &admission, records).unwrap();
    // (hickory displays each value with a trailing comma)
    assert_eq!(got, ["5 1 . alpn=h2, ipv4hint=11.0.0.1,", "5 1 . alpn=h2,"]);
}

/// The listener's config keys are checked with file, line and field.
#[test]
fn bad_dns_listener_config_is_refused_with_its_line() {
    let cases: [(&str, usize, &str); 7] = [
        ("dns:\n  allow_types: [MX, BOGUS]\nroles:\n  default: {}\n", 2, "dns.allow_types: \"BOGUS\" is not a DNS record type"),
        ("dns:\n  allow_types: [ANY]\nroles:\n  default: {}\n", 2, "ANY, AXFR, IXFR, OPT never are"),
        ("roles:\n  default: {}\n  ci:\n    dns:\n      allow_types: [TXT, TXTX]\n", 5, "roles.ci.dns.allow_types: \"TXTX\" is not a DNS record type"),
        ("roles:\n  ci:\n    dns:\n      allow_types: [AXFR]\n", 4, "roles.ci.dns.allow_types: \"AXFR\" is not forwarded"),
        ("roles:\n  ci:\n    dns:\n      allow_type: [TXT]\n", 4, "unknown field `allow_type`"),
        ("dns:\n  listener:\n    max_pipeline: 3\nroles:\n  default: {}\n", 3, "unknown field `max_pipeline`"),
        ("roles:\n  default:\n    allow_ech: maybe\n", 3, "allow_ech"),
    ];
    for (text, line, reason) in cases {
        let err = Config::from_yaml_str(text, "bad.yaml").unwrap_err();
        assert!(err.to_string().contains(reason), "want {reason:?} in {err}");
        assert_eq!(err.line(), Some(line), "{err}");
    }
    let compile = |text: &str| {
        let config = Config::from_yaml_str(text, "c.yaml").unwrap();
        crate::snapshot::Snapshot::compile(&config, 1).map(|_| ()).unwrap_err().to_string()
    };
    let roles = "roles:\n  default: {}\n";
    assert!(compile(&format!("dns:\n  listener:\n    max_message_bytes: 100\n{roles}")).contains("dns.listener.max_message_bytes: 100 is below"));
    assert!(compile(&format!("dns:\n  listener:\n    max_tcp_pipeline: 0\n{roles}")).contains("dns.listener.max_tcp_pipeline: must be at least 1"));
    let looped = compile(&format!("dns_listen: 127.0.0.1:5353\ndns:\n  nameservers: [\"127.0.0.1:5353\"]\n{roles}"));
    assert!(looped.contains("is the DNS listener itself"), "{looped}");
}
