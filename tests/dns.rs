//! The DNS listener (`dns_listen`) through real resolvers: `dig` over UDP
//! and TCP, and in a namespace of the test's own, glibc (`getent hosts`),
//! Python's `socket.getaddrinfo` and Node's `dns.lookup` reading a
//! bind-mounted resolv.conf. A recording upstream resolver proves that a
//! refused name never left the proxy.

mod common;
#[path = "dns/ech.rs"]
mod ech;
#[path = "dns/forwarder.rs"]
mod forwarder;
#[path = "dns/hello.rs"]
mod hello;
#[path = "common/hostile.rs"]
mod hostile;
#[path = "common/netns.rs"]
mod netns;
#[path = "dns/system.rs"]
mod system;
#[path = "dns/upstream.rs"]
mod upstream;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::{portcullis, send_raw, temp_file, STEP};
use portcullis::app::App;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use upstream::Rr;

/// A name shaped like DNS exfiltration: 60 hex characters of "data".
const EXFIL: &str = "5365637265744b65793d41424344454647484a4b4c4d4e4f50515253545556.attacker.example";

/// The records every test's upstream serves.
fn records() -> Vec<(&'static str, Rr)> {
    vec![
        ("allowed.test", Rr::Addr("11.0.0.10")),
        ("allowed.test", Rr::Addr("2600::10")),
        ("allowed.test", Rr::Txt("v=secret")),
        ("www.allowed.test", Rr::Cname("edge.cdn.example")),
        ("edge.cdn.example", Rr::Addr("11.0.0.20")),
        ("alias.allowed.test", Rr::Cname("metadata.google.internal")),
        ("metadata.google.internal", Rr::Addr("169.254.169.254")),
        ("rebind.test", Rr::Addr("169.254.169.254")),
        ("tcp-only.allowed.test", Rr::Addr("11.0.0.30")),
        ("cdn.test", Rr::Https { hint: "11.0.0.50" }),
        ("api.ns.svc.cluster.local", Rr::Addr("10.96.0.10")),
        ("unlisted.example", Rr::Addr("11.0.0.40")),
        ("outside.example", Rr::Addr("12.0.0.1")),
        (EXFIL, Rr::Addr("11.0.0.66")),
    ]
}

/// The config: the default role admits the test names; 127.0.0.2 and
/// 127.0.0.3 are CIDR-only roles that do and do not resolve unlisted names.
fn config(listen: &str, upstream: SocketAddr, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\ndns_listen: {listen}\n\
         dns:\n  nameservers: [\"{upstream}\"]\n  timeout: 2s\n  always_answer: [\"*.svc.cluster.local\"]\n{extra}\
         identity:\n  sources:\n    - {{cidr: 127.0.0.2/32, role: cidr-resolving}}\n    - {{cidr: 127.0.0.3/32, role: cidr-literal}}\n\
         roles:\n  default:\n    allow:\n      domains: [allowed.test, \"*.allowed.test\", rebind.test, cdn.test]\n\
         \x20 cidr-resolving:\n    allow:\n      cidrs: [11.0.0.0/24]\n\
         \x20 cidr-literal:\n    allow:\n      cidrs: [11.0.0.0/24]\n      resolve_unlisted_names: false\n"
    )
}

/// A started process: its DNS listener and admin addresses.
struct Running {
    dns: SocketAddr,
    proxy: SocketAddr,
    admin: SocketAddr,
}

async fn start(tag: &str, yaml: &str) -> Running {
    let path = temp_file(&format!("dns-{tag}"), "portcullis.yaml", yaml);
    let app = App::start(&path).await.expect("the test config starts");
    let running = Running {
        dns: app.dns_addr().expect("dns_listen is set").unwrap(),
        proxy: app.proxy_addr().unwrap(),
        admin: app.admin_addr().unwrap(),
    };
    tokio::spawn(app.run(std::future::pending()));
    running
}

impl Running {
    async fn metrics(&self) -> String {
        send_raw(self.admin, "GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n").await.text()
    }
}

/// What `dig` printed: the status and the answer section's lines.
#[derive(Debug)]
struct Dig {
    status: String,
    answers: Vec<String>,
    text: String,
}

