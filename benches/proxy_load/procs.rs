//! What the load bench reads about its three processes (the generator,
//! the origins and the proxy) from `/proc`: CPU time, context switches and
//! memory. Context switches per request count how often a process slept
//! and was woken for it, which is what bounds latency at one client on a
//! machine where every wake-up is expensive. The cores kept busy tell
//! whether a figure was bound by the machine's CPU rather than by latency.
//! Shared by `proxy_load` and `dns_load`.

use std::time::Instant;

/// The processes a bench reads: the load generator (the bench itself), the
/// server behind the proxy (origins, upstream resolver) and the proxy.
pub type Pids = [u32; 3];

/// The cores this machine gives the bench.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// A reading of the three processes at one moment.
#[derive(Clone, Copy)]
pub struct Reading {
    cpu_secs: [f64; 3],
    switches: [f64; 3],
    at: Instant,
}

/// The processes' use per unit of work (request, MB) between two readings.
#[derive(Clone, Copy, Default)]
pub struct Usage {
    /// CPU µs per unit, each process.
    pub cpu_us: [f64; 3],
    /// Context switches (voluntary and not) per unit, each process.
    pub switches: [f64; 3],
    /// CPU seconds per second, the three processes together.
    pub busy_cores: f64,
}

impl Reading {
    pub fn now(pids: Pids) -> Reading {
        Reading { cpu_secs: pids.map(cpu_secs), switches: pids.map(switches), at: Instant::now() }
    }

    /// The use since `earlier`, per unit of `units` units of work.
    pub fn since(&self, earlier: &Reading, units: f64) -> Usage {
        let per = |to: [f64; 3], from: [f64; 3], scale: f64| [0, 1, 2].map(|i| (to[i] - from[i]) * scale / units.max(1.0));
        let cpu_total: f64 = (0..3).map(|i| self.cpu_secs[i] - earlier.cpu_secs[i]).sum();
        Usage {
            cpu_us: per(self.cpu_secs, earlier.cpu_secs, 1e6),
            switches: per(self.switches, earlier.switches, 1.0),
            busy_cores: cpu_total / self.at.duration_since(earlier.at).as_secs_f64().max(1e-9),
        }
    }
}

impl Usage {
    /// Sums usages measured over `units` each (per-unit figures weighted,
    /// busy cores averaged by weight).
    pub fn weighted(parts: &[(Usage, f64)]) -> Usage {
        let total: f64 = parts.iter().map(|(_, u)| u).sum::<f64>().max(1e-9);
        let mut sum = Usage::default();
        for (usage, units) in parts {
            let w = units / total;
            for i in 0..3 {
                sum.cpu_us[i] += usage.cpu_us[i] * w;
                sum.switches[i] += usage.switches[i] * w;
            }
            sum.busy_cores += usage.busy_cores * w;
        }
        sum
    }

    /// True when the three processes kept (nearly) every core busy: the
    /// figure was bound by the machine's CPU.
    pub fn cpu_bound(&self) -> bool {
        self.busy_cores >= 0.9 * cores() as f64
    }
}

/// The ratio of the direct rate a CPU-bound machine allows the proxied
/// path: the CPU the direct path spends per unit over what the proxied
/// path spends, all processes counted. `None` when the direct run was not
/// bound by CPU (then latency, not CPU, set the rate).
pub fn cpu_ceiling(direct: &Usage, proxied: &Usage) -> Option<f64> {
    let total = |u: &Usage| u.cpu_us.iter().sum::<f64>();
    direct.cpu_bound().then(|| total(direct) / total(proxied).max(1e-9))
}

/// User + system CPU seconds used so far by process `pid` (0 once gone).
pub fn cpu_secs(pid: u32) -> f64 {
    // Fields 14 and 15 of the line (utime, stime): 0-based 11 and 12 after the name.
    stat_ticks(pid, &[11, 12]) / 100.0
}

/// Context switches of every thread of `pid` so far (0 once gone).
fn switches(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0.0 };
    let count = |status: &str, field: &str| -> f64 {
        let line = status.lines().find(|l| l.starts_with(field));
        line.and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0.0)
    };
    tasks
        .flatten()
        .map(|task| std::fs::read_to_string(task.path().join("status")).unwrap_or_default())
        .map(|s| count(&s, "voluntary_ctxt_switches:") + count(&s, "nonvoluntary_ctxt_switches:"))
        .sum()
}

/// Microseconds of CPU each process spent per unit (request, MB) between
/// two readings of [`cpu_secs`].
pub fn cpu_us_per(from: [f64; 3], to: [f64; 3], units: f64) -> [f64; 3] {
    [0, 1, 2].map(|i| (to[i] - from[i]) * 1e6 / units.max(1.0))
}

/// The sum of the given fields of `/proc/pid/stat` (0-based, counted after
/// the command name, which may hold spaces); 0 once the process is gone.
/// Times are in clock ticks of USER_HZ, which is 100 on Linux.
pub fn stat_ticks(pid: u32, fields: &[usize]) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let field = |i: usize| after_name.split_whitespace().nth(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    fields.iter().map(|&i| field(i)).sum()
}

/// A size field (`VmRSS:`, `VmHWM:`) of `/proc/pid/status` in KiB; 0 once the process is gone.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
