//! Load benchmark: the real proxy binary (a child process, so its memory
//! can be read from /proc) between a load generator and origins, all on
//! loopback, against a direct-to-origin baseline measured in the same run.
//!
//! Three processes: the load generator (this one), the origins (this same
//! binary started again with `PORTCULLIS_LOAD_ORIGINS=1`), and the proxy.
//! The origins live in their own process so the direct baseline crosses a
//! process boundary too: a client and an origin sharing one runtime hand
//! bytes to each other without a thread ever sleeping, which no real origin
//! does and which made the baseline three times as fast per request.
//!
//! Run with `bash benches/load.sh` (builds the release binary, raises the
//! fd limit, then `cargo bench --bench proxy_load`). Every phase is bounded
//! in time and in count.
//!
//! The transparent path (connections redirected by netfilter to
//! `transparent_listen`) is measured in the same run when the bench can
//! create a network namespace (root, `unshare`): it then re-executes itself
//! under `unshare -n`, puts a stand-in public address on that namespace's
//! loopback, applies `deploy/transparent/redirect.sh` there and runs the
//! proxy as the exempt uid. Nothing outside that namespace changes. There
//! it also measures router mode from a pod namespace of its own
//! (`proxy_load/router.rs`).
//!
//! Peer mode (`PORTCULLIS_LOAD_PEERS`, see `proxy_load/peers.rs` and
//! `benches/peers.sh`) measures other proxies a script started next to the
//! direct baseline and Portcullis, in the same run.

#[path = "proxy_load/peers.rs"]
mod peers;
#[path = "proxy_load/router.rs"]
mod router;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Length of each HTTP and new-tunnel phase unless `PORTCULLIS_LOAD_PHASE_MS` says otherwise.
const PHASE: Duration = Duration::from_secs(3);
const MAX_REQUESTS_PER_CLIENT: usize = 200_000;
const BULK_BYTES: usize = 512 * 1024 * 1024;
const IDLE_TUNNELS: usize = 10_000;
/// Tunnels that move a burst before idling, and the burst: just under the
/// largest relay buffer, so each direction's buffer grows to its maximum
/// without the transfer turning into a splice (the red team's worst case).
const BURST_TUNNELS: usize = 2_000;
const BURST_BYTES: usize = 126 * 1024;
/// Set in the re-executed bench: it runs in a network namespace of its own.
const OWN_NETNS: &str = "PORTCULLIS_LOAD_NETNS";
/// In that namespace: a non-loopback local address (loopback is never
/// redirected), where the origins are reached transparently.
const STAND_IN: [u8; 4] = [11, 0, 0, 1];
const TRANSPARENT_PORT: u16 = 15001;
const PROXY_UID: &str = "65532";

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse. Peers listen in this
    // namespace, so peer mode stays in it.
    let stays = std::env::var_os("PORTCULLIS_LOAD_ORIGINS").is_some() || std::env::var_os(OWN_NETNS).is_some() || peers::requested();
    if !stays && can_unshare() {
        let exe = std::env::current_exe().expect("the bench binary knows its path");
        let status = Command::new("unshare").args(["-n", "--"]).arg(exe).args(std::env::args().skip(1)).env(OWN_NETNS, "1").status();
        std::process::exit(status.ok().and_then(|s| s.code()).unwrap_or(1));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    if std::env::var_os("PORTCULLIS_LOAD_ORIGINS").is_some() {
        runtime.block_on(serve_origins());
    } else if let Ok(spec) = std::env::var(router::CLIENT) {
        runtime.block_on(router::client(&spec));
    } else {
        runtime.block_on(run());
    }
}

