//! Plain HTTP inside a CONNECT tunnel: the plain-text analogue of the SNI
//! check. Clients such as undici's `EnvHttpProxyAgent` tunnel `http://` URLs
//! with `CONNECT host:80`. A tunnel whose first bytes start an HTTP/1
//! request is followed request by request: every head is parsed and must
//! name the CONNECT host (in `Host` and in an absolute-form target); one
//! that names another host gets `403 host-mismatch`, after the answers to
//! the requests before it, and the tunnel closes.
//!
//! Only heads are handled one by one. Bodies move as an opaque tunnel's
//! bytes do (spliced between two TCP sockets, copied in large reads
//! otherwise), as far as their framing says; responses are read only for
//! where each ends, so a refusal can follow the answers before it and a
//! 101 can turn the tunnel raw.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::copy::{Activity, Half, RelayCounts, RelayEnd};
use super::feed::Feed;
use super::http_frames::{answer_bytes, names_target, parse_request, parse_response, pass_body, Body, BodyError, RequestHead, ResponseHead};
use crate::access_log::Outcome;
use crate::proxy::entrance::framing::{check_head, Entrance, Refusal};
use crate::proxy::error::{ClientError, ProxyError, ERROR_HEADER};
use crate::proxy::respond::{raw_answer, Answer};
use crate::target::Target;

/// What a plain-HTTP tunnel connects: the CONNECT target every request
/// must name, and what its deny answers say besides (the client's role and
/// the operator's line for it).
#[derive(Debug, Clone)]
pub struct Ends {
    pub target: Target,
    pub role: Arc<str>,
    pub deny_message: Option<String>,
}

/// The bounds of a plain-HTTP tunnel.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// For each request head, from its first byte.
    pub header: Duration,
    /// With no byte moving either way (a stalled body, an idle tunnel).
    pub idle: Duration,
    /// Bytes of one request head, as `limits.max_request_head_bytes`.
    pub max_head: usize,
    /// Bytes of one response head, as `limits.max_response_head_bytes`.
    pub max_response_head: usize,
}

/// Serves a tunnel that started with plain HTTP: `early` (the bytes already
/// read) and the rest of `client` are read as HTTP/1 requests, each head
/// framed as strictly as on the proxy port ([`check_head`]), checked
/// against the target and sent to `upstream` without the client's proxy
/// credentials or the headers its `Connection` names. Bytes either way are
/// counted into `counts` as they move. Returns how the tunnel ended when
/// it was refused: malformed, or `host-mismatch` once a request named
/// another host.
pub async fn serve<C, U>(client: C, early: Vec<u8>, upstream: U, ends: Ends, limits: Limits, counts: &RelayCounts) -> Result<(), Outcome>
where
    C: RelayEnd,
    U: RelayEnd,
{
    let (client_read, mut client_write) = client.halves();
    let (up_read, mut up_write) = upstream.halves();
    let mut requests = Feed::new(client_read, early);
    let mut responses = Feed::new(up_read, Vec::new());
    let exchange = Exchange::default();
    let activity = Activity::new();
    let forward = async {
        tokio::select! {
            _ = forward_requests(&mut requests, &mut up_write, &exchange, &ends, &limits, counts, &activity) => {}
            _ = exchange.stop.notified() => {}
        }
    };
    let deliver = deliver_responses(&mut responses, &mut client_write, &exchange, &limits, counts, &activity);
    tokio::select! {
        (_, delivered) = async { tokio::join!(forward, deliver) } => delivered,
        outcome = exchange.aborted() => Err(outcome),
        _ = activity.idle_for(limits.idle) => {
            tracing::debug!("plain-HTTP tunnel idle timeout");
            Ok(())
        }
    }
}

/// The code of an upstream that answered a request with no usable response.
const UPSTREAM_ERROR: &str = "upstream-error";

