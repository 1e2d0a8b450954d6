//! The DNS listener's query path on arbitrary bytes: a client's query and
//! an upstream's answer, split by the first byte. Never panics, and:
//! - a parsed question re-parses to itself (it is what gets forwarded);
//! - a question is forwarded only as exactly the question checked, and
//!   never for a name denied before resolution;
//! - a judged answer holds no address in an always-denied range for an
//!   admission by domain, no `ech` parameter, and only records of the
//!   question's type or CNAMEs;
//! - every encoded response fits the size limit it was given.
#![no_main]

use std::net::IpAddr;
use std::sync::OnceLock;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::svcb::SvcParamKey;
use hickory_proto::rr::{RData, RecordType};
use libfuzzer_sys::fuzz_target;
use portcullis::config::Config;
use portcullis::dns_listen::answer::judge;
use portcullis::dns_listen::decide::{decide, AdmittedBy, Verdict};
use portcullis::dns_listen::message::{encode, parse_query, rcode_of, response, size_limit};
use portcullis::dns_listen::DnsRules;
use portcullis::policy::Policy;
use portcullis::target::DomainName;

const CONFIG: &str = "dns:\n  always_answer: [\"*.svc.cluster.local\", \"*.in-addr.arpa\"]\n  allow_types: [TXT]\n\
roles:\n  default:\n    allow:\n      domains: [a.example, \"*.b.example\"]\n      cidrs: [8.8.8.0/24]\n";

fn compiled() -> &'static (Policy, DnsRules) {
    static COMPILED: OnceLock<(Policy, DnsRules)> = OnceLock::new();
    COMPILED.get_or_init(|| {
        let config = Config::from_yaml_str(CONFIG, "fuzz.yaml").expect("the fuzz config is valid");
        (portcullis::snapshot::compile_policy(&config).expect("compiles"), DnsRules::compile(&config).expect("compiles"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let (query_bytes, answer_bytes) = rest.split_at(usize::from(split).min(rest.len()));
    let (policy, rules) = compiled();
    let Ok(query) = parse_query(query_bytes) else { return };
    let question = &query.question;
    assert_eq!(DomainName::parse(question.name.as_str()).as_ref(), Ok(&question.name));
    let udp = split % 2 == 0;
    let limit = size_limit(Some(&query.message), udp, 1232);
    let role = policy.default_role();
    let admission = match decide(policy, rules, role, question) {
        Verdict::Forward(admission) => admission,
        Verdict::Refuse(reason) => {
            let reply = response(&query.message, rcode_of(reason), Vec::new(), Vec::new(), 1232);
            assert!(encode(&reply, limit, udp).is_some_and(|b| b.len() <= limit));
            return;
        }
    };
    assert_eq!(admission.question(), question);
    assert!(policy.denied_name(&question.name).is_none(), "a denied name was admitted");
    let Ok(upstream) = Message::from_vec(answer_bytes) else { return };
    let Ok(judged) = judge(policy, &admission, &upstream, 300) else { return };
    for record in &judged.answers {
        assert!(record.ttl() <= 300);
        assert!(record.record_type() == question.qtype || record.record_type() == RecordType::CNAME);
        let addr = match record.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            RData::HTTPS(h) => {
                assert!(h.0.svc_params().iter().all(|(k, _)| *k != SvcParamKey::EchConfigList));
                None
            }
            RData::SVCB(s) => {
                assert!(s.svc_params().iter().all(|(k, _)| *k != SvcParamKey::EchConfigList));
                None
            }
            _ => None,
        };
        if let (Some(addr), AdmittedBy::Domain) = (addr, admission.by()) {
            assert!(policy.denied_range_for(role, addr).is_none(), "{addr} returned");
        }
    }
    assert!(matches!(judged.rcode, ResponseCode::NoError | ResponseCode::NXDomain));
    let reply = response(&query.message, judged.rcode, judged.answers, judged.authority, 1232);
    if let Some(bytes) = encode(&reply, limit, udp) {
        assert!(bytes.len() <= limit);
    }
});
