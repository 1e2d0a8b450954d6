//! Network namespaces for tests that need more than loopback: the test
//! re-executes itself under `unshare -n`, so every address, link, route and
//! netfilter rule lives in namespaces it created, never on the host.
//! Included with `#[path = "common/netns.rs"] mod netns;`.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// Set in the re-executed child: it runs in a namespace of its own.
const OWN_NETNS: &str = "PORTCULLIS_TEST_OWN_NETNS";

/// Runs `body` in a network namespace this test created: re-executes the
/// test binary for this one test under `unshare -n` and requires that
/// exactly this one test ran there and passed. libtest exits 0 when
/// `--exact` matches nothing, so the exit status alone would let a renamed
/// test pass unseen; the child's summary line is checked instead.
pub fn in_own_netns(test: &str, body: impl FnOnce()) {
    if std::env::var_os(OWN_NETNS).is_some() {
        assert_isolated();
        return body();
    }
    use std::io::BufRead;
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Command::new("unshare")
        .args(["-n", "--"])
        .arg(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(OWN_NETNS, "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run unshare (util-linux); these tests need root to create network namespaces");
    let mut stdout = Vec::new();
    for line in std::io::BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line.expect("the child's stdout is text");
        // Indented, so a summary line echoed here is never read as the
        // parent's own (.ci/run counts lines that start `test result:`).
        println!("    {line}");
        stdout.push(line);
    }
    let status = child.wait().expect("wait for the namespaced test");
    assert!(status.success(), "{test} failed in its own network namespace: {status}");
    if let Err(why) = exactly_one_passed(&stdout) {
        panic!("{test} did not run in its own network namespace: {why}");
    }
}

/// Checks libtest's output for one run: exactly one summary line, and it
/// says one test passed and nothing failed (`test result: ok. 1 passed; 0 failed; ...`).
fn exactly_one_passed(stdout: &[String]) -> Result<(), String> {
    let summaries: Vec<&String> = stdout.iter().filter(|l| l.starts_with("test result: ")).collect();
    let [summary] = summaries[..] else {
        return Err(format!("expected one libtest summary line, found {}: {summaries:?}", summaries.len()));
    };
    if summary.starts_with("test result: ok. 1 passed; 0 failed;") {
        Ok(())
    } else {
        Err(format!("expected `test result: ok. 1 passed; 0 failed; ...`, got `{summary}`"))
    }
}

#[test]
fn the_rerun_check_requires_exactly_one_passed_test() {
    let lines = |text: &str| text.lines().map(str::to_string).collect::<Vec<_>>();
    let one = "running 1 test\ntest x ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 9 filtered out; finished in 1.00s";
    assert_eq!(exactly_one_passed(&lines(one)), Ok(()));
    let renamed = "running 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 10 filtered out; finished in 0.00s";
    assert!(exactly_one_passed(&lines(renamed)).unwrap_err().contains("0 passed"));
    let two = "test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 8 filtered out; finished in 1.00s";
    assert!(exactly_one_passed(&lines(two)).is_err());
    let ignored = "test result: ok. 0 passed; 0 failed; 1 ignored; 0 measured; 9 filtered out; finished in 0.00s";
    assert!(exactly_one_passed(&lines(ignored)).is_err());
    assert!(exactly_one_passed(&lines("no summary at all")).is_err());
    assert!(exactly_one_passed(&lines(&format!("{one}\n{one}"))).is_err());
}

/// Before adding anything: the namespace holds only a loopback interface.
fn assert_isolated() {
    let links = sh(&["ip", "-o", "link", "show"]);
    let names: Vec<&str> = links.lines().filter_map(|l| l.split(": ").nth(1)).collect();
    assert_eq!(names, ["lo"], "not an isolated network namespace; refusing to add addresses or rules");
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn sh(args: &[&str]) -> String {
    let out = run(Command::new(args[0]).args(&args[1..]));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sets a file's permission bits (files the namespaced processes read
/// under another uid).
pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A fresh network namespace, held open by a child process, inside the
/// test's own; its loopback is up.
pub struct Netns {
    holder: Child,
}

impl Netns {
    pub fn start() -> Netns {
        let holder = Command::new("unshare").args(["-n", "sleep", "600"]).spawn().expect("unshare -n");
        let pid = holder.id();
        let mine = std::fs::read_link("/proc/self/ns/net").expect("own netns");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_link(format!("/proc/{pid}/ns/net")).ok().is_none_or(|ns| ns == mine) {
            assert!(Instant::now() < deadline, "namespace did not appear");
            std::thread::sleep(Duration::from_millis(10));
        }
        let ns = Netns { holder };
        ns.sh(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// The holder's pid, which names the namespace (`ip link ... netns <pid>`).
    pub fn pid(&self) -> String {
        self.holder.id().to_string()
    }

    /// `nsenter` into the namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.pid(), "-n", "--", program]);
        cmd
    }

    /// A client command in the namespace, as root, with a clean environment
    /// (no proxy variables) and `hosts` bind-mounted over /etc/hosts in a
    /// private mount namespace.
    pub fn client(&self, hosts: &Path, program: &[&str]) -> Command {
        let mut cmd = self.cmd("unshare");
        cmd.args(["-m", "--", "sh", "-c", "mount --bind \"$0\" /etc/hosts && exec \"$@\""]).arg(hosts).args(program);
        cmd.env_clear();
        for var in ["PATH", "HOME", "JAVA_HOME"] {
            if let Some(value) = std::env::var_os(var) {
                cmd.env(var, value);
            }
        }
        cmd
    }

    /// Runs a command in the namespace that must succeed; returns stdout.
    pub fn sh(&self, args: &[&str]) -> String {
        let out = run(self.cmd(args[0]).args(&args[1..]));
        assert!(out.status.success(), "netns {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
