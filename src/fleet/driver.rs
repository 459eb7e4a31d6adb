//! The campaign driver: for each running campaign, a pass reads the counts, lets the
//! campaign's plan decide (abort at the error threshold, advance or pause a wave, finish),
//! stores that decision from the revision it read, and releases as many waiting devices as
//! the rate allows; before that it writes the next members of the campaign's roster. A pass
//! runs when a campaign task moves (on any instance sharing the store), when an operator
//! acts, and every [`TICK`].
//!
//! Instances sharing PostgreSQL run passes concurrently: a decision is stored only from the
//! revision it was made on, and a member is released only by the store step that creates its
//! task, so no device starts twice and no wave advances twice.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use super::{lock, Fleet, FleetError};
use crate::fota::request::ScheduleRequest;
use crate::fota::task::CampaignLink;
use crate::fota::Joiner;
use crate::meta::Created;
use crate::model::campaign::{member, Campaign, Member, State};

/// A pass over every live campaign at least this often (the rate's releases, skipped
/// devices' retries, start and end times).
const TICK: Duration = Duration::from_secs(1);
/// A device busy with another task is tried again after this long.
const SKIP_RETRY: Duration = Duration::from_secs(30);
/// How long a pass waits for the transitions arriving with the one that woke it.
const COALESCE: Duration = Duration::from_millis(20);
/// Members released at once within a pass.
const RELEASE_CONCURRENCY: usize = 64;
/// How long a pass spends writing a campaign's members from its roster at most.
const MATERIALIZE: Duration = Duration::from_millis(200);
/// Tasks cancelled per store call when a campaign ends.
const CANCEL_BATCH: usize = 500;

impl Fleet {
    /// Runs the driver until shutdown, and offers late joiners to the engine.
    pub fn run(self: &Arc<Self>) {
        let joiner: Arc<dyn Joiner> = Arc::clone(self) as Arc<dyn Joiner>;
        self.engine.set_joiner(Arc::downgrade(&joiner));
        self.follow_others();
        let this = Arc::clone(self);
        self.work.spawn(async move {
            loop {
                if let Err(e) = this.pass().await {
                    tracing::warn!(error = %e, "campaign pass failed");
                }
                // Wait for a reason to look again: a campaign task moved, a person acted, or
                // the tick.
                tokio::select! {
                    _ = this.cancel.cancelled() => return,
                    _ = this.wake.notified() => {}
                    _ = this.engine.campaign_task_moved() => {}
                    _ = tokio::time::sleep(TICK) => {}
                }
                // Transitions that arrive together make one pass: under load many tasks
                // move per millisecond, and each pass reads every campaign's counts.
                tokio::time::sleep(COALESCE).await;
                this.engine.forget_campaign_moves();
            }
        });
    }

    /// One pass over every live campaign.
    pub(super) async fn pass(&self) -> Result<(), FleetError> {
        let live = self.store.live_campaigns().await?;
        let mut compiled = Vec::with_capacity(live.len());
        for c in &live {
            let cached = lock(&self.selectors).get(&c.id).cloned();
            let selector = match cached {
                Some(s) => s,
                None => match self.selector(c).await {
                    Ok(s) => {
                        let s = Arc::new(s);
                        lock(&self.selectors).insert(c.id.clone(), Arc::clone(&s));
                        s
                    }
                    Err(e) => {
                        tracing::warn!(campaign = %c.id, error = %e, "campaign target does not resolve");
                        continue;
                    }
                },
            };
            compiled.push((c.clone(), selector));
        }
        *lock(&self.live) = compiled;
        for c in live {
            if let Err(e) = self.materialize(&c.id).await {
                tracing::warn!(campaign = %c.id, error = %e, "campaign members not written");
            }
            if let Err(e) = self.drive(&c.id).await {
                tracing::warn!(campaign = %c.id, error = %e, "campaign step failed");
            }
        }
        Ok(())
    }

    /// Writes member records from the campaign's roster, in release order, for up to
    /// [`MATERIALIZE`] per pass: within seconds of the start for 100,000 devices, and ahead
    /// of the releases, which take only written members.
    pub(super) async fn materialize(&self, id: &str) -> Result<(), FleetError> {
        let began = std::time::Instant::now();
        while began.elapsed() < MATERIALIZE && self.store.materialize(id).await? {}
        Ok(())
    }

