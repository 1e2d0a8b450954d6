//! The always-denied table, operator-declared internal ranges and NAT64
//! prefixes, transition-prefix rules, and the no-DNS switch, through the
//! real proxy socket and the real binary. Every denied destination is
//! refused before any dial (CI runs this in a loopback-only namespace).

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

/// Blocks the conformance run reached before the table was the whole
/// registries, plus the other clouds' metadata addresses.
#[tokio::test]
async fn registry_blocks_and_cloud_metadata_are_denied_on_both_paths() {
    let yaml = "roles:\n  default:\n    mode: open\n    allow:\n      http_ports: [80]\n      connect_ports: [443]\n";
    let proxy_binary = BinaryProxy::spawn(&temp_file("address-plan", "proxy1.yaml", ""), yaml).await;
    let proxy = proxy_binary.addr;
    let cases = [
        ("[5f00::1]", "denied-range:special"),
        ("[3fff::1]", "denied-range:special"),
        ("[2001:2::1]", "denied-range:special"),
        ("[2001:10::1]", "denied-range:special"),
        ("[2001:1::1]", "denied-range:special"),
        ("[100:0:0:1::1]", "denied-range:special"),
        ("[64:ff9b:1::a9fe:a9fe]", "denied-range:special"),
        ("[64:ff9b:1::808:808]", "denied-range:special"),
        ("192.0.0.9", "denied-range:special"),
        ("192.88.99.2", "denied-range:special"),
        ("169.254.42.42", "denied-range:metadata"),
        ("169.254.0.23", "denied-range:metadata"),
        ("[fd00:42::42]", "denied-range:metadata"),
        ("[fd20:ce::254]", "denied-range:metadata"),
        ("[fd00:a9fe:a9fe::1]", "denied-range:metadata"),
        ("[2002:a9fe:2a2a::1]", "denied-range:metadata"),
    ];
    for (host, reason) in cases {
        let resp = get(proxy, &format!("http://{host}/")).await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some(reason)), "GET {host}");
        let (resp, _) = connect(proxy, &format!("{host}:443")).await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some(reason)), "CONNECT {host}");
    }
}

/// `internal_ranges` deny like the built-in ranges (more specific than a
/// carve-out, so the loopback origin stays reachable beside them), and a
/// declared NAT64 prefix is judged by the IPv4 inside.
#[tokio::test]
async fn internal_ranges_and_nat64_prefixes_through_the_socket() {
    let origin = start_http_origin().await;
    let port = origin.port();
    let dns = start_dns(&[("pod.test", &["127.0.0.2"]), ("web.test", &["127.0.0.1"])]).await;
    let proxy_binary = BinaryProxy::spawn(&temp_file("address-plan", "proxy2.yaml", ""), &format!(
        "dns:\n  nameservers: [\"{dns}\"]\n  timeout: 1s\n\
         allow_ranges: [127.0.0.0/8]\n\
         internal_ranges: [127.0.0.2/32, \"2600:1f14:abc::/48\"]\n\
         nat64_prefixes: [\"2001:db8:64::/96\"]\n\
         roles:\n  default:\n    mode: open\n    allow:\n      http_ports: [80, {port}]\n      connect_ports: [443, {port}]\n",
        dns = dns.addr
    )).await;
    let proxy = proxy_binary.addr;
    let denied = [
        (format!("127.0.0.2:{port}"), "denied-range:internal"),
        (format!("pod.test:{port}"), "denied-range:internal"),
        (format!("[::ffff:127.0.0.2]:{port}"), "denied-range:internal"),
        ("[2600:1f14:abc::5]:443".to_string(), "denied-range:internal"),
        ("[2001:db8:64::a9fe:a9fe]:443".to_string(), "denied-range:metadata"),
        ("[2001:db8:64::7f00:2]:443".to_string(), "denied-range:internal"),
        ("[2001:db8:64::a00:1]:443".to_string(), "denied-range:private"),
        // Outside the declared prefix, 2001:db8::/32 is documentation space.
        ("[2001:db8:65::a9fe:a9fe]:443".to_string(), "denied-range:special"),
    ];
    for (authority, reason) in &denied {
        let resp = get(proxy, &format!("http://{authority}/")).await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some(*reason)), "GET {authority}");
        let (resp, _) = connect(proxy, authority).await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some(*reason)), "CONNECT {authority}");
    }
    let resp = get(proxy, &format!("http://web.test:{port}/headers")).await;
    assert_eq!(resp.status, 200, "the carved-out origin beside the internal /32 stays reachable");
}

