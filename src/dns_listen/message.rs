//! DNS messages at the listener's edge: a client's bytes parsed strictly
//! into one question, and every answer the listener sends encoded within
//! the client's size limit.

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Record, RecordType};

use crate::target::DomainName;

use super::decide::{DnsReason, Question};

/// The DNS header's length; shorter input cannot even be answered.
const HEADER: usize = 12;
/// The largest UDP answer to a client that sent no EDNS (RFC 1035 4.2.1).
const CLASSIC_UDP: usize = 512;

/// A client's query, parsed.
#[derive(Debug)]
pub struct Query {
    /// The message as received, to answer with its id, flags and question.
    pub message: Message,
    pub question: Question,
}

/// Why a client's bytes are not a query the listener decides.
#[derive(Debug)]
pub enum BadQuery {
    /// Not even a query header: dropped without an answer.
    Unanswerable,
    /// A query header with something wrong after it: answered with this
    /// reason's code (FORMERR, NOTIMP or REFUSED), echoing the id (and the
    /// question, when one was read).
    Answerable { id: u16, reason: DnsReason, parsed: Option<Box<Message>> },
}

/// Parses a client's bytes: a standard query (QR clear, opcode QUERY) with
/// exactly one question of class IN whose name is a host name, and no
/// answer or authority records.
pub fn parse_query(bytes: &[u8]) -> Result<Query, BadQuery> {
    // QR set (a response, perhaps reflected at us) is never answered.
    if bytes.len() < HEADER || bytes[2] & 0x80 != 0 {
        return Err(BadQuery::Unanswerable);
    }
    let id = u16::from_be_bytes([bytes[0], bytes[1]]);
    let bad = |reason, parsed: Option<Message>| BadQuery::Answerable { id, reason, parsed: parsed.map(Box::new) };
    let message = Message::from_vec(bytes).map_err(|_| bad(DnsReason::Malformed, None))?;
    if message.op_code() != OpCode::Query {
        return Err(bad(DnsReason::NotImplemented, None));
    }
    if message.queries().len() != 1 || !message.answers().is_empty() || !message.name_servers().is_empty() {
        return Err(bad(DnsReason::Malformed, None));
    }
    let q = &message.queries()[0];
    if q.query_class() != DNSClass::IN || q.query_type() == RecordType::OPT {
        return Err(bad(DnsReason::Malformed, Some(message)));
    }
    let qtype = q.query_type();
    match DomainName::parse(&q.name().to_ascii()) {
        Ok(name) => Ok(Query { question: Question { name, qtype }, message }),
        // Not a host name (the root, escaped bytes, an address-like last
        // label): nothing a role could admit.
        Err(_) => Err(bad(DnsReason::Policy(crate::policy::DenyReason::InvalidTarget), Some(message))),
    }
}

/// The response code a refusal or failure is answered with.
pub fn rcode_of(reason: DnsReason) -> ResponseCode {
    match reason {
        DnsReason::Policy(_) | DnsReason::TypeNotAllowed | DnsReason::OverLimit => ResponseCode::Refused,
        DnsReason::Malformed => ResponseCode::FormErr,
        DnsReason::NotImplemented => ResponseCode::NotImp,
        DnsReason::UpstreamTimeout | DnsReason::UpstreamFailed | DnsReason::AnswerTooLarge => ResponseCode::ServFail,
    }
}

/// A response to `query` (its id, RD flag and question) with `rcode`, the
/// given records, and EDNS when the query had it.
pub fn response(query: &Message, rcode: ResponseCode, answers: Vec<Record>, authority: Vec<Record>, max_message: u16) -> Message {
    let mut reply = Message::new();
    reply
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(rcode);
    reply.add_queries(query.queries().iter().cloned());
    reply.insert_answers(answers);
    reply.insert_name_servers(authority);
    if query.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(max_message.max(CLASSIC_UDP as u16));
        reply.set_edns(edns);
    }
    reply
}

/// A bare answer with `rcode` to a query that could not be parsed, echoing
/// only its id.
pub fn bare_response(id: u16, rcode: ResponseCode) -> Message {
    let mut reply = Message::new();
    reply.set_id(id).set_message_type(MessageType::Response).set_op_code(OpCode::Query).set_response_code(rcode);
    reply
}

/// How many bytes an answer to `query` may take: over UDP, 512 or the
/// client's EDNS size (never more than `max_message`); over TCP `max_message`.
pub fn size_limit(query: Option<&Message>, udp: bool, max_message: u16) -> usize {
    let max = usize::from(max_message);
    match query.and_then(|q| q.extensions().as_ref()) {
        _ if !udp => max,
        Some(edns) => usize::from(edns.max_payload()).clamp(CLASSIC_UDP, max),
        None => CLASSIC_UDP,
    }
}

/// Encodes `reply` within `limit` bytes: over UDP an answer too large is
/// sent truncated (TC, no records) so the client retries over TCP; over
/// TCP it is `None` (the caller answers SERVFAIL instead).
pub fn encode(reply: &Message, limit: usize, udp: bool) -> Option<Vec<u8>> {
    let bytes = reply.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    if !udp {
        return None;
    }
    let mut truncated = reply.truncate();
    truncated.set_truncated(true);
    truncated.to_vec().ok().filter(|b| b.len() <= limit)
}
