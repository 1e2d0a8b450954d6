//! Peer mode of the load bench: other proxies, started by a script
//! (`benches/peers.sh` starts Squid and tinyproxy), measured in the same run
//! as the direct baseline and Portcullis, phase by phase.
//!
//! `PORTCULLIS_LOAD_PEERS="squid=127.0.0.1:3128:4242;tinyproxy=127.0.0.1:8888:4243"`
//! names each peer, its listening address and its process ids (comma
//! separated); a peer's CPU and memory are those of the listed processes
//! and all their descendants. `PORTCULLIS_LOAD_PASSES` (default 3) passes
//! each run every phase for every proxy and the direct baseline back to
//! back, in an order rotated by one each pass. A ratio is taken within a
//! pass against that pass's direct figure; the summary gives the median and
//! the min–max over the passes.
//!
//! Every peer must be able to do every phase: a preflight fails the run
//! unless each one forwards a GET to the origin and opens tunnels to the
//! echo and source ports. Not measured here: the transparent phases (the
//! peers listen in this network namespace, so the bench does not make its
//! own) and the 10,000-tunnel memory phase with its bursts; instead the RSS
//! per idle tunnel is read once, before the passes (each proxy fresh but
//! for the preflight), with [`PEER_IDLE_TUNNELS`] tunnels per proxy.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{bulk, cores, cpu_secs, cpu_us_per, http_load, http_notes, idle_tunnels, is_200, new_connections, open, stat_ticks, status_kib, Proxy};

const PEERS: &str = "PORTCULLIS_LOAD_PEERS";
const CLIENTS: [usize; 3] = [1, 50, 500];
/// How long before loopback TIME_WAIT connections may be reused by a new
/// connect() (`tcp_tw_reuse`: a second since their last packet), with margin.
const TIME_WAIT_REUSABLE: Duration = Duration::from_millis(1_500);
/// Idle tunnels opened through each proxy for its memory figure.
const PEER_IDLE_TUNNELS: usize = 5_000;

/// True when `PORTCULLIS_LOAD_PEERS` asks for peer mode.
pub fn requested() -> bool {
    std::env::var_os(PEERS).is_some()
}

/// What the bench has started: the origins and Portcullis.
pub struct Bench<'a> {
    pub origin: SocketAddr,
    pub echo: SocketAddr,
    pub source: SocketAddr,
    pub origins_pid: u32,
    pub proxy: &'a Proxy,
}

/// The direct baseline (no proxy, no processes) or a proxy and its processes.
struct Target {
    name: String,
    proxy: Option<SocketAddr>,
    pids: Vec<u32>,
}

/// One target's figures in one pass; per client count where indexed like [`CLIENTS`].
#[derive(Default, Clone, Copy)]
struct Figures {
    rps: [f64; 3],
    p50: [f64; 3],
    p99: [f64; 3],
    /// µs of the proxy's processes per request.
    cpu_per_request: [f64; 3],
    failures: [usize; 3],
    reconnects: [usize; 3],
    tunnels_per_s: f64,
    /// µs of the proxy's processes per new tunnel.
    cpu_per_tunnel: f64,
    mb_per_s: f64,
    /// µs of the proxy's processes per MB tunnelled.
    cpu_per_mb: f64,
}

/// Parses `name=address:pid[,pid...]` entries separated by `;`.
fn peers_from(spec: &str) -> Vec<Target> {
    let parse = |entry: &str| {
        let (name, rest) = entry.split_once('=')?;
        let (addr, pids) = rest.rsplit_once(':')?;
        let pids = pids.split(',').map(|p| p.trim().parse().ok()).collect::<Option<Vec<u32>>>()?;
        Some(Target { name: name.trim().to_string(), proxy: Some(addr.trim().parse().ok()?), pids })
    };
    let peers: Vec<Target> = spec
        .split(';')
        .filter(|e| !e.trim().is_empty())
        .map(|e| parse(e).unwrap_or_else(|| panic!("{PEERS}: {e:?} is not name=address:pid[,pid...]")))
        .collect();
    assert!(!peers.is_empty(), "{PEERS} names no peer");
    for peer in &peers {
        for pid in &peer.pids {
            assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "{}: no process {pid}", peer.name);
        }
    }
    peers
}

