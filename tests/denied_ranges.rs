//! Every always-denied row, through the explicit proxy socket of the real
//! binary: an address inside each row of the IANA special-purpose
//! registries and of README.md's additions, as GET and as CONNECT. What
//! must happen comes from tests/common/iana.rs, a hand-typed copy of the
//! registries' "Globally Reachable" column with its documented exceptions,
//! not from the table the proxy compiles. The role is `open`, so only the
//! always-denied table stands between the request and a dial (CI runs this
//! in a loopback-only namespace, where a wrong allow fails to connect).
//! Globally reachable rows are not dialed here; the unit test
//! `every_registry_row_is_decided` checks that they are allowed.

mod common;
#[path = "common/iana.rs"]
mod iana;

use std::net::{IpAddr, SocketAddr};

use common::*;
use iana::Expect;

/// `host:port` for an address, IPv6 in brackets, in std's canonical text.
fn authority(addr: IpAddr, port: u16) -> String {
    SocketAddr::new(addr, port).to_string()
}

async fn assert_denied(proxy: SocketAddr, addr: IpAddr, kind: &str, why: &str) {
    let want = (403, Some(format!("denied-range:{kind}")));
    let resp = get(proxy, &format!("http://{}/", authority(addr, 80))).await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny").map(str::to_string)), want, "GET {addr} ({why}): {}", resp.text());
    let (resp, _) = connect(proxy, &authority(addr, 443)).await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny").map(str::to_string)), want, "CONNECT {addr} ({why}): {}", resp.text());
}

#[tokio::test]
async fn every_always_denied_row_is_denied_through_the_explicit_proxy() {
    let origin = start_http_origin().await;
    let yaml = format!(
        "allow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    mode: open\n    allow:\n      http_ports: [80, {port}]\n      connect_ports: [443]\n",
        port = origin.port()
    );
    let proxy = BinaryProxy::spawn(&temp_file("denied-ranges", "portcullis.yaml", ""), &yaml).await;
    // The role lets through what the table does not deny: the carved-out
    // origin answers, so a 403 below is the table's doing.
    let resp = get(proxy.addr, &format!("http://{origin}/headers")).await;
    assert_eq!(resp.status, 200, "the open role reaches an allowed address");

    let mut tried = 0;
    for (addr, kind, row) in iana::denied_addresses() {
        assert_eq!(iana::expected(addr), Some(Expect::Deny(kind)));
        assert_denied(proxy.addr, addr, kind, &format!("{} {}", row.prefix, row.name)).await;
        tried += 1;
    }
    for (text, carried) in iana::CARRIED {
        let Some(kind) = carried else { continue };
        assert_denied(proxy.addr, text.parse().unwrap(), kind, "a transition form, judged by the IPv4 inside").await;
        tried += 1;
    }
    // Every registry row's column was read: the denied rows of both
    // registries, README's additions and the transition forms.
    assert!(tried >= 90, "{tried} addresses tried");
    for must in ["168.63.129.16", "169.254.170.2", "169.254.170.23", "100.64.0.1", "172.16.0.1", "fc00::1", "224.0.0.1", "ff02::1", "255.255.255.255"] {
        assert!(iana::rows().any(|r| r.inside.contains(&must)), "{must} is tried");
    }
    let lines = proxy.lines_with(&["\"reason\":\"denied-range:"], tried * 2).await;
    assert_eq!(lines.len(), tried * 2, "one decision line per refused request");
    assert!(lines.iter().all(|l| l.contains("\"dialed\":\"\"")), "nothing denied was dialed");
}
