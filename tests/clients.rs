//! Real, unmodified clients through the real binary: curl, Python (urllib
//! and requests), Java (HttpClient and HttpURLConnection, single-file
//! `java Client.java`) and Node `fetch` with undici's `EnvHttpProxyAgent`,
//! against loopback origins (HTTP, and HTTPS with a test CA).
//!
//! Clients send names to the proxy and the proxy resolves them through the
//! test DNS server, so the clients need no DNS of their own. Each client
//! runs every case in one process (see `tests/clients/`). `.ci/run`
//! installs the runtimes and `tests/clients/node_modules`; a missing one
//! fails the test, it is never skipped.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use sha2::{Digest, Sha256};

/// Where the client programs and the Node package live.
fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// Loopback origins, the test CA, and two proxies: `plain` (no identity
/// rules) and `challenge` (`challenge_unauthenticated`, alice → team).
struct World {
    http: u16,
    https: u16,
    ca: PathBuf,
    plain: BinaryProxy,
    challenge: BinaryProxy,
    _dns: DnsServer,
}

const ALICE_PASSWORD: &str = "alice-secret";

impl World {
    async fn start(tag: &str) -> World {
        let (ca_pem, tls) = test_ca_and_server_tls(&["origin.test", "team.test"]);
        let ca = temp_file(tag, "ca.pem", &ca_pem);
        let http = start_http_origin().await.port();
        let https = start_https_origin(tls).await.port();
        let dns = start_dns(&[
            ("origin.test", &["127.0.0.1"]),
            ("team.test", &["127.0.0.1"]),
            ("blocked.test", &["127.0.0.1"]),
        ])
        .await;
        let policy = format!(
            "dns:\n  nameservers: [\"{}\"]\nallow_ranges: [127.0.0.1/32]\ndeny_message: \"ask in #egress\"\nroles:\n  default:\n    allow:\n      domains: [origin.test]\n      http_ports: [{http}]\n      connect_ports: [{https}]\n  team:\n    allow:\n      domains: [team.test]\n      http_ports: [{http}]\n      connect_ports: [{https}]\n",
            dns.addr
        );
        let digest: String = Sha256::digest(ALICE_PASSWORD.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        let identity = format!(
            "identity:\n  challenge_unauthenticated: true\n  credentials:\n    - {{user: alice, password_sha256: \"{digest}\", role: team}}\n"
        );
        let dir = ca.parent().unwrap();
        let plain = BinaryProxy::spawn(&dir.join("plain.yaml"), &policy).await;
        let challenge = BinaryProxy::spawn(&dir.join("challenge.yaml"), &format!("{identity}{policy}")).await;
        World { http, https, ca, plain, challenge, _dns: dns }
    }

    /// The shared cases: allowed GET and POST over HTTP and HTTPS, then a
    /// metadata and a not-allow-listed deny over each. Tab-separated
    /// `id METHOD URL BODY`, as the client programs read them.
    fn cases(&self) -> Vec<[String; 4]> {
        let (h, s) = (self.http, self.https);
        [
            ("get-http", "GET", format!("http://origin.test:{h}/headers"), ""),
            ("post-http", "POST", format!("http://origin.test:{h}/echo"), "posted-over-http"),
            ("get-https", "GET", format!("https://origin.test:{s}/headers"), ""),
            ("post-https", "POST", format!("https://origin.test:{s}/echo"), "posted-over-https"),
            ("meta-http", "GET", "http://169.254.169.254/latest/meta-data/".to_string(), ""),
            ("meta-https", "GET", "https://169.254.169.254/latest/meta-data/".to_string(), ""),
            ("blocked-http", "GET", format!("http://blocked.test:{h}/"), ""),
            ("blocked-https", "GET", format!("https://blocked.test:{s}/"), ""),
        ]
        .into_iter()
        .map(|(id, method, url, body)| [id.to_string(), method.to_string(), url, body.to_string()])
        .collect()
    }

    /// The environment every client gets: the proxy variables in both
    /// cases (curl reads only lower-case `http_proxy`), no NO_PROXY, and
    /// the test CA.
    fn env(&self, cmd: &mut Command) {
        let proxy = format!("http://{}", self.plain.addr);
        for var in ["NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"] {
            cmd.env_remove(var);
        }
        for var in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"] {
            cmd.env(var, &proxy);
        }
        cmd.env("CLIENT_CA", &self.ca)
            .env("NODE_EXTRA_CA_CERTS", &self.ca)
            .env("CLIENT_PROXY", self.plain.addr.to_string())
            .env("CLIENT_AUTH_PROXY", self.challenge.addr.to_string())
            .env("CLIENT_AUTH_USER", "alice")
            .env("CLIENT_AUTH_PASS", ALICE_PASSWORD);
    }
}

