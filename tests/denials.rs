//! "Why was I refused?" through real sockets: the deny body that teaches the
//! carve-out, `GET /v1/denials` on the admin port (each caller sees its own
//! denials and never another's), `portcullis why`, and the admin
//! listener's connection limit.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use common::{portcullis, read_response, RawResponse, STEP};
use portcullis::app::App;
use portcullis::reload::Trigger;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn basic(user_password: &str) -> String {
    use base64::Engine;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(user_password))
}

/// Starts the whole process (proxy and admin listeners) from `yaml`,
/// written to a file so a reload can re-read it.
async fn start_app(tag: &str, yaml: &str) -> (SocketAddr, SocketAddr, Arc<portcullis::reload::Reloader>, PathBuf) {
    let path = common::temp_file("denials", &format!("{tag}.yaml"), &format!("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nreload:\n  watch: false\n{yaml}"));
    let app = App::start(&path).await.expect("the test config starts");
    let (proxy, admin, reloader) = (app.proxy_addr().unwrap(), app.admin_addr().unwrap(), app.reloader());
    tokio::spawn(app.run(std::future::pending()));
    (proxy, admin, reloader, path)
}

/// A request sent from `source` (a loopback address) on a fresh connection.
async fn send_from(source: &str, to: SocketAddr, request: &str) -> RawResponse {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut stream = tokio::time::timeout(STEP, socket.connect(to)).await.expect("connect in time").unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    tokio::time::timeout(STEP, read_response(&mut stream)).await.expect("answer in time")
}

/// `GET /v1/denials` from `source`, with `Proxy-Authorization` when given;
/// the status and the hosts listed, newest first.
async fn denials_of(source: &str, admin: SocketAddr, authorization: Option<&str>) -> (u16, Vec<String>) {
    let auth = authorization.map_or(String::new(), |a| format!("Proxy-Authorization: {a}\r\n"));
    let resp = send_from(source, admin, &format!("GET /v1/denials HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n{auth}\r\n")).await;
    if resp.status != 200 {
        return (resp.status, Vec::new());
    }
    let value: serde_json::Value = serde_json::from_str(&resp.text()).expect("JSON");
    let hosts = value["denials"].as_array().unwrap().iter().map(|d| d["host"].as_str().unwrap().to_string()).collect();
    (200, hosts)
}

fn connect_request(host: &str, authorization: Option<&str>) -> String {
    let auth = authorization.map_or(String::new(), |a| format!("Proxy-Authorization: {a}\r\n"));
    format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n{auth}\r\n")
}

/// Two source addresses and two credentials are refused; each caller asks
/// for its denials and gets exactly its own, and `portcullis why` prints
/// the reason, the rule and the fix for the caller it runs as.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_caller_sees_its_own_denials_and_never_another_clients() {
    let credentials = format!(
        "identity:\n  credentials:\n    - {{user: alice, password_sha256: {}, role: default}}\n    - {{user: bob, password_sha256: {}, role: default}}\n",
        sha256_hex("alice-pw"),
        sha256_hex("bob-pw")
    );
    let yaml = format!("{credentials}roles:\n  default:\n    allow:\n      domains: [allowed.test]\n");
    let (proxy, admin, _, _) = start_app("owners", &yaml).await;
    let (alice, bob) = (basic("alice:alice-pw"), basic("bob:bob-pw"));
    for (source, host, auth) in [
        ("127.0.0.2", "two.test", None),
        ("127.0.0.3", "three.test", None),
        ("127.0.0.2", "alice.test", Some(alice.as_str())),
        ("127.0.0.3", "bob.test", Some(bob.as_str())),
        ("127.0.0.2", "two-again.test", None),
    ] {
        let resp = send_from(source, proxy, &connect_request(host, auth)).await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("not-allowlisted")), "{host}");
    }
    // Sources see what they sent without credentials, newest first; the
    // credentials' denials follow the credentials, from any address.
    assert_eq!(denials_of("127.0.0.2", admin, None).await, (200, vec!["two-again.test".into(), "two.test".into()]));
    assert_eq!(denials_of("127.0.0.3", admin, None).await, (200, vec!["three.test".into()]));
    assert_eq!(denials_of("127.0.0.3", admin, Some(&alice)).await, (200, vec!["alice.test".into()]));
    assert_eq!(denials_of("127.0.0.2", admin, Some(&bob)).await, (200, vec!["bob.test".into()]));
    assert_eq!(denials_of("127.0.0.4", admin, None).await, (200, vec![]));
    // Wrong credentials see nothing: 407, as on the proxy port.
    assert_eq!(denials_of("127.0.0.2", admin, Some(&basic("alice:wrong"))).await.0, 407);

    // The command a user runs: as alice (from the proxy URL's userinfo),
    // then as this machine's 127.0.0.1, which was never refused.
    let admin_arg = admin.to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["why", "--admin", &admin_arg])
        .env("https_proxy", format!("http://alice:alice%2Dpw@{proxy}"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("recent denials for credentials, newest first:"));
    let first = lines.next().unwrap();
    assert!(first.ends_with("  connect alice.test:443  not-allowlisted  role=default"), "{stdout}");
    assert_eq!(lines.next(), Some("  rule: default-deny (role default: no allow rule matched)"));
    assert_eq!(lines.next(), Some("  fix:  add alice.test (or a *.suffix rule) to roles.default.allow.domains"));
    assert_eq!(lines.next(), None, "{stdout}");
    let (code, stdout, _) = portcullis(&["why", "--admin", &admin_arg]);
    assert_eq!((code, stdout.as_str()), (0, "no recent denials for 127.0.0.1\n"));
}

