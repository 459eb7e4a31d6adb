//! A FOTA task and its state machine: the LwM2M Firmware Update states and results a device
//! reports, mapped onto the task statuses a management server follows.

use serde::{Deserialize, Serialize};

use super::protocol::{Protocol, UpgradeStrategy};
use super::schedule::{Calendar, Schedule};

/// Transitions kept per task; older ones are dropped first (a device deferring forever).
const HISTORY_LIMIT: usize = 100;

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Waiting for its firmware, a window, a quota slot or the device; `reason` says which.
    Pending,
    /// The package URI has been handed to the device.
    Delivering,
    Downloading,
    Downloaded,
    Updating,
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 8] = [
        Status::Pending,
        Status::Delivering,
        Status::Downloading,
        Status::Downloaded,
        Status::Updating,
        Status::Succeeded,
        Status::Failed,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Delivering => "delivering",
            Status::Downloading => "downloading",
            Status::Downloaded => "downloaded",
            Status::Updating => "updating",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Cancelled)
    }

    /// Between delivering and updating: the device is working on it.
    pub fn is_started(self) -> bool {
        matches!(
            self,
            Status::Delivering | Status::Downloading | Status::Downloaded | Status::Updating
        )
    }
}

/// Why a pending task waits (the `reason` of a pending task).
pub mod waiting {
    /// The firmware is being imported from `firmwareUrl`.
    pub const IMPORT: &str = "import";
    /// Outside the task's schedule.
    pub const WINDOW: &str = "window";
    /// Every quota slot is taken.
    pub const QUOTA: &str = "quota";
    /// The device deferred the update (result 11).
    pub const DEFERRED: &str = "deferred";
    /// The download broke (result 4) and the task resumes at the next request.
    pub const RESUME: &str = "resume";
    /// Ready; the device has not asked for it yet.
    pub const DEVICE: &str = "device";
}

/// LwM2M /5/0/5 Update Result meanings, as reasons.
pub fn result_reason(result: u8) -> &'static str {
    match result {
        0 => "initial",
        1 => "success",
        2 => "not-enough-flash",
        3 => "out-of-ram",
        4 => "connection-lost",
        5 => "integrity-check-failure",
        6 => "unsupported-package-type",
        7 => "invalid-uri",
        8 => "update-failed",
        9 => "unsupported-protocol",
        10 => "cancelled",
        11 => "deferred",
        _ => "unknown",
    }
}

/// What the scheduler asked for, kept with the task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskOptions {
    pub timeout_ms: i64,
    pub protocol: Protocol,
    pub firmware_url: Option<String>,
    pub retention_secs: Option<u64>,
    pub description: String,
    pub use_quota: bool,
    pub use_cached_data: bool,
    pub resume_after_downlink_failure: bool,
    pub upgrade_strategy: UpgradeStrategy,
    /// The schedule as it was when the task was created.
    pub schedule: Schedule,
}

/// One step of a task's life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transition {
    pub at_ms: i64,
    pub status: Status,
    pub reason: Option<String>,
    pub state: u8,
    pub update_result: u8,
    /// What the device said with it (hawkBit DDI feedback details).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Reasons of history entries that record a device's answer to a cancellation.
pub const CANCEL_ACKNOWLEDGED: &str = "cancel-acknowledged";
pub const CANCEL_REFUSED: &str = "cancel-refused";

/// A firmware update for one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FotaTask {
    pub id: String,
    pub device_id: String,
    pub firmware: String,
    pub options: TaskOptions,
    pub status: Status,
    pub reason: Option<String>,
    /// Detail for people: an import error, why cached data sufficed.
    pub note: Option<String>,
    /// Last reported /5/0/3 State.
    pub state: u8,
    /// Last reported /5/0/5 Update Result.
    pub update_result: u8,
    pub package_uri: String,
    /// The capability in the package URI's last segment; the URI works only with it when
    /// `auth.package_tokens` is on, and only while the task runs.
    #[serde(default)]
    pub capability: String,
    /// Bytes served on the package URI (all attempts).
    pub bytes_served: u64,
    pub size: Option<u64>,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    /// When the task fails with `timeout`; set while the timeout runs.
    pub deadline_ms: Option<i64>,
    /// Timeout left while it is paused (waiting for a window or quota after a start).
    pub remaining_ms: Option<i64>,
    /// When to look at a waiting task again (a window opens, a deferral ends, the lease on
    /// its import runs out).
    pub wake_ms: Option<i64>,
    /// The instance importing the task's firmware, while its lease (`wake_ms`) runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_owner: Option<String>,
    pub history: Vec<Transition>,
    /// Bumped by every stored change; a change made from an older read is refused.
    #[serde(default)]
    pub revision: u64,
    /// The campaign that released the task; its counts move with the task's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<CampaignLink>,
}

