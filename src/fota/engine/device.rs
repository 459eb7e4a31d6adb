//! Devices' side: who the device is (its token), its work request, its reports, and the
//! package its URI serves.

use super::*;

/// How a device request shows which device sent it.
#[derive(Debug, Clone, Copy)]
pub enum Proof<'a> {
    /// The device token it presented, if any (HTTP bearer, CoAP Uri-Query `token=`).
    Token(Option<&'a str>),
    /// A secure session established as this device (DTLS with the device's pre-shared key).
    Session(&'a str),
    /// A token with the `gateway` role, checked at the edge: it may act as any device.
    Gateway,
}

impl Engine {
    /// Refuses a device that does not present the token its credential needs.
    pub(super) async fn identify(&self, device: &str, proof: Proof<'_>) -> Result<(), FotaError> {
        let credential = match proof {
            Proof::Token(_) => self.store.device_credential(device).await?,
            Proof::Session(_) | Proof::Gateway => None,
        };
        self.admitted(device, proof, credential.as_ref())
    }

    /// [`Engine::identify`] with the device's credential read already.
    fn admitted(
        &self,
        device: &str,
        proof: Proof<'_>,
        credential: Option<&crate::meta::DeviceCredential>,
    ) -> Result<(), FotaError> {
        let presented = match proof {
            Proof::Session(d) if d == device => return Ok(()),
            Proof::Session(d) => {
                return Err(FotaError::OtherDevice {
                    session: d.to_owned(),
                    device: device.to_owned(),
                })
            }
            Proof::Gateway => return Ok(()),
            Proof::Token(t) => t,
        };
        let required = self.device_credentials.load(Ordering::Relaxed);
        if crate::auth::device::admits(required, credential, presented) {
            return Ok(());
        }
        Err(FotaError::DeviceUnauthenticated {
            device: device.to_owned(),
            presented: presented.is_some(),
        })
    }

    /// Sets the device's pre-shared key (hex) under `identity`, registering the device; `None`
    /// when another device has that identity.
    pub async fn set_device_psk(
        &self,
        device: &str,
        identity: &str,
        key: &str,
    ) -> Result<Option<crate::meta::DevicePsk>, FotaError> {
        check_device(device)?;
        let psk = crate::meta::DevicePsk {
            device_id: device.to_owned(),
            identity: identity.to_owned(),
            key: key.to_ascii_lowercase(),
            created_at: crate::fota::view::rfc3339(self.now_ms()),
        };
        if !self.store.put_device_psk(&psk).await? {
            return Ok(None);
        }
        // A device with a credential is in the registry.
        let now = self.now_ms();
        self.store
            .merge_device(device, &serde_json::Map::new(), now)
            .await?;
        Ok(Some(psk))
    }

    /// Removes the device's pre-shared key; `false` when it had none.
    pub async fn remove_device_psk(&self, device: &str) -> Result<bool, FotaError> {
        check_device(device)?;
        Ok(self.store.remove_device_psk(device).await?)
    }

    /// The device and key a DTLS client names by its PSK identity.
    pub async fn device_psk(&self, identity: &str) -> Result<Option<(String, Vec<u8>)>, FotaError> {
        let Some(p) = self.store.psk_by_identity(identity).await? else {
            return Ok(None);
        };
        Ok(hex::decode(&p.key).ok().map(|key| (p.device_id, key)))
    }

    /// Makes (or replaces) the device's token; the token is in this answer only.
    pub async fn issue_device_token(
        &self,
        device: &str,
    ) -> Result<(String, crate::meta::DeviceCredential), FotaError> {
        check_device(device)?;
        let (token, credential) = crate::auth::device::mint(device).map_err(|e| {
            FotaError::Meta(crate::meta::MetaError::Backend(format!("random: {e}")))
        })?;
        self.store.put_device_credential(&credential).await?;
        Ok((token, credential))
    }

    /// Removes the device's token; `false` when it had none.
    pub async fn revoke_device_token(&self, device: &str) -> Result<bool, FotaError> {
        check_device(device)?;
        Ok(self.store.remove_device_credential(device).await?)
    }

    /// Registers a device on its first contact and keeps its last-seen time, writing at most
    /// once per [`SEEN_EVERY`] for a device that only polls; `report` (its firmware) is
    /// always written.
    pub(crate) async fn seen(
        &self,
        device: &str,
        report: Option<&Report>,
    ) -> Result<(), FotaError> {
        let now = self.now_ms();
        let mut patch = serde_json::Map::new();
        if let Some(r) = report.filter(|r| r.names_firmware()) {
            let text = |v: &Option<String>| v.clone().map_or(serde_json::Value::Null, Into::into);
            if r.pkg_name.is_some() || r.pkg_version.is_some() {
                patch.insert("pkgName".into(), text(&r.pkg_name));
                patch.insert("pkgVersion".into(), text(&r.pkg_version));
            }
            if r.firmware_version.is_some() {
                patch.insert("firmwareVersion".into(), text(&r.firmware_version));
            }
            if let Some(p) = &r.protocols {
                patch.insert("protocols".into(), json!(p));
            }
            patch.insert("reportedMs".into(), now.into());
        }
        let fresh = lock(&self.seen)
            .get(device)
            .is_some_and(|at| now - at < SEEN_EVERY.as_millis() as i64);
        if patch.is_empty() && fresh {
            return Ok(());
        }
        patch.insert("lastSeenMs".into(), now.into());
        self.store.merge_device(device, &patch, now).await?;
        let mut seen = lock(&self.seen);
        if seen.len() >= SEEN_REMEMBERED {
            seen.clear();
        }
        seen.insert(device.to_owned(), now);
        Ok(())
    }

    /// Sets what a device without a task is offered when it asks: a running campaign it
    /// has joined since the campaign started.
    pub fn set_joiner(&self, joiner: std::sync::Weak<dyn Joiner>) {
        let _ = self.joiner.set(joiner);
    }

    /// The device's work; `credential` is the device token it presented.
    pub async fn work(&self, device: &str, proof: Proof<'_>) -> Result<Work, FotaError> {
        check_device(device)?;
        // One look-up for both; nothing of the task is used unless the device is admitted.
        let (credential, active) = self.store.credential_and_active_task(device).await?;
        self.admitted(device, proof, credential.as_ref())?;
        let mut read = Some(active);
        // When the device was last seen is stored beside the work, not before it.
        let (seen, work) = tokio::join!(
            self.seen(device, None),
            retried(|| self.work_once(device, read.take()))
        );
        seen?;
        work
    }

    /// `read`: the device's active task as read already, on the first attempt.
    pub(super) async fn work_once(
        &self,
        device: &str,
        read: Option<Option<FotaTask>>,
    ) -> Result<Work, FotaError> {
        let poll = self.config.poll_interval.0;
        let mut active = match read {
            Some(active) => active,
            None => self.store.active_task_of(device).await?,
        };
        if active.is_none() {
            if let Some(joiner) = self.joiner.get().and_then(std::sync::Weak::upgrade) {
                if joiner.join(device).await? {
                    active = self.store.active_task_of(device).await?;
                }
            }
        }
        let Some(mut t) = active else {
            return Ok(Work::Nothing { retry_after: poll });
        };
        // Read before the lock, in one look-up with the device's active task: a change
        // stored meanwhile makes this request's own change stale, and `retried` reads again.
        let _g = self.lock_task(&t.id).await;
        let now = self.now_ms();
        if t.status.is_final() {
            return Ok(Work::Nothing { retry_after: poll });
        }
        let record = match self.repo.resolve_any(&t.firmware).await {
            Ok(r) => r,
            Err(FirmwareError::NotFound(_)) if t.is_importing() => {
                return Ok(Work::Nothing {
                    retry_after: IMPORT_RETRY,
                })
            }
            Err(FirmwareError::NotFound(_)) => {
                let before = t.clone();
                t.note = Some(format!("firmware {:?} was deleted", t.firmware));
                t.set(Status::Failed, Some("firmware-missing"), now);
                self.commit(&before, &mut t).await?;
                return Ok(Work::Nothing { retry_after: poll });
            }
            Err(e) => return Err(e.into()),
        };
        if t.status.is_started() {
            return Ok(Work::Task {
                task: Box::new(t),
                record,
            });
        }
        if t.is_importing() {
            return Ok(Work::Nothing {
                retry_after: IMPORT_RETRY,
            });
        }
        let before = t.clone();
        if let Some(wake) = t
            .wake_ms
            .filter(|w| *w > now && t.reason.as_deref() == Some(waiting::DEFERRED))
        {
            return Ok(Work::Nothing {
                retry_after: until(now, wake),
            });
        }
        // A campaign's task starts only while the campaign runs: paused, stopped or aborted,
        // no new device starts, even before the campaign's pending tasks are cancelled.
        if let Some(link) = &t.campaign {
            let running = self
                .store
                .get_campaign(&link.id)
                .await?
                .is_some_and(|c| c.state == crate::model::campaign::State::Running);
            if !running {
                return Ok(Work::Nothing { retry_after: poll });
            }
        }
        if let Some(note) = self.cached(&t, &record).await? {
            t.succeed_from_cache(note, now);
            self.commit(&before, &mut t).await?;
            return Ok(Work::Nothing { retry_after: poll });
        }
        if !t.wait_for_window(&calendar(&t.options.schedule), now) {
            let retry_after = t.wake_ms.map_or(poll, |w| until(now, w));
            if t != before {
                self.commit(&before, &mut t).await?;
            }
            return Ok(Work::Nothing { retry_after });
        }
        t.size = Some(record.size);
        t.deliver(now);
        match self.commit(&before, &mut t).await {
            Ok(()) => Ok(Work::Task {
                task: Box::new(t),
                record,
            }),
            Err(FotaError::QuotaFull) => {
                let mut t = before.clone();
                t.pause_clock(now);
                if t.reason.as_deref() != Some(waiting::QUOTA) {
                    t.set(Status::Pending, Some(waiting::QUOTA), now);
                }
                if t != before {
                    self.commit(&before, &mut t).await?;
                }
                Ok(Work::Nothing { retry_after: poll })
            }
            Err(e) => Err(e),
        }
    }

    /// Applies a device report.
    /// A report on task `id`, from the device that owns it: `credential` is the device token
    /// it presented.
    pub async fn report(
        &self,
        id: &str,
        report: &Report,
        proof: Proof<'_>,
    ) -> Result<FotaTask, FotaError> {
        retried(|| self.report_once(id, report, proof)).await
    }

    pub(super) async fn report_once(
        &self,
        id: &str,
        report: &Report,
        proof: Proof<'_>,
    ) -> Result<FotaTask, FotaError> {
        let _g = self.lock_task(id).await;
        let (mut t, credential) = (self.store.task_and_credential(id).await?)
            .ok_or_else(|| FotaError::NotFound(id.to_owned()))?;
        self.admitted(&t.device_id, proof, credential.as_ref())?;
        let before = t.clone();
        let now = self.now_ms();
        let deferred_until = now.saturating_add(self.config.deferred_retry.0.as_millis() as i64);
        t.apply(report, deferred_until, now)?;
        // What the device reported of itself is stored beside the task, not before it.
        let device = t.device_id.clone();
        let (seen, committed) = tokio::join!(self.seen(&device, Some(report)), async {
            if t != before {
                self.commit(&before, &mut t).await?;
            }
            Ok::<_, FotaError>(())
        });
        seen?;
        committed?;
        Ok(t)
    }

    /// A wrong token is always refused; a missing one only with `auth.package_tokens`.
    pub(super) fn check_capability(
        &self,
        capability: &str,
        token: Option<&str>,
    ) -> Result<(), FotaError> {
        match token {
            Some(t) if !capability.is_empty() && same_secret(t, capability) => Ok(()),
            Some(_) => Err(FotaError::PackageToken),
            None if self.package_tokens() => Err(FotaError::PackageToken),
            None => Ok(()),
        }
    }

    /// The firmware behind a task's package URI. A request for bytes moves a task that was
    /// just delivered to `downloading`.
    pub async fn package(
        &self,
        id: &str,
        token: Option<&str>,
        for_bytes: bool,
    ) -> Result<Arc<Package>, FotaError> {
        retried(|| self.package_once(id, token, for_bytes)).await
    }

    pub(super) async fn package_once(
        &self,
        id: &str,
        token: Option<&str>,
        for_bytes: bool,
    ) -> Result<Arc<Package>, FotaError> {
        let cached = lock(&self.packages)
            .get(id)
            .filter(|(_, at)| at.elapsed() < PACKAGE_TTL)
            .map(|(p, _)| Arc::clone(p));
        if let Some(p) = cached {
            self.check_capability(&p.capability, token)?;
            return Ok(p);
        }
        let mut t = self.task(id).await?;
        self.check_capability(&t.capability, token)?;
        if !t.status.is_started() {
            return Err(FotaError::PackageUnavailable(
                id.to_owned(),
                t.status.as_str(),
            ));
        }
        if t.status == Status::Delivering && for_bytes {
            let _g = self.lock_task(id).await;
            t = self.task(id).await?;
            if t.status == Status::Delivering {
                let before = t.clone();
                let now = self.now_ms();
                t.set(Status::Downloading, None, now);
                self.commit(&before, &mut t).await?;
            }
        }
        let record = self.repo.resolve_any(&t.firmware).await?;
        let progress = Arc::clone(
            lock(&self.progress)
                .entry(t.id.clone())
                .or_insert_with(|| Arc::new(AtomicU64::new(0))),
        );
        let p = Arc::new(Package {
            capability: t.capability.clone(),
            task_id: t.id.clone(),
            record,
            progress,
        });
        if t.status != Status::Delivering {
            let mut cache = lock(&self.packages);
            if cache.len() >= 10_000 {
                cache.clear();
            }
            cache.insert(t.id, (Arc::clone(&p), Instant::now()));
        }
        Ok(p)
    }
}
