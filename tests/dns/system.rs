//! The system resolver through the listener: in a network namespace of the
//! test's own, the listener answers on 127.0.0.53:53 (resolv.conf cannot
//! name a port), and each client runs in a private mount namespace with a
//! resolv.conf naming only it bind-mounted over /etc/resolv.conf.

use std::path::Path;
use std::process::{Command, Output};

use super::netns::sh;
use super::{config, records, start, upstream, EXFIL};

const LISTENER: &str = "127.0.0.53:53";

/// `program` with /etc/resolv.conf replaced by `resolv` (bounded in time).
fn with_resolv_conf(resolv: &Path, program: &[&str]) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.args(["20", "unshare", "-m", "--", "sh", "-c", "mount --bind \"$0\" /etc/resolv.conf && exec \"$@\""]);
    cmd.arg(resolv).args(program);
    cmd.output().unwrap_or_else(|e| panic!("{program:?}: {e}"))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const PYTHON: &str = "import socket, sys\n\
try:\n    print(' '.join(sorted({a[4][0] for a in socket.getaddrinfo(sys.argv[1], 443)})))\n\
except socket.gaierror as e:\n    print('error', e.errno)\n";

const NODE: &str = "require('dns').lookup(process.argv[1], {all: true}, (e, a) => \
console.log(e ? 'error ' + e.code : a.map(x => x.address).sort().join(' ')))";

pub fn scenario() {
    sh(&["ip", "link", "set", "lo", "up"]);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let up = runtime.block_on(upstream::start(&records()));
    let _running = runtime.block_on(start("system", &config(LISTENER, up.addr, "")));
    let resolv = super::common::temp_file("dns-system", "resolv.conf", "nameserver 127.0.0.53\noptions timeout:2 attempts:1\n");
    let clients: [(&str, Vec<&str>); 3] = [
        ("getent", vec!["getent", "ahosts"]),
        ("python", vec!["python3", "-c", PYTHON]),
        ("node", vec!["node", "-e", NODE]),
    ];
    for (client, program) in &clients {
        let ask = |name: &str| {
            let mut args = program.clone();
            args.push(name);
            with_resolv_conf(&resolv, &args)
        };
        let allowed = ask("allowed.test");
        let text = stdout(&allowed);
        assert!(text.contains("11.0.0.10") && text.contains("2600::10"), "{client}: {text}{}", String::from_utf8_lossy(&allowed.stderr));
        for refused in ["metadata.google.internal", EXFIL, "rebind.test"] {
            let out = ask(refused);
            let text = stdout(&out);
            assert!(!text.contains("169.254") && !text.contains("11.0.0.66"), "{client} {refused}: {text}");
            if *client == "getent" {
                assert!(!out.status.success(), "{client} {refused}: {text}");
            } else {
                assert!(text.starts_with("error"), "{client} {refused}: {text}");
            }
        }
    }
    let hosts = with_resolv_conf(&resolv, &["getent", "hosts", "www.allowed.test"]);
    assert!(stdout(&hosts).contains("11.0.0.20"), "{}", stdout(&hosts));
    for refused in ["metadata.google.internal", "attacker.example"] {
        assert!(!up.saw_any_under(refused), "the upstream was asked about {refused}: {:?}", up.seen());
    }
    assert!(up.count("allowed.test", "A") >= 3 && up.count("allowed.test", "AAAA") >= 3, "{:?}", up.seen());
}
