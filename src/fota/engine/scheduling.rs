//! Operators' side: scheduling a task (schedule, quota, cached data, window placement),
//! cancelling one, and the maintenance schedules themselves.

use super::*;

impl Engine {
    /// The schedule named in a request: built in, or stored.
    pub(super) async fn find_schedule(&self, name: &str) -> Result<Schedule, FotaError> {
        if let Some(s) = schedule::built_in(name) {
            return Ok(s);
        }
        self.store.get_schedule(name).await?.ok_or_else(|| {
            RequestError::Meaningless {
                field: "schedule",
                message: format!("no schedule named {name:?}"),
            }
            .into()
        })
    }

    pub(super) fn served_protocols(&self) -> String {
        self.bases()
            .iter()
            .filter_map(|(scheme, _)| crate::fota::request::Protocol::of_scheme(scheme))
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Creates a task from the seed's `scheduleFirmwareUpdate` payload.
    pub async fn schedule(
        self: &Arc<Self>,
        device: &str,
        req: ScheduleRequest,
    ) -> Result<FotaTask, FotaError> {
        let t = self.new_task(device, &req, None).await?;
        match self.store_new(&t).await? {
            Created::Stored => Ok(t),
            Created::DeviceBusy(active) => Err(FotaError::DeviceBusy {
                device: device.to_owned(),
                fota_id: active,
            }),
            Created::MemberTaken => Err(FotaError::Meta(crate::meta::MetaError::Backend(
                "a task scheduled alone was refused as a campaign member".into(),
            ))),
        }
    }

    /// Checks what a request names exists here (its schedule, its protocol served), as a
    /// schedule would, without making a task.
    pub async fn check_request(&self, req: &ScheduleRequest) -> Result<(), FotaError> {
        self.find_schedule(&req.schedule).await?;
        if !self
            .bases()
            .iter()
            .any(|(s, _)| *s == req.protocol.scheme())
        {
            return Err(FotaError::ProtocolNotServed {
                requested: req.protocol.name(),
                served: self.served_protocols(),
            });
        }
        Ok(())
    }

    /// Creates the task a campaign releases for one of its members; the store moves the
    /// member in the same step, or refuses when it was released already.
    pub async fn release(
        self: &Arc<Self>,
        device: &str,
        req: &ScheduleRequest,
        link: CampaignLink,
    ) -> Result<(Created, FotaTask), FotaError> {
        let t = self.new_task(device, req, Some(link)).await?;
        Ok((self.store_new(&t).await?, t))
    }

    /// A new task for `device`, placed (or done, with useCachedData), not yet stored. A
    /// device with an active task is busy, whatever else is wrong with the request, unless
    /// a campaign releases the task (the store decides that). The store refuses a second
    /// active task itself, so the look-up is left to the requests it cannot judge: a task
    /// done at once, and the refused ones.
    async fn new_task(
        &self,
        device: &str,
        req: &ScheduleRequest,
        campaign: Option<CampaignLink>,
    ) -> Result<FotaTask, FotaError> {
        check_device(device)?;
        let alone = campaign.is_none();
        let made = self.make_task(device, req, campaign).await;
        if alone && !made.as_ref().is_ok_and(FotaTask::is_active) {
            if let Some(active) = self.store.active_task(device).await? {
                return Err(FotaError::DeviceBusy {
                    device: device.to_owned(),
                    fota_id: active,
                });
            }
        }
        made
    }

    async fn make_task(
        &self,
        device: &str,
        req: &ScheduleRequest,
        campaign: Option<CampaignLink>,
    ) -> Result<FotaTask, FotaError> {
        let scheme = req.protocol.scheme();
        let base = self
            .bases()
            .iter()
            .find(|(s, _)| *s == scheme)
            .map(|(_, b)| b.clone())
            .ok_or_else(|| FotaError::ProtocolNotServed {
                requested: req.protocol.name(),
                served: self.served_protocols(),
            })?;
        let sched = self.find_schedule(&req.schedule).await?;
        let record = match self.repo.resolve(&req.name).await {
            Ok(r) => Some(r),
            Err(FirmwareError::NotFound(_)) if req.firmware_url.is_some() => None,
            Err(FirmwareError::NotFound(n)) => return Err(FotaError::NoFirmware(n)),
            Err(e) => return Err(e.into()),
        };
        let now = self.now_ms();
        let id = new_id(now);
        let capability = new_capability();
        let mut t = FotaTask {
            package_uri: format!("{base}/p/{id}/{capability}"),
            capability,
            id,
            device_id: device.to_owned(),
            firmware: req.name.to_string(),
            options: TaskOptions {
                timeout_ms: req.timeout.as_millis() as i64,
                protocol: req.protocol,
                firmware_url: req.firmware_url.as_ref().map(|u| u.to_string()),
                retention_secs: req.retention.map(|d| d.as_secs()),
                description: req.description.clone(),
                use_quota: req.use_quota,
                use_cached_data: req.use_cached_data,
                resume_after_downlink_failure: req.resume_after_downlink_failure,
                upgrade_strategy: req.upgrade_strategy,
                schedule: sched,
            },
            status: Status::Pending,
            reason: None,
            note: None,
            state: 0,
            update_result: 0,
            bytes_served: 0,
            size: record.as_ref().map(|r| r.size),
            created_ms: now,
            started_ms: None,
            finished_ms: None,
            deadline_ms: None,
            remaining_ms: None,
            wake_ms: None,
            import_owner: None,
            history: Vec::new(),
            revision: 0,
            campaign,
        };
        match &record {
            None => t.set(Status::Pending, Some(waiting::IMPORT), now),
            Some(r) => self.settle(&mut t, r, now).await?,
        }
        Ok(t)
    }

    /// Stores a new task and starts what follows from it (its event, import, timer).
    async fn store_new(self: &Arc<Self>, t: &FotaTask) -> Result<Created, FotaError> {
        let event = TaskEvent::of(t, self.now_ms());
        let announce = self.announcement(&event);
        let created = self.store.create_task(t, announce.as_deref()).await?;
        if created != Created::Stored {
            return Ok(created);
        }
        self.publish(event);
        tracing::info!(fota_id = %t.id, device = %t.device_id, firmware = %t.firmware, status = t.status.as_str(), "FOTA task scheduled");
        if t.is_importing() {
            self.spawn_import(t.id.clone());
        }
        self.due_moved(t.due_ms());
        Ok(created)
    }

    /// useCachedData: why the task has nothing to download, if the device last reported
    /// running this firmware.
    pub(super) async fn cached(
        &self,
        t: &FotaTask,
        r: &FirmwareRecord,
    ) -> Result<Option<String>, FotaError> {
        if !t.options.use_cached_data {
            return Ok(None);
        }
        let Some(info) = self.store.get_device(&t.device_id).await? else {
            return Ok(None);
        };
        Ok(t.runs_already(
            (info.pkg_name.as_deref(), info.pkg_version.as_deref()),
            (r.description.as_deref(), r.version.as_deref()),
        ))
    }

    /// A task whose firmware is ready: done at once when the device runs it already
    /// (useCachedData), else placed in its window.
    pub(super) async fn settle(
        &self,
        t: &mut FotaTask,
        r: &FirmwareRecord,
        now: i64,
    ) -> Result<(), FotaError> {
        match self.cached(t, r).await? {
            Some(note) => t.succeed_from_cache(note, now),
            None => t.place(&calendar(&t.options.schedule), now),
        }
        Ok(())
    }

    /// Cancels a task that has not reached `updating`.
    pub async fn cancel(&self, id: &str) -> Result<FotaTask, FotaError> {
        retried(|| self.cancel_once(id, false)).await
    }

    /// Cancels a task only while it is pending (its device has not been handed the package):
    /// what a campaign that stops does to the tasks it released.
    pub async fn cancel_pending(&self, id: &str) -> Result<FotaTask, FotaError> {
        retried(|| self.cancel_once(id, true)).await
    }

    pub(super) async fn cancel_once(
        &self,
        id: &str,
        only_pending: bool,
    ) -> Result<FotaTask, FotaError> {
        let _g = self.lock_task(id).await;
        let mut t = self.task(id).await?;
        if only_pending && t.status != Status::Pending {
            return Ok(t);
        }
        let before = t.clone();
        t.cancel(self.now_ms())?;
        self.commit(&before, &mut t).await?;
        Ok(t)
    }

    /// Every schedule: the built-in ones, then the stored ones.
    pub async fn schedules(&self) -> Result<Vec<Schedule>, FotaError> {
        let mut all = schedule::built_ins();
        all.extend(self.store.list_schedules().await?);
        Ok(all)
    }

    pub async fn get_schedule(&self, name: &str) -> Result<Schedule, FotaError> {
        if let Some(s) = schedule::built_in(name) {
            return Ok(s);
        }
        self.store
            .get_schedule(name)
            .await?
            .ok_or_else(|| ScheduleError::NotFound(name.to_owned()).into())
    }

    /// Creates or replaces a user-defined schedule. Tasks keep the schedule they were created
    /// with.
    pub async fn put_schedule(&self, name: &str, mut s: Schedule) -> Result<Schedule, FotaError> {
        schedule::check_name(name)?;
        if schedule::built_in(name).is_some() {
            return Err(ScheduleError::BuiltIn(name.to_owned()).into());
        }
        s.name = name.to_owned();
        s.built_in = false;
        s.check()?;
        self.store.put_schedule(&s).await?;
        Ok(s)
    }

    pub async fn delete_schedule(&self, name: &str) -> Result<(), FotaError> {
        if schedule::built_in(name).is_some() {
            return Err(ScheduleError::BuiltIn(name.to_owned()).into());
        }
        if self.store.delete_schedule(name).await? {
            Ok(())
        } else {
            Err(ScheduleError::NotFound(name.to_owned()).into())
        }
    }
}
