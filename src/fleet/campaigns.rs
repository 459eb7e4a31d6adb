//! Operators' side of campaigns: the request (parsed field by field), the lifecycle actions,
//! and the status document built from the counts (the same work for 100 or 100,000 devices).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

use super::{invalid, Fleet, FleetError};
use crate::fota::request::ScheduleRequest;
use crate::fota::view::rfc3339;
use crate::model::campaign::{
    member, wave_sizes, Campaign, ErrorThreshold, Member, PendingTasks, State, Target, Wave,
    WaveSize,
};
use crate::model::filter::Filter;
use crate::model::group::{Members, Selector};
use crate::model::roster::{self, position};

/// Most waves a campaign may have.
const MAX_WAVES: usize = 100;
/// The key of campaign changes in announcements to other instances.
const ANNOUNCED: &str = "campaign";

/// A campaign transition as published on `GET /v1/events`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CampaignEvent {
    pub campaign_id: String,
    pub state: String,
    pub reason: Option<String>,
    pub current_wave: u32,
    pub actor: String,
    pub at: String,
}

/// A parsed `POST /v1/campaigns` body.
pub struct CampaignRequest {
    pub campaign: Campaign,
    pub task: ScheduleRequest,
}

/// How a stop treats released tasks that have not started (`{"pending": "cancel"|"finish"}`).
pub struct StopRequest(pub PendingTasks);

fn share(field: &'static str, v: &Value) -> Result<f64, FleetError> {
    v.as_f64()
        .filter(|f| (0.0..=1.0).contains(f))
        .ok_or_else(|| invalid(field, "must be a number from 0 to 1"))
}

fn time(field: &'static str, v: Option<&Value>) -> Result<Option<i64>, FleetError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let t: jiff::Timestamp = s
                .parse()
                .map_err(|e| invalid(field, format!("not an RFC 3339 time: {e}")))?;
            Ok(Some(t.as_millisecond()))
        }
        Some(_) => Err(invalid(field, "must be an RFC 3339 time")),
    }
}

fn wave(i: usize, v: &Value, last: bool) -> Result<Wave, FleetError> {
    let Value::Object(m) = v else {
        return Err(invalid(
            "waves",
            format!("wave {} must be an object", i + 1),
        ));
    };
    if let Some(k) = m
        .keys()
        .find(|k| !["percent", "count", "successShare", "pause"].contains(&k.as_str()))
    {
        return Err(invalid(
            "waves",
            format!("wave {}: unknown field {k:?}", i + 1),
        ));
    }
    let size = match (m.get("percent"), m.get("count")) {
        (Some(p), None) => WaveSize::Percent(
            p.as_f64()
                .filter(|p| *p > 0.0 && *p <= 100.0)
                .ok_or_else(|| invalid("waves", format!("wave {}: percent is 0 to 100", i + 1)))?,
        ),
        (None, Some(c)) => WaveSize::Count(c.as_u64().filter(|c| *c > 0).ok_or_else(|| {
            invalid(
                "waves",
                format!("wave {}: count is a positive integer", i + 1),
            )
        })?),
        (None, None) if last => WaveSize::Rest,
        (None, None) => {
            return Err(invalid(
                "waves",
                format!(
                    "wave {}: give percent or count (only the last wave may take the rest)",
                    i + 1
                ),
            ))
        }
        _ => {
            return Err(invalid(
                "waves",
                format!("wave {}: percent or count, not both", i + 1),
            ))
        }
    };
    Ok(Wave {
        size,
        success_share: m
            .get("successShare")
            .map(|v| share("waves", v))
            .transpose()?
            .unwrap_or(1.0),
        pause: match m.get("pause") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(invalid(
                    "waves",
                    format!("wave {}: pause is true or false", i + 1),
                ))
            }
        },
    })
}

const FIELDS: [&str; 12] = [
    "name",
    "firmware",
    "target",
    "options",
    "waves",
    "errorThreshold",
    "rate",
    "startAt",
    "endAt",
    "requireApproval",
    "includeLateJoiners",
    "description",
];

