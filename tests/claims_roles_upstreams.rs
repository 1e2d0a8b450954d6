//! More security claims through the real binary and a real socket
//! (SECURITY.md, "Claims and the tests that prove them"): roles from
//! source addresses and credentials, 407 for missing credentials, hop-by-hop
//! headers never forwarded, hostile upstreams answered and released, and a
//! broken config refused while the old policy stays.

mod common;
#[path = "common/hostile.rs"]
mod hostile;


use common::*;
use hostile::{start_hostile_origin, start_logging_origin, Misbehaviour};
use sha2::{Digest, Sha256};

/// The role comes from credentials, else from the source address, else it
/// is `default`; each role reaches only its own names. With
/// `require_credentials`, a client without them gets 407 and a challenge.
#[tokio::test]
async fn roles_come_from_credentials_and_sources_and_missing_credentials_get_407() {
    let dns = start_dns(&[("a.test", &["127.0.0.1"]), ("b.test", &["127.0.0.1"])]).await;
    let origin = start_http_origin().await;
    let port = origin.port();
    let token_hash: String = Sha256::digest(b"team-a-token").iter().map(|b| format!("{b:02x}")).collect();
    let yaml = |require: bool| {
        format!(
            "dns:\n  nameservers: [\"{}\"]\nallow_ranges: [127.0.0.1/32]\nidentity:\n  require_credentials: {require}\n  \
             credentials:\n    - {{token_sha256: \"{token_hash}\", role: team-a}}\n  sources:\n    - {{cidr: 127.0.0.2/32, role: team-b}}\n\
             roles:\n  default: {{}}\n  team-a:\n    allow: {{domains: [a.test], http_ports: [{port}]}}\n  \
             team-b:\n    allow: {{domains: [b.test], http_ports: [{port}]}}\n",
            dns.addr
        )
    };
    let proxy = BinaryProxy::spawn(&temp_file("claims-roles", "roles.yaml", ""), &yaml(false)).await;
    let (a, b) = (format!("http://a.test:{port}/headers"), format!("http://b.test:{port}/headers"));
    let token = "Proxy-Authorization: Bearer team-a-token\r\n";
    let cases = [
        ("127.0.0.1", &a, token, 200, None),
        ("127.0.0.1", &b, token, 403, Some("not-allowlisted")),
        // Credentials win over the source address.
        ("127.0.0.2", &a, token, 200, None),
        ("127.0.0.2", &b, "", 200, None),
        ("127.0.0.2", &a, "", 403, Some("not-allowlisted")),
        // No identity: the default role, which allows nothing.
        ("127.0.0.1", &a, "", 403, Some("port-not-allowed")),
    ];
    for (source, url, headers, status, deny) in cases {
        let resp = get_from(proxy.addr, source, url, headers).await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (status, deny), "{source} {url} {headers:?}");
    }
    for (role, identity) in [("team-a", "credentials"), ("team-b", "source"), ("default", "default")] {
        let lines = proxy.lines_with(&[&format!("\"role\":\"{role}\",\"identity\":\"{identity}\"")], 1).await;
        assert!(!lines.is_empty(), "{role} by {identity} logged: {:#?}", proxy.log.lock().unwrap());
    }

    let strict = BinaryProxy::spawn(&temp_file("claims-roles", "required.yaml", ""), &yaml(true)).await;
    for source in ["127.0.0.1", "127.0.0.2"] {
        let resp = get_from(strict.addr, source, &a, "").await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (407, Some("auth-required")), "{source}");
        assert!(resp.header("proxy-authenticate").is_some_and(|v| v.contains("realm=\"portcullis\"")), "{source}");
    }
    assert_eq!(get_from(strict.addr, "127.0.0.1", &a, token).await.status, 200);
}

/// Headers that describe one hop (the fixed list and those `Connection`
/// names) and the proxy credentials never reach the origin; end-to-end
/// headers do.
#[tokio::test]
async fn hop_by_hop_headers_are_never_forwarded() {
    let (origin, heads) = start_logging_origin(false).await;
    let yaml = format!(
        "allow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    allow: {{cidrs: [127.0.0.1/32], http_ports: [{}]}}\n",
        origin.port()
    );
    let proxy = BinaryProxy::spawn(&temp_file("claims-roles", "hop.yaml", ""), &yaml).await;
    let request = format!(
        "GET http://{origin}/ HTTP/1.1\r\nHost: {origin}\r\nConnection: x-secret, keep-alive\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\n\
         Proxy-Connection: keep-alive\r\nTE: trailers\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nX-End: kept\r\n\r\n"
    );
    assert_eq!(send_raw(proxy.addr, &request).await.status, 200);
    let seen = heads.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    for gone in ["x-secret", "keep-alive", "proxy-connection", "\nte:", "proxy-authorization", "zm9vomjhcg"] {
        assert!(!seen[0].contains(gone), "{gone} reached the origin: {}", seen[0]);
    }
    assert!(seen[0].contains("x-end: kept"), "end-to-end headers are forwarded: {}", seen[0]);
}