/// Checks the peers, reads idle-tunnel memory, runs the passes and prints
/// the tables.
pub async fn run(bench: Bench<'_>) {
    let started = Instant::now();
    let passes: usize = std::env::var("PORTCULLIS_LOAD_PASSES").map_or(3, |n| n.parse().expect("PORTCULLIS_LOAD_PASSES: a number"));
    assert!(passes > 0, "PORTCULLIS_LOAD_PASSES: at least one pass");
    let mut targets = vec![
        Target { name: "direct".into(), proxy: None, pids: Vec::new() },
        Target { name: "portcullis".into(), proxy: Some(bench.proxy.addr), pids: vec![bench.proxy.child.id()] },
    ];
    targets.extend(peers_from(&std::env::var(PEERS).unwrap_or_default()));
    println!("machine: {} cores; peer mode, {passes} passes, {} ms per HTTP and new-tunnel phase", cores(), super::phase().as_millis());
    for t in &targets[1..] {
        println!("  {}: {} (processes {:?} and their descendants)", t.name, t.proxy.expect("a proxy"), t.pids);
    }
    println!("transparent path: not measured in peer mode (the peers listen in this network namespace)");
    println!("idle-tunnel memory: {PEER_IDLE_TUNNELS} tunnels per proxy, once before the passes (the 10,000-tunnel and burst phases are not run)");
    for t in &targets[1..] {
        preflight(&bench, t).await;
    }
    println!();
    let memory = idle_memory(&bench, &targets).await;
    let mut results = Vec::with_capacity(passes);
    for pass in 0..passes {
        let mut order: Vec<usize> = (0..targets.len()).collect();
        order.rotate_left(pass % targets.len());
        let names: Vec<&str> = order.iter().map(|&i| targets[i].name.as_str()).collect();
        println!();
        println!("pass {} of {passes}, order: {}", pass + 1, names.join(", "));
        results.push(run_pass(&bench, &targets, &order).await);
    }
    println!();
    summarize(&targets, &results, &memory);
    println!();
    println!("peer run took {:.0} s", started.elapsed().as_secs_f64());
}

