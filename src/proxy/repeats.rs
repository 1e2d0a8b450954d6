//! Clients repeating wrong proxy credentials: the JDK's HttpURLConnection
//! retries a rejected password up to 20 times in a row. A failure within
//! [`WINDOW`] of the same client's previous one is a repeat: it is answered
//! with `Connection: close` and counted, and at most one log line per client
//! per window is written for repeats.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a failure makes the next one from the same client a repeat, and
/// how often a repeating client gets a log line.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Clients tracked at most; older entries are dropped first when full.
const MAX_CLIENTS: usize = 4096;

/// What to do with one credential failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The client's first failure in the window: answered and logged as usual.
    First,
    /// A repeat: close the connection; `log` says whether this one gets a
    /// log line (one per client per window).
    Repeat { log: bool },
}

#[derive(Debug, Clone, Copy)]
struct Client {
    last_failure: Instant,
    last_logged: Instant,
}

/// Recent credential failures per client address. Touched only on the
/// failure path, never for an accepted request.
#[derive(Debug, Default)]
pub struct AuthFailures {
    clients: Mutex<HashMap<IpAddr, Client>>,
}

impl AuthFailures {
    /// Records a failure from `client` at `now` and says how to treat it.
    pub fn record(&self, client: IpAddr, now: Instant) -> Failure {
        let Ok(mut clients) = self.clients.lock() else { return Failure::First };
        if clients.len() >= MAX_CLIENTS && !clients.contains_key(&client) {
            clients.retain(|_, c| now.duration_since(c.last_failure) < WINDOW);
            if clients.len() >= MAX_CLIENTS {
                clients.clear();
            }
        }
        let fresh = Client { last_failure: now, last_logged: now };
        let entry = clients.entry(client).or_insert(fresh);
        if entry.last_failure == now {
            return Failure::First;
        }
        let repeat = now.duration_since(entry.last_failure) < WINDOW;
        entry.last_failure = now;
        if !repeat {
            entry.last_logged = now;
            return Failure::First;
        }
        let log = now.duration_since(entry.last_logged) >= WINDOW;
        if log {
            entry.last_logged = now;
        }
        Failure::Repeat { log }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tight_loop_is_closed_and_logged_once_per_window() {
        let failures = AuthFailures::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        for (client, at, expected) in [
            (a, ms(0), Failure::First),
            (a, ms(10), Failure::Repeat { log: false }),
            (b, ms(15), Failure::First),
            (a, ms(20), Failure::Repeat { log: false }),
            // Still failing every few seconds: one log line per window.
            (a, ms(6_000), Failure::Repeat { log: false }),
            (a, ms(10_001), Failure::Repeat { log: true }),
            (a, ms(10_002), Failure::Repeat { log: false }),
            // Quiet for a whole window: the next failure is a first again.
            (a, ms(30_000), Failure::First),
            (b, ms(30_001), Failure::First),
        ] {
            assert_eq!(failures.record(client, at), expected, "{client} at {:?}", at - t0);
        }
    }
}
