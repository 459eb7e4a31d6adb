//! Eclipse hawkBit's Direct Device Integration (DDI) API, version 1, as far as it is a
//! protocol: the numeric action id a task is known by, and feedback from the device mapped
//! onto the LwM2M reports the task state machine follows. The routes are in `http/ddi.rs`,
//! the engine's side in `engine/ddi.rs`.
//!
//! Mapping (execution, finished) onto a task:
//! - `closed` + `success`: LwM2M result 1, the task succeeds; `closed` + `failure`: result 8
//!   (update failed); `closed` + `none` is refused (closed says how it ended).
//! - `downloading` (or hawkBit's `download`): state 1; `downloaded`: state 2.
//! - `canceled`: result 10, the device cancelled the update itself.
//! - `rejected`: result 11, as an LwM2M device deferring: the task waits and is offered
//!   again after `fota.deferred_retry` with its timeout running, as hawkBit keeps a rejected
//!   action open.
//! - `proceeding`, `scheduled`, `resumed`: no change of status; the details go into the
//!   task's history.

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::task::Report;

/// Longest details text kept per history entry.
pub const MAX_DETAIL: usize = 1024;

/// The action id of a task: DDI clients take action ids as 32-bit integers (SWUpdate reads
/// them with `json_object_get_int`), while task ids are 128-bit. An action id is only looked
/// up among one device's tasks, so 31 bits of a hash are plenty.
pub fn action_id(task_id: &str) -> u32 {
    let h = Sha256::digest(task_id.as_bytes());
    let n = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) & 0x7fff_ffff;
    n.max(1)
}

/// hawkBit's `execution` values, with the two of DDI 1's later releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Execution {
    Closed,
    Proceeding,
    Canceled,
    Scheduled,
    Rejected,
    Resumed,
    Downloading,
    Downloaded,
}

impl Execution {
    fn parse(s: &str) -> Option<Execution> {
        Some(match s {
            "closed" => Execution::Closed,
            "proceeding" => Execution::Proceeding,
            "canceled" => Execution::Canceled,
            "scheduled" => Execution::Scheduled,
            "rejected" => Execution::Rejected,
            "resumed" => Execution::Resumed,
            "downloading" | "download" => Execution::Downloading,
            "downloaded" => Execution::Downloaded,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Execution::Closed => "closed",
            Execution::Proceeding => "proceeding",
            Execution::Canceled => "canceled",
            Execution::Scheduled => "scheduled",
            Execution::Rejected => "rejected",
            Execution::Resumed => "resumed",
            Execution::Downloading => "downloading",
            Execution::Downloaded => "downloaded",
        }
    }
}

/// hawkBit's `finished` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    Success,
    Failure,
    None,
}

/// A device's feedback on an action or a cancellation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feedback {
    pub execution: Execution,
    pub finished: Finished,
    /// `progress.cnt` of `progress.of`.
    pub progress: Option<(u64, u64)>,
    pub details: Vec<String>,
}

/// What a feedback does to its task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The LwM2M report it amounts to.
    Report(Report),
    /// A history entry with this reason; the status stays.
    Note(&'static str),
}

/// Why a feedback is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FeedbackError(pub String);

fn bad(m: impl Into<String>) -> FeedbackError {
    FeedbackError(m.into())
}