/// Runs `dig` against the listener (bounded: one try, 5 s).
async fn dig(server: SocketAddr, args: &[&str]) -> Dig {
    let mut cmd = Command::new("dig");
    cmd.arg(format!("@{}", server.ip())).args(["-p", &server.port().to_string(), "+time=5", "+tries=1", "+noall", "+comments", "+answer"]);
    cmd.args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().expect("dig (bind9-dnsutils) is installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text.split("status: ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("no answer").to_string();
    let answers = text.lines().filter(|l| !l.starts_with(';') && !l.trim().is_empty()).map(str::to_string).collect();
    Dig { status, answers, text }
}

/// The data of each answer line (the last whitespace-separated field on).
fn rdata(d: &Dig) -> Vec<String> {
    d.answers.iter().map(|l| l.split_whitespace().skip(4).collect::<Vec<_>>().join(" ")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_gets_allowed_names_and_refused_names_never_reach_the_upstream() {
    let up = upstream::start(&records()).await;
    let dns = start("dig", &config("127.0.0.1:0", up.addr, "")).await.dns;
    for transport in ["+notcp", "+tcp"] {
        let a = dig(dns, &[transport, "allowed.test", "A"]).await;
        assert_eq!((a.status.as_str(), rdata(&a)), ("NOERROR", vec!["11.0.0.10".to_string()]), "{}", a.text);
        let aaaa = dig(dns, &[transport, "ALLOWED.test.", "AAAA"]).await;
        assert_eq!(rdata(&aaaa), ["2600::10"], "{}", aaaa.text);
        // A CNAME chain into a name no rule lists: each name judged, none denied.
        let chain = dig(dns, &[transport, "www.allowed.test", "A"]).await;
        assert_eq!(rdata(&chain), ["edge.cdn.example.", "11.0.0.20"], "{}", chain.text);
        // always_answer: a cluster name and its internal address.
        let svc = dig(dns, &[transport, "api.ns.svc.cluster.local", "A"]).await;
        assert_eq!(rdata(&svc), ["10.96.0.10"], "{}", svc.text);
        for (name, qtype) in [("metadata.google.internal", "A"), (EXFIL, "A"), ("allowed.test", "TXT"), ("allowed.test", "ANY"), ("unlisted.example", "A")] {
            let refused = dig(dns, &[transport, name, qtype]).await;
            assert_eq!((refused.status.as_str(), refused.answers.len()), ("REFUSED", 0), "{name} {qtype}: {}", refused.text);
        }
        // Rebinding: an admitted name answered with the metadata address.
        let rebind = dig(dns, &[transport, "rebind.test", "A"]).await;
        assert_eq!(rebind.status, "REFUSED", "{}", rebind.text);
        assert!(!rebind.text.contains("169.254"), "{}", rebind.text);
        // A chain into a denied name is refused whole.
        let alias = dig(dns, &[transport, "alias.allowed.test", "A"]).await;
        assert_eq!((alias.status.as_str(), alias.answers.len()), ("REFUSED", 0), "{}", alias.text);
    }
    // Truncated upstream answers are asked again over TCP.
    let tcp = dig(dns, &["tcp-only.allowed.test", "A"]).await;
    assert_eq!(rdata(&tcp), ["11.0.0.30"], "{}", tcp.text);
    assert_eq!(up.count("tcp-only.allowed.test", "A"), 2, "once over UDP, once over TCP");

    for refused in ["metadata.google.internal", "attacker.example", "unlisted.example"] {
        assert!(!up.saw_any_under(refused), "the upstream was asked about {refused}: {:?}", up.seen());
    }
    assert!(up.seen().iter().all(|(_, t)| t != "TXT" && t != "ANY"), "{:?}", up.seen());
    assert!(up.count("rebind.test", "A") >= 1 && up.count("alias.allowed.test", "A") >= 1, "admitted names were asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_records_come_back_without_ech_and_queries_are_counted() {
    let up = upstream::start(&records()).await;
    let running = start("https", &config("127.0.0.1:0", up.addr, "")).await;
    let https = dig(running.dns, &["cdn.test", "HTTPS"]).await;
    assert_eq!((https.status.as_str(), https.answers.len()), ("NOERROR", 1), "{}", https.text);
    assert!(https.text.contains("alpn=\"h2\"") || https.text.contains("alpn=h2"), "{}", https.text);
    assert!(https.text.contains("ipv4hint=11.0.0.50"), "{}", https.text);
    assert!(!https.text.contains("ech="), "{}", https.text);
    assert_eq!(up.count("cdn.test", "HTTPS"), 1);
    dig(running.dns, &["metadata.google.internal"]).await;
    let metrics = running.metrics().await;
    for series in [
        "portcullis_dns_queries_total{decision=\"allow\",qtype=\"HTTPS\",reason=\"domain\",role=\"default\"} 1",
        "portcullis_dns_queries_total{decision=\"deny\",qtype=\"A\",reason=\"denied-name:metadata\",role=\"default\"} 1",
        "portcullis_dns_upstream_duration_seconds_count 1",
    ] {
        assert!(metrics.contains(series), "{series} missing from\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cidr_only_roles_follow_resolve_unlisted_names() {
    let up = upstream::start(&records()).await;
    let dns = start("cidr", &config("127.0.0.1:0", up.addr, "")).await.dns;
    // Resolving role: forwarded, returned only when every address is inside its CIDRs.
    let inside = dig(dns, &["-b", "127.0.0.2", "unlisted.example"]).await;
    assert_eq!(rdata(&inside), ["11.0.0.40"], "{}", inside.text);
    let outside = dig(dns, &["-b", "127.0.0.2", "outside.example"]).await;
    assert_eq!((outside.status.as_str(), outside.answers.len()), ("REFUSED", 0), "{}", outside.text);
    assert_eq!(up.count("outside.example", "A"), 1, "the question itself left: the documented trade-off");
    let txt = dig(dns, &["-b", "127.0.0.2", "unlisted.example", "HTTPS"]).await;
    assert_eq!(txt.status, "REFUSED", "only address queries are CIDR-admitted: {}", txt.text);
    // Literal-only role: refused unasked.
    let literal = dig(dns, &["-b", "127.0.0.3", "unlisted.example"]).await;
    assert_eq!(literal.status, "REFUSED", "{}", literal.text);
    assert_eq!(up.count("unlisted.example", "A"), 1, "only the resolving role's question was asked: {:?}", up.seen());
    assert_eq!(up.count("unlisted.example", "HTTPS"), 0);
}

/// Raw bytes the listener must survive, then still answer `dig`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_datagrams_and_tcp_frames_leave_the_listener_serving() {
    let up = upstream::start(&records()).await;
    let dns = start("malformed", &config("127.0.0.1:0", up.addr, "")).await.dns;
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.connect(dns).await.unwrap();
    // Short, a response (QR set), garbage after a header: the first two dropped.
    for junk in [&b"\x12"[..], &[0xab, 0xcd, 0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0][..]] {
        udp.send(junk).await.unwrap();
    }
    let header_then_junk = [0xbe, 0xef, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff];
    udp.send(&header_then_junk).await.unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(STEP, udp.recv(&mut buf)).await.expect("a FORMERR answer").unwrap();
    assert_eq!((&buf[..2], buf[2] & 0x80, buf[3] & 0x0f), (&[0xbe, 0xef][..], 0x80, 1), "FORMERR: {:?}", &buf[..n]);
    // Two questions in one query: FORMERR too.
    let mut two = vec![0x11, 0x22, 0x01, 0x00, 0x00, 0x02, 0, 0, 0, 0, 0, 0];
    for _ in 0..2 {
        two.extend_from_slice(b"\x07allowed\x04test\x00\x00\x01\x00\x01");
    }
    udp.send(&two).await.unwrap();
    let n = tokio::time::timeout(STEP, udp.recv(&mut buf)).await.unwrap().unwrap();
    assert_eq!((&buf[..2], buf[3] & 0x0f), (&[0x11, 0x22][..], 1), "{:?}", &buf[..n]);
    // TCP: garbage in a frame gets FORMERR on the same connection; an empty
    // frame and a frame that never completes close theirs.
    let mut tcp = TcpStream::connect(dns).await.unwrap();
    tcp.write_all(&[0, 15]).await.unwrap();
    tcp.write_all(&header_then_junk).await.unwrap();
    let len = tokio::time::timeout(STEP, tcp.read_u16()).await.expect("an answer in time").expect("a length prefix");
    let mut reply = vec![0u8; usize::from(len)];
    tcp.read_exact(&mut reply).await.unwrap();
    assert_eq!((&reply[..2], reply[3] & 0x0f), (&[0xbe, 0xef][..], 1));
    tcp.write_all(&[0, 0]).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(STEP, tcp.read_to_end(&mut rest)).await.expect("closed").unwrap();
    let mut half = TcpStream::connect(dns).await.unwrap();
    half.write_all(&[0x40, 0x00, 0xde, 0xad]).await.unwrap();
    drop(half);
    for transport in ["+notcp", "+tcp"] {
        let ok = dig(dns, &[transport, "allowed.test"]).await;
        assert_eq!(rdata(&ok), ["11.0.0.10"], "{}", ok.text);
    }
}

/// A CONNECT whose ClientHello offers ECH is refused (`ech-refused`) before
/// a byte reaches the origin; a role with `allow_ech` is let through on the
/// outer name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ech_client_hello_is_refused_on_connect_unless_the_role_allows_it() {
    let origin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = origin.local_addr().unwrap().port();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
    let log = received.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = origin.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut got)).await;
                log.lock().unwrap().push(got);
            });
        }
    });
    let up = upstream::start(&records()).await;
    let yaml = |allow_ech: bool| {
        format!(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\ndns_listen: 127.0.0.1:0\n\
             dns:\n  nameservers: [\"{}\"]\n  static:\n    public.test: [127.0.0.1]\n\
             allow_ranges: [127.0.0.1/32]\n\
             roles:\n  default:\n    allow_ech: {allow_ech}\n    allow:\n      domains: [public.test]\n      connect_ports: [{port}]\n",
            up.addr
        )
    };
    let hello = hello::with_ech("public.test");
    for (allow_ech, relayed) in [(false, false), (true, true)] {
        let running = start(&format!("ech-{allow_ech}"), &yaml(allow_ech)).await;
        let (resp, mut tunnel) = common::connect(running.proxy, &format!("public.test:{port}")).await;
        assert_eq!(resp.status, 200);
        tunnel.write_all(&hello).await.unwrap();
        if relayed {
            tunnel.shutdown().await.unwrap();
        }
        let mut back = Vec::new();
        let _ = tokio::time::timeout(STEP, tunnel.read_to_end(&mut back)).await.expect("the tunnel ends");
        let refused = "portcullis_requests_total{decision=\"deny\",kind=\"connect\",reason=\"ech-refused\",role=\"default\"} 1";
        // The tunnel's line is counted once it is torn down, after the alert.
        let deadline = std::time::Instant::now() + STEP;
        let mut metrics = running.metrics().await;
        while !relayed && !metrics.contains(refused) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            metrics = running.metrics().await;
        }
        if relayed {
            let deadline = std::time::Instant::now() + STEP;
            while !received.lock().unwrap().contains(&hello) {
                assert!(std::time::Instant::now() < deadline, "the origin never got the hello");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(!metrics.contains(refused), "{metrics}");
        } else {
            assert_eq!(back, [21, 3, 3, 0, 2, 2, 49], "an access_denied alert");
            assert!(metrics.contains(refused), "{metrics}");
        }
    }
    assert_eq!(received.lock().unwrap().iter().filter(|g| !g.is_empty()).count(), 1, "only the allow_ech tunnel carried bytes");
}

