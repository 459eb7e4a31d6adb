//! A progress line on stderr (bytes, rate, time left), redrawn a few times a second, only
//! when stderr is a terminal: CI logs get no control characters.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) struct Progress {
    state: Arc<State>,
}

struct State {
    label: String,
    total: u64,
    done: AtomicU64,
    started: Instant,
    /// Bytes already there when this started (a resumed transfer), left out of the rate.
    base: AtomicU64,
    finished: AtomicBool,
}

fn size(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl State {
    fn line(&self) -> String {
        let done = self.done.load(Ordering::Relaxed);
        let fresh = done.saturating_sub(self.base.load(Ordering::Relaxed));
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = fresh as f64 / secs;
        let left = if rate > 0.0 {
            let s = (self.total.saturating_sub(done)) as f64 / rate;
            format!("{}:{:02} left", (s as u64) / 60, (s as u64) % 60)
        } else {
            "--:-- left".into()
        };
        let pct = if self.total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / self.total as f64
        };
        format!(
            "{} {:>5.1}%  {} / {}  {}/s  {}",
            self.label,
            pct,
            size(done as f64),
            size(self.total as f64),
            size(rate),
            left
        )
    }
}

impl Progress {
    /// A progress line for `total` bytes, drawn only on a terminal.
    pub(crate) fn new(label: &str, total: u64) -> Progress {
        let state = Arc::new(State {
            label: label.to_owned(),
            total,
            done: AtomicU64::new(0),
            started: Instant::now(),
            base: AtomicU64::new(0),
            finished: AtomicBool::new(false),
        });
        if std::io::stderr().is_terminal() {
            let s = Arc::clone(&state);
            tokio::spawn(async move {
                while !s.finished.load(Ordering::Relaxed) {
                    eprint!("\r\x1b[2K{}", s.line());
                    let _ = std::io::stderr().flush();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
        Progress { state }
    }

    pub(crate) fn add(&self, n: u64) {
        self.state.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Starts again from `at` bytes (a resumed transfer).
    pub(crate) fn set(&self, at: u64) {
        self.state.done.store(at, Ordering::Relaxed);
        self.state.base.store(at, Ordering::Relaxed);
    }

    /// A counter the body streams add to.
    pub(crate) fn counter(&self) -> impl Fn(u64) + Send + Sync + 'static {
        let s = Arc::clone(&self.state);
        move |n| {
            s.done.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn finish(&self) {
        if !self.state.finished.swap(true, Ordering::Relaxed) && std::io::stderr().is_terminal() {
            eprintln!("\r\x1b[2K{}", self.state.line());
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.state.finished.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(size(512.0), "512 B");
        assert_eq!(size(1536.0), "1.5 KiB");
        assert_eq!(size((1u64 << 30) as f64), "1.0 GiB");
    }
}
