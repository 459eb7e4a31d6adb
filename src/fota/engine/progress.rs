//! Bytes served per task: counted in memory as packages are served, stored every
//! `fota.progress_save` and once more at shutdown, so every instance shows them and a stop
//! loses none.

use super::*;

impl Engine {
    /// Stores the bytes served per task every `fota.progress_save` until shutdown (the last
    /// save comes from [`Engine::save_progress`] once serving has stopped).
    pub(super) async fn save_progress_every(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(self.config.progress_save.0) => {}
            }
            self.save_progress().await;
        }
    }

    /// Stores the bytes served to each task that are not stored yet, and forgets the counters
    /// of tasks that ended (here or on another instance) and nothing serves any more.
    pub async fn save_progress(&self) {
        let unsaved: Vec<String> = lock(&self.progress)
            .iter()
            .filter(|(_, p)| p.load(Ordering::Relaxed) > 0)
            .map(|(id, _)| id.clone())
            .collect();
        for id in unsaved {
            if let Err(e) = retried(|| self.save_progress_of(&id)).await {
                tracing::warn!(fota_id = %id, error = %e, "FOTA progress not stored");
            }
        }
        lock(&self.packages).retain(|_, (_, at)| at.elapsed() < PACKAGE_TTL);
        // A counter only this map holds (no cached package, no download in flight) and
        // with nothing unsaved can go; the next download of the task makes a new one.
        lock(&self.progress)
            .retain(|_, p| Arc::strong_count(p) > 1 || p.load(Ordering::Relaxed) > 0);
    }

    pub(super) async fn save_progress_of(&self, id: &str) -> Result<(), FotaError> {
        let _g = self.lock_task(id).await;
        let unsaved = lock(&self.progress)
            .get(id)
            .map_or(0, |p| p.load(Ordering::Relaxed));
        if unsaved == 0 {
            return Ok(());
        }
        match self.store.get_task(id).await? {
            Some(mut t) if t.is_active() => {
                let before = t.clone();
                self.commit(&before, &mut t).await
            }
            // Ended elsewhere: the outcome is stored, and so are the bytes that counted.
            _ => {
                lock(&self.progress).remove(id);
                lock(&self.packages).remove(id);
                Ok(())
            }
        }
    }
}