/// What a client reported for one case: the HTTP status (or `error`) and
/// the text a user sees.
type Reports = HashMap<String, (String, String)>;

/// Runs a batch client (`tests/clients/` protocol) off the async runtime,
/// so the in-process origins keep serving meanwhile.
async fn run_batch(mut cmd: Command, cases: Vec<[String; 4]>) -> Reports {
    let label = format!("{cmd:?}");
    let output = tokio::task::spawn_blocking(move || {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?} ({e}); .ci/run installs the client runtimes"));
        let input: String = cases.iter().map(|c| c.join("\t") + "\n").collect();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{label} failed: {}\n{stdout}", String::from_utf8_lossy(&output.stderr));
    stdout
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, '\t');
            Some((f.next()?.to_string(), (f.next()?.to_string(), f.next().unwrap_or("").to_string())))
        })
        .collect()
}

/// Runs curl once per case (`-v` adds the status line to what it prints).
async fn run_curl(world: &World, cases: Vec<[String; 4]>, verbose: bool) -> Reports {
    let mut reports = Reports::new();
    for [id, method, url, body] in cases {
        let mut cmd = Command::new("curl");
        world.env(&mut cmd);
        cmd.args(["-sS", "--max-time", "10", "--cacert"]).arg(&world.ca).args(["-X", &method, "-w", "\n%{http_code}"]);
        if verbose {
            cmd.arg("-v");
        }
        if !body.is_empty() {
            cmd.args(["--data-binary", &body]);
        }
        cmd.arg(&url);
        let output = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().expect("curl runs; .ci/run installs it");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let (text, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        let status = if code == "000" { "error".to_string() } else { code.to_string() };
        let text = format!("{text} {}", String::from_utf8_lossy(&output.stderr));
        reports.insert(id, (status, text.split_whitespace().collect::<Vec<_>>().join(" ")));
    }
    reports
}

/// Whether a client shows the reason code of a deny, or only the status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shows {
    Reason,
    CodeOnly,
}

/// Checks one client's reports for the shared cases (ids with `suffix`):
/// allowed requests reached the origin; denies carry the reason code where
/// the client can show it (`http`, `https`: for forwarded HTTP and for a
/// refused CONNECT), and the 403 at least otherwise.
fn check_cases(client: &str, reports: &Reports, suffix: &str, http: Shows, https: Shows) {
    let report = |id: &str| {
        let key = format!("{id}{suffix}");
        reports.get(&key).unwrap_or_else(|| panic!("{client}: no report for {key}: {reports:?}")).clone()
    };
    for (id, marker) in [
        ("get-http", "GET /headers"),
        ("post-http", "posted-over-http"),
        ("get-https", "GET /headers"),
        ("post-https", "posted-over-https"),
    ] {
        let (status, text) = report(id);
        assert_eq!(status, "200", "{client} {id}: {text}");
        assert!(text.contains(marker), "{client} {id}: {text}");
    }
    for (id, reason, shows) in [
        ("meta-http", "denied-range:metadata", http),
        ("meta-https", "denied-range:metadata", https),
        ("blocked-http", "not-allowlisted", http),
        ("blocked-https", "not-allowlisted", https),
    ] {
        let (status, text) = report(id);
        assert!(status == "403" || (status == "error" && shows_403(&text)), "{client} {id}: {status} {text}");
        match shows {
            Shows::Reason => assert!(text.contains(reason), "{client} {id} must show {reason}: {text}"),
            Shows::CodeOnly => assert!(shows_403(&text), "{client} {id} must show the status code: {text}"),
        }
    }
}

