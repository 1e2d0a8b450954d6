//! "Credentials are never forwarded and never logged", through the real
//! binary: clients send valid, wrong and repeated Basic and Bearer
//! `Proxy-Authorization`, userinfo in the request target, and the proxy
//! authenticates to a parent with `credentials_env`. Afterwards every byte
//! the process wrote (decision log and its own events on stdout, anything on
//! stderr, at debug level), every response body the clients got (deny bodies
//! and what the origin echoed back), the metrics page, and what the parent
//! saw are searched for each secret and its base64 forms.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ALICE_PASSWORD: &str = "Sekr1t-basic-7f3a";
const ALICE_WRONG: &str = "Wr0ng-basic-91c2";
const TOKEN_HASHED: &str = "tok-valid-5d1e8b";
const TOKEN_FROM_ENV: &str = "tok-envvar-a83c4e";
const TOKEN_WRONG: &str = "tok-wrong-77aa02";
const URI_PASSWORD: &str = "Sekr1t-uri-0b9d";
const PARENT_SECRET: &str = "Par3nt-s3cret-c4";
const PARENT_WRONG: &str = "Par3nt-wr0ng-e6";
/// Secrets in a request's path and query: a deny body never repeats them.
const PATH_SECRET: &str = "pathsecret-3e9a1c";
const QUERY_SECRET: &str = "querysecret-b7d402";

fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// The forms a secret can leak in: as typed, and base64 of it alone and
/// as `user:secret`, without padding (a prefix match finds a padded copy).
fn leak_forms(user: &str, secret: &str) -> Vec<String> {
    let mut forms = vec![secret.to_string()];
    for text in [secret.to_string(), format!("{user}:{secret}")] {
        forms.push(b64(&text).trim_end_matches('=').to_string());
    }
    forms
}

/// Every secret of this file with every form it could leak in.
fn all_leak_forms() -> Vec<(&'static str, String)> {
    let secrets = [
        ("alice", ALICE_PASSWORD),
        ("alice", ALICE_WRONG),
        ("", TOKEN_HASHED),
        ("", TOKEN_FROM_ENV),
        ("", TOKEN_WRONG),
        ("alice", URI_PASSWORD),
        ("relay", PARENT_SECRET),
        ("relay", PARENT_WRONG),
        ("", PATH_SECRET),
        ("", QUERY_SECRET),
    ];
    secrets.iter().flat_map(|(user, secret)| leak_forms(user, secret).into_iter().map(move |f| (*secret, f))).collect()
}

/// Fails naming the secret, the form and where, with the text around it.
fn assert_no_secret(place: &str, bytes: &[u8]) {
    for (secret, form) in all_leak_forms() {
        if let Some(at) = bytes.windows(form.len()).position(|w| w == form.as_bytes()) {
            let around = String::from_utf8_lossy(&bytes[at.saturating_sub(200)..(at + form.len() + 200).min(bytes.len())]);
            panic!("{secret} leaked as {form:?} in {place}: ...{around}...");
        }
    }
}

/// `GET url` on a fresh connection with extra header lines; the whole
/// response as bytes (head and body) and its status.
async fn get_with(proxy: SocketAddr, url: &str, headers: &str) -> (u16, Vec<u8>) {
    let host = url.split('/').nth(2).unwrap();
    request(proxy, &format!("GET {url} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n")).await
}

async fn request(proxy: SocketAddr, head: &str) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let resp = read_response(&mut stream).await;
    let mut bytes = format!("{} {}\r\n", resp.status, resp.reason).into_bytes();
    for (name, value) in &resp.headers {
        bytes.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    bytes.extend_from_slice(&resp.body);
    (resp.status, bytes)
}

/// Keeps a response for the search, after checking its status.
fn expect(responses: &mut Vec<Vec<u8>>, (status, bytes): (u16, Vec<u8>), want: u16, what: &str) {
    assert_eq!(status, want, "{what}: {}", String::from_utf8_lossy(&bytes));
    responses.push(bytes);
}

/// A parent proxy that records every request head it is sent. It accepts
/// only `relay:PARENT_SECRET`; a wrong one gets 407 with a body that
/// repeats the head it got (a hostile parent echoing the credentials). A
/// CONNECT it accepts is relayed to the named address; a GET gets 200.
async fn start_parent() -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else { return };
            tokio::spawn(serve_parent(s, log.clone()));
        }
    });
    (addr, seen)
}