/// Where origin `index` (http, echo, source) listens: loopback, or in the
/// bench's own namespace every local address (the stand-in one for the
/// transparent phases). Its port is `PORTCULLIS_LOAD_ORIGIN_PORTS` (three,
/// comma-separated, so a script can allow them in a peer's config) or any.
fn origins_bind(index: usize) -> SocketAddr {
    let port = std::env::var("PORTCULLIS_LOAD_ORIGIN_PORTS").map_or(0, |ports| {
        let ports: Vec<u16> = ports.split(',').map(|p| p.trim().parse().expect("PORTCULLIS_LOAD_ORIGIN_PORTS: ports")).collect();
        assert_eq!(ports.len(), 3, "PORTCULLIS_LOAD_ORIGIN_PORTS: http, echo and source ports");
        ports[index]
    });
    match std::env::var_os(OWN_NETNS) {
        Some(_) => SocketAddr::from(([0, 0, 0, 0], port)),
        None => SocketAddr::from(([127, 0, 0, 1], port)),
    }
}

/// The HTTP and new-tunnel phase length: [`PHASE`] or `PORTCULLIS_LOAD_PHASE_MS`.
fn phase() -> Duration {
    std::env::var("PORTCULLIS_LOAD_PHASE_MS").map_or(PHASE, |ms| Duration::from_millis(ms.parse().expect("PORTCULLIS_LOAD_PHASE_MS: milliseconds")))
}

/// True when a network namespace can be made here (root and `unshare`).
fn can_unshare() -> bool {
    Command::new("unshare").args(["-n", "true"]).status().is_ok_and(|s| s.success())
}

/// In the bench's own namespace: loopback up, the stand-in address on it,
/// and the shipped redirect rules. Returns false when not in one.
fn set_up_interception() -> bool {
    if std::env::var_os(OWN_NETNS).is_none() {
        return false;
    }
    let stand_in = std::net::Ipv4Addr::from(STAND_IN);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/transparent/redirect.sh");
    let steps: [Vec<String>; 3] = [
        ["ip", "link", "set", "lo", "up"].map(String::from).into(),
        vec!["ip".into(), "addr".into(), "add".into(), format!("{stand_in}/32"), "dev".into(), "lo".into()],
        vec!["sh".into(), script.to_string_lossy().into_owned()],
    ];
    for step in steps {
        let status = Command::new(&step[0])
            .args(&step[1..])
            .env("PORTCULLIS_UID", PROXY_UID)
            .env("PORTCULLIS_TRANSPARENT_PORT", TRANSPARENT_PORT.to_string())
            .stdout(Stdio::null())
            .status()
            .expect("run a namespace setup step");
        assert!(status.success(), "{step:?} failed");
    }
    true
}

/// The origins' process: prints their ports on one line, serves until its
/// standard input closes (the load generator exited or dropped it).
async fn serve_origins() {
    let (origin, echo, source) = (start_http_origin().await, start_echo().await, start_source().await);
    println!("{} {} {}", origin.port(), echo.port(), source.port());
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = [0u8; 64];
        while matches!(std::io::Read::read(&mut std::io::stdin(), &mut sink), Ok(n) if n > 0) {}
    })
    .await;
}

/// Starts the origins' process; returns it and (http origin, echo, source).
fn spawn_origins() -> (Child, SocketAddr, SocketAddr, SocketAddr) {
    let exe = std::env::current_exe().expect("the bench binary knows its path");
    let mut child = Command::new(exe)
        .env("PORTCULLIS_LOAD_ORIGINS", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start origins");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout is piped");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).expect("origins print their ports");
    let ports: Vec<u16> = line.split_whitespace().map(|p| p.parse().expect("a port")).collect();
    assert_eq!(ports.len(), 3, "origins printed {line:?}");
    let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    (child, addr(ports[0]), addr(ports[1]), addr(ports[2]))
}