/// Whether `text` names the status 403 as a number of its own: not the
/// digits of a longer number such as the ephemeral port 40312 in a URL.
fn shows_403(text: &str) -> bool {
    let bytes = text.as_bytes();
    text.match_indices("403").any(|(at, _)| {
        let before = at.checked_sub(1).map(|i| bytes[i]);
        let after = bytes.get(at + 3).copied();
        !before.is_some_and(|b| b.is_ascii_digit()) && !after.is_some_and(|b| b.is_ascii_digit())
    })
}

#[test]
fn a_port_is_not_a_status() {
    assert!(shows_403("HTTP/1.1 403 Forbidden") && shows_403("status=403") && shows_403("(403)"));
    assert!(!shows_403("https://origin.test:40312/") && !shows_403("port 14030") && !shows_403("1403"));
}

/// Allowed requests to both origin ports left allow lines: the proxy
/// carried them (the clients could not even resolve `origin.test` alone).
async fn assert_proxied(proxy: &BinaryProxy, world: &World) {
    for port in [world.http, world.https] {
        let allowed = proxy.lines_with(&["\"decision\":\"allow\"", "\"host\":\"origin.test\"", &format!("\"port\":{port},")], 1).await;
        assert!(!allowed.is_empty(), "no allow line for port {port}: {:?}", proxy.log.lock().unwrap());
    }
}

/// What a user runs after a failed HTTPS request, `portcullis why` against
/// the proxy's admin port: it lists this client's denials with the reason
/// of each HTTPS deny the client itself may not have shown.
fn assert_why_names_the_https_reasons(client: &str, world: &World) {
    let admin = world.plain.admin.to_string();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    for var in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "PORTCULLIS_ADMIN"] {
        cmd.env_remove(var);
    }
    let out = cmd.args(["why", "--admin", &admin]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{client}: why: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    for want in [
        format!(" connect blocked.test:{}  not-allowlisted  role=default", world.https),
        " connect 169.254.169.254:443  denied-range:metadata  role=default".to_string(),
    ] {
        assert!(stdout.contains(&want), "{client}: `portcullis why` lacks {want:?}:\n{stdout}");
    }
}

#[tokio::test]
async fn curl() {
    let world = World::start("clients-curl").await;
    let reports = run_curl(&world, world.cases(), false).await;
    // curl prints the body of a forwarded answer, and for a refused CONNECT
    // only "CONNECT tunnel failed, response 403"; with -v the status line.
    check_cases("curl", &reports, "", Shows::Reason, Shows::CodeOnly);
    let verbose: Vec<_> = world.cases().into_iter().filter(|c| c[0].ends_with("-https")).collect();
    let reports = run_curl(&world, verbose, true).await;
    for id in ["meta-https", "blocked-https"] {
        let (_, text) = &reports[id];
        assert!(text.contains("403 Forbidden (portcullis: "), "curl -v {id}: {text}");
    }
    assert_proxied(&world.plain, &world).await;
    assert_why_names_the_https_reasons("curl", &world);
}

