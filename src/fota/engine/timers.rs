//! The timer: one loop sleeps until the earliest stored deadline or window opening (or a
//! change that moves it, local or announced by another instance) and moves the tasks due.

use super::*;

impl Engine {
    pub(super) async fn run_timers(self: Arc<Self>) {
        let cancel = self.cancel.clone();
        loop {
            let changed = self.due_changed.notified();
            self.next_wake.store(i64::MAX, Ordering::SeqCst);
            let now = self.clock.now_ms();
            let mut next = match self.tick(now).await {
                Ok(next) => next.unwrap_or(now + 3_600_000),
                Err(e) => {
                    tracing::warn!(error = %e, "FOTA timer pass failed");
                    now + RETRY_AFTER.as_millis() as i64
                }
            };
            if self.store.shared() {
                // Other instances set deadlines and windows this one is not told of.
                next = next.min(now + self.config.shared_timer_poll.0.as_millis() as i64);
            }
            self.next_wake.store(next, Ordering::SeqCst);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = changed => {}
                _ = self.clock.sleep_until(next) => {}
            }
        }
    }

    /// A task's due time was stored: the timer wakes if it is earlier than the timer's next
    /// look. A due time removed or moved later wakes nothing; the timer finds it at its look.
    pub(super) fn due_moved(&self, due: Option<i64>) {
        if due.is_some_and(|d| d < self.next_wake.load(Ordering::SeqCst)) {
            self.due_changed.notify_one();
        }
    }

    /// Handles every task due by `now`; returns when the next one is due.
    pub(super) async fn tick(self: &Arc<Self>, now: i64) -> Result<Option<i64>, FotaError> {
        loop {
            let batch = self.store.due(now, DUE_BATCH).await?;
            for task in &batch {
                retried(|| self.on_due(&task.id, now)).await?;
            }
            if batch.len() < DUE_BATCH {
                break;
            }
        }
        Ok(self.store.next_due().await?)
    }

    pub(super) async fn on_due(self: &Arc<Self>, id: &str, now: i64) -> Result<(), FotaError> {
        let _g = self.lock_task(id).await;
        let Some(mut t) = self.store.get_task(id).await? else {
            return Ok(());
        };
        if t.is_importing() {
            // The lease on the import ran out: this instance's is renewed, another's is
            // taken over.
            drop(_g);
            if self.claim_import(id).await? {
                self.spawn_import(id.to_owned());
            }
            return Ok(());
        }
        let before = t.clone();
        if t.deadline_ms.is_some_and(|d| d <= now) {
            t.set(Status::Failed, Some("timeout"), now);
        } else if t.wake_ms.is_some_and(|w| w <= now) {
            t.wake_ms = None;
            if t.status == Status::Pending {
                t.place(&calendar(&t.options.schedule), now);
            }
        } else {
            return Ok(());
        }
        self.commit(&before, &mut t).await
    }
}