async fn serve_parent(mut s: TcpStream, log: Arc<Mutex<Vec<u8>>>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    log.lock().unwrap().extend_from_slice(&head);
    let text = String::from_utf8_lossy(&head).into_owned();
    let expected = format!("proxy-authorization: basic {}", b64(&format!("relay:{PARENT_SECRET}"))).to_lowercase();
    if !text.to_lowercase().lines().any(|l| l == expected) {
        let answer = format!("HTTP/1.1 407 Nope\r\nContent-Length: {}\r\n\r\n{text}", text.len());
        let _ = s.write_all(answer.as_bytes()).await;
        return;
    }
    let line = text.lines().next().unwrap_or_default();
    if let Some(authority) = line.strip_prefix("CONNECT ").and_then(|rest| rest.split(' ').next()) {
        let Ok(mut up) = TcpStream::connect(authority).await else { return };
        let _ = s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await;
        let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
    } else {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nparent ok").await;
    }
}

/// Who may go where: alice (Basic) and the two tokens (Bearer) to a.test;
/// the default role nowhere.
fn identity_yaml(dns: SocketAddr, port: u16) -> String {
    format!(
        "dns:\n  nameservers: [\"{dns}\"]\nallow_ranges: [127.0.0.1/32]\n\
         identity:\n  credentials:\n    - {{user: alice, password_sha256: \"{}\", role: team}}\n\
         \x20   - {{token_sha256: \"{}\", role: team}}\n    - {{token_env: PORTCULLIS_TEST_TEAM_TOKEN, role: team}}\n\
         roles:\n  default: {{}}\n  team:\n    allow:\n      domains: [a.test]\n      http_ports: [{port}]\n      connect_ports: [{port}]\n",
        sha256_hex(ALICE_PASSWORD),
        sha256_hex(TOKEN_HASHED),
    )
}

/// What the grep covers: the process output, the metrics page, and every
/// response, deny bodies included.
async fn assert_nothing_leaked(proxy: &BinaryProxy, responses: &[Vec<u8>]) {
    let (_, metrics) = get_with(proxy.admin, &format!("http://{}/metrics", proxy.admin), "").await;
    assert!(String::from_utf8_lossy(&metrics).contains("portcullis_requests_total"), "the metrics page was read");
    assert_no_secret("/metrics", &metrics);
    for (i, resp) in responses.iter().enumerate() {
        assert_no_secret(&format!("response {i}"), resp);
    }
    assert_no_secret("the process's stdout and stderr", &proxy.output.lock().unwrap());
}