/// A role `deny` written as an IPv4-mapped prefix works (it is unwrapped at
/// load); the IPv4 spelling and the mapped spelling are both denied.
#[tokio::test]
async fn deny_rule_written_as_a_mapped_prefix_takes_effect() {
    let origin = start_http_origin().await;
    let port = origin.port();
    let proxy_binary = BinaryProxy::spawn(&temp_file("address-plan", "proxy3.yaml", ""), &format!(
        "allow_ranges: [127.0.0.0/8]\nroles:\n  default:\n    mode: open\n    allow:\n      http_ports: [{port}]\n      connect_ports: [{port}]\n    deny:\n      cidrs: [\"::ffff:127.0.0.2/128\", \"64:ff9b::7f00:3/128\"]\n"
    )).await;
    let proxy = proxy_binary.addr;
    for host in ["127.0.0.2", "[::ffff:127.0.0.2]", "[::ffff:7f00:2]", "127.0.0.3", "[64:ff9b::127.0.0.3]"] {
        let (resp, _) = connect(proxy, &format!("{host}:{port}")).await;
        assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("denied-by-role")), "CONNECT {host}");
    }
    let (resp, _) = connect(proxy, &format!("127.0.0.1:{port}")).await;
    assert_eq!(resp.status, 200, "an address outside the deny rule is tunnelled");
}

/// With `resolve_unlisted_names: false` a name outside the domain rules is
/// denied and no query for it reaches the DNS server (no exfiltration
/// channel); with the default, the same request is resolved (and then
/// denied on its address), which the DNS server records.
#[tokio::test]
async fn unlisted_names_are_not_resolved_when_the_switch_is_off() {
    let dns = start_dns(&[("c2VjcmV0.exfil.test", &["8.8.8.8"]), ("listed.test", &["127.0.0.1"])]).await;
    let origin = start_http_origin().await;
    let port = origin.port();
    let config = |resolve: bool| {
        format!(
            "dns:\n  nameservers: [\"{dns}\"]\n  timeout: 1s\nallow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    allow:\n      domains: [listed.test]\n      cidrs: [127.0.0.1/32, 8.8.4.0/24]\n      resolve_unlisted_names: {resolve}\n      http_ports: [{port}]\n      connect_ports: [{port}]\n",
            dns = dns.addr
        )
    };
    let strict_binary = BinaryProxy::spawn(&temp_file("address-plan", "strict4.yaml", ""), &config(false)).await;
    let strict = strict_binary.addr;
    let resp = get(strict, &format!("http://c2VjcmV0.exfil.test:{port}/")).await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("not-allowlisted")));
    let (resp, _) = connect(strict, &format!("c2VjcmV0.exfil.test:{port}")).await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("not-allowlisted")));
    assert!(dns.queries.lock().unwrap().is_empty(), "no query may leave: {:?}", dns.queries.lock().unwrap());
    // CIDR rules still admit IP literals, domain rules still admit names.
    let (resp, _) = connect(strict, &format!("127.0.0.1:{port}")).await;
    assert_eq!(resp.status, 200);
    let resp = get(strict, &format!("http://listed.test:{port}/headers")).await;
    assert_eq!(resp.status, 200);

    let lenient_binary = BinaryProxy::spawn(&temp_file("address-plan", "lenient5.yaml", ""), &config(true)).await;
    let lenient = lenient_binary.addr;
    let resp = get(lenient, &format!("http://c2VjcmV0.exfil.test:{port}/")).await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("not-allowlisted")));
    assert!(dns.queries.lock().unwrap().contains_key("c2vjcmv0.exfil.test."), "the default resolves the name");
}

fn write_config(name: &str, text: &str) -> PathBuf {
    temp_file("plan", name, text)
}

/// The real binary refuses rules that could never match, with file, line
/// and reason, and `check` applies an unwrapped deny rule.
#[test]
fn validate_refuses_transition_prefixes_that_cannot_match() {
    let bin = env!("CARGO_BIN_EXE_portcullis");
    let bad = write_config("teredo.yaml", "roles:\n  default:\n    mode: open\n    deny:\n      cidrs: [\"10.0.0.0/8\", \"2001::/32\"]\n");
    let out = Command::new(bin).args(["validate", "--config", bad.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("teredo.yaml") && stderr.contains("line 5") && stderr.contains("Teredo prefix"), "{stderr}");

    let good = write_config("mapped.yaml", "roles:\n  default:\n    mode: open\n    deny:\n      cidrs: [\"::ffff:8.8.8.0/120\"]\n");
    let config = good.to_str().unwrap();
    for (target, code, want) in [
        ("8.8.8.8:443", 1, "reason=denied-by-role"),
        ("[::ffff:8.8.8.8]:443", 1, "reason=denied-by-role"),
        ("[2002:808:808::1]:443", 1, "reason=denied-by-role"),
        ("8.8.4.4:443", 0, "allow connect"),
    ] {
        let out = Command::new(bin).args(["check", "--config", config, target]).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(code), "{target}: {stdout}");
        assert!(stdout.contains(want), "{target}: {stdout}");
    }
}
