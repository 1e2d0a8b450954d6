//! The proxy under test: a child process of the bench (so its memory and
//! CPU can be read from /proc), started from the binary
//! `PORTCULLIS_LOAD_BIN` names (else `PORTCULLIS_BIN`, else this tree's
//! `target/release/portcullis`), with a config that binary accepts.
//!
//! `benches/compare.sh` runs this bench against older revisions, down to
//! `aa67df1`, which refuse keys they do not know (tunnel limits, the
//! transparent listener). The bench asks the binary (`portcullis validate`)
//! which of them it takes and leaves out the rest.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{hard_nofile, status_kib, PROXY_UID, STAND_IN, TRANSPARENT_PORT};

/// The origin ports the proxy allows: HTTP forwarding to `http` (and HTTP
/// inside a tunnel to it), tunnels to all of them.
pub struct Ports {
    pub http: u16,
    pub connect: Vec<u16>,
}

/// What the binary's config schema takes beyond what `aa67df1` knew.
#[derive(Clone, Copy, Debug)]
pub struct Dialect {
    /// `limits.max_tunnels` and `max_tunnels_per_client`.
    pub tunnel_limits: bool,
    /// `transparent_listen`.
    pub transparent: bool,
}

pub struct Proxy {
    pub child: Child,
    pub addr: SocketAddr,
    config: PathBuf,
}

/// The proxy binary under test.
pub fn binary() -> PathBuf {
    let bin = std::env::var_os("PORTCULLIS_LOAD_BIN")
        .or_else(|| std::env::var_os("PORTCULLIS_BIN"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/portcullis"));
    assert!(bin.exists(), "{} not found: run `cargo build --release --bin portcullis` (benches/load.sh does)", bin.display());
    bin
}

/// The binary's [`Dialect`], asked once. `PORTCULLIS_LOAD_OLD_CONFIG=1`
/// forces the oldest one.
pub fn dialect() -> Dialect {
    static DIALECT: OnceLock<Dialect> = OnceLock::new();
    *DIALECT.get_or_init(|| {
        if std::env::var_os("PORTCULLIS_LOAD_OLD_CONFIG").is_some() {
            return Dialect { tunnel_limits: false, transparent: false };
        }
        let ports = Ports { http: 80, connect: vec![80] };
        // Without the stand-in address: outside the bench's namespace it is
        // no local address, and a carve-out of it is refused.
        let takes = |dialect: Dialect| {
            let path = config_path();
            std::fs::write(&path, config(1, &ports, dialect, Listeners::Transparent { stand_in: false })).expect("write a probe config");
            let valid = Command::new(binary()).args(["validate", "--config"]).arg(&path).stdout(Stdio::null()).stderr(Stdio::null()).status();
            let _ = std::fs::remove_file(&path);
            valid.is_ok_and(|s| s.success())
        };
        let tunnel_limits = takes(Dialect { tunnel_limits: true, transparent: false });
        let transparent = takes(Dialect { tunnel_limits, transparent: true });
        Dialect { tunnel_limits, transparent }
    })
}

/// A config file of its own for each proxy of the run: a running proxy
/// watches its file, so none is ever rewritten.
fn config_path() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("portcullis-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the bench's config directory");
    dir.join(format!("load-{}.yaml", NEXT.fetch_add(1, Ordering::Relaxed)))
}

/// The listeners of the bench's config.
#[derive(Clone, Copy)]
enum Listeners {
    Explicit,
    /// Also the transparent listener (where the dialect has it), and with
    /// `stand_in` the stand-in address allowed: a local address of the
    /// bench's own namespace, carved out exactly, or it is the proxy host
    /// itself.
    Transparent { stand_in: bool },
}

/// The bench's config.
fn config(port: u16, ports: &Ports, dialect: Dialect, listeners: Listeners) -> String {
    // Connections sized to a third of what this process's hard limit
    // leaves (the proxy raises its soft limit to it): two descriptors
    // each, and the last third for splice pipes, which use only what the
    // limits did not promise (red team N4). Sized to the whole limit, as
    // before, every tunnel copied through user space and the 512 MiB
    // tunnel fell from 0.78 to 0.45 of direct.
    let conns = (hard_nofile().saturating_sub(1024 + 64) / 3).min(30_000);
    let tunnel_limits = match dialect.tunnel_limits {
        true => format!(", max_tunnels: {conns}, max_tunnels_per_client: {conns}"),
        false => String::new(),
    };
    // In the bench's own namespace the listeners take every address:
    // router mode's pod reaches them over a veth.
    let (listen_on, transparent_listen) = match (listeners, dialect.transparent) {
        (Listeners::Transparent { .. }, true) => ("0.0.0.0", format!("transparent_listen: 0.0.0.0:{TRANSPARENT_PORT}\n")),
        _ => ("127.0.0.1", String::new()),
    };
    let stand_in = match listeners {
        Listeners::Transparent { stand_in: true } => format!(", {}/32", std::net::Ipv4Addr::from(STAND_IN)),
        _ => String::new(),
    };
    let connect = ports.connect.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
    format!(
        "listen: {listen_on}:{port}\nadmin_listen: 127.0.0.1:0\n{transparent_listen}limits: {{max_connections: {conns}, max_connections_per_client: {conns}{tunnel_limits}}}\nallow_ranges: [127.0.0.1/32{stand_in}]\nroles:\n  default:\n    sni_check: false\n    allow:\n      cidrs: [127.0.0.1/32{stand_in}]\n      http_ports: [{}]\n      connect_ports: [{connect}]\n",
        ports.http
    )
}

impl Proxy {
    /// Starts the proxy; with `transparent` (only where the binary has the
    /// listener), also on the transparent port, as the uid the redirect
    /// rules exempt.
    pub fn start(ports: &Ports, transparent: bool) -> Proxy {
        let bin = binary();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config_file = config_path();
        let listeners = match transparent {
            true => Listeners::Transparent { stand_in: true },
            false => Listeners::Explicit,
        };
        std::fs::write(&config_file, config(port, ports, dialect(), listeners)).unwrap();
        let mut command = match transparent {
            true => {
                let mut c = Command::new("setpriv");
                c.args(["--reuid", PROXY_UID, "--regid", PROXY_UID, "--clear-groups"]).arg(bin);
                c
            }
            false => Command::new(bin),
        };
        // `PORTCULLIS_LOAD_PROXY_LOG`: the access log to this file (peer mode
        // logs every proxy to a file) instead of /dev/null.
        let log = match std::env::var_os("PORTCULLIS_LOAD_PROXY_LOG") {
            Some(path) => Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open PORTCULLIS_LOAD_PROXY_LOG")),
            None => Stdio::null(),
        };
        let child = command.arg("run").arg("--config").arg(&config_file).env("RUST_LOG", "info").stdout(log).spawn().expect("start proxy");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "proxy did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Proxy { child, addr, config: config_file }
    }

    pub fn rss_kib(&self) -> u64 {
        status_kib(self.child.id(), "VmRSS:")
    }

    pub fn hwm_kib(&self) -> u64 {
        status_kib(self.child.id(), "VmHWM:")
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}