/// What the response side waits for next, in request order.
enum Awaited {
    /// The response to a request sent upstream.
    Response { head_method: bool, upgrade: bool },
    /// The end of the tunnel, after the responses queued before it: the
    /// answer to write (none for a head that timed out) and the outcome.
    End { answer: Vec<u8>, outcome: Outcome },
}

/// What the two directions of a plain-HTTP tunnel tell each other.
#[derive(Default)]
struct Exchange {
    awaited: Mutex<VecDeque<Awaited>>,
    /// Something was queued in `awaited`.
    queued: Notify,
    /// Whether the origin switched protocols, for a request that asked.
    switched: Mutex<Option<bool>>,
    answered: Notify,
    /// The response side is done: requests stop too.
    stop: Notify,
    /// A body broke its framing: the tunnel ends at once.
    abort: Mutex<Option<Outcome>>,
    aborting: Notify,
}

impl Exchange {
    fn push(&self, awaited: Awaited) {
        self.awaited.lock().expect("never poisoned: no panics under the lock").push_back(awaited);
        self.queued.notify_one();
    }

    fn end(&self, answer: Vec<u8>, outcome: Outcome) {
        self.push(Awaited::End { answer, outcome });
    }

    /// The head of the queue, as (is an end, asked HEAD, asked upgrade).
    fn front(&self) -> Option<(bool, bool, bool)> {
        let awaited = self.awaited.lock().expect("never poisoned: no panics under the lock");
        awaited.front().map(|a| match a {
            Awaited::Response { head_method, upgrade } => (false, *head_method, *upgrade),
            Awaited::End { .. } => (true, false, false),
        })
    }

    fn pop(&self) -> Option<Awaited> {
        let mut awaited = self.awaited.lock().expect("never poisoned: no panics under the lock");
        let front = awaited.pop_front();
        if awaited.is_empty() {
            awaited.shrink_to_fit();
        }
        front
    }

    fn answer_upgrade(&self, switched: bool) {
        *self.switched.lock().expect("never poisoned: no panics under the lock") = Some(switched);
        self.answered.notify_one();
    }

    async fn upgrade_answered(&self) -> bool {
        loop {
            if let Some(switched) = self.switched.lock().expect("never poisoned: no panics under the lock").take() {
                return switched;
            }
            self.answered.notified().await;
        }
    }

    fn abort_with(&self, outcome: Outcome) {
        *self.abort.lock().expect("never poisoned: no panics under the lock") = Some(outcome);
        self.aborting.notify_one();
    }

    async fn aborted(&self) -> Outcome {
        loop {
            if let Some(outcome) = *self.abort.lock().expect("never poisoned: no panics under the lock") {
                return outcome;
            }
            self.aborting.notified().await;
        }
    }
}

/// The client-to-upstream direction: each head read, checked and sent on,
/// then its body moved. A refused request queues the answer and stops
/// reading; the end of the client's stream is passed on as a half-close.
async fn forward_requests<R, W>(
    requests: &mut Feed<R>,
    upstream: &mut W,
    exchange: &Exchange,
    ends: &Ends,
    limits: &Limits,
    counts: &RelayCounts,
    activity: &Activity,
) where
    R: AsyncRead + Unpin + Half,
    W: AsyncWrite + Unpin + Half,
{
    loop {
        let head = match read_request_head(requests, limits, activity).await {
            Ok(Some(head)) => head,
            Ok(None) => break,
            Err(refusal) => return exchange.end(refusal_answer(refusal), Outcome::Refused(refusal)),
        };
        if let Err(refused) = admit_head(&head, ends) {
            let (answer, outcome) = *refused;
            return exchange.end(answer, outcome);
        }
        requests.consume(head.len);
        counts.sent.fetch_add(head.len as u64, Ordering::Relaxed);
        exchange.push(Awaited::Response { head_method: head.head_method, upgrade: head.upgrade });
        let Ok(body) = send_head(requests, upstream, &head, counts).await else { break };
        // Boxed, like every body move here: only a tunnel moving a body holds
        // the relay's futures, an idle one waits for a head in a small one.
        match Box::pin(pass_body(requests, upstream, body, limits.max_head, &counts.sent, activity)).await {
            Ok(()) => {}
            Err(BodyError::Malformed) => return exchange.abort_with(Outcome::Refused(Refusal::MalformedBody)),
            Err(BodyError::Io) => break,
        }
        if upstream.flush().await.is_err() {
            break;
        }
        if head.upgrade && exchange.upgrade_answered().await {
            Box::pin(requests.pass_to_end(upstream, &counts.sent, activity)).await;
            return;
        }
        requests.settle();
    }
    let _ = upstream.shutdown().await;
}

