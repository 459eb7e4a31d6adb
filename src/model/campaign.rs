//! A campaign: one firmware rolled out to a target (a group, a filter or a list of devices) in
//! waves, at a rate, stopping itself when too many devices fail. This file holds the record,
//! its lifecycle and the pure decision each driver pass makes from the counts; the stores keep
//! members and counts, the fleet module drives.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a campaign updates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Target {
    /// A stored group, resolved when the campaign starts (and for late joiners, as it is then).
    Group(String),
    /// An inline filter (see `model::filter`).
    Filter(String),
    /// These devices.
    Devices(Vec<String>),
}

/// How many devices a wave takes, of the whole target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum WaveSize {
    Percent(f64),
    Count(u64),
    /// Every device the earlier waves did not take (only last).
    Rest,
}

/// One step of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Wave {
    pub size: WaveSize,
    /// Share of the wave's devices (0 to 1) that must have succeeded (or already run the
    /// version) before the next wave starts.
    pub success_share: f64,
    /// Pause for a person once the wave has reached its share.
    pub pause: bool,
}

/// Abort when at least `min_finished` devices have finished and the failed share of them
/// reaches `share`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorThreshold {
    pub share: f64,
    pub min_finished: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Draft,
    Approved,
    Running,
    Paused,
    Finished,
    Stopped,
    Aborted,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Draft => "draft",
            State::Approved => "approved",
            State::Running => "running",
            State::Paused => "paused",
            State::Finished => "finished",
            State::Stopped => "stopped",
            State::Aborted => "aborted",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        [
            State::Draft,
            State::Approved,
            State::Running,
            State::Paused,
            State::Finished,
            State::Stopped,
            State::Aborted,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    /// Running or paused: it has members and tasks the driver follows.
    pub fn is_live(self) -> bool {
        matches!(self, State::Running | State::Paused)
    }
}

/// What becomes of released tasks that have not started when a person stops the campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PendingTasks {
    Cancel,
    Finish,
}

/// A member's place in a campaign: waiting to be released, skipped (busy; tried again at
/// `retry_at_ms`), up to date without a task, or the status of its task.
pub mod member {
    pub const WAITING: &str = "waiting";
    pub const SKIPPED: &str = "skipped";
    pub const UP_TO_DATE: &str = "up-to-date";
    /// Task statuses that count as running (released, not finished).
    pub const ACTIVE: [&str; 5] = [
        "pending",
        "delivering",
        "downloading",
        "downloaded",
        "updating",
    ];
    pub const SUCCEEDED: &str = "succeeded";
    pub const FAILED: &str = "failed";
    pub const CANCELLED: &str = "cancelled";
}

/// One device of a campaign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    pub device_id: String,
    pub wave: u32,
    /// Release order within the wave.
    pub position: u64,
    pub status: String,
    pub task_id: Option<String>,
    /// Why it was skipped, or why its task failed.
    pub reason: Option<String>,
    pub retry_at_ms: Option<i64>,
}

impl Member {
    /// The member as released to `task`: the task's status and reason, the task followed.
    pub fn released_to(&self, task: &crate::model::task::FotaTask) -> Member {
        Member {
            status: task.status.as_str().to_owned(),
            task_id: Some(task.id.clone()),
            reason: task.reason.clone(),
            retry_at_ms: None,
            ..self.clone()
        }
    }

    /// The member moved to `task`'s status (and its failure reason) by a change of the task,
    /// while it still follows this task (a retried member follows a newer one); `None` when
    /// nothing changes.
    pub fn following(&self, task: &crate::model::task::FotaTask) -> Option<Member> {
        if self.task_id.as_deref() != Some(task.id.as_str()) {
            return None;
        }
        let new = Member {
            status: task.status.as_str().to_owned(),
            reason: task.reason.clone(),
            ..self.clone()
        };
        (new != *self).then_some(new)
    }
}

/// Members per wave and status, and failed members per reason, kept by the stores in the
/// same step as each change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub waves: Vec<BTreeMap<String, u64>>,
    pub reasons: BTreeMap<String, u64>,
}

impl Counts {
    pub fn add(&mut self, wave: usize, status: &str, n: i64) {
        if self.waves.len() <= wave {
            self.waves.resize(wave + 1, BTreeMap::new());
        }
        let slot = self.waves[wave].entry(status.to_owned()).or_default();
        *slot = (*slot as i64 + n).max(0) as u64;
        if *slot == 0 {
            self.waves[wave].remove(status);
        }
    }

