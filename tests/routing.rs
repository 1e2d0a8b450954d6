//! Routing for real networks through real sockets: Happy Eyeballs dialing,
//! pinned names and name-bound carve-outs.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A listener on `addr` whose accept queue is full and never drained: the
/// kernel drops further SYNs, so a connect to it hangs (a blackhole on
/// loopback, no netfilter needed). Keep the returned values alive.
async fn blackhole(addr: SocketAddr) -> (TcpListener, Vec<TcpStream>) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(addr).unwrap();
    let listener = socket.listen(0).unwrap();
    let mut queued = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => queued.push(s),
            _ => break,
        }
    }
    let probe = tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await;
    assert!(probe.is_err(), "the blackhole must not take another connection");
    (listener, queued)
}

/// A name whose first address never answers and whose second works is
/// reached after the stagger delay, not after the whole connect timeout.
/// `upstream_connect` bounds all attempts together, so a dialer that waited
/// for the first address would spend the whole budget on it and answer
/// 504: the 200 is the proof, with no wall-clock upper bound to miss on a
/// loaded machine. (The lower bound cannot be missed by being slow.)
#[tokio::test]
async fn a_blackholed_first_address_costs_only_the_stagger() {
    let origin = start_http_origin().await;
    let port = origin.port();
    let _hole = blackhole(SocketAddr::from(([127, 0, 0, 2], port))).await;
    let dns = start_dns(&[("eyeballs.test", &["127.0.0.2", "127.0.0.1"])]).await;
    let proxy = start_proxy(&format!(
        "dns:\n  nameservers: [\"{}\"]\n  timeout: 1s\ntimeouts:\n  upstream_connect: 5s\n  connect_stagger: 250ms\n\
         allow_ranges: [127.0.0.0/8]\nroles:\n  default:\n    allow:\n      domains: [eyeballs.test]\n      http_ports: [{port}]\n",
        dns.addr
    ))
    .await;
    let started = Instant::now();
    let resp = get(proxy, &format!("http://eyeballs.test:{port}/headers")).await;
    let took = started.elapsed();
    assert_eq!(resp.status, 200, "{}: the second address was dialed within the connect budget", resp.text());
    assert!(took >= Duration::from_millis(250), "took {took:?}: the second address waits for the stagger");
}

/// A carve-out bound to a name admits that name on its port and nothing
/// else: not the IP literal, not another name resolving to the same
/// address, not another port.
#[tokio::test]
async fn a_name_bound_carve_out_admits_only_its_name() {
    let (origin, other) = (start_http_origin().await, start_http_origin().await);
    let (port, other_port) = (origin.port(), other.port());
    let dns = start_dns(&[("vault.test", &["127.0.0.1"]), ("alias.test", &["127.0.0.1"])]).await;
    let proxy = start_proxy(&format!(
        "dns:\n  nameservers: [\"{dns}\"]\n  timeout: 1s\n\
         allow_ranges:\n  - {{cidr: 127.0.0.0/8, domains: [vault.test], ports: [{port}]}}\n\
         roles:\n  default:\n    allow:\n      domains: [vault.test, alias.test]\n      cidrs: [127.0.0.0/8]\n      http_ports: [{port}, {other_port}]\n",
        dns = dns.addr
    ))
    .await;
    let resp = get(proxy, &format!("http://vault.test:{port}/headers")).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    for url in [
        format!("http://127.0.0.1:{port}/"),
        format!("http://alias.test:{port}/"),
        format!("http://vault.test:{other_port}/"),
    ] {
        let resp = get(proxy, &url).await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("denied-range:loopback")), "{url}");
    }
}

/// Pinned names are answered from config without a DNS query, and their
/// answers are checked like any other.
#[tokio::test]
async fn pinned_names_need_no_dns_and_are_still_checked() {
    let origin = start_http_origin().await;
    let port = origin.port();
    let dns = start_dns(&[("pinned.test", &["127.0.0.9"])]).await;
    let proxy = start_proxy(&format!(
        "dns:\n  nameservers: [\"{dns}\"]\n  timeout: 1s\n  static:\n    pinned.test: [127.0.0.1]\n    PINNED-meta.test.: [169.254.169.254]\n\
         allow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    allow:\n      domains: [\"*.test\"]\n      http_ports: [{port}, 80]\n",
        dns = dns.addr
    ))
    .await;
    let resp = get(proxy, &format!("http://pinned.test:{port}/headers")).await;
    assert_eq!(resp.status, 200, "answered by the pin (the DNS server would say 127.0.0.9): {}", resp.text());
    let resp = get(proxy, "http://pinned-meta.test/").await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("denied-range:metadata")));
    assert!(dns.queries.lock().unwrap().is_empty(), "no query: {:?}", dns.queries.lock().unwrap());
}