/// `portcullis check dns:NAME[/TYPE]` decides like the listener, asking the
/// upstream only for an admitted question.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_decides_a_query_like_the_listener() {
    let up = upstream::start(&records()).await;
    let path = temp_file("dns-check", "portcullis.yaml", &config("127.0.0.1:5353", up.addr, ""));
    let config = path.to_str().unwrap().to_string();
    let cases: [(&str, i32, &str); 5] = [
        ("dns:allowed.test", 0, "allow dns allowed.test/A role=default by=domain rcode=NOERROR answers=11.0.0.10"),
        ("dns:allowed.test/AAAA", 0, "answers=2600::10"),
        ("dns:metadata.google.internal", 1, "deny dns metadata.google.internal/A role=default reason=denied-name:metadata"),
        ("dns:allowed.test/TXT", 1, "reason=type-not-allowed"),
        ("dns:rebind.test", 1, "reason=denied-range:metadata"),
    ];
    for (arg, code, want) in cases {
        let (config, arg) = (config.clone(), arg.to_string());
        let (got, stdout, stderr) = tokio::task::spawn_blocking(move || portcullis(&["check", "--config", &config, &arg])).await.unwrap();
        assert_eq!(got, code, "{stdout}{stderr}");
        assert!(stdout.contains(want), "want {want:?} in {stdout}");
    }
    assert!(!up.saw_any_under("metadata.google.internal") && up.count("allowed.test", "TXT") == 0, "{:?}", up.seen());
}