async fn run() {
    // An older binary knows no transparent listener: measure it explicitly only.
    let transparent = std::env::var_os("PORTCULLIS_LOAD_OLD_CONFIG").is_none() && set_up_interception();
    let (origins, origin, echo, source) = spawn_origins();
    let proxy = Proxy::start(&[origin.port(), echo.port(), source.port()], transparent);
    if peers::requested() {
        peers::run(peers::Bench { origin, echo, source, origins_pid: origins.id(), proxy: &proxy }).await;
        return stop(proxy, origins);
    }
    let p = proxy.addr;
    println!("machine: {} cores; proxy pid {}", cores(), proxy.child.id());
    println!();
    println!("{:<44} {:>14} {:>14} {:>8}", "measurement", "direct", "via proxy", "ratio");
    // The load generator (this process), the origins and the proxy.
    let pids = [std::process::id(), origins.id(), proxy.child.id()];

    let mut at_50 = (0.0, 0.0);
    // `PORTCULLIS_LOAD_ONLY=memory` runs only the idle-tunnel memory phases.
    let only_memory = std::env::var("PORTCULLIS_LOAD_ONLY").is_ok_and(|v| v == "memory");
    for clients in if only_memory { &[][..] } else { &[1usize, 50, 500][..] } {
        let clients = *clients;
        let before = pids.map(cpu_secs);
        let direct = http_load(origin, None, clients).await;
        let middle = pids.map(cpu_secs);
        let proxied = http_load(origin, Some(p), clients).await;
        let after = pids.map(cpu_secs);
        row(&format!("HTTP keep-alive req/s, {clients} clients"), direct.rps, proxied.rps, "");
        if clients == 50 {
            at_50 = (direct.rps, proxied.rps);
        }
        row(&format!("  p50 latency µs, {clients} clients"), direct.p50, proxied.p50, "");
        row(&format!("  p99 latency µs, {clients} clients"), direct.p99, proxied.p99, "");
        for (which, r) in [("direct", &direct), ("via proxy", &proxied)] {
            let notes = http_notes(r);
            if !notes.is_empty() {
                println!("  {which}{notes}");
            }
        }
        let [load, orig, prox] = cpu_us_per(before, middle, direct.count as f64);
        println!("  CPU µs/request, direct:    generator {load:.1}, origin {orig:.1}, proxy {prox:.1}");
        let [load, orig, prox] = cpu_us_per(middle, after, proxied.count as f64);
        println!("  CPU µs/request, via proxy: generator {load:.1}, origin {orig:.1}, proxy {prox:.1}");
    }

    if !only_memory {
        let (direct, _) = new_connections(echo, None).await;
        let (proxied, _) = new_connections(echo, Some(p)).await;
        row("new tunnels/s (connect, 200, echo, close)", direct, proxied, "direct: plain TCP connect+echo");

        let before = pids.map(cpu_secs);
        let direct = bulk(source, None).await;
        let middle = pids.map(cpu_secs);
        let proxied = bulk(source, Some(p)).await;
        let after = pids.map(cpu_secs);
        row("tunnel throughput MB/s (512 MiB)", direct.0, proxied.0, "");
        let [load, orig, prox] = cpu_us_per(before, middle, direct.1);
        println!("  CPU µs/MB, direct:    sink {load:.0}, source {orig:.0}, proxy {prox:.0}");
        let [load, orig, prox] = cpu_us_per(middle, after, proxied.1);
        println!("  CPU µs/MB, via proxy: sink {load:.0}, source {orig:.0}, proxy {prox:.0}");
        let bulk_ratio = proxied.0 / direct.0;

        if transparent {
            // The same phases with the client unaware of any proxy: it dials the
            // stand-in address and netfilter redirects it. The "direct" column
            // is this run's direct figure; the note gives the explicit ratio.
            let redirected = |addr: SocketAddr| SocketAddr::from((STAND_IN, addr.port()));
            println!();
            let via = http_load(redirected(origin), None, 50).await;
            row("transparent HTTP req/s, 50 clients", at_50.0, via.rps, &format!("explicit: {:.2}", at_50.1 / at_50.0));
            println!("  transparent p50/p99 latency µs, 50 clients: {:.0} / {:.0}", via.p50, via.p99);
            let via = bulk(redirected(source), None).await;
            row("transparent tunnel throughput MB/s (512 MiB)", direct.0, via.0, &format!("explicit: {bulk_ratio:.2}"));
            let ports = (origin.port(), source.port(), p.port());
            tokio::task::spawn_blocking(move || router::compare(ports.0, ports.1, ports.2)).await.expect("router phases");
        } else {
            println!("transparent path: not measured (needs root and unshare for a network namespace of its own)");
        }
    }

    let before = proxy.rss_kib();
    let (opened, held) = idle_tunnels(echo, p, IDLE_TUNNELS).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = proxy.rss_kib();
    let per_tunnel = (after.saturating_sub(before)) as f64 * 1024.0 / opened.max(1) as f64;
    println!();
    println!("idle tunnels opened: {opened} (asked {IDLE_TUNNELS})");
    println!("proxy RSS before: {before} KiB, with tunnels: {after} KiB, peak (VmHWM): {} KiB", proxy.hwm_kib());
    println!("RSS per idle tunnel: {per_tunnel:.0} bytes (user-space; kernel socket buffers are not in RSS)");
    let mut held = held;
    let rest = held.split_off(BURST_TUNNELS.min(opened));
    let (held, burst) = bursts(held).await;
    // Longer than the relay's quiet time, after which grown buffers shrink.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after_bursts = proxy.rss_kib();
    let per_burst_tunnel = (after_bursts.saturating_sub(before)) as f64 * 1024.0 / opened.max(1) as f64;
    let extra = after_bursts.saturating_sub(after) as f64 * 1024.0 / burst.max(1) as f64;
    println!("{burst} of them moved a {} KiB burst each way, then all idled 1.5 s", BURST_BYTES / 1024);
    println!("proxy RSS after bursts: {after_bursts} KiB, peak (VmHWM): {} KiB", proxy.hwm_kib());
    println!("RSS per idle tunnel after bursts: {per_burst_tunnel:.0} bytes; left behind per burst tunnel: {extra:.0} bytes");
    drop((held, rest));
    stop(proxy, origins);
}