    pub fn wave(&self, wave: usize, status: &str) -> u64 {
        self.waves
            .get(wave)
            .and_then(|w| w.get(status))
            .copied()
            .unwrap_or(0)
    }

    fn sum(&self, wave: Option<usize>, statuses: &[&str]) -> u64 {
        let waves: Vec<usize> = match wave {
            Some(w) => vec![w],
            None => (0..self.waves.len()).collect(),
        };
        waves
            .into_iter()
            .flat_map(|w| statuses.iter().map(move |s| (w, *s)))
            .map(|(w, s)| self.wave(w, s))
            .sum()
    }

    pub fn total(&self, wave: Option<usize>) -> u64 {
        match wave {
            Some(w) => self.waves.get(w).map_or(0, |m| m.values().sum()),
            None => self.waves.iter().flat_map(|m| m.values()).sum(),
        }
    }

    pub fn succeeded(&self, wave: Option<usize>) -> u64 {
        self.sum(wave, &[member::SUCCEEDED, member::UP_TO_DATE])
    }

    pub fn failed(&self, wave: Option<usize>) -> u64 {
        self.sum(wave, &[member::FAILED])
    }

    pub fn unreleased(&self, wave: Option<usize>) -> u64 {
        self.sum(wave, &[member::WAITING, member::SKIPPED])
    }

    pub fn active(&self, wave: Option<usize>) -> u64 {
        self.sum(wave, &member::ACTIVE)
    }

    /// Totals over every wave.
    pub fn by_status(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for w in &self.waves {
            for (k, v) in w {
                *out.entry(k.clone()).or_default() += v;
            }
        }
        out
    }
}

/// The figures behind the last threshold decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub at_ms: i64,
    pub finished: u64,
    pub failed: u64,
    pub failed_share: f64,
    pub threshold: f64,
    pub min_finished: u64,
    pub aborted: bool,
}

/// One step of the campaign's life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub at_ms: i64,
    pub state: State,
    pub reason: Option<String>,
    /// The token that made the change, or `fwrepo` for the driver's own decisions.
    pub actor: String,
}

/// A campaign record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Campaign {
    pub id: String,
    pub name: Option<String>,
    pub firmware: String,
    pub target: Target,
    /// The task options as given (the schedule request's fields), parsed again for each task.
    pub options: serde_json::Map<String, serde_json::Value>,
    pub waves: Vec<Wave>,
    pub error_threshold: Option<ErrorThreshold>,
    /// Devices released per minute at most.
    pub rate: Option<u32>,
    pub start_at_ms: Option<i64>,
    pub end_at_ms: Option<i64>,
    pub require_approval: bool,
    pub include_late_joiners: bool,
    pub state: State,
    pub reason: Option<String>,
    pub created_by: String,
    pub approved_by: Option<String>,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub ended_ms: Option<i64>,
    /// Devices each wave took when the campaign started.
    #[serde(default)]
    pub wave_sizes: Vec<u64>,
    /// Waves up to this one may release devices.
    #[serde(default)]
    pub current_wave: u32,
    /// The rate's budget is spent up to this moment (a token bucket without its counter).
    #[serde(default)]
    pub rate_at_ms: i64,
    /// How a stop treated released tasks that had not started.
    #[serde(default)]
    pub pending_tasks: Option<PendingTasks>,
    #[serde(default)]
    pub decision: Option<Decision>,
    #[serde(default)]
    pub history: Vec<Step>,
    #[serde(default)]
    pub revision: u64,
}

/// Why a lifecycle action is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LifecycleError {
    #[error("campaign is {state}; {action} needs it {needs}")]
    WrongState {
        action: &'static str,
        state: &'static str,
        needs: &'static str,
    },
    #[error("the campaign needs approval first (requireApproval)")]
    NeedsApproval,
    #[error("{0:?} created this campaign and cannot approve it; another admin must")]
    SelfApproval(String),
}

/// What a driver pass decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// A state change to store, with its reason.
    pub to: Option<(State, String)>,
    /// Waves up to this one may release.
    pub current_wave: u32,
    pub decision: Option<Decision>,
    /// Devices the rate allows now (when running and started).
    pub release: u64,
}

/// Most devices released in one pass without a rate.
pub const RELEASE_BATCH: u64 = 2000;

impl Campaign {
    fn step(&mut self, state: State, reason: Option<String>, actor: &str, now: i64) {
        self.state = state;
        self.reason = reason.clone();
        if matches!(state, State::Finished | State::Stopped | State::Aborted) {
            self.ended_ms = Some(now);
        }
        self.history.push(Step {
            at_ms: now,
            state,
            reason,
            actor: actor.to_owned(),
        });
    }

