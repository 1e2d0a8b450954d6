//! The query sent upstream for an admitted question, as wire bytes built
//! from the checked question alone (no byte of the client's message), and
//! the check that an upstream datagram answers it.

use std::hash::{BuildHasher, Hasher};

use super::decide::{Admission, DnsReason};

/// The EDNS size advertised upstream (the DNS flag day 2020 default, which
/// avoids IP fragmentation).
pub const UPSTREAM_PAYLOAD: u16 = 1232;
/// The DNS header's length.
const HEADER: usize = 12;

/// One upstream query: a random id, recursion desired, the one question
/// (class IN) and EDNS without the DO bit (answers are rewritten, so
/// signatures could not be passed on anyway).
#[derive(Debug, Clone)]
pub struct UpstreamQuery {
    bytes: Vec<u8>,
    /// Where the question's name ends, and the question.
    name_end: usize,
    question_end: usize,
}

impl UpstreamQuery {
    /// The query for `admission`'s question, under a fresh random id.
    pub fn new(admission: &Admission) -> Result<Self, DnsReason> {
        let question = admission.question();
        let name = question.name.as_str();
        let mut bytes = Vec::with_capacity(HEADER + name.len() + 2 + 4 + 11);
        bytes.extend_from_slice(&random_id().to_be_bytes());
        // RD; one question, no answer or authority, one additional (OPT).
        bytes.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1]);
        for label in name.split('.') {
            // A parsed DomainName has none empty or over 63 bytes; checked again
            // because a wrong length byte would change the question asked.
            let len = u8::try_from(label.len()).ok().filter(|l| (1..=63).contains(l)).ok_or(DnsReason::UpstreamFailed)?;
            bytes.push(len);
            bytes.extend_from_slice(label.as_bytes());
        }
        bytes.push(0);
        let name_end = bytes.len();
        bytes.extend_from_slice(&u16::from(question.qtype).to_be_bytes());
        bytes.extend_from_slice(&[0, 1]);
        let question_end = bytes.len();
        // OPT: the root as owner, type 41, the payload size as class, a zero
        // TTL (extended rcode, version 0, DO clear), no data.
        bytes.extend_from_slice(&[0, 0, 41]);
        bytes.extend_from_slice(&UPSTREAM_PAYLOAD.to_be_bytes());
        bytes.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        Ok(UpstreamQuery { bytes, name_end, question_end })
    }

    /// The wire bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Gives the query another id (a new attempt, or an id free on its socket).
    pub fn set_id(&mut self, id: u16) {
        self.bytes[..2].copy_from_slice(&id.to_be_bytes());
    }

    /// True when `answer` is a response to this query: the same id, QR
    /// set, opcode QUERY, and the same single question (the name in any
    /// case, the same type and class).
    pub fn is_answered_by(&self, answer: &[u8]) -> bool {
        answer.get(..2) == Some(&self.bytes[..2]) && self.same_question(answer)
    }

    /// [`Self::is_answered_by`] but for the id (matched by the caller).
    pub fn same_question(&self, answer: &[u8]) -> bool {
        let (name, question) = (HEADER..self.name_end, self.name_end..self.question_end);
        answer.len() >= self.question_end
            && answer[2] & 0x80 != 0
            && (answer[2] >> 3) & 0x0f == 0
            && answer[4..6] == [0, 1]
            // The question's name is the answer's first: never compressed.
            && answer[name.clone()].eq_ignore_ascii_case(&self.bytes[name])
            && answer[question.clone()] == self.bytes[question]
    }
}

/// A query id no one off-path can predict: SipHash under the process's
/// random keys, over a counter.
pub fn random_id() -> u16 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    hasher.finish() as u16
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};

    use super::*;
    use crate::dns_listen::decide::{decide, Question, Verdict};

    fn query(name: &str, qtype: RecordType) -> UpstreamQuery {
        let config = crate::config::Config::from_yaml_str("roles:\n  default:\n    mode: open\n", "q.yaml").unwrap();
        let policy = crate::snapshot::compile_policy(&config).unwrap();
        let rules = crate::dns_listen::DnsRules::compile(&config).unwrap();
        let question = Question { name: crate::target::DomainName::parse(name).unwrap(), qtype };
        let Verdict::Forward(admission) = decide(&policy, &rules, policy.role_id("default").unwrap(), &question) else { panic!("admitted") };
        UpstreamQuery::new(&admission).unwrap()
    }

    fn response(id: u16, name: &str, qtype: RecordType, change: impl FnOnce(&mut Message)) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(id).set_message_type(MessageType::Response).set_op_code(OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        change(&mut m);
        m.to_vec().unwrap()
    }

    /// The bytes are the question as hickory reads it, with EDNS; only a
    /// response to that very question answers it.
    #[test]
    fn the_query_is_the_question_and_only_its_answer_matches() {
        let mut q = query("www.Allowed.test", RecordType::HTTPS);
        q.set_id(0x1234);
        let parsed = Message::from_vec(q.bytes()).unwrap();
        assert_eq!((parsed.id(), parsed.recursion_desired(), parsed.message_type()), (0x1234, true, MessageType::Query));
        assert_eq!(parsed.queries().len(), 1);
        assert_eq!(parsed.queries()[0].name().to_ascii(), "www.allowed.test.");
        assert_eq!(parsed.queries()[0].query_type(), RecordType::HTTPS);
        let edns = parsed.extensions().as_ref().expect("EDNS");
        assert_eq!((edns.max_payload(), edns.flags().dnssec_ok), (UPSTREAM_PAYLOAD, false));
        let cases: [(&str, Vec<u8>, bool); 7] = [
            ("the answer", response(0x1234, "www.allowed.test.", RecordType::HTTPS, |_| {}), true),
            ("the name in another case", response(0x1234, "WWW.allowed.TEST.", RecordType::HTTPS, |_| {}), true),
            ("another id", response(0x1235, "www.allowed.test.", RecordType::HTTPS, |_| {}), false),
            ("another name", response(0x1234, "www.allowed.tesu.", RecordType::HTTPS, |_| {}), false),
            ("another type", response(0x1234, "www.allowed.test.", RecordType::A, |_| {}), false),
            ("a query, not a response", response(0x1234, "www.allowed.test.", RecordType::HTTPS, |m| {
                m.set_message_type(MessageType::Query);
            }), false),
            ("two questions", response(0x1234, "www.allowed.test.", RecordType::HTTPS, |m| {
                m.add_query(Query::query(Name::root(), RecordType::A));
            }), false),
        ];
        for (what, answer, want) in cases {
            assert_eq!(q.is_answered_by(&answer), want, "{what}");
        }
        assert!(!q.is_answered_by(&q.bytes()[..5]), "short");
    }
}