/// Reads the next request head; `Ok(None)` when the client's stream ends
/// first. `limits.header` runs from the head's first byte (blank lines
/// between requests, which hyper skips too, start nothing).
async fn read_request_head<R>(requests: &mut Feed<R>, limits: &Limits, activity: &Activity) -> Result<Option<RequestHead>, Refusal>
where
    R: AsyncRead + Unpin + Half,
{
    let mut deadline = None;
    loop {
        let bytes = requests.buffered();
        if deadline.is_none() && bytes.iter().any(|&b| b != b'\r' && b != b'\n') {
            deadline = Some(tokio::time::Instant::now() + limits.header);
        }
        if !bytes.is_empty() {
            if let Some(head) = parse_request(bytes)? {
                return Ok(Some(head));
            }
        }
        if bytes.len() >= limits.max_head {
            return Err(Refusal::HeadTooLarge);
        }
        let read = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, requests.fill(limits.max_head)).await.map_err(|_| Refusal::HeadTimeout)?,
            None => requests.fill(limits.max_head).await,
        };
        match read {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => activity.touch(),
        }
    }
}

/// The proxy port's checks on one head, then the CONNECT target's; a
/// refused head gets its answer and the tunnel's outcome.
fn admit_head(head: &RequestHead, ends: &Ends) -> Result<(), Box<(Vec<u8>, Outcome)>> {
    let host = ends.target.host.to_string();
    let answer = Answer {
        target: Some((&host, ends.target.port)),
        role: Some(&ends.role),
        deny_message: ends.deny_message.as_deref(),
        denied_addr: None,
        json: crate::proxy::respond::accepts_json(head.request.headers().get(http::header::ACCEPT)),
        close: true,
    };
    let refused = match check_head(&head.request, head.conflicting, Entrance::Tunnel) {
        Err(refusal) => ProxyError::from(ClientError::Refused(refusal)),
        Ok(()) => match names_target(&head.request, &ends.target) {
            Err(reason) => ProxyError::Denied(reason),
            Ok(()) => return Ok(()),
        },
    };
    Err(Box::new((answer_bytes(refused.to_response(&answer)), refused.outcome())))
}

/// What a refusal found before a head parsed answers: the statuses hyper
/// answers with on the proxy port, none for a head that timed out.
fn refusal_answer(refusal: Refusal) -> Vec<u8> {
    let status = match refusal {
        Refusal::HeadTimeout => return Vec::new(),
        Refusal::HeadTooLarge => http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        Refusal::UriTooLong => http::StatusCode::URI_TOO_LONG,
        _ => http::StatusCode::BAD_REQUEST,
    };
    raw_answer(status, ERROR_HEADER, refusal.as_str(), "the request could not be read").into_bytes()
}

/// Writes the forwarded head, with a small body that is buffered already
/// in the same write; returns what is left of the body.
async fn send_head<R, W>(requests: &mut Feed<R>, upstream: &mut W, head: &RequestHead, counts: &RelayCounts) -> std::io::Result<Body>
where
    R: AsyncRead + Unpin + Half,
    W: AsyncWrite + Unpin + Half,
{
    match head.body {
        Body::Sized(n) if n > 0 && n <= requests.buffered().len() as u64 && n <= 16 * 1024 => {
            let n = n as usize;
            let mut out = Vec::with_capacity(head.forwarded.len() + n);
            out.extend_from_slice(&head.forwarded);
            out.extend_from_slice(&requests.buffered()[..n]);
            upstream.write_all(&out).await?;
            requests.consume(n);
            counts.sent.fetch_add(n as u64, Ordering::Relaxed);
            Ok(Body::Sized(0))
        }
        _ => upstream.write_all(&head.forwarded).await.map(|()| head.body),
    }
}