/// glibc, Python and Node resolve through the listener as the system
/// resolver (see dns/system.rs).
#[test]
fn system_resolvers_get_allowed_names_only() {
    netns::in_own_netns("system_resolvers_get_allowed_names_only", system::scenario);
}

#[test]
fn ech_client_hello_is_refused_on_the_transparent_path_unless_the_role_allows_it() {
    netns::in_own_netns("ech_client_hello_is_refused_on_the_transparent_path_unless_the_role_allows_it", ech::scenario);
}

/// The DNS listener's address, from a spawned binary's startup line.
fn dns_addr(proxy: &common::BinaryProxy) -> SocketAddr {
    let line: serde_json::Value = serde_json::from_str(&proxy.startup).unwrap();
    line["dns"].as_str().and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("no dns address in {}", proxy.startup))
}

/// A role's own `dns.allow_types` lets its clients ask TXT; a client of a
/// role without it is refused and the upstream never sees the question.
/// `portcullis check dns:` decides per role alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_allows_txt_gets_it_forwarded_and_other_roles_are_refused() {
    let up = upstream::start(&records()).await;
    let yaml = format!(
        "dns_listen: 127.0.0.1:0\ndns:\n  nameservers: [\"{}\"]\n  allow_types: [MX]\n\
         identity:\n  sources:\n    - {{cidr: 127.0.0.2/32, role: txt-reader}}\n\
         roles:\n  default:\n    allow:\n      domains: [allowed.test]\n\
         \x20 txt-reader:\n    dns:\n      allow_types: [TXT]\n    allow:\n      domains: [allowed.test]\n",
        up.addr
    );
    let path = temp_file("dns-role-types", "portcullis.yaml", "");
    let proxy = common::BinaryProxy::spawn(&path, &yaml).await;
    let dns = dns_addr(&proxy);
    let refused = dig(dns, &["allowed.test", "TXT"]).await;
    assert_eq!((refused.status.as_str(), refused.answers.len()), ("REFUSED", 0), "{}", refused.text);
    assert_eq!(up.count("allowed.test", "TXT"), 0, "the default role's TXT question left: {:?}", up.seen());
    let txt = dig(dns, &["-b", "127.0.0.2", "allowed.test", "TXT"]).await;
    assert_eq!((txt.status.as_str(), rdata(&txt)), ("NOERROR", vec!["\"v=secret\"".to_string()]), "{}", txt.text);
    assert_eq!(up.count("allowed.test", "TXT"), 1);
    // The role's list replaces the global one: MX is forwarded for the default role only.
    let mx = dig(dns, &["-b", "127.0.0.2", "allowed.test", "MX"]).await;
    assert_eq!(mx.status, "REFUSED", "{}", mx.text);
    let mx = dig(dns, &["allowed.test", "MX"]).await;
    assert_eq!(mx.status, "NOERROR", "{}", mx.text);
    assert_eq!(up.count("allowed.test", "MX"), 1, "{:?}", up.seen());
    let metrics = proxy.metrics().await;
    for series in [
        "portcullis_dns_queries_total{decision=\"deny\",qtype=\"TXT\",reason=\"type-not-allowed\",role=\"default\"} 1",
        "portcullis_dns_queries_total{decision=\"allow\",qtype=\"TXT\",reason=\"domain\",role=\"txt-reader\"} 1",
    ] {
        assert!(metrics.contains(series), "{series} missing from\n{metrics}");
    }
    let config = path.to_str().unwrap().to_string();
    let cases: [(&[&str], i32, &str); 2] = [
        (&[], 1, "deny dns allowed.test/TXT role=default reason=type-not-allowed"),
        (&["--role", "txt-reader"], 0, "allow dns allowed.test/TXT role=txt-reader by=domain rcode=NOERROR answers="),
    ];
    for (role, code, want) in cases {
        let mut args = vec!["check".to_string(), "--config".into(), config.clone()];
        args.extend(role.iter().map(|a| a.to_string()));
        args.push("dns:allowed.test/TXT".into());
        let (got, stdout, stderr) = tokio::task::spawn_blocking(move || portcullis(&args.iter().map(String::as_str).collect::<Vec<_>>())).await.unwrap();
        assert_eq!(got, code, "{stdout}{stderr}");
        assert!(stdout.contains(want) && (code != 0 || stdout.contains("v=secret")), "want {want:?} in {stdout}");
    }
    assert_eq!(up.count("allowed.test", "TXT"), 2, "only the txt-reader checks asked: {:?}", up.seen());
}