impl CampaignRequest {
    pub fn parse(body: &Value, created_by: &str, now: i64) -> Result<CampaignRequest, FleetError> {
        let Value::Object(m) = body else {
            return Err(invalid("body", "must be a JSON object"));
        };
        if let Some(k) = m.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(invalid("body", format!("unknown field {k:?}")));
        }
        let string = |f: &'static str| match m.get(f) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(invalid(f, "must be a string")),
        };
        let flag = |f: &'static str| match m.get(f) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(invalid(f, "must be true or false")),
        };
        let name = string("name")?;
        if let Some(n) = &name {
            crate::firmware::check_text("name", n).map_err(|e| invalid("name", e.to_string()))?;
        }
        let firmware = string("firmware")?.ok_or_else(|| invalid("firmware", "is required"))?;
        // The task options are the schedule request's fields, with the firmware given here.
        let mut options = match m.get("options") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(o)) => o.clone(),
            Some(_) => return Err(invalid("options", "must be an object")),
        };
        for k in ["name", "firmwareUrl", "issueDeviceToken"] {
            if options.contains_key(k) {
                return Err(invalid(
                    "options",
                    format!("{k} is not a campaign task option (the campaign's firmware must be stored)"),
                ));
            }
        }
        options.insert("name".into(), firmware.clone().into());
        let task = ScheduleRequest::parse(&Value::Object(options.clone()))
            .map_err(|e| invalid("options", e.to_string()))?;
        options.remove("name");
        let target =
            match m.get("target") {
                Some(Value::Object(t)) if t.len() == 1 => match t.iter().next() {
                    Some((k, Value::String(g))) if k == "group" => Target::Group(g.clone()),
                    Some((k, Value::String(f))) if k == "filter" => {
                        Filter::parse(f)?;
                        Target::Filter(f.clone())
                    }
                    Some((k, v)) if k == "devices" => {
                        let ids: Vec<String> = serde_json::from_value(v.clone())
                            .map_err(|_| invalid("target", "devices must be a list of ids"))?;
                        if ids.is_empty() {
                            return Err(invalid("target", "devices must not be empty"));
                        }
                        for id in &ids {
                            crate::fota::check_device(id)?;
                        }
                        Target::Devices(ids)
                    }
                    _ => return Err(invalid("target", "one of group, filter or devices")),
                },
                _ => return Err(invalid(
                    "target",
                    "is required: {\"group\": name}, {\"filter\": text} or {\"devices\": [ids]}",
                )),
            };
        let waves = match m.get("waves") {
            None | Some(Value::Null) => vec![wave(0, &json!({}), true)?],
            Some(Value::Array(ws)) if !ws.is_empty() && ws.len() <= MAX_WAVES => ws
                .iter()
                .enumerate()
                .map(|(i, w)| wave(i, w, i + 1 == ws.len()))
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(invalid(
                    "waves",
                    format!("a list of 1 to {MAX_WAVES} waves"),
                ))
            }
        };
        let error_threshold = match m.get("errorThreshold") {
            None | Some(Value::Null) => None,
            Some(Value::Object(t)) => {
                if let Some(k) = t.keys().find(|k| *k != "share" && *k != "minFinished") {
                    return Err(invalid("errorThreshold", format!("unknown field {k:?}")));
                }
                Some(ErrorThreshold {
                    share: share(
                        "errorThreshold",
                        t.get("share")
                            .ok_or_else(|| invalid("errorThreshold", "share is required"))?,
                    )?,
                    min_finished: match t.get("minFinished") {
                        None => 1,
                        Some(v) => v.as_u64().ok_or_else(|| {
                            invalid("errorThreshold", "minFinished is a non-negative integer")
                        })?,
                    },
                })
            }
            Some(_) => return Err(invalid("errorThreshold", "must be an object")),
        };
        let rate = match m.get("rate") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .filter(|r| (1..=1_000_000).contains(r))
                    .ok_or_else(|| invalid("rate", "devices per minute, 1 to 1000000"))?
                    as u32,
            ),
        };
        let (start_at_ms, end_at_ms) = (
            time("startAt", m.get("startAt"))?,
            time("endAt", m.get("endAt"))?,
        );
        if let (Some(s), Some(e)) = (start_at_ms, end_at_ms) {
            if e <= s {
                return Err(invalid("endAt", "must be after startAt"));
            }
        }
        let require_approval = flag("requireApproval")?;
        let include_late_joiners = flag("includeLateJoiners")?;
        if let Some(d) = string("description")? {
            crate::firmware::check_text("description", &d)
                .map_err(|e| invalid("description", e.to_string()))?;
            options.insert("description".into(), d.into());
        }
        let mut id = [0u8; 16];
        id[..6].copy_from_slice(&now.max(0).to_be_bytes()[2..]);
        getrandom::fill(&mut id[6..]).map_err(|e| invalid("id", e.to_string()))?;
        Ok(CampaignRequest {
            task,
            campaign: Campaign {
                id: hex::encode(id),
                name,
                firmware,
                target,
                options,
                waves,
                error_threshold,
                rate,
                start_at_ms,
                end_at_ms,
                require_approval,
                include_late_joiners,
                state: State::Draft,
                reason: None,
                created_by: created_by.to_owned(),
                approved_by: None,
                created_ms: now,
                started_ms: None,
                ended_ms: None,
                wave_sizes: Vec::new(),
                current_wave: 0,
                rate_at_ms: 0,
                pending_tasks: None,
                decision: None,
                history: vec![crate::model::campaign::Step {
                    at_ms: now,
                    state: State::Draft,
                    reason: None,
                    actor: created_by.to_owned(),
                }],
                revision: 0,
            },
        })
    }
}