/// What the test parent proxy saw: each request line and its credentials.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, Option<String>)>>>;

/// A parent proxy for tests: requires `Proxy-Authorization: Basic
/// base64(want)` (407 otherwise), answers other statuses when told to,
/// tunnels `CONNECT` to the named address, and answers absolute-form
/// requests itself with the request line it saw.
async fn start_parent(want: &'static str, status: u16) -> (SocketAddr, Seen) {
    let (addr, seen, _) = start_parent_with(want, status, None).await;
    (addr, seen)
}

/// The server names TLS clients of the test parent sent (`None`: no SNI).
type Snis = std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>;

/// [`start_parent`], over TLS with `tls` when given; a client whose
/// handshake fails is never read from.
async fn start_parent_with(want: &'static str, status: u16, tls: Option<Arc<rustls::ServerConfig>>) -> (SocketAddr, Seen, Snis) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen, snis): (Seen, Snis) = Default::default();
    let (log, sni_log) = (seen.clone(), snis.clone());
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else { return };
            let (log, sni_log, acceptor) = (log.clone(), sni_log.clone(), acceptor.clone());
            tokio::spawn(async move {
                let Some(acceptor) = acceptor else { return serve_parent(s, want, status, log).await };
                let Ok(s) = acceptor.accept(s).await else { return };
                sni_log.lock().unwrap().push(s.get_ref().1.server_name().map(str::to_string));
                serve_parent(s, want, status, log).await
            });
        }
    });
    (addr, seen, snis)
}

/// One client connection of the test parent. A `CONNECT` to a name is
/// "resolved" to 127.0.0.1 here: tests never ask the system resolver.
async fn serve_parent<S>(mut s: S, want: &str, status: u16, log: Seen)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let line = head.lines().next().unwrap_or_default().to_string();
    let auth = head.lines().find_map(|l| {
        let (name, value) = l.split_once(": ")?;
        name.eq_ignore_ascii_case("proxy-authorization").then(|| value.to_string())
    });
    log.lock().unwrap().push((line.clone(), auth.clone()));
    use base64::Engine as _;
    let expected = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(want));
    let answer = |code: u16, body: &str| format!("HTTP/1.1 {code} X\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    if auth.as_deref() != Some(expected.as_str()) {
        let _ = s.write_all(answer(407, "").as_bytes()).await;
        return;
    }
    if status != 200 {
        let _ = s.write_all(answer(status, "").as_bytes()).await;
        return;
    }
    match line.strip_prefix("CONNECT ").and_then(|rest| rest.split(' ').next()) {
        Some(authority) => {
            let (host, port) = authority.rsplit_once(':').unwrap();
            let ip = host.trim_matches(['[', ']']).parse::<IpAddr>().unwrap_or(IpAddr::from([127, 0, 0, 1]));
            let Ok(mut up) = TcpStream::connect((ip, port.parse::<u16>().unwrap())).await else { return };
            let _ = s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await;
            let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
        }
        None => {
            let _ = s.write_all(answer(200, &format!("parent saw {line}")).as_bytes()).await;
        }
    }
}

fn parent_config(parent: SocketAddr, env: &str, ports: &str, dns: SocketAddr) -> String {
    parent_config_with(&format!("http://{parent}"), "", env, ports, dns)
}

/// A parent at `url`, with `extra` lines (indented) under `upstream_proxy`.
fn parent_config_with(url: &str, extra: &str, env: &str, ports: &str, dns: SocketAddr) -> String {
    format!(
        "dns:\n  nameservers: [\"{dns}\"]\n  timeout: 1s\nupstream_proxy:\n  url: {url}\n  credentials_env: {env}\n{extra}\
         allow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    allow:\n      domains: [web.test]\n      cidrs: [127.0.0.1/32]\n      \
         http_ports: [{ports}]\n      connect_ports: [{ports}]\n"
    )
}