/// An origin that refuses, closes early or never answers gets 502 or 504
/// with its own code and one dial; another client is served meanwhile, and
/// afterwards no connection is left open.
#[tokio::test]
async fn hostile_upstreams_get_502_or_504_and_release_resources() {
    let (good, _) = start_logging_origin(false).await;
    let (stall, stall_dials) = start_hostile_origin(Misbehaviour::Stall).await;
    let (close, close_dials) = start_hostile_origin(Misbehaviour::CloseEarly).await;
    let (refusing, _held) = refusing_addr();
    let ports: Vec<String> = [good, stall, close, refusing].iter().map(|a| a.port().to_string()).collect();
    let yaml = format!(
        "timeouts:\n  upstream_response: 1s\nallow_ranges: [127.0.0.1/32]\n\
         roles:\n  default:\n    allow: {{cidrs: [127.0.0.1/32], http_ports: [{}]}}\n",
        ports.join(", ")
    );
    let proxy = BinaryProxy::spawn(&temp_file("claims-roles", "hostile.yaml", ""), &yaml).await;
    let addr = proxy.addr;
    let stalled = tokio::spawn(async move { get(addr, &format!("http://{stall}/")).await });
    assert_eq!(get(proxy.addr, &format!("http://{good}/")).await.status, 200, "another client is served meanwhile");
    let resp = stalled.await.unwrap();
    assert_eq!((resp.status, resp.header("x-portcullis-error")), (504, Some("upstream-response-timeout")));
    let resp = get(proxy.addr, &format!("http://{close}/")).await;
    assert_eq!((resp.status, resp.header("x-portcullis-error")), (502, Some("upstream-error")));
    let resp = get(proxy.addr, &format!("http://{refusing}/")).await;
    assert_eq!((resp.status, resp.header("x-portcullis-error")), (502, Some("upstream-refused")));
    assert_eq!((*stall_dials.lock().unwrap(), *close_dials.lock().unwrap()), (1, 1), "one dial each, no retry");
    wait_until("every client connection is released", || async {
        let m = proxy.metrics().await;
        (metric_value(&m, "portcullis_active_connections") == 0.0 && metric_value(&m, "portcullis_active_tunnels") == 0.0).then_some(())
    })
    .await;
}

/// A config that fails validation is refused on reload and the policy in
/// force stays; the next valid config is taken.
#[tokio::test]
async fn a_broken_config_is_refused_and_the_old_policy_stays() {
    let origin = start_http_origin().await;
    let yaml = |ports: &str| {
        format!(
            "reload:\n  interval: 100ms\nallow_ranges: [127.0.0.1/32]\n\
             roles:\n  default:\n    allow: {{cidrs: [127.0.0.1/32], http_ports: [{ports}]}}\n"
        )
    };
    let proxy = BinaryProxy::spawn(&temp_file("claims-roles", "reload.yaml", ""), &yaml(&origin.port().to_string())).await;
    let url = format!("http://{origin}/headers");
    assert_eq!(get(proxy.addr, &url).await.status, 200);
    // An unknown key, and a role that allows everything: both must not load.
    proxy.rewrite("reload:\n  interval: 100ms\nroles:\n  default:\n    mode: open\n    allow: {cidr: [0.0.0.0/0]}\n");
    assert!(!proxy.lines_with(&["config reload refused"], 1).await.is_empty(), "the refusal is logged");
    let failed = "portcullis_config_reloads_total{result=\"failure\"}";
    wait_until("the refusal is counted", || async { (metric_value(&proxy.metrics().await, failed) >= 1.0).then_some(()) }).await;
    assert_eq!(get(proxy.addr, &url).await.status, 200, "the old policy is still in force");
    assert_eq!(metric_value(&proxy.metrics().await, "portcullis_policy_generation"), 1.0);

    proxy.rewrite(&yaml("1"));
    wait_until("the next valid config is taken", || async { (get(proxy.addr, &url).await.status == 403).then_some(()) }).await;
    let resp = get(proxy.addr, &url).await;
    assert_eq!(resp.header("x-portcullis-deny"), Some("port-not-allowed"));
}
