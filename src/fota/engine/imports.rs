//! Firmware imports for tasks whose firmware is not stored: leased to one instance at a time,
//! renewed while it fetches, handed back at shutdown, taken over after a crash.

use super::*;

impl Engine {
    /// Imports a task's firmware on this instance, if it can claim the import: imports are
    /// leased (`fota.import_lease`) so that instances sharing the store fetch each at most
    /// once at a time, and one whose holder stopped renewing is taken over.
    pub(super) fn spawn_import(self: &Arc<Self>, id: String) {
        if !lock(&self.importing).insert(id.clone()) {
            return;
        }
        let this = Arc::clone(self);
        self.work.spawn(async move {
            let outcome = match retried(|| this.claim_import(&id)).await {
                Ok(true) => tokio::select! {
                    // At shutdown the import is dropped (nothing is committed) and handed
                    // back: another instance, or the next start, fetches it again.
                    _ = this.cancel.cancelled() => retried(|| this.release_import(&id)).await,
                    r = this.run_import(&id) => r,
                    () = this.hold_import(&id) => Ok(()),
                },
                other => other.map(|_| ()),
            };
            if let Err(e) = outcome {
                tracing::warn!(fota_id = %id, error = %e, "FOTA import could not be recorded");
            }
            lock(&this.importing).remove(&id);
        });
    }

    /// Takes or renews the lease on a task's import; whether this instance holds it now.
    /// Another instance's lease is respected until it runs out.
    pub(super) async fn claim_import(&self, id: &str) -> Result<bool, FotaError> {
        let _g = self.lock_task(id).await;
        let Some(mut t) = self.store.get_task(id).await? else {
            return Ok(false);
        };
        let now = self.now_ms();
        let mine = self.holds_import(&t);
        let lapsed = t.wake_ms.is_none_or(|w| w <= now);
        if !t.is_importing() || (!mine && !lapsed && self.store.shared()) {
            return Ok(false);
        }
        let before = t.clone();
        t.import_owner = Some(self.origin.clone());
        t.wake_ms = Some(now + self.config.import_lease.0.as_millis() as i64);
        self.commit(&before, &mut t).await?;
        Ok(true)
    }

    /// Renews the lease on an import while it runs; returns when it is lost (taken over, or
    /// the task no longer imports, as when it is cancelled).
    pub(super) async fn hold_import(&self, id: &str) {
        loop {
            tokio::time::sleep(self.config.import_lease.0 / 3).await;
            match retried(|| self.claim_import(id)).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(fota_id = %id, "FOTA import no longer held here; stopped");
                    return;
                }
                Err(e) => {
                    tracing::warn!(fota_id = %id, error = %e, "FOTA import lease not renewed")
                }
            }
        }
    }

    /// The task, locked, while it imports under this instance's lease.
    pub(super) async fn own_import(
        &self,
        id: &str,
    ) -> Result<Option<(tokio::sync::MutexGuard<'_, ()>, FotaTask)>, FotaError> {
        let g = self.lock_task(id).await;
        let t = self.store.get_task(id).await?;
        Ok(t.filter(|t| t.is_importing() && self.holds_import(t))
            .map(|t| (g, t)))
    }

    pub(super) fn holds_import(&self, t: &FotaTask) -> bool {
        t.import_owner.as_deref() == Some(self.origin.as_str())
    }

    /// Gives an import this instance holds back, for anyone to take at once.
    pub(super) async fn release_import(&self, id: &str) -> Result<(), FotaError> {
        let Some((_g, mut t)) = self.own_import(id).await? else {
            return Ok(());
        };
        let before = t.clone();
        t.import_owner = None;
        t.wake_ms = Some(self.now_ms());
        self.commit(&before, &mut t).await
    }

    pub(super) async fn run_import(&self, id: &str) -> Result<(), FotaError> {
        let Some(t) = self.store.get_task(id).await? else {
            return Ok(());
        };
        let url = t.options.firmware_url.as_deref().unwrap_or_default();
        let outcome = match (FirmwareName::parse(&t.firmware), url::Url::parse(url)) {
            (Ok(name), Ok(url)) => {
                let description = Some(t.options.description.clone()).filter(|d| !d.is_empty());
                let retention = t.options.retention_secs.map(Duration::from_secs);
                self.import(&name, &url, retention, description, None)
                    .await
                    .map(|i| match i {
                        Ingested::Created(r) | Ingested::Existing(r) => r,
                    })
            }
            _ => Err(FotaError::NoFirmware(t.firmware.clone())),
        };
        let outcome = outcome.map_err(|e| {
            tracing::warn!(fota_id = %id, error = %e, "FOTA import failed");
            e.to_string()
        });
        retried(|| self.finish_import(id, &outcome)).await
    }

    /// Records an import's outcome in its task.
    pub(super) async fn finish_import(
        &self,
        id: &str,
        outcome: &Result<FirmwareRecord, String>,
    ) -> Result<(), FotaError> {
        // Unless another instance took the import over: then its outcome counts.
        let Some((_g, mut t)) = self.own_import(id).await? else {
            return Ok(());
        };
        let before = t.clone();
        let now = self.now_ms();
        t.import_owner = None;
        t.wake_ms = None;
        match outcome {
            Ok(record) => {
                t.size = Some(record.size);
                self.settle(&mut t, record, now).await?;
            }
            Err(e) => {
                t.note = Some(e.clone());
                t.set(Status::Failed, Some("import-failed"), now);
            }
        }
        self.commit(&before, &mut t).await
    }

    /// Downloads `url` into the repository under `name`, unless the name is stored already.
    pub async fn import(
        &self,
        name: &FirmwareName,
        url: &url::Url,
        retention: Option<Duration>,
        description: Option<String>,
        version: Option<String>,
    ) -> Result<Ingested, FotaError> {
        if let Ok(r) = self.repo.resolve(name).await {
            return Ok(Ingested::Existing(FirmwareRecord::clone(&r)));
        }
        let resp = self.importer.fetch(url).await?;
        let req = UploadRequest {
            retention,
            description,
            version,
            content_length: resp.content_length(),
            ..UploadRequest::default()
        };
        let body = futures_util::TryStreamExt::map_err(resp.bytes_stream(), |e| {
            crate::fota::import::classify(url, e)
        });
        Ok(self.repo.ingest(name, req, body).await?)
    }
}