/// Allowed requests leave through the parent with its credentials: tunnels
/// as `CONNECT` and plain HTTP in absolute form, both naming the checked
/// address; a denied destination never reaches the parent.
#[tokio::test]
async fn allowed_requests_leave_through_the_parent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    std::env::set_var("PORTCULLIS_TEST_PARENT_OK", "relay:s3cret");
    let (parent, seen) = start_parent("relay:s3cret", 200).await;
    let echo = start_tcp_echo().await;
    let dns = start_dns(&[("web.test", &["127.0.0.1"]), ("not-listed.test", &["8.8.8.8"])]).await;
    let ports = format!("80, {}", echo.port());
    let proxy = start_proxy(&parent_config(parent, "PORTCULLIS_TEST_PARENT_OK", &ports, dns.addr)).await;

    let (resp, mut tunnel) = connect(proxy, &format!("127.0.0.1:{}", echo.port())).await;
    assert_eq!(resp.status, 200);
    tunnel.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tunnel.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping", "relayed through the parent");

    let resp = get(proxy, &format!("http://web.test:{}/path?q=1", echo.port())).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), format!("parent saw GET http://127.0.0.1:{}/path?q=1 HTTP/1.1", echo.port()));

    let before = seen.lock().unwrap().len();
    let resp = get(proxy, "http://169.254.169.254/latest/meta-data/").await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("denied-range:metadata")));
    let resp = get(proxy, "http://not-listed.test/").await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("not-allowlisted")));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), before, "a denied request never reaches the parent");
    assert_eq!(seen[0].0, format!("CONNECT 127.0.0.1:{} HTTP/1.1", echo.port()));
    assert!(seen.iter().all(|(_, auth)| auth.as_deref() == Some("Basic cmVsYXk6czNjcmV0")), "{seen:?}");
}

/// A parent that refuses the credentials, refuses the request, or cannot be
/// reached gives 502 with its own reason code.
#[tokio::test]
async fn parent_failures_are_502_with_their_own_codes() {
    std::env::set_var("PORTCULLIS_TEST_PARENT_BAD", "relay:wrong");
    let echo = start_tcp_echo().await;
    let dns = start_dns(&[("web.test", &["127.0.0.1"])]).await;
    let ports = format!("{}", echo.port());
    let target = format!("127.0.0.1:{}", echo.port());
    let (strict, _) = start_parent("relay:s3cret", 200).await;
    let (refusing, _) = start_parent("relay:wrong", 403).await;
    let (gone, _held_port) = refusing_addr();
    for (parent, code) in [(strict, "parent-auth-failed"), (refusing, "parent-refused"), (gone, "parent-unreachable")] {
        let proxy = start_proxy(&parent_config(parent, "PORTCULLIS_TEST_PARENT_BAD", &ports, dns.addr)).await;
        let (resp, _) = connect(proxy, &target).await;
        assert_eq!((resp.status, resp.header("x-portcullis-error")), (502, Some(code)), "CONNECT via {parent}");
        let resp = get(proxy, &format!("http://web.test:{}/", echo.port())).await;
        if code == "parent-refused" {
            // Plain HTTP: a parent's 403 cannot be told from the origin's; it is relayed.
            assert_eq!(resp.status, 403, "GET via {parent}");
        } else {
            // A 407 can only be the parent's: never passed on as our own challenge.
            assert_eq!((resp.status, resp.header("x-portcullis-error")), (502, Some(code)), "GET via {parent}");
        }
    }
}

/// The test CA's PEM, written where the proxy reads it, and the TLS config
/// of a parent whose certificate names 127.0.0.1 and parent.test.
fn parent_pki(tag: &str) -> (std::path::PathBuf, Arc<rustls::ServerConfig>) {
    let (ca, tls) = test_ca_and_server_tls(&["127.0.0.1", "parent.test"]);
    (temp_file(tag, "parent-ca.pem", &ca), tls)
}