    fn needs(
        &self,
        action: &'static str,
        ok: &[State],
        needs: &'static str,
    ) -> Result<(), LifecycleError> {
        if ok.contains(&self.state) {
            Ok(())
        } else {
            Err(LifecycleError::WrongState {
                action,
                state: self.state.as_str(),
                needs,
            })
        }
    }

    pub fn approve(&mut self, actor: &str, now: i64) -> Result<(), LifecycleError> {
        self.needs("approve", &[State::Draft], "draft")?;
        if actor == self.created_by {
            return Err(LifecycleError::SelfApproval(actor.to_owned()));
        }
        self.approved_by = Some(actor.to_owned());
        self.step(State::Approved, None, actor, now);
        Ok(())
    }

    /// Checks a start is allowed; the fleet then resolves members and calls [`Self::started`].
    pub fn can_start(&self) -> Result<(), LifecycleError> {
        self.needs(
            "start",
            &[State::Draft, State::Approved],
            "draft or approved",
        )?;
        if self.require_approval && self.state != State::Approved {
            return Err(LifecycleError::NeedsApproval);
        }
        Ok(())
    }

    pub fn started(&mut self, wave_sizes: Vec<u64>, actor: &str, now: i64) {
        self.wave_sizes = wave_sizes;
        self.started_ms = Some(now);
        self.rate_at_ms = self.start_at_ms.unwrap_or(now).max(now);
        self.step(State::Running, None, actor, now);
    }

    pub fn pause(&mut self, actor: &str, now: i64) -> Result<(), LifecycleError> {
        self.needs("pause", &[State::Running], "running")?;
        self.step(State::Paused, Some("paused by a person".into()), actor, now);
        Ok(())
    }