/// Stops the proxy, then the origins (they serve until their stdin closes).
fn stop(mut proxy: Proxy, mut origins: Child) {
    proxy.stop();
    drop(origins.stdin.take());
    let _ = origins.wait();
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// The hard open-file limit of this process (`/proc/self/limits`).
fn hard_nofile() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap_or_default();
    line.split_whitespace().nth(4).and_then(|v| v.parse().ok()).unwrap_or(1024)
}

/// Microseconds of CPU each process spent per unit (request, MB) between
/// two readings of [`cpu_secs`].
fn cpu_us_per(from: [f64; 3], to: [f64; 3], units: f64) -> [f64; 3] {
    [0, 1, 2].map(|i| (to[i] - from[i]) * 1e6 / units.max(1.0))
}

/// User + system CPU seconds used so far by process `pid` (0 once gone).
fn cpu_secs(pid: u32) -> f64 {
    // Fields 14 and 15 of the line (utime, stime): 0-based 11 and 12 after the name.
    stat_ticks(pid, &[11, 12]) / 100.0
}

/// The sum of the given fields of `/proc/pid/stat` (0-based, counted after
/// the command name, which may hold spaces); 0 once the process is gone.
/// Times are in clock ticks of USER_HZ, which is 100 on Linux.
fn stat_ticks(pid: u32, fields: &[usize]) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let field = |i: usize| after_name.split_whitespace().nth(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    fields.iter().map(|&i| field(i)).sum()
}

/// A size field (`VmRSS:`, `VmHWM:`) of `/proc/pid/status` in KiB; 0 once the process is gone.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn row(name: &str, direct: f64, proxied: f64, note: &str) {
    println!("{name:<44} {direct:>14.1} {proxied:>14.1} {:>8.2} {note}", proxied / direct);
}

struct Proxy {
    child: Child,
    addr: SocketAddr,
    _dir: PathBuf,
}

