//! DNS listener benchmark: queries per second through `dns_listen` against
//! the same upstream resolver asked directly, in the same run, and the CPU
//! each process spends per query.
//!
//! Three processes: the load generator (this one), the upstream (this same
//! binary started again with `PORTCULLIS_DNS_LOAD_UPSTREAM=1`, answering
//! `allowed.test` A from a hand-built reply so that it costs as little as
//! possible), and the release proxy binary with `dns_listen` forwarding to
//! that upstream. The listener has no answer cache, so every query through
//! it is forwarded and answered from the upstream (the path measured is
//! decide, forward, judge, answer). Every client is a UDP socket with one query outstanding;
//! a query without an answer within a second counts as lost. Each phase
//! lasts `PORTCULLIS_DNS_LOAD_MS` (default 3000) milliseconds.
//!
//! Run with `cargo build --release --bin portcullis && cargo bench --bench dns_load`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

// The /proc readings and the CPU ceiling of the load bench; this bench
// uses only part of them.
#[allow(dead_code)]
#[path = "proxy_load/procs.rs"]
mod procs;
use procs::{cores, cpu_ceiling, Reading};

const CLIENTS: [usize; 2] = [1, 32];
/// The question every client asks: `allowed.test` A, recursion desired.
const NAME: &[u8] = b"\x07allowed\x04test\x00";

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    if std::env::var_os("PORTCULLIS_DNS_LOAD_UPSTREAM").is_some() {
        runtime.block_on(serve_upstream());
    } else {
        runtime.block_on(run());
    }
}

fn phase() -> Duration {
    std::env::var("PORTCULLIS_DNS_LOAD_MS").map_or(Duration::from_secs(3), |ms| Duration::from_millis(ms.parse().expect("milliseconds")))
}

/// The upstream: answers every query with one A record (11.0.0.10), until
/// its stdin closes.
async fn serve_upstream() {
    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    println!("{}", socket.local_addr().expect("bound").port());
    for _ in 0..2 {
        let socket = socket.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else { return };
                if let Some(reply) = answer(&buf[..n]) {
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        });
    }
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = [0u8; 64];
        while matches!(std::io::Read::read(&mut std::io::stdin(), &mut sink), Ok(n) if n > 0) {}
    })
    .await;
}

/// The query's header and question, flagged as a response with one answer
/// (the question's name, by pointer) and no other records.
fn answer(query: &[u8]) -> Option<Vec<u8>> {
    let mut end = 12;
    while *query.get(end)? != 0 {
        end += 1 + usize::from(query[end]);
    }
    let end = end + 1 + 4;
    let mut reply = query.get(..end)?.to_vec();
    reply[2] |= 0x80;
    reply[3] = 0x80;
    reply[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
    reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 11, 0, 0, 10]);
    Some(reply)
}

fn query(id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(NAME);
    q.extend_from_slice(&[0, 1, 0, 1]);
    q
}

/// Answered and lost queries of `clients` sockets asking `server` for one phase.
async fn load(server: SocketAddr, clients: usize) -> (u64, u64) {
    let deadline = Instant::now() + phase();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            tokio::spawn(async move {
                let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
                socket.connect(server).await.expect("connect");
                let (mut answered, mut lost) = (0u64, 0u64);
                let mut buf = [0u8; 1500];
                let mut id = (c as u16).wrapping_mul(4099);
                while Instant::now() < deadline {
                    id = id.wrapping_add(1);
                    socket.send(&query(id)).await.expect("send");
                    let wait = async {
                        loop {
                            let n = socket.recv(&mut buf).await.expect("recv");
                            if n >= 12 && buf[..2] == id.to_be_bytes() {
                                return buf[3] & 0x0f == 0 && buf[7] >= 1;
                            }
                        }
                    };
                    match tokio::time::timeout(Duration::from_secs(1), wait).await {
                        Ok(true) => answered += 1,
                        _ => lost += 1,
                    }
                }
                (answered, lost)
            })
        })
        .collect();
    let mut total = (0, 0);
    for task in tasks {
        let (a, l) = task.await.expect("client task");
        total = (total.0 + a, total.1 + l);
    }
    total
}