    /// Resumes; a pause because a wave fell short of its success share is overridden (the
    /// next wave starts).
    pub fn resume(&mut self, actor: &str, now: i64) -> Result<(), LifecycleError> {
        self.needs("resume", &[State::Paused], "paused")?;
        if self
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("below the share"))
        {
            self.current_wave = (self.current_wave + 1).min(self.last_wave());
        }
        // The rate does not bank the time spent paused.
        self.rate_at_ms = self.rate_at_ms.max(now);
        self.step(State::Running, None, actor, now);
        Ok(())
    }

    pub fn stop(
        &mut self,
        pending: PendingTasks,
        actor: &str,
        now: i64,
    ) -> Result<(), LifecycleError> {
        self.needs(
            "stop",
            &[State::Draft, State::Approved, State::Running, State::Paused],
            "not yet ended",
        )?;
        self.pending_tasks = Some(pending);
        self.step(
            State::Stopped,
            Some("stopped by a person".into()),
            actor,
            now,
        );
        Ok(())
    }

    /// Failed devices go back to waiting; an ended rollout runs again for them.
    pub fn retry_failed(&mut self, actor: &str, now: i64) -> Result<(), LifecycleError> {
        self.needs(
            "retry-failed",
            &[State::Running, State::Paused, State::Finished],
            "running, paused or finished",
        )?;
        if self.state == State::Finished {
            self.ended_ms = None;
            self.rate_at_ms = self.rate_at_ms.max(now);
            self.step(
                State::Running,
                Some("failed devices retried".into()),
                actor,
                now,
            );
        }
        Ok(())
    }

    pub fn last_wave(&self) -> u32 {
        self.waves.len().saturating_sub(1) as u32
    }

    /// Milliseconds between two releases under the rate.
    fn interval_ms(&self) -> Option<i64> {
        self.rate.map(|r| (60_000 / i64::from(r.max(1))).max(1))
    }

    /// Devices the rate allows at `now`.
    pub fn budget(&self, now: i64) -> u64 {
        match self.interval_ms() {
            None => RELEASE_BATCH,
            Some(iv) => {
                let n = ((now - self.rate_at_ms) / iv).max(0) as u64;
                n.min(u64::from(self.rate.unwrap_or(1)).max(1))
            }
        }
    }

    /// Spends the budget of `n` releases.
    pub fn spend(&mut self, n: u64, now: i64) {
        if let Some(iv) = self.interval_ms() {
            let cap = i64::from(self.rate.unwrap_or(1).max(1));
            let floor = now - cap * iv;
            self.rate_at_ms = self.rate_at_ms.max(floor) + n as i64 * iv;
        }
    }

    /// What to do now, from the counts. Pure: the caller stores what changes.
    pub fn plan(&self, counts: &Counts, now: i64) -> Plan {
        let mut plan = Plan {
            to: None,
            current_wave: self.current_wave,
            decision: None,
            release: 0,
        };
        if !self.state.is_live() {
            return plan;
        }
        if let Some(t) = &self.error_threshold {
            let failed = counts.failed(None);
            let finished = failed + counts.succeeded(None);
            let share = if finished == 0 {
                0.0
            } else {
                failed as f64 / finished as f64
            };
            let aborted = finished >= t.min_finished && finished > 0 && share >= t.share;
            plan.decision = Some(Decision {
                at_ms: now,
                finished,
                failed,
                failed_share: share,
                threshold: t.share,
                min_finished: t.min_finished,
                aborted,
            });
            if aborted {
                plan.to = Some((
                    State::Aborted,
                    format!(
                        "error threshold reached: {failed} of {finished} finished devices failed ({:.1}% ≥ {:.1}%, minimum {} finished)",
                        share * 100.0,
                        t.share * 100.0,
                        t.min_finished
                    ),
                ));
                return plan;
            }
        }
        if self.end_at_ms.is_some_and(|end| now >= end) {
            plan.to = Some((State::Finished, "the campaign's endAt passed".into()));
            return plan;
        }
        // Advance past every wave that is fully released and reached its share.
        let mut w = self.current_wave;
        while w < self.last_wave() {
            let wi = w as usize;
            let size = counts.total(Some(wi));
            if counts.unreleased(Some(wi)) > 0 {
                break;
            }
            let need = (self.waves[wi].success_share * size as f64).ceil() as u64;
            let ok = counts.succeeded(Some(wi));
            if ok < need {
                if counts.active(Some(wi)) == 0 && self.state == State::Running {
                    plan.to = Some((
                        State::Paused,
                        format!(
                            "wave {} ended with {ok} of {size} devices updated, below the share of {need} needed; retry-failed or resume to go on",
                            wi + 1
                        ),
                    ));
                }
                break;
            }
            w += 1;
            if self.waves[wi].pause {
                plan.current_wave = w;
                if self.state == State::Running {
                    plan.to = Some((
                        State::Paused,
                        format!(
                            "wave {} done ({ok} of {size} updated); waiting for resume",
                            wi + 1
                        ),
                    ));
                }
                return plan;
            }
        }
        plan.current_wave = w;
        if counts.unreleased(None) == 0 && counts.active(None) == 0 && plan.to.is_none() {
            plan.to = Some((State::Finished, "every device has finished".into()));
            return plan;
        }
        let started = self.start_at_ms.is_none_or(|s| now >= s);
        if self.state == State::Running && plan.to.is_none() && started {
            plan.release = self.budget(now);
        }
        plan
    }

    /// Applies a plan's state change (the driver's, not a person's).
    pub fn apply(&mut self, plan: &Plan, now: i64) {
        self.current_wave = plan.current_wave;
        if plan.decision.is_some() {
            self.decision = plan.decision.clone();
        }
        if let Some((state, reason)) = &plan.to {
            self.step(*state, Some(reason.clone()), "fwrepo", now);
        }
    }
}