impl Feedback {
    /// Parses a feedback body: `{"status": {"execution", "result": {"finished", "progress":
    /// {"cnt", "of"}}, "details": [..]}}`. The `id`, `time`, `timestamp` and `status.code`
    /// that clients of different hawkBit releases add are accepted and not used.
    pub fn parse(body: &[u8]) -> Result<Feedback, FeedbackError> {
        let v: Value =
            serde_json::from_slice(body).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let status = v
            .get("status")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("status is required (an object)"))?;
        let execution = status
            .get("execution")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("status.execution is required"))?;
        let execution = Execution::parse(execution).ok_or_else(|| {
            bad(format!(
                "status.execution {execution:?}: one of closed, proceeding, canceled, scheduled, \
                 rejected, resumed, downloading, downloaded"
            ))
        })?;
        let result = status.get("result").filter(|r| !r.is_null());
        let finished = match result.and_then(|r| r.get("finished")) {
            None | Some(Value::Null) => Finished::None,
            Some(f) => match f.as_str() {
                Some("success") => Finished::Success,
                Some("failure") => Finished::Failure,
                Some("none") => Finished::None,
                _ => return Err(bad("status.result.finished: one of success, failure, none")),
            },
        };
        let progress = match result.and_then(|r| r.get("progress")) {
            None | Some(Value::Null) => None,
            Some(p) => {
                let n = |k: &str| p.get(k).and_then(Value::as_u64);
                match (n("cnt"), n("of")) {
                    (Some(cnt), Some(of)) => Some((cnt, of)),
                    _ => {
                        return Err(bad(
                            "status.result.progress: cnt and of, non-negative integers",
                        ))
                    }
                }
            }
        };
        let details = match status.get("details") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|d| {
                    d.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| bad("status.details: a list of strings"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad("status.details: a list of strings")),
        };
        Ok(Feedback {
            execution,
            finished,
            progress,
            details,
        })
    }

    /// What this feedback on a deployment does to the task.
    pub fn step(&self) -> Result<Step, FeedbackError> {
        let report = |state, result| {
            Step::Report(Report {
                state,
                result,
                ..Report::default()
            })
        };
        Ok(match (self.execution, self.finished) {
            (Execution::Closed, Finished::Success) => report(0, 1),
            (Execution::Closed, Finished::Failure) => report(0, 8),
            (Execution::Closed, Finished::None) => {
                return Err(bad(
                    "execution closed needs status.result.finished success or failure",
                ))
            }
            (Execution::Canceled, _) => report(0, 10),
            (Execution::Rejected, _) => report(0, 11),
            (Execution::Downloading, _) => report(1, 0),
            (Execution::Downloaded, _) => report(2, 0),
            (Execution::Proceeding, _) => Step::Note("proceeding"),
            (Execution::Scheduled, _) => Step::Note("scheduled"),
            (Execution::Resumed, _) => Step::Note("resumed"),
        })
    }

    /// What this feedback on a cancellation says: `Some(true)` the device acknowledged it,
    /// `Some(false)` it refused, `None` it is still working on it.
    pub fn cancel_answer(&self) -> Option<bool> {
        match (self.execution, self.finished) {
            (Execution::Closed, Finished::Failure) | (Execution::Rejected, _) => Some(false),
            (Execution::Closed, _) | (Execution::Canceled, _) => Some(true),
            _ => None,
        }
    }

    /// The text kept in the task's history: the execution, progress and details, cut to
    /// [`MAX_DETAIL`] bytes.
    pub fn detail(&self) -> String {
        let mut s = self.execution.as_str().to_owned();
        if let Some((cnt, of)) = self.progress {
            s.push_str(&format!(" {cnt}/{of}"));
        }
        for (i, d) in self.details.iter().enumerate() {
            s.push_str(if i == 0 { ": " } else { "; " });
            s.push_str(d.trim());
        }
        cut(s, MAX_DETAIL)
    }
}

/// `s` cut to at most `max` bytes on a character boundary, control characters replaced.
fn cut(s: String, max: usize) -> String {
    let mut s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.len() > max {
        let mut end = max - '…'.len_utf8();
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_ids_are_positive_31_bit_and_stable() {
        let a = action_id("0190c0ffee0000000000000000000001");
        assert!(a >= 1 && a <= i32::MAX as u32);
        assert_eq!(a, action_id("0190c0ffee0000000000000000000001"));
        assert_ne!(a, action_id("0190c0ffee0000000000000000000002"));
    }

    #[test]
    fn swupdate_feedback_parses_and_maps() {
        // As SWUpdate 2022.12 sends it.
        let body = br#"{"id": 8, "time": "20261204T101010", "status": {"result": {"progress":
            {"cnt": 0, "of": 1}, "finished": "none"}, "execution": "proceeding",
            "details": ["Installing Update Chunk Artifacts."]}}"#;
        let f = Feedback::parse(body).unwrap();
        assert_eq!(f.step().unwrap(), Step::Note("proceeding"));
        assert_eq!(
            f.detail(),
            "proceeding 0/1: Installing Update Chunk Artifacts."
        );
        let closed =
            br#"{"id":"8","status":{"execution":"closed","result":{"finished":"success"}}}"#;
        let f = Feedback::parse(closed).unwrap();
        assert!(matches!(f.step().unwrap(), Step::Report(r) if (r.state, r.result) == (0, 1)));
        assert_eq!(f.cancel_answer(), Some(true));
        // A later hawkBit's shape: timestamp and code.
        let newer = br#"{"timestamp": 1, "status": {"execution": "downloaded", "code": 200}}"#;
        let f = Feedback::parse(newer).unwrap();
        assert!(matches!(f.step().unwrap(), Step::Report(r) if (r.state, r.result) == (2, 0)));
    }

    #[test]
    fn bad_feedback_is_refused() {
        for body in [
            &br#"{}"#[..],
            br#"{"status": {}}"#,
            br#"{"status": {"execution": "done"}}"#,
            br#"{"status": {"execution": "closed", "result": {"finished": "ok"}}}"#,
            br#"{"status": {"execution": "proceeding", "details": "x"}}"#,
            br#"{"status": {"execution": "proceeding", "result": {"progress": {"cnt": -1}}}}"#,
            b"not json",
        ] {
            assert!(
                Feedback::parse(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let f = Feedback::parse(br#"{"status": {"execution": "closed"}}"#).unwrap();
        assert!(f.step().is_err(), "closed says how it ended");
        let f = Feedback::parse(br#"{"status": {"execution": "rejected"}}"#).unwrap();
        assert_eq!(f.cancel_answer(), Some(false));
    }

    #[test]
    fn details_are_cut_on_a_character_boundary() {
        let f = Feedback {
            execution: Execution::Proceeding,
            finished: Finished::None,
            progress: None,
            details: vec!["é\n".repeat(2000)],
        };
        let d = f.detail();
        assert!(d.len() <= MAX_DETAIL && d.ends_with('…') && !d.contains('\n'));
    }
}