/// A task's place in a campaign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CampaignLink {
    pub id: String,
    pub wave: u32,
}

/// Why a report or command is refused by the state machine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("task has finished ({0})")]
    Finished(&'static str),
    #[error("state {state} with result {result} is not allowed while the task is {status}")]
    NotAllowed {
        status: &'static str,
        state: u8,
        result: u8,
    },
    #[error("a task that is {0} can no longer be cancelled")]
    TooLateToCancel(&'static str),
    #[error("the task is {0}: it has not been handed to the device")]
    NotStarted(&'static str),
    #[error("no cancellation of this task awaits the device's answer")]
    NoCancellation,
}

/// A device's report: /5/0/3 State and /5/0/5 Update Result, and what it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub state: u8,
    pub result: u8,
    pub pkg_name: Option<String>,
    pub pkg_version: Option<String>,
    /// /3/0/3 Firmware Version.
    pub firmware_version: Option<String>,
    /// /5/0/8 Firmware Update Protocol Support.
    pub protocols: Option<Vec<u8>>,
}

impl Report {
    /// Whether the report says what the device runs or supports (kept in the registry).
    pub fn names_firmware(&self) -> bool {
        self.pkg_name.is_some()
            || self.pkg_version.is_some()
            || self.firmware_version.is_some()
            || self.protocols.is_some()
    }
}

impl FotaTask {
    /// When the engine must look at this task next.
    pub fn due_ms(&self) -> Option<i64> {
        if self.status.is_final() {
            return None;
        }
        match (self.deadline_ms, self.wake_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn is_active(&self) -> bool {
        !self.status.is_final()
    }

    pub fn holds_quota(&self) -> bool {
        self.options.use_quota && self.status.is_started()
    }

    pub fn is_importing(&self) -> bool {
        self.status == Status::Pending && self.reason.as_deref() == Some(waiting::IMPORT)
    }

    /// Moves to `status` and records it.
    pub fn set(&mut self, status: Status, reason: Option<&str>, now: i64) {
        self.status = status;
        self.reason = reason.map(str::to_owned);
        if status.is_final() {
            self.finished_ms = Some(now);
            self.deadline_ms = None;
            self.remaining_ms = None;
            self.wake_ms = None;
        }
        if self.history.len() >= HISTORY_LIMIT {
            self.history.remove(1);
        }
        self.history.push(Transition {
            at_ms: now,
            status,
            reason: self.reason.clone(),
            state: self.state,
            update_result: self.update_result,
            detail: None,
        });
    }

    /// Attaches what the device said to the last history entry.
    pub fn annotate(&mut self, detail: String) {
        if let Some(last) = self.history.last_mut() {
            last.detail = Some(detail);
        }
    }

    /// Records what the device said without changing the status (a history entry with
    /// `reason`); only while the device works on the task.
    pub fn note(&mut self, reason: &str, detail: String, now: i64) -> Result<(), TransitionError> {
        if self.status.is_final() {
            return Err(TransitionError::Finished(self.status.as_str()));
        }
        if !self.status.is_started() {
            return Err(TransitionError::NotStarted(self.status.as_str()));
        }
        self.push_entry(reason, detail, now);
        Ok(())
    }

    fn push_entry(&mut self, reason: &str, detail: String, now: i64) {
        if self.history.len() >= HISTORY_LIMIT {
            self.history.remove(1);
        }
        self.history.push(Transition {
            at_ms: now,
            status: self.status,
            reason: Some(reason.to_owned()),
            state: self.state,
            update_result: self.update_result,
            detail: Some(detail),
        });
    }

    /// Whether the operator cancelled the task after it was handed to the device, and the
    /// device has not answered the cancellation yet (hawkBit's `cancelAction`).
    pub fn awaits_cancel_answer(&self) -> bool {
        self.status == Status::Cancelled
            && self.reason.as_deref() == Some("cancelled")
            && self.started_ms.is_some()
            && !self.history.iter().any(|h| {
                matches!(
                    h.reason.as_deref(),
                    Some(CANCEL_ACKNOWLEDGED | CANCEL_REFUSED)
                )
            })
    }

    /// The device's answer to the cancellation: acknowledged, or refused (kept in the
    /// history for the operator; the task stays cancelled and its package is no longer
    /// served). `None` records that it is still at it.
    pub fn answer_cancel(
        &mut self,
        answer: Option<bool>,
        detail: String,
        now: i64,
    ) -> Result<(), TransitionError> {
        if !self.awaits_cancel_answer() {
            return Err(TransitionError::NoCancellation);
        }
        let reason = match answer {
            Some(true) => CANCEL_ACKNOWLEDGED,
            Some(false) => CANCEL_REFUSED,
            None => "cancel-proceeding",
        };
        self.push_entry(reason, detail, now);
        Ok(())
    }

    /// The timeout starts (or resumes) running.
    pub fn run_clock(&mut self, now: i64) {
        if self.deadline_ms.is_none() {
            let left = self.remaining_ms.take().unwrap_or(self.options.timeout_ms);
            self.deadline_ms = Some(now.saturating_add(left));
        }
    }

    /// The timeout stops while the task waits for a window or a quota slot.
    pub fn pause_clock(&mut self, now: i64) {
        if let Some(deadline) = self.deadline_ms.take() {
            self.remaining_ms = Some((deadline - now).max(0));
        }
    }

    /// Whether the schedule's window is open at `now`. When it is not, the task waits for it
    /// (pending, reason window, woken when it opens) with its timeout paused.
    pub fn wait_for_window(&mut self, cal: &Calendar, now: i64) -> bool {
        if cal.is_open(now) {
            return true;
        }
        self.pause_clock(now);
        self.wake_ms = cal.next_open(now);
        if self.reason.as_deref() != Some(waiting::WINDOW) {
            self.set(Status::Pending, Some(waiting::WINDOW), now);
        }
        false
    }

    /// A task whose firmware is ready waits for its window, or for the device while it is open.
    pub fn place(&mut self, cal: &Calendar, now: i64) {
        if self.wait_for_window(cal, now) {
            self.set(Status::Pending, Some(waiting::DEVICE), now);
        }
    }

    /// useCachedData: the device last reported this firmware's package name and version (the
    /// firmware's description and version), so there is nothing to download; the note says so.
    pub fn runs_already(
        &self,
        reported: (Option<&str>, Option<&str>),
        firmware: (Option<&str>, Option<&str>),
    ) -> Option<String> {
        let (Some(name), Some(version)) = firmware else {
            return None;
        };
        (self.options.use_cached_data && reported == (Some(name), Some(version))).then(|| {
            format!("device reported {name} {version} already (useCachedData); nothing to download")
        })
    }

    /// Succeeds without a download: the device runs the firmware already.
    pub fn succeed_from_cache(&mut self, note: String, now: i64) {
        self.note = Some(note);
        self.update_result = 1;
        self.set(Status::Succeeded, Some("cached-data"), now);
    }

    /// First (or renewed) delivery of the package URI to the device.
    pub fn deliver(&mut self, now: i64) {
        self.started_ms.get_or_insert(now);
        self.wake_ms = None;
        self.run_clock(now);
        self.set(Status::Delivering, None, now);
    }

    /// Applies a device report. `resume` and `deferred_until` come from the task options and
    /// the engine configuration.
    pub fn apply(
        &mut self,
        report: &Report,
        deferred_until: i64,
        now: i64,
    ) -> Result<(), TransitionError> {
        use Status as S;
        let status = self.status;
        if status.is_final() {
            return Err(TransitionError::Finished(status.as_str()));
        }
        let refuse = || TransitionError::NotAllowed {
            status: status.as_str(),
            state: report.state,
            result: report.result,
        };
        let started = status.is_started();
        let (next, reason): (Status, Option<&str>) = match (report.result, report.state) {
            (1, 0) if started => (S::Succeeded, None),
            (4, _) if self.options.resume_after_downlink_failure && started => {
                (S::Pending, Some(waiting::RESUME))
            }
            (4, _) if self.options.resume_after_downlink_failure => return Err(refuse()),
            (r @ 2..=9, _) => (S::Failed, Some(result_reason(r))),
            (10, _) => (S::Cancelled, Some("cancelled-by-device")),
            (11, _) if started => (S::Pending, Some(waiting::DEFERRED)),
            (0, 0) if matches!(status, S::Delivering) => (status, None),
            (0, 1) if matches!(status, S::Delivering | S::Downloading) => (S::Downloading, None),
            (0, 2) if matches!(status, S::Delivering | S::Downloading | S::Downloaded) => {
                (S::Downloaded, None)
            }
            (0, 3) if matches!(status, S::Downloaded | S::Updating) => (S::Updating, None),
            _ => return Err(refuse()),
        };
        self.state = report.state;
        self.update_result = report.result;
        match (next, reason) {
            (S::Pending, Some(waiting::DEFERRED)) => self.wake_ms = Some(deferred_until),
            (S::Pending, _) => self.wake_ms = None,
            _ => {}
        }
        if next != status || reason.is_some() {
            self.set(next, reason, now);
        }
        Ok(())
    }

    /// Cancels on the management server's request.
    pub fn cancel(&mut self, now: i64) -> Result<(), TransitionError> {
        match self.status {
            s if s.is_final() => Err(TransitionError::Finished(s.as_str())),
            Status::Updating => Err(TransitionError::TooLateToCancel("updating")),
            _ => {
                self.update_result = 10;
                self.set(Status::Cancelled, Some("cancelled"), now);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn task(resume: bool) -> FotaTask {
        FotaTask {
            id: "t".into(),
            device_id: "d".into(),
            firmware: "fw".into(),
            options: TaskOptions {
                timeout_ms: 1000,
                protocol: Protocol::Coap,
                firmware_url: None,
                retention_secs: None,
                description: String::new(),
                use_quota: false,
                use_cached_data: false,
                resume_after_downlink_failure: resume,
                upgrade_strategy: UpgradeStrategy::WithoutObservations,
                schedule: super::super::schedule::built_in("always").unwrap(),
            },
            status: Status::Pending,
            reason: Some(waiting::DEVICE.into()),
            note: None,
            state: 0,
            update_result: 0,
            package_uri: String::new(),
            capability: String::new(),
            bytes_served: 0,
            size: None,
            created_ms: 0,
            started_ms: None,
            finished_ms: None,
            deadline_ms: None,
            remaining_ms: None,
            wake_ms: None,
            import_owner: None,
            history: Vec::new(),
            revision: 0,
            campaign: None,
        }
    }

    fn rep(state: u8, result: u8) -> Report {
        Report {
            state,
            result,
            ..Report::default()
        }
    }

    #[test]
    fn success_path_and_finished_refusal() {
        let mut t = task(false);
        assert!(t.apply(&rep(1, 0), 0, 1).is_err(), "not delivered yet");
        t.deliver(10);
        assert_eq!(t.deadline_ms, Some(1010));
        for (s, st) in [
            (1, Status::Downloading),
            (2, Status::Downloaded),
            (3, Status::Updating),
        ] {
            t.apply(&rep(s, 0), 0, 20).unwrap();
            assert_eq!(t.status, st);
        }
        // Back to downloading from updating is not a transition the machine allows.
        let before = t.clone();
        assert!(matches!(
            t.apply(&rep(1, 0), 0, 21),
            Err(TransitionError::NotAllowed { .. })
        ));
        assert_eq!(t, before);
        t.apply(&rep(0, 1), 0, 30).unwrap();
        assert_eq!(t.status, Status::Succeeded);
        assert_eq!(t.finished_ms, Some(30));
        assert_eq!(t.due_ms(), None);
        assert_eq!(
            t.apply(&rep(0, 1), 0, 31),
            Err(TransitionError::Finished("succeeded"))
        );
        assert_eq!(t.history.len(), 5);
    }

    #[test]
    fn failures_deferral_resume_and_cancel() {
        for r in 2..=9u8 {
            let mut t = task(false);
            t.deliver(0);
            t.apply(&rep(0, r), 0, 5).unwrap();
            assert_eq!(t.status, Status::Failed);
            assert_eq!(t.reason.as_deref(), Some(result_reason(r)));
        }
        let mut t = task(true);
        t.deliver(0);
        t.apply(&rep(1, 4), 0, 5).unwrap();
        assert_eq!(
            (t.status, t.reason.as_deref()),
            (Status::Pending, Some("resume"))
        );
        assert_eq!(t.deadline_ms, Some(1000), "the timeout keeps running");
        let mut t = task(false);
        t.deliver(0);
        t.apply(&rep(2, 11), 500, 5).unwrap();
        assert_eq!(t.wake_ms, Some(500));
        assert_eq!(t.due_ms(), Some(500));
        let mut t = task(false);
        t.deliver(0);
        t.apply(&rep(3, 0), 0, 1).unwrap_err();
        t.apply(&rep(2, 0), 0, 1).unwrap();
        t.apply(&rep(3, 0), 0, 1).unwrap();
        assert_eq!(
            t.cancel(2),
            Err(TransitionError::TooLateToCancel("updating"))
        );
        let mut t = task(false);
        t.cancel(2).unwrap();
        assert_eq!((t.status, t.update_result), (Status::Cancelled, 10));
        assert!(t.cancel(3).is_err());
    }

    #[test]
    fn paused_clock_keeps_what_was_left() {
        let mut t = task(false);
        t.deliver(100);
        t.pause_clock(400);
        assert_eq!((t.deadline_ms, t.remaining_ms), (None, Some(700)));
        t.run_clock(10_000);
        assert_eq!(t.deadline_ms, Some(10_700));
    }
}