/// Fails the run unless `t` forwards a GET to the origin and opens tunnels
/// to the echo and the source: a peer that refuses a phase is a
/// configuration to fix, not a figure to leave out.
async fn preflight(bench: &Bench<'_>, t: &Target) {
    let proxy = t.proxy.expect("a proxy");
    let check = async {
        let mut s = TcpStream::connect(proxy).await.unwrap_or_else(|e| panic!("{}: connect to {proxy}: {e}", t.name));
        let origin = bench.origin;
        s.write_all(format!("GET http://{origin}/small HTTP/1.1\r\nHost: {origin}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut response = Vec::new();
        let _ = s.read_to_end(&mut response).await;
        assert!(is_200(&response), "{} does not forward a GET to {origin}: {}", t.name, String::from_utf8_lossy(&response));
        let mut s = open(bench.echo, Some(proxy)).await;
        s.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.unwrap_or_else(|e| panic!("{}: no echo through the tunnel: {e}", t.name));
        drop(open(bench.source, Some(proxy)).await);
    };
    tokio::time::timeout(Duration::from_secs(10), check).await.unwrap_or_else(|_| panic!("{}: preflight timed out", t.name));
}

/// CPU seconds so far of (load generator, origins, the target's processes).
fn cpu(bench: &Bench<'_>, t: &Target) -> [f64; 3] {
    let tree = process_tree(&t.pids);
    [cpu_secs(std::process::id()), cpu_secs(bench.origins_pid), tree_cpu_secs(&tree)]
}

/// One pass: each phase for every target in `order`, back to back.
async fn run_pass(bench: &Bench<'_>, targets: &[Target], order: &[usize]) -> Vec<Figures> {
    let mut figures = vec![Figures::default(); targets.len()];
    for (c, clients) in CLIENTS.into_iter().enumerate() {
        for &i in order {
            let t = &targets[i];
            let (r, [load, orig, prox]) = with_cpu(bench, t, http_load(bench.origin, t.proxy, clients), |r| r.count as f64).await;
            let f = &mut figures[i];
            (f.rps[c], f.p50[c], f.p99[c], f.cpu_per_request[c]) = (r.rps, r.p50, r.p99, prox);
            (f.failures[c], f.reconnects[c]) = (r.failures, r.reconnects);
            println!(
                "  {:<13}  {:<12} {:>9.0} req/s  p50 {:>6.0} µs  p99 {:>6.0} µs  CPU µs/request: generator {load:.1}, origin {orig:.1}, proxy {prox:.1}{}",
                of_clients(clients),
                t.name,
                r.rps,
                r.p50,
                r.p99,
                http_notes(&r)
            );
        }
    }
    for &i in order {
        let t = &targets[i];
        // The previous target's closed connections to the echo port are in
        // TIME_WAIT, and on loopback both ends share one table: until they
        // are a second old (tcp_tw_reuse's bar), every connect() to the echo
        // port searches past them for a free port. The proxy that came right
        // after direct paid up to 2 ms of CPU per tunnel for it.
        tokio::time::sleep(TIME_WAIT_REUSABLE).await;
        let ((per_s, _), [load, orig, prox]) = with_cpu(bench, t, new_connections(bench.echo, t.proxy), |r| r.1).await;
        (figures[i].tunnels_per_s, figures[i].cpu_per_tunnel) = (per_s, prox);
        println!("  new tunnels/s  {:<12} {per_s:>9.0}  CPU µs/tunnel: generator {load:.1}, echo {orig:.1}, proxy {prox:.1}", t.name);
    }
    for &i in order {
        let t = &targets[i];
        let ((mb_per_s, _), [sink, source, prox]) = with_cpu(bench, t, bulk(bench.source, t.proxy), |r| r.1).await;
        (figures[i].mb_per_s, figures[i].cpu_per_mb) = (mb_per_s, prox);
        println!("  tunnel MB/s    {:<12} {mb_per_s:>9.0}  CPU µs/MB: sink {sink:.0}, source {source:.0}, proxy {prox:.0}", t.name);
    }
    figures
}

/// Runs one phase against `t`: its result, and the CPU µs of (load
/// generator, origins, `t`'s processes) per unit of work that `units`
/// reads from the result.
async fn with_cpu<R>(bench: &Bench<'_>, t: &Target, phase: impl std::future::Future<Output = R>, units: impl Fn(&R) -> f64) -> (R, [f64; 3]) {
    let before = cpu(bench, t);
    let result = phase.await;
    let per_unit = cpu_us_per(before, cpu(bench, t), units(&result));
    (result, per_unit)
}

/// RSS growth per idle tunnel of each proxy (index like `targets`; `None`
/// for direct): (tunnels opened, bytes per tunnel).
async fn idle_memory(bench: &Bench<'_>, targets: &[Target]) -> Vec<Option<(usize, f64)>> {
    let mut memory = vec![None];
    for t in &targets[1..] {
        let proxy = t.proxy.expect("a proxy");
        let before = tree_rss_kib(&process_tree(&t.pids));
        let (opened, held) = idle_tunnels(bench.echo, proxy, PEER_IDLE_TUNNELS).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = tree_rss_kib(&process_tree(&t.pids));
        let per_tunnel = after.saturating_sub(before) as f64 * 1024.0 / opened.max(1) as f64;
        println!("idle tunnels, {}: {opened} opened (asked {PEER_IDLE_TUNNELS}), RSS {before} → {after} KiB, {per_tunnel:.0} bytes per tunnel", t.name);
        memory.push(Some((opened, per_tunnel)));
        drop(held);
        // Let the proxy close them before anything else is measured.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    memory
}

/// `roots` and every live process descended from them.
fn process_tree(roots: &[u32]) -> Vec<u32> {
    if roots.is_empty() {
        return Vec::new();
    }
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|dir| dir.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()).collect::<Vec<u32>>())
        .unwrap_or_default()
        .into_iter()
        // Field 4 of the stat line (the parent's pid): 0-based 1 after the name.
        .map(|pid| (pid, stat_ticks(pid, &[1]) as u32))
        .collect();
    let mut tree = roots.to_vec();
    let mut next = 0;
    while next < tree.len() {
        let parent = tree[next];
        for &(pid, _) in parents.iter().filter(|(_, ppid)| *ppid == parent) {
            if !tree.contains(&pid) {
                tree.push(pid);
            }
        }
        next += 1;
    }
    tree
}

/// CPU seconds of the processes in `tree`, with those of the children they
/// have reaped (a helper that exited keeps counting).
fn tree_cpu_secs(tree: &[u32]) -> f64 {
    // utime, stime, cutime, cstime: fields 14 to 17, 0-based 11 to 14 after the name.
    tree.iter().map(|&pid| stat_ticks(pid, &[11, 12, 13, 14])).sum::<f64>() / 100.0
}

fn tree_rss_kib(tree: &[u32]) -> u64 {
    tree.iter().map(|&pid| status_kib(pid, "VmRSS:")).sum()
}

/// "1 client", "50 clients".
fn of_clients(n: usize) -> String {
    format!("{n} client{}", if n == 1 { "" } else { "s" })
}

/// Median, min and max of `values` (not empty).
fn spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = match n % 2 {
        1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    };
    (median, values[0], values[n - 1])
}