impl StopRequest {
    pub fn parse(body: &Value) -> Result<StopRequest, FleetError> {
        match body.get("pending") {
            None | Some(Value::Null) => Ok(StopRequest(PendingTasks::Cancel)),
            Some(Value::String(s)) if s == "cancel" => Ok(StopRequest(PendingTasks::Cancel)),
            Some(Value::String(s)) if s == "finish" => Ok(StopRequest(PendingTasks::Finish)),
            _ => Err(invalid("pending", "\"cancel\" or \"finish\"")),
        }
    }
}

impl Fleet {
    /// The event of a campaign's change to `c`.
    pub(super) fn event(&self, c: &Campaign) -> CampaignEvent {
        let step = c.history.last();
        CampaignEvent {
            campaign_id: c.id.clone(),
            state: c.state.as_str().to_owned(),
            reason: c.reason.clone(),
            current_wave: c.current_wave,
            actor: step.map_or_else(|| "fwrepo".into(), |s| s.actor.clone()),
            at: rfc3339(self.now_ms()),
        }
    }

    /// The announcement of `event` to the other instances sharing the store, if any; the
    /// store sends it with the change.
    pub(super) fn announcement(&self, event: &CampaignEvent) -> Option<String> {
        self.engine.announce(ANNOUNCED, event)
    }

    /// Tells this instance's subscribers of a stored change.
    pub(super) fn publish(&self, event: CampaignEvent) {
        tracing::info!(campaign = %event.campaign_id, state = %event.state, reason = event.reason.as_deref().unwrap_or(""), "campaign");
        let _ = self.events.send(Arc::new(event));
    }