/// More denials than the ring holds: the listing stays capped, newest
/// first, and the proxy keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ring_stays_bounded_under_many_denials() {
    let (proxy, admin, _, _) = start_app("bounded", "roles:\n  default:\n    allow:\n      domains: [allowed.test]\n").await;
    let total = portcullis::denials::CAPACITY + 20;
    // One keep-alive connection: a forwarded deny keeps it open.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.5:0".parse().unwrap()).unwrap();
    let mut stream = socket.connect(proxy).await.unwrap();
    for i in 0..total {
        let request = format!("GET http://n{i}.test/ HTTP/1.1\r\nHost: n{i}.test\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let resp = tokio::time::timeout(STEP, read_response(&mut stream)).await.expect("answer in time");
        assert_eq!(resp.status, 403, "request {i}");
    }
    let (status, hosts) = denials_of("127.0.0.5", admin, None).await;
    assert_eq!(status, 200);
    assert_eq!(hosts.len(), portcullis::denials::MAX_LISTED);
    let newest: Vec<String> = (total - portcullis::denials::MAX_LISTED..total).rev().map(|i| format!("n{i}.test")).collect();
    assert_eq!(hosts, newest);
}

/// A name that resolves into a private or loopback range is refused with
/// the config lines that allow it; those lines, added to the config and
/// reloaded, let exactly that name through to its origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_body_carries_the_carve_out_that_lets_the_name_through() {
    let origin = common::start_http_origin().await;
    let port = origin.port();
    let rest = format!(
        "dns:\n  static:\n    mirror.corp.test: [127.0.0.1]\nroles:\n  ci:\n    allow:\n      domains: [mirror.corp.test]\n      http_ports: [{port}]\n  default: {{}}\n\
         identity:\n  sources:\n    - {{cidr: 127.0.0.6/32, role: ci}}\n"
    );
    let (proxy, admin, reloader, path) = start_app("carve", &rest).await;
    let request = format!("GET http://mirror.corp.test:{port}/headers HTTP/1.1\r\nHost: mirror.corp.test:{port}\r\nConnection: close\r\n\r\n");
    let resp = send_from("127.0.0.6", proxy, &request).await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("denied-range:loopback")));
    let body = resp.text();
    let want = format!(
        "portcullis: denied-range:loopback: destination denied by policy\nhost: mirror.corp.test\nport: {port}\nrole: ci\n\
         to allow this internal name, carve its address out for it (portcullis config, reloaded on save):\n\
         allow_ranges:\n  - {{cidr: 127.0.0.1/32, domains: [mirror.corp.test], ports: [{port}]}}\n\
         roles:\n  ci:\n    allow:\n      domains: [mirror.corp.test]   # added to the role's list\n"
    );
    assert_eq!(body, want);
    // JSON clients get the same lines in `fix`.
    let json = send_from("127.0.0.6", proxy, &request.replace("Connection: close", "Connection: close\r\nAccept: application/json")).await;
    let value: serde_json::Value = serde_json::from_str(&json.text()).unwrap();
    assert!(value["fix"].as_str().unwrap().contains(&format!("{{cidr: 127.0.0.1/32, domains: [mirror.corp.test], ports: [{port}]}}")));
    // /v1/denials carries the same fix for that client.
    let listed = send_from("127.0.0.6", admin, "GET /v1/denials HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    let listed: serde_json::Value = serde_json::from_str(&listed.text()).unwrap();
    assert_eq!(listed["denials"][0]["reason"], "denied-range:loopback");
    assert_eq!(listed["denials"][0]["fix"].as_str().unwrap(), &body[body.find("to allow").unwrap()..]);

    // Apply the allow_ranges lines as shown (the role already lists the name).
    let carve: String = body.lines().skip_while(|l| *l != "allow_ranges:").take(2).map(|l| format!("{l}\n")).collect();
    let config = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{carve}{config}")).unwrap();
    reloader.reload(Trigger::Signal).expect("the config with the shown lines is valid");
    let resp = send_from("127.0.0.6", proxy, &request).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    // Bound to the name and port: the address itself stays denied.
    let literal = format!("GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    assert_eq!(send_from("127.0.0.6", proxy, &literal).await.header("x-portcullis-deny"), Some("denied-range:loopback"));
}

/// The admin listener serves a bounded number of connections: held ones
/// take every slot, the next is refused 503 `over-limit`, and once one is
/// released the listener serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_has_its_own_connection_limit() {
    let (_, admin, _, _) = start_app("admin-limit", "roles:\n  default: {}\n").await;
    let mut held = Vec::new();
    for _ in 0..portcullis::admin::MAX_CONNECTIONS {
        held.push(TcpStream::connect(admin).await.unwrap());
    }
    // Each held connection is served: a request on it is answered.
    let first = held.first_mut().unwrap();
    first.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    assert_eq!(tokio::time::timeout(STEP, read_response(first)).await.unwrap().status, 200);
    let mut extra = TcpStream::connect(admin).await.unwrap();
    let mut refused = Vec::new();
    tokio::time::timeout(STEP, extra.read_to_end(&mut refused)).await.expect("refused in time").unwrap();
    let refused = String::from_utf8_lossy(&refused);
    assert!(refused.starts_with("HTTP/1.1 503 Service Unavailable (portcullis: over-limit)\r\n"), "{refused}");
    drop(held.pop());
    // The freed slot is given back when its task sees the close; wait on it.
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let resp = send_from("127.0.0.1", admin, "GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
        if resp.status == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no slot came back: {}", resp.status);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