/// `median (min–max)` with `decimals` places.
fn cell(values: Vec<f64>, decimals: usize) -> String {
    let (median, min, max) = spread(values);
    format!("{median:.decimals$} ({min:.decimals$}–{max:.decimals$})")
}

/// Prints the ratio table (proxies against direct, same pass) and the
/// absolute table (every target), medians and spreads over the passes.
fn summarize(targets: &[Target], passes: &[Vec<Figures>], memory: &[Option<(usize, f64)>]) {
    let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    println!("Ratio to direct within each pass: median (min–max) over {} passes.", passes.len());
    println!();
    println!("| measurement | {} |", names[1..].join(" | "));
    println!("|---{}|", "|---".repeat(names.len() - 1));
    let ratio_row = |label: &str, value: &dyn Fn(&Figures) -> f64| {
        let cells: Vec<String> = (1..targets.len()).map(|i| cell(passes.iter().map(|p| value(&p[i]) / value(&p[0])).collect(), 2)).collect();
        println!("| {label} | {} |", cells.join(" | "));
    };
    for (c, clients) in CLIENTS.into_iter().enumerate() {
        ratio_row(&format!("HTTP keep-alive req/s, {}", of_clients(clients)), &|f| f.rps[c]);
    }
    ratio_row("p50 latency, 1 client (lower is better)", &|f| f.p50[0]);
    ratio_row("p99 latency, 1 client (lower is better)", &|f| f.p99[0]);
    ratio_row("new tunnels/s (CONNECT, 200, echo, close)", &|f| f.tunnels_per_s);
    ratio_row(&format!("tunnel throughput ({})", super::bulk_label()), &|f| f.mb_per_s);
    println!();
    println!("Absolute figures: median (min–max) over {} passes; proxy CPU is the proxy's processes only.", passes.len());
    println!();
    println!("| measurement | {} |", names.join(" | "));
    println!("|---{}|", "|---".repeat(names.len()));
    let absolute_row = |label: &str, decimals: usize, proxies_only: bool, value: &dyn Fn(&Figures) -> f64| {
        let cells: Vec<String> = (0..targets.len())
            .map(|i| match proxies_only && i == 0 {
                true => "—".to_string(),
                false => cell(passes.iter().map(|p| value(&p[i])).collect(), decimals),
            })
            .collect();
        println!("| {label} | {} |", cells.join(" | "));
    };
    for (c, clients) in CLIENTS.into_iter().enumerate() {
        let clients = of_clients(clients);
        absolute_row(&format!("HTTP keep-alive req/s, {clients}"), 0, false, &|f| f.rps[c]);
        absolute_row(&format!("p50 latency µs, {clients}"), 0, false, &|f| f.p50[c]);
        absolute_row(&format!("p99 latency µs, {clients}"), 0, false, &|f| f.p99[c]);
        absolute_row(&format!("proxy CPU µs/request, {clients}"), 1, true, &|f| f.cpu_per_request[c]);
    }
    absolute_row("new tunnels/s", 0, false, &|f| f.tunnels_per_s);
    absolute_row("proxy CPU µs/new tunnel", 1, true, &|f| f.cpu_per_tunnel);
    absolute_row(&format!("tunnel throughput MB/s ({})", super::bulk_label()), 0, false, &|f| f.mb_per_s);
    absolute_row("proxy CPU µs/MB tunnelled", 0, true, &|f| f.cpu_per_mb);
    let memory_cells: Vec<String> = memory
        .iter()
        .map(|m| m.map_or("—".to_string(), |(opened, bytes)| format!("{:.1} KiB ({opened} tunnels)", bytes / 1024.0)))
        .collect();
    println!("| RSS per idle tunnel (one reading) | {} |", memory_cells.join(" | "));
    println!();
    for (i, t) in targets.iter().enumerate() {
        let reconnects: usize = passes.iter().map(|p| p[i].reconnects.iter().sum::<usize>()).sum();
        let failures: usize = passes.iter().map(|p| p[i].failures.iter().sum::<usize>()).sum();
        if reconnects > 0 {
            println!("{}: closed the client connection {reconnects} times over all passes; the load generator reconnected and timed the new connection as part of the request.", t.name);
        }
        if failures > 0 {
            println!("{}: {failures} requests FAILED (not 200, or no new connection) over all passes; they are not in its req/s or latencies.", t.name);
        }
    }
}