/// Through an `https://` parent with Basic auth: tunnels and forwarded
/// requests carry the credentials; the parent's certificate is verified
/// against `ca_file`, for the URL's IP literal or for the DNS name
/// `server_name` gives (then sent as SNI); a bulk tunnel is relayed whole
/// over TLS, half-close included.
#[tokio::test]
async fn a_tls_parent_carries_tunnels_and_forwarded_requests() {
    std::env::set_var("PORTCULLIS_TEST_PARENT_TLS", "relay:s3cret");
    let (ca_file, tls) = parent_pki("tls-parent");
    let (parent, seen, snis) = start_parent_with("relay:s3cret", 200, Some(tls)).await;
    let echo = start_tcp_echo().await;
    let dns = start_dns(&[("web.test", &["127.0.0.1"])]).await;
    let ports = echo.port().to_string();
    let ca = format!("  ca_file: {}\n", ca_file.display());
    for (extra, sni) in [(ca.clone(), None), (format!("{ca}  server_name: parent.test\n"), Some("parent.test"))] {
        let yaml = parent_config_with(&format!("https://{parent}"), &extra, "PORTCULLIS_TEST_PARENT_TLS", &ports, dns.addr);
        let proxy = start_proxy(&yaml).await;
        let (resp, tunnel) = connect(proxy, &format!("127.0.0.1:{}", echo.port())).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        let data = pattern(0, 512 * 1024);
        let back = echo_through(tunnel, &data).await;
        assert!(back == data, "{} of {} bytes came back intact", back.len(), data.len());

        let resp = get(proxy, &format!("http://web.test:{}/path?q=1", echo.port())).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.text(), format!("parent saw GET http://127.0.0.1:{}/path?q=1 HTTP/1.1", echo.port()));
        let snis = snis.lock().unwrap().clone();
        assert!(snis.len() >= 2 && snis[snis.len() - 2..].iter().all(|s| s.as_deref() == sni), "{snis:?}");
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(seen.iter().all(|(_, auth)| auth.as_deref() == Some("Basic cmVsYXk6czNjcmV0")), "{seen:?}");
}

/// A parent whose certificate does not verify against `ca_file` (signed by
/// another CA, or not carrying the name verified against) gives 502
/// `parent-tls-failed`, and no request reaches it.
#[tokio::test]
async fn a_parent_that_fails_verification_is_502_parent_tls_failed() {
    std::env::set_var("PORTCULLIS_TEST_PARENT_TLS_BAD", "relay:s3cret");
    let (ca_file, tls) = parent_pki("tls-parent-bad");
    let other_ca = temp_file("tls-parent-bad", "other-ca.pem", &test_ca_and_server_tls(&["127.0.0.1"]).0);
    let (parent, seen, _) = start_parent_with("relay:s3cret", 200, Some(tls)).await;
    let echo = start_tcp_echo().await;
    let dns = start_dns(&[("web.test", &["127.0.0.1"])]).await;
    let ports = echo.port().to_string();
    for extra in [
        format!("  ca_file: {}\n", other_ca.display()),
        format!("  ca_file: {}\n  server_name: other.test\n", ca_file.display()),
    ] {
        let yaml = parent_config_with(&format!("https://{parent}"), &extra, "PORTCULLIS_TEST_PARENT_TLS_BAD", &ports, dns.addr);
        let proxy = start_proxy(&yaml).await;
        let (resp, _) = connect(proxy, &format!("127.0.0.1:{}", echo.port())).await;
        assert_eq!((resp.status, resp.header("x-portcullis-error")), (502, Some("parent-tls-failed")), "CONNECT with {extra}");
        let resp = get(proxy, &format!("http://web.test:{}/", echo.port())).await;
        assert_eq!((resp.status, resp.header("x-portcullis-error")), (502, Some("parent-tls-failed")), "GET with {extra}");
    }
    assert!(seen.lock().unwrap().is_empty(), "no request reached the parent: {:?}", seen.lock().unwrap());
}

