//! The engine's notion of time, injectable so tests can open a maintenance window or pass a
//! deadline without sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// Longest single sleep on the system clock, so a wall-clock jump is noticed soon enough.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Wall-clock time in Unix milliseconds, and a way to wait for a moment.
#[async_trait::async_trait]
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;
    /// Returns at `at_ms` or somewhat earlier; callers re-read `now_ms` and loop.
    async fn sleep_until(&self, at_ms: i64);
}

/// The machine's clock.
pub struct SystemClock;

#[async_trait::async_trait]
impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        crate::firmware::now_ms()
    }

    async fn sleep_until(&self, at_ms: i64) {
        let wait = Duration::from_millis((at_ms - self.now_ms()).max(0) as u64);
        tokio::time::sleep(wait.min(MAX_SLEEP)).await;
    }
}

/// A clock that moves only when told to.
pub struct ManualClock {
    now: AtomicI64,
    moved: Notify,
}

impl ManualClock {
    pub fn new(now_ms: i64) -> ManualClock {
        ManualClock {
            now: AtomicI64::new(now_ms),
            moved: Notify::new(),
        }
    }

    pub fn set(&self, now_ms: i64) {
        self.now.store(now_ms, Ordering::SeqCst);
        self.moved.notify_waiters();
    }

    pub fn advance(&self, by: Duration) {
        self.set(self.now_ms() + by.as_millis() as i64);
    }
}

#[async_trait::async_trait]
impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now.load(Ordering::SeqCst)
    }

    async fn sleep_until(&self, at_ms: i64) {
        loop {
            let moved = self.moved.notified();
            if self.now_ms() >= at_ms {
                return;
            }
            moved.await;
        }
    }
}