impl Proxy {
    /// Starts the proxy; with `transparent`, also on the transparent port,
    /// as the uid the redirect rules exempt, allowing the stand-in address.
    fn start(ports: &[u16], transparent: bool) -> Proxy {
        let bin = std::env::var("PORTCULLIS_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/portcullis"));
        assert!(bin.exists(), "{} not found: run `cargo build --release --bin portcullis` (benches/load.sh does)", bin.display());
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("portcullis-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ports = ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
        // Connections sized to a third of what this process's hard limit
        // leaves (the proxy raises its soft limit to it): two descriptors
        // each, and the last third for splice pipes, which use only what the
        // limits did not promise (red team N4). Sized to the whole limit, as
        // before, every tunnel copied through user space and the 512 MiB
        // tunnel fell from 0.78 to 0.45 of direct.
        let conns = (hard_nofile().saturating_sub(1024 + 64) / 3).min(30_000);
        // `PORTCULLIS_LOAD_OLD_CONFIG=1`: a binary from before the tunnel
        // limits existed (it refuses unknown keys), for a same-run
        // comparison. The stand-in is a local address of the bench's own
        // namespace: carved out exactly, or it is the proxy host itself.
        let tunnel_limits = match std::env::var_os("PORTCULLIS_LOAD_OLD_CONFIG") {
            Some(_) => String::new(),
            None => format!(", max_tunnels: {conns}, max_tunnels_per_client: {conns}"),
        };
        // In the bench's own namespace the listeners take every address:
        // router mode's pod reaches them over a veth.
        let (listen_on, transparent_listen, stand_in) = match transparent {
            true => ("0.0.0.0", format!("transparent_listen: 0.0.0.0:{TRANSPARENT_PORT}\n"), format!(", {}/32", std::net::Ipv4Addr::from(STAND_IN))),
            false => ("127.0.0.1", String::new(), String::new()),
        };
        let config = format!(
            "listen: {listen_on}:{port}\nadmin_listen: 127.0.0.1:0\n{transparent_listen}limits: {{max_connections: {conns}, max_connections_per_client: {conns}{tunnel_limits}}}\nallow_ranges: [127.0.0.1/32{stand_in}]\nroles:\n  default:\n    sni_check: false\n    allow:\n      cidrs: [127.0.0.1/32{stand_in}]\n      http_ports: [{ports}]\n      connect_ports: [{ports}]\n"
        );
        std::fs::write(dir.join("load.yaml"), config).unwrap();
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
        let child = command
            .args(["run", "--config", dir.join("load.yaml").to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stdout(log)
            .spawn()
            .expect("start proxy");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "proxy did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Proxy { child, addr, _dir: dir }
    }

    fn rss_kib(&self) -> u64 {
        status_kib(self.child.id(), "VmRSS:")
    }

    fn hwm_kib(&self) -> u64 {
        status_kib(self.child.id(), "VmHWM:")
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_http_origin() -> SocketAddr {
    let listener = TcpListener::bind(origins_bind(0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello, world\n"))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    addr
}

async fn start_echo() -> SocketAddr {
    let listener = TcpListener::bind(origins_bind(1)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Reads the client's one-byte request, then writes BULK_BYTES to the
/// connection and closes. (Closing with the request unread would reset the
/// connection and lose the end of the transfer.)
async fn start_source() -> SocketAddr {
    let listener = TcpListener::bind(origins_bind(2)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 1];
                if stream.read_exact(&mut request).await.is_err() {
                    return;
                }
                let chunk = vec![0x5au8; 256 * 1024];
                let mut sent = 0;
                while sent < BULK_BYTES {
                    if stream.write_all(&chunk).await.is_err() {
                        return;
                    }
                    sent += chunk.len();
                }
            });
        }
    });
    addr
}

/// Opens a connection to `target`, through `proxy` with CONNECT when given.
async fn open(target: SocketAddr, proxy: Option<SocketAddr>) -> TcpStream {
    let Some(proxy) = proxy else {
        let s = TcpStream::connect(target).await.unwrap();
        let _ = s.set_nodelay(true);
        return s;
    };
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let _ = s.set_nodelay(true);
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "proxy closed during CONNECT");
        head.push(byte[0]);
    }
    assert!(is_200(&head), "{}", String::from_utf8_lossy(&head));
    s
}

/// True for a `200` status line of HTTP/1.0 or 1.1 (tinyproxy answers
/// CONNECT in HTTP/1.0).
fn is_200(head: &[u8]) -> bool {
    (head.starts_with(b"HTTP/1.1 ") || head.starts_with(b"HTTP/1.0 ")) && head[9..].starts_with(b"200")
}

struct HttpResult {
    /// Requests answered 200; `rps` and the latencies count only these.
    count: usize,
    rps: f64,
    p50: f64,
    p99: f64,
    /// Responses other than 200, and requests no connection could carry.
    failures: usize,
    /// What went wrong first, when something did.
    first_failure: Option<String>,
    /// New connections after the server closed one (see [`ClientConn`]).
    reconnects: usize,
}

/// What one client of [`http_load`] saw.
#[derive(Default)]
struct ClientRun {
    latencies: Vec<u32>,
    failures: usize,
    first_failure: Option<String>,
    reconnects: usize,
}

impl ClientRun {
    fn fail(&mut self, what: String) {
        self.failures += 1;
        self.first_failure.get_or_insert(what);
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// A load-generator client's connection to the origin or a proxy, opened
/// again when the server closes it. tinyproxy closes after every response
/// without a `Connection: close`, so a client learns it only from the
/// close, sometimes as its next request goes out; any client then sends
/// that request again on a new connection, and so does this one, timing
/// the new connection as part of the request.
struct ClientConn {
    to: SocketAddr,
    sender: Sender,
    /// The connection has answered a request since it was opened.
    used: bool,
    closed: bool,
    reconnects: usize,
}

impl ClientConn {
    async fn open(to: SocketAddr) -> std::io::Result<ClientConn> {
        let sender = Self::handshake(to).await?;
        Ok(ClientConn { to, sender, used: false, closed: false, reconnects: 0 })
    }

    async fn handshake(to: SocketAddr) -> std::io::Result<Sender> {
        let stream = TcpStream::connect(to).await?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Ok(sender)
    }

    async fn reopen(&mut self) -> Result<(), String> {
        self.sender = Self::handshake(self.to).await.map_err(|e| format!("new connection: {e}"))?;
        (self.used, self.closed) = (false, false);
        self.reconnects += 1;
        Ok(())
    }

    /// Sends `request` (or, on a new connection, `again()`) and reads the
    /// whole response; its status, or why no connection could carry it.
    async fn get(&mut self, request: Request<Empty<Bytes>>, again: impl Fn() -> Request<Empty<Bytes>>) -> Result<hyper::StatusCode, String> {
        if self.closed {
            self.reopen().await?;
        }
        let response = match self.sender.send_request(request).await {
            Ok(response) => response,
            // Closed by the server as the request went out: once more on a new one.
            Err(_) if self.used => {
                self.reopen().await?;
                self.sender.send_request(again()).await.map_err(|e| format!("request: {e}"))?
            }
            Err(e) => return Err(format!("request: {e}")),
        };
        let status = response.status();
        response.into_body().collect().await.map_err(|e| format!("response body: {e}"))?;
        self.used = true;
        Ok(status)
    }

    /// Waits until the connection takes another request or is found closed.
    async fn settle(&mut self) {
        self.closed = self.sender.ready().await.is_err();
    }
}

/// `clients` keep-alive connections sending GETs for [`phase`].
async fn http_load(origin: SocketAddr, proxy: Option<SocketAddr>, clients: usize) -> HttpResult {
    let started = Instant::now();
    let deadline = started + phase();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(async move {
                let mut conn = ClientConn::open(proxy.unwrap_or(origin)).await.unwrap();
                let uri = match proxy {
                    Some(_) => format!("http://{origin}/small"),
                    None => "/small".to_string(),
                };
                let request = || Request::get(uri.as_str()).header("host", origin.to_string()).body(Empty::<Bytes>::new()).unwrap();
                let mut run = ClientRun::default();
                while Instant::now() < deadline && run.latencies.len() < MAX_REQUESTS_PER_CLIENT {
                    let req = request();
                    let t = Instant::now();
                    match conn.get(req, request).await {
                        Ok(hyper::StatusCode::OK) => run.latencies.push(t.elapsed().as_micros() as u32),
                        Ok(status) => run.fail(format!("status {status}")),
                        Err(e) => {
                            run.fail(e);
                            break;
                        }
                    }
                    conn.settle().await;
                }
                run.reconnects = conn.reconnects;
                run
            })
        })
        .collect();
    let (mut all, mut failures, mut first_failure, mut reconnects) = (Vec::new(), 0, None, 0);
    for t in tasks {
        let run = t.await.unwrap();
        all.extend(run.latencies);
        failures += run.failures;
        first_failure = first_failure.or(run.first_failure);
        reconnects += run.reconnects;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0) as f64;
    HttpResult { count: all.len(), rps: all.len() as f64 / elapsed, p50: pct(0.50), p99: pct(0.99), failures, first_failure, reconnects }
}

/// `; N reconnects (server closed); N FAILED (first: why)` for what is not zero.
fn http_notes(r: &HttpResult) -> String {
    let mut notes = String::new();
    if r.reconnects > 0 {
        notes += &format!("; {} reconnects (server closed)", r.reconnects);
    }
    if r.failures > 0 {
        notes += &format!("; {} FAILED (first: {})", r.failures, r.first_failure.as_deref().unwrap_or("?"));
    }
    notes
}

/// New connections per second and how many: (CONNECT, 200,) one echo
/// round trip, close; 8 concurrent loops for [`phase`].
async fn new_connections(echo: SocketAddr, proxy: Option<SocketAddr>) -> (f64, f64) {
    let started = Instant::now();
    let deadline = started + phase();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let mut done = 0u64;
                while Instant::now() < deadline && done < 1_000_000 {
                    let mut s = open(echo, proxy).await;
                    s.write_all(b"ping").await.unwrap();
                    let mut buf = [0u8; 4];
                    s.read_exact(&mut buf).await.unwrap();
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    (total as f64 / started.elapsed().as_secs_f64(), total as f64)
}

/// (MB/s, MB) reading BULK_BYTES from the source, at most 30 s. The client
/// speaks first, one byte the source ignores, like any request: a
/// redirected connection is classified by its first bytes.
async fn bulk(source: SocketAddr, proxy: Option<SocketAddr>) -> (f64, f64) {
    let mut s = open(source, proxy).await;
    s.write_all(&[0]).await.unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let started = Instant::now();
    let mut got = 0usize;
    let deadline = started + Duration::from_secs(30);
    while got < BULK_BYTES && Instant::now() < deadline {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    (got as f64 / 1e6 / started.elapsed().as_secs_f64(), got as f64 / 1e6)
}

/// Sends [`BURST_BYTES`] through each tunnel to the echo origin and reads
/// them back, 50 tunnels at a time; stops after 60 s. Returns the tunnels
/// (still open) and how many completed their burst.
async fn bursts(tunnels: Vec<TcpStream>) -> (Vec<TcpStream>, usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut kept = Vec::with_capacity(tunnels.len());
    let mut done = 0;
    let mut tunnels = tunnels.into_iter().peekable();
    while tunnels.peek().is_some() && Instant::now() < deadline {
        let mut batch = tokio::task::JoinSet::new();
        for mut s in tunnels.by_ref().take(50) {
            batch.spawn(async move {
                let (mut r, mut w) = s.split();
                let back = async {
                    let mut got = vec![0u8; BURST_BYTES];
                    r.read_exact(&mut got).await.map(|_| ())
                };
                let burst = vec![0x5au8; BURST_BYTES];
                let (sent, read) = tokio::join!(w.write_all(&burst), back);
                let ok = sent.is_ok() && read.is_ok();
                (s, ok)
            });
        }
        while let Some(Ok((s, ok))) = batch.join_next().await {
            done += usize::from(ok);
            kept.push(s);
        }
    }
    kept.extend(tunnels);
    (kept, done)
}

/// Opens up to `n` tunnels and keeps them open; stops early at the fd limit
/// or after 60 s.
async fn idle_tunnels(echo: SocketAddr, proxy: SocketAddr, n: usize) -> (usize, Vec<TcpStream>) {
    let mut held = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(60);
    while held.len() < n && Instant::now() < deadline {
        let Ok(mut s) = TcpStream::connect(proxy).await else { break };
        let target = echo.to_string();
        if s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await.is_err() {
            break;
        }
        let mut head = [0u8; 128];
        let Ok(n) = s.read(&mut head).await else { break };
        if !is_200(&head[..n]) {
            break;
        }
        held.push(s);
    }
    (held.len(), held)
}