/// Splits `n` devices into the waves: each its percent (rounded up, at least one while devices
/// remain) or count, the last taking whatever the others did not.
pub fn wave_sizes(waves: &[Wave], n: u64) -> Vec<u64> {
    let mut left = n;
    let mut out = Vec::with_capacity(waves.len());
    for (i, w) in waves.iter().enumerate() {
        let take = if i + 1 == waves.len() {
            left
        } else {
            match w.size {
                WaveSize::Percent(p) => ((p / 100.0 * n as f64).ceil() as u64).max(1),
                WaveSize::Count(c) => c,
                WaveSize::Rest => left,
            }
            .min(left)
        };
        out.push(take);
        left -= take;
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn campaign(waves: Vec<Wave>) -> Campaign {
        Campaign {
            id: "c".into(),
            name: None,
            firmware: "fw".into(),
            target: Target::Devices(vec![]),
            options: Default::default(),
            waves,
            error_threshold: None,
            rate: None,
            start_at_ms: None,
            end_at_ms: None,
            require_approval: false,
            include_late_joiners: false,
            state: State::Draft,
            reason: None,
            created_by: "alice".into(),
            approved_by: None,
            created_ms: 0,
            started_ms: None,
            ended_ms: None,
            wave_sizes: vec![],
            current_wave: 0,
            rate_at_ms: 0,
            pending_tasks: None,
            decision: None,
            history: vec![],
            revision: 0,
        }
    }

    fn wave(size: WaveSize, share: f64, pause: bool) -> Wave {
        Wave {
            size,
            success_share: share,
            pause,
        }
    }

    #[test]
    fn waves_of_1_10_and_the_rest() {
        let w = vec![
            wave(WaveSize::Percent(1.0), 1.0, false),
            wave(WaveSize::Percent(10.0), 1.0, false),
            wave(WaveSize::Rest, 1.0, false),
        ];
        assert_eq!(wave_sizes(&w, 1000), [10, 100, 890]);
        assert_eq!(wave_sizes(&w, 3), [1, 1, 1]);
        assert_eq!(wave_sizes(&w, 1), [1, 0, 0]);
        assert_eq!(wave_sizes(&w, 0), [0, 0, 0]);
    }

    #[test]
    fn approval_is_for_someone_else_and_before_start() {
        let mut c = campaign(vec![wave(WaveSize::Rest, 1.0, false)]);
        c.require_approval = true;
        assert_eq!(c.can_start(), Err(LifecycleError::NeedsApproval));
        assert!(matches!(
            c.approve("alice", 1),
            Err(LifecycleError::SelfApproval(_))
        ));
        c.approve("bob", 1).unwrap();
        c.can_start().unwrap();
        c.started(vec![5], "alice", 2);
        assert!(c.pause("alice", 3).is_ok());
        assert!(c.pause("alice", 3).is_err());
        c.resume("alice", 4).unwrap();
        c.stop(PendingTasks::Cancel, "alice", 5).unwrap();
        assert!(c.resume("alice", 6).is_err());
        assert_eq!(c.history.len(), 5);
    }

    #[test]
    fn a_wave_advances_on_its_share_and_pauses_when_asked() {
        let mut c = campaign(vec![
            wave(WaveSize::Count(2), 0.5, true),
            wave(WaveSize::Rest, 1.0, false),
        ]);
        c.started(vec![2, 3], "alice", 0);
        let mut counts = Counts::default();
        counts.add(0, "pending", 2);
        counts.add(1, "waiting", 3);
        let p = c.plan(&counts, 10);
        assert_eq!((p.current_wave, p.to.clone()), (0, None));
        assert_eq!(p.release, RELEASE_BATCH);
        counts.add(0, "pending", -1);
        counts.add(0, "succeeded", 1);
        let p = c.plan(&counts, 10);
        assert_eq!(p.current_wave, 1);
        assert_eq!(p.to.as_ref().unwrap().0, State::Paused);
        c.apply(&p, 10);
        assert_eq!(c.plan(&counts, 11).release, 0, "paused releases nothing");
        c.resume("alice", 12).unwrap();
        let p = c.plan(&counts, 13);
        assert_eq!((p.current_wave, p.to.is_none()), (1, true));
    }

    #[test]
    fn the_error_threshold_waits_for_its_minimum_then_aborts() {
        let mut c = campaign(vec![wave(WaveSize::Rest, 1.0, false)]);
        c.error_threshold = Some(ErrorThreshold {
            share: 0.2,
            min_finished: 10,
        });
        c.started(vec![100], "alice", 0);
        let mut counts = Counts::default();
        counts.add(0, "failed", 5);
        counts.add(0, "waiting", 95);
        assert!(c.plan(&counts, 1).to.is_none(), "5 finished < 10");
        counts.add(0, "waiting", -15);
        counts.add(0, "succeeded", 15);
        let p = c.plan(&counts, 1);
        let (state, reason) = p.to.clone().unwrap();
        assert_eq!(state, State::Aborted);
        assert!(reason.contains("5 of 20"), "{reason}");
        assert_eq!(p.release, 0);
        let d = p.decision.unwrap();
        assert_eq!((d.finished, d.failed, d.aborted), (20, 5, true));
        // Below the share it runs on.
        counts.add(0, "failed", -2);
        counts.add(0, "succeeded", 2);
        assert!(c.plan(&counts, 1).to.is_none(), "3 of 20 = 15% < 20%");
    }

    #[test]
    fn the_rate_releases_per_minute_without_banking_idle_time() {
        let mut c = campaign(vec![wave(WaveSize::Rest, 1.0, false)]);
        c.rate = Some(60);
        c.started(vec![1000], "alice", 0);
        assert_eq!(c.budget(0), 0);
        assert_eq!(c.budget(1000), 1);
        assert_eq!(c.budget(10_500), 10);
        c.spend(10, 10_500);
        assert_eq!(c.budget(10_500), 0);
        assert_eq!(c.budget(3_600_000), 60, "at most a minute's worth at once");
    }
}
