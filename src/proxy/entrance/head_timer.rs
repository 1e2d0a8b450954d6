//! The timer behind one client connection's request-head timeout
//! (`timeouts.request_header`), which also bounds an idle keep-alive
//! connection's wait for its next request.
//!
//! hyper arms a new sleep for every request head and drops it once the
//! head is read, so with a plain tokio timer every request registers an
//! entry in the runtime's timer wheel and removes it again. Here each
//! connection keeps one tokio sleep for all its heads: a new head's sleep
//! only notes its deadline, and the shared timer is moved to it when it
//! fires early (the same lazy reset as the upstream idle timeout). A busy
//! connection then touches the timer wheel once per timeout period, not
//! once per request; no deadline is ever missed, because the shared timer
//! never fires later than the earliest deadline still waiting.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

/// One connection's timer, handed to hyper's connection builder.
#[derive(Clone, Default)]
pub struct HeadTimer {
    shared: Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>,
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: std::time::Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    /// The runtime's clock, as hyper-util's `TokioTimer` reads it (so a
    /// paused test clock is seen).
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep { deadline: deadline.into(), shared: self.shared.clone() })
    }
}

/// One head's deadline, served by the connection's shared sleep.
struct HeadSleep {
    deadline: tokio::time::Instant,
    shared: Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>,
}

impl hyper::rt::Sleep for HeadSleep {}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.deadline;
        // Only this connection's task polls it: the lock is never contended.
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let sleep = shared.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if tokio::time::Instant::now() >= deadline {
                return Poll::Ready(());
            }
            // It fired for an earlier head's deadline: wait for this one.
            sleep.as_mut().reset(deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;
    use std::time::Duration;

    /// A later head's sleep never fires before its own deadline (the
    /// shared timer was armed for an earlier head's), and an earlier
    /// deadline than the shared timer's is not held up by it.
    #[tokio::test]
    async fn each_head_sleep_fires_at_its_own_deadline() {
        let timer = HeadTimer::default();
        let mut first = timer.sleep(Duration::from_millis(50));
        assert!(poll_once(&mut first).is_pending());
        drop(first);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let armed = tokio::time::Instant::now();
        timer.sleep(Duration::from_millis(200)).await;
        assert!(armed.elapsed() >= Duration::from_millis(200), "fired at the first head's deadline");
        let mut late = timer.sleep(Duration::from_secs(600));
        assert!(poll_once(&mut late).is_pending());
        // Generous bound: only the 600 s deadline could make it miss.
        let early = tokio::time::timeout(Duration::from_secs(60), timer.sleep(Duration::from_millis(10))).await;
        assert!(early.is_ok(), "an earlier deadline waited for the shared timer's later one");
    }

    fn poll_once(sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>) -> Poll<()> {
        sleep.as_mut().poll(&mut Context::from_waker(std::task::Waker::noop()))
    }
}