/// Waits (bounded) until `done` holds, polling.
async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + STEP;
    while !done().await {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `max_in_flight` and `max_tcp_connections` follow a reload of the file
/// without restarting the listener; a bad value is refused and the last
/// good limits stay; a changed `dns_listen` is logged as needing a restart.
/// The upstream never answers `silent.*` names, which holds their queries
/// in flight (the upstream timeout is longer than the test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_limits_follow_a_reload_and_a_bad_value_keeps_the_last_good_ones() {
    let up = upstream::start(&records()).await;
    let yaml = |listen: &str, in_flight: usize, tcp: usize| {
        format!(
            "reload:\n  interval: 100ms\ndns_listen: {listen}\n\
             dns:\n  nameservers: [\"{}\"]\n  timeout: 60s\n  listener: {{max_in_flight: {in_flight}, max_tcp_connections: {tcp}}}\n\
             roles:\n  default:\n    allow:\n      domains: [allowed.test, \"*.allowed.test\"]\n",
            up.addr
        )
    };
    let path = temp_file("dns-limits-reload", "portcullis.yaml", "");
    let proxy = common::BinaryProxy::spawn(&path, &yaml("127.0.0.1:0", 1, 1)).await;
    let dns = dns_addr(&proxy);
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let ask = async |n: u16| {
        let name = format!("silent.{n}.allowed.test");
        let mut q = vec![0, n as u8, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        udp.send_to(&q, dns).await.unwrap();
        name
    };
    let over_limit = async |n: usize| {
        let want = format!("portcullis_dns_dropped_total{{reason=\"over-limit\"}} {n}\n");
        until(&want.clone(), async || proxy.metrics().await.contains(&want)).await;
    };
    let reloads = async |result: &str, n: usize| {
        let want = format!("portcullis_config_reloads_total{{result=\"{result}\"}} {n}\n");
        until(&want.clone(), async || proxy.metrics().await.contains(&want)).await;
    };
    // max_in_flight 1: the second query is dropped unasked.
    let first = ask(1).await;
    until("the first query upstream", async || up.count(&first, "A") == 1).await;
    let second = ask(2).await;
    over_limit(1).await;
    // max_tcp_connections 1: a second connection is closed at once.
    let _held = TcpStream::connect(dns).await.unwrap();
    let mut closed = TcpStream::connect(dns).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(STEP, closed.read_to_end(&mut rest)).await.expect("closed at once").unwrap();
    over_limit(2).await;

    // Raised (and dns_listen changed, which needs a restart): the running
    // listener takes more queries and connections.
    proxy.rewrite(&yaml("127.0.0.2:0", 3, 2));
    reloads("success", 1).await;
    let restart = proxy.lines_with(&["dns_listen", "take effect only after a restart"], 1).await;
    assert!(!restart.is_empty(), "a changed dns_listen is logged");
    let third = ask(3).await;
    until("the third query upstream", async || up.count(&third, "A") == 1).await;
    let mut tcp = TcpStream::connect(dns).await.unwrap();
    let query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07allowed\x04test\x00\x00\x01\x00\x01";
    tcp.write_all(&[&(query.len() as u16).to_be_bytes()[..], query].concat()).await.unwrap();
    let len = tokio::time::timeout(STEP, tcp.read_u16()).await.expect("answered over a second connection").unwrap();
    let mut reply = vec![0u8; usize::from(len)];
    tcp.read_exact(&mut reply).await.unwrap();
    assert_eq!((&reply[..2], reply[3] & 0x0f), (&[0x12, 0x34][..], 0), "{reply:?}");

    // A bad value is refused; the limit of 3 stays (not 0, not 1).
    proxy.rewrite(&yaml("127.0.0.2:0", 0, 2));
    reloads("failure", 1).await;
    let fourth = ask(4).await;
    until("the fourth query upstream", async || up.count(&fourth, "A") == 1).await;
    let fifth = ask(5).await;
    over_limit(3).await;
    for name in [second, fifth] {
        assert_eq!(up.count(&name, "A"), 0, "{name} was dropped, yet asked: {:?}", up.seen());
    }
}