#[tokio::test]
async fn client_credentials_never_reach_the_log_the_error_output_or_a_response() {
    let dns = start_dns(&[("a.test", &["127.0.0.1"]), ("b.test", &["127.0.0.1"])]).await;
    let origin = start_http_origin().await;
    let port = origin.port();
    let path = temp_file("credentials", "identity.yaml", "");
    let env = [("RUST_LOG", "debug"), ("PORTCULLIS_TEST_TEAM_TOKEN", TOKEN_FROM_ENV)];
    let proxy = BinaryProxy::spawn_with_env(&path, &identity_yaml(dns.addr, port), &env).await;
    let allowed = format!("http://a.test:{port}/headers");
    let unlisted = format!("http://b.test:{port}/headers");
    let auth = |scheme: &str, value: &str| format!("Proxy-Authorization: {scheme} {value}\r\n");
    let alice = auth("Basic", &b64(&format!("alice:{ALICE_PASSWORD}")));
    let alice_wrong = auth("Basic", &b64(&format!("alice:{ALICE_WRONG}")));
    let bearers = [auth("Bearer", TOKEN_HASHED), auth("Bearer", TOKEN_FROM_ENV)];
    let wrong_bearer = auth("Bearer", TOKEN_WRONG);
    let mut responses = Vec::new();

    // Valid credentials: allowed to a.test (the origin echoes the head it
    // got, so a forwarded credential would be in this body), denied
    // elsewhere and to the metadata address.
    for valid in [&alice, &bearers[0], &bearers[1]] {
        expect(&mut responses, get_with(proxy.addr, &allowed, valid).await, 200, "valid, allowed");
        expect(&mut responses, get_with(proxy.addr, &unlisted, valid).await, 403, "valid, not allow-listed");
        expect(&mut responses, get_with(proxy.addr, "http://169.254.169.254/latest/", valid).await, 403, "valid, metadata");
        let connect = format!("CONNECT a.test:{port} HTTP/1.1\r\nHost: a.test:{port}\r\n{valid}\r\n");
        expect(&mut responses, request(proxy.addr, &connect).await, 200, "valid CONNECT");
        let connect = format!("CONNECT b.test:{port} HTTP/1.1\r\nHost: b.test:{port}\r\n{valid}\r\n");
        expect(&mut responses, request(proxy.addr, &connect).await, 403, "valid CONNECT, not allow-listed");
    }
    // Wrong credentials, repeated (the repeat path answers with
    // Connection: close and rate-limits its log line), plain and CONNECT.
    for wrong in [&alice_wrong, &wrong_bearer] {
        for _ in 0..3 {
            expect(&mut responses, get_with(proxy.addr, &allowed, wrong).await, 407, "wrong");
            let connect = format!("CONNECT a.test:{port} HTTP/1.1\r\nHost: a.test:{port}\r\n{wrong}\r\n");
            expect(&mut responses, request(proxy.addr, &connect).await, 407, "wrong CONNECT");
        }
    }
    // Secrets in the path and query of refused requests: the deny bodies
    // (403 by range and by allow-list, 407, 400, and a Host mismatch inside
    // a plain-HTTP tunnel) never repeat them, and the log has no path.
    let secret_path = format!("/latest/meta-data/{PATH_SECRET}?token={QUERY_SECRET}");
    let metadata = format!("http://169.254.169.254{secret_path}");
    expect(&mut responses, get_with(proxy.addr, &metadata, &alice).await, 403, "metadata, secret path");
    expect(&mut responses, get_with(proxy.addr, &format!("http://b.test:{port}{secret_path}"), &alice).await, 403, "unlisted, secret path");
    expect(&mut responses, get_with(proxy.addr, &format!("http://a.test:{port}{secret_path}"), &wrong_bearer).await, 407, "407, secret path");
    let get = format!("GET http://alice:{URI_PASSWORD}@a.test:{port}{secret_path} HTTP/1.1\r\nHost: a.test:{port}\r\n\r\n");
    expect(&mut responses, request(proxy.addr, &get).await, 400, "400, secret path");
    let mut tunnel = TcpStream::connect(proxy.addr).await.unwrap();
    let connect = format!("CONNECT a.test:{port} HTTP/1.1\r\nHost: a.test:{port}\r\n{alice}\r\n");
    tunnel.write_all(connect.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut tunnel).await.status, 200);
    tunnel.write_all(format!("GET {secret_path} HTTP/1.1\r\nHost: b.test:{port}\r\n\r\n").as_bytes()).await.unwrap();
    let mismatch = read_response(&mut tunnel).await;
    assert_eq!((mismatch.status, mismatch.header("x-portcullis-deny")), (403, Some("host-mismatch")), "{}", mismatch.text());
    responses.push(mismatch.body.clone());
    drop(tunnel);

    // The same header twice, and a Basic value that is not user:password.
    let twice = format!("{alice}{alice}");
    let (status, bytes) = get_with(proxy.addr, &allowed, &twice).await;
    assert!([200, 400, 407].contains(&status), "repeated header: {status}");
    responses.push(bytes);
    expect(&mut responses, get_with(proxy.addr, &allowed, &auth("Basic", &b64(ALICE_PASSWORD))).await, 407, "no colon");
    // Userinfo in the request target: refused, and never repeated.
    let with_userinfo = format!("http://alice:{URI_PASSWORD}@a.test:{port}/headers");
    let get = format!("GET {with_userinfo} HTTP/1.1\r\nHost: a.test:{port}\r\n\r\n");
    expect(&mut responses, request(proxy.addr, &get).await, 400, "userinfo in the URI");
    let connect = format!("CONNECT alice:{URI_PASSWORD}@a.test:{port} HTTP/1.1\r\nHost: a.test:{port}\r\n\r\n");
    expect(&mut responses, request(proxy.addr, &connect).await, 400, "userinfo in CONNECT");

    // The log was written before it is searched: a line per answered
    // request (repeated wrong credentials from one client are logged at
    // most once per 10 s, so at least one 407 line).
    assert!(proxy.lines_with(&["\"role\":\"team\""], 15).await.len() >= 15, "the valid credentials' requests logged");
    assert!(!proxy.lines_with(&["\"reason\":\"auth-failed\""], 1).await.is_empty(), "a 407 logged");
    let refused = proxy.lines_with(&["\"status\":400"], 3).await;
    assert_eq!(refused.len(), 3, "the three userinfo refusals logged");
    let output = String::from_utf8_lossy(&proxy.output.lock().unwrap()).into_owned();
    assert!(output.contains("\"level\":\"DEBUG\""), "the proxy's own events were written at debug level too");
    assert_nothing_leaked(&proxy, &responses).await;
    assert!(refused.iter().all(|l| l.contains("\"host\":\"a.test:")), "the authority without userinfo: {refused:#?}");
}