/// The upstream-to-client direction: responses relayed as bytes, each head
/// read for where its body ends; a queued end is written after the
/// responses before it; after a 101 the rest is relayed raw. Returns the
/// tunnel's outcome when it was refused.
async fn deliver_responses<R, W>(
    responses: &mut Feed<R>,
    client: &mut W,
    exchange: &Exchange,
    limits: &Limits,
    counts: &RelayCounts,
    activity: &Activity,
) -> Result<(), Outcome>
where
    R: AsyncRead + Unpin + Half,
    W: AsyncWrite + Unpin + Half,
{
    let ended = deliver_until_end(responses, client, exchange, limits, counts, activity).await;
    if !matches!(ended, Ended::Switched) {
        let _ = client.shutdown().await;
        exchange.stop.notify_one();
    }
    match ended {
        Ended::Refused(outcome) => Err(outcome),
        _ => Ok(()),
    }
}

/// How the response side ended.
enum Ended {
    /// The upstream closed, or a stream failed.
    Closed,
    /// A queued refusal was answered.
    Refused(Outcome),
    /// The tunnel turned raw after a 101 and is done.
    Switched,
}

/// The response loop of [`deliver_responses`], until the tunnel's end.
async fn deliver_until_end<R, W>(
    responses: &mut Feed<R>,
    client: &mut W,
    exchange: &Exchange,
    limits: &Limits,
    counts: &RelayCounts,
    activity: &Activity,
) -> Ended
where
    R: AsyncRead + Unpin + Half,
    W: AsyncWrite + Unpin + Half,
{
    loop {
        let front = exchange.front();
        if let Some((true, _, _)) = front {
            let Some(Awaited::End { answer, outcome }) = exchange.pop() else { return Ended::Closed };
            if !answer.is_empty() && client.write_all(&answer).await.is_ok() {
                counts.received.fetch_add(answer.len() as u64, Ordering::Relaxed);
            }
            return Ended::Refused(outcome);
        }
        if responses.buffered().is_empty() && front.is_none() {
            tokio::select! {
                read = responses.fill(limits.max_response_head) => match read {
                    Ok(0) | Err(_) => return Ended::Closed,
                    Ok(_) => activity.touch(),
                },
                _ = exchange.queued.notified() => continue,
            }
        }
        // A response nothing asked for (an origin's 408 before it closes)
        // is framed as an answer to a GET.
        let (_, head_method, upgrade) = front.unwrap_or_default();
        let Some(head) = read_response_head(responses, head_method, limits, activity).await else {
            // As on the proxy port: a request the upstream did not answer
            // with HTTP gets a 502.
            if front.is_none() {
                return Ended::Closed;
            }
            let answer = raw_answer(http::StatusCode::BAD_GATEWAY, ERROR_HEADER, UPSTREAM_ERROR, "the destination sent no usable response");
            if client.write_all(answer.as_bytes()).await.is_ok() {
                counts.received.fetch_add(answer.len() as u64, Ordering::Relaxed);
            }
            return Ended::Refused(Outcome::Error(UPSTREAM_ERROR));
        };
        let interim = (100..200).contains(&head.status) && head.status != 101;
        if !interim && front.is_some() {
            exchange.pop();
        }
        if head.status == 101 && !upgrade {
            tracing::debug!("plain-HTTP tunnel: 101 to a request that asked for no upgrade");
            return Ended::Closed;
        }
        let Ok(body) = send_response_head(responses, client, &head, counts).await else { return Ended::Closed };
        if head.status == 101 {
            exchange.answer_upgrade(true);
            Box::pin(responses.pass_to_end(client, &counts.received, activity)).await;
            return Ended::Switched;
        }
        if upgrade && !interim {
            exchange.answer_upgrade(false);
        }
        if let Some(body) = body {
            let passed = Box::pin(pass_body(responses, client, body, limits.max_response_head, &counts.received, activity)).await;
            if passed.is_err() || body == Body::ToClose {
                return Ended::Closed;
            }
        }
        if client.flush().await.is_err() {
            return Ended::Closed;
        }
        responses.settle();
    }
}

