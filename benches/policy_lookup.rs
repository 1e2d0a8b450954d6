//! Policy engine benchmarks, each with its baseline in the same run:
//! CIDR longest-prefix match (vs a linear scan and the `prefix-trie` crate),
//! domain matching, a whole `decide()`, compiling a 10^6-prefix table, and
//! lookups under a snapshot swap loop.
//!
//! `cargo bench --bench policy_lookup` (a few minutes on 2 cores).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use portcullis::policy::cidr::CidrTable;
use portcullis::policy::domain::{DomainMatcher, DomainPattern};
use portcullis::policy::{AllowList, Decision, Mode, Policy, PortSet, RequestKind, Role};
use portcullis::target::Target;

/// Counts heap allocations, to show lookups allocate nothing.
struct CountingAlloc;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Deterministic xorshift, so every run benchmarks the same tables.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const BATCH: usize = 1024;

/// Prefix lengths as in a BGP table (mostly /24, some shorter) or uniform.
fn v4_len(rng: &mut Rng, realistic: bool) -> u8 {
    if !realistic {
        return 8 + (rng.next() % 25) as u8;
    }
    match rng.next() % 100 {
        0..=59 => 24,
        60..=74 => 22 + (rng.next() % 2) as u8,
        75..=94 => 16 + (rng.next() % 6) as u8,
        _ => 8 + (rng.next() % 8) as u8,
    }
}

fn v6_len(rng: &mut Rng, realistic: bool) -> u8 {
    if !realistic {
        return 16 + (rng.next() % 49) as u8;
    }
    match rng.next() % 100 {
        0..=49 => 48,
        50..=79 => 32 + (rng.next() % 16) as u8,
        _ => 56 + (rng.next() % 9) as u8,
    }
}

/// IPv4 prefixes inside 1.0.0.0–223.255.255.255; misses are drawn from 240/4.
fn v4_prefixes(n: usize, realistic: bool) -> Vec<Ipv4Net> {
    let mut rng = Rng(0x1234_5678_9abc_def1 ^ n as u64);
    (0..n)
        .map(|_| {
            let first = 1 + (rng.next() % 223) as u32;
            let addr = (first << 24) | (rng.next() as u32 & 0x00ff_ffff);
            Ipv4Net::new(Ipv4Addr::from(addr), v4_len(&mut rng, realistic)).unwrap().trunc()
        })
        .collect()
}

/// IPv6 prefixes inside 2000::/4; misses are drawn from 3000::/4.
fn v6_prefixes(n: usize, realistic: bool) -> Vec<Ipv6Net> {
    let mut rng = Rng(0x0fed_cba9_8765_4321 ^ n as u64);
    (0..n)
        .map(|_| {
            let high = (0x2u128 << 124) | ((rng.next() as u128) << 60) & !(0xfu128 << 124);
            Ipv6Net::new(Ipv6Addr::from(high), v6_len(&mut rng, realistic)).unwrap().trunc()
        })
        .collect()
}

fn v4_queries(prefixes: &[Ipv4Net], hit: bool) -> Vec<Ipv4Addr> {
    let mut rng = Rng(99);
    (0..BATCH)
        .map(|_| {
            if hit {
                let p = prefixes[rng.next() as usize % prefixes.len()];
                let host_bits = (1u64 << (32 - p.prefix_len())) - 1;
                Ipv4Addr::from(u32::from(p.network()) | (rng.next() & host_bits) as u32)
            } else {
                Ipv4Addr::from(0xf000_0000 | (rng.next() as u32 & 0x0fff_ffff))
            }
        })
        .collect()
}

fn v6_queries(prefixes: &[Ipv6Net], hit: bool) -> Vec<Ipv6Addr> {
    let mut rng = Rng(77);
    (0..BATCH)
        .map(|_| {
            let random = ((rng.next() as u128) << 64) | rng.next() as u128;
            if hit {
                let p = prefixes[rng.next() as usize % prefixes.len()];
                let host_mask = u128::MAX.checked_shr(u32::from(p.prefix_len())).unwrap_or(0);
                Ipv6Addr::from(u128::from(p.network()) | (random & host_mask))
            } else {
                Ipv6Addr::from((0x3u128 << 124) | (random & !(0xfu128 << 124)))
            }
        })
        .collect()
}