    /// Decides and releases for one campaign.
    pub(super) async fn drive(&self, id: &str) -> Result<(), FleetError> {
        for _ in 0..16 {
            let Some(c) = self.store.get_campaign(id).await? else {
                return Ok(());
            };
            if !c.state.is_live() {
                lock(&self.selectors).remove(id);
                return Ok(());
            }
            let now = self.now_ms();
            let counts = self.store.campaign_counts(id).await?;
            let plan = c.plan(&counts, now);
            let mut next = c.clone();
            if plan.to.is_some() || plan.current_wave != c.current_wave {
                next.apply(&plan, now);
            }
            let releases = if plan.release > 0 {
                let due = self
                    .store
                    .skipped_due(id, now, plan.release as usize)
                    .await?;
                let left = plan.release as usize - due.len();
                let mut waiting = if left > 0 {
                    self.store
                        .waiting_members(id, plan.current_wave, left)
                        .await?
                } else {
                    Vec::new()
                };
                waiting.splice(0..0, due);
                waiting
            } else {
                Vec::new()
            };
            if c.rate.is_some() && !releases.is_empty() {
                next.spend(releases.len() as u64, now);
            }
            if next != c {
                next.revision = c.revision + 1;
                let event = (next.state != c.state).then(|| self.event(&next));
                let announce = event.as_ref().and_then(|e| self.announcement(e));
                if !self
                    .store
                    .put_campaign(&next, c.revision, announce.as_deref())
                    .await?
                {
                    continue;
                }
                if let Some(e) = event {
                    self.publish(e);
                }
                if next.state == State::Aborted {
                    self.cancel_pending(id).await?;
                }
            }
            if next.state == State::Running {
                let req = self.task_request(&next)?;
                let version = self
                    .repo
                    .resolve(&req.name)
                    .await
                    .ok()
                    .and_then(|r| r.version.clone());
                let version = version.as_deref();
                // Concurrently, so the stores' group commit shares their fsyncs.
                let done: Vec<Result<(), FleetError>> = futures_util::stream::iter(releases)
                    .map(|m| self.release(&next, &req, version, m))
                    .buffer_unordered(RELEASE_CONCURRENCY)
                    .collect()
                    .await;
                done.into_iter().collect::<Result<(), _>>()?;
            }
            return Ok(());
        }
        Err(FleetError::Stale(id.to_owned()))
    }

    fn task_request(&self, c: &Campaign) -> Result<ScheduleRequest, FleetError> {
        let mut options = c.options.clone();
        options.insert("name".into(), c.firmware.clone().into());
        ScheduleRequest::parse(&serde_json::Value::Object(options))
            .map_err(|e| super::invalid("options", e.to_string()))
    }

    /// Gives one member its task: none if it runs `version` (the image's) already (up to
    /// date), later if it is busy with another task (skipped).
    async fn release(
        &self,
        c: &Campaign,
        req: &ScheduleRequest,
        version: Option<&str>,
        m: Member,
    ) -> Result<(), FleetError> {
        let from = [member::WAITING, member::SKIPPED];
        if let Some(v) = version {
            let device = self.store.get_device(&m.device_id).await?;
            if device.is_some_and(|d| d.runs(v)) {
                let done = Member {
                    status: member::UP_TO_DATE.to_owned(),
                    reason: Some(format!("the device reports {v} already")),
                    retry_at_ms: None,
                    ..m
                };
                self.store.move_member(&c.id, &from, &done).await?;
                return Ok(());
            }
        }
        let link = CampaignLink {
            id: c.id.clone(),
            wave: m.wave,
        };
        let skip = |reason: String| Member {
            status: member::SKIPPED.to_owned(),
            reason: Some(reason),
            retry_at_ms: Some(self.now_ms() + SKIP_RETRY.as_millis() as i64),
            ..m.clone()
        };
        match self.engine.release(&m.device_id, req, link).await {
            Ok((Created::Stored | Created::MemberTaken, _)) => Ok(()),
            Ok((Created::DeviceBusy(other), _)) => {
                let reason = format!("busy with task {other}; tried again later");
                self.store.move_member(&c.id, &from, &skip(reason)).await?;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(campaign = %c.id, device = %m.device_id, error = %e, "campaign task not created");
                self.store
                    .move_member(&c.id, &from, &skip(e.to_string()))
                    .await?;
                Ok(())
            }
        }
    }

    /// Cancels the campaign's released tasks that have not started.
    pub(super) async fn cancel_pending(&self, id: &str) -> Result<(), FleetError> {
        let mut after: Option<String> = None;
        loop {
            let page = self
                .store
                .list_members(id, Some("pending"), after.as_deref(), CANCEL_BATCH)
                .await?;
            let more = page.len() == CANCEL_BATCH;
            after = page.last().map(|m| m.device_id.clone());
            for m in page {
                if let Some(t) = &m.task_id {
                    // A task that started meanwhile finishes; that is not an error.
                    if let Err(e) = self.engine.cancel_pending(t).await {
                        tracing::debug!(task = %t, error = %e, "campaign task not cancelled");
                    }
                }
            }
            if !more {
                return Ok(());
            }
        }
    }
}

#[async_trait::async_trait]
impl Joiner for Fleet {
    /// A device without a task that a running campaign's target now holds, and that is not
    /// yet its member, joins the campaign's current wave (`includeLateJoiners`).
    async fn join(&self, device: &str) -> Result<bool, crate::fota::FotaError> {
        let live: Vec<_> = lock(&self.live)
            .iter()
            .filter(|(c, _)| c.include_late_joiners && c.state == State::Running)
            .cloned()
            .collect();
        if live.is_empty() {
            return Ok(false);
        }
        let Some(d) = self.store.get_device(device).await? else {
            return Ok(false);
        };
        let mut joined = false;
        for (c, selector) in live {
            if !selector.contains(&d) || self.store.get_member(&c.id, device).await?.is_some() {
                continue;
            }
            let m = Member {
                device_id: device.to_owned(),
                wave: c.current_wave,
                position: (1 << 62) + self.now_ms().max(0) as u64,
                status: member::WAITING.to_owned(),
                task_id: None,
                reason: Some("joined while the campaign ran".into()),
                retry_at_ms: None,
            };
            if self.store.add_member(&c.id, &m).await? {
                tracing::info!(campaign = %c.id, device, "late joiner");
                if let Err(e) = self.drive(&c.id).await {
                    tracing::warn!(campaign = %c.id, error = %e, "campaign step failed");
                }
                joined = true;
            }
        }
        Ok(joined)
    }
}