/// Reads the next response head; `None` when the upstream closes before
/// one is complete, or sends what is not one.
async fn read_response_head<R>(responses: &mut Feed<R>, head_method: bool, limits: &Limits, activity: &Activity) -> Option<ResponseHead>
where
    R: AsyncRead + Unpin + Half,
{
    loop {
        match parse_response(responses.buffered(), head_method) {
            Ok(Some(head)) => return Some(head),
            Ok(None) if responses.buffered().len() < limits.max_response_head => {}
            _ => {
                tracing::debug!("plain-HTTP tunnel: the upstream sent no usable response head");
                return None;
            }
        }
        match responses.fill(limits.max_response_head).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => activity.touch(),
        }
    }
}

/// Writes a response head, with its body when that is small and buffered
/// already, in one write; returns what is left of the body.
async fn send_response_head<R, W>(
    responses: &mut Feed<R>,
    client: &mut W,
    head: &ResponseHead,
    counts: &RelayCounts,
) -> std::io::Result<Option<Body>>
where
    R: AsyncRead + Unpin + Half,
    W: AsyncWrite + Unpin + Half,
{
    let (mut len, mut body) = (head.len, head.body);
    if let Some(Body::Sized(n)) = head.body {
        if n <= 16 * 1024 && (head.len as u64 + n) <= responses.buffered().len() as u64 {
            len += n as usize;
            body = None;
        }
    }
    client.write_all(&responses.buffered()[..len]).await?;
    responses.consume(len);
    counts.received.fetch_add(len as u64, Ordering::Relaxed);
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A client that is no TCP socket (the TLS listener's, here a duplex
    /// stream) is served through the copy path: a large body arrives
    /// intact, and a request naming another host gets its 403 behind it.
    #[tokio::test]
    async fn a_client_that_is_no_socket_is_served_by_copying() {
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = tokio::net::TcpStream::connect(origin.local_addr().unwrap()).await.unwrap();
        let sent = body.clone();
        tokio::spawn(async move {
            let (mut s, _) = origin.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                if s.read(&mut byte).await.unwrap() == 0 {
                    return;
                }
                head.push(byte[0]);
            }
            s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", sent.len()).as_bytes()).await.unwrap();
            s.write_all(&sent).await.unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        });
        let (mut client, proxy_side) = tokio::io::duplex(16 * 1024);
        let ends = Ends { target: Target::parse_authority("a.test:80").unwrap(), role: "default".into(), deny_message: None };
        let limits = Limits { header: Duration::from_secs(5), idle: Duration::from_secs(5), max_head: 8192, max_response_head: 8192 };
        let served = tokio::spawn(async move {
            let counts = RelayCounts::default();
            let first = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\nGET / HTTP/1.1\r\nHost: b.test\r\n\r\n".to_vec();
            let outcome = serve(proxy_side, first, upstream, ends, limits, &counts).await;
            (outcome, counts.get())
        });
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n";
        assert!(got.starts_with(head) && got[head.len()..head.len() + body.len()] == body[..], "the body intact");
        let refusal = String::from_utf8_lossy(&got[head.len() + body.len()..]).into_owned();
        assert!(refusal.starts_with("HTTP/1.1 403 Forbidden (portcullis: host-mismatch)\r\n"), "{refusal}");
        let (outcome, (_, down)) = served.await.unwrap();
        assert_eq!(outcome, Err(Outcome::Deny(crate::policy::DenyReason::HostMismatch)));
        assert_eq!(down, got.len() as u64, "every byte to the client counted");
    }
}