#[tokio::test]
async fn python_urllib_and_requests() {
    let world = World::start("clients-python").await;
    for library in ["urllib", "requests"] {
        let mut cmd = Command::new("python3");
        cmd.arg(clients_dir().join("client.py")).arg(library);
        world.env(&mut cmd);
        let reports = run_batch(cmd, world.cases()).await;
        // Both put the status line in the exception of a refused CONNECT.
        check_cases(library, &reports, "", Shows::Reason, Shows::Reason);
    }
    assert_proxied(&world.plain, &world).await;
    assert_why_names_the_https_reasons("python", &world);
}

#[tokio::test]
async fn java_httpclient_and_httpurlconnection() {
    let world = World::start("clients-java").await;
    let mut cmd = Command::new("java");
    // The JDK disables Basic for proxy authentication on CONNECT unless told.
    cmd.arg("-Djdk.http.auth.tunneling.disabledSchemes=").arg(clients_dir().join("Client.java"));
    world.env(&mut cmd);
    let mut cases = world.cases();
    let (h, s) = (world.http, world.https);
    cases.push(["auth-http".into(), "GET".into(), format!("http://team.test:{h}/headers"), String::new()]);
    cases.push(["auth-https".into(), "GET".into(), format!("https://team.test:{s}/headers"), String::new()]);
    let reports = run_batch(cmd, cases).await;
    // HttpClient reports a refused CONNECT as "Tunnel failed, got: 403";
    // HttpURLConnection quotes the whole status line.
    check_cases("Java HttpClient", &reports, "-hc", Shows::Reason, Shows::CodeOnly);
    check_cases("Java HttpURLConnection", &reports, "-uc", Shows::Reason, Shows::Reason);
    assert_proxied(&world.plain, &world).await;
    assert_why_names_the_https_reasons("java", &world);
    // Credentials are sent only when challenged: the default role would deny
    // team.test, so the challenge proxy asks, and the client gets its role.
    for id in ["auth-http-hc", "auth-http-uc", "auth-https-hc", "auth-https-uc"] {
        let (status, text) = &reports[id];
        assert_eq!(status, "200", "{id}: {text}");
        assert!(text.contains("GET /headers"), "{id}: {text}");
    }
    let team = ["\"decision\":\"allow\"", "\"host\":\"team.test\"", "\"role\":\"team\"", "\"identity\":\"credentials\""];
    let team = world.challenge.lines_with(&team, 4).await;
    assert_eq!(team.len(), 4, "{team:?}");
    // Each API is challenged at least once (after that the JDK sends the
    // cached credentials first); every 407 line names the target.
    let challenged = world.challenge.lines_with(&["\"reason\":\"auth-required\""], 2).await;
    assert!(challenged.len() >= 2, "{:?}", world.challenge.log.lock().unwrap());
    assert!(challenged.iter().all(|l| l.contains("\"host\":\"team.test\"")), "407 lines name the target: {challenged:?}");
}

#[tokio::test]
async fn node_fetch_with_undici_env_proxy_agent() {
    let world = World::start("clients-node").await;
    assert!(
        clients_dir().join("node_modules/undici").is_dir(),
        "tests/clients/node_modules is missing: run `npm ci --prefix tests/clients` (.ci/run does)"
    );
    let mut cmd = Command::new("node");
    cmd.arg(clients_dir().join("client.mjs"));
    world.env(&mut cmd);
    let reports = run_batch(cmd, world.cases()).await;
    // EnvHttpProxyAgent tunnels http:// URLs too, so every deny is a refused
    // CONNECT, which undici reports as "Proxy response (403) !== 200".
    check_cases("undici", &reports, "", Shows::CodeOnly, Shows::CodeOnly);
    assert_why_names_the_https_reasons("undici", &world);
    // The http:// cases went through tunnels to an http_ports port.
    let tunnel = ["\"method\":\"CONNECT\"", "\"decision\":\"allow\"", &format!("\"port\":{},", world.http)];
    let tunnels = world.plain.lines_with(&tunnel, 1).await;
    assert!(!tunnels.is_empty(), "{:?}", world.plain.log.lock().unwrap());
}