/// The most specific prefix containing `addr`, by scanning every prefix.
fn linear_v4(prefixes: &[(Ipv4Net, u32)], addr: Ipv4Addr) -> Option<u32> {
    let mut best: Option<(u8, u32)> = None;
    for (net, v) in prefixes {
        if net.contains(&addr) && best.is_none_or(|(len, _)| net.prefix_len() >= len) {
            best = Some((net.prefix_len(), *v));
        }
    }
    best.map(|(_, v)| v)
}

fn linear_v6(prefixes: &[(Ipv6Net, u32)], addr: Ipv6Addr) -> Option<u32> {
    let mut best: Option<(u8, u32)> = None;
    for (net, v) in prefixes {
        if net.contains(&addr) && best.is_none_or(|(len, _)| net.prefix_len() >= len) {
            best = Some((net.prefix_len(), *v));
        }
    }
    best.map(|(_, v)| v)
}

fn allocations_during(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    f();
    ALLOCATIONS.load(Ordering::Relaxed) - before
}

/// One criterion group per address family: both mixes, 10^3 to 10^6
/// prefixes, hits and misses, against `prefix-trie` and (up to 10^5,
/// realistic mix) a linear scan. A macro because the two families differ
/// only in their types and functions.
macro_rules! cidr_group {
    ($fn_name:ident, $group:literal, $net:ty, $wrap:path, $prefixes:ident, $queries:ident, $lookup:ident, $linear:ident) => {
        fn $fn_name(c: &mut Criterion) {
            let mut group = c.benchmark_group($group);
            group.sample_size(10).measurement_time(Duration::from_secs(1)).warm_up_time(Duration::from_millis(300));
            group.throughput(Throughput::Elements(BATCH as u64));
            for (mix, realistic) in [("realistic", true), ("uniform", false)] {
                for n in [1_000usize, 100_000, 1_000_000] {
                    let prefixes = $prefixes(n, realistic);
                    let valued: Vec<($net, u32)> = prefixes.iter().enumerate().map(|(i, p)| (*p, i as u32)).collect();
                    let table = CidrTable::new(valued.iter().map(|(p, v)| ($wrap(*p), *v)));
                    let mut trie = prefix_trie::PrefixMap::<$net, u32>::new();
                    for (p, v) in &valued {
                        trie.insert(*p, *v);
                    }
                    for hit in [true, false] {
                        let queries = $queries(&prefixes, hit);
                        let kind = if hit { "hit" } else { "miss" };
                        // Both structures must agree before either is timed.
                        for q in queries.iter().take(64) {
                            let ours = table.$lookup(*q).copied().map(|v| valued[v as usize].0);
                            let theirs = trie.get_lpm(&<$net>::from(*q)).map(|(p, _)| p);
                            assert_eq!(ours, theirs, "{q}");
                        }
                        let allocs = allocations_during(|| {
                            for q in &queries {
                                black_box(table.$lookup(*q));
                            }
                        });
                        assert_eq!(allocs, 0, "lookups must not allocate");
                        let id = format!("{mix}/{n}/{kind}");
                        group.bench_function(BenchmarkId::new("portcullis", &id), |b| {
                            b.iter(|| queries.iter().filter_map(|q| table.$lookup(*q)).count())
                        });
                        group.bench_function(BenchmarkId::new("prefix_trie", &id), |b| {
                            b.iter(|| queries.iter().filter_map(|q| trie.get_lpm(&<$net>::from(*q))).count())
                        });
                        if n <= 100_000 && realistic {
                            group.bench_function(BenchmarkId::new("linear_scan", &id), |b| {
                                b.iter(|| queries.iter().filter_map(|q| $linear(&valued, *q)).count())
                            });
                        }
                    }
                }
            }
            group.finish();
        }
    };
}