#[tokio::test]
async fn parent_credentials_never_reach_the_log_the_error_output_or_a_response() {
    let dns = start_dns(&[("a.test", &["127.0.0.1"])]).await;
    let echo = start_tcp_echo().await;
    let (parent, seen) = start_parent().await;
    let port = echo.port();
    let yaml = |env: &str| {
        format!(
            "dns:\n  nameservers: [\"{}\"]\nupstream_proxy:\n  url: http://{parent}\n  credentials_env: {env}\n\
             allow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    sni_check: false\n    allow:\n      domains: [a.test]\n      \
             http_ports: [{port}]\n      connect_ports: [{port}]\n",
            dns.addr
        )
    };
    let env = [
        ("RUST_LOG", "debug"),
        ("PORTCULLIS_TEST_PARENT_GOOD", &*format!("relay:{PARENT_SECRET}")),
        ("PORTCULLIS_TEST_PARENT_WRONG", &*format!("relay:{PARENT_WRONG}")),
    ];
    let good = BinaryProxy::spawn_with_env(&temp_file("credentials", "good.yaml", ""), &yaml("PORTCULLIS_TEST_PARENT_GOOD"), &env).await;
    let wrong = BinaryProxy::spawn_with_env(&temp_file("credentials", "wrong.yaml", ""), &yaml("PORTCULLIS_TEST_PARENT_WRONG"), &env).await;
    let url = format!("http://a.test:{port}/");
    let connect = format!("CONNECT a.test:{port} HTTP/1.1\r\nHost: a.test:{port}\r\n\r\n");
    let mut responses = Vec::new();

    let (status, body) = get_with(good.addr, &url, "").await;
    assert_eq!((status, body.ends_with(b"parent ok")), (200, true), "{}", String::from_utf8_lossy(&body));
    responses.push(body);
    let mut stream = TcpStream::connect(good.addr).await.unwrap();
    stream.write_all(connect.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut stream).await.status, 200);
    assert_eq!(echo_through(stream, b"through the parent").await, b"through the parent");
    // The parent refuses the wrong secret and echoes it in its 407 body:
    // the client gets the proxy's own 502, never the parent's answer.
    for _ in 0..2 {
        for head in [format!("GET {url} HTTP/1.1\r\nHost: a.test:{port}\r\n\r\n"), connect.clone()] {
            let (status, bytes) = request(wrong.addr, &head).await;
            assert_eq!(status, 502, "{}", String::from_utf8_lossy(&bytes));
            assert!(String::from_utf8_lossy(&bytes).contains("parent-auth-failed"));
            responses.push(bytes);
        }
    }
    // With `resolve: local` every address is checked here: a denied
    // destination never reaches the parent.
    for (url, reason) in [("http://169.254.169.254/latest/", "denied-range:metadata"), (&*format!("http://unlisted.example:{port}/"), "not-allowlisted")] {
        let (status, bytes) = get_with(good.addr, url, "").await;
        assert_eq!(status, 403, "{url}");
        assert!(String::from_utf8_lossy(&bytes).contains(reason), "{url}: {}", String::from_utf8_lossy(&bytes));
        responses.push(bytes);
    }
    let seen = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    assert!(!seen.contains("169.254.169.254") && !seen.contains("unlisted.example"), "a denied request reached the parent: {seen}");
    assert!(seen.contains(&format!("CONNECT 127.0.0.1:{port} ")), "the parent is handed the checked address: {seen}");
    assert!(seen.contains(&b64(&format!("relay:{PARENT_SECRET}"))), "the parent got the credentials: {seen}");
    assert!(seen.contains(&b64(&format!("relay:{PARENT_WRONG}"))), "the parent got the wrong credentials: {seen}");

    assert!(good.lines_with(&["\"a.test\""], 2).await.len() >= 2, "both requests logged");
    assert!(wrong.lines_with(&["parent-auth-failed"], 4).await.len() >= 4, "every refusal logged");
    assert_nothing_leaked(&good, &responses).await;
    assert_nothing_leaked(&wrong, &responses).await;
}