    /// Passes on the campaign changes other instances announce, and looks at the campaign
    /// again (it may have been resumed, paused or stopped there).
    pub(super) fn follow_others(self: &Arc<Self>) {
        let mut others = self.engine.others_announced();
        let this = Arc::clone(self);
        self.work.spawn(async move {
            loop {
                let announced = tokio::select! {
                    _ = this.cancel.cancelled() => return,
                    a = others.recv() => a,
                };
                match announced {
                    Ok(a) => {
                        let Some(e) = a.get(ANNOUNCED) else { continue };
                        match serde_json::from_value::<CampaignEvent>(e.clone()) {
                            Ok(e) => {
                                let _ = this.events.send(Arc::new(e));
                                this.wake.notify_one();
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "unreadable campaign announcement")
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => this.wake.notify_one(),
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    /// The compiled target of a campaign (a group as it is now).
    pub(super) async fn selector(&self, c: &Campaign) -> Result<Selector, FleetError> {
        Ok(match &c.target {
            Target::Devices(ids) => Selector::of(&Members::Devices(ids.clone()))?,
            Target::Filter(f) => Selector::of(&Members::Filter(f.clone()))?,
            Target::Group(g) => Selector::of(&self.group(g).await?.members)?,
        })
    }

    pub async fn create_campaign(&self, req: CampaignRequest) -> Result<Campaign, FleetError> {
        let c = req.campaign;
        self.repo
            .resolve(&req.task.name)
            .await
            .map_err(crate::fota::FotaError::from)?;
        self.engine.check_request(&req.task).await?;
        if let Target::Group(g) = &c.target {
            self.group(g).await?;
        }
        let event = self.event(&c);
        self.store
            .create_campaign(&c, self.announcement(&event).as_deref())
            .await?;
        self.publish(event);
        Ok(c)
    }

    pub async fn campaign(&self, id: &str) -> Result<Campaign, FleetError> {
        self.store
            .get_campaign(id)
            .await?
            .ok_or_else(|| FleetError::NoCampaign(id.to_owned()))
    }

    pub async fn campaigns(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Campaign>, Option<String>), FleetError> {
        let page = self.store.list_campaigns(after, limit).await?;
        let next = (page.len() == limit)
            .then(|| page.last().map(|c| c.id.clone()))
            .flatten();
        Ok((page, next))
    }

    /// Applies a person's action to the stored campaign, from the revision it was read at.
    async fn act(
        &self,
        id: &str,
        action: impl Fn(&mut Campaign, i64) -> Result<(), FleetError>,
    ) -> Result<Campaign, FleetError> {
        for _ in 0..16 {
            let before = self.campaign(id).await?;
            let mut c = before.clone();
            action(&mut c, self.now_ms())?;
            c.revision = before.revision + 1;
            let event = self.event(&c);
            let announce = self.announcement(&event);
            if self
                .store
                .put_campaign(&c, before.revision, announce.as_deref())
                .await?
            {
                self.publish(event);
                self.wake.notify_one();
                return Ok(c);
            }
        }
        Err(FleetError::Stale(id.to_owned()))
    }

    pub async fn approve(&self, id: &str, actor: &str) -> Result<Campaign, FleetError> {
        self.act(id, |c, now| Ok(c.approve(actor, now)?)).await
    }

    /// Resolves the target and stores the members, all waiting, as the campaign's roster,
    /// with the campaign now running; the driver writes member records from the roster ahead
    /// of its releases, and tasks come as waves and the rate release them.
    pub async fn start(&self, id: &str, actor: &str) -> Result<Campaign, FleetError> {
        let began = std::time::Instant::now();
        let before = self.campaign(id).await?;
        before.can_start()?;
        let selector = self.selector(&before).await?;
        let devices = self.resolve(&selector).await?;
        let resolved = began.elapsed();
        let mut devices: Vec<(u64, String)> =
            devices.into_iter().map(|d| (position(id, &d), d)).collect();
        devices.sort_unstable();
        let sizes = wave_sizes(&before.waves, devices.len() as u64);
        let mut members = Vec::with_capacity(devices.len());
        let mut wave = 0usize;
        let mut left = sizes.first().copied().unwrap_or(0);
        for (position, d) in devices {
            while left == 0 && wave + 1 < sizes.len() {
                wave += 1;
                left = sizes[wave];
            }
            left = left.saturating_sub(1);
            members.push(roster::waiting(&d, wave as u32, position));
        }
        let mut c = before.clone();
        c.started(sizes, actor, self.now_ms());
        c.revision = before.revision + 1;
        let planned = began.elapsed();
        let event = self.event(&c);
        let announce = self.announcement(&event);
        if !self
            .store
            .start_campaign(&c, before.revision, &members, announce.as_deref())
            .await?
        {
            return Err(FleetError::Stale(id.to_owned()));
        }
        let stored = began.elapsed();
        // A small campaign's members are all written (and listed) when the start answers; a
        // large one's first chunks, and the driver writes the rest.
        if let Err(e) = self.materialize(id).await {
            tracing::warn!(campaign = id, error = %e, "campaign members not written");
        }
        tracing::info!(
            campaign = id,
            devices = members.len(),
            resolve_ms = resolved.as_millis() as u64,
            plan_ms = (planned - resolved).as_millis() as u64,
            store_ms = (stored - planned).as_millis() as u64,
            write_ms = (began.elapsed() - stored).as_millis() as u64,
            "campaign members stored"
        );
        self.publish(event);
        self.wake.notify_one();
        Ok(c)
    }

    pub async fn pause(&self, id: &str, actor: &str) -> Result<Campaign, FleetError> {
        self.act(id, |c, now| Ok(c.pause(actor, now)?)).await
    }

    pub async fn resume(&self, id: &str, actor: &str) -> Result<Campaign, FleetError> {
        self.act(id, |c, now| Ok(c.resume(actor, now)?)).await
    }

    pub async fn stop(
        &self,
        id: &str,
        req: StopRequest,
        actor: &str,
    ) -> Result<Campaign, FleetError> {
        let c = self
            .act(id, |c, now| Ok(c.stop(req.0, actor, now)?))
            .await?;
        if req.0 == PendingTasks::Cancel {
            self.cancel_pending(id).await?;
        }
        Ok(c)
    }

    /// Failed members wait again, in their waves, for new tasks.
    pub async fn retry_failed(&self, id: &str, actor: &str) -> Result<(Campaign, u64), FleetError> {
        let c = self.campaign(id).await?;
        let mut check = c.clone();
        check.retry_failed(actor, self.now_ms())?;
        let mut retried = 0;
        loop {
            let failed = self
                .store
                .list_members(id, Some(member::FAILED), None, 1000)
                .await?;
            if failed.is_empty() {
                break;
            }
            for m in failed {
                let again = Member {
                    status: member::WAITING.to_owned(),
                    task_id: None,
                    reason: None,
                    retry_at_ms: None,
                    ..m
                };
                if self
                    .store
                    .move_member(id, &[member::FAILED], &again)
                    .await?
                {
                    retried += 1;
                }
            }
        }
        let c = self
            .act(id, |c, now| Ok(c.retry_failed(actor, now)?))
            .await?;
        Ok((c, retried))
    }

    /// The status document: state, counts per status and wave, failure reasons, times, and
    /// the figures behind the threshold decision (stored when it ended the campaign, else as
    /// they stand).
    pub async fn status(&self, id: &str) -> Result<Value, FleetError> {
        let c = self.campaign(id).await?;
        let counts = self.store.campaign_counts(id).await?;
        let decision = match &c.decision {
            Some(d) if !c.state.is_live() => Some(d.clone()),
            _ => c.plan(&counts, self.now_ms()).decision,
        };
        let waves: Vec<Value> = c
            .waves
            .iter()
            .enumerate()
            .map(|(i, w)| {
                json!({
                    "wave": i + 1,
                    "size": c.wave_sizes.get(i),
                    "successShare": w.success_share,
                    "pause": w.pause,
                    "counts": counts.waves.get(i).cloned().unwrap_or_default(),
                    "succeeded": counts.succeeded(Some(i)),
                    "failed": counts.failed(Some(i)),
                })
            })
            .collect();
        Ok(json!({
            "campaignId": c.id,
            "name": c.name,
            "firmware": c.firmware,
            "target": c.target,
            "state": c.state.as_str(),
            "reason": c.reason,
            "currentWave": c.current_wave + 1,
            "devices": counts.total(None),
            "counts": counts.by_status(),
            "waves": waves,
            "failureReasons": counts.reasons,
            "errorThreshold": c.error_threshold.as_ref().map(|t| json!({"share": t.share, "minFinished": t.min_finished})),
            "decision": decision.map(|d| json!({
                "at": rfc3339(d.at_ms),
                "finished": d.finished,
                "failed": d.failed,
                "failedShare": d.failed_share,
                "threshold": d.threshold,
                "minFinished": d.min_finished,
                "aborted": d.aborted,
            })),
            "rate": c.rate,
            "options": c.options,
            "requireApproval": c.require_approval,
            "includeLateJoiners": c.include_late_joiners,
            "createdBy": c.created_by,
            "approvedBy": c.approved_by,
            "createdAt": rfc3339(c.created_ms),
            "startAt": c.start_at_ms.map(rfc3339),
            "endAt": c.end_at_ms.map(rfc3339),
            "startedAt": c.started_ms.map(rfc3339),
            "endedAt": c.ended_ms.map(rfc3339),
            "history": c.history.iter().map(|s| json!({
                "at": rfc3339(s.at_ms),
                "state": s.state.as_str(),
                "reason": s.reason,
                "actor": s.actor,
            })).collect::<Vec<_>>(),
        }))
    }

    /// A page of members, of one status or all.
    pub async fn members(
        &self,
        id: &str,
        status: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Member>, Option<String>), FleetError> {
        self.campaign(id).await?;
        let page = self.store.list_members(id, status, after, limit).await?;
        let next = (page.len() == limit)
            .then(|| page.last().map(|m| m.device_id.clone()))
            .flatten();
        Ok((page, next))
    }
}
