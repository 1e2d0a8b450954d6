//! The compile step's refusals and results, through the same entry the
//! CLI and the proxy use: parse, then [`Snapshot::compile`].

use super::*;
use crate::config::ConfigError;

fn load(text: &str, file: &str) -> Result<Snapshot, ConfigError> {
    Snapshot::compile(&Config::from_yaml_str(text, file)?, 1)
}

/// Parsing reads no file and builds nothing; the compile step builds the
/// runtime's pieces, and is where the TLS material is read.
#[test]
fn parsing_reads_no_file_compiling_does() {
    let yaml = "tls:\n  cert: /nonexistent/cert.pem\n  key: /nonexistent/key.pem\nroles:\n  default: {}\n";
    let config = Config::from_yaml_str(yaml, "tls.yaml").expect("parsing reads no file");
    let err = Snapshot::compile(&config, 1).unwrap_err().to_string();
    assert!(err.starts_with("tls.yaml: tls.cert: cannot load /nonexistent/cert.pem"), "{err}");
}

/// Each bad config is refused with the file name, the line and a reason,
/// whether parsing or compiling refuses it.
#[test]
fn bad_configs_name_file_line_and_reason() {
    let cases: &[(&str, usize, &str)] = &[
        ("roles:\n  default:\n    allow:\n      domainz: [a.com]\n", 4, "unknown field `domainz`"),
        ("listen: 127.0.0.1:3128\nbogus: 1\nroles:\n  default: {}\n", 2, "unknown field `bogus`"),
        ("roles:\n  default:\n    allow:\n      domains:\n        - ok.com\n        - \"*bad.com\"\n", 5, "invalid domain pattern"),
        ("roles:\n  default:\n    allow:\n      domains: [\"2852039166\"]\n", 4, "non-canonical IPv4"),
        ("roles:\n  default:\n    allow:\n      cidrs: [10.0.0.1/8]\n", 4, "host bits set"),
        ("roles:\n  default:\n    allow:\n      cidrs: [not-a-cidr]\n", 4, "invalid CIDR"),
        ("allow_ranges: [8.8.8.0/24]\nroles:\n  default: {}\n", 1, "not inside any always-denied or internal range"),
        ("roles:\n  default:\n    deny:\n      cidrs: [\"2001::/32\"]\n", 4, "Teredo prefix"),
        ("roles:\n  default:\n    deny:\n      cidrs: [\"64:ff9b::/96\"]\n", 4, "covers a whole IPv6 transition form"),
        ("internal_ranges: [\"::ffff:0:0/96\"]\nroles:\n  default: {}\n", 1, "covers a whole"),
        ("nat64_prefixes: [\"2001:db8:64::/80\"]\nroles:\n  default: {}\n", 1, "must be /32, /40, /48, /56, /64 or /96"),
        ("nat64_prefixes: [10.0.0.0/8]\nroles:\n  default: {}\n", 1, "must be IPv6"),
        (
            "nat64_prefixes: [\"2001:db8:64::/96\"]\nroles:\n  default:\n    allow:\n      cidrs:\n        - 8.8.8.0/24\n        - \"2001:db8:64::/96\"\n",
            7,
            "roles.default.allow.cidrs[1]: 2001:db8:64::/96 covers a whole",
        ),
        ("timeouts:\n  tunnel_idle: 5124095576030431h\nroles:\n  default: {}\n", 2, "must be at most 7 days"),
        ("allow_ranges:\n  - {cidr: 169.254.0.0/16, domains: [meta.example]}\nroles:\n  default: {}\n", 2, "contains the metadata address 169.254.169.254/32"),
        ("allow_ranges:\n  - {cidr: 10.0.0.0/8, ports: [443]}\nroles:\n  default: {}\n", 2, "`ports` needs `domains`"),
        ("allow_ranges:\n  - {cidr: 10.0.0.0/8}\nroles:\n  default: {}\n", 2, "needs `roles` or `domains`"),
        ("allow_ranges:\n  - {cidr: 10.0.0.0/8, domains: [a.example], roles: [nobody]}\nroles:\n  default: {}\n", 2, "role \"nobody\" is not defined"),
        ("dns:\n  static:\n    \"bad name!\": [10.0.0.1]\nroles:\n  default: {}\n", 3, "is not a host name"),
        ("roles:\n  default:\n    mode: permissive\n", 3, "unknown variant `permissive`"),
        ("roles:\n  default:\n    allow:\n      http_ports: [0]\n", 4, "nonzero"),
        ("roles:\n  default:\n    allow:\n      connect_ports: [70000]\n", 4, "70000"),
        ("timeouts:\n  tunnel_idle: forever\nroles:\n  default: {}\n", 2, "invalid duration"),
        ("listen: nowhere\nroles:\n  default: {}\n", 1, "invalid socket address"),
        ("upstream_proxy:\n  url: ftp://parent.example\nroles:\n  default: {}\n", 2, "expected http://host[:port] or https://host[:port]"),
        ("upstream_proxy:\n  url: http://parent.example\n  resolve: remote\nroles:\n  default: {}\n", 3, "unknown variant `remote`"),
        ("upstream_proxy:\n  url: https://parent.example\nroles:\n  default: {}\n", 2, "upstream_proxy.url: an https:// parent needs upstream_proxy.ca_file"),
        ("upstream_proxy:\n  url: https://[::1]:3129\n  ca_file: /nonexistent/ca.pem\nroles:\n  default: {}\n", 3, "upstream_proxy.ca_file: cannot load /nonexistent/ca.pem"),
        ("upstream_proxy:\n  url: http://parent.example\n  ca_file: /nonexistent/ca.pem\nroles:\n  default: {}\n", 3, "upstream_proxy.ca_file: only for an https:// parent"),
        ("upstream_proxy:\n  url: http://parent.example\n  server_name: parent.example\nroles:\n  default: {}\n", 3, "upstream_proxy.server_name: only for an https:// parent"),
    ];
    for (text, line, reason) in cases {
        let err = load(text, "bad.yaml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("bad.yaml: "), "{msg}");
        assert!(msg.contains(reason), "want {reason:?} in {msg}");
        assert_eq!(err.line(), Some(*line), "{msg}");
    }
}

/// Rules written as transition prefixes become the IPv4 range they
/// stand for (at parse time, or at compile time inside a declared NAT64
/// prefix); carve-outs may lift internal ranges.
#[test]
fn transition_prefix_rules_and_internal_ranges() {
    let yaml = "internal_ranges: [34.118.0.0/16, \"2600:1900:4000::/44\"]\n\
                nat64_prefixes: [\"2001:db8:64::/96\"]\n\
                allow_ranges: [34.118.5.0/24]\n\
                roles:\n  default:\n    allow:\n      cidrs: [\"::ffff:8.8.8.0/120\", \"2001:db8:64::808:400/120\"]\n\
                \x20   deny:\n      cidrs: [\"::ffff:8.8.8.8/128\"]\n";
    let c = Config::from_yaml_str(yaml, "t.yaml").unwrap();
    let cidrs: Vec<String> = c.roles["default"].allow.cidrs.iter().map(|r| r.0.to_string()).collect();
    assert_eq!(cidrs, ["8.8.8.0/24", "2001:db8:64::808:400/120"]);
    assert_eq!(c.roles["default"].deny.cidrs[0].0.to_string(), "8.8.8.8/32");
    let p = Snapshot::compile(&c, 1).unwrap().policy;
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    assert_eq!(p.denied_range(ip("34.118.1.1")), Some(crate::policy::ranges::RangeKind::Internal));
    assert_eq!(p.denied_range(ip("34.118.5.1")), None, "carved out");
    assert_eq!(p.denied_range(ip("2600:1900:4000::1")), Some(crate::policy::ranges::RangeKind::Internal));
    assert_eq!(p.denied_range(ip("2001:db8:64::a9fe:a9fe")), Some(crate::policy::ranges::RangeKind::Metadata));
    assert_eq!(p.denied_range(ip("2001:db8:64::808:808")), None);
}

/// The CA bundle and the name of an `https://` parent are checked when
/// the config is compiled, each refusal naming its field.
#[test]
fn parent_tls_settings_are_checked_at_load() {
    let dir = std::env::temp_dir().join(format!("portcullis-parent-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "no PEM here\n").unwrap();
    let broken = dir.join("broken.pem");
    std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertificateParams::new(vec!["ca.test".to_string()]).unwrap().self_signed(&key).unwrap();
    let good = dir.join("ca.pem");
    std::fs::write(&good, ca.pem()).unwrap();
    let yaml = |ca_file: &std::path::Path, extra: &str| {
        format!("upstream_proxy:\n  url: https://parent.example:3129\n  ca_file: {}\n{extra}roles:\n  default: {{}}\n", ca_file.display())
    };
    for (text, want) in [
        (yaml(&empty, ""), Some("upstream_proxy.ca_file: no certificate in")),
        (yaml(&broken, ""), Some("upstream_proxy.ca_file: ")),
        (yaml(&good, "  server_name: \"bad name!\"\n"), Some("upstream_proxy.server_name: \"bad name!\" is not a DNS name or an IP address")),
        (yaml(&good, "  server_name: parent.test\n  resolve: parent\n"), None),
        (yaml(&good, ""), None),
    ] {
        match (load(&text, "p.yaml"), want) {
            (Ok(_), None) => {}
            (Err(e), Some(want)) => assert!(e.to_string().contains(want), "want {want:?} in {e}"),
            (got, want) => panic!("{text}: got {:?}, want {want:?}", got.map(|_| ())),
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn head_limits_have_a_floor() {
    let err = load("limits:\n  max_request_head_bytes: 100\nroles:\n  default: {}\n", "l.yaml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("limits.max_request_head_bytes: 100 is below the minimum of 8192"), "{err}");
}

#[test]
fn missing_default_role_is_refused() {
    let err = load("roles:\n  team-a: {}\n", "x.yaml").unwrap_err().to_string();
    assert!(err.contains("x.yaml: roles:") && err.contains("default"), "{err}");
    let err = load("listen: 127.0.0.1:1\n", "x.yaml").unwrap_err().to_string();
    assert!(err.contains("missing field `roles`"), "{err}");
}
