//! Group commit for sled: every change is durable before it is answered, and changes that
//! arrive together share one fsync. A caller takes a ticket after its write; if no flush is
//! running it starts one covering every ticket taken so far, else it waits for the running one
//! to end and goes again. A flush started after a write covers it, so no caller returns
//! before its own write is on disk, and under load one fsync serves all who queued behind it.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::MetaError;

/// How often a flush lets the runtime's other tasks go first before it starts.
const GATHER_YIELDS: usize = 4;

#[derive(Default)]
struct State {
    /// Tickets handed out.
    taken: u64,
    /// Whether a flush is running.
    running: bool,
    /// Flushes run so far.
    runs: u64,
}

/// What makes every earlier write durable (for sled, `Db::flush`).
type Fsync = Arc<dyn Fn() -> Result<(), MetaError> + Send + Sync>;

/// Flushes of one sled database, grouped.
#[derive(Clone)]
pub struct GroupFlush {
    state: Arc<Mutex<State>>,
    /// The highest ticket a finished flush covered; changes wake the waiters (also when a
    /// flush failed, so another one starts).
    flushed: Arc<watch::Sender<u64>>,
    fsync: Fsync,
}

impl GroupFlush {
    /// Groups the flushes of `db`.
    pub fn new(db: sled::Db) -> GroupFlush {
        GroupFlush::with(Arc::new(move || {
            db.flush()
                .map(|_| ())
                .map_err(|e| MetaError::Backend(e.to_string()))
        }))
    }

    fn with(fsync: Fsync) -> GroupFlush {
        GroupFlush {
            state: Arc::default(),
            flushed: Arc::new(watch::Sender::new(0)),
            fsync,
        }
    }

    /// Returns once every write made before the call is durable: once a run of `fsync` that
    /// started after the call has succeeded.
    pub async fn flush(&self) -> Result<(), MetaError> {
        let ticket = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.taken += 1;
            s.taken
        };
        let mut flushed = self.flushed.subscribe();
        loop {
            if *flushed.borrow_and_update() >= ticket {
                return Ok(());
            }
            let lead = {
                let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                (!s.running).then(|| {
                    s.running = true;
                    s.runs += 1;
                })
            };
            if lead.is_some() {
                // The flush and its bookkeeping run on their own, so a caller that goes away
                // (a dropped request) cannot leave `running` set.
                let (state, done, fsync) =
                    (self.state.clone(), self.flushed.clone(), self.fsync.clone());
                tokio::spawn(async move {
                    // Changes already under way on the other tasks join this flush rather
                    // than wait for the next: fewer, fuller flushes.
                    for _ in 0..GATHER_YIELDS {
                        tokio::task::yield_now().await;
                    }
                    let covers = state.lock().unwrap_or_else(|e| e.into_inner()).taken;
                    let r = tokio::task::spawn_blocking(move || fsync())
                        .await
                        .unwrap_or_else(|e| Err(MetaError::Backend(e.to_string())));
                    state.lock().unwrap_or_else(|e| e.into_inner()).running = false;
                    done.send_modify(|f| {
                        if r.is_ok() {
                            *f = (*f).max(covers);
                        }
                    });
                    r
                })
                .await
                .map_err(|e| MetaError::Backend(e.to_string()))??;
                continue;
            }
            if flushed.changed().await.is_err() {
                return Err(MetaError::Backend("flusher gone".into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_that_queue_behind_a_flush_share_the_next_one() {
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        let first_call = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let in_fsync = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let entered = in_fsync.clone();
        let group = GroupFlush::with(Arc::new(move || {
            // The first flush waits until the test lets it end.
            if first_call.swap(false, std::sync::atomic::Ordering::SeqCst) {
                entered.store(true, std::sync::atomic::Ordering::SeqCst);
                gate.lock().unwrap().recv().unwrap();
            }
            Ok(())
        }));
        let mut callers = Vec::new();
        let spawn = |callers: &mut Vec<_>| {
            let g = group.clone();
            callers.push(tokio::spawn(async move { g.flush().await }));
        };
        spawn(&mut callers);
        let taken = || group.state.lock().unwrap().taken;
        // Until the first flush is in its fsync: it has settled what it covers.
        while !in_fsync.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        // Ten more arrive while the first flush runs; none of them is covered by it.
        for _ in 0..10 {
            spawn(&mut callers);
        }
        while taken() < 11 {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        for c in callers {
            c.await.unwrap().unwrap();
        }
        assert_eq!(group.state.lock().unwrap().runs, 2, "one flush for the ten");
        assert_eq!(*group.flushed.borrow(), 11);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn changes_made_while_a_flush_gathers_ride_on_it() {
        let group = GroupFlush::with(Arc::new(|| Ok(())));
        // Eleven callers ready at once: the first leads, and its flush lets the other ten
        // take their tickets before it settles what it covers.
        let callers: Vec<_> = (0..11)
            .map(|_| {
                let g = group.clone();
                tokio::spawn(async move { g.flush().await })
            })
            .collect();
        for c in callers {
            c.await.unwrap().unwrap();
        }
        assert_eq!(
            group.state.lock().unwrap().runs,
            1,
            "one fsync for eleven changes"
        );
        assert_eq!(*group.flushed.borrow(), 11);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_flush_is_reported_and_the_next_caller_flushes_again() {
        let fails = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let first = fails.clone();
        let group = GroupFlush::with(Arc::new(move || {
            if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return Err(MetaError::Backend("disk full".into()));
            }
            Ok(())
        }));
        assert!(group.flush().await.is_err());
        group.flush().await.unwrap();
        assert_eq!(group.state.lock().unwrap().runs, 2);
    }
}