/// With `resolve: parent`, names leave through the parent unresolved: it
/// sees `CONNECT name:port` and `http://name:port/...`, the DNS server is
/// never asked, and the decision line says the parent resolved the name.
/// The decision is made on the name alone: an IP literal in a denied range
/// is refused before any dial and a name that only a CIDR rule admits is
/// denied, neither reaching the parent. A pinned name is still answered
/// from config and checked, and an excepted name still resolves here.
#[tokio::test]
async fn with_resolve_parent_names_reach_the_parent_unresolved() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    std::env::set_var("PORTCULLIS_TEST_PARENT_RESOLVES", "relay:s3cret");
    let (parent, seen) = start_parent("relay:s3cret", 200).await;
    let (echo, origin) = (start_tcp_echo().await, start_http_origin().await);
    let (port, direct_port) = (echo.port(), origin.port());
    let dns = start_dns(&[("web.test", &["127.0.0.1"]), ("cidr-only.test", &["127.0.0.1"]), ("direct.test", &["127.0.0.1"])]).await;
    let yaml = format!(
        "dns:\n  nameservers: [\"{dns}\"]\n  timeout: 1s\n  static:\n    pinned.test: [127.0.0.1]\n\
         upstream_proxy:\n  url: http://{parent}\n  credentials_env: PORTCULLIS_TEST_PARENT_RESOLVES\n  resolve: parent\n\
         \x20 except: {{domains: [direct.test]}}\n\
         allow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    sni_check: false\n    allow:\n      domains: [web.test, pinned.test, direct.test]\n\
         \x20     cidrs: [127.0.0.1/32]\n      http_ports: [80, {port}, {direct_port}]\n      connect_ports: [443, {port}]\n",
        dns = dns.addr
    );
    let dir = std::env::temp_dir().join(format!("portcullis-resolve-parent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let proxy = BinaryProxy::spawn(&dir.join("portcullis.yaml"), &yaml).await;

    let (resp, mut tunnel) = connect(proxy.addr, &format!("web.test:{port}")).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    tunnel.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tunnel.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping", "relayed through the parent");
    drop(tunnel);
    let resp = get(proxy.addr, &format!("http://web.test:{port}/path?q=1")).await;
    assert_eq!(resp.text(), format!("parent saw GET http://web.test:{port}/path?q=1 HTTP/1.1"));
    // Checked here, as always, then handed to the parent as checked.
    let resp = get(proxy.addr, &format!("http://127.0.0.1:{port}/literal")).await;
    assert_eq!(resp.text(), format!("parent saw GET http://127.0.0.1:{port}/literal HTTP/1.1"));
    let resp = get(proxy.addr, &format!("http://pinned.test:{port}/pinned")).await;
    assert_eq!(resp.text(), format!("parent saw GET http://127.0.0.1:{port}/pinned HTTP/1.1"));
    let resp = get(proxy.addr, &format!("http://direct.test:{direct_port}/headers")).await;
    assert!(resp.text().starts_with("GET /headers\n"), "excepted: straight to the origin: {}", resp.text());

    let before = seen.lock().unwrap().len();
    let (resp, _) = connect(proxy.addr, "10.0.0.1:443").await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("denied-range:private")));
    let resp = get(proxy.addr, "http://169.254.169.254/latest/meta-data/").await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("denied-range:metadata")));
    let resp = get(proxy.addr, &format!("http://cidr-only.test:{port}/")).await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("not-allowlisted")));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), before, "a denied request never reaches the parent: {seen:?}");
    assert_eq!(seen[0], (format!("CONNECT web.test:{port} HTTP/1.1"), Some("Basic cmVsYXk6czNjcmV0".to_string())));
    let queries = dns.queries.lock().unwrap().clone();
    assert_eq!(queries.keys().collect::<Vec<_>>(), ["direct.test."], "only the excepted name was resolved here");

    let parent_resolved = ["\"host\":\"web.test\"", "\"answer\":\"parent\"", "\"decision\":\"allow\""];
    let lines = proxy.lines_with(&parent_resolved, 2).await;
    assert_eq!(lines.len(), 2, "{:?}", proxy.log.lock().unwrap());
    assert!(lines.iter().all(|l| l.contains(&format!("\"dialed\":\"{parent}\""))), "{lines:?}");
    let denied = proxy.lines_with(&["\"host\":\"10.0.0.1\"", "\"dialed\":\"\"", "\"answer\":\"\""], 1).await;
    assert_eq!(denied.len(), 1, "{:?}", proxy.log.lock().unwrap());
}