async fn run() {
    let (mut upstream, upstream_addr) = spawn_upstream();
    let (mut proxy, dns, dir) = start_proxy(upstream_addr);
    let pids = [std::process::id(), upstream.id(), proxy.id()];
    println!("machine: {} cores; phase {:?}", cores(), phase());
    println!("{:<36} {:>12} {:>12} {:>7}", "measurement", "direct", "dns_listen", "ratio");
    for clients in CLIENTS {
        let t0 = Reading::now(pids);
        let (direct, direct_lost) = load(upstream_addr, clients).await;
        let t1 = Reading::now(pids);
        let (proxied, proxied_lost) = load(dns, clients).await;
        let t2 = Reading::now(pids);
        let secs = phase().as_secs_f64();
        let (d, p) = (direct as f64 / secs, proxied as f64 / secs);
        println!("{:<36} {d:>12.0} {p:>12.0} {:>7.2}", format!("queries/s, {clients} clients"), p / d);
        println!("  lost (no answer in 1 s): direct {direct_lost}, dns_listen {proxied_lost}");
        let (used_direct, used_proxied) = (t1.since(&t0, direct as f64), t2.since(&t1, proxied as f64));
        let [g, u, x] = used_direct.cpu_us;
        println!("  CPU µs/query, direct:     generator {g:.1}, upstream {u:.1}, proxy {x:.1}");
        let [g, u, x] = used_proxied.cpu_us;
        println!("  CPU µs/query, dns_listen: generator {g:.1}, upstream {u:.1}, proxy {x:.1}");
        // When the direct phase kept every core busy, the ceiling is the
        // most any forwarder with this cost could reach on this machine.
        let bound = cpu_ceiling(&used_direct, &used_proxied).map_or(String::new(), |c| format!("; CPU-bound, ceiling {c:.2}"));
        println!(
            "  cores busy (of {}): direct {:.2}, dns_listen {:.2}{bound}",
            cores(),
            used_direct.busy_cores,
            used_proxied.busy_cores
        );
    }
    let _ = proxy.kill();
    let _ = proxy.wait();
    drop(upstream.stdin.take());
    let _ = upstream.wait();
    let _ = std::fs::remove_dir_all(dir);
}

fn spawn_upstream() -> (Child, SocketAddr) {
    let exe = std::env::current_exe().expect("the bench binary knows its path");
    let mut child = Command::new(exe)
        .env("PORTCULLIS_DNS_LOAD_UPSTREAM", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the upstream");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout is piped");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).expect("the upstream prints its port");
    let port: u16 = line.trim().parse().expect("a port");
    (child, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// The release proxy with `dns_listen`, limits raised for one busy client
/// address, the decision log to /dev/null.
fn start_proxy(upstream: SocketAddr) -> (Child, SocketAddr, PathBuf) {
    let bin = std::env::var("PORTCULLIS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/portcullis"));
    assert!(bin.exists(), "{} not found: run `cargo build --release --bin portcullis`", bin.display());
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dns: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let dir = std::env::temp_dir().join(format!("portcullis-dns-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\ndns_listen: {dns}\n\
         dns:\n  nameservers: [\"{upstream}\"]\n  listener: {{max_in_flight: 1024, max_in_flight_per_client: 1024, max_queries_per_second_per_client: 10000000}}\n\
         reload: {{watch: false}}\nroles:\n  default:\n    allow:\n      domains: [allowed.test]\n"
    );
    std::fs::write(dir.join("dns-load.yaml"), config).unwrap();
    let child = Command::new(bin)
        .args(["run", "--config", dir.join("dns-load.yaml").to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .spawn()
        .expect("start the proxy");
    // Ready when it answers a query.
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    probe.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 512];
    loop {
        assert!(Instant::now() < deadline, "the proxy's DNS listener did not answer");
        let _ = probe.send_to(&query(1), dns);
        if probe.recv(&mut buf).is_ok_and(|n| n >= 12) {
            break;
        }
    }
    (child, dns, dir)
}