cidr_group!(cidr_v4, "cidr_v4", Ipv4Net, IpNet::V4, v4_prefixes, v4_queries, lookup_v4, linear_v4);
cidr_group!(cidr_v6, "cidr_v6", Ipv6Net, IpNet::V6, v6_prefixes, v6_queries, lookup_v6, linear_v6);

/// `n` rules: half exact names, half wildcards, under many parents.
fn domain_rules(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| if i % 2 == 0 { format!("svc{i}.team{}.example.com", i % 997) } else { format!("*.zone{i}.example.net") })
        .collect()
}

fn domains(c: &mut Criterion) {
    let mut group = c.benchmark_group("domain");
    group.sample_size(10).measurement_time(Duration::from_secs(1)).warm_up_time(Duration::from_millis(300));
    group.throughput(Throughput::Elements(BATCH as u64));
    for n in [10_000usize, 100_000] {
        let rules = domain_rules(n);
        let matcher = DomainMatcher::new(rules.iter().map(|r| (DomainPattern::parse(r).unwrap(), ())));
        let mut rng = Rng(5);
        let hits: Vec<String> = (0..BATCH)
            .map(|_| {
                let i = rng.next() as usize % n;
                match rules[i].strip_prefix("*.") {
                    Some(suffix) => format!("deep.api.{suffix}"),
                    None => rules[i].clone(),
                }
            })
            .collect();
        let misses: Vec<String> = (0..BATCH).map(|i| format!("host{i}.unlisted{}.example.org", i % 31)).collect();
        for (kind, names) in [("hit", &hits), ("miss", &misses)] {
            assert_eq!(names.iter().filter(|n| matcher.lookup(n).is_some()).count(), if kind == "hit" { BATCH } else { 0 });
            let allocs = allocations_during(|| {
                for name in names.iter() {
                    black_box(matcher.lookup(name));
                }
            });
            assert_eq!(allocs, 0, "domain lookups must not allocate");
            group.bench_function(BenchmarkId::new("portcullis", format!("{n}/{kind}")), |b| {
                b.iter(|| names.iter().filter(|name| matcher.lookup(name).is_some()).count())
            });
            if n == 10_000 {
                // Baseline: test every rule in turn.
                group.bench_function(BenchmarkId::new("linear_scan", format!("{n}/{kind}")), |b| {
                    b.iter(|| {
                        names
                            .iter()
                            .filter(|name| {
                                rules.iter().any(|r| match r.strip_prefix("*.") {
                                    Some(s) => name.ends_with(s) && name.len() > s.len() && name.as_bytes()[name.len() - s.len() - 1] == b'.',
                                    None => name.as_str() == r,
                                })
                            })
                            .count()
                    })
                });
            }
        }
    }
    group.finish();
}

/// A policy of the size a large team might use: 1,000 domain rules and 1,000 CIDRs.
fn typical_policy(tag: usize) -> Policy {
    let rules = domain_rules(1_000);
    let cidrs = v4_prefixes(1_000, true).into_iter().map(IpNet::V4);
    let allow = AllowList::new(
        rules.iter().map(|r| DomainPattern::parse(r).unwrap()),
        cidrs,
        PortSet::new([80]),
        PortSet::new([443, 8443 + tag as u16]),
    );
    Policy::new(vec![Role::new("default", Mode::Enforce, true, allow)], "default", &Default::default()).unwrap()
}

fn decide(c: &mut Criterion) {
    let policy = typical_policy(0);
    let role = policy.default_role();
    let target = Target::parse_authority("api.zone501.example.net:443").unwrap();
    let addrs: [IpAddr; 2] = ["93.184.216.34".parse().unwrap(), "2606:2800:220:1::1".parse().unwrap()];
    assert!(matches!(policy.decide(role, RequestKind::Connect, &target, &addrs), Decision::Allow(_)));
    let denied = Target::parse_authority("metadata.google.internal:80").unwrap();
    let meta: [IpAddr; 1] = ["169.254.169.254".parse().unwrap()];
    let mut group = c.benchmark_group("decide");
    group.sample_size(10).measurement_time(Duration::from_secs(1)).warm_up_time(Duration::from_millis(300));
    group.bench_function("allow_name_two_addrs", |b| b.iter(|| policy.decide(role, RequestKind::Connect, black_box(&target), black_box(&addrs))));
    group.bench_function("deny_metadata_name", |b| b.iter(|| policy.decide(role, RequestKind::Http, black_box(&denied), black_box(&meta))));
    group.bench_function("parse_target", |b| b.iter(|| Target::parse_authority(black_box("api.zone501.example.net:443"))));
    group.finish();
}

fn compile(c: &mut Criterion) {
    let prefixes: Vec<(IpNet, u32)> = v4_prefixes(1_000_000, true).into_iter().map(IpNet::V4).zip(0..).collect();
    let table = CidrTable::new(prefixes.iter().cloned());
    println!(
        "compile: 10^6 IPv4 prefixes -> {} bytes of table ({:.1} bytes per prefix)",
        table.heap_bytes(),
        table.heap_bytes() as f64 / 1e6
    );
    let mut group = c.benchmark_group("compile");
    group.sample_size(10).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_millis(500));
    group.bench_function("cidr_table_1e6_v4", |b| b.iter(|| CidrTable::new(prefixes.iter().cloned())));
    group.bench_function("prefix_trie_1e6_v4", |b| {
        b.iter(|| {
            let mut trie = prefix_trie::PrefixMap::<Ipv4Net, u32>::new();
            for (p, v) in &prefixes {
                if let IpNet::V4(p) = p {
                    trie.insert(*p, *v);
                }
            }
            trie
        })
    });
    group.finish();
}

/// Lookups on `readers` threads through the shared snapshot, with or without
/// another thread swapping the snapshot as fast as it can. Returns the total
/// time for `iters` lookups per reader.
fn concurrent_reads(iters: u64, readers: usize, swap: Option<Duration>) -> Duration {
    let a = Arc::new(typical_policy(1));
    let b = Arc::new(typical_policy(2));
    let handle = Arc::new(ArcSwap::from(a.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = swap.map(|pause| {
        let (handle, stop, a, b) = (handle.clone(), stop.clone(), a.clone(), b.clone());
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                handle.store(if swaps.is_multiple_of(2) { b.clone() } else { a.clone() });
                swaps += 1;
                if !pause.is_zero() {
                    std::thread::sleep(pause);
                }
            }
            swaps
        })
    });
    let target = Target::parse_authority("api.zone501.example.net:443").unwrap();
    let addrs: [IpAddr; 1] = ["93.184.216.34".parse().unwrap()];
    let started = Instant::now();
    let threads: Vec<_> = (0..readers)
        .map(|_| {
            let (handle, target) = (handle.clone(), target.clone());
            std::thread::spawn(move || {
                for _ in 0..iters {
                    let policy = handle.load();
                    black_box(policy.decide(policy.default_role(), RequestKind::Connect, &target, &addrs));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    if let Some(s) = swapper {
        black_box(s.join().unwrap());
    }
    elapsed
}

fn snapshot_swap(c: &mut Criterion) {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    // One core is left to the swapping thread, so the comparison measures
    // interference through the snapshot, not competition for a CPU.
    let readers = (cores - 1).max(1);
    let mut group = c.benchmark_group("snapshot");
    group.sample_size(10).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(300));
    group.throughput(Throughput::Elements(readers as u64));
    group.bench_function(BenchmarkId::new("decide_no_swap", readers), |b| b.iter_custom(|iters| concurrent_reads(iters, readers, None)));
    // 1,000 reloads a second: far more than any deployment, yet paced.
    group.bench_function(BenchmarkId::new("decide_swap_every_1ms", readers), |b| {
        b.iter_custom(|iters| concurrent_reads(iters, readers, Some(Duration::from_millis(1))))
    });
    // The worst case: the other core does nothing but swap.
    group.bench_function(BenchmarkId::new("decide_swap_tight_loop", readers), |b| {
        b.iter_custom(|iters| concurrent_reads(iters, readers, Some(Duration::ZERO)))
    });
    group.finish();
}

criterion_group!(benches, cidr_v4, cidr_v6, domains, decide, compile, snapshot_swap);
criterion_main!(benches);
